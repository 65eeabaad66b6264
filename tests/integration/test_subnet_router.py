"""trionet as a subnet router, without root, against real Headscale and tailscaled.

trionet runs in the test's own namespace and advertises SUBNET, which only that
namespace reaches: a host namespace holding TARGET on its loopback, linked to our
namespace alone (the tailscaled peer's namespace has no route there). After
Headscale approves the route and ts1 accepts routes, ts1 reaches TARGET through
trionet: TCP through its own SOCKS5 (curl), UDP through its SOCKS5 UDP ASSOCIATE,
and ICMP echo with `tailscale ping --icmp` (which, for an address a peer routes,
sends a real echo request through the tunnel: tailscale wgengine Ping ->
sendICMPEchoRequest, LocalBackend.PeerForIP). The ACL policy allows SUBNET on
some ports only: a port it does not allow is dropped by trionet's packet filter
before any host dial.

Then trionet as an exit node (approved /0s): ts1 uses it to fetch from an
"internet" address only our namespace reaches, and a private address behind it
(10/8: not the internet for an exit node) is dropped by our filter.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.integration.routed_hosts import (
    FileServer,
    UdpEcho,
    add_routed_host,
    link_to_our_namespace,
    wait_until,
)
from tests.integration.test_node import Daemon
from tests.realstack import HEADSCALE_VERSIONS, Stack, Tailscaled

pytestmark = [pytest.mark.integration, pytest.mark.netns]

WEB_PORT = 8080  # allowed by the policy: the 50 MB blob
DENIED_PORT = 8081  # served too, but the policy does not allow it
CLOSED_PORT = 8082  # allowed, nothing listens
UDP_PORT = 9999
BLOB_MB = 50


def subnet_of(stack: Stack) -> str:
    return f"10.216.{stack.subnet}.0/24"


def target_of(stack: Stack) -> str:
    return f"10.216.{stack.subnet}.10"


def policy(version: str, subnet: str) -> str:
    """The tailnet talks freely; SUBNET only on the web, closed and UDP ports (ICMP is
    allowed with any port rule: tailscale's filter passes echo requests a rule names)."""
    owner = "alice" if version == "0.23.0" else "alice@"
    return json.dumps({
        "tagOwners": {"tag:router": [owner]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["100.64.0.0/10:*"]},
                 {"action": "accept", "src": ["*"], "dst": [f"{subnet}:{WEB_PORT},{CLOSED_PORT},{UDP_PORT}"]}]})


@attrs.define
class RouterLab:
    stack: Stack
    ts1: Tailscaled
    daemon: Daemon
    web: FileServer
    target: str
    subnet: str


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterLab]:
    stack = Stack(request.param)
    subnet, target = subnet_of(stack), target_of(stack)
    stack.policy_path.parent.mkdir(parents=True, exist_ok=True)
    stack.policy_path.write_text(policy(request.param, subnet))
    servers: list[Any] = []
    daemon: Daemon | None = None
    try:
        stack.start(tailscaleds=1)
        ts1 = stack.tailscaleds[0]
        host = add_routed_host(stack, "sub", target, [], subnet)  # a namespace, no tailscaled links
        link_to_our_namespace(stack, host, target, subnet)
        # (both serve the host's one directory: the web server's blob, written last, is the one)
        servers.append(FileServer(stack, host, DENIED_PORT, blob_mb=1).start())
        web = FileServer(stack, host, WEB_PORT, blob_mb=BLOB_MB).start()
        servers += [web, UdpEcho(host, UDP_PORT).start()]
        state = tmp_path_factory.mktemp("router") / "state"
        daemon = Daemon(stack, state, "--advertise-routes", subnet, hostname="py-router")
        daemon.wait_running()
        stack.approve_routes("py-router", [subnet])
        ts1.cli("set", "--accept-routes")

        def routed() -> bool:
            peers = ts1.status().get("Peer", {}).values()
            return any(subnet in (p.get("PrimaryRoutes") or []) for p in peers)

        wait_until(routed, 60, f"ts1 to route {subnet} to trionet")
        yield RouterLab(stack, ts1, daemon, web, target, subnet)
        daemon.stop()
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        for server in servers:
            server.stop()
        stack.stop()


def in_ts1(lab: RouterLab, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*lab.ts1.host.exec_prefix(), *cmd], capture_output=True, timeout=timeout)


