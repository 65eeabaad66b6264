"""Instructions per TCP segment on the data path, counted by valgrind's cachegrind: a
figure that does not swing with a noisy neighbour, so a change's effect shows.

    python tests/bench/bench_instructions.py [--json FILE]

bench_datapath's two paths, 1 MiB per round, each in a child process under
cachegrind, once with 1 round and once with 3: the difference is what 2 rounds of
the path itself cost (start-up and set-up cancel out).

* receive: WireGuard datagrams in batches of 44 (one GRO read) through
  Node._on_wireguard, the netstack, its ACKs back out, and the application's read;
* send: a 1 MiB send on an open window through Node's bursts, WireGuard and
  magicsock's GSO writes to a UDP socket.

Needs valgrind (not part of `make bench`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ROUND_BYTES = 1 << 20
PREPARED = 3  # receive rounds built in every child, whatever it then processes


def _receive(rounds: int, state: Path) -> int:
    import trio

    import tests.bench.bench_datapath as bd
    from tests.unit.netstack.fakepeer import make_segment
    from trionet.netstack import NetStack
    from trionet.netstack.wire import tcp as wtcp

    data = bd.DATA[:ROUND_BYTES]

    async def main() -> int:
        node, peer, _sink = bd.pipeline_node(state)
        path = ("udp", ("127.0.0.1", 9))
        prepared = []
        for _ in range(PREPARED):
            stack = NetStack([bd.A_IP], output=node._on_ip_out, output_done=node._flush_outbound,
                             verify_checksums=False)
            node.stack = stack
            conn = stack.core.tcp_connect(ipaddress.ip_address(bd.B_IP), 80, trio.current_time())
            stack.after_core_call(conn)
            port = conn.key[3]
            syn_ack = make_segment(80, port, 7000, conn.iss + 1, wtcp.SYN | wtcp.ACK, 65535,
                                   options=wtcp.build_options(mss=bd.MSS, wscale=7, sack_perm=True, ts=(1, 0)))
            node._on_wireguard([t.data for t in peer.send_ip_many([syn_ack], trio.current_time(), bd.WALL)], None, path)
            node._flush_inbound()
            payload = bd.MSS - 12
            ts = b"\x01\x01\x08\x0a" + struct.pack("!II", 2, 1)
            packets = [make_segment(80, port, 7001 + off, conn.iss + 1, wtcp.ACK, 65535,
                                    data[off:off + payload], options=ts)
                       for off in range(0, len(data) - payload, payload)]
            datagrams = [t.data for t in peer.send_ip_many(packets, trio.current_time(), bd.WALL)]
            # as the GRO reader hands them over: views into one buffer per batch
            batches = []
            for i in range(0, len(datagrams), bd.GRO_BATCH):
                chunk = datagrams[i:i + bd.GRO_BATCH]
                view, offsets, at = memoryview(b"".join(chunk)), [], 0
                for d in chunk:
                    offsets.append((at, at + len(d)))
                    at += len(d)
                batches.append([view[a:b] for a, b in offsets])
            prepared.append((stack, conn, batches, len(packets)))
        for stack, conn, batches, _count in prepared[:rounds]:
            node.stack = stack
            for batch in batches:
                node._on_wireguard(batch, None, path)
                node._flush_inbound()
                conn.read(1 << 22, trio.current_time())
                stack.after_core_call(conn)
        return int(prepared[0][3])

    return trio.run(main)


def _send(rounds: int, state: Path) -> int:
    import trio

    import tests.bench.bench_datapath as bd

    bd.DATA = bd.DATA[:ROUND_BYTES]

    async def main() -> int:  # in a Trio run: the node reads Trio's clock
        node, _peer, _sink = bd.pipeline_node(state)
        segments = 0
        for _ in range(rounds):
            _cpu, segments = bd.send_round(node)
        return segments

    return trio.run(main)


def _count(path: str, rounds: int) -> tuple[int, int]:
    """(instructions, segments per round) of one child run under cachegrind."""
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, __file__, "--child", path, "--rounds", str(rounds)],
        capture_output=True, text=True, check=True)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    segs = re.search(r"segments (\d+)", out.stdout)
    if refs is None or segs is None:
        raise RuntimeError(f"no count from cachegrind:\n{out.stdout}\n{out.stderr[-2000:]}")
    return int(refs.group(1).replace(",", "")), int(segs.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["receive", "send"], help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            run = _receive if args.child == "receive" else _send
            print(f"segments {run(args.rounds, Path(tmp))}")
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench_instructions: valgrind is not installed")
    result: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = {(p, r): pool.submit(_count, p, r) for p in ("receive", "send") for r in (1, 3)}
        for path in ("receive", "send"):
            (one, segments), (three, _) = jobs[path, 1].result(), jobs[path, 3].result()
            result[f"{path}_instructions_per_segment"] = (three - one) / 2 / segments
    print("instructions per TCP segment (cachegrind; 1 MiB rounds, 1228-1240-byte segments):")
    print(f"  receive (batches of 44 -> read)   {result['receive_instructions_per_segment']:9,.0f}")
    print(f"  send (netstack -> GSO writes)     {result['send_instructions_per_segment']:9,.0f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
