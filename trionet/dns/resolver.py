"""MagicDNS answers, sans-IO: a query's bytes in, a reply's bytes or a forwarding decision out.

`answer(view, query, now)` does what tailscaled's quad-100 resolver does
(net/dns/resolver/tsdns.go respond, resolveLocal, respondReverse at v1.102.5):

* names are matched lowercased, as FQDNs;
* A/AAAA/ANY of an extra record, then of a node (FQDN; short name only with
  MagicDNS on), then of a node's subdomain when the node has that capability:
  one record, TTL 5 s; a name that exists without that type: NOERROR, empty;
  NS/SOA/AXFR/HINFO of such a name: NOTIMP; any other type: NOERROR, empty;
* `magicdns.localhost-tailscale-daemon.` is quad-100; `*.onion` is NXDOMAIN;
  `<a-b-c-d>-via-<site>` names (4via6) get their AAAA;
* PTR of a tailnet address (in-addr.arpa / ip6.arpa) is the node's `Name`
  (an extra record's name first; Tailscale's 4-in-6 addresses as their IPv4);
* a name we do not know inside one of our zones: NXDOMAIN; NXDOMAIN and empty
  NOERROR carry the zone's SOA (TTL and timers 10 s, serial = unix time);
* anything else is forwarded (`Forward`) to the longest matching route, else
  the default resolvers; none: SERVFAIL. Bonjour browse names are answered
  NXDOMAIN without asking anyone (forwarder.go).

Queries are parsed and replies built with dnspython: a well-kept, widely used
and typed DNS wire-format library, where a codec of our own would meet hostile
input with far less behind it. A query that does not parse gets FORMERR (its header, no question);
fewer than 12 bytes, or a message that is itself a response, is dropped.
Deliberate differences from tailscaled: other opcodes than QUERY get NOTIMP
(tailscaled answers them as queries), and a reply too big for the client's
UDP size is truncated to its question with TC set (tailscaled sets TC and
sends it whole, which our 1280-byte MTU could not carry).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

import attrs
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from trionet.dns.view import (
    QUAD100_V4,
    QUAD100_V6,
    SYMBOLIC_NAME,
    DnsView,
    IPAddress,
    NodeName,
    answer_addresses,
    has_suffix,
    zone_contains,
)

TTL = 5  # tsdns.go defaultTTL: node renames show within seconds
NEGATIVE_TTL = 10  # tsdns.go negativeTTL, in the SOA of negative answers (RFC 2308)
MAX_UDP_DEFAULT = 512  # RFC 1035, without EDNS
HEADER = 12

_4TO6 = ipaddress.IPv6Network("fd7a:115c:a1e0:ab12:4843:cd96:6200::/104")  # tsaddr Tailscale4To6Range
_VIA = ipaddress.IPv6Network("fd7a:115c:a1e0:b1a::/64")  # tsaddr TailscaleViaRange
_BONJOUR = ("b", "db", "r", "dr", "lb")
_NOT_IMPLEMENTED = frozenset({dns.rdatatype.NS, dns.rdatatype.SOA, dns.rdatatype.AXFR, dns.rdatatype.HINFO})

Outcome = Literal["local", "nxdomain", "notimp", "formerr", "servfail", "refused"]


@attrs.frozen
class Query:
    """A parsed query: the message, its first question, the name as we match it."""

    message: dns.message.Message
    name: str  # lowercased FQDN with a trailing dot
    rdtype: int
    edns_payload: int | None  # the client's UDP size when it sent EDNS


@attrs.frozen
class Answer:
    """Send `wire` back. `outcome` is what the counters call it."""

    wire: bytes
    outcome: Outcome
    query: Query | None = None


@attrs.frozen
class Forward:
    """Ask `upstreams` (resolver addresses, or `EXIT_NODE_DOH`) and relay what they say."""

    query: Query
    wire: bytes  # the query as the client sent it
    upstreams: tuple[str, ...]


@attrs.frozen
class Drop:
    """Send nothing: `reason` for the counters."""

    reason: str


Result = Answer | Forward | Drop


# ------------------------------------------------------------------ parsing
def parse_query(wire: bytes) -> Query | Answer | Drop:
    if len(wire) < HEADER:
        return Drop("malformed_short")
    flags = struct.unpack_from("!H", wire, 2)[0]
    if flags & dns.flags.QR:
        return Drop("malformed_response")  # answering responses could bounce between two servers
    try:
        message = dns.message.from_wire(wire, ignore_trailing=True)
    except Exception:  # anything the parser raises on hostile input
        try:  # an unknown TSIG key, a bad EDNS option: the question may still be readable
            message = dns.message.from_wire(wire, question_only=True, ignore_trailing=True)
        except Exception:
            return Answer(_header_only(wire, dns.rcode.FORMERR), "formerr")
    if not message.question:
        return Answer(_header_only(wire, dns.rcode.FORMERR), "formerr")
    if message.opcode() != dns.opcode.QUERY:
        return Answer(_header_only(wire, dns.rcode.NOTIMP), "notimp")
    question = message.question[0]
    labels = question.name.labels
    name = (b".".join(labels[:-1]).lower().decode("latin-1") + ".") if len(labels) > 1 else "."
    payload = message.payload if message.edns >= 0 else None
    return Query(message, name, question.rdtype, payload)


def _header_only(wire: bytes, rcode: int) -> bytes:
    """The query's header back as a response with `rcode` and no sections (tsdns.go: a
    query it cannot parse is answered FORMERR, without the question)."""
    msg_id, flags = struct.unpack_from("!HH", wire, 0)
    reply = dns.message.Message(id=msg_id)
    reply.flags = (flags | dns.flags.QR | dns.flags.AA) & ~dns.flags.TC & 0xFFF0
    if flags & dns.flags.RD:
        reply.flags |= dns.flags.RA
    reply.set_rcode(dns.rcode.Rcode.make(rcode))
    return reply.to_wire()


# ------------------------------------------------------------------- answers
def answer(view: DnsView, wire: bytes, now: float) -> Result:
    """What to do with one query. `now`: unix time, for the SOA serial."""
    parsed = parse_query(wire)
    if not isinstance(parsed, Query):
        return parsed
    query = parsed
    if query.rdtype == dns.rdatatype.PTR:
        result = _reverse(view, query, now)
    else:
        result = _forward_lookup(view, query, now)
    if result is not None:
        return result
    return forward_or_fail(view, query, wire)


def forward_or_fail(view: DnsView, query: Query, wire: bytes) -> Answer | Forward:
    """Where a name we do not answer goes: NXDOMAIN for Bonjour browsing, the
    longest matching route, the default resolvers, or SERVFAIL."""
    if _is_bonjour(query.name):
        return Answer(_reply(query, dns.rcode.NXDOMAIN, authoritative=False).to_wire(), "nxdomain", query)
    upstreams = upstreams_for(view, query.name)
    if not upstreams:
        return Answer(servfail(query), "servfail", query)
    return Forward(query, wire, upstreams)


def upstreams_for(view: DnsView, name: str) -> tuple[str, ...]:
    for zone, upstreams in view.routes:
        if zone_contains(zone, name):
            return upstreams
    return ()


def _forward_lookup(view: DnsView, query: Query, now: float) -> Answer | None:
    """A local answer, or None: forward."""
    name, rdtype = query.name, query.rdtype
    if has_suffix(name, "onion"):  # RFC 7686
        return _negative(view, query, dns.rcode.NXDOMAIN, now)
    if name == SYMBOLIC_NAME and rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return _positive(query, [QUAD100_V4 if rdtype == dns.rdatatype.A else QUAD100_V6])
    via = _via(name, rdtype)
    if via is not None:
        return _positive(query, via) if via else _negative(view, query, dns.rcode.NOERROR, now)
    addresses = lookup_addresses(view, name)
    if addresses is None:
        if authoritative_zone(view, name):
            return _negative(view, query, dns.rcode.NXDOMAIN, now)
        return None
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        version = 4 if rdtype == dns.rdatatype.A else 6
        picked = next((a for a in addresses if a.version == version), None)
        return _positive(query, [picked]) if picked is not None else _negative(view, query, dns.rcode.NOERROR, now)
    if rdtype == dns.rdatatype.ANY:
        return _positive(query, addresses[:1]) if addresses else _negative(view, query, dns.rcode.NOERROR, now)
    if rdtype in _NOT_IMPLEMENTED:
        return Answer(_reply(query, dns.rcode.NOTIMP).to_wire(), "notimp", query)
    return Answer(_reply(query, dns.rcode.NOERROR).to_wire(), "local", query)  # the name exists; no such records


def lookup_addresses(view: DnsView, name: str, *, short_names: bool | None = None) -> list[IPAddress] | None:
    """The addresses a name has here (maybe none), or None when it is not ours.
    `short_names`: resolve one-label names (default: when MagicDNS is on, as
    quad-100 does; tailscaled's own dialer always does)."""
    hosts = view.hosts.get(name)
    if hosts is not None:
        return list(hosts)
    node = _node(view, name, view.proxied if short_names is None else short_names)
    if node is not None:
        return answer_addresses(view, node.addresses) if node.addresses else None
    parent = name
    while parent.count(".") > 1:  # a node's subdomains, when the node says they are its
        parent = parent.partition(".")[2]
        node = _node(view, parent, view.proxied if short_names is None else short_names)
        if node is not None and node.subdomains:
            return answer_addresses(view, node.addresses) if node.addresses else None
    return None


def lookup_node_addresses(view: DnsView, name: str) -> list[IPAddress] | None:
    """All of a name's addresses for dialing it, as tailscaled's dialer finds them
    (ipnlocal/resolve.go resolveMagicDNS): a node by FQDN or short name (with
    MagicDNS on or off), else an extra record. None: not a tailnet name."""
    fqdn = name.lower().rstrip(".") + "."
    node = _node(view, fqdn, True)
    if node is not None and node.addresses:
        return list(node.addresses)
    hosts = view.hosts.get(fqdn)
    return list(hosts) if hosts else None


def _node(view: DnsView, fqdn: str, short_names: bool) -> NodeName | None:
    canon = fqdn[:-1]
    if not short_names and "." not in canon:
        return None
    return view.nodes.get(canon)


def authoritative_zone(view: DnsView, name: str) -> str:
    """The zone of ours that holds `name`, or ""."""
    return next((zone for zone in view.local_domains if zone_contains(zone, name)), "")


def _via(name: str, rdtype: int) -> list[IPAddress] | None:
    """4via6 (tsdns.go resolveViaDomain): "192-168-1-2-via-7[.ts.net]" -> the site's IPv6;
    an empty list for A (the name exists, without IPv4); None: not such a name."""
    if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.ANY):
        return None
    fqdn = name[:-1]
    if len(fqdn) < len("0-0-0-0-via-0") or "-via-" not in fqdn:
        return None
    first, _, domain = fqdn.partition(".")
    if domain and not (has_suffix(domain, "ts.net") or has_suffix(domain, "tailscale.net")):
        return None
    dashed, _, site = first.partition("-via-")
    try:
        v4 = ipaddress.IPv4Address(dashed.replace("-", "."))
        site_id = int(site, 0)
    except ValueError:
        return None
    if not 0 <= site_id < 1 << 32:
        return None
    if rdtype == dns.rdatatype.A:
        return []
    base = _VIA.network_address.packed[:8]
    return [ipaddress.IPv6Address(base + site_id.to_bytes(4, "big") + v4.packed)]


