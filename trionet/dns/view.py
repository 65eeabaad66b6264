"""What MagicDNS knows, built from a netmap (sans-IO).

A `DnsView` is the netmap's DNS content in the shape lookups want: node names
(FQDN and short name) to addresses, addresses back to names, Headscale's extra
records, the zones we answer for, and where every other name is forwarded.
It is rebuilt from scratch on a netmap change (O(peers)); lookups never touch
the netmap. The rules are tailscaled's (v1.102.5):

* names: a node's `Name` lowercased without its trailing dot, and the short
  name (the same minus the MagicDNS suffix, when the name ends in it); the
  suffix is our own `Name` minus its first label (ipn/ipnlocal/node_backend.go
  addNodeNameLocked; types/netmap/netmap.go MagicDNSSuffixOfNodeName). Self
  first, then peers by ID: a later node takes a name an earlier one had.
* extra records: `Type` "", "A" or "AAAA" with an IP `Value`, by that IP's
  family whatever the type says (node_backend.go dnsConfigForNetmap).
* zones: Routes whose resolver list is empty, and, with MagicDNS on
  (`Proxied`), the suffix, `64.100.in-addr.arpa.` ... `127.100.in-addr.arpa.`
  and `0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.` (net/dns/manager.go compileConfig;
  ipn/ipnlocal/local.go magicDNSRootDomains).
* forwarding: Routes with resolvers, longest suffix first, then "." = the
  default resolvers: `Resolvers`, else `FallbackResolvers` (tailscaled leaves
  those names to the OS resolver instead; trionet has none of its own). With
  an exit node that offers DNS: the `UseWithExitNode` resolvers, else the exit
  node's DoH (`EXIT_NODE_DOH`), and only `UseWithExitNode` resolvers in routes
  (node_backend.go dnsConfigForNetmap).

The DNS config comes from the control server as JSON: anything malformed in
it is skipped and named in `problems`, never raised.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from trionet.proto import Node

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The quad-100 resolver's addresses (tailscale net/tsaddr: TailscaleServiceIP, TailscaleServiceIPv6).
QUAD100_V4 = ipaddress.IPv4Address("100.100.100.100")
QUAD100_V6 = ipaddress.IPv6Address("fd7a:115c:a1e0::53")
#: The name quad-100's address reverses to (tsdns.go dnsSymbolicFQDN), and back.
SYMBOLIC_NAME = "magicdns.localhost-tailscale-daemon."
#: An upstream that is not an address: the exit node's DNS-over-HTTPS, plugged in at run time.
EXIT_NODE_DOH = "exit-node-doh"
#: The reverse zones MagicDNS answers for: the CGNAT range and Tailscale's IPv6 ULA.
MAGIC_REVERSE_ZONES = ("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.",
                       *(f"{i}.100.in-addr.arpa." for i in range(64, 128)))
#: Node capabilities (tailcfg.go): peers' AAAA records in MagicDNS; a node's subdomains resolve to it.
CAP_MAGICDNS_AAAA = "magicdns-aaaa"
CAP_SUBDOMAIN_RESOLVE = "dns-subdomain-resolve"

_MAX_EXTRA_RECORDS = 10_000  # a bound on what one DNSConfig can make us hold beside the nodes
_MAX_ROUTES = 1_000


@attrs.frozen
class NodeName:
    """One node as MagicDNS sees it: its FQDN (trailing dot) and all its addresses."""

    fqdn: str
    addresses: tuple[IPAddress, ...]
    subdomains: bool = False  # CAP_SUBDOMAIN_RESOLVE: every name under it resolves to it too


@attrs.frozen
class DnsView:
    proxied: bool = False  # MagicDNS on: short names, and the zones we answer NXDOMAIN in
    suffix: str = ""  # the MagicDNS suffix, no dots at either end ("ts.test")
    nodes: Mapping[str, NodeName] = attrs.field(factory=dict)  # canonical name (no dot) and short name
    node_ptr: Mapping[IPAddress, str] = attrs.field(factory=dict)  # address -> Name, as given, with dot
    hosts: Mapping[str, tuple[IPAddress, ...]] = attrs.field(factory=dict)  # extra records: FQDN -> IPs
    host_ptr: Mapping[IPAddress, str] = attrs.field(factory=dict)
    local_domains: tuple[str, ...] = ()  # FQDNs (trailing dot) we are authoritative for
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (suffix FQDN, upstreams): longest first, "." last
    self_v6_only: bool = False
    want_aaaa: bool = False  # CAP_MAGICDNS_AAAA on our node: peers' IPv6 in answers
    # for `status`: what the control server configured
    resolvers: tuple[str, ...] = ()
    fallback_resolvers: tuple[str, ...] = ()
    split_routes: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    search_domains: tuple[str, ...] = ()
    extra_records: int = 0
    exit_node_doh: bool = False
    problems: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The configuration, for `status --json`."""
        return {
            "magic_dns": self.proxied,
            "base_domain": self.suffix,
            "resolvers": list(self.resolvers),
            "fallback_resolvers": list(self.fallback_resolvers),
            "split_routes": {k: list(v) for k, v in sorted(self.split_routes.items())},
            "search_domains": list(self.search_domains),
            "extra_records": self.extra_records,
            "forwarding": {suffix: list(ups) for suffix, ups in self.routes},
            "exit_node_doh": self.exit_node_doh,
            "problems": list(self.problems),
        }


