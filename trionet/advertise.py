"""What this node offers the tailnet: subnet routes and an exit node (sans-IO).

Facts (protocol-notes-next §17.1-§17.3; checked in tailscale v1.102.3
net/netutil/routes.go CalcAdvertiseRoutes, ipn/ipnlocal/local.go
applyPrefsToHostinfoLocked, updateFilterLocked, shrinkDefaultRoute; headscale
v0.23.0 mapper/tail.go tailNode, v0.29.2 mapper/builder.go WithSelfNode):

* ``--advertise-routes`` takes CIDR prefixes only, with no host bits set; a
  /0 needs its other family's /0 too. ``--advertise-exit-node`` adds both
  ``0.0.0.0/0`` and ``::/0``. ``Hostinfo.RoutableIPs`` is the set sorted by
  prefix length, then address (IPv4 before IPv6).
* What Headscale approved shows in our own node of the netmap: its
  ``AllowedIPs`` beyond its ``Addresses`` are the approved routes it hands
  peers (0.23: enabled primary subnet routes and enabled exit routes; 0.29:
  our primaries and approved exit routes), ``PrimaryRoutes`` the subnet part.
  A subnet route approved while another router is primary for it is not
  there: peers do not route it to us.
* The inbound packet filter's "local nets" are our addresses plus every
  advertised prefix, approved or not. A /0 is shrunk first: minus the host's
  interface prefixes, plus the host's own addresses, minus private, link-local,
  multicast and Tailscale ranges: an exit node is a "guest wifi", its LAN must
  be advertised as a subnet to be reachable.

`Advertised` is the user's choice; `approved_routes` reads the netmap;
`local_nets` gives the filter's destinations. `host_interfaces_from_proc`
parses Linux's /proc text; reading the files is the caller's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from trionet.errors import ConfigError
from trionet.routes import ALL_V4, ALL_V6, CGNAT, EXIT_ROUTES, TAILSCALE_ULA, IPAddr, IPNet

__all__ = [
    "EXIT_ROUTES",
    "REMOVE_FROM_DEFAULT_ROUTE",
    "Advertised",
    "HostInterfaces",
    "advertise_status",
    "approved_routes",
    "host_interfaces_from_proc",
    "local_nets",
    "parse_advertise_routes",
    "shrink_default_route",
]


#: What a /0 never covers (tailscale local.go, removeFromDefaultRoute).
REMOVE_FROM_DEFAULT_ROUTE: tuple[IPNet, ...] = tuple(ipaddress.ip_network(p) for p in (
    "192.168.0.0/16", "172.16.0.0/12", "10.0.0.0/8",  # RFC 1918
    "169.254.0.0/16", "224.0.0.0/4", str(CGNAT),
    "fe80::/10", "ff00::/8", str(TAILSCALE_ULA)))


def _sort_key(net: IPNet) -> tuple[int, int, int]:
    """CalcAdvertiseRoutes' order: prefix length, then address (IPv4 first)."""
    return (net.prefixlen, net.version, int(net.network_address))


def parse_advertise_routes(text: str, flag: str = "--advertise-routes") -> tuple[IPNet, ...]:
    """``10.0.0.0/24,fd00::/64`` as tailscale's CalcAdvertiseRoutes takes it; ConfigError
    (one line) for anything else. Blanks around a prefix are forgiven; an empty text is none."""
    routes: set[IPNet] = set()
    if not text.strip():
        return ()
    for raw in text.split(","):
        item = raw.strip()
        try:
            iface = ipaddress.ip_interface(item)
        except ValueError:
            raise ConfigError(f"invalid value {item!r} for {flag}: not a valid IP address or CIDR prefix") from None
        if "/" not in item:
            raise ConfigError(f"invalid value {item!r} for {flag}: not a CIDR prefix "
                              f"(a single address is {iface.ip}/{iface.max_prefixlen})")
        net = iface.network
        if iface.ip != net.network_address:
            raise ConfigError(f"invalid value {item!r} for {flag}: {item} has non-address bits set; "
                              f"expected {net}")
        routes.add(net)
    if (ALL_V4 in routes) != (ALL_V6 in routes):
        have, need = (ALL_V4, ALL_V6) if ALL_V4 in routes else (ALL_V6, ALL_V4)
        raise ConfigError(f"invalid value {text.strip()!r} for {flag}: {have} advertised without "
                          f"{need}; advertise both (or use --advertise-exit-node)")
    return tuple(sorted(routes, key=_sort_key))


