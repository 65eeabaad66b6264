"""CPU per TCP segment on the send path, in one process, against its floor.

    python tests/bench/bench_sendpath.py [--rounds R] [--json FILE]

"pipeline": a 4 MiB send on an established netstack connection (window open),
through Node's outbound bursts, WgDevice.send_ip_many and magicsock's corked GSO
writes, to a UDP socket drained by a thread. "floor": the two per-segment costs
no Python code avoids: the TCP checksum sum over the payload and one
ChaCha20-Poly1305 encryption. The ratio is what framing and bookkeeping cost on top.
Best of R rounds each (process CPU time), so a noisy neighbour hurts both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tests.unit.magicsock.fakes import FixedPath
from tests.unit.netstack.fakepeer import Harness
from tests.unit.wg.sim import A_IP, B_IP, ip4
from trionet.magicsock.conn import MagicConn
from trionet.netstack.tcp import TcpConfig
from trionet.netstack.wire import ones_sum
from trionet.node import Node
from trionet.wg import WgDevice

MSS = 1240
WALL = 1.8e9
DATA = os.urandom(4 << 20)


def wireguard_pair() -> WgDevice:
    """Our device with a live session to a peer holding the harness's peer address."""
    now = time.monotonic()
    a, b = WgDevice(os.urandom(32)), WgDevice(os.urandom(32))
    a.set_peer(b.public, [B_IP + "/32"])
    b.set_peer(a.public, [A_IP + "/32"])
    init = a.send_ip(ip4(A_IP, B_IP), now, WALL)[0]
    resp = b.receive(init.data, now, WALL).transmits[0]
    for tx in a.receive(resp.data, now, WALL).transmits:
        b.receive(tx.data, now, WALL)
    return a


def pipeline_node(tmp: Path) -> tuple[Node, socket.socket]:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)

    def drain() -> None:
        while True:
            try:
                sink.recv(65535)
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    node = Node(login_server="https://bench.invalid", state_dir=tmp)
    node.wg = wireguard_pair()
    magic = MagicConn(os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(32), lambda *a: None,
                      login_server="https://bench.invalid", udp_bind="127.0.0.1")
    magic.bind()
    magic.paths = FixedPath(sink.getsockname())  # type: ignore[assignment]
    node.magic = magic
    return node, sink


def send_round(node: Node | None) -> tuple[float, int]:
    """CPU seconds and segments for one 4 MiB send (node None: netstack only)."""
    h = Harness(TcpConfig(send_buffer=8 << 20))
    h.connect(mss=MSS, wscale=8)
    if node is not None:
        h.stack.output = node._on_ip_out
    conn = h.conn
    conn.cc.cwnd = conn.snd_wnd = 1 << 30
    h.out.clear()
    c0 = time.process_time()
    conn.send(memoryview(DATA), 1.0)
    if node is not None:
        node._flush_outbound()
    return time.process_time() - c0, conn.stats["segments_out"]


def floor_round(segments: int) -> float:
    cipher = ChaCha20Poly1305(os.urandom(32))
    view = memoryview(DATA)
    nonce = bytes(12)
    c0 = time.process_time()
    for i in range(segments):
        payload = view[i * MSS:(i + 1) * MSS]
        ones_sum(payload)
        cipher.encrypt(nonce, payload, None)
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-sendpath-{os.getpid()}"
    node, sink = pipeline_node(tmp)
    best: dict[str, float] = {"netstack": 1e9, "pipeline": 1e9, "floor": 1e9}
    segments = 0
    for _ in range(args.rounds):
        cpu, segments = send_round(None)
        best["netstack"] = min(best["netstack"], cpu / segments)
        cpu, segments = send_round(node)
        best["pipeline"] = min(best["pipeline"], cpu / segments)
        best["floor"] = min(best["floor"], floor_round(segments) / segments)
    sink.close()
    result: dict[str, Any] = {f"{k}_us_per_segment": v * 1e6 for k, v in best.items()}
    result["segments"] = segments
    result["pipeline_over_floor"] = best["pipeline"] / best["floor"]
    result["pipeline_mb_per_cpu_s"] = MSS / best["pipeline"] / 1e6
    print(f"send path, CPU per {MSS}-byte segment (best of {args.rounds}):")
    print(f"  netstack emit only       {best['netstack'] * 1e6:7.2f} us")
    print(f"  netstack -> socket       {best['pipeline'] * 1e6:7.2f} us  "
          f"({result['pipeline_mb_per_cpu_s']:.0f} MB per CPU second)")
    print(f"  floor (checksum+cipher)  {best['floor'] * 1e6:7.2f} us  ratio {result['pipeline_over_floor']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
