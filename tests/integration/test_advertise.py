"""trionet as a subnet router and exit node, against real Headscale and tailscaled: what it
advertises is approved on Headscale and seen by a tailscaled peer.

Forwarding the traffic itself is not tested here (the forwarder lives elsewhere); what is
proven is the advertising, the approval as both sides see it, and the DNS an exit node's
clients ask through its peer API.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.dns_upstream import UpstreamDns
from tests.integration.routed_hosts import free_port, wait_until
from tests.integration.test_node import Daemon
from tests.realstack import HEADSCALE_VERSIONS, Stack, run
from trionet import Node

pytestmark = [pytest.mark.integration, pytest.mark.netns]

SUBNET = "10.77.0.0/24"
HOST_ONLY_NAME = "only.trionet-host.test"  # known to trionet's host resolver alone
HOST_ONLY_IP = "192.0.2.77"
EXIT = ["0.0.0.0/0", "::/0"]
ALLOW_ALL = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def lab(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Headscale and one tailscaled (ts1), everything allowed."""
    stack = Stack(request.param, policy=ALLOW_ALL)
    try:
        stack.start(tailscaleds=1)
        yield stack
    finally:
        stack.stop()


def _peer_seen_by(ts: Any, hostname: str) -> dict[str, Any] | None:
    for peer in (ts.status().get("Peer") or {}).values():
        if peer.get("HostName") == hostname:
            return dict(peer)
    return None


def test_up_advertises_routes_and_an_exit_node_that_headscale_approves_and_tailscaled_sees(
        lab: Stack, tmp_path: Path) -> None:
    stack, ts1 = lab, lab.tailscaleds[0]
    hostname = "py-router"
    daemon = Daemon(stack, tmp_path / "state", "--advertise-routes", SUBNET, "--advertise-exit-node",
                    hostname=hostname)
    try:
        daemon.wait_running()
        # Headscale (0.23 too: it saves routes only from a lite update) lists them for approval
        wait_until(lambda: {SUBNET, *EXIT} <= stack.announced_routes(hostname), 30, "Headscale to list our routes")
        pending = daemon.status()["advertise"]
        assert pending["routes"] == [SUBNET] and pending["exit_node"], pending
        assert not pending["exit_node_approved"] and SUBNET in pending["pending"], pending

        stack.approve_routes(hostname, [SUBNET, *EXIT])
        assert {SUBNET, *EXIT} <= stack.approved_routes(hostname)

        def approved_here() -> dict[str, Any] | None:
            adv = daemon.status()["advertise"]
            return adv if adv["exit_node_approved"] and adv["approved_routes"] == [SUBNET] else None

        if stack.users_by_id:
            # Headscale 0.29 announces an approval to the other nodes only: the router's own
            # node (whose AllowedIPs say what is approved) comes with its next full map
            # (0.29.2 state.go SetApprovedRoutes sends a PolicyChange without OriginNode, so
            # batcher.go builds no self node; 0.26.1 sends everyone a full map only when a
            # primary moved). A restart of Headscale gives one.
            stack.restart_headscale()
        adv = wait_until(approved_here, 60, "trionet to see its routes approved")
        assert adv["pending"] == [], adv
        text = daemon.cli("status").stdout
        assert f"advertising: routes {SUBNET} (approved); exit node (approved)" in text, text

        # tailscaled: trionet is an exit-node option, and carries the subnet
        def seen() -> dict[str, Any] | None:
            peer = _peer_seen_by(ts1, hostname)
            return peer if peer and peer.get("ExitNodeOption") and SUBNET in (peer.get("PrimaryRoutes") or []) \
                else None

        peer = wait_until(seen, 30, "ts1 to see trionet as an exit node with the subnet")
        allowed = set(peer.get("AllowedIPs") or [])
        assert {SUBNET, *EXIT} <= allowed, peer
        listing = ts1.cli("exit-node", "list").stdout
        assert hostname in listing, listing

        # `set` takes the subnet back; Headscale and the peers follow
        assert daemon.cli("set", "--advertise-routes", "").returncode == 0
        wait_until(lambda: SUBNET not in stack.announced_routes(hostname), 30, "Headscale to drop the subnet")
        assert daemon.status()["advertise"]["routes"] == []
        ip = ipaddress.ip_network(SUBNET)
        assert ip not in [ipaddress.ip_network(r) for r in daemon.status()["advertise"]["pending"]]
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


async def test_a_tailscaled_client_of_the_exit_node_resolves_names_through_its_peer_api(
        lab: Stack, tmp_path: Path) -> None:
    """ts1 uses trionet as its exit node; a SOCKS5 dial by name on ts1 asks trionet's peer API
    DoH, which asks trionet's host resolver (a test server on 127.0.0.1 given as
    host_resolvers). The dial itself needs the forwarder; the name's journey does not."""
    stack, ts1 = lab, lab.tailscaleds[0]
    resolver = UpstreamDns("127.0.0.1", {HOST_ONLY_NAME: HOST_ONLY_IP}, port=free_port()).start()
    hostname = "py-exit-dns"
    try:
        async with Node(login_server=stack.server_url, auth_key=stack.preauth_key(), state_dir=tmp_path,
                        hostname=hostname, ca_file=stack.ca_file, udp_bind=stack.local_ip,
                        advertise_exit_node=True, host_resolvers=[f"127.0.0.1:{resolver.port}"]) as node:
            assert node.peerapi.services(), "the peer API listens on the netstack"
            await trio.to_thread.run_sync(stack.approve_routes, hostname, EXIT)
            my_ip = next(a.split("/")[0] for a in node.status()["self"]["addresses"] if "." in a)

            def offered() -> dict[str, Any] | None:
                peer = _peer_seen_by(ts1, hostname)
                return peer if peer and peer.get("ExitNodeOption") else None

            await trio.to_thread.run_sync(wait_until, offered, 30, "ts1 to see trionet as an exit node")
            await trio.to_thread.run_sync(lambda: ts1.cli("set", f"--exit-node={my_ip}"))
            try:
                def resolved_through_us() -> bool:
                    # the fetch fails without a forwarder; the name must have come through us
                    run([*ts1.host.exec_prefix(), "curl", "-sS", "--max-time", "5", "--socks5-hostname",
                         f"127.0.0.1:{ts1.socks_port}", f"http://{HOST_ONLY_NAME}/"], check=False, timeout=20)
                    return HOST_ONLY_NAME + "." in resolver.asked

                await trio.to_thread.run_sync(wait_until, resolved_through_us, 60,
                                              "ts1's name lookup to reach trionet's host resolver")
                stats = node.statistics()["peerapi"]
                assert stats["dns_answers"] >= 1 and stats.get("dns_denied", 0) == 0, stats
                # tailscaled's DoH client speaks HTTP/1.1 to a peer API (protocol-notes-next §22.5)
                assert stats.get("h2c_connections", 0) == 0, stats
            finally:
                await trio.to_thread.run_sync(lambda: ts1.cli("set", "--exit-node="))
    finally:
        resolver.stop()
