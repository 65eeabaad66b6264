"""Thousands of proxy clients that vanish mid-handshake leave a real node as they found it.

An in-process trionet Node on the real stack runs SOCKS5, the HTTP proxy, a
--forward to a tailscaled peer's web server and two --serve ports (one whose local
target refuses, one with a local echo). A client program (tests/integration/
hostile_clients.py, in its own process: the node keeps this one) plays N clients
spread over every step at which each proxy can lose one, half closing (FIN) and
half resetting (RST), plus clients that stall mid-handshake; a second one plays
--serve clients from the tailscaled peer's side. Then, polling: the netstack's TCP
connections and UDP endpoints, and this process's open descriptors, must be back to
what they were before; every proxy must have accounted for every client. A 4 MiB
fetch through the SOCKS5 proxy, sha256-checked, runs during the storm and again after.

N is TRIONET_HOSTILE_CLIENTS (default 10,000: about 30 s of clients and a minute
for the last TIME_WAITs to expire, on 2 cores). The soak variant plays
TRIONET_HOSTILE_ROUNDS (5) such rounds against one node.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.hostile_clients import netstack_counts, open_fds, tcp_states
from tests.integration.services import PeerServices, sha256_file
from tests.realstack import REPO, Stack
from trionet import Node
from trionet.proxy import server

pytestmark = [pytest.mark.integration, pytest.mark.netns]

HTTP_PORT, UDP_PORT = 8100, 9998  # not test_node.py's, in case both modules' servers overlap
BLACK_HOLE = "100.127.254.254"  # a tailnet address no peer has: SYNs to it go nowhere
SETTLE_LIMIT = 300.0  # a hang guard for the wait below, not a measurement


@pytest.fixture(scope="module")
def services(newest_stack: Stack) -> Iterator[PeerServices]:
    svc = PeerServices(newest_stack, newest_stack.tailscaleds[0], http_port=HTTP_PORT, udp_port=UDP_PORT,
                       blob_mb=4).start()
    yield svc
    svc.stop()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _fetch_through_socks(port: int, services: PeerServices, out: Path) -> str:
    got = await trio.run_process(
        ["curl", "-sS", "--max-time", "120", "--socks5-hostname", f"127.0.0.1:{port}", "-o", str(out),
         f"http://ts1:{services.http_port}/blob"], check=False, capture_stderr=True)
    assert got.returncode == 0, got.stderr
    return sha256_file(out)


async def _clients(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the client program (in the peer's namespace when cfg has a prefix)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = await trio.run_process([*cfg.get("prefix", []), sys.executable, "-m", "tests.integration.hostile_clients",
                                   json.dumps(cfg)], capture_stdout=True, capture_stderr=True, cwd=REPO, env=env,
                                  check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _accounted(proxy: Any) -> dict[str, Any]:
    st: dict[str, Any] = proxy.statistics()
    ended = st["completed"] + sum(st["failed"].values()) + sum(st["handshake_errors"].values())
    assert st["accepted"] == ended + st["live_connections"], (proxy.name, st)
    return st


class Proxies:
    """The node's listeners, as the daemon would start them for --socks5, --http-proxy,
    --forward 0=ts1:HTTP_PORT, --serve 9100=<a refusing port>, --serve 9101=<an echo>."""

    def __init__(self, node: Node, services: PeerServices) -> None:
        self.socks = server.Socks5Proxy(0, node)
        self.http = server.HttpProxy(0, node)
        self.forward = server.ForwardProxy(0, "ts1", services.http_port, node)
        self.ports: dict[str, int] = {}

    async def start(self, node: Node, nursery: trio.Nursery) -> None:
        local_echo = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
        self.refused = server.InboundServer(await node.listen_tcp(9100), "127.0.0.1", _closed_port())
        self.echo = server.InboundServer(await node.listen_tcp(9101), "127.0.0.1",
                                         local_echo[0].socket.getsockname()[1])
        self.ports = {"socks5": await nursery.start(self.socks.serve), "http": await nursery.start(self.http.serve),
                      "forward": await nursery.start(self.forward.serve)}
        await nursery.start(self.refused.serve)
        await nursery.start(self.echo.serve)

    @property
    def all(self) -> list[Any]:
        return [self.socks, self.http, self.forward, self.refused, self.echo]


async def _with_node(stack: Stack, services: PeerServices, tmp_path: Path, rounds: int, count: int) -> None:
    node = Node(login_server=stack.server_url, auth_key=stack.preauth_key(), state_dir=tmp_path / "state",
                hostname="py-hostile", ca_file=stack.ca_file, udp_bind=stack.local_ip)
    async with node, trio.open_nursery() as nursery:
        proxies = Proxies(node, services)
        await proxies.start(node, nursery)
        # warm: WireGuard sessions both ways, the peer's SOCKS5 reaching us, lazily opened sockets
        fetched = await _fetch_through_socks(proxies.ports["socks5"], services, tmp_path / "warm")
        assert fetched == services.blob_sha256
        await _clients(_serve_config(stack, node, 20))
        await _settle(node, proxies.all, None, None)
        fds_before = open_fds()
        counts_before = netstack_counts(node)
        print(f"\nbaseline: netstack {counts_before}, {len(fds_before)} descriptors")
        for i in range(rounds):
            await _round(stack, services, tmp_path, node, proxies, count, counts_before, fds_before)
            print(f"round {i + 1} of {rounds}: back to the baseline")
        # and legitimate traffic still flows after it all
        fetched = await _fetch_through_socks(proxies.ports["socks5"], services, tmp_path / "after")
        assert fetched == services.blob_sha256
        nursery.cancel_scope.cancel()


def _serve_config(stack: Stack, node: Node, count: int) -> dict[str, Any]:
    my_ip = node.status()["self"]["addresses"][0].split("/")[0]
    ts1 = stack.tailscaleds[0]
    return {"count": count, "concurrency": 10, "serve_ip": my_ip, "peer_socks_port": ts1.socks_port,
            "serve_ports": {"refused": 9100, "echo": 9101}, "prefix": ts1.host.exec_prefix()}


async def _round(stack: Stack, services: PeerServices, tmp_path: Path, node: Node, proxies: Proxies, count: int,
                 counts_before: dict[str, int], fds_before: dict[int, str]) -> None:
    cfg = {"count": count, "concurrency": 200, "stallers": 10, "ports": proxies.ports, "peer_host": "ts1",
           "peer_port": services.http_port, "peer_udp_port": services.udp_port, "black_hole": BLACK_HOLE}
    serve_cfg = _serve_config(stack, node, max(100, count // 50))
    accepted_before = {p.name: p.statistics()["accepted"] for p in proxies.all}
    failed_before = {p.name: Counter(p.statistics()["failed"]) for p in proxies.all}
    results: dict[str, Any] = {}
    during: list[str] = []
    start = time.monotonic()

    async def run_storm() -> None:
        results["storm"] = await _clients(cfg)

    async def run_serve_storm() -> None:
        results["serve"] = await _clients(serve_cfg)

    async def fetch_during() -> None:
        await trio.sleep(2)  # the storm under way
        during.append(await _fetch_through_socks(proxies.ports["socks5"], services, tmp_path / "during"))

    async with trio.open_nursery() as storms:
        storms.start_soon(run_storm)
        storms.start_soon(run_serve_storm)
        storms.start_soon(fetch_during)
    storm_done = time.monotonic()
    settled = await _settle(node, proxies.all, counts_before, fds_before)

    counts_after = netstack_counts(node)
    fds_after = open_fds()
    accepted = {p.name: p.statistics()["accepted"] - accepted_before[p.name] for p in proxies.all}
    failed = {p.name: Counter(p.statistics()["failed"]) - failed_before[p.name] for p in proxies.all}
    clients = results["storm"]
    print(f"clients: {json.dumps({'storm': {k: v for k, v in clients.items() if k != 'planned'}})}")
    print(f"serve clients: {json.dumps(results['serve'])}")
    print(f"storm {storm_done - start:.1f} s (clients alone {clients['storm_seconds']} s), "
          f"settled {settled} after it")
    print(f"after: netstack {counts_after}, {len(fds_after)} descriptors; accepted {accepted}")
    for p in proxies.all:
        print(f"{p.name}: {json.dumps(p.statistics())}")
    assert during == [services.blob_sha256]  # legitimate traffic flowed through the storm

    assert counts_after == counts_before, tcp_states(node)
    leaked = {fd: fds_after[fd] for fd in set(fds_after) - set(fds_before)}
    assert len(fds_after) <= len(fds_before), leaked
    stats = {p.name: _accounted(p) for p in proxies.all}
    for st in stats.values():
        assert st["live_connections"] == 0 and st["live_udp_associations"] == 0
        assert not any(k.startswith("internal_error") for k in st["failed"]), st
    # every client the program played (and the fetch) reached a listener and was accounted for there
    played = sum(clients["planned"].values()) + 2 * cfg["stallers"] - clients["seen"].get("connect_failed", 0)
    handshake_listeners = (proxies.socks, proxies.http, proxies.forward)
    assert sum(accepted[p.name] for p in handshake_listeners) + sum(
        stats[p.name]["accept_errors"].get("client_gone", 0) for p in handshake_listeners) >= played + 1
    assert sum(accepted[p.name] for p in handshake_listeners) <= played + 1
    # the stallers were closed by the proxies' handshake timeout, not by themselves
    seen = clients["seen"]
    assert seen.get("stall.socks5.closed_by_proxy", 0) == seen.get("stall.http.closed_by_proxy", 0) \
        == cfg["stallers"], seen
    # a dial to the black hole ends with its client: none ran into the connect timeout
    for p in (proxies.socks, proxies.http):
        assert "connect_timeout" not in failed[p.name], failed
        assert failed[p.name]["client_closed_while_connecting"] + failed[p.name]["client_reset_while_connecting"]
    assert failed[proxies.refused.name]["connect_refused"] >= serve_cfg["count"] // 2


async def _settle(node: Node, proxies: list[Any], counts: dict[str, int] | None,
                  fds: dict[int, str] | None) -> str:
    """Wait until no proxy has a live client and the counts are back (when given)."""
    start = time.monotonic()
    with trio.move_on_after(SETTLE_LIMIT):
        while True:
            busy = sum(p.statistics()["live_connections"] for p in proxies)
            if not busy and (counts is None or (netstack_counts(node) == counts and fds is not None
                                                and len(open_fds()) <= len(fds))):
                return f"in {time.monotonic() - start:.1f} s"
            await trio.sleep(0.25)
    return f"not within {SETTLE_LIMIT:.0f} s: {tcp_states(node)}"


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


async def test_ten_thousand_abrupt_proxy_clients_leave_nothing_behind(newest_stack: Stack, services: PeerServices,
                                                                      tmp_path: Path) -> None:
    await _with_node(newest_stack, services, tmp_path, 1, _env("TRIONET_HOSTILE_CLIENTS", 10_000))


@pytest.mark.soak
async def test_rounds_of_abrupt_proxy_clients_leave_nothing_behind(newest_stack: Stack, services: PeerServices,
                                                                   tmp_path: Path) -> None:
    """The same, several times over on one node: a leak of one descriptor in a thousand
    clients, or a counter that drifts, shows by the last round."""
    await _with_node(newest_stack, services, tmp_path, _env("TRIONET_HOSTILE_ROUNDS", 5),
                     _env("TRIONET_HOSTILE_CLIENTS", 10_000))
