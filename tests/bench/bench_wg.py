"""WireGuard encrypt + decrypt of 1280-byte packets vs bare ChaCha20-Poly1305.

    python tests/bench/bench_wg.py [--packets N] [--rounds R] [--json FILE]

Both are measured in this run, in one process, interleaved over R rounds
(best round of each counts, so a noisy neighbour hurts both alike): the ratio
is what our framing, routing, replay window, AllowedIPs source check, timers
and bookkeeping cost on top of the cipher. "bare" is one ChaCha20Poly1305
encrypt and one decrypt call per packet with a fresh nonce, nothing else.
A second row sends and receives in bursts of 48 (send_ip_many, receive_many),
the way Node drives the device from the netstack and from GRO reads.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import struct
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trionet.wg import WgDevice

SIZE = 1280
WALL = 1.8e9


def packet() -> bytes:
    payload = os.urandom(SIZE - 20)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, SIZE, 0, 0, 64, 17, 0, ipaddress.ip_address("10.0.0.1").packed,
                       ipaddress.ip_address("10.0.0.2").packed) + payload


def bare(n: int) -> float:
    k = ChaCha20Poly1305(os.urandom(32))
    pkt = packet()
    nonce = struct.Struct("<4xQ").pack
    start = time.perf_counter()
    for i in range(n):
        k.decrypt(nonce(i), k.encrypt(nonce(i), pkt, None), None)
    return n / (time.perf_counter() - start)


def pair() -> tuple[WgDevice, WgDevice]:
    a, b = WgDevice(os.urandom(32)), WgDevice(os.urandom(32))
    a.set_peer(b.public, ["10.0.0.2/32"])
    b.set_peer(a.public, ["10.0.0.1/32"])
    init = a.send_ip(packet(), 0.0, WALL)[0]
    resp = b.receive(init.data, 0.0, WALL).transmits[0]
    for t in a.receive(resp.data, 0.0, WALL).transmits:
        b.receive(t.data, 0.0, WALL)
    return a, b


def wireguard(a: WgDevice, b: WgDevice, n: int, now: float) -> float:
    pkt = packet()
    send, receive = a.send_ip, b.receive
    start = time.perf_counter()
    for _ in range(n):
        receive(send(pkt, now, WALL)[0].data, now, WALL)
    rate = n / (time.perf_counter() - start)
    return rate


def wireguard_bursts(a: WgDevice, b: WgDevice, n: int, now: float, burst: int = 48) -> float:
    """As Node calls it: send_ip_many over one netstack step's packets (up to 48),
    receive_many over one GRO read's datagrams."""
    pkts = [packet()] * burst
    send, receive = a.send_ip_many, b.receive_many
    start = time.perf_counter()
    for _ in range(n // burst):
        receive([tx.data for tx in send(pkts, now, WALL)], now, WALL)
    return n // burst * burst / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    a, b = pair()
    rx0 = b.statistics()["rx_packets"]
    bare_pps = wg_pps = burst_pps = 0.0
    for r in range(args.rounds):
        bare_pps = max(bare_pps, bare(args.packets))
        wg_pps = max(wg_pps, wireguard(a, b, args.packets, 1.0 + r))
        burst_pps = max(burst_pps, wireguard_bursts(a, b, args.packets, 1.0 + r))
    rx = b.statistics()["rx_packets"] - rx0
    assert rx == (args.packets + args.packets // 48 * 48) * args.rounds, (rx, b.drops)
    assert not a.drops and not b.drops
    result = {"packet_bytes": SIZE, "bare_pps": bare_pps, "bare_MBps": bare_pps * SIZE / 1e6, "wg_pps": wg_pps,
              "wg_MBps": wg_pps * SIZE / 1e6, "ratio": wg_pps / bare_pps,
              "wg_burst_pps": burst_pps, "wg_burst_MBps": burst_pps * SIZE / 1e6, "ratio_burst": burst_pps / bare_pps}
    print(f"{'1280-byte encrypt+decrypt':<34} {'packets/s':>10} {'MB/s':>8}")
    print(f"{'bare ChaCha20-Poly1305 calls':<34} {bare_pps:10.0f} {result['bare_MBps']:8.1f}")
    print(f"{'trionet WgDevice send_ip+receive':<34} {wg_pps:10.0f} {result['wg_MBps']:8.1f}")
    print(f"{'trionet in bursts of 48 (as Node)':<34} {burst_pps:10.0f} {result['wg_burst_MBps']:8.1f}")
    print(f"ratio {result['ratio']:.2f} one at a time, {result['ratio_burst']:.2f} in bursts (aim: 0.70); "
          f"best of {args.rounds} rounds of {args.packets} packets")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
