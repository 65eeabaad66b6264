"""No packet can kill a task: a bug of ours met while handling one packet (or one
connection's timer or output) is caught at that boundary, counted as
``internal_error.<kind>``, logged with its traceback once per kind, and the rest
of the batch, and every other connection, carry on."""

from __future__ import annotations

import logging

import pytest
import trio

from trionet.netstack import NetStack
from trionet.netstack.stack import StackCore
from trionet.netstack.tcp import State, TcpConnection
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import udp as wudp
from trionet.netstack.wire.tcp import ACK, FIN, SYN

from .fakepeer import PEER, US, make_segment


def _world() -> tuple[StackCore, list[bytes], list[tuple[TcpConnection, int, int]]]:
    """A stack with two accepted connections (ports 4000 and 4001 of the peer) and UDP
    port 53: (stack, its output, [(connection, peer's next seq, our next seq)])."""
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=9)
    lst = stack.tcp_listen(80)
    stack.udp_bind(53)
    conns = []
    for port in (4000, 4001):
        stack.deliver(make_segment(port, 80, 100, 0, SYN, 65535), 0.0)
        ours = int.from_bytes(out.pop()[24:28], "big") + 1
        stack.deliver(make_segment(port, 80, 101, ours, ACK, 65535), 0.0)
        conns.append((lst.accept_queue.popleft(), 101, ours))
    out.clear()
    return stack, out, conns


def _udp(payload: bytes) -> bytes:
    dg = wudp.build(5353, 53, payload, wip4.pseudo_sum(PEER.packed, US.packed, 17, 0))
    return wip4.build_header(PEER.packed, US.packed, 17, len(dg)) + dg


def _boom(*args: object) -> None:
    raise ZeroDivisionError("a bug")


def test_a_bug_in_one_segment_ends_its_connection_not_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    stack, _out, [(a, a_peer, a_ours), (b, b_peer, b_ours)] = _world()
    a.on_segment = _boom  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="trionet.netstack.stack")
    batch = [make_segment(4000, 80, a_peer, a_ours, ACK | FIN, 65535),  # A: the slow path, which raises
             make_segment(4001, 80, b_peer, b_ours, ACK, 65535, b"for B"),
             _udp(b"dns")]
    stack.deliver_many(batch, 1.0)  # does not raise
    stats = stack.statistics()
    assert stats["internal_error.tcp_segment"] == 1
    assert a.state is State.CLOSED and a.error == "internal error" and a.key not in stack.conns
    assert stats["tcp_peers"] == 1 and stats["tcp_connections"] == 1
    assert bytes(b.rbuf) == b"for B" and stack.udp[53].queue[0][0] == b"dns"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # the traceback, once
    # the same kind again: counted, no second traceback
    b.on_segment = _boom  # type: ignore[method-assign]
    stack.deliver(make_segment(4001, 80, b_peer + 5, b_ours, ACK | FIN, 65535), 1.1)
    assert stack.statistics()["internal_error.tcp_segment"] == 2
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert not stack.conns


def test_a_raising_admit_drops_that_packet_only() -> None:
    stack, _out, [(a, a_peer, a_ours), _] = _world()
    bad = _udp(b"bad")

    def admit(packet: bytes | bytearray | memoryview) -> bool:
        if bytes(packet) == bad:
            raise RuntimeError("filter bug")
        return True

    stack.deliver_many([_udp(b"one"), bad, _udp(b"two"),
                        make_segment(4000, 80, a_peer, a_ours, ACK | FIN, 65535)], 1.0, admit)
    assert stack.statistics()["internal_error.packet"] == 1
    assert [d for d, _ in stack.udp[53].queue] == [b"one", b"two"]
    assert a.state is State.CLOSE_WAIT  # the packet after it went in too


def test_a_bug_in_one_timer_or_output_ends_that_connection_only() -> None:
    stack, out, [(a, a_peer, a_ours), (b, b_peer, b_ours)] = _world()
    stack.deliver_many([make_segment(4000, 80, a_peer, a_ours, ACK, 65535, b"x"),
                        make_segment(4001, 80, b_peer, b_ours, ACK, 65535, b"y")], 1.0)
    out.clear()  # both now owe a delayed ACK
    a.on_timer = _boom  # type: ignore[method-assign]
    stack.on_timer(2.0)
    assert stack.statistics()["internal_error.tcp_timer"] == 1
    assert a.state is State.CLOSED and a.key not in stack.conns
    assert len(out) == 2  # A's RST as it was aborted, B's delayed ACK
    b.output = _boom  # type: ignore[method-assign]
    stack.deliver(make_segment(4001, 80, b_peer + 1, b_ours, ACK, 65535, b"z"), 3.0)
    assert stack.statistics()["internal_error.tcp_output"] == 1
    assert b.state is State.CLOSED and not stack.conns


async def test_the_driver_never_raises_for_a_packet() -> None:
    stack = NetStack([US], lambda p: None)
    lst = stack.listen_tcp(80)

    def admit(packet: bytes | bytearray | memoryview) -> bool:
        raise RuntimeError("filter bug")

    stack.deliver_many([make_segment(4000, 80, 100, 0, SYN, 65535)] * 3, admit)
    stack.deliver(b"\x45" + b"\xff" * 100)
    assert stack.statistics()["internal_error.packet"] == 3
    assert stack.statistics()["drop_ipv4_bad_total_len"] == 1
    assert lst.accept_nowait() is None
    await trio.lowlevel.checkpoint()
