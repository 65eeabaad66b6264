"""The MagicDNS core answers as tailscaled's quad-100 does (tsdns.go, v1.102.5)."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.dns.netmaps import BASE, DB, EXTRA, ME, WEB, view
from trionet.dns import resolver
from trionet.dns.resolver import Answer, Drop, Forward, answer
from trionet.dns.view import EXIT_NODE_DOH, DnsView

NOW = 1_700_000_000.0


def ask(v: DnsView, name: str, rdtype: str = "A", **kw: object) -> Answer | Forward | Drop:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    return answer(v, query.to_wire(), NOW)


def reply(v: DnsView, name: str, rdtype: str = "A") -> dns.message.Message:
    result = ask(v, name, rdtype)
    assert isinstance(result, Answer), result
    return dns.message.from_wire(result.wire)


def records(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


@pytest.mark.parametrize("version", ["0.23", "0.26"])
def test_fqdn_with_and_without_trailing_dot_and_short_names_answer_the_node(version: str) -> None:
    v = view(version)
    for name in (f"web.{BASE}.", f"WEB.{BASE.upper()}.", "web.", f"me.{BASE}."):
        msg = reply(v, name)
        assert msg.rcode() == dns.rcode.NOERROR
        assert records(msg) == [WEB[0] if name.lower().startswith("web") else ME[0]]
        assert msg.answer[0].ttl == resolver.TTL == 5
        assert msg.flags & dns.flags.AA and msg.flags & dns.flags.QR
        assert msg.flags & dns.flags.RA  # dnspython asks with RD


def test_the_answer_owner_keeps_the_case_of_the_question() -> None:
    msg = reply(view(), f"Web.{BASE}.")
    assert msg.answer[0].name.to_text() == f"Web.{BASE}."


def test_short_names_need_magic_dns() -> None:
    v = view(Proxied=False)
    assert isinstance(ask(v, "web."), Forward)  # not ours: the resolvers may know "web"
    assert records(reply(v, f"web.{BASE}.")) == [WEB[0]]  # FQDNs resolve with MagicDNS off too


def test_aaaa_of_a_dual_stack_peer_is_empty_unless_magicdns_aaaa() -> None:
    msg = reply(view(), f"web.{BASE}.", "AAAA")
    assert msg.rcode() == dns.rcode.NOERROR and msg.answer == []
    assert msg.authority[0].rdtype == dns.rdatatype.SOA  # negative answer: the zone's SOA
    v = view(me_kw={"CapMap": {"magicdns-aaaa": None}})
    assert records(reply(v, f"web.{BASE}.", "AAAA")) == [WEB[1]]
    v = view(me_kw={"Capabilities": ["magicdns-aaaa"]})
    assert records(reply(v, "web.", "AAAA")) == [WEB[1]]


def test_an_ipv6_only_self_gets_only_ipv6_answers() -> None:
    from tests.unit.dns.netmaps import dns_config, node
    from trionet.dns.view import build_view
    v = build_view(node(1, f"me.{BASE}.", (ME[1],)), [node(2, f"web.{BASE}.", WEB)], dns_config())
    assert records(reply(v, "web.", "AAAA")) == [WEB[1]]
    msg = reply(v, "web.", "A")
    assert msg.rcode() == dns.rcode.NOERROR and msg.answer == []


def test_extra_records_answer_by_the_value_type() -> None:
    v = view()
    assert records(reply(v, f"extra.{BASE}.")) == [EXTRA]
    assert records(reply(v, "grafana.example.org.")) == ["100.64.0.98"]  # outside our zone, Type ""
    assert records(reply(v, f"v6only.{BASE}.", "AAAA")) == ["fd7a:115c:a1e0::99"]
    empty = reply(v, f"v6only.{BASE}.", "A")
    assert empty.rcode() == dns.rcode.NOERROR and empty.answer == []
    assert isinstance(ask(v, "txt.example.", "TXT"), Forward)  # other types are not served


def test_unknown_name_in_our_zone_is_nxdomain_with_soa() -> None:
    msg = reply(view(), f"nosuch.{BASE}.")
    assert msg.rcode() == dns.rcode.NXDOMAIN and msg.answer == []
    soa = msg.authority[0]
    assert soa.name.to_text() == f"{BASE}." and soa.ttl == 10
    rd = soa[0]
    assert (rd.mname.to_text(), rd.rname.to_text(), rd.serial) == (f"{BASE}.", f"{BASE}.", int(NOW))
    assert (rd.refresh, rd.retry, rd.expire, rd.minimum) == (10, 10, 10, 10)


def test_unknown_name_in_our_zone_is_forwarded_when_magic_dns_is_off() -> None:
    assert isinstance(ask(view(Proxied=False), f"nosuch.{BASE}."), Forward)


def test_existing_name_other_types() -> None:
    v = view()
    assert reply(v, f"web.{BASE}.", "MX").rcode() == dns.rcode.NOERROR
    assert reply(v, f"web.{BASE}.", "MX").answer == []
    for rdtype in ("NS", "SOA", "HINFO"):
        assert reply(v, f"web.{BASE}.", rdtype).rcode() == dns.rcode.NOTIMP
    assert records(reply(v, f"web.{BASE}.", "ANY")) == [WEB[0]]


def test_ptr_of_tailnet_addresses_v4_and_v6() -> None:
    v = view("0.23")  # Name without its trailing dot still reverses to an FQDN
    for ip in (WEB[0], WEB[1]):
        name = ipaddress.ip_address(ip).reverse_pointer + "."
        msg = reply(v, name, "PTR")
        assert records(msg) == [f"web.{BASE}."], ip
        assert msg.answer[0].ttl == 5
    assert records(reply(v, "99.0.64.100.in-addr.arpa.", "PTR")) == [f"extra.{BASE}."]


def test_ptr_of_a_4in6_address_names_its_ipv4_node() -> None:
    four_in_six = ipaddress.IPv6Address("fd7a:115c:a1e0:ab12:4843:cd96:6240:2")  # 100.64.0.2
    msg = reply(view(), four_in_six.reverse_pointer + ".", "PTR")
    assert records(msg) == [f"web.{BASE}."]


def test_ptr_of_quad100_and_the_symbolic_name() -> None:
    v = view(Proxied=False)
    assert records(reply(v, "100.100.100.100.in-addr.arpa.", "PTR")) == ["magicdns.localhost-tailscale-daemon."]
    assert records(reply(v, "magicdns.localhost-tailscale-daemon.", "A")) == ["100.100.100.100"]
    assert records(reply(v, "magicdns.localhost-tailscale-daemon.", "AAAA")) == ["fd7a:115c:a1e0::53"]


def test_ptr_unknown_in_cgnat_is_nxdomain_outside_is_forwarded() -> None:
    v = view()
    msg = reply(v, "77.0.64.100.in-addr.arpa.", "PTR")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.authority[0].name.to_text() == "64.100.in-addr.arpa."
    assert isinstance(ask(v, "1.1.168.192.in-addr.arpa.", "PTR"), Forward)
    assert isinstance(ask(v, "not-an-ip.in-addr.arpa.", "PTR"), Forward)
    assert isinstance(ask(view(Proxied=False), "77.0.64.100.in-addr.arpa.", "PTR"), Forward)


def test_bonjour_browse_names_are_nxdomain_without_asking_anyone() -> None:
    result = ask(view(), "b._dns-sd._udp.0.0.64.100.in-addr.arpa.", "PTR")
    assert isinstance(result, Answer) and result.outcome == "nxdomain"
    msg = dns.message.from_wire(result.wire)
    assert msg.rcode() == dns.rcode.NXDOMAIN and not msg.flags & dns.flags.AA


def test_onion_is_nxdomain() -> None:
    assert reply(view(), "hidden.onion.").rcode() == dns.rcode.NXDOMAIN


def test_4via6_names() -> None:
    v = view()
    assert records(reply(v, "10-1-2-3-via-7.", "AAAA")) == ["fd7a:115c:a1e0:b1a:0:7:a01:203"]
    empty = reply(v, "10-1-2-3-via-7.tail1.ts.net.", "A")  # (a bare ts.net does not count)
    assert empty.rcode() == dns.rcode.NOERROR and empty.answer == []
    assert isinstance(ask(v, "10-1-2-3-via-7.example.com.", "AAAA"), Forward)


def test_forwarding_picks_the_longest_route_then_the_resolvers() -> None:
    v = view()
    fwd = ask(v, "host.lab.corp.example.")
    assert isinstance(fwd, Forward) and fwd.upstreams == ("10.2.2.2",)
    fwd = ask(v, "host.corp.example.")
    assert isinstance(fwd, Forward) and fwd.upstreams == ("10.1.1.1",)
    fwd = ask(v, "example.com.")
    assert isinstance(fwd, Forward) and fwd.upstreams == ("10.9.9.9",)
    nx = reply(v, "x.blackhole.example.")  # a route without resolvers is a zone of ours
    assert nx.rcode() == dns.rcode.NXDOMAIN


def test_no_upstream_is_servfail() -> None:
    result = ask(view(Resolvers=None, Routes=None), "example.com.")
    assert isinstance(result, Answer) and result.outcome == "servfail"
    msg = dns.message.from_wire(result.wire)
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.question[0].name.to_text() == "example.com."


def test_fallback_resolvers_are_the_default_without_resolvers() -> None:
    fwd = ask(view(Resolvers=None, FallbackResolvers=[{"Addr": "10.8.8.8"}]), "example.com.")
    assert isinstance(fwd, Forward) and fwd.upstreams == ("10.8.8.8",)


def test_exit_node_dns_replaces_the_resolvers_and_filters_routes() -> None:
    v = view(exit_node_doh=True)
    fwd = ask(v, "example.com.")
    assert isinstance(fwd, Forward) and fwd.upstreams == (EXIT_NODE_DOH,)
    fwd = ask(v, "host.corp.example.")  # its resolver is not meant for exit nodes: the default
    assert isinstance(fwd, Forward) and fwd.upstreams == (EXIT_NODE_DOH,)
    v = view(exit_node_doh=True, Resolvers=[{"Addr": "10.9.9.9"}, {"Addr": "10.7.7.7", "UseWithExitNode": True}],
             Routes={"corp.example": [{"Addr": "10.1.1.1", "UseWithExitNode": True}]})
    assert ask(v, "example.com.").upstreams == ("10.7.7.7",)  # type: ignore[union-attr]
    assert ask(v, "a.corp.example.").upstreams == ("10.1.1.1",)  # type: ignore[union-attr]


def test_malformed_queries() -> None:
    v = view()
    assert answer(v, b"\x00\x01", NOW) == Drop("malformed_short")
    good = dns.message.make_query("web.ts.test.", "A").to_wire()
    result = answer(v, good[:-3], NOW)  # a cut question
    assert isinstance(result, Answer) and result.outcome == "formerr"
    msg = dns.message.from_wire(result.wire)
    assert msg.rcode() == dns.rcode.FORMERR and msg.id == int.from_bytes(good[:2], "big") and not msg.question
    no_question = good[:4] + b"\x00\x00" + good[6:12]
    assert isinstance(answer(v, no_question, NOW), Answer)
    as_response = good[:2] + bytes([good[2] | 0x80]) + good[3:]
    assert answer(v, as_response, NOW) == Drop("malformed_response")
    notify = good[:2] + bytes([(good[2] & 0x87) | (4 << 3)]) + good[3:]  # opcode NOTIFY
    result = answer(v, notify, NOW)
    assert isinstance(result, Answer) and dns.message.from_wire(result.wire).rcode() == dns.rcode.NOTIMP


def test_a_query_with_an_unknown_tsig_key_is_still_answered() -> None:
    import dns.tsigkeyring
    q = dns.message.make_query(f"web.{BASE}.", "A")
    q.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0"}), keyname="k.")
    result = answer(view(), q.to_wire(), NOW)
    assert isinstance(result, Answer) and records(dns.message.from_wire(result.wire)) == [WEB[0]]


def test_edns_queries_get_answers_without_opt_and_sizes_follow_the_client() -> None:
    result = ask(view(), f"db.{BASE}.", use_edns=0, payload=1232)
    assert isinstance(result, Answer)
    msg = dns.message.from_wire(result.wire)
    assert records(msg) == [DB[0]] and msg.edns < 0
    assert resolver.udp_limit(result.query) == 1232
    assert resolver.udp_limit(None) == 512


def test_fit_udp_truncates_to_the_question_with_tc() -> None:
    fwd = ask(view(), "big.example.")
    assert isinstance(fwd, Forward)
    big = dns.message.make_response(fwd.query.message)
    for i in range(60):
        big.answer.append(dns.rrset.from_text("big.example.", 60, "IN", "A", f"10.0.{i}.1"))
    wire = big.to_wire()
    assert len(wire) > 512
    short = resolver.fit_udp(wire, fwd.query, 65535)
    msg = dns.message.from_wire(short)
    assert msg.flags & dns.flags.TC and not msg.answer and msg.question[0].name.to_text() == "big.example."
    assert resolver.fit_udp(wire, fwd.query, 1 << 16) != wire
    assert resolver.fit_udp(short, fwd.query, 512) == short


def test_upstream_replies_must_match_the_query() -> None:
    fwd = ask(view(), "example.com.")
    assert isinstance(fwd, Forward)
    good = dns.message.make_response(fwd.query.message).to_wire()
    assert resolver.check_upstream_reply(fwd.query, good) is None
    assert resolver.check_upstream_reply(fwd.query, good[:5]) == "short"
    assert resolver.check_upstream_reply(fwd.query, bytes([good[0] ^ 1]) + good[1:]) == "id_mismatch"
    other = dns.message.make_query("example.org.", "A")
    other.id = fwd.query.message.id
    assert resolver.check_upstream_reply(fwd.query, dns.message.make_response(other).to_wire()) \
        == "question_mismatch"
    assert resolver.check_upstream_reply(fwd.query, fwd.wire) == "not_response"


def test_lookup_for_dialing_takes_short_names_even_without_magic_dns() -> None:
    v = view(Proxied=False)
    assert resolver.lookup_node_addresses(v, "web") == [ipaddress.ip_address(a) for a in WEB]
    assert resolver.lookup_node_addresses(v, f"WEB.{BASE}.") == [ipaddress.ip_address(a) for a in WEB]
    assert resolver.lookup_node_addresses(v, f"extra.{BASE}") == [ipaddress.ip_address(EXTRA)]
    assert resolver.lookup_node_addresses(v, "nosuch") is None


def test_a_later_node_takes_a_name_an_earlier_one_had() -> None:
    from tests.unit.dns.netmaps import dns_config, node
    from trionet.dns.view import build_view
    v = build_view(node(1, f"me.{BASE}.", ME), [node(9, f"web.{BASE}.", DB), node(2, f"web.{BASE}.", WEB)],
                   dns_config())
    assert records(reply(v, "web.")) == [DB[0]]  # peers in ID order: 9 comes last


def test_subdomains_of_a_node_with_the_capability() -> None:
    from tests.unit.dns.netmaps import dns_config, node
    from trionet.dns.view import build_view
    v = build_view(node(1, f"me.{BASE}.", ME), [node(2, f"web.{BASE}.", WEB,
                                                      CapMap={"dns-subdomain-resolve": None})], dns_config())
    assert records(reply(v, f"app.web.{BASE}.")) == [WEB[0]]
    assert reply(v, f"app.me.{BASE}.").rcode() == dns.rcode.NXDOMAIN


def test_a_malformed_dns_config_is_skipped_and_named() -> None:
    v = view(Routes="nope", Resolvers=[{"Addr": 5}, "x", {"Addr": "10.9.9.9"}],
             ExtraRecords=[{"Name": "x.", "Value": "not-an-ip"}, 7])
    assert v.resolvers == ("10.9.9.9",)
    assert len(v.problems) >= 4
    assert records(reply(v, f"web.{BASE}.")) == [WEB[0]]


_SEEDS = [dns.message.make_query(n, t, use_edns=e).to_wire() for n, t, e in (
    (f"web.{BASE}.", "A", None), ("77.0.64.100.in-addr.arpa.", "PTR", 0), ("example.com.", "AAAA", 0))]


@settings(max_examples=400, deadline=None)
@given(seed=st.sampled_from(_SEEDS), flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                                     max_size=6), cut=st.integers(0, 200))
def test_mutated_queries_never_raise_and_replies_parse(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    result = answer(_VIEW, bytes(data[:cut] if cut < len(data) else data), NOW)
    assert isinstance(result, (Answer, Forward, Drop))
    if isinstance(result, Answer):
        dns.message.from_wire(result.wire)  # what we send is a DNS message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert isinstance(answer(_VIEW, data, NOW), (Answer, Forward, Drop))


_VIEW = view()
