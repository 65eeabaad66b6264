"""Advertising subnet routes and an exit node: the flags, Hostinfo.RoutableIPs, what the netmap
says was approved, the packet filter's local nets, and a Node that offers all of it."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.test_filter import ip4, tcp
from tests.unit.test_node_routes import SELF, feed, make_node, peer
from trionet import cli
from trionet.advertise import (
    Advertised,
    HostInterfaces,
    advertise_status,
    approved_routes,
    host_interfaces_from_proc,
    local_nets,
    parse_advertise_routes,
    shrink_default_route,
)
from trionet.control.netmap import Netmap
from trionet.errors import ConfigError
from trionet.filter import PacketFilter

net = ipaddress.ip_network
ip = ipaddress.ip_address


def test_routes_are_normalized_deduplicated_and_sorted_as_tailscale_sorts_them() -> None:
    got = parse_advertise_routes(" fd00::/64,10.1.0.0/16 ,10.0.0.0/24,10.1.0.0/16")
    assert [str(n) for n in got] == ["10.1.0.0/16", "10.0.0.0/24", "fd00::/64"]
    assert parse_advertise_routes("") == ()


@pytest.mark.parametrize(("text", "needle"), [
    ("10.0.0.1/24", "10.0.0.1/24 has non-address bits set; expected 10.0.0.0/24"),
    ("10.0.0.0", "not a CIDR prefix (a single address is 10.0.0.0/32)"),
    ("web", "not a valid IP address or CIDR prefix"),
    ("10.0.0.0/33", "not a valid IP address or CIDR prefix"),
    ("10.0.0.0/24,", "invalid value '' for --advertise-routes"),
    ("0.0.0.0/0", "0.0.0.0/0 advertised without ::/0"),
])
def test_a_bad_route_is_one_clear_error(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_advertise_routes(text)
    assert needle in str(caught.value) and "--advertise-routes" in str(caught.value)


def test_an_exit_node_adds_both_default_routes_after_the_subnets_order() -> None:
    offer = Advertised.from_prefixes(parse_advertise_routes("192.168.7.0/24"), exit_node=True)
    assert offer.hostinfo_routes() == ["0.0.0.0/0", "::/0", "192.168.7.0/24"]
    both = Advertised.from_prefixes(parse_advertise_routes("0.0.0.0/0,::/0"))
    assert both.exit_node and both.subnets == ()
    assert not Advertised() and Advertised().hostinfo_routes() == []


def test_approved_routes_are_the_self_nodes_allowed_ips_beyond_its_addresses() -> None:
    me = SimpleNamespace(Addresses=["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
                         AllowedIPs=["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "10.0.0.0/24", "0.0.0.0/0",
                                     "::/0", "not a prefix"])
    assert approved_routes(me) == (net("0.0.0.0/0"), net("::/0"), net("10.0.0.0/24"))
    assert approved_routes(None) == ()
    assert approved_routes(SimpleNamespace(Addresses=["100.64.0.1/32"], AllowedIPs=None)) == ()


def test_status_tells_offered_from_approved() -> None:
    offer = Advertised.from_prefixes([net("10.0.0.0/24"), net("10.9.0.0/16")], exit_node=True)
    st = advertise_status(offer, [net("10.0.0.0/24"), net("0.0.0.0/0")])
    assert st == {"routes": ["10.9.0.0/16", "10.0.0.0/24"], "exit_node": True,  # shortest prefix first
                  "approved_routes": ["10.0.0.0/24"], "exit_node_approved": False,
                  "pending": ["10.9.0.0/16", "::/0"]}
    assert advertise_status(offer, [net("10.0.0.0/24"), net("10.9.0.0/16"), net("0.0.0.0/0"),
                                    net("::/0")])["exit_node_approved"]


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.168.1.0/24 2 0 2
        |-- 192.168.1.0
           /24 link UNICAST
        |-- 192.168.1.20
           /32 host LOCAL
     +-- 203.0.113.0/28 2 0 2
        |-- 203.0.113.0
           /28 link UNICAST
        |-- 203.0.113.5
           /32 host LOCAL
     |-- 100.64.0.1
        /32 host LOCAL
Local:
  +-- 127.0.0.0/8 2 0 2
     |-- 127.0.0.0
        /8 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000010000000000000005 02 40 00 80     eth0
fd7a115ca1e000000000000000000001 03 80 00 80     tailscale0
"""