@attrs.frozen
class Advertised:
    """The routes this node offers: subnets (never a /0) and whether it offers an exit node."""

    subnets: tuple[IPNet, ...] = ()
    exit_node: bool = False

    @classmethod
    def from_prefixes(cls, prefixes: Iterable[IPNet | str], exit_node: bool = False) -> Advertised:
        """Both /0 in `prefixes` count as `exit_node` (as ``--advertise-routes 0.0.0.0/0,::/0``)."""
        nets = {ipaddress.ip_network(p) if isinstance(p, str) else p for p in prefixes}
        offers_exit = exit_node or (ALL_V4 in nets and ALL_V6 in nets)
        subnets = tuple(sorted((n for n in nets if n.prefixlen != 0), key=_sort_key))
        return cls(subnets, offers_exit)

    @property
    def routable_ips(self) -> tuple[IPNet, ...]:
        """``Hostinfo.RoutableIPs``, in tailscaled's order."""
        return tuple(sorted((*self.subnets, *(EXIT_ROUTES if self.exit_node else ())), key=_sort_key))

    def hostinfo_routes(self) -> list[str]:
        return [str(n) for n in self.routable_ips]

    def __bool__(self) -> bool:
        return bool(self.subnets) or self.exit_node


def approved_routes(self_node: Any) -> tuple[IPNet, ...]:
    """The routes Headscale hands our peers as ours: our node's ``AllowedIPs`` that are
    not its ``Addresses`` (a `trionet.proto.Node`, or None: none). Unreadable entries
    are skipped: this is for status and forwarding, never a reason to fail."""
    if self_node is None:
        return ()
    own: set[IPNet] = set()
    for text in getattr(self_node, "Addresses", None) or ():
        try:
            own.add(ipaddress.ip_interface(text).network if "/" in text else ipaddress.ip_network(text))
        except (ValueError, TypeError):
            continue
    own_ips = {n.network_address for n in own}
    out: set[IPNet] = set()
    for text in getattr(self_node, "AllowedIPs", None) or ():
        try:
            net = ipaddress.ip_network(text, strict=False)
        except (ValueError, TypeError):
            continue
        if net in own or (net.num_addresses == 1 and net.network_address in own_ips):
            continue
        out.add(net)
    return tuple(sorted(out, key=_sort_key))


def advertise_status(advertised: Advertised, approved: Sequence[IPNet]) -> dict[str, Any]:
    """What we offer and what of it Headscale approved, for `status` (JSON-ready).

    ``exit_node``: offered; ``exit_node_approved``: peers can use us (both /0 approved);
    ``pending``: offered but not (or not yet) approved, or not primary (another router
    serves that subnet)."""
    approved_set = set(approved)
    exit_approved = advertised.exit_node and all(r in approved_set for r in EXIT_ROUTES)
    pending = [str(n) for n in advertised.subnets if n not in approved_set]
    if advertised.exit_node and not exit_approved:
        pending += [str(r) for r in EXIT_ROUTES if r not in approved_set]
    return {
        "routes": [str(n) for n in advertised.subnets],
        "exit_node": advertised.exit_node,
        "approved_routes": [str(n) for n in advertised.subnets if n in approved_set],
        "exit_node_approved": exit_approved,
        "pending": pending,
    }


def _subtract(nets: Iterable[IPNet], remove: IPNet) -> list[IPNet]:
    out: list[IPNet] = []
    for net in nets:
        if net.version != remove.version or not net.overlaps(remove):
            out.append(net)
        elif net.prefixlen < remove.prefixlen:  # `remove` lies inside: keep the rest
            out.extend(net.address_exclude(remove))  # type: ignore[arg-type]
        # else `net` lies inside `remove`: all of it goes
    return out


