"""Several DERP regions: Headscale's embedded one (999, "hs") and a real derper (900, "d2").

trionet measures both, picks its home by latency, reports it so tailscaled
peers learn it, moves when the home region goes silent, and reaches peers
homed in the other region through that region (UDP between nodes blocked, so
DERP is the only path; transfers checked by sha256). Two tailscaled peers:
ts1 homed in 999 (its STUN to derper is dropped), ts2 homed in 900 (its STUN
to Headscale is dropped). See derp_regions.py for the stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.derp_regions import (
    DERPER_CODE,
    DERPER_REGION,
    EMBEDDED_CODE,
    EMBEDDED_REGION,
    TwoRegionStack,
)
from tests.integration.services import PeerServices
from tests.integration.test_node import http_get_sha
from tests.realstack import HEADSCALE_VERSIONS, Tailscaled, wait_for
from trionet import Node

pytestmark = [pytest.mark.integration, pytest.mark.netns]


class Regions:
    def __init__(self, stack: TwoRegionStack) -> None:
        self.stack = stack
        self.ts1 = stack.add_tailscaled_homed(EMBEDDED_REGION, "ts1")
        self.ts2 = stack.add_tailscaled_homed(DERPER_REGION, "ts2")
        stack.wait_mesh()
        wait_for(lambda: stack.own_home_code(self.ts1) == EMBEDDED_CODE
                 and stack.own_home_code(self.ts2) == DERPER_CODE, 30, "ts1 homed in hs, ts2 in d2")
        self.svc1 = PeerServices(stack, self.ts1, blob_mb=4).start()
        self.svc2 = PeerServices(stack, self.ts2, blob_mb=4).start()

    def stop(self) -> None:
        self.svc1.stop()
        self.svc2.stop()


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def regions(request: pytest.FixtureRequest) -> Iterator[Regions]:
    stack = TwoRegionStack(request.param)
    try:
        stack.start(tailscaleds=0)
        env = Regions(stack)
        try:
            yield env
        finally:
            env.stop()
    finally:
        stack.stop()


def make_node(stack: TwoRegionStack, state: Path, hostname: str) -> Node:
    return Node(login_server=stack.server_url, auth_key=stack.preauth_key(), state_dir=state,
                hostname=hostname, ca_file=stack.ca_file, udp_bind=stack.local_ip)


def derp(node: Node) -> dict[str, Any]:
    status = node.status()["derp"]
    status["by_id"] = {r["id"]: r for r in status["regions"]}
    return dict(status)


async def until(predicate: Any, timeout: float, what: str) -> Any:
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if result:
                return result
            await trio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def peer_sees_our_home(stack: TwoRegionStack, peer: Tailscaled, node: Node, code: str) -> None:
    me = node.status()["node_key"]
    await trio.to_thread.run_sync(lambda: wait_for(
        lambda: stack.home_code_of_peer(peer, me) == code, 60, f"{peer.name} to see our home {code}"))


async def fetch(node: Node, peer: str, svc: PeerServices) -> None:
    stream = await node.open_tcp_stream(peer, svc.http_port)
    with trio.fail_after(120):
        size, digest = await http_get_sha(stream, "/blob")
    await stream.aclose()
    assert (size, digest) == (svc.blob_size, svc.blob_sha256)


def derp_packets(node: Node, region: int, key: str) -> int:
    assert node.magic is not None
    conn = node.magic.derps.get(region)
    return int(conn.statistics().get(key, 0)) if conn is not None else 0


async def test_home_is_the_faster_region_and_peers_in_both_regions_are_reached(
        regions: Regions, tmp_path: Path) -> None:
    """Our STUN to Headscale's region is slowed by 100 ms each way: derper's region is
    home, with a latency for both in status; tailscaled peers learn it; DERP-only
    transfers reach ts1 (homed in the other region) and ts2 (homed in ours)."""
    stack = regions.stack
    stack.slow_stun_from_us(EMBEDDED_REGION, delay=0.1)
    stack.derp_only()
    try:
        async with make_node(stack, tmp_path, "py-regions") as node:
            await until(lambda: derp(node)["home"] == DERPER_REGION, 30, "home in region 900")
            status = await until(lambda: (s := derp(node))["by_id"][EMBEDDED_REGION]["latency_ms"] is not None
                                 and s["by_id"][DERPER_REGION]["latency_ms"] is not None and s, 60,
                                 "a latency for both regions")
            assert status["by_id"][DERPER_REGION]["home"] and not status["by_id"][EMBEDDED_REGION]["home"]
            assert status["by_id"][EMBEDDED_REGION]["code"] == EMBEDDED_CODE
            assert status["last_netcheck"] is not None and status["udp"] is True
            await until(lambda: derp(node)["by_id"][DERPER_REGION]["link"] == "connected", 30, "home link up")
            assert node.status()["home_derp"] == DERPER_REGION

            # Headscale passed our PreferredDERP on: both peers address us in region d2.
            await peer_sees_our_home(stack, regions.ts1, node, DERPER_CODE)
            await peer_sees_our_home(stack, regions.ts2, node, DERPER_CODE)
            peers = {p["hostname"]: p for p in node.peers()}
            assert peers["ts1"]["home_derp"] == EMBEDDED_REGION and peers["ts2"]["home_derp"] == DERPER_REGION

            # ts1 lives in the other region and has not heard from us: to reach us it
            # dials our home region, as Headscale told it.
            got_900 = derp_packets(node, DERPER_REGION, "packets_in")
            out = await ping_from(regions.ts1, node)
            assert f"via DERP({DERPER_CODE})" in out, out
            assert derp_packets(node, DERPER_REGION, "packets_in") > got_900
            # We reach ts1 through its home region (it answers on the link we came in by).
            sent_999 = derp_packets(node, EMBEDDED_REGION, "packets_out")
            await fetch(node, "ts1", regions.svc1)
            assert [p for p in node.peers() if p["hostname"] == "ts1"][0]["path"] == f"derp {EMBEDDED_REGION}"
            assert derp_packets(node, EMBEDDED_REGION, "packets_out") > sent_999 + 100
            # ts2 shares our home region.
            await fetch(node, "ts2", regions.svc2)
            assert [p for p in node.peers() if p["hostname"] == "ts2"][0]["path"] == f"derp {DERPER_REGION}"
    finally:
        stack.stop_relay(f"slow-{EMBEDDED_REGION}")
        stack.clear_rules("derp-only")


async def test_home_moves_when_the_home_region_goes_silent(regions: Regions, tmp_path: Path) -> None:
    """Home in 900 (our STUN to 999 dropped); then 999 answers again and everything between
    us and derper is dropped: while traffic flows, the next netcheck finds the home silent
    and moves to 999, Headscale tells ts1, and DERP-only transfers to ts1 go on."""
    stack = regions.stack
    stack.block_stun(stack.local_ip, EMBEDDED_REGION)
    stack.derp_only()
    try:
        async with make_node(stack, tmp_path, "py-move") as node:
            await until(lambda: derp(node)["home"] == DERPER_REGION, 30, "home in region 900")
            assert derp(node)["by_id"][EMBEDDED_REGION]["latency_ms"] is None  # its STUN is dropped
            await peer_sees_our_home(stack, regions.ts1, node, DERPER_CODE)
            await fetch(node, "ts1", regions.svc1)

            stack.clear_rules(f"stun-{stack.local_ip}-{EMBEDDED_REGION}")
            stack.block_region(stack.local_ip, DERPER_REGION)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_busy, node, regions.svc1)  # periodic netchecks run while active
                await until(lambda: derp(node)["home"] == EMBEDDED_REGION, 120, "home moved to region 999")
                nursery.cancel_scope.cancel()
            status = derp(node)
            assert status["home_changes"] >= 1
            assert status["by_id"][DERPER_REGION]["latency_ms"] is None
            await peer_sees_our_home(stack, regions.ts1, node, EMBEDDED_CODE)
            await fetch(node, "ts1", regions.svc1)
            out = await ping_from(regions.ts1, node)
            assert f"via DERP({EMBEDDED_CODE})" in out, out
    finally:
        stack.clear_rules(f"stun-{stack.local_ip}-{EMBEDDED_REGION}", f"region-{stack.local_ip}-{DERPER_REGION}",
                          "derp-only")


async def ping_from(peer: Tailscaled, node: Node) -> str:
    """tailscaled's disco ping to us: its output names the DERP region it went through."""
    ip = node.status()["self"]["addresses"][0].split("/")[0]
    done = await trio.to_thread.run_sync(lambda: peer.cli("ping", "--c=3", "--timeout=5s", ip, check=False))
    return str(done.stdout + done.stderr)


async def keep_busy(node: Node, svc: PeerServices) -> None:
    """Small requests to ts1, one a second: the node counts as active."""
    while True:
        with trio.move_on_after(5):
            try:
                stream = await node.open_tcp_stream("ts1", svc.http_port)
                await stream.send_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                while await stream.receive_some(65536):
                    pass
                await stream.aclose()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass
        await trio.sleep(1)
