"""MagicDNS against real Headscale (both versions) and a real tailscaled.

Headscale is configured with MagicDNS, an extra record inside the base domain
and one outside it, and a global nameserver: `UpstreamDns`, run by the test on
our end of the test LAN, which alone knows `outside.example.test`. trionet runs
with `--dns 127.0.0.1:PORT`; `dig` asks it for a tailnet FQDN, a short name,
the extra records, reverse names and the outside name; ts1 (tailscaled,
`--accept-dns`) answers the same questions through its own quad-100
(`tailscale dns query`) and the answers must match. Then SOCKS5 clients reach
ts1 by short name and by FQDN (sha256-checked), and ask 100.100.100.100 inside
trionet's netstack through SOCKS5 UDP ASSOCIATE.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.integration.dns_upstream import UpstreamDns
from tests.integration.services import PeerServices, sha256_file
from tests.integration.test_node import Daemon, curl
from tests.realstack import HEADSCALE_VERSIONS, Stack, wait_for
from trionet.proxy import socks5

pytestmark = [pytest.mark.integration, pytest.mark.netns]

BASE = "ts.test"
PRINTER = ("printer.ts.test", "100.64.100.7")  # an extra record in our zone
GRAFANA = ("grafana.internal.test", "100.64.100.8")  # and one outside it
OUTSIDE = ("outside.example.test", "192.0.2.80")  # only the upstream knows it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Env:
    def __init__(self, stack: Stack, upstream: UpstreamDns, daemon: Daemon, services: PeerServices,
                 dns_port: int, socks_port: int) -> None:
        self.stack, self.upstream, self.daemon, self.services = stack, upstream, daemon, services
        self.dns_port, self.socks_port = dns_port, socks_port
        self.ts1, self.ts2 = stack.tailscaleds

    def dig(self, *args: str) -> str:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(self.dns_port), "+time=5", "+tries=1", *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def short(self, *args: str) -> list[str]:
        return self.dig("+short", *args).split()

    def ours(self, name: str, rdtype: str) -> tuple[str, list[tuple[str, int, str]]]:
        """Our answer over TCP: rcode and (type, TTL, data) of each answer record."""
        query = dns.message.make_query(name, rdtype)
        reply = dns.query.tcp(query, "127.0.0.1", port=self.dns_port, timeout=10)
        return (dns.rcode.to_text(reply.rcode()),
                sorted((dns.rdatatype.to_text(r.rdtype), r.ttl, rd.to_text()) for r in reply.answer for rd in r))

    def tailscaled(self, name: str, rdtype: str) -> tuple[str, list[tuple[str, int, str]]]:
        """ts1's quad-100 answer (`tailscale dns query --json`), in the same shape."""
        out = self.ts1.cli("dns", "query", "--json", name, rdtype)
        data = json.loads(out.stdout)
        rcode = {"RCodeSuccess": "NOERROR", "RCodeNameError": "NXDOMAIN", "RCodeServerFailure": "SERVFAIL",
                 "RCodeNotImplemented": "NOTIMP", "RCodeRefused": "REFUSED"}[data["ResponseCode"]]
        answers = sorted((a["Type"].removeprefix("Type"), a["TTL"], a["Body"]) for a in data.get("Answers") or [])
        return rcode, answers