def curl_via_ts1(lab: RouterLab, *args: str, max_time: int = 60) -> subprocess.CompletedProcess[bytes]:
    return in_ts1(lab, "curl", "-sS", "--max-time", str(max_time), "--socks5", f"127.0.0.1:{lab.ts1.socks_port}",
                  *args)


def forwarding(lab: RouterLab) -> dict[str, Any]:
    stats: dict[str, Any] = lab.daemon.status()["stats"]["forwarding"]
    return stats


def test_tailscaled_fetches_50_mb_through_trionet(lab: RouterLab, tmp_path: Path) -> None:
    direct = in_ts1(lab, "curl", "-sS", "--max-time", "3", f"http://{lab.target}:{WEB_PORT}/blob", "-o", "/dev/null")
    assert direct.returncode != 0  # ts1's namespace has no route of its own to the subnet
    out = tmp_path / "blob"
    got = curl_via_ts1(lab, f"http://{lab.target}:{WEB_PORT}/blob", "-o", str(out), max_time=300)
    assert got.returncode == 0, got.stderr
    assert out.stat().st_size == BLOB_MB << 20
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.web.blob_sha256
    stats = forwarding(lab)
    assert stats["tcp_established"] >= 1 and stats["bytes_to_peer"] >= BLOB_MB << 20, stats


def test_closed_port_is_refused_at_once(lab: RouterLab) -> None:
    before = forwarding(lab).get("tcp_refused", 0)
    start = time.monotonic()
    got = curl_via_ts1(lab, f"http://{lab.target}:{CLOSED_PORT}/", max_time=20)
    elapsed = time.monotonic() - start
    assert got.returncode != 0 and elapsed < 5, (elapsed, got.stderr)
    assert forwarding(lab).get("tcp_refused", 0) == before + 1


def test_port_the_policy_does_not_allow_is_dropped_before_any_dial(lab: RouterLab) -> None:
    before = forwarding(lab).get("tcp_attempts", 0)
    got = curl_via_ts1(lab, f"http://{lab.target}:{DENIED_PORT}/blob", "-o", "/dev/null", max_time=5)
    assert got.returncode != 0
    st = lab.daemon.status()["stats"]
    assert st["forwarding"].get("tcp_attempts", 0) == before  # the filter dropped the SYNs
    assert st["node"].get("drop.filtered", 0) >= 1, st["node"]


UDP_CLIENT = r"""
import socket, struct, sys
target, port, socks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctl = socket.create_connection(("127.0.0.1", socks), timeout=10)
ctl.sendall(b"\x05\x01\x00"); assert ctl.recv(2) == b"\x05\x00"
ctl.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
reply = ctl.recv(10); assert reply[1] == 0, reply
relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.settimeout(1)
head = b"\x00\x00\x00\x01" + socket.inet_aton(target) + struct.pack("!H", port)
answers = []
for i in range(5):
    for _ in range(10):
        udp.sendto(head + b"dg%d" % i, relay)
        try:
            got = udp.recv(2048)
        except TimeoutError:
            continue
        answers.append(got[10:].decode())
        break
print(" ".join(answers))
"""


def test_udp_datagrams_round_trip(lab: RouterLab) -> None:
    got = in_ts1(lab, sys.executable, "-c", UDP_CLIENT, lab.target, str(UDP_PORT), str(lab.ts1.socks_port))
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode().split() == [f"echo:dg{i}" for i in range(5)], got.stdout
    stats = forwarding(lab)
    assert stats.get("udp_flows", 0) >= 1 and stats["udp_open"] >= 1, stats
    flows = lab.daemon.status()["forwarding"]["flows"]
    assert any(f["proto"] == "udp" and f["dst"] == f"{lab.target}:{UDP_PORT}" for f in flows), flows


def test_icmp_echo_is_answered_for_a_host_that_answers_and_not_otherwise(lab: RouterLab) -> None:
    ping = lab.ts1.cli("ping", "--icmp", "--c", "3", "--timeout", "5s", lab.target, check=False)
    assert "pong from" in ping.stdout and "via ICMP" in ping.stdout, ping.stdout + ping.stderr
    before = forwarding(lab)
    nobody = lab.target.rsplit(".", 1)[0] + ".99"  # in the subnet, but no host has it
    silent = lab.ts1.cli("ping", "--icmp", "--c", "1", "--timeout", "5s", nobody, check=False)
    assert "pong" not in silent.stdout, silent.stdout
    after = forwarding(lab)
    assert after["icmp_echo_answered"] >= 1 and after.get("icmp_echo_failed", 0) > before.get("icmp_echo_failed", 0)