def test_host_interfaces_come_from_proc_without_tailscale_addresses() -> None:
    host = host_interfaces_from_proc(FIB_TRIE, IF_INET6)
    assert set(host.prefixes) == {net("127.0.0.0/8"), net("192.168.1.0/24"), net("203.0.113.0/28"),
                                  net("2001:db8:0:1::/64")}
    assert set(host.addresses) == {ip("127.0.0.1"), ip("192.168.1.20"), ip("203.0.113.5"), ip("::1"),
                                   ip("2001:db8:0:1::5")}


def test_a_default_route_is_shrunk_to_a_guest_wifi() -> None:
    host = host_interfaces_from_proc(FIB_TRIE, IF_INET6)
    v4 = shrink_default_route(net("0.0.0.0/0"), host.prefixes, host.addresses)

    def covered(addr: str) -> bool:
        return any(ip(addr) in n for n in v4)

    assert covered("198.51.100.7") and covered("8.8.8.8")
    assert covered("203.0.113.5")  # the host's own public address is back
    assert not covered("203.0.113.6")  # ... but not its LAN
    for private in ("10.1.2.3", "172.16.0.1", "192.168.1.20", "169.254.1.1", "224.0.0.1", "100.64.0.7"):
        assert not covered(private), private
    v6 = shrink_default_route(net("::/0"), host.prefixes, host.addresses)
    assert any(ip("2606:4700::1111") in n for n in v6)
    assert not any(ip("fe80::1") in n or ip("fd7a:115c:a1e0::9") in n or ip("2001:db8:0:1::9") in n for n in v6)


def test_local_nets_are_our_addresses_the_subnets_and_with_an_exit_node_the_internet() -> None:
    own = [net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128")]
    host = HostInterfaces((net("192.168.1.0/24"),), (ip("192.168.1.20"),))
    subnet_only = local_nets(own, Advertised((net("192.168.1.0/24"),)), host)
    assert subnet_only == [net("100.64.0.1/32"), net("192.168.1.0/24"), net("fd7a:115c:a1e0::1/128")]
    with_exit = local_nets(own, Advertised((net("192.168.1.0/24"),), exit_node=True), host)
    assert any(ip("198.51.100.7") in n for n in with_exit)
    assert any(ip("192.168.1.9") in n for n in with_exit)  # the LAN: advertised as a subnet too


def _syn(src: str, dst: str, port: int) -> bytes:
    return ip4(src, dst, 6, tcp(40000, port, 0x02))


def test_the_filter_admits_advertised_destinations_only_when_the_acl_allows() -> None:
    rules = [{"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "10.0.0.0/24", "Ports": {"First": 0, "Last": 65535}},
                                                      {"IP": "100.64.0.1", "Ports": {"First": 0, "Last": 65535}}]}]
    own = [net("100.64.0.1/32")]
    filt = PacketFilter(rules, local=local_nets(own, Advertised((net("10.0.0.0/24"),)), HostInterfaces()))
    assert filt.allow_inbound(_syn("100.64.0.2", "10.0.0.9", 80))
    assert not filt.allow_inbound(_syn("100.64.0.3", "10.0.0.9", 80))  # no rule for that source
    assert not filt.allow_inbound(_syn("100.64.0.2", "10.0.1.9", 80))  # not advertised
    assert filt.drops["destination not ours"] == 1 and filt.drops["no rule"] == 1
    plain = PacketFilter(rules, local=own)
    assert not plain.allow_inbound(_syn("100.64.0.2", "10.0.0.9", 80))  # without advertising: not ours


def test_the_flags_reach_the_config_and_a_bad_cidr_is_refused(tmp_path: Path) -> None:
    base = ["up", "--login-server", "https://h", "--authkey", "k", "--state-dir", str(tmp_path)]
    config = cli.config_from_args(cli.build_parser().parse_args(
        [*base, "--advertise-routes", "10.0.0.0/24,fd00::/64", "--advertise-exit-node"]))
    assert config.advertise_routes == ("10.0.0.0/24", "fd00::/64") and config.advertise_exit_node
    plain = cli.config_from_args(cli.build_parser().parse_args(base))
    assert (plain.advertise_routes, plain.advertise_exit_node) == ((), False)
    with pytest.raises(ConfigError, match=r"invalid value '10\.0\.0\.1/24' for --advertise-routes"):
        cli.config_from_args(cli.build_parser().parse_args([*base, "--advertise-routes", "10.0.0.1/24"]))


