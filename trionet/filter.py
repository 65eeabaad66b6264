"""The netmap's packet filter, enforced on inbound packets (sans-IO).

Semantics follow tailscale wgengine/filter (filter.go runIn4/runIn6, match.go):

* the destination must be one of our "local nets": our addresses, and for a
  subnet router or exit node what it advertises (`trionet.advertise.local_nets`,
  a few hundred prefixes once a /0 is shrunk: looked up by bisection);
* ICMP echo replies and errors always pass; other ICMP passes if any rule
  allows src -> dst on some port;
* TCP without SYN passes (continuations of connections we opened); a SYN
  must match a rule;
* UDP passes if we recently sent the reverse flow, else must match;
* TSMP (protocol 99) passes; other protocols need an all-ports rule;
* a rule that carries only capability grants (``CapGrant``, no ``DstPorts``:
  what Headscale 0.29 makes of an ``app`` grant) is not a packet rule at all
  (tailscaled turns it into a match without destinations, which its
  matchesFamily drops; filter.go New/matchesFamily).

Outbound traffic is not filtered; it only feeds the UDP flow cache.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any

import attrs

from trionet.rejects import RejectLog

log = logging.getLogger(__name__)

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

TCP, UDP, ICMP4, ICMP6, TSMP, SCTP = 6, 17, 1, 58, 99, 132
DEFAULT_PROTOS = frozenset({TCP, UDP, ICMP4, ICMP6})
UDP_FLOW_CACHE = 512  # filter.go lruMax
_FIRST_BYTE, _IPV4_PROTO = itemgetter(0), itemgetter(9)
_IPV4_NO_OPTIONS, _TCP_ONLY = {0x45}, {TCP}
ALL_V4 = ipaddress.ip_network("0.0.0.0/0")
ALL_V6 = ipaddress.ip_network("::/0")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def parse_ip_set(text: str) -> list[IPNet]:
    """One FilterRule address: "*", an IP, a CIDR or a range "a-b"."""
    if text == "*":
        return [ALL_V4, ALL_V6]
    if text.startswith("cap:"):
        return []  # capability-based sources need peer caps; none match a bare packet
    if "-" in text and "/" not in text:
        lo, hi = (ipaddress.ip_address(p) for p in text.split("-", 1))
        return list(ipaddress.summarize_address_range(lo, hi))
    return [ipaddress.ip_network(text, strict=False)]


@attrs.frozen
class DstMatch:
    nets: tuple[IPNet, ...]
    first: int
    last: int


@attrs.frozen
class Match:
    protos: frozenset[int]
    srcs: tuple[IPNet, ...]
    dsts: tuple[DstMatch, ...]


@attrs.frozen
class PacketInfo:
    version: int
    proto: int
    src: IPAddr
    dst: IPAddr
    src_port: int = 0
    dst_port: int = 0
    tcp_syn_only: bool = False  # SYN without ACK: a new connection
    icmp_response: bool = False  # echo reply or error


def _list(value: Any) -> list[Any]:
    """A JSON list field; a string or number where a list belongs makes the rule unreadable."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return list(value)


def compile_rules(rules: Iterable[Any]) -> list[Match]:
    out = []
    for rule in rules or ():
        try:
            if _get(rule, "CapGrant") and not _get(rule, "DstPorts"):
                continue  # capabilities for WhoIs, not packets
            protos = frozenset(_list(_get(rule, "IPProto"))) or DEFAULT_PROTOS
            srcs = tuple(n for s in _list(_get(rule, "SrcIPs")) for n in parse_ip_set(s))
            dsts = []
            for dp in _list(_get(rule, "DstPorts")):
                ports = _get(dp, "Ports") or {}
                dsts.append(DstMatch(tuple(parse_ip_set(_get(dp, "IP"))),
                                     int(_get(ports, "First", 0)), int(_get(ports, "Last", 0))))
        except (ValueError, TypeError, AttributeError, OverflowError):
            continue  # a rule we cannot read (a non-string IP, an infinite port) grants nothing
        out.append(Match(protos, srcs, tuple(dsts)))
    return out


