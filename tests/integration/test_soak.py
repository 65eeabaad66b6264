"""Long runs against real peers: sha256-checked traffic while things break.

`test_soak_short` runs in every `make test` (about 40 s); `make soak` runs
`test_soak_long`: 11 minutes crossing at least 4 WireGuard rekeys per peer and
20 Headscale restarts (each drops the embedded DERP too). Both print figures:
bytes verified, rekeys crossed, restarts survived, the longest stall, and
connection resets (none allowed).

Loss, delay and DERP connection drops (separate from Headscale restarts) are in
test_impairments.py, with short variants in `make test` and long ones here in
`make soak`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.services import TCP_ECHO as ECHO
from tests.realstack import Stack, wait_for
from trionet import Node

pytestmark = [pytest.mark.integration, pytest.mark.netns]

ECHO_PORT = 7007
CHUNK = 64 * 1024


class Flow:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.bytes = 0
        self.last_progress: float | None = None  # stalls count once bytes flow, not during setup
        self.max_stall = 0.0
        self.stalls: list[tuple[float, float]] = []  # (when it ended, how long), for the report
        self.resets: list[str] = []  # the echo connection broke (it must not)

    def progress(self, n: int) -> None:
        now = time.monotonic()
        if self.last_progress is None:
            self.last_progress = now
        if now - self.last_progress > 1.0:
            self.stalls.append((round(now, 1), round(now - self.last_progress, 2)))
        self.max_stall = max(self.max_stall, now - self.last_progress)
        self.last_progress = now
        self.bytes += n


async def echo_flow(node: Node, peer: str, flow: Flow, stop: trio.Event) -> None:
    """Echo random bytes through ``peer`` until ``stop``; a broken connection is recorded, not raised."""
    try:
        await _echo(node, peer, flow, stop)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        flow.resets.append(f"{time.monotonic():.1f}: {type(exc).__name__}: {exc}")


async def _echo(node: Node, peer: str, flow: Flow, stop: trio.Event) -> None:
    stream = await node.open_tcp_stream(peer, ECHO_PORT)

    async def reader(expected: list[int]) -> None:
        while expected[0] > 0 or not stop.is_set():
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            flow.got.update(data)
            expected[0] -= len(data)
            flow.progress(len(data))
            if stop.is_set() and expected[0] <= 0:
                break

    outstanding = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, outstanding)
        while not stop.is_set():
            chunk = os.urandom(CHUNK)
            flow.sent.update(chunk)
            outstanding[0] += len(chunk)
            await stream.send_all(chunk)
            while outstanding[0] > 4 * CHUNK:
                await trio.sleep(0.005)
    await stream.aclose()
    assert flow.sent.hexdigest() == flow.got.hexdigest(), f"{peer}: echoed bytes differ"


async def soak(stack: Stack, tmp: Path, seconds: float, restarts: int) -> dict[str, Any]:
    echos = [subprocess.Popen([*ts.host.exec_prefix(), sys.executable, "-c", ECHO, str(ECHO_PORT)])
             for ts in stack.tailscaleds]
    try:
        async with Node(login_server=stack.server_url, auth_key=stack.preauth_key(), state_dir=tmp,
                        hostname="py-soak", ca_file=stack.ca_file, udp_bind=stack.local_ip) as node:
            flows = [Flow(ts.name) for ts in stack.tailscaleds]
            stop = trio.Event()
            survived = 0
            async with trio.open_nursery() as nursery:
                for ts, flow in zip(stack.tailscaleds, flows, strict=True):
                    nursery.start_soon(echo_flow, node, ts.name, flow, stop)
                interval = seconds / (restarts + 1)
                restart_times = []
                for _ in range(restarts):
                    await trio.sleep(interval)
                    restart_times.append(round(time.monotonic(), 1))
                    await trio.to_thread.run_sync(lambda: stack.restart_headscale(down_for=0.5))
                    survived += 1
                await trio.sleep(interval)
                stop.set()
            with trio.fail_after(15):  # just after a restart it may still be reconnecting
                while node.status()["status"] != "Running":
                    await trio.sleep(0.1)
            # handshakes per peer: the first one plus every rekey crossed
            rekeys = {ts.name: node.wg.peer_statistics(
                node._key_by_peer_id[next(p["id"] for p in node.peers() if p["hostname"] == ts.name)])["handshakes"]
                for ts in stack.tailscaleds}
            result = {"seconds": seconds, "bytes_verified": sum(f.bytes for f in flows if not f.resets),
                      "connection_resets": {f.name: f.resets for f in flows},
                      "max_stall_s": max(f.max_stall for f in flows), "headscale_restarts": survived,
                      "handshakes_per_peer": rekeys, "control_reconnects": node.control.reconnects,
                      "stalls": {f.name: f.stalls for f in flows}, "restarts_at": restart_times,
                      "paths": {p["hostname"]: p.get("path") for p in node.peers()}}

            # a peer restarted (same node key, new disco key): traffic resumes within 10 s
            ts1 = stack.tailscaleds[0]
            await trio.to_thread.run_sync(stack.stop_tailscaled, ts1)
            await trio.to_thread.run_sync(stack.start_tailscaled, ts1)
            await trio.to_thread.run_sync(lambda: wait_for(
                lambda: ts1.status().get("BackendState") == "Running", 30, "ts1 back"))
            start = time.monotonic()
            with trio.fail_after(10):
                while True:
                    try:
                        with trio.fail_after(3):
                            stream = await node.open_tcp_stream("ts1", ECHO_PORT)
                            await stream.send_all(b"ping")
                            assert await stream.receive_some(4) == b"ping"
                            await stream.aclose()
                            break
                    except (trio.TooSlowError, trio.BrokenResourceError, OSError):
                        await trio.sleep(0.2)
            result["peer_restart_resume_s"] = time.monotonic() - start
    finally:
        for e in echos:
            e.terminate()
    print(f"\nsoak: {result}")
    return result


async def test_soak_short(make_stack: Any, tmp_path: Path) -> None:
    stack = make_stack()
    r = await soak(stack, tmp_path, seconds=float(os.environ.get("TRIONET_SOAK_SECONDS", "30")), restarts=3)
    assert r["bytes_verified"] > 1_000_000
    assert not any(r["connection_resets"].values()), r
    assert r["max_stall_s"] < 2.0, r
    assert r["headscale_restarts"] == 3 and r["control_reconnects"] >= 3


@pytest.mark.soak
async def test_soak_long(make_stack: Any, tmp_path: Path) -> None:
    stack = make_stack()
    r = await soak(stack, tmp_path, seconds=660, restarts=20)
    assert not any(r["connection_resets"].values()), r
    assert r["max_stall_s"] < 2.0, r
    assert all(n >= 5 for n in r["handshakes_per_peer"].values()), r  # first handshake + 4 rekeys
    assert r["headscale_restarts"] == 20
