"""trionet as a subnet router and exit node, against real Headscale and tailscaled: what it
advertises is approved on Headscale and seen by a tailscaled peer, and the DNS an exit
node's clients ask through its peer API leads them to a fetch through it.

The forwarding itself (TCP, UDP, ICMP, refusals, policy) is tested in test_subnet_router.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.dns_upstream import UpstreamDns
from tests.integration.routed_hosts import (
    WEB_PORT,
    FileServer,
    add_routed_host,
    free_port,
    link_to_our_namespace,
    wait_until,
)
from tests.integration.test_node import Daemon
from tests.realstack import HEADSCALE_VERSIONS, Stack, run
from trionet import Node

pytestmark = [pytest.mark.integration, pytest.mark.netns]

SUBNET = "10.77.0.0/24"
HOST_ONLY_NAME = "only.trionet-host.test"  # known to trionet's host resolver alone
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
    """ts1 uses trionet as its exit node; a SOCKS5 fetch by name on ts1 asks trionet's peer API
    DoH, which asks trionet's host resolver (a test server on 127.0.0.1 given as
    host_resolvers), and the fetch goes through trionet to an "internet" host only our
    namespace reaches."""
    stack, ts1 = lab, lab.tailscaleds[0]
    internet_ip = f"203.0.113.{stack.subnet}"  # TEST-NET-3, per stack: our namespace's routes are shared
    host = add_routed_host(stack, "dnsweb", internet_ip, [], f"{internet_ip}/32")
    link_to_our_namespace(stack, host, internet_ip, f"{internet_ip}/32", link_base=208)
    web = FileServer(stack, host, WEB_PORT, blob_mb=4).start()
    resolver = UpstreamDns("127.0.0.1", {HOST_ONLY_NAME: internet_ip}, port=free_port()).start()
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
                out = tmp_path / "blob"

                def fetched_by_name() -> bool:
                    # until ts1 has taken us as its exit node the name does not resolve
                    got = run([*ts1.host.exec_prefix(), "curl", "-sS", "--max-time", "30", "--socks5-hostname",
                               f"127.0.0.1:{ts1.socks_port}", f"http://{HOST_ONLY_NAME}:{WEB_PORT}/blob",
                               "-o", str(out)], check=False, timeout=60)
                    return got.returncode == 0

                await trio.to_thread.run_sync(wait_until, fetched_by_name, 60,
                                              "ts1's fetch by a name only trionet's host resolver knows")
                assert hashlib.sha256(out.read_bytes()).hexdigest() == web.blob_sha256
                assert HOST_ONLY_NAME + "." in resolver.asked  # the name came through our peer API
                assert node.statistics()["forwarding"]["tcp_established"] >= 1
                stats = node.statistics()["peerapi"]
                assert stats["dns_answers"] >= 1 and stats.get("dns_denied", 0) == 0, stats
                # tailscaled's DoH client speaks HTTP/1.1 to a peer API (protocol-notes-next §22.5)
                assert stats.get("h2c_connections", 0) == 0, stats
            finally:
                await trio.to_thread.run_sync(lambda: ts1.cli("set", "--exit-node="))
    finally:
        resolver.stop()
        web.stop()
