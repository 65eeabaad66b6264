"""`ThreadedNode`: the node in a thread of its own, for programs that are not Trio.

Lifecycle and start errors run against a tarpit login server (the real Node);
connections run against `LinkedNode` (tests/unit/library/tailnet.py), a Node
whose tailnet is one in-memory peer.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.library.tailnet import BLACK_HOLE, ECHO, REFUSED, RESETS, LinkedNode, fds
from trionet import threaded
from trionet.config import NodeConfig
from trionet.errors import ConfigError, StartTimeout, TransportError
from trionet.threaded import ThreadedNode


def other_threads() -> set[threading.Thread]:
    """Every thread but this one and Trio's idle workers (a process-wide cache that
    outlives runs and ends on its own)."""
    return {t for t in threading.enumerate()
            if t is not threading.current_thread() and not t.name.startswith("Trio thread")}


def wait_until(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond(), what


def recv_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture
def tarpit() -> Iterator[str]:
    """A login server that takes TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def linked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ThreadedNode]:
    """A started ThreadedNode over the in-memory tailnet; stopped after the test."""
    monkeypatch.setattr(threaded, "Node", LinkedNode)
    node = ThreadedNode(login_server="https://control.invalid", state_dir=tmp_path)
    node.start()
    yield node
    node.stop()


# ------------------------------------------------------------------ lifecycle


def test_start_timeout_comes_out_of_start_as_start_timeout_and_leaves_nothing(tarpit: str, tmp_path: Path) -> None:
    threads, descriptors = other_threads(), fds()
    node = ThreadedNode(login_server=tarpit, auth_key="k", state_dir=tmp_path)
    with pytest.raises(StartTimeout, match=f"not connected after 1 s .*contacting {tarpit}"):
        node.start(timeout=1)
    assert other_threads() == threads
    assert fds() <= descriptors
    assert node.status()["status"] == "Stopped"
    assert not node.running
    with pytest.raises(TransportError, match=r"not running .*not connected after 1 s"):
        node.open_connection("peer", 80)


def test_with_block_raises_the_start_error(tarpit: str, tmp_path: Path) -> None:
    threads = other_threads()
    with pytest.raises(StartTimeout):
        with ThreadedNode(config=_config(tarpit, tmp_path, start_timeout=1)):
            pytest.fail("the body runs only once the node is Running")
    assert other_threads() == threads


def _config(login_server: str, state_dir: Path, start_timeout: float) -> NodeConfig:
    return NodeConfig(login_server=login_server, state_dir=state_dir, auth_key="k", start_timeout=start_timeout)


def test_bad_arguments_raise_config_error_in_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ThreadedNode(state_dir=tmp_path)
    with pytest.raises(ConfigError):
        ThreadedNode(login_server="ftp://control.example", state_dir=tmp_path)


def test_calls_before_start_raise_transport_error(tmp_path: Path) -> None:
    node = ThreadedNode(login_server="https://control.invalid", state_dir=tmp_path)
    with pytest.raises(TransportError, match="not running"):
        node.forward("peer", 80)
    with pytest.raises(TransportError, match="not running"):
        node.open_connection("peer", 80)
    assert node.status()["status"] == "Starting"
    assert node.peers() == []
    node.stop()  # never started: nothing to do


def test_stop_is_idempotent_and_a_stopped_node_does_not_start_again(linked: ThreadedNode) -> None:
    assert linked.running
    linked.start()  # already running: returns
    linked.stop()
    linked.stop()
    assert not linked.running
    assert linked.status()["status"] == "Stopped"
    with pytest.raises(RuntimeError, match="stopped"):
        linked.start()
    with pytest.raises(TransportError, match="not running"):
        linked.forward("peer", ECHO)


def test_stop_closes_what_it_relays_and_leaks_no_thread_or_descriptor(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(threaded, "Node", LinkedNode)
    threads, descriptors = other_threads(), fds()
    with ThreadedNode(login_server="https://control.invalid", state_dir=tmp_path) as node:
        assert len(other_threads() - threads) == 1  # the node's own thread
        direct = node.open_connection("peer", ECHO)
        forwarded = socket.create_connection(node.forward("peer", ECHO))
        for sock in (direct, forwarded):
            sock.sendall(b"x")
            assert sock.recv(10) == b"X"
    for sock in (direct, forwarded):
        assert recv_all(sock) == b""  # closed by the node's shutdown
        sock.close()
    assert other_threads() == threads
    assert fds() <= descriptors


def test_stop_ends_a_pending_call_with_transport_error(linked: ThreadedNode) -> None:
    errors: list[BaseException] = []

    def dial() -> None:
        try:
            linked.open_connection(BLACK_HOLE, 80, timeout=None)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=dial)
    caller.start()
    wait_until(lambda: linked.status()["stats"]["netstack"]["tcp_connections"] == 1, "the SYN is out")
    linked.stop()
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TransportError), errors
    assert "stopped during the call" in str(errors[0])


