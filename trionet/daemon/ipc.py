"""IPC: newline-delimited JSON on a Unix socket (mode 0600).

Requests are objects with a "cmd" (status, peers, ping, set, down); each
answer is one line, {"ok": true, ...} or {"ok": false, "error": "..."}.
A handler may return `AfterReply(answer, then)`: `then()` runs once the
answer is written, so `down` can stop the daemon and still be answered.
A client that sends garbage gets an error line; a client that floods or
stalls is cut off; neither affects any other client.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from trionet.errors import ConfigError, TransportError, TrionetError

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 300.0


@attrs.frozen
class AfterReply:
    """An answer, and what to do once the client has it (e.g. stop the daemon)."""

    answer: dict[str, Any]
    then: Callable[[], None]


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | AfterReply]]


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket; refuse if another daemon is listening there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: a leftover from a crash
        return
    finally:
        probe.close()
    raise ConfigError(f"another trionet daemon is running (socket {path}); stop it with `trionet down`")


async def open_ipc_listener(path: Path) -> trio.SocketListener:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _claim_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return trio.SocketListener(sock)


class IpcServer:
    """The daemon's control socket: one JSON request per line, one answer per line.

    Only our own user can connect (the socket is 0600); its counters still show in
    `status --json` (under ``attached.ipc``), like every other listener's."""

    name = "ipc"

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.stats: Counter[str] = Counter()
        self.live_connections = 0

    def statistics(self) -> dict[str, Any]:
        return {**self.stats, "live_connections": self.live_connections}

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = await open_ipc_listener(self.path)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.stats["connections"] += 1
        self.live_connections += 1
        buf = bytearray()
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    data = await stream.receive_some(4096)
                if idle.cancelled_caught:
                    self.stats["idle_timeouts"] += 1
                    return
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    answer, then = await self._answer(line)
                    try:
                        await stream.send_all(json.dumps(answer).encode() + b"\n")
                    finally:  # once the answer is in the socket buffer, the client gets it even if
                        if then is not None:  # `then` ends the daemon; a client gone by now changes nothing
                            then()
                if len(buf) > MAX_LINE:
                    self.stats["too_long"] += 1
                    await stream.send_all(b'{"ok": false, "error": "request line too long"}\n')
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats["client_gone"] += 1
            return
        finally:
            self.live_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, line: bytes) -> tuple[dict[str, Any], Callable[[], None] | None]:
        self.stats["requests"] += 1
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.stats["bad_json"] += 1
            return {"ok": False, "error": "request is not JSON"}, None
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            self.stats["bad_request"] += 1
            return {"ok": False, "error": 'request must be an object with a "cmd" string'}, None
        try:
            answer = await self.handler(request)
        except TrionetError as exc:
            self.stats["refused"] += 1
            return {"ok": False, "error": str(exc)}, None
        except Exception as exc:  # a bug in a handler must not take the daemon down
            self.stats["internal_error"] += 1
            log.exception("ipc handler failed for %r", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {exc.__class__.__name__}"}, None
        if isinstance(answer, AfterReply):
            return {"ok": True, **answer.answer}, answer.then
        return {"ok": True, **answer}, None


async def serve_ipc(path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """`IpcServer(path, handler).serve()`, for callers that want no counters."""
    await IpcServer(path, handler).serve(task_status=task_status)


def request(path: Path, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Blocking client for the CLI: one request, one answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise TransportError(f"trionet is not running (no daemon at {path})") from exc
            raise TransportError(f"cannot reach the daemon at {path}: {exc.strerror}") from exc
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise TransportError("the daemon closed the connection without answering")
            buf += chunk
    except TimeoutError as exc:
        raise TransportError(f"the daemon did not answer within {timeout:.0f} s") from exc
    finally:
        sock.close()
    try:
        answer = json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TransportError("the daemon's answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise TransportError("the daemon's answer is not a JSON object")
    return answer
