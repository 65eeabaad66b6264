"""WireGuard encrypt + decrypt of 1280-byte packets vs bare ChaCha20-Poly1305.

Both measured in this run, in one process: the ratio is what our framing,
replay window, AllowedIPs checks and bookkeeping cost on top of the cipher.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from trionet.wg import WgDevice

N = 20_000
SIZE = 1280


def packet() -> bytes:
    payload = os.urandom(SIZE - 20)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, SIZE, 0, 0, 64, 17, 0, ipaddress.ip_address("10.0.0.1").packed,
                       ipaddress.ip_address("10.0.0.2").packed) + payload


def bare() -> float:
    k = ChaCha20Poly1305(os.urandom(32))
    pkt = packet()
    start = time.perf_counter()
    for i in range(N):
        nonce = b"\0\0\0\0" + i.to_bytes(8, "little")
        k.decrypt(nonce, k.encrypt(nonce, pkt, None), None)
    return N / (time.perf_counter() - start)


def wireguard() -> float:
    a, b = WgDevice(os.urandom(32)), WgDevice(os.urandom(32))
    a.set_peer(b.public, ["10.0.0.2/32"])
    b.set_peer(a.public, ["10.0.0.1/32"])
    init = a.send_ip(packet(), 0.0, 1.8e9)[0]
    resp = b.receive(init.data, 0.0, 1.8e9).transmits[0]
    for t in a.receive(resp.data, 0.0, 1.8e9).transmits:
        b.receive(t.data, 0.0, 1.8e9)
    pkt = packet()
    start = time.perf_counter()
    for _ in range(N):
        (tx,) = a.send_ip(pkt, 1.0, 1.8e9)
        got = b.receive(tx.data, 1.0, 1.8e9)
        assert got.packets
    return N / (time.perf_counter() - start)


def main() -> dict[str, float]:
    bare_pps = bare()
    wg_pps = wireguard()
    result = {"bare_pps": bare_pps, "bare_MBps": bare_pps * SIZE / 1e6, "wg_pps": wg_pps,
              "wg_MBps": wg_pps * SIZE / 1e6, "ratio": wg_pps / bare_pps}
    print(f"{'1280-byte encrypt+decrypt':<30} {'packets/s':>12} {'MB/s':>8}")
    print(f"{'bare ChaCha20-Poly1305':<30} {bare_pps:12.0f} {result['bare_MBps']:8.1f}")
    print(f"{'trionet WireGuard':<30} {wg_pps:12.0f} {result['wg_MBps']:8.1f}")
    print(f"ratio {result['ratio']:.2f} (aim: 0.70)")
    return result


if __name__ == "__main__":
    res = main()
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(res, indent=2))
