"""Loss recovery in simulated time: two StackCores over a lossy link (simnet), and
the receive side's duplicate ACKs and SACK blocks against the scripted peer.

The sender keeps its SACK scoreboard across an RTO (RFC 6675 5.1), recovers with
SACK and PRR, detects lost retransmissions, probes a lost tail (RFC 8985 TLP), and
takes an RTT sample from the echoed timestamp of every ACK, so the RTO comes back
down after a backoff as soon as the path does.
"""

from __future__ import annotations

import struct

from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.tcp import ACK, SYN

from .fakepeer import Harness, Seg, make_segment
from .simnet import Link, SimNet, Transfer

MSS = 1228  # 1280 - 40 - 12 (timestamps)


def _data(link: Link) -> list[tuple[float, Seg]]:
    return [(t, s) for t, s in link.sent if s.payload]


def test_2mib_at_5_percent_loss_each_way() -> None:
    net = SimNet(Link(loss=0.05, seed=3), Link(loss=0.05, seed=103))
    t = Transfer(net, 2 << 20)
    done = t.run(limit=60)
    # 20 ms RTT, 5 MB/s bottleneck: about 0.4 MB/s, with no timeout-sized stall
    assert done < 7.0
    assert t.max_stall() < 0.15, t.progress
    assert t.client.stats["rto_timeouts"] <= 1
    assert t.client.stats["fast_retransmits"] > 20  # the loss was real


def _offset(iss: list[int], seg: Seg) -> int:
    """``seg``'s offset in the byte stream (``iss`` learns it from the SYN)."""
    if seg.flags & SYN:
        iss[:] = [seg.seq]
    return (seg.seq - iss[0] - 1) & 0xFFFFFFFF


def test_lost_tail_is_recovered_by_a_probe_before_the_rto() -> None:
    size = 30 * MSS
    tail = {size - MSS, size - 2 * MSS}
    seen: set[int] = set()
    iss: list[int] = []

    def drop_tail_once(seg: Seg, now: float) -> bool:
        off = _offset(iss, seg)
        if seg.payload and off in tail and off not in seen:
            seen.add(off)
            return True
        return False

    net = SimNet(Link(drop=drop_tail_once), Link())
    t = Transfer(net, size)
    done = t.run(limit=10)
    assert seen == tail
    # RTT 20 ms: the data is all out by ~0.065 s, the probe goes 2 RTTs later and its
    # SACK marks the other lost segment at once; the RTO (200 ms after the last ACK)
    # never fires
    assert done < 0.22, done
    st = t.client.stats
    assert st.get("tlp_probes") == 1 and st["rto_timeouts"] == 0, st


def test_scoreboard_survives_an_rto() -> None:
    size = 10 * MSS  # one initial window: nothing new goes out after the holes
    holes = (3 * MSS, 6 * MSS)
    drops: list[int] = []
    iss: list[int] = []

    def drop_holes_twice(seg: Seg, now: float) -> bool:
        off = _offset(iss, seg)
        if seg.payload and off in holes and drops.count(off) < 2:
            drops.append(off)
            return True
        return False

    net = SimNet(Link(drop=drop_holes_twice), Link())
    t = Transfer(net, size)
    t.run(limit=10)
    st = t.client.stats
    # the fast retransmission was lost too, and nothing was sent after it that
    # could show that: the RTO fires
    assert len(drops) == 4 and st["rto_timeouts"] == 1, st
    # ... and resends the holes only: the segments the peer SACKed (7, 8, 9 above
    # the second hole) are not sent again, though the window allows it
    sent = [_offset(iss, s) for _, s in _data(net.ab)]
    resent = sorted(off for off in set(sent) if sent.count(off) > 1)
    assert resent == list(holes), resent
    assert st["retransmits"] == 4, st


def test_rto_comes_back_down_at_the_first_ack_after_an_outage() -> None:
    outage = (0.3, 2.3)

    def down(seg: Seg, now: float) -> bool:
        return outage[0] <= now < outage[1]

    net = SimNet(Link(drop=down), Link(drop=down))
    t = Transfer(net, 8 << 20)
    c = t.client
    while net.now < outage[1]:
        t._app()
        net.step(outage[1])
    backed_off = c.rto
    assert backed_off >= 0.8 and c.stats["rto_timeouts"] >= 3
    una = c.snd_una
    while c.snd_una == una:
        t._app()
        assert net.step(10.0)
    back = net.now
    while net.now < back + 0.05:  # the ACKs of the retransmissions after the first
        t._app()
        assert net.step(10.0)
    # they echo timestamps sent after the timeout: valid RTT samples even for
    # retransmitted data (RFC 7323), so the next timeout is not a backed-off one
    assert c.rto < 0.3, (backed_off, c.rto)
    t.run(limit=30)


def test_repeated_outages_stall_only_as_long_as_they_last() -> None:
    outages = [(0.5 + 3 * i, 1.5 + 3 * i) for i in range(4)]

    def down(seg: Seg, now: float) -> bool:
        return any(a <= now < b for a, b in outages)

    net = SimNet(Link(drop=down, loss=0.01, seed=5), Link(drop=down, loss=0.01, seed=6))
    t = Transfer(net, 12 << 20)
    t.run(limit=120)
    # each outage is 1 s; with RTO backoff 0.2+0.4 (+0.8) the first retransmission
    # after the path is back comes at most ~0.8 s late
    assert t.max_stall() < 2.0, t.max_stall()


# ------------------------------------------------------------- receive side


def _ts(val: int, ecr: int = 0) -> bytes:
    return b"\x01\x01\x08\x0a" + struct.pack("!II", val, ecr)


def test_every_out_of_order_segment_is_acked_at_once_newest_block_first() -> None:
    h = Harness()
    h.stack.tcp_listen(80)
    h.send(0.0, 4000, 80, 100, 0, SYN,
           options=wtcp.build_options(mss=1000, sack_perm=True, ts=(10, 0)))
    (sa,) = h.take()
    seq = sa.seq + 1
    h.send(0.0, 4000, 80, 101, seq, ACK, options=_ts(11, 1))
    p = 101
    # one batch: segments 1, 3, 5, 7 of 0..7 (100 bytes each); 0, 2, 4, 6 lost
    order = [1, 5, 3, 7]
    h.stack.deliver_many([make_segment(4000, 80, p + 100 * i, seq, ACK, 65535, b"x" * 100,
                                       options=_ts(12 + i, 1)) for i in order], 0.01)
    acks = h.take()
    assert len(acks) == 4  # one duplicate ACK per segment, not one per batch
    assert all(a.ack == p for a in acks)
    for a, i in zip(acks, order, strict=True):
        assert a.opts.sack[0] == (p + 100 * i, p + 100 * i + 100)
    # with timestamps, three blocks: the newest arrivals, newest first (RFC 2018)
    assert acks[-1].opts.sack == tuple((p + 100 * i, p + 100 * i + 100) for i in (7, 3, 5))
    # filling a hole is ACKed at once too, and the blocks above it remain
    h.send(0.02, 4000, 80, p, seq, ACK, payload=b"y" * 100, options=_ts(20, 1))
    (a,) = h.take()
    assert a.ack == p + 200 and a.opts.sack[0] == (p + 700, p + 800)
