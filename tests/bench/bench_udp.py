"""The direct UDP path in one process: packets/s through magicsock + WireGuard.

    .venv/bin/python -m tests.bench.bench_udp [--seconds 3] [--json out.json]

Two MagicConns on 127.0.0.1, each with its WgDevice, wired as trionet.Node
wires them: the sender's WgDevice.send_ip -> MagicConn.send_wireguard (UDP
sendto); the receiver's UDP reader task drains the socket in batches ->
WgDevice.receive (decrypt, replay window, AllowedIPs) -> on_batch_end once
per drained batch (Node hands the batch to the netstack there; the bench
counts it). The path is proven by real disco ping/pong first, so packets go out on
UDP only. The baseline row runs the same burst pattern over two plain
non-blocking UDP sockets in the same trio loop: no crypto, no classification.
The corked row sends each burst between MagicConn.cork and uncork, as Node
sends a netstack flush: equal-sized runs leave in one UDP GSO write and the
receiver's GRO reads take them back as one batch (`gso_writes`, `gro_reads`).

The sender keeps at most WINDOW packets unacknowledged by the receiver's
count (a flow control the bench owns), so the rows measure work per packet,
not socket-buffer overflow; `lost` counts what never arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from trionet import keys
from trionet.magicsock.conn import MagicConn
from trionet.wg import WgDevice

WINDOW = 256
BURST = 32
A_IP, B_IP = "100.64.0.1", "100.64.0.2"


def ip_packet(size: int) -> bytes:
    payload = bytes(size - 28)
    return struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, size, 0, 0, 64, 17, 0, socket.inet_aton(A_IP),
                       socket.inet_aton(B_IP), 1000, 2000, size - 20, 0) + payload


class End:
    """One node's data path: magicsock and WireGuard, counting decrypted packets."""

    def __init__(self) -> None:
        self.node = keys.new_private()
        self.disco = keys.new_private()
        self.wg = WgDevice(self.node)
        self.received = 0
        self._inbound: list[bytes] = []
        self.magic = MagicConn(self.node, keys.public_of(self.node), self.disco, keys.public_of(self.disco),
                               self._on_wireguard, login_server="https://bench.invalid", udp_bind="127.0.0.1",
                               on_batch_end=self._flush_inbound)
        self.magic.bind()

    @property
    def addr(self) -> tuple[str, int]:
        return "127.0.0.1", self.magic.udp.local_port

    def _on_wireguard(self, datagrams: Sequence[bytes | memoryview], derp_src: bytes | None, path: Any) -> None:
        # as Node._on_wireguard, minus the packet filter
        got = self.wg.receive_many(datagrams, time.monotonic(), time.time(), src=path)
        for tx in got.transmits:
            self.magic.send_wireguard(tx.peer, tx.data, tx.path or path)
        for _peer, packet in got.packets:
            self._inbound.append(packet)

    def _flush_inbound(self) -> None:  # as Node._flush_inbound: one hand-off per socket batch
        if self._inbound:
            batch, self._inbound = self._inbound, []
            self.received += len(batch)

    def know(self, other: End, ip: str) -> None:
        self.wg.set_peer(keys.public_of(other.node), [ip + "/32"])
        self.magic.upsert_peer(keys.public_of(other.node), keys.public_of(other.disco), 0, [other.addr])

    def send(self, packet: bytes) -> None:
        for tx in self.wg.send_ip(packet, time.monotonic(), time.time()):
            self.magic.send_wireguard(tx.peer, tx.data, None)

    def send_corked(self, packet: bytes, count: int) -> None:
        """A burst held and written as Node writes a netstack flush: GSO runs, read back by GRO."""
        self.magic.cork()
        try:
            for _ in range(count):
                self.send(packet)
        finally:
            self.magic.uncork()


async def _pump(send: Any, received: Any, seconds: float,
                send_burst: Any = None) -> tuple[int, int, float, float]:
    """Send bursts while at most WINDOW are outstanding; returns (sent, received, elapsed,
    this process's CPU seconds meanwhile)."""
    sent = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if sent - received() < WINDOW:
            if send_burst is not None:
                send_burst(BURST)
            else:
                for _ in range(BURST):
                    send()
            sent += BURST
        await trio.sleep(0)  # the reader task runs here
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    with trio.move_on_after(1.0):
        while received() < sent:
            await trio.sleep(0.01)
    return sent, received(), elapsed, cpu


async def bench_magicsock(size: int, seconds: float, corked: bool = False) -> dict[str, Any]:
    a, b = End(), End()
    a.know(b, B_IP)
    b.know(a, A_IP)
    packet = ip_packet(size)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.magic.run)
        await nursery.start(b.magic.run)
        b_key = keys.public_of(b.node)
        with trio.fail_after(10):  # disco proves the UDP path, WireGuard handshakes
            while not a.magic.paths.peers[b_key].direct(time.monotonic()) or b.received == 0:
                a.send(packet)
                await trio.sleep(0.05)
        b.received = 0
        burst = (lambda n: a.send_corked(packet, n)) if corked else None
        sent, got, elapsed, cpu = await _pump(lambda: a.send(packet), lambda: b.received, seconds, burst)
        nursery.cancel_scope.cancel()
    name = "udp magicsock+wg corked" if corked else "udp magicsock+wireguard"
    return {"name": name, "size": size, "packets": got, "seconds": elapsed, "pps": got / elapsed, "cpu_pps": got / cpu,
            "lost": sent - got, "udp_sent": a.magic.stats["send.udp"], "derp_sent": a.magic.stats["send.derp"],
            "gso_writes": a.magic.stats["send.udp_gso"], "gro_reads": b.magic.stats["recv.udp_gro_reads"]}


async def bench_raw(size: int, seconds: float) -> dict[str, Any]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (rx, tx):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
    dest = rx.getsockname()
    datagram = bytes(size + 32)  # what WireGuard puts on the wire for `size` bytes of IP
    count = [0]

    async def reader() -> None:
        while True:
            await trio.lowlevel.wait_readable(rx)
            while True:
                try:
                    rx.recvfrom(65535)
                except BlockingIOError:
                    break
                count[0] += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        sent, got, elapsed, cpu = await _pump(lambda: tx.sendto(datagram, dest), lambda: count[0], seconds)
        nursery.cancel_scope.cancel()
    rx.close()
    tx.close()
    return {"name": "udp raw sockets", "size": size, "packets": got, "seconds": elapsed, "pps": got / elapsed,
            "cpu_pps": got / cpu,
            "lost": sent - got}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for size in (64, 1280):
        raw = trio.run(bench_raw, size, args.seconds)
        ours = trio.run(bench_magicsock, size, args.seconds)
        ours["ratio"] = ours["pps"] / raw["pps"]
        corked = trio.run(bench_magicsock, size, args.seconds, True)
        corked["ratio"] = corked["pps"] / raw["pps"]
        rows += [raw, ours, corked]
    print(f"{'benchmark':<26} {'bytes':>6} {'packets':>10} {'pkt/s':>10} {'MB/s':>7} {'lost':>5} {'ratio':>6} "
          f"{'pkt/cpu-s':>10}")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
        print(f"{row['name']:<26} {row['size']:>6} {row['packets']:>10} {row['pps']:>10,.0f} "
              f"{row['pps'] * row['size'] / 1e6:>7.1f} {row['lost']:>5} {ratio:>6} {row['cpu_pps']:>10,.0f}")
    print(f"one process, python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} cpus; "
          "ratio = ours / raw sockets;\n"
          "pkt/cpu-s = packets per second of this process's CPU (steadier on a busy machine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
