"""The Node's routing: WireGuard allowed IPs follow the route table; `set` changes them at once;
a destination no peer carries fails at once, saying why."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import trio

from trionet import keys, proto
from trionet.control.netmap import Netmap
from trionet.daemon.run import _Daemon
from trionet.errors import ConfigError, TransportError
from trionet.magicsock.conn import MagicConn
from trionet.node import Node
from trionet.routes import ExitNodeChoiceError, NoRouteError, RoutePrefs
from trionet.threaded import ThreadedNode
from trionet.wg import WgDevice

net = ipaddress.ip_network
EXIT = ["0.0.0.0/0", "::/0"]


def peer(i: int, *routes: str, **kw: Any) -> dict[str, Any]:
    pub = keys.public_of(keys.new_private())
    addrs = [f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"]
    return {"ID": i, "StableID": str(i), "Key": keys.format_key("nodekey:", pub),
            "DiscoKey": f"discokey:{i:064x}", "Addresses": addrs, "AllowedIPs": [*addrs, *routes],
            "Name": f"n{i}.ts.test.", "Online": True, "Endpoints": ["10.0.0.1:41641"], **kw}


class _NoStack:
    def statistics(self) -> dict[str, int]:
        return {}


def make_node(tmp_path: Path, **kw: Any) -> Node:
    node = Node(login_server="https://hs.test", state_dir=tmp_path, **kw)
    me = keys.new_private()
    node.magic = MagicConn(me, keys.public_of(me), keys.new_private(), keys.public_of(keys.new_private()),
                           lambda *a: None, login_server="https://hs.test")
    node.wg = WgDevice(me)
    node.stack = _NoStack()  # type: ignore[assignment]  # no packets flow here: a stand-in, so none is started
    node._stack_ready.set()
    return node


def feed(node: Node, netmap: Netmap, msg: dict[str, Any]) -> None:
    node._on_netmap(netmap, netmap.apply(proto.structure(msg, proto.MapResponse)))


SELF = {"ID": 1, "Key": keys.format_key("nodekey:", b"\x01" * 32), "Addresses": ["100.64.0.1/32",
                                                                                  "fd7a:115c:a1e0::1/128"]}


def allowed(node: Node, peer_id: int) -> list[Any]:
    assert node.wg is not None
    return node.wg.allowed_ips(node._key_by_peer_id[peer_id])


def test_only_the_exit_node_gets_the_default_routes_and_set_moves_them(tmp_path: Path) -> None:
    node = make_node(tmp_path, exit_node="n3")
    netmap = Netmap()
    feed(node, netmap, {"Node": SELF, "Peers": [peer(2, "10.1.0.0/24"), peer(3, *EXIT), peer(4, *EXIT)]})
    assert net("0.0.0.0/0") in allowed(node, 3) and net("::/0") in allowed(node, 3)
    assert net("0.0.0.0/0") not in allowed(node, 4)
    assert net("10.1.0.0/24") not in allowed(node, 2)  # no --accept-routes
    node._check_exit_node_at_start()  # usable: no error
    assert node.wg is not None
    assert node.wg.route(ipaddress.ip_address("198.51.100.7")) == node._key_by_peer_id[3]

    st = node.set(exit_node="100.64.0.4", accept_routes=True)
    assert st["exit_node"]["id"] == 4 and st["routes"][0]["prefix"] == "10.1.0.0/24"
    assert net("0.0.0.0/0") in allowed(node, 4) and net("0.0.0.0/0") not in allowed(node, 3)
    assert net("10.1.0.0/24") in allowed(node, 2)
    assert node.wg.route(ipaddress.ip_address("198.51.100.7")) == node._key_by_peer_id[4]

    node.set_exit_node("")
    assert all(net("0.0.0.0/0") not in allowed(node, i) for i in (2, 3, 4))
    assert node.wg.route(ipaddress.ip_address("198.51.100.7")) is None
    assert node.status()["exit_node"] is None


def test_set_refuses_a_bad_exit_node_and_changes_nothing(tmp_path: Path) -> None:
    node = make_node(tmp_path, exit_node="n3")
    netmap = Netmap()
    feed(node, netmap, {"Node": SELF, "Peers": [peer(2), peer(3, *EXIT), peer(4, *EXIT, Online=False)]})
    for selector, message in (("n2", "not advertising an exit node"), ("n4", "offline"),
                              ("nosuch", "must be IP or peer hostname")):
        with pytest.raises(ExitNodeChoiceError, match=message):
            node.set(exit_node=selector, accept_routes=True)
    assert node.route_prefs.exit_node == "n3" and not node.route_prefs.accept_routes
    assert net("0.0.0.0/0") in allowed(node, 3)


def test_start_fails_clearly_for_an_unusable_exit_node(tmp_path: Path) -> None:
    for selector, message in (("n2", "not advertising an exit node"), ("n9", "must be IP or peer hostname"),
                              ("n4", "offline")):
        node = make_node(tmp_path, exit_node=selector)
        with pytest.raises(ExitNodeChoiceError, match=message):  # before the node counts as running
            feed(node, Netmap(), {"Node": SELF, "Peers": [peer(2), peer(4, *EXIT, Online=False)]})
        assert not node._running.is_set()


def test_exit_node_going_offline_shows_in_status_and_fails_dials_fast(tmp_path: Path) -> None:
    node = make_node(tmp_path, exit_node="n3")
    netmap = Netmap()
    feed(node, netmap, {"Node": SELF, "Peers": [peer(3, *EXIT)]})
    feed(node, netmap, {"OnlineChange": {3: False}})
    st = node.status()
    assert st["exit_node"]["usable"] is False and "offline" in st["exit_node"]["problem"]
    peers = {p["id"]: p for p in st["peers"]}
    assert peers[3]["exit_node"] and peers[3]["exit_node_option"]
    with pytest.raises(NoRouteError, match="exit node n3 is offline"):
        node.routes.route(ipaddress.ip_address("198.51.100.7"))
    feed(node, netmap, {"OnlineChange": {3: True}})
    assert node.status()["exit_node"]["usable"] is True


async def test_open_tcp_stream_outside_the_tailnet_without_exit_node_fails_at_once(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    feed(node, Netmap(), {"Node": SELF, "Peers": [peer(2)]})
    with trio.fail_after(1):
        with pytest.raises(NoRouteError, match="no exit node is selected"):
            await node.open_tcp_stream("198.51.100.7", 80)
        with pytest.raises(ConfigError, match="no DNS resolver is configured for other names"):
            await node.open_tcp_stream("example.com", 80)


async def test_daemon_set_checks_its_request(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    feed(node, Netmap(), {"Node": SELF, "Peers": [peer(3, *EXIT)]})
    daemon = _Daemon(node)
    with pytest.raises(ConfigError, match="must be a string"):
        await daemon.handle({"cmd": "set", "exit_node": 3})
    with pytest.raises(ConfigError, match="true or false"):
        await daemon.handle({"cmd": "set", "accept_routes": "yes"})
    answer = await daemon.handle({"cmd": "set", "exit_node": "n3"})
    assert isinstance(answer, dict) and answer["exit_node"]["id"] == 3


def test_an_endpoint_change_keeps_the_route_table_an_online_change_rebuilds_it(tmp_path: Path) -> None:
    node = make_node(tmp_path, exit_node="n3")
    netmap = Netmap()
    feed(node, netmap, {"Node": SELF, "Peers": [peer(2), peer(3, *EXIT)]})
    table = node.routes
    feed(node, netmap, {"PeersChangedPatch": [{"NodeID": 3, "Endpoints": ["10.0.0.9:41641"]}]})
    assert node.routes is table  # most map messages move endpoints: no routing work for them
    feed(node, netmap, {"OnlineChange": {3: False}})
    assert node.routes is not table and node.routes.exit_node_problem() == "exit node n3 is offline"


def test_threaded_node_takes_the_routing_arguments(tmp_path: Path) -> None:
    threaded = ThreadedNode(login_server="https://hs.test", state_dir=tmp_path, exit_node="ts1", accept_routes=True)
    assert threaded._node.route_prefs == RoutePrefs(exit_node="ts1", accept_routes=True)
    with pytest.raises(TransportError, match="not connected yet"):
        threaded.set_exit_node("ts1")  # not started: no netmap to find it in
