"""Exit nodes, subnet routes, tags and Headscale's health probe against real Headscale and tailscaled.

The "internet" is a namespace reachable only from the exit node ts1's namespace
(tests/integration/routed_hosts.py), holding a TEST-NET address, and a name for
it that only ts1's resolver knows. trionet reaches both only through ts1.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.integration.routed_hosts import (
    PUBLIC_IP,
    WEB_PORT,
    DnsServer,
    FileServer,
    UdpEcho,
    add_routed_host,
    approve_routes,
    free_port,
    wait_until,
)
from tests.integration.test_node import Daemon, curl
from tests.realstack import HEADSCALE_VERSIONS, REPO, Stack, run
from trionet import Node
from trionet.errors import TransportError
from trionet.routes import NoRouteError, RouteKind

pytestmark = [pytest.mark.integration, pytest.mark.netns]

OUTSIDE_NAME = "web.outside.test"
TAG = "tag:trionet"


def policy(version: str) -> str:
    """Allow everything; let our user (alice) own TAG. 0.23 names users bare, 0.26+ as "alice@"."""
    owner = "alice" if version == "0.23.0" else "alice@"
    return json.dumps({"tagOwners": {TAG: [owner]},
                       "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})


@attrs.define
class ExitLab:
    stack: Stack
    web: FileServer
    dns: DnsServer


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def exit_lab(request: pytest.FixtureRequest) -> Iterator[ExitLab]:
    """ts1 is an approved exit node; behind it, PUBLIC_IP serves /blob and OUTSIDE_NAME names it."""
    stack = Stack(request.param, policy=policy(request.param))
    servers: list[Any] = []
    try:
        stack.start(tailscaleds=1)
        ts1 = stack.tailscaleds[0]
        inet = add_routed_host(stack, "inet", PUBLIC_IP, [ts1], f"{PUBLIC_IP}/32")
        web = FileServer(stack, inet).start()
        servers.append(web)
        servers.append(UdpEcho(inet).start())
        dns = DnsServer(stack, ts1, {OUTSIDE_NAME: PUBLIC_IP}).start()
        servers.append(dns)
        ts1.cli("set", "--advertise-exit-node")
        approve_routes(stack, ts1, ["0.0.0.0/0", "::/0"])
        yield ExitLab(stack, web, dns)
    finally:
        for server in servers:
            server.stop()
        stack.stop()


def _daemon(stack: Stack, state: Path, hostname: str, *extra: str) -> Daemon:
    return Daemon(stack, state, *extra, hostname=hostname)


def _sha_via(tmp_path: Path, name: str, *curl_args: str) -> tuple[int, str, bytes]:
    out = tmp_path / name
    got = curl("-o", str(out), *curl_args)
    digest = hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else ""
    return got.returncode, digest, got.stderr


def test_exit_node_through_socks5_and_http_proxy_then_cleared(exit_lab: ExitLab, tmp_path: Path) -> None:
    stack, web = exit_lab.stack, exit_lab.web
    socks, http = free_port(), free_port()
    daemon = _daemon(stack, tmp_path / "state", "py-exit", "--exit-node", "ts1", "--socks5", str(socks),
                     "--http-proxy", str(http))
    try:
        daemon.wait_running()
        st = daemon.status()
        assert st["exit_node"]["usable"] and st["exit_node"]["name"].startswith("ts1"), st["exit_node"]
        assert st["exit_node"]["dns"], st["exit_node"]  # ts1 offers its peer API DoH
        text = daemon.cli("status").stdout
        assert "exit node: ts1" in text and "in use" in text, text

        by_ip = _sha_via(tmp_path, "by-ip", "--socks5-hostname", f"127.0.0.1:{socks}",
                         f"http://{PUBLIC_IP}:{WEB_PORT}/blob")
        assert by_ip[:2] == (0, web.blob_sha256), by_ip[2]
        by_name = _sha_via(tmp_path, "by-name", "--socks5-hostname", f"127.0.0.1:{socks}",
                           f"http://{OUTSIDE_NAME}:{WEB_PORT}/blob")
        assert by_name[:2] == (0, web.blob_sha256), by_name[2]
        asked = exit_lab.dns.questions()
        assert {"name": OUTSIDE_NAME + ".", "type": "A"} in asked, asked  # answered by ts1's own resolver
        via_http = _sha_via(tmp_path, "via-http", "-x", f"http://127.0.0.1:{http}",
                            f"http://{OUTSIDE_NAME}:{WEB_PORT}/blob")
        assert via_http[:2] == (0, web.blob_sha256), via_http[2]

        cleared = daemon.cli("set", "--exit-node", "")
        assert cleared.returncode == 0, cleared.stderr
        assert daemon.status()["exit_node"] is None
        failed = curl("--socks5-hostname", f"127.0.0.1:{socks}", f"http://{PUBLIC_IP}:{WEB_PORT}/blob")
        assert failed.returncode != 0 and b"timed out" not in failed.stderr, failed.stderr
        refused = curl("-x", f"http://127.0.0.1:{http}", f"http://{PUBLIC_IP}:{WEB_PORT}/blob")
        assert b"no exit node is selected" in refused.stdout, refused.stdout + refused.stderr
        unnamed = curl("-x", f"http://127.0.0.1:{http}", f"http://{OUTSIDE_NAME}:{WEB_PORT}/blob")
        told = b"cannot resolve 'web.outside.test': not a tailnet name, and no DNS resolver"
        assert told in unnamed.stdout, unnamed.stdout
        failures = daemon.status()["stats"]["attached"]["socks5"]["failed"]
        assert failures.get("no_route", 0) >= 1, failures

        bad = daemon.cli("set", "--exit-node", "no-such-node")
        assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0, bad.stderr
        assert "invalid value 'no-such-node' for --exit-node" in bad.stderr, bad.stderr
        again = daemon.cli("set", "--exit-node", "ts1")
        assert again.returncode == 0, again.stderr
        by_ip = _sha_via(tmp_path, "again", "--socks5-hostname", f"127.0.0.1:{socks}",
                         f"http://{PUBLIC_IP}:{WEB_PORT}/blob")
        assert by_ip[:2] == (0, web.blob_sha256), by_ip[2]
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_up_with_an_unknown_exit_node_fails_in_one_line(exit_lab: ExitLab, tmp_path: Path) -> None:
    stack = exit_lab.stack
    keyfile = tmp_path / "key"
    keyfile.write_text(stack.preauth_key())
    proc = subprocess.run(
        [sys.executable, "-m", "trionet", "up", "--login-server", stack.server_url, "--authkey", f"file:{keyfile}",
         "--state-dir", str(tmp_path / "state"), "--hostname", "py-bad-exit", "--ca-file", str(stack.ca_file),
         "--udp-bind", stack.local_ip, "--exit-node", "no-such-node"],
        capture_output=True, text=True, timeout=90, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    error = "invalid value 'no-such-node' for --exit-node; must be IP or peer hostname"
    assert lines[-1] == f"trionet: {error}", lines  # told once, last; the lines before are progress
    assert proc.stderr.count(error) == 1 and "Running" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


async def _get_sha(node: Node, host: str) -> str:
    stream = await node.open_tcp_stream(host, WEB_PORT)
    await stream.send_all(f"GET /blob HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = bytearray()
    with trio.fail_after(60):
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    await stream.aclose()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    return hashlib.sha256(body).hexdigest()


async def test_library_exit_node_follows_it_offline_and_back(exit_lab: ExitLab, tmp_path: Path) -> None:
    stack, web = exit_lab.stack, exit_lab.web
    ts1 = stack.tailscaleds[0]
    ts1_ip = await trio.to_thread.run_sync(ts1.ip4)
    async with Node(login_server=stack.server_url, auth_key=stack.preauth_key(), state_dir=tmp_path,
                    hostname="py-exit-lib", ca_file=stack.ca_file, udp_bind=stack.local_ip,
                    exit_node=ts1_ip) as node:
        assert await _get_sha(node, OUTSIDE_NAME) == web.blob_sha256
        assert await _get_sha(node, PUBLIC_IP) == web.blob_sha256
        assert node.statistics()["dns"]["exit_node_doh_answers"] >= 1  # the name came from ts1's DoH
        # UDP out through the exit node; the reply from an internet address passes WireGuard's
        # source check (ts1 owns /0) and the packet filter (our outbound flow)
        udp = await node.open_udp()
        with trio.fail_after(20):
            while True:  # the echo server may still be starting
                await udp.send_to(b"ping", PUBLIC_IP, 9999)
                with trio.move_on_after(1):
                    data, src = await udp.receive_from()
                    break
        assert (data, src) == (b"echo:ping", (PUBLIC_IP, 9999))
        udp.close()

        await trio.to_thread.run_sync(stack.stop_tailscaled, ts1)
        try:
            with trio.fail_after(60):
                while node.routing_status()["exit_node"]["usable"]:
                    await trio.sleep(0.2)
            assert "offline" in node.routing_status()["exit_node"]["problem"]
            with pytest.raises(NoRouteError, match="exit node ts1 is offline"):
                await node.open_tcp_stream(PUBLIC_IP, WEB_PORT)
        finally:
            await trio.to_thread.run_sync(stack.start_tailscaled, ts1)  # back with its state: same node
        with trio.fail_after(60):
            while not node.routing_status()["exit_node"]["usable"]:
                await trio.sleep(0.2)
        with trio.fail_after(60):
            while True:  # ts1's new WireGuard session and netstack take a moment
                with trio.move_on_after(10):
                    try:
                        assert await _get_sha(node, PUBLIC_IP) == web.blob_sha256
                        break
                    except (TransportError, trio.BrokenResourceError):
                        pass
                await trio.sleep(0.5)

        # --exit-node-allow-lan-access: this host's LAN (the test LAN, on our veth leg) is dialed from
        # the host, not through ts1 (which would drop it: an exit node forwards no private ranges)
        hs_ip = ipaddress.ip_address(stack.hs_host.ip)
        assert node.routes.route(hs_ip).kind is RouteKind.PEER  # without it: to the exit node, as tailscaled
        node.set(exit_node_allow_lan_access=True)
        assert node.routes.route(hs_ip).kind is RouteKind.HOST
        with trio.fail_after(10):
            lan = await node.open_tcp_stream(stack.hs_host.ip, 8443)  # Headscale, straight over the LAN
        assert isinstance(lan, trio.SocketStream)
        await lan.aclose()
        node.set(exit_node_allow_lan_access=False)

        node.set_exit_node(None)
        with pytest.raises(NoRouteError, match="no exit node is selected"):
            await node.open_tcp_stream(PUBLIC_IP, WEB_PORT)


def test_advertise_tags(exit_lab: ExitLab, tmp_path: Path) -> None:
    """0.23 tags the node from Hostinfo.RequestTags when tagOwners allow its user; 0.28+ takes tags
    from a pre-auth key itself and refuses requested ones at registration (state.go)."""
    stack = exit_lab.stack
    daemon = _daemon(stack, tmp_path / "state", "py-tagged", "--advertise-tags", TAG)
    try:
        if stack.users_by_id:
            rc = daemon.proc.wait(90)
            out = daemon.log.read_text()
            assert rc == 2, out
            assert "refused --advertise-tags" in out and TAG in out, out
            return
        daemon.wait_running()
        node = wait_until(lambda: stack.node_by_hostname("py-tagged"), 30, "py-tagged in Headscale")
        assert TAG in (node.get("valid_tags") or []), node
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


SUBNET_HOST_IP_LAST = 10


def test_subnet_route_with_failover(make_stack: Any, tmp_path: Path) -> None:
    """ts1 and ts2 both route a subnet; trionet --accept-routes reaches a host in it through --forward
    and SOCKS5; when ts1 (the primary) goes, Headscale makes ts2 primary and traffic follows."""
    stack: Stack = make_stack(tailscaleds=2)
    ts1, ts2 = stack.tailscaleds
    subnet = f"10.215.{stack.subnet}.0/24"
    host_ip = f"10.215.{stack.subnet}.{SUBNET_HOST_IP_LAST}"
    host = add_routed_host(stack, "sub", host_ip, [ts1, ts2], subnet)
    web = FileServer(stack, host).start()
    forward, socks = free_port(), free_port()
    daemon = None
    try:
        for router in (ts1, ts2):
            router.cli("set", f"--advertise-routes={subnet}")
            approve_routes(stack, router, [subnet])
        daemon = _daemon(stack, tmp_path / "state", "py-subnet", "--accept-routes", "--socks5", str(socks),
                         "--forward", f"{forward}={host_ip}:{WEB_PORT}")
        daemon.wait_running()

        def routed_via() -> str:
            routes = daemon.status()["routes"]  # type: ignore[union-attr]
            return next((r["peer"] for r in routes if r["prefix"] == subnet), "")

        # Headscale 0.29's health probe (its debug page sends the PingRequest its HA prober sends):
        # answered with HEAD, as tailscaled answers it
        me = daemon.status()["self"]["id"]
        page = run([*stack.hs_host.exec_prefix(), "curl", "-sS", "--max-time", "40",
                    f"http://127.0.0.1:9090/debug/ping?node={me}"], timeout=60).stdout
        assert f"Node {me} responded in" in page, page[-2000:]
        assert daemon.status()["stats"]["control"]["ping_answered"] >= 1

        first = wait_until(routed_via, 30, f"trionet to accept {subnet}")
        assert first == "ts1", daemon.status()["routes"]  # the first approved router is primary
        got = _sha_via(tmp_path, "fwd", f"http://127.0.0.1:{forward}/blob")
        assert got[:2] == (0, web.blob_sha256), got[2]
        got = _sha_via(tmp_path, "socks", "--socks5-hostname", f"127.0.0.1:{socks}",
                       f"http://{host_ip}:{WEB_PORT}/blob")
        assert got[:2] == (0, web.blob_sha256), got[2]

        stack.stop_tailscaled(ts1)
        wait_until(lambda: routed_via() == "ts2", 90, "Headscale to move the primary route to ts2")

        def fetched() -> bool:
            result = _sha_via(tmp_path, "after", "--max-time", "10", f"http://127.0.0.1:{forward}/blob")
            return result[:2] == (0, web.blob_sha256)

        wait_until(fetched, 60, "the forward to work through ts2")
        got = _sha_via(tmp_path, "socks-after", "--socks5-hostname", f"127.0.0.1:{socks}",
                       f"http://{host_ip}:{WEB_PORT}/blob")
        assert got[:2] == (0, web.blob_sha256), got[2]
        daemon.stop()
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        web.stop()
