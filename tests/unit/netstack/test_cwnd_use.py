"""The congestion window grows only while it limits the sender, and starts over
after an idle spell (RFC 7661's aim, RFC 5681 4.1)."""

from __future__ import annotations

from trionet.netstack.wire.tcp import ACK

from .fakepeer import Harness

MSS = 1000
IW = 10 * MSS


def _sender(peer_window: int = 65535) -> tuple[Harness, int, int, int]:
    h = Harness()
    port, seq, pseq = h.connect(mss=MSS, peer_window=peer_window)
    assert h.conn.cc.cwnd == IW
    return h, port, seq, pseq


def test_an_application_that_sends_little_does_not_grow_the_window() -> None:
    h, port, seq, pseq = _sender()
    conn = h.conn
    t, sent = 0.0, 0
    for _ in range(30):  # two segments per round trip, each round ACKed in full
        conn.send(b"r" * 2 * MSS, t)
        assert len(h.take()) == 2
        sent += 2 * MSS
        t += 0.01
        h.send(t, 80, port, pseq, seq + sent, ACK)
        h.take()
    assert conn.cc.cwnd == IW  # it grew by 60 segments before


def test_a_sender_the_window_holds_back_still_grows_it() -> None:
    h, port, seq, pseq = _sender()
    conn = h.conn
    conn.send(b"x" * 40 * MSS, 0.0)
    assert len(h.take()) == 10  # the initial window
    h.send(0.01, 80, port, pseq, seq + 10 * MSS, ACK)
    assert len(h.take()) == 20  # slow start: it doubled
    assert conn.cc.cwnd == 2 * IW


def test_a_smaller_peer_window_does_not_grow_it_in_congestion_avoidance() -> None:
    h, port, seq, pseq = _sender(peer_window=4 * MSS)
    conn = h.conn
    conn.cc.ssthresh = conn.cc.cwnd  # congestion avoidance from the start
    conn.send(b"x" * 200 * MSS, 0.0)
    t, acked = 0.0, 0
    for _ in range(50):
        acked += len(h.take()) * MSS
        t += 0.01
        h.send(t, 80, port, pseq, seq + acked, ACK, window=4 * MSS)
    assert acked >= 150 * MSS
    assert conn.cc.cwnd == IW  # the peer's 4 segments limited every round


def test_after_an_idle_spell_longer_than_the_rto_it_starts_from_the_initial_window() -> None:
    h, port, seq, pseq = _sender()
    conn = h.conn
    conn.send(b"x" * 30 * MSS, 0.0)
    h.take()
    h.send(0.01, 80, port, pseq, seq + 10 * MSS, ACK)
    h.take()
    h.send(0.02, 80, port, pseq, seq + 30 * MSS, ACK)
    h.take()
    assert conn.cc.cwnd > IW
    conn.send(b"y" * 40 * MSS, 0.02 + conn.rto / 2)  # a short pause: the window stands
    assert len(h.take()) > 10
    h.send(0.03 + conn.rto / 2, 80, port, pseq, seq + 70 * MSS, ACK)
    h.take()
    later = 0.03 + conn.rto / 2 + conn.rto + 0.01
    conn.send(b"z" * 40 * MSS, later)
    assert len(h.take()) == 10
    assert conn.cc.cwnd == IW