# ------------------------------------------------------------------ exit node

@attrs.define
class ExitLab:
    stack: Stack
    ts1: Tailscaled
    daemon: Daemon
    web: FileServer
    internet_ip: str
    private_ip: str  # an address our namespace reaches but a /0 does not cover (10/8)


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def exit_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExitLab]:
    """trionet offers an exit node (approved); ts1 uses it. The "internet" is one TEST-NET
    address only our namespace reaches; the allow-all policy leaves it to the exit node."""
    owner = "alice" if request.param == "0.23.0" else "alice@"
    stack = Stack(request.param, policy=json.dumps({"tagOwners": {"tag:router": [owner]},
                                                   "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}))
    internet_ip = f"198.51.100.{stack.subnet}"  # per stack: our namespace's routes are shared
    servers: list[Any] = []
    daemon: Daemon | None = None
    try:
        stack.start(tailscaleds=1)
        ts1 = stack.tailscaleds[0]
        host = add_routed_host(stack, "inet", internet_ip, [], f"{internet_ip}/32")
        link_to_our_namespace(stack, host, internet_ip, f"{internet_ip}/32", link_base=204)
        web = FileServer(stack, host, WEB_PORT, blob_mb=8).start()
        servers.append(web)
        state = tmp_path_factory.mktemp("exit") / "state"
        daemon = Daemon(stack, state, "--advertise-exit-node", hostname="py-exit")
        daemon.wait_running()
        stack.approve_routes("py-exit", ["0.0.0.0/0", "::/0"])
        ours = next(a.split("/")[0] for a in daemon.status()["self"]["addresses"] if "." in a)

        def exit_node_offered() -> bool:
            peers = ts1.status().get("Peer", {}).values()
            return any(p.get("ExitNodeOption") for p in peers)

        wait_until(exit_node_offered, 60, "ts1 to see trionet as an exit node")
        ts1.cli("set", f"--exit-node={ours}")
        yield ExitLab(stack, ts1, daemon, web, internet_ip, f"10.214.{stack.subnet}.206")
        daemon.stop()
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        for server in servers:
            server.stop()
        stack.stop()


def test_tailscaled_uses_trionet_as_exit_node(exit_lab: ExitLab, tmp_path: Path) -> None:
    lab = exit_lab
    out = tmp_path / "blob"
    got = subprocess.run([*lab.ts1.host.exec_prefix(), "curl", "-sS", "--max-time", "120", "--socks5",
                          f"127.0.0.1:{lab.ts1.socks_port}", f"http://{lab.internet_ip}:{WEB_PORT}/blob",
                          "-o", str(out)], capture_output=True)
    assert got.returncode == 0, got.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.web.blob_sha256
    st = lab.daemon.status()
    assert st["advertise"]["exit_node"], st["advertise"]  # (Headscale 0.29 may tell us of the approval late)
    assert st["stats"]["forwarding"]["tcp_established"] >= 1, st["stats"]["forwarding"]


def test_exit_node_does_not_forward_to_private_ranges(exit_lab: ExitLab) -> None:
    """An exit node is a guest wifi: 10/8 behind it (here our end of a veth link, which
    our namespace reaches) is not the internet, and is dropped before any dial."""
    lab = exit_lab
    before = lab.daemon.status()["stats"]
    got = subprocess.run([*lab.ts1.host.exec_prefix(), "curl", "-sS", "--max-time", "5", "--socks5",
                          f"127.0.0.1:{lab.ts1.socks_port}", f"http://{lab.private_ip}:{WEB_PORT}/"],
                         capture_output=True)
    assert got.returncode != 0
    after = lab.daemon.status()["stats"]
    assert after["forwarding"].get("tcp_attempts", 0) == before["forwarding"].get("tcp_attempts", 0)
    assert after["node"].get("drop.filtered", 0) > before["node"].get("drop.filtered", 0)  # ts1 sent, we dropped
