"""Tail loss probe: only the probe's own answer marks every hole below it lost."""

from __future__ import annotations

from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.tcp import ACK

from .fakepeer import Harness
from .test_tcp_sack import sack_sender


def _sack(*blocks: tuple[int, int]) -> bytes:
    return wtcp.build_options(sack=blocks)


def _sending(peer_window: int) -> tuple[Harness, int, int, int]:
    """A connection with SACK, 1,000-byte segments and room in cwnd for ten."""
    h = Harness()
    port, seq, pseq = h.connect(mss=1000, peer_window=peer_window)
    h.conn.sack_ok = True
    h.conn.cc.cwnd = 10 * 1000
    return h, port, seq, pseq


def test_a_late_ack_during_a_probe_is_not_its_answer() -> None:
    h, port, seq, pseq = _sending(peer_window=65535)
    conn = h.conn
    conn.send(b"x" * 8000, 0.0)
    assert len(h.take()) == 8
    assert conn.recovery.tlp_at is not None
    t = conn.recovery.tlp_at
    h.stack.on_timer(t)
    (probe,) = h.take()
    assert probe.seq - seq == 7000 and conn.stats["tlp_probes"] == 1
    retransmits = conn.stats["retransmits"]  # the probe is one
    # a duplicate ACK delayed by a stall: segment 3 arrived, nothing about the probe
    h.send(t + 0.001, 80, port, pseq, seq, ACK, options=_sack((seq + 3000, seq + 4000)))
    assert h.take() == [], "a late ACK must not mark every hole lost"
    assert conn.stats["retransmits"] == retransmits
    # the probe's answer: it SACKs the probe, so the holes below are lost after all
    h.send(t + 0.002, 80, port, pseq, seq, ACK,
           options=_sack((seq + 7000, seq + 8000), (seq + 3000, seq + 4000)))
    resent = [s.seq - seq for s in h.take()]
    assert resent and resent[0] == 0, resent
    assert conn.in_recovery


def test_timestamp_rtt_samples_after_24_days_and_around_an_rto() -> None:
    h = Harness()
    h.connect()
    conn = h.conn
    now = 25 * 86400.0  # past 2**31 ms of our TSval clock
    conn.srtt = None
    conn._ts_rtt_sample((conn._ts_now(now) - 20) & 0xFFFFFFFF, now)
    assert conn.srtt is not None and abs(conn.srtt - 0.020) < 1e-9
    # after a timeout, an echo of a segment sent before it is no sample (Karn) ...
    conn._ts_floor = conn._ts_now(now) & 0xFFFFFFFF
    conn.srtt = None
    conn._ts_rtt_sample((conn._ts_now(now) - 500) & 0xFFFFFFFF, now)
    assert conn.srtt is None
    # ... and the first echo from after it is, and ends the Karn window
    later = now + 0.03
    conn._ts_rtt_sample((conn._ts_now(later) - 30) & 0xFFFFFFFF, later)
    assert conn.srtt is not None and abs(conn.srtt - 0.030) < 1e-9
    assert conn._ts_floor is None


def test_in_recovery_an_ack_that_delivers_nothing_sends_nothing() -> None:
    h, port, seq, pseq = sack_sender()
    conn = h.conn
    assert len(h.take()) == 4
    blocks = [((seq + 1000, seq + 2000),), ((seq + 3000, seq + 4000), (seq + 1000, seq + 2000)),
              ((seq + 3000, seq + 5000), (seq + 1000, seq + 2000))]
    for sack in blocks:  # segments 0 and 2 lost: as in test_tcp_sack, recovery starts
        h.send(0.01, 80, port, pseq, seq, ACK, options=_sack(*sack))
    assert conn.in_recovery
    h.take()
    conn.cc.ssthresh = 20 * 1000  # pipe below ssthresh: PRR's slow-start bound applies
    # the same ACK again but with a new window: a window update, no data delivered
    h.send(0.012, 80, port, pseq, seq, ACK, window=60000, options=_sack(*blocks[-1]))
    assert h.take() == []


def test_the_probe_for_a_lost_tail_carries_the_fin_it_went_out_with() -> None:
    from trionet.netstack.wire.tcp import FIN

    h, port, seq, pseq = _sending(peer_window=65535)
    conn = h.conn
    conn.send(b"x" * 3000, 0.0)
    conn.close(0.0)
    sent = h.take()
    assert [(s.seq - seq, bool(s.flags & FIN)) for s in sent][-1] in ((2000, True), (3000, True))
    # the first two arrive; the last segment and the FIN are lost
    h.send(0.02, 80, port, pseq, seq + 2000, ACK)
    h.take()
    t = conn.recovery.tlp_at
    assert t is not None
    h.stack.on_timer(t)
    (probe,) = h.take()
    assert probe.seq - seq == 2000 and len(probe.payload) == 1000 and probe.flags & FIN
    # its answer acknowledges everything, the FIN included: nothing is left to time out
    h.send(t + 0.02, 80, port, pseq, seq + 3001, ACK)
    assert conn.snd_una == conn.snd_max and conn.rto_at is None


def test_the_probe_resends_the_last_segment_sent_when_the_window_holds_back_the_rest() -> None:
    h, port, seq, pseq = _sending(peer_window=4000)
    conn = h.conn
    conn.send(b"x" * 20000, 0.0)  # 4 segments fit the peer's window; 16,000 bytes wait
    assert [s.seq - seq for s in h.take()] == [0, 1000, 2000, 3000]
    h.send(0.02, 80, port, pseq, seq + 1000, ACK, window=3000)  # the window stays full
    h.take()
    assert conn.recovery.tlp_at is not None
    rto = conn.rto_at
    h.stack.on_timer(conn.recovery.tlp_at)
    (probe,) = h.take()
    assert probe.seq - seq == 3000 and len(probe.payload) == 1000
    assert conn.stats["tlp_probes"] == 1 and conn.rto_at != rto
