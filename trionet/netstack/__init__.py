"""trionet's userspace TCP/IP stack: sans-IO core (``stack``, ``tcp``, ``wire``)
and its trio driver (``driver``)."""

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
