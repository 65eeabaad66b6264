"""A small in-memory tailnet for the library tests: our NetStack (A) linked to a peer's (B).

`LinkedNode` is a real `trionet.Node` whose `run` brings up the linked stacks
instead of control, WireGuard and magicsock; everything above the netstack
(`open_tcp_stream`, `forward`, `status`) is the Node's own code. The peer "peer"
(10.0.0.2) serves:

* 80: an echo that upper-cases, and half-closes when the client does
* 82: reads one chunk, then resets
* 8080: HTTP/1.1 with keep-alive (`HttpPeer`)
* nothing on other ports: a SYN there is refused with RST

10.0.0.99 is a black hole: a connection to it stays in SYN_SENT.
"""

from __future__ import annotations

import os
from typing import Any

import trio
import trio.testing

from tests.unit.netstack.simlink import B4, linked_stacks
from trionet.errors import ConfigError
from trionet.netstack import NetStack, TcpConfig
from trionet.netstack.driver import TcpStream
from trionet.node import Node
from trionet.status import Status

BLACK_HOLE = "10.0.0.99"
ECHO, RESETS, HTTP = 80, 82, 8080
REFUSED = 81


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _echo_upper(stream: trio.abc.HalfCloseableStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data.upper())
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _read_then_reset(stream: TcpStream) -> None:
    try:
        await stream.receive_some(65536)
    finally:
        await stream.abort("test: reset after the first chunk")


class HttpPeer:
    """HTTP/1.1 on the peer: ``GET /N`` answers N bytes of "x", anything else "hello".
    A request with ``Connection: close`` is answered so and closed; after ``/close-silently``
    the connection is closed without a word (as an idle keep-alive timeout does).
    Counts the connections it accepted."""

    def __init__(self) -> None:
        self.connections = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                announced = b"connection: close" in head.lower()
                body = b"x" * int(path[1:]) if path[1:].isdigit() else b"hello"
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
                    len(body), b"Connection: close\r\n" if announced else b"", body))
                if announced or path == "/close-silently":
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def _serve(stack: NetStack, port: int, handler: Any, nursery: trio.Nursery) -> None:
    async with stack.listen_tcp(port) as listener:
        while True:
            nursery.start_soon(handler, await listener.accept())


async def run_peer(a: NetStack, b: NetStack, nursery: trio.Nursery, http: HttpPeer) -> None:
    nursery.start_soon(_serve, b, ECHO, _echo_upper, nursery)
    nursery.start_soon(_serve, b, RESETS, _read_then_reset, nursery)
    nursery.start_soon(_serve, b, HTTP, http.serve, nursery)
    await trio.testing.wait_all_tasks_blocked()


class LinkedNode(Node):
    """A Node whose tailnet is one linked peer: see the module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = HttpPeer()
        self.peer_stack: NetStack | None = None

    async def resolve(self, host: str) -> str:
        if host == "peer":
            return str(B4)
        if host[0].isdigit():
            return host
        raise ConfigError(f"unknown peer {host!r}: not in this node's netmap")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # a short TIME_WAIT: a graceful close's leftover is not what these tests look for
        try:
            async with linked_stacks(config=TcpConfig(msl=0.05)) as (a, b), trio.open_nursery() as nursery:
                self._nursery = nursery
                self.stack, self.peer_stack = a, b
                self._stack_ready.set()
                await run_peer(a, b, nursery, self.http)
                self.status_machine.move(Status.CONNECTING)
                self.status_machine.move(Status.REGISTERING)
                self.status_machine.move(Status.RUNNING)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.status_machine.move(Status.SHUTTING_DOWN)
            self.status_machine.move(Status.STOPPED)

    def tcp_connections(self) -> int:
        """Our netstack's TCP connections, any state."""
        return int(self.stack.statistics()["tcp_connections"]) if self.stack is not None else 0


def linked_node(tmp_path: Any) -> LinkedNode:
    return LinkedNode(login_server="https://control.invalid", state_dir=tmp_path, hostname="lib-test")
