"""trionet as a subnet router or exit node: tailnet peers' flows to forwarded
addresses, carried from the host's own sockets (no root, no TUN).

``core``    which destinations are forwarded (``RoutePolicy``); the flows, their
            limits and counters (``ForwardTable``); sans-IO
``driver``  ``Router``: the netstack's forwarding hooks, host dials, UDP sockets, ping
"""

from __future__ import annotations

from .core import ForwardTable, RoutePolicy
from .driver import Router

__all__ = ["ForwardTable", "RoutePolicy", "Router"]
