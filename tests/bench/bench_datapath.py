"""CPU per TCP segment on the data path, both ways, in one process, against its floor.

    python tests/bench/bench_datapath.py [--rounds R] [--json FILE]

Send: a 4 MiB send on an established netstack connection, window open (sent at the
time of the handshake, so no idle restart), through Node's outbound bursts,
WgDevice.send_ip_many and magicsock's corked GSO writes, to a UDP socket drained by
a thread; its 3,383 segments are counted at TCP, IP and the socket, and the row
divides by that count only if all three agree. Its floor: the two per-segment costs no Python
code avoids, the TCP checksum sum over the payload and one ChaCha20-Poly1305
encryption.

Receive: 4 MiB of in-order segments, encrypted by the peer's WgDevice, handed to
Node._on_wireguard in batches of 44 (one GRO read), then the netstack batch, the
ACKs back out through WireGuard and magicsock, and the application's read. Its
floor: one decryption per segment (no checksums: WireGuard authenticated them).

Best of R rounds each (process CPU time), so a noisy neighbour hurts all alike.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tests.unit.magicsock.fakes import FixedPath
from tests.unit.netstack.fakepeer import Harness, make_segment
from tests.unit.wg.sim import A_IP, B_IP, ip4
from trionet.magicsock.conn import MagicConn
from trionet.netstack import NetStack
from trionet.netstack.tcp import TcpConfig
from trionet.netstack.wire import ones_sum
from trionet.netstack.wire import tcp as wtcp
from trionet.node import Node
from trionet.wg import WgDevice

MSS = 1240
GRO_BATCH = 44  # datagrams per GRO read of tailscaled's GSO batches
WALL = 1.8e9
DATA = os.urandom(4 << 20)


def wireguard_pair() -> tuple[WgDevice, WgDevice]:
    """Ours and the peer's device (the harness's peer address), with a live session
    (at Trio's time: the node's drivers read Trio's clock)."""
    now = trio.current_time()
    a, b = WgDevice(os.urandom(32)), WgDevice(os.urandom(32))
    a.set_peer(b.public, [B_IP + "/32"])
    b.set_peer(a.public, [A_IP + "/32"])
    init = a.send_ip(ip4(A_IP, B_IP), now, WALL)[0]
    resp = b.receive(init.data, now, WALL).transmits[0]
    for tx in a.receive(resp.data, now, WALL).transmits:
        b.receive(tx.data, now, WALL)
    return a, b


def pipeline_node(tmp: Path) -> tuple[Node, WgDevice, socket.socket]:
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
    node.wg, peer = wireguard_pair()
    node.filter.update(local=[ipaddress.ip_network(A_IP + "/32")])
    magic = MagicConn(os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(32), lambda *a: None,
                      login_server="https://bench.invalid", udp_bind="127.0.0.1")
    magic.bind()
    magic.paths = FixedPath(sink.getsockname())  # type: ignore[assignment]
    node.magic = magic
    return node, peer, sink


def send_round(node: Node | None) -> tuple[float, int]:
    """CPU seconds and data segments for one 4 MiB send on an open window (node None:
    the netstack alone).

    The send comes at the time of the handshake, with cwnd and the peer's window set
    past the data: a send after an idle spell longer than the RTO would restart from
    the initial window (RFC 5681 4.1) and time ten segments and the 4 MiB copy into
    the send buffer. The count returned is checked, not assumed: the TCP's, the IP
    layer's and (with a node) magicsock's counts of what went out during the timed
    call must all be every segment the data makes."""
    h = Harness(TcpConfig(send_buffer=8 << 20))
    h.connect(mss=MSS, wscale=8)
    if node is not None:
        node._flush_outbound()  # what an earlier round left (the receive round's RST) is not this round's
        h.stack.output = node._on_ip_out
    conn = h.conn
    assert conn.snd_mss == MSS, conn.snd_mss
    conn.cc.cwnd = conn.snd_wnd = 1 << 30
    h.out.clear()
    tcp0, ip0 = conn.stats["segments_out"], h.stack.stats["ip_out"]
    udp0 = _datagrams_out(node)
    c0 = time.process_time()
    conn.send(memoryview(DATA), 0.0)
    if node is not None:
        node._flush_outbound()
    cpu = time.process_time() - c0
    expected = -(-len(DATA) // MSS)
    counts = {"tcp": conn.stats["segments_out"] - tcp0, "ip": h.stack.stats["ip_out"] - ip0}
    if node is None:
        counts["harness"] = len(h.out)
    else:
        counts["magicsock"] = _datagrams_out(node) - udp0
    assert set(counts.values()) == {expected}, (expected, counts)
    assert conn.snd_nxt == conn.sbuf_seq + len(DATA), "the whole send went out in the timed call"
    return cpu, expected


def _datagrams_out(node: Node | None) -> int:
    """Datagrams magicsock handed to its UDP socket (a full socket buffer counts: the
    send was made), 0 without a node."""
    if node is None or node.magic is None:
        return 0
    stats = node.magic.stats
    return int(stats["send.udp"] + stats["send.udp_full"])


async def receive_round(node: Node, peer: WgDevice) -> tuple[float, float, int]:
    """CPU seconds for 4 MiB of in-order data through Node (and for the decryption
    floor alone), and the segment count."""
    stack = NetStack([A_IP], output=node._on_ip_out, output_done=node._flush_outbound, verify_checksums=False)
    node.stack = stack
    now = trio.current_time()
    conn = stack.core.tcp_connect(ipaddress.ip_address(B_IP), 80, now)
    stack.after_core_call(conn)
    port, peer_seq = conn.key[3], 7000
    path = ("udp", ("127.0.0.1", 9))

    def deliver(packets: list[bytes]) -> None:
        node._on_wireguard([tx.data for tx in peer.send_ip_many(packets, trio.current_time(), WALL)], None, path)
        node._flush_inbound()

    deliver([make_segment(80, port, peer_seq, conn.iss + 1, wtcp.SYN | wtcp.ACK, 65535,
                          options=wtcp.build_options(mss=MSS, wscale=7, sack_perm=True, ts=(1, 0)))])
    assert conn.state.name == "ESTABLISHED", conn.state
    peer_seq += 1
    payload = MSS - 12  # the timestamp option
    packets = []
    for off in range(0, len(DATA) - payload, payload):
        ts = b"\x01\x01\x08\x0a" + struct.pack("!II", 2, 1)
        packets.append(make_segment(80, port, peer_seq + off, conn.iss + 1, wtcp.ACK, 65535,
                                    DATA[off:off + payload], options=ts))
    datagrams = [tx.data for tx in peer.send_ip_many(packets, trio.current_time(), WALL)]
    got = 0
    tcp_in0, fast0 = stack.core.stats["tcp_in"], stack.core.fast_segments
    c0 = time.process_time()
    for i in range(0, len(datagrams), GRO_BATCH):
        node._on_wireguard(datagrams[i:i + GRO_BATCH], None, path)
        node._flush_inbound()
        got += len(conn.read(1 << 22, trio.current_time()))
        stack.after_core_call(conn)
    cpu = time.process_time() - c0
    assert got == len(packets) * payload, (got, len(packets) * payload, node.stats, node.wg.drops if node.wg else None)
    # every segment reached TCP, by the fast path: the row is what it says
    assert stack.core.stats["tcp_in"] - tcp_in0 == stack.core.fast_segments - fast0 == len(packets), (
        stack.core.stats["tcp_in"] - tcp_in0, stack.core.fast_segments - fast0, len(packets))
    cipher = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(12)
    sealed = [cipher.encrypt(nonce, p, None) for p in packets]
    c0 = time.process_time()
    for ct in sealed:
        cipher.decrypt(nonce, ct, None)
    floor = time.process_time() - c0
    conn.abort(trio.current_time())
    return cpu, floor, len(packets)


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
    trio.run(bench, args)


async def bench(args: argparse.Namespace) -> None:
    """Every round in one Trio run: the node reads Trio's clock, whose origin each run picks anew."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-datapath-{os.getpid()}"
    node, peer, sink = pipeline_node(tmp)
    best: dict[str, float] = {"netstack": 1e9, "pipeline": 1e9, "floor": 1e9, "receive": 1e9,
                              "receive_floor": 1e9}
    segments = received = 0
    for _ in range(args.rounds):
        cpu, segments = send_round(None)
        best["netstack"] = min(best["netstack"], cpu / segments)
        cpu, segments = send_round(node)
        best["pipeline"] = min(best["pipeline"], cpu / segments)
        best["floor"] = min(best["floor"], floor_round(segments) / segments)
        cpu, floor, received = await receive_round(node, peer)
        best["receive"] = min(best["receive"], cpu / received)
        best["receive_floor"] = min(best["receive_floor"], floor / received)
    sink.close()
    result: dict[str, Any] = {f"{k}_us_per_segment": v * 1e6 for k, v in best.items()}
    result["segments"] = segments
    result["receive_segments"] = received
    result["pipeline_over_floor"] = best["pipeline"] / best["floor"]
    result["pipeline_mb_per_cpu_s"] = MSS / best["pipeline"] / 1e6
    print(f"send path, CPU per {MSS}-byte segment (best of {args.rounds}; {segments} segments a round, "
          "counted at TCP, IP and the socket):")
    print(f"  netstack emit only       {best['netstack'] * 1e6:7.2f} us")
    print(f"  netstack -> socket       {best['pipeline'] * 1e6:7.2f} us  "
          f"({result['pipeline_mb_per_cpu_s']:.0f} MB per CPU second)")
    print(f"  floor (checksum+cipher)  {best['floor'] * 1e6:7.2f} us  ratio {result['pipeline_over_floor']:.2f}")
    result["receive_over_floor"] = best["receive"] / best["receive_floor"]
    result["receive_mb_per_cpu_s"] = (MSS - 12) / best["receive"] / 1e6
    print(f"receive path, CPU per {MSS - 12}-byte segment (batches of {GRO_BATCH}; {received} segments "
          "a round, all by the fast path):")
    print(f"  socket batch -> read     {best['receive'] * 1e6:7.2f} us  "
          f"({result['receive_mb_per_cpu_s']:.0f} MB per CPU second)")
    print(f"  floor (decryption)       {best['receive_floor'] * 1e6:7.2f} us  ratio {result['receive_over_floor']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
