"""Transfers through trionet over impaired paths to real tailscaled peers (issue 9).

* **5% random loss**: nftables ``numgen random mod 100 < 5 drop`` on the
  bridge between our namespace (trionet's leg) and one tailscaled's namespace,
  both ways (``Stack.add_loss``); this kernel has no netem.
* **50 ms added delay**: a userspace UDP relay on the direct path, 50 ms each
  way (``Stack.add_delay_relay``, ``tests/integration/udprelay.py``). trionet
  still sees a direct path to the peer's own address; the peer sees trionet
  behind the relay, as behind a NAT.
* **DERP connection drops**: UDP between nodes blocked, so DERP carries
  everything; ``ss -K`` aborts trionet's DERP TCP connection (a RST goes to
  Headscale) again and again during the transfer (``Stack.drop_derp_connection``).
  Headscale keeps running: these are separate from the restarts in test_soak.

Every transfer is an echo through tailscaled's netstack: N random bytes up, the
same N back, sha256 compared. The short variants run in ``make test`` (each well
under a minute); the ``soak`` ones run in ``make soak``. Each prints its figures.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.services import TCP_ECHO as ECHO
from tests.realstack import NEWEST_HEADSCALE, Stack, wait_for
from trionet import Node

pytestmark = [pytest.mark.integration, pytest.mark.netns]

ECHO_PORT = 7008
CHUNK = 64 * 1024
MB = 1 << 20
# Bytes in flight per echo over DERP. Headscale's DERP server drops packets for a
# client whose send queue is full; with 2 MiB in flight each way both TCPs spent
# seconds in RTO back-off (see the report in issue 9), so DERP runs use what
# test_soak uses.
DERP_WINDOW = 256 << 10


@pytest.fixture(scope="module")
def istack() -> Iterator[Stack]:
    """A private stack (Headscale + 2 tailscaled, each running an echo server) for this module.

    Every test leaves it as it found it: impairments are removed in ``finally``.
    """
    stack = Stack(NEWEST_HEADSCALE)
    echos: list[subprocess.Popen[bytes]] = []
    try:
        stack.start(tailscaleds=2)
        echos = [subprocess.Popen([*ts.host.exec_prefix(), sys.executable, "-c", ECHO, str(ECHO_PORT)])
                 for ts in stack.tailscaleds]
        yield stack
    finally:
        for e in echos:
            e.terminate()
        stack.stop()


class Transfer:
    """One echo connection: ``size`` bytes each way, checked with sha256.

    With ``until`` set, it keeps sending until that event fires (``size`` is
    then what was sent), so the transfer spans everything done meanwhile.
    """

    def __init__(self, peer: str, size: int, window: int = 2 * MB, until: trio.Event | None = None) -> None:
        self.peer = peer
        self.size = size
        self.until = until
        self.window = window  # bytes sent but not yet echoed back
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.received = 0
        self.started = 0.0
        self.finished = 0.0
        self.last = 0.0
        self.max_stall = 0.0
        self.stalls: list[tuple[float, float]] = []  # (seconds since start, length) of gaps over 1 s
        self.reset: str | None = None
        self.tcp: dict[str, Any] = {}  # trionet's TCP counters for this connection

    def _progress(self, n: int) -> None:
        now = time.monotonic()
        gap = now - self.last
        if gap > 1.0:
            self.stalls.append((round(self.last - self.started, 1), round(gap, 2)))
        self.max_stall = max(self.max_stall, gap)
        self.last = now
        self.received += n

    async def run(self, node: Node) -> None:
        self.started = self.last = time.monotonic()
        room = trio.Event()  # set by the reader whenever bytes come back

        async def reader(stream: trio.abc.Stream) -> None:
            while True:
                data = await stream.receive_some(CHUNK)
                if not data:
                    raise AssertionError(f"{self.peer}: EOF after {self.received} bytes")
                self.got.update(data)
                self._progress(len(data))
                room.set()

        async def wait_echo(upto: int) -> None:
            nonlocal room
            while self.received < upto:
                room = trio.Event()
                await room.wait()

        try:
            stream = await node.open_tcp_stream(self.peer, ECHO_PORT)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, stream)
                sent = 0
                while (sent < self.size) if self.until is None else not self.until.is_set():
                    chunk = os.urandom(CHUNK if self.until is not None else min(CHUNK, self.size - sent))
                    self.sent.update(chunk)
                    await stream.send_all(chunk)
                    sent += len(chunk)
                    await wait_echo(sent - self.window)
                self.size = sent
                await wait_echo(sent)
                nursery.cancel_scope.cancel()
            self.tcp = {k: v for k, v in dict(stream.connection.stats).items()
                        if k in ("retransmits", "fast_retransmits", "rto_timeouts", "dupacks", "sack_retransmits")}
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.reset = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.finished = time.monotonic()
        assert self.sent.hexdigest() == self.got.hexdigest(), f"{self.peer}: echoed bytes differ"

    def figures(self) -> dict[str, Any]:
        seconds = self.finished - self.started
        return {"peer": self.peer, "bytes_each_way": self.size, "verified": self.sent.digest() == self.got.digest()
                and self.received == self.size, "seconds": round(seconds, 1),
                "MB_per_s_each_way": round(self.received / MB / max(seconds, 1e-9), 2),
                "max_stall_s": round(self.max_stall, 2), "stalls": self.stalls, "reset": self.reset,
                "trionet_tcp": self.tcp}


def free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def node_for(stack: Stack, tmp: Path, name: str, udp_port: int = 0) -> Node:
    return Node(login_server=stack.server_url, auth_key=stack.preauth_key(), state_dir=tmp, hostname=name,
                ca_file=stack.ca_file, udp_bind=stack.local_ip, udp_port=udp_port)


async def wait_path(node: Node, peer: str, prefix: str, timeout: float = 20) -> str:
    """Poll until trionet's path to ``peer`` starts with ``prefix`` ("direct 10.…" or "derp")."""
    with trio.fail_after(timeout):
        while True:
            path = next((p.get("path") for p in node.peers() if p["hostname"] == peer), None)
            if path and path.startswith(prefix):
                return str(path)
            await trio.sleep(0.2)