# ------------------------------------------------------------------- reverse
def _reverse(view: DnsView, query: Query, now: float) -> Answer | None:
    name = query.name
    if _is_bonjour(name):
        return None  # forwarded, where it is answered NXDOMAIN
    ip = reverse_name_to_ip(name)
    if ip is None:
        return None  # not a well-formed reverse name: the upstream may know it
    if isinstance(ip, ipaddress.IPv6Address) and ip in _4TO6:
        found = _name_for_ip(view, ipaddress.IPv4Address(b"\x64" + ip.packed[13:]))
        if found is not None:
            return _ptr(query, found)
    found = _name_for_ip(view, ip)
    if found is not None:
        return _ptr(query, found)
    if authoritative_zone(view, name):
        return _negative(view, query, dns.rcode.NXDOMAIN, now)
    return None


def _name_for_ip(view: DnsView, ip: IPAddress) -> str | None:
    if ip in (QUAD100_V4, QUAD100_V6):
        return SYMBOLIC_NAME
    return view.host_ptr.get(ip) or view.node_ptr.get(ip)


def reverse_name_to_ip(name: str) -> IPAddress | None:
    """"4.3.2.1.in-addr.arpa." -> 1.2.3.4; 32 nibbles + ".ip6.arpa." -> the IPv6; else None."""
    if name.endswith(".in-addr.arpa."):
        try:
            return ipaddress.IPv4Address(bytes(reversed(ipaddress.IPv4Address(name[:-14]).packed)))
        except ValueError:
            return None
    if name.endswith(".ip6.arpa."):
        nibbles = name[:-10]
        if len(nibbles) != 63 or nibbles[1::2] != "." * 31:
            return None
        try:
            return ipaddress.IPv6Address(bytes.fromhex(nibbles[::2][::-1]))
        except ValueError:
            return None
    return None


