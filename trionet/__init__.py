"""trionet: a userspace Tailscale node in pure Python, built on Trio.

    async with trionet.Node(login_server=URL, auth_key=KEY, state_dir=DIR) as node:
        stream = await node.open_tcp_stream("peer-name", 80)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Node", "ThreadedNode", "__version__"]

if TYPE_CHECKING:
    from trionet.node import Node
    from trionet.threaded import ThreadedNode


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m trionet status` does not load the whole stack.
    if name == "Node":
        from trionet.node import Node

        return Node
    if name == "ThreadedNode":  # a Node in a thread of its own, for programs that are not Trio
        from trionet.threaded import ThreadedNode

        return ThreadedNode
    raise AttributeError(name)
