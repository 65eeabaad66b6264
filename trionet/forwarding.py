"""`LocalForward`: a local TCP port that leads to one tailnet host and port.

For libraries that only take a host and a port (a database driver, urllib, an
asyncio client): `Node.forward` binds a loopback listener and relays every
connection made to it to HOST:PORT in the tailnet.

    async with trionet.Node(...) as node:
        host, port = await node.forward("db", 5432)

The relaying is the ``--forward`` proxy's (`trionet.proxy.server.ForwardProxy`):
half-closes pass through, a refused or reset tailnet connection reaches the
local client as a reset, clients are counted and bounded. The listener lives
in the node's nursery: it closes with the node, or sooner with `aclose()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import trio

from trionet.errors import find_trionet_error
from trionet.proxy.server import MAX_CLIENTS, Dialer, ForwardProxy

__all__ = ["LocalForward"]


class LocalForward:
    """A listening local address whose connections reach ``target`` in the tailnet.

    Unpacks to its address (``host, port = await node.forward(...)``); `aclose()`
    or leaving ``async with`` stops listening and resets the connections it relays."""

    def __init__(self, proxy: ForwardProxy, address: tuple[str, int], target: tuple[str, int],
                 scope: trio.CancelScope, closed: trio.Event) -> None:
        self.proxy = proxy
        self.name = proxy.name  # the key of its counters in the node's statistics()["attached"]
        self.address = address
        self.target = target
        self._scope = scope
        self._closed = closed

    def statistics(self) -> dict[str, Any]:
        return self.proxy.statistics()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.address)

    def __repr__(self) -> str:
        return f"<LocalForward {self.address[0]}:{self.address[1]} -> {self.target[0]}:{self.target[1]}>"

    async def aclose(self) -> None:
        self._scope.cancel()
        await self._closed.wait()

    async def __aenter__(self) -> LocalForward:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @classmethod
    async def start(cls, nursery: trio.Nursery, dialer: Dialer, host: str, port: int, *,
                    bind: str = "127.0.0.1", local_port: int = 0, max_clients: int = MAX_CLIENTS,
                    on_close: Callable[[LocalForward], None] | None = None) -> LocalForward:
        """Listen on ``bind:local_port`` (0: any free port) in a task of ``nursery``;
        returns once listening. A port that cannot be bound raises TrionetError."""
        proxy = ForwardProxy(local_port, host, port, dialer, bind, max_clients=max_clients)
        closed = trio.Event()
        made: list[LocalForward] = []

        async def serve(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    def started(bound: int) -> None:
                        proxy.name = f"forward {bind}:{bound}->{host}:{port}"
                        forward = cls(proxy, (bind, bound), (host, port), scope, closed)
                        made.append(forward)
                        task_status.started(forward)

                    await proxy.serve(task_status=_Started(started))
            finally:
                closed.set()
                if made and on_close is not None:
                    on_close(made[0])

        try:
            forward: LocalForward = await nursery.start(serve)
        except BaseExceptionGroup as group:  # one clear error, not a nursery's wrapping
            err = find_trionet_error(group)
            if err is None:
                raise
            raise err from None
        return forward


class _Started:
    """A task_status that hands the proxy's bound port to a callback."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self._callback = callback

    def started(self, value: int) -> None:
        self._callback(value)