def to_fqdn(name: str) -> str | None:
    """`name` lowercased with one trailing dot, or None when it is no DNS name
    (an empty label, a label over 63 bytes, over 254 bytes; tailscale util/dnsname ToFQDN)."""
    if name in ("", "."):
        return "."
    text = name[1:] if name.startswith(".") else name
    bare = text[:-1] if text.endswith(".") else text
    if len(bare) + 1 > 254 or any(not 0 < len(label) <= 63 for label in bare.split(".")):
        return None
    return bare.lower() + "."


def zone_contains(zone: str, name: str) -> bool:
    """`name` is `zone` or under it (both FQDNs with trailing dots)."""
    return zone == "." or name == zone or name.endswith("." + zone)


def has_suffix(name: str, suffix: str) -> bool:
    """`name` ends in `.suffix` (util/dnsname HasSuffix: not equal to it)."""
    name, suffix = name.rstrip("."), suffix.strip(".")
    return bool(suffix) and name.endswith("." + suffix)


def magic_dns_suffix(self_name: str) -> str:
    """Our Name minus its first label (a one-label name is its own suffix, as in tailscale)."""
    name = self_name.strip(".")
    return name.partition(".")[2] or name


def _addresses(node: Node) -> tuple[IPAddress, ...]:
    out = []
    for text in node.Addresses or ():
        try:
            out.append(ipaddress.ip_interface(text).ip)
        except (ValueError, TypeError):
            continue
    return tuple(out)


def _caps(node: Node | None) -> set[str]:
    if node is None:
        return set()
    caps = {c for c in node.Capabilities or () if isinstance(c, str)}
    caps.update(k for k in (node.CapMap or {}) if isinstance(k, str))
    return caps


