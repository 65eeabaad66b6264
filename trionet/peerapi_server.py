"""The peer API on the netstack: the Trio driver of `trionet.peerapi`.

`PeerApiServer.listen` takes tailscaled's port for each of our addresses on the
node's netstack (synchronously, so the first Hostinfo after it can carry the
Services); `serve` accepts connections, one task each. Per connection: HTTP/1.1
requests in turn (keep-alive), or HTTP/2 with prior knowledge when it starts
with that preface (h2c, as tailscaled's server takes it), each decided by
`peerapi.decide`; a DNS query goes to `ask` (the host's resolver) with a 5 s
limit.

Bounds: at most MAX_CONNECTIONS connections at once (more are closed at once),
a request head and body within `peerapi`'s limits, REQUEST_TIMEOUT for a whole
request to arrive and IDLE_TIMEOUT between requests. Every refusal is counted
in `stats` and logged at debug (`RejectLog`); no exception leaves a
connection's task.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import trio

from trionet import peerapi
from trionet.errors import LocalProtocolError, TrionetError
from trionet.netstack import NetStack
from trionet.rejects import RejectLog

__all__ = ["ASK_TIMEOUT", "MAX_CONNECTIONS", "PeerApiServer"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0  # a request's head and body, from its first byte (or the connection's start)
IDLE_TIMEOUT = 60.0  # a kept-alive connection with no request
ASK_TIMEOUT = 5.0  # tailscaled's handleDNSQuery arbitraryTimeout
SEND_TIMEOUT = 10.0

#: Who is calling, from its tailnet address: None for an address no peer has.
AccessFor = Callable[[peerapi.IPAddr], "peerapi.Access | None"]
#: A DNS query's bytes to the answer's (raises when it cannot be answered).
AskResolver = Callable[[bytes], Awaitable[bytes]]


class PeerApiServer:
    def __init__(self, access_for: AccessFor, ask: AskResolver) -> None:
        self.access_for = access_for
        self.ask = ask
        self.stats: Counter[str] = Counter()
        self.rejects = RejectLog(log, "peerapi", self.stats)
        self.port4 = 0
        self.port6 = 0
        self._listeners: list[Any] = []
        self._connections = 0

    def statistics(self) -> dict[str, int]:
        return {**self.stats, "connections_open": self._connections}

    def services(self) -> list[dict[str, object]]:
        """Hostinfo.Services while listening; [] before."""
        if not self._listeners:
            return []
        return peerapi.services(self.port4 or None, self.port6 or None)

    def listen(self, stack: NetStack, addresses: Sequence[peerapi.IPAddr],
               reserved: Collection[int] = ()) -> None:
        """Listen on tailscaled's port for each address family we have (the first of its
        5 candidates that is free and not `reserved`: ports the user's --serve takes once
        the node runs). A netstack listener takes the port on every address."""
        for family in (4, 6):
            addr = next((a for a in addresses if a.version == family), None)
            if addr is None:
                continue
            for port in peerapi.peerapi_port_candidates(addr):
                if port in (self.port4, self.port6):  # the other family's listener has it already
                    break
                if port in reserved:
                    continue
                try:
                    self._listeners.append(stack.listen_tcp(port))
                except LocalProtocolError:  # taken (by --serve, say): tailscaled tries the next
                    continue
                break
            else:
                log.warning("peer API: no free port for %s; exit node clients cannot ask our DNS", addr)
                continue
            if family == 4:
                self.port4 = port
            else:
                self.port6 = port
        if self._listeners:
            log.info("peer API listening on port %s", ",".join(
                str(p) for p in dict.fromkeys((self.port4, self.port6)) if p))

    async def serve(self) -> None:
        """Accept on every listener until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in self._listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: Any, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            if self._connections >= MAX_CONNECTIONS:
                self.rejects.reject("too_many_connections", stream.remote_address)
                nursery.start_soon(trio.aclose_forcefully, stream)
                continue
            self._connections += 1
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: Any) -> None:
        try:
            async with stream:
                await self._serve_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, TrionetError, OSError) as exc:
            self.rejects.reject("connection_lost", repr(exc))
        except Exception as exc:  # a bug of ours: this connection ends, the server goes on
            self.rejects.internal_error("connection", exc)
        finally:
            self._connections -= 1

    async def _serve_connection(self, stream: Any) -> None:
        caller: peerapi.IPAddr = stream.remote_address[0]
        if self.access_for(caller) is None:  # tailscaled's ServeConn: WhoIs fails, the connection closes
            self.rejects.reject("unknown_peer", caller)
            return
        self.stats["connections"] += 1
        reader = peerapi.RequestReader()
        first = await self._first_bytes(stream)
        if not first:
            return
        if first.startswith(peerapi.H2_PREFACE):
            await self._serve_h2(stream, caller, first)
            return
        reader.feed(first)
        while True:
            request = await self._read_request(stream, reader)
            if request is None:
                return
            if isinstance(request, peerapi.BadRequest):
                self.rejects.reject(request.kind, caller)
                await self._send(stream, peerapi.render(request.status, (request.message + "\n").encode(),
                                                        "text/plain; charset=utf-8", keep_alive=False))
                return
            access = self.access_for(caller)  # again: the netmap may have changed in between
            if access is None:
                self.rejects.reject("unknown_peer", caller)
                return
            status, body, content_type = await self._answer(request, access, caller)
            await self._send(stream, peerapi.render(status, body, content_type, request.keep_alive))
            if not request.keep_alive:
                return

    async def _first_bytes(self, stream: Any) -> bytes:
        """Enough of the start to tell HTTP/2's preface (h2c) from an HTTP/1.1 request;
        b"" when the client sent nothing before closing or IDLE_TIMEOUT (counted)."""
        data = b""
        with trio.move_on_after(IDLE_TIMEOUT) as waiting:
            while len(data) < len(peerapi.H2_PREFACE) and peerapi.H2_PREFACE.startswith(data):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        if waiting.cancelled_caught and not data:
            self.rejects.reject("idle")
        return data

    async def _serve_h2(self, stream: Any, caller: peerapi.IPAddr, first: bytes) -> None:
        """HTTP/2 with prior knowledge: requests answered in turn, as they complete."""
        self.stats["h2c_connections"] += 1
        session = peerapi.H2cSession()
        data = first
        while True:
            for stream_id, request in session.feed(data):
                if isinstance(request, peerapi.BadRequest):
                    self.rejects.reject(request.kind, caller)
                    session.respond(stream_id, request.status, (request.message + "\n").encode(),
                                    "text/plain; charset=utf-8")
                    continue
                access = self.access_for(caller)
                if access is None:
                    self.rejects.reject("unknown_peer", caller)
                    return
                status, body, content_type = await self._answer(request, access, caller)
                session.respond(stream_id, status, body, content_type)
            out = session.data_to_send()
            if out:
                await self._send(stream, out)
            if session.failed is not None:
                self.rejects.reject(session.failed.kind, caller)
                return
            with trio.move_on_after(IDLE_TIMEOUT) as waiting:
                data = await stream.receive_some(65536)
            if waiting.cancelled_caught:
                self.rejects.reject("idle")
                return
            if not data:
                return

    async def _read_request(self, stream: Any, reader: peerapi.RequestReader) -> \
            peerapi.Request | peerapi.BadRequest | None:
        """The next request; None when the client closed or went quiet (counted)."""
        got = reader.next_request()
        deadline = trio.current_time() + (IDLE_TIMEOUT if reader.buffered == 0 else REQUEST_TIMEOUT)
        started = reader.buffered > 0
        while got is None:
            with trio.move_on_at(deadline) as waiting:
                data = await stream.receive_some(65536)
            if waiting.cancelled_caught:
                self.rejects.reject("slow_request" if started else "idle")
                return None
            if not data:
                if reader.buffered:
                    self.rejects.reject("truncated_request")
                return None
            reader.feed(data)
            if not started:  # the first byte of a request: it has REQUEST_TIMEOUT to complete
                started = True
                deadline = trio.current_time() + REQUEST_TIMEOUT
            got = reader.next_request()
        return got

    async def _answer(self, request: peerapi.Request, access: peerapi.Access,
                      caller: peerapi.IPAddr) -> tuple[int, bytes, str]:
        decision = peerapi.decide(request, access)
        if isinstance(decision, peerapi.Reply):
            if decision.reject:
                self.rejects.reject(decision.reject, f"{caller} {request.method} {request.path[:60]}")
            return decision.status, decision.body, decision.content_type
        self.stats["dns_queries"] += 1
        try:
            with trio.fail_after(ASK_TIMEOUT):
                answer = await self.ask(decision.wire)
        except trio.TooSlowError:
            self.rejects.reject("dns_timeout", decision.name)
            return 500, b"context deadline exceeded\n", "text/plain; charset=utf-8"
        except (TrionetError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.rejects.reject("dns_failed", f"{decision.name}: {exc!r}")
            return 500, b"DNS forwarding error\n", "text/plain; charset=utf-8"
        self.stats["dns_answers"] += 1
        return 200, answer, peerapi.DOH_CONTENT_TYPE

    async def _send(self, stream: Any, data: bytes) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            self.rejects.reject("slow_reader")
            raise trio.BrokenResourceError("the client does not read its answer")
