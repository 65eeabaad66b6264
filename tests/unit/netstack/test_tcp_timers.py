"""TCP behaviour in simulated time: every ``now`` is explicit."""

from __future__ import annotations

import pytest

from trionet.netstack.tcp import TRANSITIONS, State, TcpConfig
from trionet.netstack.wire.tcp import ACK, FIN, PSH, RST, SYN

from .fakepeer import Harness


def test_rto_backoff_and_karn() -> None:
    h = Harness(TcpConfig(initial_rto=1.0, min_rto=0.2, max_retries=5))
    port, seq, pseq = h.connect()
    conn = h.conn
    rto0 = conn.rto  # after the SYN RTT sample (0 s) -> min_rto
    assert rto0 == pytest.approx(0.2)
    conn.send(b"x" * 100, 0.0)
    h.stack.on_timer(0.0)
    (seg,) = h.take()
    assert seg.payload == b"x" * 100 and seg.seq == seq
    times = []
    now = 0.0
    for _ in range(5):
        deadline = h.stack.next_deadline()
        assert deadline is not None
        now = deadline
        h.stack.on_timer(now)
        (rx,) = h.take()
        assert rx.seq == seq and rx.payload == b"x" * 100
        times.append(now)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert gaps == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2])
    # Karn: the ACK of a retransmitted segment gives no RTT sample
    h.send(now + 0.01, 80, port, pseq, seq + 100, ACK)
    assert conn.srtt == pytest.approx(0.0)
    assert conn.rto == pytest.approx(6.4)
    # a fresh segment is timed again and resets the backoff
    conn.send(b"y" * 10, now + 1)
    h.take()
    h.send(now + 1.05, 80, port, pseq, seq + 110, ACK)
    assert conn.srtt is not None and conn.srtt > 0
    assert conn.rto < 1.0


def test_rto_gives_up_after_max_retries() -> None:
    h = Harness(TcpConfig(max_retries=3))
    h.connect()
    h.conn.send(b"z", 0.0)
    now = 0.0
    for _ in range(10):
        d = h.stack.next_deadline()
        if d is None:
            break
        now = d
        h.stack.on_timer(now)
    assert h.conn.state is State.CLOSED
    assert h.conn.error == "connection timed out"
    assert h.take()[-1].flags & RST


def test_fast_retransmit_after_three_dupacks() -> None:
    h = Harness()
    port, seq, pseq = h.connect(mss=1000)
    conn = h.conn
    conn.send(b"a" * 5000, 0.0)
    segs = h.take()
    assert [s.seq - seq for s in segs] == [0, 1000, 2000, 3000, 4000]
    # the first segment is lost: three duplicate ACKs for it
    for _ in range(2):
        h.send(0.01, 80, port, pseq, seq, ACK)
        assert h.take() == []
    h.send(0.01, 80, port, pseq, seq, ACK)
    (rx,) = h.take()
    assert rx.seq == seq and len(rx.payload) == 1000
    assert conn.in_recovery and conn.stats["fast_retransmits"] == 1
    # the retransmission fills the hole: full ACK ends recovery
    h.send(0.02, 80, port, pseq, seq + 5000, ACK)
    assert not conn.in_recovery


def test_zero_window_probe_then_resume() -> None:
    h = Harness()
    port, seq, pseq = h.connect(peer_window=2000, mss=1000)
    conn = h.conn
    conn.send(b"b" * 4000, 0.0)
    assert [len(s.payload) for s in h.take()] == [1000, 1000]
    h.send(0.01, 80, port, pseq, seq + 2000, ACK, window=0)  # window closes
    assert h.take() == []
    assert conn.persist_at is not None
    probes = []
    now = 0.01
    for _ in range(3):
        d = h.stack.next_deadline()
        assert d is not None
        now = d
        h.stack.on_timer(now)
        (p,) = h.take()
        assert p.seq == seq + 2000 - 1 and p.payload == b""  # old seq elicits an ACK
        probes.append(now)
    assert probes[2] - probes[1] == pytest.approx(2 * (probes[1] - probes[0]))
    h.send(now + 0.01, 80, port, pseq, seq + 2000, ACK, window=4000)  # window opens
    assert [len(s.payload) for s in h.take()] == [1000, 1000]


def test_delayed_ack_timer_and_every_second_segment() -> None:
    h = Harness(TcpConfig(delayed_ack=0.04))
    port, seq, pseq = h.connect()
    h.send(1.0, 80, port, pseq, seq, ACK | PSH, payload=b"q" * 100)
    assert h.take() == []
    assert h.stack.next_deadline() == pytest.approx(1.04)
    h.stack.on_timer(1.04)
    (a,) = h.take()
    assert a.ack == pseq + 100
    # two segments in one batch: one ACK at once
    from .fakepeer import make_segment
    h.stack.deliver_many([make_segment(80, port, pseq + 100, seq, ACK, 65535, b"r" * 100),
                          make_segment(80, port, pseq + 200, seq, ACK, 65535, b"s" * 100)],
                         2.0)
    (a,) = h.take()
    assert a.ack == pseq + 300