async def warm_up(node: Node, peer: str) -> None:
    """One small echo, so the WireGuard session and the path exist before timing starts."""
    with trio.fail_after(30):
        await Transfer(peer, 4096).run(node)


def wireguard(node: Node, peer: str) -> dict[str, Any]:
    return dict(next(p.get("wireguard") or {} for p in node.peers() if p["hostname"] == peer))


# ----------------------------------------------------------------------- loss


async def loss_transfer(stack: Stack, tmp: Path, size: int, percent: int = 5) -> dict[str, Any]:
    ts1 = stack.tailscaleds[0]
    stack.add_loss(percent, ts1.host.ip)
    try:
        async with node_for(stack, tmp, "py-loss") as node:
            await warm_up(node, ts1.name)
            path = await wait_path(node, ts1.name, f"direct {ts1.host.ip}:")
            # and tailscaled's way back: until its own disco pongs arrive it relays through
            # DERP, past the loss rule (one run saw 27 of its packets there for 20 MiB)
            me = node.status()["self"]["node_key"]
            await trio.to_thread.run_sync(lambda: wait_for(lambda: ts1.cur_addr_of(me), 30,
                                                           f"{ts1.name}'s direct path to us"))
            t = Transfer(ts1.name, size)
            with trio.fail_after(600):
                await t.run(node)
            result = {"impairment": f"{percent}% loss each way", "path": path, **t.figures(),
                      "loss": stack.loss_counters(), "path_after": await wait_path(node, ts1.name, "direct"),
                      "udp_gso_writes": node.magic.stats["send.udp_gso"] if node.magic else 0}
    finally:
        stack.remove_loss()
    print(f"\nloss: {result}")
    # The rules did drop about 5% of what they saw, both ways. They count skbs:
    # tailscaled sends with UDP GSO, so its direction shows far fewer skbs than
    # datagrams (768 for 8 MiB in one run), and the ratio is judged on the total.
    loss = result["loss"]
    seen = loss["in"]["seen"] + loss["out"]["seen"]
    dropped = loss["in"]["dropped"] + loss["out"]["dropped"]
    assert loss["in"]["dropped"] > 0 and loss["out"]["dropped"] > 0, result
    assert seen > 1000 and 0.5 * percent / 100 < dropped / seen < 2 * percent / 100, result
    assert result["verified"] and result["reset"] is None, result
    if os.environ.get("TRIONET_DISABLE_UDP_GSO", "") in ("", "0"):
        # what we sent went out in GSO writes, and the real peer took it (the echo verified)
        assert result["udp_gso_writes"] > 0, result
    return result