@pytest.fixture(scope="module", params=HEADSCALE_VERSIONS, ids=lambda v: f"hs{v}")
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    version = request.param
    stack = Stack(version)
    stack.dns = {
        "magic_dns": True, "base_domain": BASE,
        "override_local_dns": True,  # 0.26+: global nameservers become Resolvers (0.23 always does that)
        "nameservers": {"global": [stack.local_ip], "split": {}},  # our end of the LAN: UpstreamDns
        "extra_records": [{"name": PRINTER[0], "type": "A", "value": PRINTER[1]},
                          {"name": GRAFANA[0], "type": "A", "value": GRAFANA[1]}],
    }
    stack.start(tailscaleds=2)
    upstream = daemon = services = None
    try:
        upstream = UpstreamDns(stack.local_ip, {OUTSIDE[0]: OUTSIDE[1]}).start()
        stack.tailscaleds[0].cli("set", "--accept-dns=true")  # its quad-100 then uses Headscale's DNS config
        services = PeerServices(stack, stack.tailscaleds[0], blob_mb=1).start()
        dns_port, socks_port = free_port(), free_port()
        tmp = tmp_path_factory.mktemp(f"magicdns-{version}")
        daemon = Daemon(stack, tmp / "state", "--dns", f"127.0.0.1:{dns_port}", "--socks5", str(socks_port),
                        hostname="py-dns")
        daemon.wait_running()
        yield Env(stack, upstream, daemon, services, dns_port, socks_port)
        daemon.stop()
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        if services is not None:
            services.stop()
        if upstream is not None:
            upstream.stop()
        stack.stop()


def test_dig_answers_tailnet_names_extra_records_reverse_and_forwards_outside_names(env: Env) -> None:
    ts1_v4 = env.ts1.ip4()
    ts1_v6 = env.ts1.cli("ip", "-6").stdout.strip()
    assert env.short(f"ts1.{BASE}") == [ts1_v4]
    assert env.short("ts1") == [ts1_v4]  # the short name: MagicDNS is on
    assert env.short(f"TS1.{BASE.upper()}.") == [ts1_v4]
    assert env.short("+tcp", f"ts1.{BASE}") == [ts1_v4]
    assert env.short(PRINTER[0]) == [PRINTER[1]]
    assert env.short(GRAFANA[0]) == [GRAFANA[1]]
    assert env.short("-x", ts1_v4) == [f"ts1.{BASE}."]
    assert env.short("-x", ts1_v6) == [f"ts1.{BASE}."]
    assert env.short(f"ts1.{BASE}", "AAAA") == []  # a dual-stack peer: no AAAA without magicdns-aaaa
    assert "status: NOERROR" in env.dig(f"ts1.{BASE}", "AAAA")
    assert "status: NXDOMAIN" in env.dig(f"no-such-node.{BASE}")
    asked_before = len(env.upstream.asked)
    assert env.short(OUTSIDE[0]) == [OUTSIDE[1]]
    assert f"{OUTSIDE[0]}." in env.upstream.asked[asked_before:]  # forwarded, not made up
    assert "status: NXDOMAIN" in env.dig("nowhere.example.test")  # the upstream's NXDOMAIN, relayed
    status = env.daemon.status()["dns"]
    assert status["magic_dns"] is True and status["base_domain"] == BASE
    assert status["resolvers"] == [env.stack.local_ip] and status["extra_records"] == 2
    assert f"udp+tcp 127.0.0.1:{env.dns_port}" in status["listeners"]
    assert status["stats"]["answered_locally"] >= 8 and status["stats"]["forwarded"] >= 2
    assert status["stats"]["nxdomain"] >= 1
    text = env.daemon.cli("status")
    assert f"dns: MagicDNS on ({BASE})" in text.stdout, text.stdout


