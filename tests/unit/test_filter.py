from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from trionet.filter import PacketFilter, parse_ip_set

ME = ipaddress.ip_network("100.64.0.5/32")
ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]


def ip4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    total = 20 + len(l4)
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + l4)


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


def test_allow_all_and_deny_all() -> None:
    syn = ip4("100.64.0.2", "100.64.0.5", 6, tcp(5555, 80, 0x02))
    assert PacketFilter(ALLOW_ALL, [ME]).allow_inbound(syn)
    deny = PacketFilter([], [ME])
    assert not deny.allow_inbound(syn)
    assert deny.drops["no rule"] == 1
    # continuation of a connection we opened passes without a rule
    assert deny.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 6, tcp(80, 5555, 0x10)))


def test_port_rule_and_source_restriction() -> None:
    rules = [{"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "100.64.0.5/32", "Ports": {"First": 80, "Last": 80}}],
              "IPProto": [6]}]
    f = PacketFilter(rules, [ME])
    assert f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 6, tcp(1, 80, 0x02)))
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 6, tcp(1, 81, 0x02)))
    assert not f.allow_inbound(ip4("100.64.0.3", "100.64.0.5", 6, tcp(1, 80, 0x02)))
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 17, udp(1, 80)))  # wrong proto
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.9", 6, tcp(1, 80, 0x02)))  # not ours


def test_udp_reply_to_our_flow_passes() -> None:
    f = PacketFilter([], [ME])
    reply = ip4("100.64.0.2", "100.64.0.5", 17, udp(53, 40000))
    assert not f.allow_inbound(reply)
    f.note_outbound(ip4("100.64.0.5", "100.64.0.2", 17, udp(40000, 53)))
    assert f.allow_inbound(reply)


def test_a_burst_notes_its_udp_flows_among_tcp_and_runts() -> None:
    f = PacketFilter([], [ME])
    segment = ip4("100.64.0.5", "100.64.0.2", 6, tcp(40000, 80, 0x10))
    f.note_outbound_many([segment] * 5)
    assert not f.udp_flows
    query = ip4("100.64.0.5", "100.64.0.2", 17, udp(40001, 53))
    f.note_outbound_many([segment, b"\x45", segment, query, segment])
    assert f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 17, udp(53, 40001)))
    assert len(f.udp_flows) == 1


def test_icmp_echo_reply_always_passes_request_needs_rule() -> None:
    f = PacketFilter([], [ME])
    assert f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 1, b"\x00\x00\x00\x00\x00\x01\x00\x01"))
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 1, b"\x08\x00\x00\x00\x00\x01\x00\x01"))
    assert PacketFilter(ALLOW_ALL, [ME]).allow_inbound(
        ip4("100.64.0.2", "100.64.0.5", 1, b"\x08\x00\x00\x00\x00\x01\x00\x01"))


def test_ip_set_forms() -> None:
    assert parse_ip_set("10.0.0.1-10.0.0.4") == [ipaddress.ip_network("10.0.0.1/32"),
                                               ipaddress.ip_network("10.0.0.2/31"),
                                               ipaddress.ip_network("10.0.0.4/32")]
    assert parse_ip_set("cap:foo") == []
    assert len(parse_ip_set("*")) == 2


@given(st.binary(max_size=80))
def test_garbage_never_raises(data: bytes) -> None:
    f = PacketFilter(ALLOW_ALL, [ME])
    f.check_inbound(data)
    f.note_outbound(data)


def test_a_rule_with_a_string_where_a_list_belongs_grants_nothing() -> None:
    syn = ip4("0.0.0.1", "100.64.0.5", 6, tcp(1, 80, 0x02))
    dst = [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]
    for bad in ({"SrcIPs": "1", "DstPorts": dst}, {"SrcIPs": ["*"], "DstPorts": "*"},
                {"SrcIPs": ["*"], "DstPorts": dst, "IPProto": 6}):
        f = PacketFilter([bad], [ME])
        assert not f.allow_inbound(syn), bad  # "1" must not be read as 0.0.0.1
    assert PacketFilter([{"SrcIPs": ["*"], "DstPorts": dst}], [ME]).allow_inbound(syn)


def test_capability_grant_only_rules_do_not_admit_packets() -> None:
    """Headscale 0.29 sends an `app` grant as {SrcIPs, CapGrant} without DstPorts, SrcIPs
    possibly empty; tailscaled ignores such rules for packets, and so do we."""
    cap_rules = [
        {"SrcIPs": ["*"], "CapGrant": [{"Dsts": ["100.64.0.5/32"], "CapMap": {"example.com/cap/x": [{}]}}]},
        {"SrcIPs": [], "CapGrant": [{"Dsts": ["100.64.0.5/32"], "CapMap": {"tailscale.com/cap/relay": None}}]},
    ]
    f = PacketFilter(cap_rules, [ME])
    assert f.matches == []
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 6, tcp(1, 80, 0x02)))
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 17, udp(1, 80)))
    assert not f.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 1, b"\x08\x00\x00\x00\x00\x01\x00\x01"))
    # beside an ordinary rule, the grant neither adds nor takes anything away
    port_80 = {"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "100.64.0.5", "Ports": {"First": 80, "Last": 80}}]}
    mixed = PacketFilter([*cap_rules, port_80], [ME])
    assert len(mixed.matches) == 1
    assert mixed.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 6, tcp(1, 80, 0x02)))
    assert not mixed.allow_inbound(ip4("100.64.0.2", "100.64.0.5", 6, tcp(1, 81, 0x02)))