# --------------------------------------------------------------- connections


def test_open_connection_relays_both_ways_and_passes_half_close(linked: ThreadedNode) -> None:
    with linked.open_connection("peer", ECHO) as sock:
        assert sock.gettimeout() is None  # an ordinary blocking socket
        sock.sendall(b"hello ")
        sock.sendall(b"world")
        sock.shutdown(socket.SHUT_WR)  # the peer answers everything, then half-closes too
        assert recv_all(sock) == b"HELLO WORLD"
    wait_until(lambda: linked.status()["stats"]["attached"]["open_connection"]["completed"] == 1, "completed")
    stats = linked.status()["stats"]["attached"]["open_connection"]
    assert stats == {"opened": 1, "completed": 1, "live": 0, "failed": {}}


def test_open_connection_refused_raises_transport_error_and_opens_no_socket(linked: ThreadedNode) -> None:
    descriptors = fds()
    with pytest.raises(TransportError, match="refused"):
        linked.open_connection("peer", REFUSED)
    assert fds() == descriptors
    assert linked.status()["stats"]["attached"]["open_connection"]["opened"] == 0


def test_open_connection_to_an_unknown_name_raises_config_error(linked: ThreadedNode) -> None:
    with pytest.raises(ConfigError, match="unknown peer 'nosuch'"):
        linked.open_connection("nosuch", ECHO)


def test_open_connection_that_gets_no_answer_times_out_with_transport_error(linked: ThreadedNode) -> None:
    with pytest.raises(TransportError, match=r"no answer within 0\.5 s"):
        linked.open_connection(BLACK_HOLE, 80, timeout=0.5)
    wait_until(lambda: linked.status()["stats"]["netstack"]["tcp_connections"] == 0, "the SYN_SENT was aborted")


def test_peer_reset_reaches_the_socket_as_connection_reset(linked: ThreadedNode) -> None:
    with linked.open_connection("peer", RESETS) as sock:
        sock.sendall(b"anything")
        with pytest.raises(ConnectionResetError):
            recv_all(sock)
    wait_until(lambda: linked.status()["stats"]["attached"]["open_connection"]["failed"] == {"target_reset": 1},
               "counted as the peer's reset")


def test_forward_gives_an_address_for_any_library(linked: ThreadedNode) -> None:
    host, port = linked.forward("peer", ECHO)
    assert host == "127.0.0.1"
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"via forward")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"VIA FORWARD"
    attached = linked.status()["stats"]["attached"]
    assert f"forward 127.0.0.1:{port}->peer:{ECHO}" in attached


def test_status_and_peers_answer_from_any_thread(linked: ThreadedNode) -> None:
    answers: list[str] = []
    workers = [threading.Thread(target=lambda: answers.append(linked.status()["status"])) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert answers == ["Running"] * 4
    assert linked.peers() == []  # the linked tailnet has no netmap


def test_an_asyncio_program_uses_it_through_to_thread_and_its_own_streams(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(threaded, "Node", LinkedNode)
    threads = other_threads()

    async def main() -> list[bytes]:
        node = ThreadedNode(login_server="https://control.invalid", state_dir=tmp_path)
        await asyncio.to_thread(node.start)
        try:
            reader, writer = await asyncio.open_connection(*node.forward("peer", ECHO))
            writer.write(b"forwarded")
            writer.write_eof()
            first = await reader.read()
            writer.close()
            await writer.wait_closed()
            sock = await asyncio.to_thread(node.open_connection, "peer", ECHO)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"direct")
            writer.write_eof()
            second = await reader.read()
            writer.close()
            await writer.wait_closed()
            return [first, second]
        finally:
            await asyncio.to_thread(node.stop)

    assert asyncio.run(main()) == [b"FORWARDED", b"DIRECT"]
    assert other_threads() == threads

