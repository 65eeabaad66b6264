"""`ThreadedNode`: a tailnet node for programs that do not run Trio (plain threads, asyncio).

    with ThreadedNode(login_server=URL, auth_key=KEY, state_dir=DIR) as node:
        sock = node.open_connection("web-server", 80)   # a connected socket.socket
        host, port = node.forward("db", 5432)           # a local address for any library

The node runs in `trio.run` in a thread of its own; each method hands its work to
that thread (`trio.from_thread`) and blocks the caller until it is done. Errors
come out as the Trio API raises them (`StartTimeout`, `AuthError`, `TransportError`
for a refused or unknown peer, ...), in the calling thread.

From asyncio, run the calls that wait in a worker thread and connect with asyncio's
own streams: ``await asyncio.to_thread(node.start)``, then
``asyncio.open_connection(*node.forward(host, port))`` or
``asyncio.open_connection(sock=await asyncio.to_thread(node.open_connection, host, port))``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from trionet.config import NodeConfig
from trionet.errors import TransportError, find_trionet_error
from trionet.netstack.driver import TcpStream
from trionet.node import Node
from trionet.proxy.server import CONNECT_TIMEOUT, TAILNET_KEEPALIVE, relay, reset
from trionet.rejects import RejectLog

__all__ = ["ThreadedNode"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long making the local end of an `open_connection` may take (a loopback
#: connect and accept: instant, unless something floods the short-lived listener).
LOCAL_PAIR_TIMEOUT = 5.0


class ThreadedNode:
    """A `trionet.Node` hosted in a background thread, with a blocking API.

    Takes the same arguments as `Node`. `start()` blocks until the node is Running;
    `stop()` (or leaving ``with``) shuts it down, closes every connection it relays
    and joins its thread. A ThreadedNode runs once: after `stop()` make a new one."""

    def __init__(
        self,
        login_server: str | None = None,
        auth_key: str | None = None,
        state_dir: str | Path | None = None,
        hostname: str | None = None,
        ca_file: str | Path | None = None,
        *,
        config: NodeConfig | None = None,
        udp_port: int = 0,
        udp_bind: str = "",
        exit_node: str | None = None,
        exit_node_allow_lan_access: bool | None = None,
        accept_routes: bool | None = None,
        advertise_routes: Sequence[str] | str | None = None,
        advertise_exit_node: bool | None = None,
        host_resolvers: Sequence[str] | None = None,
    ) -> None:
        self._node = Node(login_server, auth_key, state_dir, hostname, ca_file, config=config,
                          udp_port=udp_port, udp_bind=udp_bind, exit_node=exit_node,
                          exit_node_allow_lan_access=exit_node_allow_lan_access, accept_routes=accept_routes,
                          advertise_routes=advertise_routes, advertise_exit_node=advertise_exit_node,
                          host_resolvers=host_resolvers)
        self._relays = _Relays()
        self._node.attach_statistics(self._relays)
        self._lock = threading.Lock()  # start() and stop() may come from different threads
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._token_ready = threading.Event()  # set once stop() can reach the Trio thread, or it ended
        self._token: trio.lowlevel.TrioToken | None = None
        # Trio-thread state: touched only there
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._calls: set[trio.CancelScope] = set()
        self._closing = False
        self._error: BaseException | None = None  # why the run ended, if not by stop()

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float | None = None) -> None:
        """Start the node; return once it is Running. Raises what the node raised:
        `StartTimeout` after ``timeout`` seconds (default: the config's, 60 s),
        `AuthError`, `ConfigError`, ... Calling it again while running returns at once."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("this ThreadedNode was stopped; make a new one")
            if self._thread is None:
                if timeout is not None:
                    self._node.config = attrs.evolve(self._node.config, start_timeout=timeout)
                self._thread = threading.Thread(target=self._thread_main, daemon=True,
                                                name=f"trionet node {self._node.config.hostname}")
                self._thread.start()
        try:
            self._started.result()
        except BaseException:  # its error, or the caller's KeyboardInterrupt: nothing is left running
            self.stop()
            raise

    def stop(self) -> None:
        """Shut the node down and join its thread. Safe to call more than once."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("stop() from the node's own thread would wait for itself")
        self._token_ready.wait()
        if self._token is not None:
            try:
                trio.from_thread.run_sync(self._shutdown, trio_token=self._token)
            except trio.RunFinishedError:
                pass  # it had ended already (an error, or an earlier stop)
        thread.join()

    def __enter__(self) -> ThreadedNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------- API
    def open_connection(self, host: str, port: int, *, timeout: float | None = CONNECT_TIMEOUT) -> socket.socket:
        """A TCP connection to tailnet ``host:port``, as a connected blocking socket.

        The socket's other end (over loopback) is relayed to the tailnet connection:
        ``shutdown(SHUT_WR)`` reaches the peer as a FIN, a peer's reset reaches the
        socket as ECONNRESET. A refused or unreachable peer raises `TransportError`
        (an unknown name `ConfigError`), as `Node.open_tcp_stream` does."""
        return self._call(self._open_connection, host, port, timeout)

    def forward(self, host: str, port: int, *, bind: str = "127.0.0.1", local_port: int = 0) -> tuple[str, int]:
        """A local address whose connections are relayed to tailnet ``host:port``
        (`Node.forward`); it listens until the node stops."""
        forward = self._call(partial(self._node.forward, host, port, bind=bind, local_port=local_port))
        return forward.address

    def status(self) -> dict[str, Any]:
        """`Node.status()`: state, addresses, peers and counters."""
        return self._call_sync(self._node.status)

    def peers(self) -> list[dict[str, Any]]:
        return self._call_sync(self._node.peers)

    def set_exit_node(self, exit_node: str | None) -> dict[str, Any]:
        """`Node.set_exit_node`: use this peer for traffic outside the tailnet (None: stop)."""
        return self._call_sync(lambda: self._node.set_exit_node(exit_node))

    def set(self, **changes: Any) -> dict[str, Any]:
        """`Node.set`: change routing and what we advertise (exit_node, accept_routes,
        exit_node_allow_lan_access, advertise_routes, advertise_exit_node)."""
        return self._call_sync(lambda: self._node.set(**changes))

    def routing_status(self) -> dict[str, Any]:
        """`Node.routing_status()`: the exit node in use, accepted routes, what we advertise."""
        return self._call_sync(self._node.routing_status)

    @property
    def running(self) -> bool:
        return self._started.done() and self._started.exception() is None and not self._stopped \
            and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------ the caller's side
    def _call(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if not self.running or self._token is None:
            raise self._not_running()
        try:
            return trio.from_thread.run(self._guarded, afn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise self._not_running() from None

    def _call_sync(self, fn: Callable[[], T]) -> T:
        if self._token is not None and self._thread is not None and self._thread.is_alive():
            try:
                return trio.from_thread.run_sync(fn, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        return fn()  # not running: no other thread touches the node

    def _not_running(self) -> TransportError:
        why = f" ({self._error})" if self._error is not None else ""
        return TransportError(f"the node is not running{why}")

    # ---------------------------------------------------------- the Trio thread
    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # how the node ended: start() or the next call says so
            err: BaseException = find_trionet_error(exc) or exc
            self._error = err
            if not self._started.done():
                self._started.set_exception(err)
            else:
                log.warning("node stopped: %s", err)
        else:
            if not self._started.done():
                self._started.set_exception(TransportError("the node was stopped before it was running"))
        finally:
            self._token_ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            self._token_ready.set()
            async with trio.open_nursery() as nursery:
                await nursery.start(self._node.run)
                self._nursery = nursery
                self._started.set_result(None)
                await trio.sleep_forever()

    def _shutdown(self) -> None:
        self._closing = True
        for call in self._calls:
            call.cancel()
        if self._scope is not None:
            self._scope.cancel()

    async def _guarded(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One call from another thread; stop() cancels it, and it says so."""
        if self._closing:
            raise self._not_running()
        with trio.CancelScope() as scope:
            self._calls.add(scope)
            try:
                return await afn(*args)
            finally:
                self._calls.discard(scope)
        raise TransportError("the node was stopped during the call")

    async def _open_connection(self, host: str, port: int, timeout: float | None) -> socket.socket:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                stream = await self._node.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise TransportError(f"connecting to {host}:{port}: no answer within {timeout:g} s") from None
        try:
            ours, theirs = _loopback_pair()
        except OSError:
            await reset(stream)
            raise
        if isinstance(stream, TcpStream):  # a peer that vanishes without FIN or RST frees the relay
            stream.set_keepalive(*TAILNET_KEEPALIVE)
        assert self._nursery is not None
        self._relays.spawn(self._nursery, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), stream)
        return theirs


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets over loopback. Not socketpair(): a Unix socket's
    close passes no reset, and the caller must see a tailnet reset as one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(LOCAL_PAIR_TIMEOUT)
        theirs = socket.create_connection(listener.getsockname(), timeout=LOCAL_PAIR_TIMEOUT)
        try:
            while True:
                ours, addr = listener.accept()
                if addr == theirs.getsockname():
                    break
                ours.close()  # another local process got to the port first
        except BaseException:
            theirs.close()
            raise
    theirs.settimeout(None)
    theirs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ours, theirs


class _Relays:
    """The relays behind `open_connection` sockets: counted in the node's statistics.
    Each is bound to a socket the caller holds, so the caller's descriptors bound them."""

    name = "open_connection"

    def __init__(self) -> None:
        self.opened = 0
        self.completed = 0
        self.live = 0
        self.failed = RejectLog(log, "open_connection")

    def statistics(self) -> dict[str, Any]:
        return {"opened": self.opened, "completed": self.completed, "live": self.live,
                "failed": dict(self.failed.counts)}

    def spawn(self, nursery: trio.Nursery, local: trio.SocketStream, tailnet: trio.abc.Stream) -> None:
        self.opened += 1
        self.live += 1
        nursery.start_soon(self._relay, local, tailnet)

    async def _relay(self, local: trio.SocketStream, tailnet: trio.abc.Stream) -> None:
        try:
            await relay(local, tailnet)  # closes both, whatever happens
        except Exception as exc:
            reason = getattr(exc, "reason", None)  # client_reset / target_reset
            if reason is None:
                self.failed.internal_error("relay", exc)
            else:
                self.failed.reject(str(reason), exc)
        else:
            self.completed += 1
        finally:
            self.live -= 1
