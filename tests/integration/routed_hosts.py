"""Hosts that only a tailscaled router reaches, for the exit-node and subnet-route tests.

``add_routed_host`` makes a namespace whose address (on its loopback) is
reachable from the given routers' namespaces only: one veth link to each
router (10.214.N.x/30) and, in each router's namespace, a route to the host's
prefix over that link. Neither the test LAN nor our own namespace has a route
there, so trionet reaches it only through the tailnet. tailscaled in userspace
mode dials such destinations from its own namespace with ordinary sockets.
``link_to_our_namespace`` is the other way round, for trionet as the router: an
address only our own namespace reaches.

Small servers to run there (``serve_files``), and a DNS server for a router's
namespace (``DnsServer``): ``ip netns exec`` bind-mounts /etc/netns/NS/resolv.conf
("nameserver 127.0.0.1", written by the stack) over /etc/resolv.conf, so
tailscaled's exit-node DNS (peerapi DoH, which forwards to the first resolv.conf
nameserver over TCP) asks this server.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tests.realstack import Host, Stack, StackError, Tailscaled, run, wait_for

PUBLIC_IP = "198.51.100.7"  # TEST-NET-2: "the internet" behind the exit node (not a private range,
# which an exit node refuses to forward: tailscale local.go, removeFromDefaultRoute)
WEB_PORT = 8080


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (other test runs share this namespace's loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def add_routed_host(stack: Stack, name: str, address: str, routers: Sequence[Tailscaled], route: str,
                    link_base: int = 0) -> Host:
    """A namespace holding `address`, reachable only from `routers` (each gets a route for
    `route` over its own link). Links use 10.214.<subnet>.<link_base + 4 i>/30. Stack.stop
    removes the namespace (and with it the links)."""
    host = Host(name, f"{stack.prefix}-{name}", address)
    run(["ip", "netns", "add", host.netns])
    stack.hosts.append(host)
    run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
    run(["ip", "-n", host.netns, "addr", "add", f"{address}/32", "dev", "lo"])
    for i, router in enumerate(routers):
        base = link_base + 4 * i
        router_ip, host_ip = f"10.214.{stack.subnet}.{base + 1}", f"10.214.{stack.subnet}.{base + 2}"
        router_if, host_if = f"to-{name}"[:15], f"eth{i}"
        run(["ip", "-n", router.host.netns, "link", "add", router_if, "type", "veth", "peer", "name", host_if,
             "netns", host.netns])
        run(["ip", "-n", router.host.netns, "addr", "add", f"{router_ip}/30", "dev", router_if])
        run(["ip", "-n", router.host.netns, "link", "set", router_if, "up"])
        run(["ip", "-n", host.netns, "addr", "add", f"{host_ip}/30", "dev", host_if])
        run(["ip", "-n", host.netns, "link", "set", host_if, "up"])
        run(["ip", "-n", router.host.netns, "route", "add", route, "via", host_ip])
    return host


def link_to_our_namespace(stack: Stack, host: Host, address: str, route: str, link_base: int = 200) -> None:
    """Give `host` `address` too (on its loopback) and make `route` reachable from our own
    namespace, where trionet runs, and from nowhere else: one veth link from here
    (10.214.<subnet>.<link_base + 1, + 2>/30) and our route for `route` over it. For
    trionet as the subnet router or exit node. The link and the route go with the
    host's namespace (Stack.stop)."""
    ours, theirs = f"10.214.{stack.subnet}.{link_base + 1}", f"10.214.{stack.subnet}.{link_base + 2}"
    link = f"{stack.prefix}-{host.name}"[:15]
    if address != host.ip:
        run(["ip", "-n", host.netns, "addr", "add", f"{address}/32", "dev", "lo"])
    run(["ip", "link", "add", link, "type", "veth", "peer", "name", "to-us", "netns", host.netns])
    run(["ip", "addr", "add", f"{ours}/30", "dev", link])
    run(["ip", "link", "set", link, "up"])
    run(["ip", "-n", host.netns, "addr", "add", f"{theirs}/30", "dev", "to-us"])
    run(["ip", "-n", host.netns, "link", "set", "to-us", "up"])
    run(["ip", "route", "add", route, "via", theirs])


