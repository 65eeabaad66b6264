"""trionet's userspace TCP/IP stack: a sans-IO core and its trio driver.

``stack``      routing, tables, limits, the receive fast path (``StackCore``)
``tcp``        a TCP connection: state machine, ACK processing, output, and its
               timers (retransmission timeout and backoff, RTT estimate, zero-window
               probe, keepalive, delayed ACK, TIME-WAIT)
``recovery``   loss detection and retransmission (SACK, RACK, TLP, after an RTO)
``scoreboard`` the sender's SACK scoreboard and retransmissions in flight
``reassembly`` the receiver's out-of-order data and the SACK blocks it reports
``congestion`` the congestion window (NewReno with PRR)
``rbuf``       the receive buffer
``wire``       header formats: parse and build, no state
``driver``     the trio side: ``NetStack``, ``TcpStream``, ``TcpListener``, ``UdpEndpoint``
``tun``        a Linux TUN device for running the stack against the kernel
"""

from __future__ import annotations

from .driver import NetStack, TcpListener, TcpStream, UdpEndpoint
from .stack import ConnectionLimitError, PacketInfo, StackCore
from .tcp import State, TcpConfig, TcpConnection

__all__ = [
           "ConnectionLimitError",
           "NetStack",
           "PacketInfo",
           "StackCore",
           "State",
           "TcpConfig",
           "TcpConnection",
           "TcpListener",
           "TcpStream",
           "UdpEndpoint",
]