def _self(*routes: str) -> dict[str, Any]:
    return {**SELF, "AllowedIPs": [*SELF["Addresses"], *routes], "PrimaryRoutes": [r for r in routes if "/0" not in r]}


def test_a_node_advertises_reports_approval_and_filters_for_its_routes(tmp_path: Path) -> None:
    node = make_node(tmp_path, advertise_routes="10.0.0.0/24", advertise_exit_node=True)
    assert node._hostinfo_extra() == {"RoutableIPs": ["0.0.0.0/0", "::/0", "10.0.0.0/24"]}
    netmap = Netmap()
    feed(node, netmap, {"Node": _self(), "Peers": [peer(2)]})
    node._update_local_nets()
    assert node.filter.is_local(ip("10.0.0.5")) and node.filter.is_local(ip("100.64.0.1"))
    st = node.routing_status()
    assert st["advertise"]["pending"] == ["10.0.0.0/24", "0.0.0.0/0", "::/0"]
    assert st["forwarding"] == {}  # nobody forwards in this test
    assert not node.exit_node_approved

    feed(node, netmap, {"Node": _self("10.0.0.0/24", "0.0.0.0/0", "::/0")})
    assert node.approved_routes() == (net("0.0.0.0/0"), net("::/0"), net("10.0.0.0/24"))
    assert node.exit_node_approved and node.offers_exit_node
    assert node.routing_status()["advertise"]["exit_node_approved"]


def test_set_changes_what_we_advertise_and_keeps_what_it_is_not_told(tmp_path: Path) -> None:
    node = make_node(tmp_path, advertise_routes=["10.0.0.0/24"], advertise_exit_node=True)
    feed(node, Netmap(), {"Node": _self(), "Peers": [peer(2)]})
    node.set(advertise_routes=["10.9.0.0/16"])
    assert node.advertised == Advertised((net("10.9.0.0/16"),), exit_node=True)
    assert node.filter.is_local(ip("10.9.1.1")) and not node.filter.is_local(ip("10.0.0.1"))
    node.set(advertise_exit_node=False)
    assert node._hostinfo_extra() == {"RoutableIPs": ["10.9.0.0/16"]}
    node.set(advertise_routes="")
    assert node._hostinfo_extra() == {}
    with pytest.raises(ConfigError, match="non-address bits"):
        node.set(advertise_routes="10.0.0.1/8")
    with pytest.raises(ConfigError, match="--advertise-routes"):
        make_node(tmp_path, advertise_routes="nonsense")


def test_hostinfo_carries_the_nodes_extra_fields() -> None:
    from trionet import keys
    from trionet.control.client import ControlConnection

    state = SimpleNamespace(node_public=keys.public_of(keys.new_private()),
                            disco_public=keys.public_of(keys.new_private()))
    conn = ControlConnection(SimpleNamespace(hostname="me"), state, None)  # type: ignore[arg-type]
    assert "RoutableIPs" not in conn.hostinfo()
    conn.hostinfo_extra = lambda: {"RoutableIPs": ["10.0.0.0/24"]}
    assert conn.hostinfo()["RoutableIPs"] == ["10.0.0.0/24"]
    assert conn.map_request([], [], 1, stream=False)["Hostinfo"]["RoutableIPs"] == ["10.0.0.0/24"]


def test_status_text_says_what_is_advertised_and_what_is_approved() -> None:
    st = {"advertise": {"routes": ["10.0.0.0/24", "10.9.0.0/16"], "exit_node": True,
                        "approved_routes": ["10.0.0.0/24"], "exit_node_approved": False,
                        "pending": ["10.9.0.0/16", "0.0.0.0/0", "::/0"]},
          "forwarding": {"tcp_flows": 3, "detail": {"x": 1}}}
    lines = cli._routing_lines(st)
    assert lines[0] == ("advertising: routes 10.0.0.0/24 (approved), 10.9.0.0/16 (NOT APPROVED); "
                        "exit node (NOT APPROVED)")
    assert "approve-routes" in lines[1]
    assert lines[2] == "forwarding: tcp_flows 3"
    assert cli._routing_lines({"advertise": {"routes": [], "exit_node": False}, "forwarding": {}}) == []


