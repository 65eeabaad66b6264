from __future__ import annotations

import json
import socket
import stat
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trionet.daemon import ipc
from trionet.errors import ConfigError, TransportError


async def handler(request: dict[str, Any]) -> dict[str, Any]:
    if request["cmd"] == "status":
        return {"status": "Running"}
    if request["cmd"] == "boom":
        raise RuntimeError("bug")
    raise ConfigError(f"unknown command {request['cmd']!r}")


async def _ask(path: Path, raw: bytes) -> list[dict[str, Any]]:
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(raw)
    buf = b""
    with trio.fail_after(5):
        while buf.count(b"\n") < raw.count(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    await stream.aclose()
    return [json.loads(line) for line in buf.splitlines()]


async def test_answers_and_errors(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    server = ipc.IpcServer(path, handler)
    await nursery.start(server.serve)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    answers = await _ask(path, b'{"cmd":"status"}\nnot json\n[1]\n{"cmd":"nope"}\n{"cmd":"boom"}\n')
    assert answers[0] == {"ok": True, "status": "Running"}
    assert answers[1]["ok"] is False and "JSON" in answers[1]["error"]
    assert answers[2]["ok"] is False
    assert "unknown command" in answers[3]["error"]
    assert answers[4] == {"ok": False, "error": "internal error: RuntimeError"}
    # a flood without newlines is cut off; others are still served
    flood = await trio.open_unix_socket(str(path))
    await flood.send_all(b"x" * (ipc.MAX_LINE + 10))
    assert b"too long" in await flood.receive_some(1000)
    assert (await trio.to_thread.run_sync(ipc.request, path, {"cmd": "status"}))["status"] == "Running"
    counters = server.statistics()  # what status --json shows under attached.ipc
    assert counters["bad_json"] == 1 and counters["bad_request"] == 1 and counters["too_long"] == 1
    assert counters["internal_error"] == 1 and counters["refused"] == 1
    assert counters["requests"] == 6 and counters["connections"] == 3


async def test_stale_socket_replaced_live_one_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a crash left the file behind
    await nursery.start(partial(ipc.serve_ipc, path, handler))
    with pytest.raises(ConfigError, match="another trionet daemon"):
        await ipc.open_ipc_listener(path)


async def test_not_a_socket_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await ipc.open_ipc_listener(path)
    assert path.read_text() == "precious"


def test_client_says_when_no_daemon(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="not running"):
        ipc.request(tmp_path / "none.sock", {"cmd": "status"})


async def test_after_reply_runs_once_the_answer_is_sent(nursery: trio.Nursery, tmp_path: Path) -> None:
    """`down` stops the daemon in `then`: the client must have its answer first."""
    path = tmp_path / "a.sock"
    calls: list[str] = []

    async def stopping(request: dict[str, Any]) -> dict[str, Any] | ipc.AfterReply:
        calls.append("handler")
        return ipc.AfterReply({"stopped": True}, lambda: calls.append("then"))

    await nursery.start(partial(ipc.serve_ipc, path, stopping))
    answer = await trio.to_thread.run_sync(ipc.request, path, {"cmd": "down"})
    assert answer == {"ok": True, "stopped": True}
    await trio.testing.wait_all_tasks_blocked()
    assert calls == ["handler", "then"]
    # a client that hangs up before the answer still gets `then` run: the daemon stops anyway
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(b'{"cmd": "down"}\n')
    await stream.aclose()
    with trio.fail_after(5):
        while calls.count("then") < 2:
            await trio.sleep(0.01)


def test_client_rejects_an_answer_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    import threading

    def answer_garbage() -> None:
        conn, _ = server.accept()
        conn.recv(1000)
        conn.sendall(b"\xff garbage\n")
        conn.close()

    t = threading.Thread(target=answer_garbage)
    t.start()
    with pytest.raises(TransportError, match="not JSON"):
        ipc.request(path, {"cmd": "status"})
    t.join()
    server.close()
