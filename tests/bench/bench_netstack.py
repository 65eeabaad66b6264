"""Netstack throughput against the Linux kernel over a TUN device, beside
kernel-to-kernel over a veth pair, in the same run (needs root).

    .venv/bin/python -m tests.bench.bench_netstack [--mb 100] [--mtu 1280] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import trio

from tests.integration.netstack_env import BLOCK, PEER, netns_tun, pattern_sha, read_line


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def kernel_to_netstack(size: int, mtu: int) -> tuple[float, float]:
    async with netns_tun(mtu=mtu) as env:
        assert env.stack is not None
        proc = await env.start_peer("server-send", "5001", str(size))
        t0, c0 = time.perf_counter(), _cpu()
        s = await env.stack.open_tcp_stream(env.kernel4, 5001)
        h = hashlib.sha256()
        n = 0
        while d := await s.receive_some(1 << 20):
            h.update(d)
            n += len(d)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        await s.aclose()
        await read_line(proc)
        await proc.wait()
        assert n == size and h.hexdigest() == pattern_sha(size)
        return size / dt / 1e6, cpu / (size / 1e9)


async def netstack_to_kernel(size: int, mtu: int) -> tuple[float, float]:
    async with netns_tun(mtu=mtu) as env:
        assert env.stack is not None
        proc = await env.start_peer("server-recv", "5003")
        t0, c0 = time.perf_counter(), _cpu()
        s = await env.stack.open_tcp_stream(env.kernel4, 5003)
        view = memoryview(BLOCK)
        left = size
        while left:
            k = min(left, len(view))
            await s.send_all(view[:k])
            left -= k
        await s.send_eof()
        line = await read_line(proc)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        await proc.wait()
        await s.aclose()
        assert line.split()[:2] == [str(size), pattern_sha(size)]
        return size / dt / 1e6, cpu / (size / 1e9)


def kernel_veth(size: int, mtu: int) -> tuple[float, float]:
    """Two namespaces joined by a veth; the same peer script on both ends."""
    pid = os.getpid()
    a, b = f"tnbenchA{pid}", f"tnbenchB{pid}"
    va, vb = f"tnva{pid % 100000}", f"tnvb{pid % 100000}"

    def sh(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True)

    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, addr in ((a, va, "10.253.0.1/24"), (b, vb, "10.253.0.2/24")):
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        srv = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, PEER, "server-recv",
                                "5005"], stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "READY"
        t0 = time.perf_counter()
        cli = subprocess.run(["ip", "netns", "exec", b, sys.executable, PEER, "client-send",
                              "10.253.0.1", "5005", str(size)], capture_output=True, text=True,
                             check=True)
        line = srv.stdout.readline().split()
        dt = time.perf_counter() - t0
        srv.wait()
        cpu = float(line[2]) + float(cli.stdout.split()[2])
        return size / dt / 1e6, cpu / (size / 1e9)
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--mtu", type=int, default=1280)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    size = args.mb * 1_000_000
    rows = {
        "kernel->netstack (TUN)": trio.run(kernel_to_netstack, size, args.mtu),
        "netstack->kernel (TUN)": trio.run(netstack_to_kernel, size, args.mtu),
        "kernel->kernel (veth)": kernel_veth(size, args.mtu),
    }
    ref = rows["kernel->kernel (veth)"][0]
    print(f"netstack benchmark: {args.mb} MB single stream, MTU {args.mtu}")
    print(f"{'path':26} {'MB/s':>9} {'CPU s/GB':>9} {'vs veth':>8}")
    for name, (mbps, cpu) in rows.items():
        print(f"{name:26} {mbps:9.1f} {cpu:9.2f} {mbps / ref:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mb": args.mb, "mtu": args.mtu,
                       "rows": {k: {"mb_per_s": v[0], "cpu_s_per_gb": v[1],
                                    "ratio_to_veth": v[0] / ref} for k, v in rows.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