def test_tailscaled_answers_the_same_questions_the_same_way(env: Env) -> None:
    ts2_v4 = env.ts2.ip4()
    ts2_v6 = env.ts2.cli("ip", "-6").stdout.strip()
    questions = [
        (f"ts2.{BASE}.", "A"), ("ts2.", "A"), (f"ts2.{BASE}.", "AAAA"), (f"py-dns.{BASE}.", "A"),
        (f"{PRINTER[0]}.", "A"), (f"{GRAFANA[0]}.", "A"), (f"{PRINTER[0]}.", "AAAA"),
        (ipaddress.ip_address(ts2_v4).reverse_pointer + ".", "PTR"),
        (ipaddress.ip_address(ts2_v6).reverse_pointer + ".", "PTR"),
        (f"no-such-node.{BASE}.", "A"), ("100.100.100.100.in-addr.arpa.", "PTR"),
        ("magicdns.localhost-tailscale-daemon.", "A"), (f"ts2.{BASE}.", "MX"),
        (f"{OUTSIDE[0]}.", "A"),
    ]
    ours = {q: env.ours(*q) for q in questions}
    theirs = {q: wait_for(lambda q=q: _settled(env, q), 20, f"ts1 to answer {q}") for q in questions}
    assert ours == theirs
    # and the answers are the ones both should give
    assert ours[(f"ts2.{BASE}.", "A")] == ours[("ts2.", "A")] == ("NOERROR", [("A", 5, ts2_v4)])
    assert ours[(f"ts2.{BASE}.", "AAAA")] == ("NOERROR", [])
    assert ours[(f"{GRAFANA[0]}.", "A")] == ("NOERROR", [("A", 5, GRAFANA[1])])
    v6_ptr = (ipaddress.ip_address(ts2_v6).reverse_pointer + ".", "PTR")
    assert ours[v6_ptr] == ("NOERROR", [("PTR", 5, f"ts2.{BASE}.")])
    assert ours[(f"no-such-node.{BASE}.", "A")] == ("NXDOMAIN", [])
    assert ours[(f"{OUTSIDE[0]}.", "A")] == ("NOERROR", [("A", 30, OUTSIDE[1])])  # the upstream's TTL


def _settled(env: Env, question: tuple[str, str]) -> tuple[str, list[tuple[str, int, str]]] | None:
    """ts1's answer, once its netmap has our node (`py-dns` is new to it)."""
    answer = env.tailscaled(*question)
    if question[0].startswith("py-dns.") and answer[0] != "NOERROR":
        return None
    return answer


def test_socks5_reaches_a_peer_by_short_name_and_fqdn_through_the_resolver(env: Env, tmp_path: Path) -> None:
    port = env.services.http_port
    for host in ("ts1", f"ts1.{BASE}"):
        out = tmp_path / f"blob-{host}"
        got = curl("-o", str(out), "--socks5-hostname", f"127.0.0.1:{env.socks_port}", f"http://{host}:{port}/blob")
        assert got.returncode == 0, got.stderr
        assert sha256_file(out) == env.services.blob_sha256
    got = curl("--socks5-hostname", f"127.0.0.1:{env.socks_port}", f"http://no-such-node.{BASE}:{port}/")
    assert got.returncode != 0  # NXDOMAIN in our zone: a clean SOCKS5 failure


def test_quad100_inside_the_netstack_answers_socks5_udp_clients(env: Env) -> None:
    """A SOCKS5 UDP ASSOCIATE client asks 100.100.100.100:53: the query goes into trionet's
    netstack, is answered there (never sent to a peer), and comes back."""
    control = socket.create_connection(("127.0.0.1", env.socks_port), timeout=10)
    control.sendall(b"\x05\x01\x00")
    assert control.recv(2) == b"\x05\x00"
    control.sendall(b"\x05\x03\x00\x01" + bytes(6))
    reply = control.recv(10)
    assert reply[1] == 0, reply
    relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    try:
        for server, name, rdtype, want in (("100.100.100.100", f"ts1.{BASE}.", "A", env.ts1.ip4()),
                                           ("fd7a:115c:a1e0::53", f"{PRINTER[0]}.", "A", PRINTER[1])):
            query = dns.message.make_query(name, rdtype)
            udp.sendto(socks5.build_udp_datagram(server, 53, query.to_wire()), relay)
            datagram = socks5.parse_udp_datagram(udp.recv(4096))
            assert (datagram.host, datagram.port) == (server, 53)
            answer = dns.message.from_wire(datagram.data)
            assert [rd.to_text() for r in answer.answer for rd in r] == [want]
    finally:
        udp.close()
        control.close()
    stats = env.daemon.status()["dns"]
    assert any(listener.startswith("quad-100") for listener in stats["listeners"])