async def test_daemon_set_takes_what_to_advertise_and_checks_it(tmp_path: Path) -> None:
    from trionet.daemon.run import _Daemon

    node = make_node(tmp_path)
    feed(node, Netmap(), {"Node": _self(), "Peers": [peer(2)]})
    daemon = _Daemon(node)
    with pytest.raises(ConfigError, match="list of CIDR prefixes"):
        await daemon.handle({"cmd": "set", "advertise_routes": "10.0.0.0/24"})
    with pytest.raises(ConfigError, match="true or false"):
        await daemon.handle({"cmd": "set", "advertise_exit_node": "yes"})
    answer = await daemon.handle({"cmd": "set", "advertise_routes": ["10.0.0.0/24"], "advertise_exit_node": True})
    assert isinstance(answer, dict) and answer["advertise"]["routes"] == ["10.0.0.0/24"]
    assert answer["advertise"]["exit_node"] and not answer["advertise"]["exit_node_approved"]


def test_threaded_node_takes_the_advertising_arguments(tmp_path: Path) -> None:
    from trionet.threaded import ThreadedNode

    threaded = ThreadedNode(login_server="https://hs.test", state_dir=tmp_path, advertise_routes=["10.0.0.0/24"],
                            advertise_exit_node=True, host_resolvers=["127.0.0.1:5353"])
    assert threaded._node.advertised == Advertised((net("10.0.0.0/24"),), exit_node=True)
    assert threaded._node.config.host_resolvers == ("127.0.0.1:5353",)


def test_a_change_of_what_we_advertise_is_reported_in_a_lite_update() -> None:
    from trionet.control.session import ControlSession

    extra: dict[str, Any] = {}
    magic = SimpleNamespace(endpoints=lambda: ["192.0.2.1:41641"], home_region=1)
    session = ControlSession(SimpleNamespace(login_server="https://hs.test"), None, magic, lambda *a: None,
                             None, hostinfo_extra=lambda: dict(extra))  # type: ignore[arg-type]
    before = session._report_key()
    extra["RoutableIPs"] = ["10.0.0.0/24"]
    assert session._report_key() != before  # the report loop sends a lite update for it


@pytest.mark.parametrize(("host_resolvers", "resolv_conf", "asked"), [
    (None, "search x\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n", ("192.0.2.53", 53)),
    (None, "# no nameserver\n", None),  # MagicDNS's own resolvers then
    (["192.0.2.99:5353", "192.0.2.98"], "nameserver 192.0.2.53\n", ("192.0.2.99", 5353)),
])
async def test_our_exit_node_clients_are_answered_by_the_hosts_first_resolver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_resolvers: list[str] | None, resolv_conf: str,
        asked: tuple[str, int] | None) -> None:
    import trionet.node

    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv_conf)
    monkeypatch.setattr(trionet.node, "RESOLV_CONF", str(conf))
    node = make_node(tmp_path, host_resolvers=host_resolvers)
    seen: list[Any] = []

    async def ask(wire: bytes, nameserver: Any) -> bytes:
        seen.append(nameserver)
        return wire

    monkeypatch.setattr(node.dns, "ask_host_resolver", ask)
    assert await node._ask_host_resolver(b"query") == b"query"
    assert seen == [None if asked is None else (ip(asked[0]), asked[1])]


def test_the_peer_apis_access_rule_sees_users_the_filter_and_what_we_offer(tmp_path: Path) -> None:
    node = make_node(tmp_path, advertise_exit_node=True)
    rules = [{"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
    feed(node, Netmap(), {"Node": {**_self(), "User": 1}, "PacketFilter": rules,
                          "DNSConfig": {"ExitNodeFilteredSet": [".corp.test"]},
                          "Peers": [peer(2, User=2), peer(3, User=2), peer(4, User=1)]})
    internet_user = node._peerapi_access(ip("100.64.0.2"))
    assert internet_user is not None and internet_user.caller_may_use_internet and not internet_user.same_user
    assert internet_user.filtered_names == (".corp.test",) and ip("100.64.0.1") in internet_user.own_addresses
    other = node._peerapi_access(ip("100.64.0.3"))
    assert other is not None and not other.caller_may_use_internet  # no rule lets it out
    same = node._peerapi_access(ip("100.64.0.4"))
    assert same is not None and same.same_user
    assert node._peerapi_access(ip("100.64.0.9")) is None  # not a peer