def parse_packet(packet: bytes | bytearray | memoryview) -> PacketInfo | None:
    """The fields the filter needs, or None for a packet too short to judge."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
        src: IPAddr = ipaddress.IPv4Address(bytes(packet[12:16]))
        dst: IPAddr = ipaddress.IPv4Address(bytes(packet[16:20]))
        frag = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
        l4 = ihl if frag == 0 else len(packet)  # later fragments carry no ports
    elif version == 6 and len(packet) >= 40:
        proto = packet[6]
        src = ipaddress.IPv6Address(bytes(packet[8:24]))
        dst = ipaddress.IPv6Address(bytes(packet[24:40]))
        l4 = 40
    else:
        return None
    sport = dport = 0
    syn_only = icmp_resp = False
    if proto in (TCP, UDP, SCTP) and len(packet) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", packet, l4)
        if proto == TCP and len(packet) >= l4 + 14:
            flags = packet[l4 + 13]
            syn_only = bool(flags & 0x02) and not flags & 0x10
    elif proto == ICMP4 and len(packet) > l4:
        icmp_resp = packet[l4] in (0, 3, 11, 12)  # echo reply, unreachable, time exceeded, param
    elif proto == ICMP6 and len(packet) > l4:
        t = packet[l4]
        icmp_resp = t == 129 or t < 128  # echo reply or an error
    return PacketInfo(version, proto, src, dst, sport, dport, syn_only, icmp_resp)


def _in(addr: IPAddr, nets: Sequence[IPNet]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _ranges(nets: Iterable[IPNet]) -> dict[int, tuple[list[int], list[int]]]:
    """Per IP version: the nets as sorted, merged [start, end] integer ranges."""
    out: dict[int, tuple[list[int], list[int]]] = {4: ([], []), 6: ([], [])}
    for net in sorted(nets, key=lambda n: (n.version, int(n.network_address))):
        starts, ends = out[net.version]
        first, last = int(net.network_address), int(net.broadcast_address)
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return out


class PacketFilter:
    def __init__(self, rules: Iterable[Any] = (), local: Iterable[IPNet] = ()) -> None:
        self.matches = compile_rules(rules)
        self.local = list(local)
        self.udp_flows: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.drops: Counter[str] = Counter()
        self._rejects = RejectLog(log, "filter", self.drops)
        self._local_raw = self._raw_locals()
        self._local_ranges = _ranges(self.local)

    def _raw_locals(self) -> frozenset[bytes]:
        return frozenset(n.network_address.packed for n in self.local if n.num_addresses == 1)

    def update(self, rules: Iterable[Any] | None = None, local: Iterable[IPNet] | None = None) -> None:
        if rules is not None:
            self.matches = compile_rules(rules)
        if local is not None:
            self.local = list(local)
            self._local_raw = self._raw_locals()
            self._local_ranges = _ranges(self.local)

    def is_local(self, addr: IPAddr) -> bool:
        """Whether `addr` is in the local nets (a destination this node takes packets for)."""
        starts, ends = self._local_ranges[addr.version]
        i = bisect.bisect_right(starts, int(addr)) - 1
        return i >= 0 and int(addr) <= ends[i]

    def note_outbound(self, packet: bytes | memoryview) -> None:
        self.note_outbound_many((packet,))

    def note_outbound_many(self, packets: Sequence[bytes | memoryview]) -> None:
        """Outbound UDP/SCTP flows, so their replies pass; everything else returns at
        once (a burst of IPv4 TCP costs two C-level passes, not a Python loop)."""
        try:
            if set(map(_FIRST_BYTE, packets)) == _IPV4_NO_OPTIONS and set(map(_IPV4_PROTO, packets)) == _TCP_ONLY:
                return
        except IndexError:  # a runt: the loop below skips it
            pass
        for packet in packets:
            if len(packet) < 20:
                continue
            version = packet[0] >> 4
            if version == 4:
                proto = packet[9]
            elif version == 6:
                proto = packet[6]
            else:
                continue
            if proto not in (UDP, SCTP):
                continue
            info = parse_packet(packet)
            if info is None:
                continue
            key = (info.proto, info.dst, info.dst_port, info.src, info.src_port)  # the reply's tuple
            self.udp_flows[key] = None
            self.udp_flows.move_to_end(key)
            while len(self.udp_flows) > UDP_FLOW_CACHE:
                self.udp_flows.popitem(last=False)

    def _match(self, info: PacketInfo, ports: bool) -> bool:
        for m in self.matches:
            if info.proto not in m.protos or not _in(info.src, m.srcs):
                continue
            for d in m.dsts:
                if not _in(info.dst, d.nets):
                    continue
                if not ports or d.first <= info.dst_port <= d.last:
                    return True
        return False

    def _match_all_ports(self, info: PacketInfo) -> bool:
        return any(
            info.proto in m.protos and _in(info.src, m.srcs)
            and any(_in(info.dst, d.nets) and d.first == 0 and d.last == 65535 for d in m.dsts)
            for m in self.matches)

    def would_accept_tcp(self, src: IPAddr, dst: IPAddr, port: int) -> bool:
        """Whether a TCP SYN from `src` to `dst`:`port` would pass (tailscale's Filter.CheckTCP:
        the peer API asks it whether a caller may use the internet through us)."""
        if src.version != dst.version or (self.local and not self.is_local(dst)):
            return False
        return self._match(PacketInfo(dst.version, TCP, src, dst, 0, port, tcp_syn_only=True), ports=True)

    def check_inbound(self, packet: bytes | bytearray | memoryview) -> tuple[bool, str]:
        info = parse_packet(packet)
        if info is None:
            return False, "unparseable"
        if self.local and not self.is_local(info.dst):
            return False, "destination not ours"
        if info.proto in (ICMP4, ICMP6):
            if info.icmp_response:
                return True, "icmp response"
            return (True, "icmp ok") if self._match(info, ports=False) else (False, "no rule")
        if info.proto == TCP:
            if not info.tcp_syn_only:
                return True, "tcp non-syn"
            return (True, "tcp ok") if self._match(info, ports=True) else (False, "no rule")
        if info.proto in (UDP, SCTP):
            key = (info.proto, info.src, info.src_port, info.dst, info.dst_port)
            if key in self.udp_flows:
                return True, "udp cached"
            return (True, "udp ok") if self._match(info, ports=True) else (False, "no rule")
        if info.proto == TSMP:
            return True, "tsmp"
        if self._match_all_ports(info):
            return True, "other ok"
        return False, f"protocol {info.proto}"

    def allow_inbound(self, packet: bytes | bytearray | memoryview) -> bool:
        # Fast path for the bulk of traffic: IPv4 TCP without SYN to one of our
        # addresses passes (runIn4 "tcp non-syn") without building any objects.
        if (len(packet) >= 40 and packet[0] == 0x45 and packet[9] == TCP and not packet[33] & 0x02
                and not (packet[6] & 0x1F or packet[7]) and bytes(packet[16:20]) in self._local_raw):
            return True
        ok, why = self.check_inbound(packet)
        if not ok:
            self._rejects.reject(why)
        return ok