def _collapse(nets: Iterable[IPNet]) -> list[IPNet]:
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def shrink_default_route(route: IPNet, interface_prefixes: Sequence[IPNet],
                         host_ips: Sequence[IPAddr]) -> list[IPNet]:
    """A /0 as the filter's local nets see it: minus the host's interface prefixes, plus
    the host's own addresses in it, minus REMOVE_FROM_DEFAULT_ROUTE (shrinkDefaultRoute)."""
    nets: list[IPNet] = [route]
    for prefix in interface_prefixes:
        nets = _subtract(nets, prefix)
    nets.extend(ipaddress.ip_network(ip) for ip in host_ips if ip.version == route.version and ip in route)
    nets = _collapse(nets)
    for prefix in REMOVE_FROM_DEFAULT_ROUTE:
        nets = _subtract(nets, prefix)
    return _collapse(nets)


@attrs.frozen
class HostInterfaces:
    """The host's interface prefixes (not single addresses) and its own addresses, Tailscale's
    ranges left out (tailscale local.go, interfaceRoutes)."""

    prefixes: tuple[IPNet, ...] = ()
    addresses: tuple[IPAddr, ...] = ()


def local_nets(own: Iterable[IPNet], advertised: Advertised, host: HostInterfaces) -> list[IPNet]:
    """The destinations the inbound filter takes as ours: our addresses, every advertised
    subnet, and with an exit node each /0 shrunk (`shrink_default_route`)."""
    nets: list[IPNet] = [*own, *advertised.subnets]
    if advertised.exit_node:
        for route in EXIT_ROUTES:
            nets.extend(shrink_default_route(route, host.prefixes, host.addresses))
    return _collapse(nets)


_FIB_ENTRY = re.compile(r"^\s*/(\d+) (\w+) (\w+)")
_FIB_LEAF = re.compile(r"^\s*\|-- (\d+\.\d+\.\d+\.\d+)\s*$")


def _is_tailscale(ip: IPAddr) -> bool:
    return ip in CGNAT if ip.version == 4 else ip in TAILSCALE_ULA


def host_interfaces_from_proc(fib_trie: str, if_inet6: str) -> HostInterfaces:
    """The host's interfaces from /proc/net/fib_trie (IPv4: ``/32 host LOCAL`` leaves are our
    addresses, ``link UNICAST`` ones the prefixes on our links) and /proc/net/if_inet6
    (address, prefix length). Lines it cannot read are skipped."""
    prefixes: set[IPNet] = set()
    addresses: set[IPAddr] = set()
    leaf: str | None = None
    for line in fib_trie.splitlines():
        node = _FIB_LEAF.match(line)
        if node is not None:
            leaf = node.group(1)
            continue
        entry = _FIB_ENTRY.match(line)
        if entry is None or leaf is None:
            continue
        plen, scope, kind = int(entry.group(1)), entry.group(2), entry.group(3)
        try:
            if kind == "LOCAL" and scope == "host" and plen == 32:
                ip4 = ipaddress.IPv4Address(leaf)
                if not _is_tailscale(ip4):
                    addresses.add(ip4)
            elif (kind, scope) in (("UNICAST", "link"), ("LOCAL", "host")) and 0 < plen < 32:
                # a link's prefix; "host LOCAL" wider than /32 is a loopback's (127.0.0.0/8)
                net4 = ipaddress.IPv4Network(f"{leaf}/{plen}")
                if not _is_tailscale(net4.network_address):
                    prefixes.add(net4)
        except ValueError:
            continue
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        try:
            ip6 = ipaddress.IPv6Address(int(fields[0], 16))
            plen = int(fields[2], 16)
        except ValueError:
            continue
        if _is_tailscale(ip6) or not 0 <= plen <= 128:
            continue
        addresses.add(ip6)
        if plen < 128:
            prefixes.add(ipaddress.IPv6Network((ip6, plen), strict=False))
    return HostInterfaces(tuple(sorted(prefixes, key=_sort_key)),
                          tuple(sorted(addresses, key=lambda a: (a.version, int(a)))))