async def test_loss_5_percent(istack: Stack, tmp_path: Path) -> None:
    # 8 MiB: at 5% loss trionet moves about 0.35 MB/s each way (20 MiB takes a minute: test_loss_long)
    await loss_transfer(istack, tmp_path, int(os.environ.get("TRIONET_IMPAIR_MB", "8")) * MB)


# ---------------------------------------------------------------------- delay


async def delay_transfer(stack: Stack, tmp: Path, size: int, delay: float = 0.05,
                         loss: int = 0) -> dict[str, Any]:
    ts1 = stack.tailscaleds[0]
    port = free_udp_port(stack.local_ip)
    relay = stack.add_delay_relay(ts1, port, delay)  # before trionet sends: NAT applies to new flows only
    if loss:
        stack.add_loss(loss, ts1.host.ip)
    try:
        async with node_for(stack, tmp, "py-delay", udp_port=port) as node:
            await warm_up(node, ts1.name)
            path = await wait_path(node, ts1.name, f"direct {ts1.host.ip}:{ts1.port}")
            rtts = [r for r in await node.ping(ts1.name, count=3) if r]
            # tailscaled's side: its current address for us is the relay's socket B
            relay_b = f"{relay.peer_side[0]}:{relay.peer_side[1]}"
            me = node.status()["self"]["node_key"]
            await trio.to_thread.run_sync(lambda: wait_for(lambda: ts1.cur_addr_of(me) == relay_b,
                                                           20, f"{ts1.name} to use {relay_b}"))
            t = Transfer(ts1.name, size, window=4 * MB)
            with trio.fail_after(900):
                await t.run(node)
            result = {"impairment": f"{delay * 1000:.0f} ms each way" + (f" + {loss}% loss" if loss else ""),
                      "path": path, "peer_cur_addr": relay_b, "disco_pings": rtts, **t.figures(),
                      "path_after": await wait_path(node, ts1.name, f"direct {ts1.host.ip}:{ts1.port}")}
            if loss:
                result["loss"] = stack.loss_counters()
    finally:
        stack.remove_loss()
        counts = relay.stop()
    result["relay"] = counts
    print(f"\ndelay: {result}")
    assert result["verified"] and result["reset"] is None, result
    # the traffic went through the relay, and its own queues dropped nothing
    assert counts["to_peer_bytes"] > size and counts["to_client_bytes"] > size, counts
    assert counts.get("a_kernel_drops", 0) == 0 and counts.get("b_kernel_drops", 0) == 0, counts
    return result


def _rtt(ping: Any) -> float | None:
    ms = ping.get("latency_ms") if isinstance(ping, dict) else None
    return float(ms) / 1000 if isinstance(ms, (int, float)) else None


async def test_delay_50ms(istack: Stack, tmp_path: Path) -> None:
    r = await delay_transfer(istack, tmp_path, int(os.environ.get("TRIONET_IMPAIR_MB", "20")) * MB)
    rtts = [x for x in map(_rtt, r["disco_pings"]) if x is not None]
    assert rtts and min(rtts) >= 0.1, r  # 50 ms each way


# ----------------------------------------------------------------- DERP drops


