"""Which destinations a router forwards, and the flow table's limits and counts."""

from __future__ import annotations

import ipaddress

from trionet.router import ForwardTable, RoutePolicy


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_only_addresses_inside_the_prefixes_are_forwarded() -> None:
    policy = RoutePolicy(["192.168.50.0/24", "fd00:50::/64"])
    assert policy.wants(packed("192.168.50.9")) and policy.wants(packed("fd00:50::9"))
    assert not policy.wants(packed("192.168.51.9")) and not policy.wants(packed("fd00:51::9"))
    policy.set_prefixes([])
    assert not policy.wants(packed("192.168.50.9"))  # the cache went with the old prefixes


def test_an_exit_node_never_forwards_to_the_hosts_own_loopback_link_local_or_tailnet() -> None:
    policy = RoutePolicy(["0.0.0.0/0", "::/0"])
    assert policy.wants(packed("203.0.113.5")) and policy.wants(packed("2001:db8::5"))
    for guarded in ("127.0.0.1", "169.254.169.254", "100.64.0.7", "224.0.0.1", "0.0.0.0",
                    "::1", "fe80::1", "ff02::1", "fd7a:115c:a1e0::5"):
        assert not policy.wants(packed(guarded)), guarded


def test_a_guarded_range_is_forwarded_when_a_route_names_it() -> None:
    policy = RoutePolicy(["0.0.0.0/0", "169.254.169.254/32", "127.0.0.0/8"])
    assert policy.wants(packed("169.254.169.254")) and policy.wants(packed("127.0.0.53"))
    assert not policy.wants(packed("169.254.1.1"))  # the /0 does not name the rest


def test_tcp_limits_per_peer_and_total_and_the_counts() -> None:
    table = ForwardTable(max_tcp=3, max_tcp_per_peer=2)
    a, b = packed("100.64.0.1"), packed("100.64.0.2")
    dst = packed("10.1.0.5")
    flows = [table.open_tcp((a, port, dst, 80), 0.0) for port in (1, 2, 3)]
    assert flows[2] is None and flows[0] is not None and flows[1] is not None
    assert table.open_tcp((b, 1, dst, 80), 0.0) is not None
    assert table.open_tcp((b, 2, dst, 80), 0.0) is None  # the total
    table.tcp_established(flows[0])
    flows[0].counts[0] += 10
    table.close_tcp(flows[0], "completed")
    table.close_tcp(flows[1], "refused")
    stats = table.statistics()
    assert stats["tcp_dropped_limit"] == 2 and stats["tcp_completed"] == 1 and stats["tcp_refused"] == 1
    assert stats["bytes_from_peer"] == 10 and stats["tcp_dialing"] == 1 and stats["tcp_open"] == 0


def test_udp_idle_timeout_is_30_s_for_dns_and_2_min_otherwise() -> None:
    table = ForwardTable()
    src, dst = packed("100.64.0.1"), packed("10.1.0.5")
    dns = table.open_udp((src, 5000, dst, 53), 10.0)
    other = table.open_udp((src, 5001, dst, 9999), 10.0)
    assert dns is not None and other is not None
    assert table.idle_deadline(dns) == 40.0 and table.idle_deadline(other) == 130.0
    table.udp_to_peer(other, 5, 100.0)  # any packet, either way, moves it
    assert table.idle_deadline(other) == 220.0


def test_status_lists_a_bounded_number_of_flows_oldest_first() -> None:
    table = ForwardTable()
    src, dst = packed("100.64.0.1"), packed("10.1.0.5")
    for port in range(10):
        table.open_udp((src, 1000 + port, dst, 7), float(port))
    status = table.status(20.0, limit=3)
    assert status["udp"] == 10 and len(status["flows"]) == 3
    assert status["flows"][0]["peer"] == "100.64.0.1:1000" and status["flows"][0]["age"] == 20.0
