"""What a hostile peer costs one TCP connection: CPU per ACK after crafted SACK
blocks, memory after overlapping out-of-order segments; beside it, the in-order
receive path's CPU per segment (which these bounds must not slow down).

    python tests/bench/bench_tcp_bounds.py [--rounds R] [--json FILE]

* SACK: a connection with 1 MB in flight; the peer first sends N crafted SACK
  blocks (four to an ACK, each 1 to 50 bytes at random in the flight: every one a
  new hole), N = 0, 1,000 and 10,000; then 2,000 more such ACKs are timed. The cost
  per ACK must not grow with N (the scoreboard holds SACK_SCOREBOARD_MAX blocks).
  Each row checks that the connection counted exactly the blocks its name says.
* Out of order: 20,000 segments of 1 to 1,200 bytes at random places in the
  receive window, overlapping, byte 0 never sent; the memory the connection holds
  (tracemalloc) against the window.
* In order: 4 MiB of 1,228-byte segments in batches of 44 through deliver_many
  (the header-prediction fast path) and read.

Process CPU time, best of R rounds (a noisy neighbour hurts every row alike). No
root, no network.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.unit.netstack.fakepeer import PEER, Harness, make_segment
from trionet.netstack.tcp import TcpConfig, TcpConnection
from trionet.netstack.wire import tcp as wtcp
from trionet.netstack.wire.tcp import ACK, PSH, SYN

MASK = 0xFFFFFFFF
FLIGHT = 1_000_000
TIMED_ACKS = 2_000
TRACED_ACKS = 200


def _sender() -> tuple[Harness, TcpConnection]:
    h = Harness()
    conn = h.stack.tcp_connect(PEER, 80, 0.0)
    (syn,) = h.take()
    h.send(0.0, 80, syn.sport, 5000, syn.seq + 1, SYN | ACK,
           options=wtcp.build_options(mss=1200, wscale=7, sack_perm=True))
    h.take()
    conn.cc.cwnd = 1 << 30
    conn.send(b"s" * FLIGHT, 0.0)
    h.out.clear()
    return h, conn


def _crafted_acks(conn: TcpConnection, count: int, rng: random.Random) -> list[bytes]:
    """``count`` ACKs of SND.UNA, four new one-hole blocks each."""
    base = conn.snd_una
    out = []
    for _ in range(count):
        blocks = []
        for _ in range(4):
            left = base + rng.randrange(1, FLIGHT - 50)
            blocks.append((left & MASK, (left + rng.randrange(1, 50)) & MASK))
        out.append(make_segment(80, conn.key[3], 5001, base & MASK, ACK, 65535,
                                options=wtcp.build_options(sack=tuple(blocks))))
    return out


def _opcodes(fn: Callable[[], None]) -> int:
    """Python bytecodes ``fn`` runs (calls into C count as one): a cost no neighbour
    on the machine can disturb."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def sack_row(history: int, rounds: int) -> dict[str, Any]:
    best = float("inf")
    board = emitted = rtx_before = 0
    for r in range(rounds):
        rng = random.Random(r)
        h, conn = _sender()
        for ack in _crafted_acks(conn, history // 4, rng):
            h.stack.deliver(ack, 0.01)
            h.out.clear()
        timed = _crafted_acks(conn, TIMED_ACKS, rng)
        before = len(conn.recovery.scoreboard.blocks)
        rtx = len(conn.recovery.retransmitted.entries)
        out = h.out
        sent = 0
        c0 = time.process_time()
        for ack in timed:
            h.stack.deliver(ack, 0.02)
            sent += len(out)
            out.clear()
        cpu = time.process_time() - c0
        counted = conn.stats["sack_blocks_in"]
        if counted != history + 4 * TIMED_ACKS:
            raise AssertionError(f"SACK row {history}: the connection counted {counted} blocks, "
                                 f"not {history} + {4 * TIMED_ACKS}")
        if cpu < best:
            best, board, emitted, rtx_before = cpu, before, sent, rtx
    # the same again, counted in bytecodes over TRACED_ACKS
    rng = random.Random(99)
    h, conn = _sender()
    for ack in _crafted_acks(conn, history // 4, rng):
        h.stack.deliver(ack, 0.01)
        h.out.clear()
    traced = _crafted_acks(conn, TRACED_ACKS, rng)

    def run() -> None:
        for ack in traced:
            h.stack.deliver(ack, 0.02)
            h.out.clear()

    opcodes = _opcodes(run) / TRACED_ACKS
    return {"opcodes_per_ack": opcodes, "sack_blocks_before": history, "us_per_ack": best / TIMED_ACKS * 1e6,
            "scoreboard_blocks_before": board, "retransmissions_before": rtx_before,
            "segments_out_per_ack": emitted / TIMED_ACKS}


def ooo_row(window: int) -> dict[str, Any]:
    h = Harness(TcpConfig(recv_buffer=window))
    lst = h.stack.tcp_listen(80)
    h.send(0.0, 4000, 80, 100, 0, SYN, options=wtcp.build_options(mss=1200, wscale=0, sack_perm=True))
    (sa,) = h.take()
    h.send(0.0, 4000, 80, 101, sa.seq + 1, ACK)
    conn = lst.accept_queue.popleft()
    rng = random.Random(1)
    data = rng.randbytes(window + 1200)
    segments = []
    sent_bytes = 0
    for _ in range(20_000):
        off = rng.randrange(1, window)
        n = rng.randrange(1, 1201)
        segments.append(make_segment(4000, 80, (101 + off) & MASK, sa.seq + 1, ACK, 65535,
                                     data[off:off + n]))
        sent_bytes += n
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(0, len(segments), 64):
        h.stack.deliver_many(segments[i:i + 64], 0.1)
        h.out.clear()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"window": window, "segments": len(segments), "bytes_sent": sent_bytes,
            "ooo_bytes": conn.ooo_bytes, "pieces": len(conn.reassembly.pieces), "held_bytes": held,
            "held_per_window": held / window,
            "pruned_or_dropped": conn.stats.get("ooo_pruned", 0) + conn.stats.get("ooo_dropped", 0)}


def in_order_row(rounds: int) -> dict[str, Any]:
    seg = 1228
    count = (4 << 20) // seg
    payload = random.Random(2).randbytes(seg)
    best = float("inf")
    for _ in range(rounds):
        h = Harness()
        lst = h.stack.tcp_listen(80)
        h.send(0.0, 4000, 80, 100, 0, SYN, options=wtcp.build_options(mss=1240, wscale=7, sack_perm=True,
                                                                      ts=(1, 0)))
        (sa,) = h.take()
        h.send(0.0, 4000, 80, 101, sa.seq + 1, ACK, options=wtcp.build_options(ts=(2, 1)))
        conn = lst.accept_queue.popleft()
        ts = wtcp.build_options(ts=(3, 1))
        packets = [make_segment(4000, 80, (101 + i * seg) & MASK, sa.seq + 1, ACK | PSH, 65535, payload, ts)
                   for i in range(count)]
        c0 = time.process_time()
        for i in range(0, count, 44):
            h.stack.deliver_many(packets[i:i + 44], 0.1)
            h.out.clear()
            conn.read(1 << 22, 0.1)
        best = min(best, time.process_time() - c0)
        if h.stack.fast_segments < count * 0.9:
            raise AssertionError("the in-order run left the fast path")
    return {"segment_bytes": seg, "segments": count, "us_per_segment": best / count * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    sack = [sack_row(n, args.rounds) for n in (0, 1_000, 10_000)]
    ooo = [ooo_row(w) for w in (256 << 10, 4 << 20)]
    in_order = in_order_row(args.rounds)
    print(f"CPU per ACK carrying 4 new SACK blocks, 1 MB in flight (best of {args.rounds}):")
    print(f"  {'blocks before':>14} {'us/ACK':>8} {'bytecodes/ACK':>14} {'board before':>13} {'rtx before':>11} "
          f"{'segs out/ACK':>13}")
    for row in sack:
        print(f"  {row['sack_blocks_before']:>14,} {row['us_per_ack']:8.1f} {row['opcodes_per_ack']:14.0f} "
              f"{row['scoreboard_blocks_before']:>13} {row['retransmissions_before']:>11} "
              f"{row['segments_out_per_ack']:13.2f}")
    print("memory one connection holds after 20,000 overlapping out-of-order segments:")
    print(f"  {'window':>9} {'sent':>11} {'stored':>9} {'pieces':>7} {'held':>9} {'held/window':>12}")
    for row in ooo:
        print(f"  {row['window']:>9,} {row['bytes_sent']:>11,} {row['ooo_bytes']:>9,} {row['pieces']:>7} "
              f"{row['held_bytes']:>9,} {row['held_per_window']:12.2f}")
    print(f"in-order receive (fast path, batches of 44): {in_order['us_per_segment']:.2f} us per "
          f"{in_order['segment_bytes']}-byte segment")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sack": sack, "out_of_order": ooo, "in_order": in_order}, f, indent=2)


if __name__ == "__main__":
    main()