async def derp_drop_transfer(stack: Stack, tmp: Path, drops: int, every: float,
                             still_for_15s_fails: bool = True) -> dict[str, Any]:
    """Both peers' echo transfers run over DERP while its connection is aborted ``drops`` times.

    trionet's DERP and magicsock log lines (INFO) go to ``tmp/trionet.log``
    and the last ones are printed with the figures, so a stall can be read
    against reconnects.
    """
    handler = logging.FileHandler(tmp / "trionet.log")
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f %(name)s %(levelname)s %(message)s"))
    trionet_log = logging.getLogger("trionet")
    old_level = trionet_log.level
    trionet_log.addHandler(handler)
    trionet_log.setLevel(logging.INFO)
    stack.block_udp_between_nodes()
    try:
        async with node_for(stack, tmp / "state", "py-derpdrop") as node:
            for ts in stack.tailscaleds:
                await warm_up(node, ts.name)
                await wait_path(node, ts.name, "derp")
            stop = trio.Event()
            transfers = [Transfer(ts.name, 0, window=DERP_WINDOW, until=stop) for ts in stack.tailscaleds]
            dropped: list[tuple[float, int]] = []
            idle: list[float] = []  # when DERP had carried nothing for 15 s, so there was nothing to drop
            start = time.monotonic()

            async def dropper() -> None:
                while len(dropped) < drops and len(idle) < 3:
                    await trio.sleep(every)
                    port = await trio.to_thread.run_sync(stack.drop_derp_connection)
                    now = round(time.monotonic() - start, 1)
                    if port is None:
                        idle.append(now)
                        logging.getLogger("trionet.test").warning("no DERP traffic for 15 s at %.1f s", now)
                    else:
                        dropped.append((now, port))
                        logging.getLogger("trionet.test").warning("dropped DERP connection :%d", port)
                await trio.sleep(every)
                stop.set()

            with trio.fail_after(120 + drops * every * 3):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(dropper)
                    for t in transfers:
                        nursery.start_soon(t.run, node)
            derp = node.statistics()["magicsock"]["derp"]
            result = {"impairment": "DERP only; DERP connection aborted (ss -K)", "drops": len(dropped),
                      "dropped_at_s": dropped, "no_traffic_15s_at": idle,
                      "transfers": [t.figures() for t in transfers],
                      "bytes_verified_each_way": sum(t.received for t in transfers),
                      "derp": {r: {k: v for k, v in d.items() if k in ("reconnects", "connect_attempts",
                                                                     "closed_transport_error", "last_error")}
                               for r, d in derp.items()},
                      "max_stall_s": max(t.max_stall for t in transfers)}
    finally:
        stack.unblock_udp()
        trionet_log.removeHandler(handler)
        trionet_log.setLevel(old_level)
        handler.close()
    print(f"\nderp drops: {result}")
    log_lines = (tmp / "trionet.log").read_text(errors="replace").splitlines()
    print("trionet log (last 40 lines):\n" + "\n".join(log_lines[-40:]))
    if still_for_15s_fails:  # the transfer completes either way; a 15 s standstill is a finding
        assert not idle, f"the transfer stood still for 15 s at {idle} s: {result}"
    assert len(dropped) == drops, result
    assert all(t["verified"] and t["reset"] is None for t in result["transfers"]), result
    assert sum(d.get("reconnects", 0) for d in result["derp"].values()) >= drops, result
    return result


async def test_derp_drops(istack: Stack, tmp_path: Path) -> None:
    # Only completion is asserted here: trionet's TCP over DERP can back off for 10+ s
    # (see the long variant, which fails on a 15 s standstill).
    await derp_drop_transfer(istack, tmp_path, drops=3, every=4.0, still_for_15s_fails=False)


# ------------------------------------------------------------------ long runs


@pytest.mark.soak
async def test_derp_drops_long(istack: Stack, tmp_path: Path) -> None:
    await derp_drop_transfer(istack, tmp_path, drops=20, every=6.0)


@pytest.mark.soak
async def test_loss_long(istack: Stack, tmp_path: Path) -> None:
    await loss_transfer(istack, tmp_path, 20 * MB)


@pytest.mark.soak
async def test_delay_and_loss_long(istack: Stack, tmp_path: Path) -> None:
    # both at once: 100 ms RTT and 5% loss each way leave about 50 KB/s, so 5 MiB
    await delay_transfer(istack, tmp_path, 5 * MB, loss=5)