def _is_bonjour(name: str) -> bool:
    first, _, rest = name.partition(".")
    return first in _BONJOUR and rest.startswith("_dns-sd._udp.")


# ----------------------------------------------------------------- building
def _reply(query: Query, rcode: int, *, authoritative: bool = True) -> dns.message.Message:
    """A reply to `query` with its first question and its header flags (tsdns.go
    marshalResponse: QR, AA, RA when RD was asked), no EDNS."""
    reply = dns.message.Message(id=query.message.id)
    flags = (query.message.flags | dns.flags.QR) & ~dns.flags.TC & 0xFFF0
    if authoritative:
        flags |= dns.flags.AA
    if flags & dns.flags.RD:
        flags |= dns.flags.RA
    reply.flags = flags
    reply.set_rcode(dns.rcode.Rcode.make(rcode))
    reply.question = [query.message.question[0]]
    return reply


def _positive(query: Query, addresses: list[IPAddress]) -> Answer:
    reply = _reply(query, dns.rcode.NOERROR)
    qname = query.message.question[0].name
    for ip in addresses:
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A if ip.version == 4 else dns.rdatatype.AAAA,
                                    str(ip))
        reply.answer.append(dns.rrset.from_rdata(qname, TTL, rdata))
    return Answer(reply.to_wire(), "local", query)