def _resolver_addrs(value: Any, problems: list[str], what: str, *,
                    exit_node_only: bool = False) -> tuple[str, ...]:
    """The `Addr`s of a JSON list of dnstype.Resolver (only `UseWithExitNode` ones if asked)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{what}: not a list")
        return ()
    out = []
    for item in value:
        addr = item.get("Addr") if isinstance(item, dict) else None
        if not isinstance(addr, str) or not addr:
            problems.append(f"{what}: a resolver without an Addr")
            continue
        if exit_node_only and not item.get("UseWithExitNode"):
            continue
        out.append(addr)
    return tuple(out)


def build_view(self_node: Node | None, peers: Iterable[Node], dns_config: Mapping[str, Any] | None,
               *, exit_node_doh: bool = False) -> DnsView:
    """The view of a netmap. `exit_node_doh`: an exit node is in use and offers DNS."""
    problems: list[str] = []
    config: Mapping[str, Any] = dns_config if isinstance(dns_config, Mapping) else {}
    proxied = config.get("Proxied") is True
    self_name = self_node.Name if self_node is not None and isinstance(self_node.Name, str) else ""
    suffix = magic_dns_suffix(self_name) if self_name else ""

    nodes: dict[str, NodeName] = {}
    node_ptr: dict[IPAddress, str] = {}
    ordered = ([self_node] if self_node is not None else []) + sorted(peers, key=lambda n: n.ID)
    for node in ordered:
        if not isinstance(node.Name, str) or not node.Name:
            continue  # nameless nodes have no MagicDNS name (tailscale: "might support in the future")
        fqdn = to_fqdn(node.Name)
        if fqdn is None or fqdn == ".":
            problems.append(f"node {node.ID}: Name {node.Name[:80]!r} is not a DNS name")
            continue
        addresses = _addresses(node)
        entry = NodeName(fqdn, addresses, CAP_SUBDOMAIN_RESOLVE in _caps(node))
        canon = fqdn[:-1]
        nodes[canon] = entry
        if suffix and has_suffix(canon, suffix):
            nodes[canon[:-len(suffix) - 1]] = entry
        ptr_name = node.Name if node.Name.endswith(".") else node.Name + "."
        for address in addresses:
            node_ptr[address] = ptr_name

    hosts: dict[str, list[IPAddress]] = {}
    extra = config.get("ExtraRecords")
    if extra is not None and not isinstance(extra, list):
        problems.append("ExtraRecords: not a list")
        extra = []
    count = 0
    for record in (extra or [])[:_MAX_EXTRA_RECORDS]:
        if not isinstance(record, dict):
            problems.append("ExtraRecords: an entry that is not an object")
            continue
        rtype, name, value = record.get("Type", ""), record.get("Name"), record.get("Value")
        if rtype not in ("", "A", "AAAA"):
            continue  # other types are not served (tailscale: "TODO: more")
        ip: IPAddress | None = None
        try:
            ip = ipaddress.ip_address(value) if isinstance(value, str) else None
        except ValueError:
            pass
        fqdn = to_fqdn(name) if isinstance(name, str) else None
        if ip is None or fqdn is None or fqdn == ".":
            problems.append(f"ExtraRecords: {str(name)[:80]!r} = {str(value)[:80]!r} is not a name and an IP")
            continue
        hosts.setdefault(fqdn, []).append(ip)
        count += 1
    host_ptr: dict[IPAddress, str] = {}
    for fqdn, ips in hosts.items():
        for ip in ips:
            host_ptr[ip] = fqdn

    raw_routes = config.get("Routes")
    if raw_routes is not None and not isinstance(raw_routes, dict):
        problems.append("Routes: not an object")
        raw_routes = {}
    local: list[str] = []
    split: dict[str, tuple[str, ...]] = {}
    forward: dict[str, tuple[str, ...]] = {}
    for suffix_text, resolvers in list((raw_routes or {}).items())[:_MAX_ROUTES]:
        zone = to_fqdn(suffix_text) if isinstance(suffix_text, str) else None
        if zone is None:
            problems.append(f"Routes: {str(suffix_text)[:80]!r} is not a DNS name")
            continue
        addrs = _resolver_addrs(resolvers, problems, f"Routes[{suffix_text[:80]!r}]")
        if not addrs:
            local.append(zone)  # an empty list: answered here, NXDOMAIN for what we do not know
            continue
        split[zone] = addrs
        if exit_node_doh:
            addrs = _resolver_addrs(resolvers, problems, "Routes", exit_node_only=True)
            if not addrs:
                continue  # with an exit node, a route keeps only resolvers meant for it
        forward[zone] = addrs
    if proxied and suffix:
        local.append(suffix.lower() + ".")
        local.extend(MAGIC_REVERSE_ZONES)

    resolvers = _resolver_addrs(config.get("Resolvers"), problems, "Resolvers")
    fallback = _resolver_addrs(config.get("FallbackResolvers"), problems, "FallbackResolvers")
    if exit_node_doh:
        default = _resolver_addrs(config.get("Resolvers"), [], "", exit_node_only=True) or (EXIT_NODE_DOH,)
    else:
        default = resolvers or fallback
    ordered_routes = sorted(forward.items(), key=lambda item: -item[0].count("."))
    if default:
        ordered_routes.append((".", default))

    domains = config.get("Domains")
    search = tuple(d for d in domains if isinstance(d, str)) if isinstance(domains, list) else ()

    self_addrs = _addresses(self_node) if self_node is not None else ()
    self_v6_only = any(a.version == 6 for a in self_addrs) and not any(a.version == 4 for a in self_addrs)
    return DnsView(
        proxied=proxied, suffix=suffix.lower(), nodes=nodes, node_ptr=node_ptr,
        hosts={k: tuple(v) for k, v in hosts.items()}, host_ptr=host_ptr,
        local_domains=tuple(dict.fromkeys(local)), routes=tuple(ordered_routes),
        self_v6_only=self_v6_only, want_aaaa=CAP_MAGICDNS_AAAA in _caps(self_node),
        resolvers=resolvers, fallback_resolvers=fallback, split_routes=split, search_domains=search,
        extra_records=count, exit_node_doh=exit_node_doh, problems=tuple(problems[:20]))


def answer_addresses(view: DnsView, addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """A node's addresses as MagicDNS answers them (node_backend.go magicDNSAddrs): only
    IPv6 when we are IPv6-only; else a node's IPv6 is left out when it has IPv4, unless
    our node has the magicdns-aaaa capability."""
    if view.self_v6_only:
        return [a for a in addresses if a.version == 6]
    has4 = any(a.version == 4 for a in addresses)
    return [a for a in addresses if not (a.version == 6 and has4 and not view.want_aaaa)]
