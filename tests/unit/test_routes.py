"""trionet.routes: which peer carries which prefix, as tailscaled's route manager decides."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from trionet import proto
from trionet.routes import (
    ExitNodeChoiceError,
    NoRouteError,
    PeerRoutes,
    RouteKind,
    RoutePrefs,
    RouteTable,
    choose_exit_node,
    lan_prefixes_from_proc,
)

net = ipaddress.ip_network
ip = ipaddress.ip_address
OWN = (net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128"))


def node(i: int, *routes: str, online: bool | None = True, disco: bool = True, **kw: Any) -> proto.Node:
    addrs = [f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i:x}/128"]
    doc: dict[str, Any] = {
        "ID": i, "StableID": str(i), "Name": f"n{i}.ts.test.", "Addresses": addrs,
        "AllowedIPs": [*addrs, *routes], "Online": online,
        "DiscoKey": f"discokey:{i:064x}" if disco else None,
        "Hostinfo": {"Hostname": f"host{i}"}, **kw}
    return proto.structure(doc, proto.Node)


def peers(*nodes: proto.Node) -> list[PeerRoutes]:
    return [PeerRoutes.from_node(n) for n in nodes]


EXIT = ("0.0.0.0/0", "::/0")


def test_self_addresses_always_routes_only_with_accept_routes() -> None:
    ps = peers(node(2, "10.1.0.0/24"))
    off = RouteTable(ps, RoutePrefs(), own=OWN)
    assert off.allowed == {2: [net("100.64.0.2/32"), net("fd7a:115c:a1e0::2/128")]}
    assert off.peer_for(ip("10.1.0.5")) is None
    on = RouteTable(ps, RoutePrefs(accept_routes=True), own=OWN)
    assert net("10.1.0.0/24") in on.allowed[2]
    assert on.peer_for(ip("10.1.0.5")) == 2
    assert on.accepted == {net("10.1.0.0/24"): 2}


def test_default_routes_only_for_the_selected_exit_node() -> None:
    ps = peers(node(2, *EXIT), node(3, *EXIT))
    none = RouteTable(ps, RoutePrefs(accept_routes=True), own=OWN)
    assert all(net("0.0.0.0/0") not in nets for nets in none.allowed.values())
    chosen = RouteTable(ps, RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN)
    assert net("0.0.0.0/0") in chosen.allowed[3] and net("::/0") in chosen.allowed[3]
    assert net("0.0.0.0/0") not in chosen.allowed[2]  # only the exit node may send from internet addresses
    assert chosen.peer_for(ip("198.51.100.7")) == 3
    assert chosen.peer_for(ip("2001:db8::1")) == 3
    assert chosen.peer_for(ip("100.64.0.2")) == 2  # a node's own address wins over the default route


def test_identical_prefix_goes_to_the_lowest_node_id_and_lpm_picks_the_longest() -> None:
    ps = peers(node(7, "10.1.0.0/16"), node(4, "10.1.0.0/16"), node(5, "10.1.2.0/24"))
    table = RouteTable(ps, RoutePrefs(accept_routes=True), own=OWN)
    assert table.peer_for(ip("10.1.9.9")) == 4
    assert table.peer_for(ip("10.1.2.9")) == 5
    assert net("10.1.0.0/16") not in table.allowed[7]  # one owner per prefix in WireGuard


def test_unreachable_peer_contributes_nothing() -> None:
    table = RouteTable(peers(node(2, "10.1.0.0/24", disco=False)), RoutePrefs(accept_routes=True), own=OWN)
    assert 2 not in table.allowed
    assert table.peer_for(ip("100.64.0.2")) is None


def test_prefix_with_host_bits_is_skipped_but_garbage_is_an_error() -> None:
    p = PeerRoutes.from_node(node(2, "10.1.0.5/24", "10.2.0.0/24"))
    assert p.routes == (net("10.2.0.0/24"),)
    with pytest.raises(ValueError):
        PeerRoutes.from_node(node(2, "not a prefix"))


def test_route_errors_say_why() -> None:
    ps = peers(node(2, "10.1.0.0/24"), node(3, *EXIT, online=False))
    table = RouteTable(ps, RoutePrefs(), own=OWN)
    with pytest.raises(NoRouteError, match="no exit node is selected"):
        table.route(ip("198.51.100.7"))
    with pytest.raises(NoRouteError, match="--accept-routes"):
        table.route(ip("10.1.0.9"))
    with pytest.raises(NoRouteError, match=r"no peer in the netmap has the address 100\.64\.0\.99"):
        table.route(ip("100.64.0.99"))
    with pytest.raises(NoRouteError, match="own address"):
        table.route(ip("100.64.0.1"))
    offline = RouteTable(ps, RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN)
    with pytest.raises(NoRouteError, match="exit node n3 is offline"):
        offline.route(ip("198.51.100.7"))
    assert offline.route(ip("100.64.0.2")).peer_id == 2  # tailnet peers are still reached
    gone = RouteTable(peers(node(2)), RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN)
    with pytest.raises(NoRouteError, match="not in the netmap"):
        gone.route(ip("198.51.100.7"))
    withdrawn = RouteTable(peers(node(3)), RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN)
    with pytest.raises(NoRouteError, match="no longer offers exit routes"):
        withdrawn.route(ip("198.51.100.7"))


def test_lan_access_dials_lan_destinations_from_the_host_only_when_allowed() -> None:
    ps = peers(node(3, *EXIT))
    lan = [net("192.168.1.0/24")]
    through = RouteTable(ps, RoutePrefs(exit_node="n3"), exit_node_id=3, lan_prefixes=lan, own=OWN)
    assert through.route(ip("192.168.1.20")).peer_id == 3  # tailscaled: the exit node gets it (and drops it)
    allowed = RouteTable(ps, RoutePrefs(exit_node="n3", exit_node_allow_lan_access=True), exit_node_id=3,
                         lan_prefixes=lan, own=OWN)
    assert allowed.route(ip("192.168.1.20")).kind is RouteKind.HOST
    assert allowed.route(ip("198.51.100.7")).kind is RouteKind.PEER
    subnet_in_lan = RouteTable(peers(node(2, "192.168.1.128/25"), node(3, *EXIT)),
                               RoutePrefs(exit_node="n3", exit_node_allow_lan_access=True, accept_routes=True),
                               exit_node_id=3, lan_prefixes=lan, own=OWN)
    assert subnet_in_lan.route(ip("192.168.1.200")).peer_id == 2  # a subnet route still wins
    assert subnet_in_lan.route(ip("192.168.1.20")).kind is RouteKind.HOST
    no_exit = RouteTable(ps, RoutePrefs(exit_node_allow_lan_access=True), lan_prefixes=lan, own=OWN)
    with pytest.raises(NoRouteError):  # the flag means nothing without an exit node (as in tailscaled)
        no_exit.route(ip("192.168.1.20"))


def test_a_more_specific_subnet_beats_the_exit_node() -> None:
    ps = peers(node(2, "10.1.0.0/24"), node(3, *EXIT))
    table = RouteTable(ps, RoutePrefs(exit_node="n3", accept_routes=True), exit_node_id=3, own=OWN)
    assert table.route(ip("10.1.0.9")).peer_id == 2
    assert table.route(ip("10.2.0.9")).peer_id == 3


def test_choose_exit_node_by_ip_name_or_stable_id_with_tailscale_wording() -> None:
    ps = peers(node(2), node(3, *EXIT), node(4, *EXIT, online=False))
    assert choose_exit_node("100.64.0.3", ps, OWN).id == 3
    assert choose_exit_node("n3", ps, OWN).id == 3
    assert choose_exit_node("N3.ts.test.", ps, OWN).id == 3
    assert choose_exit_node("host3", ps, OWN).id == 3
    assert choose_exit_node("3", ps, OWN).id == 3
    for selector, message in (("100.64.0.9", "no node found in netmap with IP 100.64.0.9"),
                              ("nope", "must be IP or peer hostname"),
                              ("n2", "is not advertising an exit node"),
                              ("n4", "is offline"),
                              ("100.64.0.1", "local IP address")):
        with pytest.raises(ExitNodeChoiceError, match=message):
            choose_exit_node(selector, ps, OWN)
    twins = peers(node(5, *EXIT, Hostinfo={"Hostname": "same"}), node(6, *EXIT, Hostinfo={"Hostname": "same"}))
    with pytest.raises(ExitNodeChoiceError, match="ambiguous"):
        choose_exit_node("same", twins, OWN)


def test_doh_url_from_the_exit_nodes_peerapi_services() -> None:
    services = [{"Proto": "peerapi4", "Port": 40001}, {"Proto": "peerapi6", "Port": 40002},
                {"Proto": "peerapi-dns-proxy", "Port": 1}, {"Proto": "peerapi4", "Port": "bad"}]
    ps = peers(node(3, *EXIT, Hostinfo={"Hostname": "x", "Services": services}))
    table = RouteTable(ps, RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN)
    assert table.doh_url() == "http://100.64.0.3:40001/dns-query"
    v6only = RouteTable(ps, RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN[1:])
    assert v6only.doh_url() == "http://[fd7a:115c:a1e0::3]:40002/dns-query"
    bare = RouteTable(peers(node(3, *EXIT)), RoutePrefs(exit_node="n3"), exit_node_id=3, own=OWN)
    assert bare.doh_url() is None
    assert RouteTable(ps, RoutePrefs(), own=OWN).doh_url() is None


def test_status_shows_exit_node_and_accepted_routes() -> None:
    ps = peers(node(2, "10.1.0.0/24", PrimaryRoutes=["10.1.0.0/24"]), node(3, *EXIT))
    table = RouteTable(ps, RoutePrefs(exit_node="n3", accept_routes=True), exit_node_id=3, own=OWN)
    st = table.exit_node_status()
    assert st is not None and st["id"] == 3 and st["usable"] and st["name"] == "n3.ts.test"
    assert table.accepted_routes() == [{"prefix": "10.1.0.0/24", "peer": "n2", "peer_id": 2, "primary": True}]
    assert RouteTable(ps, RoutePrefs(), own=OWN).exit_node_status() is None


def test_lan_prefixes_from_proc() -> None:
    route = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
             "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"  # default via 192.168.1.1
             "eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"  # 192.168.1.0/24
             "ts0\t00004064\t00000000\t0001\t0\t0\t0\t0000C0FF\t0\t0\t0\n"  # 100.64.0.0/10: the tailnet
             "lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n")
    inet6 = ("20010db8000000000000000000000005 02 40 00 80     eth0\n"
             "fe800000000000000000000000000001 02 40 20 80     eth0\n"
             "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert lan_prefixes_from_proc(route, inet6) == [net("192.168.1.0/24"), net("2001:db8::/64")]