def _ptr(query: Query, target: str) -> Answer:
    reply = _reply(query, dns.rcode.NOERROR)
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, dns.name.from_text(target).to_text())
    reply.answer.append(dns.rrset.from_rdata(query.message.question[0].name, TTL, rdata))
    return Answer(reply.to_wire(), "local", query)


def _negative(view: DnsView, query: Query, rcode: int, now: float) -> Answer:
    """NXDOMAIN, or NOERROR without records, with our zone's SOA when the name is in one."""
    reply = _reply(query, rcode)
    zone = authoritative_zone(view, query.name)
    if zone:
        origin = dns.name.from_text(zone)
        timers = " ".join([str(NEGATIVE_TTL)] * 4)
        soa = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA,
                                  f"{zone} {zone} {int(now) & 0xFFFFFFFF} {timers}")
        reply.authority.append(dns.rrset.from_rdata(origin, NEGATIVE_TTL, soa))
    return Answer(reply.to_wire(), "nxdomain" if rcode == dns.rcode.NXDOMAIN else "local", query)


def servfail(query: Query) -> bytes:
    """SERVFAIL with the question (forwarder.go servfailResponse: authoritative)."""
    return _reply(query, dns.rcode.SERVFAIL).to_wire()


# ---------------------------------------------------------------- upstreams
def udp_limit(query: Query | None) -> int:
    """The largest UDP reply the client takes: its EDNS size (at least 512), else 512."""
    if query is None or query.edns_payload is None:
        return MAX_UDP_DEFAULT
    return max(MAX_UDP_DEFAULT, query.edns_payload)


def fit_udp(reply: bytes, query: Query | None, limit: int) -> bytes:
    """`reply` if it fits the client's UDP size and `limit`, else its header and the
    question with TC set, so the client asks again over TCP."""
    if len(reply) <= min(limit, udp_limit(query)) or query is None or len(reply) < HEADER:
        return reply
    msg_id, flags = struct.unpack_from("!HH", reply, 0)
    short = dns.message.Message(id=msg_id)
    short.flags = (flags | dns.flags.TC) & 0xFFF0
    short.set_rcode(dns.rcode.Rcode.make(flags & 0xF))
    short.question = [query.message.question[0]]
    return short.to_wire()


def check_upstream_reply(query: Query, reply: bytes) -> str | None:
    """Why an upstream's reply is not the answer to `query` (None: it is): same ID,
    a response, the same question. Off-path forgeries must guess all three."""
    if len(reply) < HEADER:
        return "short"
    msg_id, flags = struct.unpack_from("!HH", reply, 0)
    if msg_id != query.message.id:
        return "id_mismatch"
    if not flags & dns.flags.QR:
        return "not_response"
    try:
        parsed = dns.message.from_wire(reply, question_only=True, ignore_trailing=True)
    except Exception:  # anything the parser raises on hostile input
        return "malformed"
    ours = query.message.question[0]
    if not parsed.question or (parsed.question[0].name, parsed.question[0].rdtype) != (ours.name, ours.rdtype):
        return "question_mismatch"
    return None


def reply_rcode(reply: bytes) -> int:
    return struct.unpack_from("!H", reply, 2)[0] & 0xF if len(reply) >= HEADER else dns.rcode.FORMERR


def truncated(reply: bytes) -> bool:
    return len(reply) >= HEADER and bool(struct.unpack_from("!H", reply, 2)[0] & dns.flags.TC)
