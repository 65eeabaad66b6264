"""A Node's Router forwards what the node advertises, follows `set`, and reports in
statistics() and status."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from tests.unit.test_node_routes import SELF, feed, make_node, peer
from trionet import Node
from trionet.control.netmap import Netmap
from trionet.netstack import NetStack
from trionet.router import Router

net = ipaddress.ip_network


def with_router(tmp_path: Path, **kw: Any) -> tuple[Node, Router]:
    node = make_node(tmp_path, **kw)
    router = Router(NetStack(["100.64.0.1"], lambda packet: None))
    node.router = router
    node.forwarding_status = router.status
    return node, router


def test_the_router_forwards_what_we_advertise_before_the_approval_reaches_us(tmp_path: Path) -> None:
    node, router = with_router(tmp_path, advertise_routes="10.0.0.0/24", advertise_exit_node=True)
    feed(node, Netmap(), {"Node": SELF, "Peers": [peer(2)]})  # (no approval in our own node yet)
    assert set(router.policy.prefixes) == {net("10.0.0.0/24"), net("0.0.0.0/0"), net("::/0")}
    node.set(advertise_exit_node=False)
    assert router.policy.prefixes == (net("10.0.0.0/24"),)
    node.set(advertise_routes="")
    assert not router.policy.prefixes


def test_statistics_and_status_carry_the_forwarding_section(tmp_path: Path) -> None:
    node, router = with_router(tmp_path, advertise_routes="10.0.0.0/24")
    feed(node, Netmap(), {"Node": SELF, "Peers": [peer(2)]})
    router.table.open_udp((b"\x64\x40\x00\x02", 5000, b"\x0a\x00\x00\x05", 53), 0.0)
    assert node.statistics()["forwarding"]["udp_flows"] == 1
    status = node.routing_status()["forwarding"]
    assert status["udp"] == 1 and status["flows"] == []  # outside a Trio run: counts only, no ages


def test_a_node_that_offers_nothing_shows_no_forwarding_in_status(tmp_path: Path) -> None:
    node, _ = with_router(tmp_path)
    feed(node, Netmap(), {"Node": SELF, "Peers": [peer(2)]})
    assert node.routing_status()["forwarding"] == {}
    assert node.statistics()["forwarding"]["tcp_attempts"] == 0  # the counters are there all the same