def test_time_wait_expiry() -> None:
    h = Harness(TcpConfig(msl=30.0))
    port, seq, pseq = h.connect()
    conn = h.conn
    conn.close(1.0)
    (fin,) = h.take()
    assert fin.flags & FIN and conn.state is State.FIN_WAIT_1
    h.send(1.1, 80, port, pseq, seq + 1, ACK)
    assert conn.state is State.FIN_WAIT_2
    h.send(1.2, 80, port, pseq, seq + 1, ACK | FIN)
    assert conn.state is State.TIME_WAIT
    assert h.take()[-1].ack == pseq + 1
    assert h.stack.next_deadline() == pytest.approx(61.2)
    h.stack.on_timer(61.0)
    assert conn.state is State.TIME_WAIT
    h.stack.on_timer(61.2)
    assert conn.state is State.CLOSED
    assert h.stack.conns == {}


def test_simultaneous_close() -> None:
    h = Harness()
    port, seq, pseq = h.connect()
    conn = h.conn
    conn.close(1.0)
    h.take()
    h.send(1.1, 80, port, pseq, seq, ACK | FIN)  # their FIN crosses ours
    assert conn.state is State.CLOSING
    h.send(1.2, 80, port, pseq + 1, seq + 1, ACK)
    assert conn.state is State.TIME_WAIT


def test_simultaneous_open() -> None:
    h = Harness()
    conn = h.stack.tcp_connect(__import__("ipaddress").ip_address("10.0.0.2"), 80, 0.0)
    (syn,) = h.take()
    h.send(0.1, 80, syn.sport, 9000, 0, SYN)  # a bare SYN crosses ours
    assert conn.state is State.SYN_RECEIVED
    (sa,) = h.take()
    assert sa.flags == SYN | ACK and sa.seq == syn.seq and sa.ack == 9001
    h.send(0.2, 80, syn.sport, 9001, syn.seq + 1, SYN | ACK)  # their SYN-ACK
    h.send(0.2, 80, syn.sport, 9001, syn.seq + 1, ACK)
    assert conn.state is State.ESTABLISHED


def test_keepalive_probes_then_abort() -> None:
    h = Harness(TcpConfig(keepalive_idle=10.0, keepalive_interval=2.0, keepalive_count=3))
    port, seq, pseq = h.connect(now=0.0)
    conn = h.conn
    assert h.stack.next_deadline() == pytest.approx(10.0)
    h.stack.on_timer(10.0)
    (p,) = h.take()
    assert p.seq == seq - 1 and p.payload == b""
    # an answer resets the idle time: the probe's timer finds it and waits the rest
    h.send(10.1, 80, port, pseq, seq, ACK)
    assert h.stack.next_deadline() == pytest.approx(12.0)
    h.stack.on_timer(12.0)
    assert h.take() == []
    assert h.stack.next_deadline() == pytest.approx(20.1)
    now = 20.1
    for _ in range(3):
        h.stack.on_timer(now)
        assert len(h.take()) == 1
        now += 2.0
    h.stack.on_timer(now)
    assert conn.state is State.CLOSED and conn.error == "keepalive timeout"


def test_rst_closes_with_error() -> None:
    h = Harness()
    port, _seq, pseq = h.connect()
    h.send(1.0, 80, port, pseq + 5, 0, RST)  # not exactly rcv_nxt: challenge ACK
    assert h.conn.state is State.ESTABLISHED
    assert h.take()[0].flags == ACK
    h.send(1.0, 80, port, pseq, 0, RST)
    assert h.conn.state is State.CLOSED
    assert h.conn.error == "connection reset by peer"


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State) - {State.LISTEN}
    for targets in TRANSITIONS.values():
        assert set(targets.values()) <= set(State)


def test_syn_options_negotiated() -> None:
    h = Harness()
    h.stack.tcp_listen(80)
    from trionet.netstack.wire import tcp as wtcp
    opts = wtcp.build_options(mss=1400, wscale=7, sack_perm=True, ts=(111, 0))
    h.send(0.0, 4444, 80, 100, 0, SYN, options=opts)
    (sa,) = h.take()
    assert sa.flags == SYN | ACK
    assert sa.opts.mss == 1240 and sa.opts.wscale is not None and sa.opts.wscale >= 6
    assert sa.opts.sack_perm and sa.opts.ts_ecr == 111