class FileServer:
    """`python -m http.server` on `port` in `host`'s namespace, serving a random blob at /blob."""

    def __init__(self, stack: Stack, host: Host, port: int = WEB_PORT, blob_mb: int = 4) -> None:
        self.host = host
        self.port = port
        self.root = stack.workdir / f"www-{host.name}"
        self.root.mkdir(exist_ok=True)
        blob = os.urandom(blob_mb << 20)
        (self.root / "blob").write_bytes(blob)
        self.blob_sha256 = hashlib.sha256(blob).hexdigest()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FileServer:
        ns = self.host.exec_prefix()
        self.proc = subprocess.Popen(
            [*ns, sys.executable, "-m", "http.server", str(self.port), "--bind", self.host.ip,
             "--directory", str(self.root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: run([*ns, "curl", "-sf", "-o", "/dev/null", f"http://{self.host.ip}:{self.port}/blob"],
                             check=False).returncode == 0, 10, f"http server on {self.host.name}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(b"echo:" + data, addr)
"""


class UdpEcho:
    """A UDP echo ("echo:" + datagram) on `host`'s address."""

    def __init__(self, host: Host, port: int = 9999) -> None:
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> UdpEcho:
        self.proc = subprocess.Popen([*self.host.exec_prefix(), sys.executable, "-c", UDP_ECHO, self.host.ip,
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


DNS_SERVER = r'''
import json, socket, struct, sys, threading
import dns.message, dns.rcode, dns.rdatatype, dns.rrset
records = json.loads(sys.argv[1])  # {"name.": "ipv4"}
log = open(sys.argv[2], "a", buffering=1)

def answer(wire):
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    q = query.question[0]
    name = q.name.to_text().lower()
    log.write(json.dumps({"name": name, "type": dns.rdatatype.to_text(q.rdtype)}) + "\n")
    if name not in records:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif q.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(name, 30, "IN", "A", records[name]))
    return response.to_wire()

def tcp_client(conn):
    with conn:
        while True:
            head = conn.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            (size,) = struct.unpack("!H", head)
            out = answer(conn.recv(size, socket.MSG_WAITALL))
            conn.sendall(struct.pack("!H", len(out)) + out)

def tcp():
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 53)); srv.listen(16)
    while True:
        threading.Thread(target=tcp_client, args=(srv.accept()[0],), daemon=True).start()

threading.Thread(target=tcp, daemon=True).start()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 53))
while True:
    data, addr = udp.recvfrom(65535)
    udp.sendto(answer(data), addr)
'''


class DnsServer:
    """A DNS server on 127.0.0.1:53 (UDP and TCP) in `node`'s namespace that knows `records`
    (A records; everything else NXDOMAIN) and logs every question it is asked."""

    def __init__(self, stack: Stack, node: Tailscaled, records: dict[str, str]) -> None:
        self.node = node
        self.records = {k.lower().rstrip(".") + ".": v for k, v in records.items()}
        self.log = stack.workdir / f"dns-{node.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DnsServer:
        self.proc = subprocess.Popen(
            [*self.node.host.exec_prefix(), sys.executable, "-c", DNS_SERVER, json.dumps(self.records),
             str(self.log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = next(iter(self.records))
        probe = [*self.node.host.exec_prefix(), sys.executable, "-c",
                 "import dns.resolver; r = dns.resolver.Resolver(configure=False); "
                 f"r.nameservers = ['127.0.0.1']; r.resolve({name!r}, 'A', tcp=True)"]

        def answers() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise StackError(f"the test DNS server in {self.node.name}'s namespace exited")
            return run(probe, check=False).returncode == 0

        wait_for(answers, 10, "the test DNS server")
        self.log.write_text("")  # the probe's question is not the test's
        return self

    def questions(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


def approve_routes(stack: Stack, router: Tailscaled, prefixes: Sequence[str], timeout: float = 30) -> None:
    """Approve `prefixes` that `router` announces (tailscale set --advertise-...): `Stack.approve_routes`."""
    stack.approve_routes(router.name, prefixes, timeout)


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    """`wait_for` polling every half second: for state changes that take seconds (a failover)."""
    return wait_for(predicate, timeout, what, interval=0.5)
