"""Which peer carries which prefixes: tailscaled's route manager, client side (sans-IO).

Facts (protocol-notes-next §15.1, §16; checked in tailscale v1.102.5
net/routemanager/routemanager.go, peerViewOf / eligible / desiredFor, and
ipn/ipnlocal/resolve.go, PeerForIP):

* a peer's prefixes come only from its ``AllowedIPs``: a single Tailscale IP
  (100.64.0.0/10, fd7a:115c:a1e0::/48) or an ``Addresses`` entry is the peer
  *itself*, anything else is a *route*; a peer with neither a disco key nor a
  home DERP region contributes nothing (it cannot be reached);
* the peer's own addresses are always used; ``0.0.0.0/0`` and ``::/0`` only
  for the selected exit node; other routes only with ``--accept-routes``;
* the same prefix from several peers goes to the lowest node ID;
* a destination goes to the peer that has it as an address, else to the
  longest matching prefix.

Each peer's WireGuard allowed IPs are exactly the prefixes it wins here, so
only the exit node may send us packets from internet addresses (WireGuard's
source check) and outbound packets follow the same longest-prefix choice.
(tailscaled also lets a peer that lost an identical prefix to a lower ID send
from it; WireGuard here has one owner per prefix, so it does not.)

On top, what a userspace node must decide before it dials (`RouteTable.route`):
a destination that no peer carries fails at once with the reason (no exit
node, exit node offline, not an accepted subnet) instead of a SYN sent into
nothing; with ``--exit-node-allow-lan-access`` the host's own LAN prefixes are
dialed from the host network, not through the exit node (§15.5).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from trionet.errors import ConfigError, TransportError

__all__ = [
    "EXIT_ROUTES",
    "ExitNodeChoiceError",
    "NoRouteError",
    "PeerRoutes",
    "Route",
    "RouteKind",
    "RoutePrefs",
    "RouteTable",
    "choose_exit_node",
    "lan_prefixes_from_proc",
]

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ALL_V6 = ipaddress.IPv6Network("::/0")
EXIT_ROUTES: tuple[IPNet, IPNet] = (ALL_V4, ALL_V6)
CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
TAILSCALE_ULA = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")


class ExitNodeChoiceError(ConfigError):
    """The exit node asked for does not exist, is offline or offers no exit routes."""


class NoRouteError(TransportError):
    """No peer carries that destination (or the exit node that would is unusable)."""


def is_tailscale_ip(ip: IPAddr) -> bool:
    return ip in CGNAT if ip.version == 4 else ip in TAILSCALE_ULA


@attrs.frozen
class RoutePrefs:
    """The user's routing choices (tailscale up/set flags)."""

    exit_node: str = ""  # IP, name or StableID as given; "" = none
    exit_node_allow_lan_access: bool = False
    accept_routes: bool = False


@attrs.frozen
class PeerRoutes:
    """What routing needs of one netmap peer, parsed and checked once."""

    id: int
    stable_id: str
    name: str  # MagicDNS FQDN without the final dot ("" when the server sends none)
    hostname: str  # Hostinfo.Hostname
    addresses: tuple[IPNet, ...]
    self_prefixes: tuple[IPNet, ...]  # the AllowedIPs that are the peer itself
    routes: tuple[IPNet, ...]  # the other AllowedIPs: subnet and exit routes
    primary_routes: tuple[IPNet, ...]
    online: bool | None
    reachable: bool  # has a disco key or a home DERP region
    peerapi4: int = 0
    peerapi6: int = 0
    peerapi_dns: bool = False

    @property
    def offers_exit(self) -> bool:
        """An exit-node option: both /0 in AllowedIPs (tsaddr.ContainsExitRoutes)."""
        return ALL_V4 in self.routes and ALL_V6 in self.routes

    @property
    def subnet_routes(self) -> tuple[IPNet, ...]:
        return tuple(r for r in self.routes if r not in EXIT_ROUTES)

    @property
    def short_name(self) -> str:
        return self.name.split(".")[0] if self.name else self.hostname

    def display(self) -> str:
        return self.short_name or f"node {self.id}"

    @classmethod
    def from_node(cls, node: Any, *, home_derp: int = 0) -> PeerRoutes:
        """From a `trionet.proto.Node`; ValueError/TypeError for a malformed one."""
        # Parsing is most of a big netmap's cost here: the AllowedIPs that repeat an
        # address (nearly all of them) reuse its parse.
        by_text = {text: ipaddress.ip_network(text, strict=False) for text in node.Addresses or ()}
        addresses = tuple(by_text.values())
        allowed_text = node.AllowedIPs if node.AllowedIPs is not None else node.Addresses
        selfs: list[IPNet] = []
        routes: list[IPNet] = []
        for text in allowed_text or ():
            known = by_text.get(text)
            if known is not None:
                selfs.append(known)
                continue
            net = ipaddress.ip_network(text, strict=False)  # not a prefix at all: a malformed peer
            if net.network_address != ipaddress.ip_interface(text).ip:
                continue  # host bits set: tailscaled logs and skips that prefix
            if (net.num_addresses == 1 and is_tailscale_ip(net.network_address)) or net in addresses:
                selfs.append(net)
            else:
                routes.append(net)
        hostinfo = node.Hostinfo
        p4 = p6 = 0
        dns = False
        for service in (hostinfo.Services if hostinfo is not None else None) or ():
            if not isinstance(service, dict):
                continue
            proto, port = service.get("Proto"), service.get("Port")
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                continue
            if proto == "peerapi4":
                p4 = port
            elif proto == "peerapi6":
                p6 = port
            elif proto == "peerapi-dns-proxy":
                dns = True
        return cls(
            id=int(node.ID), stable_id=str(node.StableID or ""), name=(node.Name or "").rstrip(".").lower(),
            hostname=((hostinfo.Hostname if hostinfo is not None else None) or "").lower(),
            addresses=addresses, self_prefixes=tuple(selfs), routes=tuple(routes),
            primary_routes=tuple(ipaddress.ip_network(p, strict=False) for p in node.PrimaryRoutes or ()),
            online=node.Online, reachable=bool(node.DiscoKey) or bool(home_derp),
            peerapi4=p4, peerapi6=p6, peerapi_dns=dns)


def _first(nets: Iterable[IPNet], version: int) -> IPAddr | None:
    return next((n.network_address for n in nets if n.version == version), None)


def choose_exit_node(selector: str, peers: Iterable[PeerRoutes], own: Sequence[IPNet] = ()) -> PeerRoutes:
    """The peer that `selector` (a tailnet IP, a MagicDNS name, short name, or a StableID)
    names, if it offers exit routes; ExitNodeChoiceError otherwise, worded as
    `tailscale up --exit-node` words it (ipn/prefs.go, exitNodeIPOfArg)."""
    text = selector.strip()
    peers = list(peers)
    try:
        ip: IPAddr | None = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is not None:
        if any(ip in n for n in own):
            raise ExitNodeChoiceError(f"cannot use {text} as an exit node as it is a local IP address to this machine")
        found = [p for p in peers if any(ip in a for a in p.addresses)]
        if not found:
            raise ExitNodeChoiceError(f"no node found in netmap with IP {text}")
        matches = found[:1]
    else:
        want = text.lower().rstrip(".")
        matches = [p for p in peers if want and want in (p.name, p.short_name, p.hostname)]
        if not matches:
            matches = [p for p in peers if p.stable_id and p.stable_id == text]
        if not matches:
            raise ExitNodeChoiceError(f"invalid value {text!r} for --exit-node; must be IP or peer hostname")
        if len(matches) > 1:
            raise ExitNodeChoiceError(f"ambiguous exit node name {text!r}")
    peer = matches[0]
    if not peer.offers_exit:
        raise ExitNodeChoiceError(f"node {text!r} is not advertising an exit node "
                                  "(or its exit routes are not approved in Headscale)")
    if peer.online is False:
        raise ExitNodeChoiceError(f"exit node {text!r} is offline")
    return peer


class RouteKind(enum.Enum):
    PEER = "peer"  # into the tailnet, to `peer_id`
    HOST = "host"  # dial from the host network (a LAN address with --exit-node-allow-lan-access)


@attrs.frozen
class Route:
    kind: RouteKind
    peer_id: int = 0
    via: str = ""  # "address", "subnet <prefix>", "exit node", "lan"


class _Lpm:
    """Longest-prefix match over a few hundred prefixes: one dict per prefix length."""

    def __init__(self, items: Iterable[tuple[IPNet, int]]) -> None:
        self._by_len: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        for net, value in items:
            self._by_len[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = value
        self._lengths = {v: sorted(t, reverse=True) for v, t in self._by_len.items()}

    def lookup(self, ip: IPAddr) -> tuple[int, int] | None:
        """(value, prefix length) of the longest prefix holding `ip`."""
        bits = 32 if ip.version == 4 else 128
        addr = int(ip)
        table = self._by_len[ip.version]
        for plen in self._lengths[ip.version]:
            masked = addr >> (bits - plen) << (bits - plen) if plen else 0
            value = table[plen].get(masked)
            if value is not None:
                return value, plen
        return None


class RouteTable:
    """The prefixes each peer carries under `prefs`, and the way to any destination.

    Built whole from the netmap's peers and the prefs whenever either changes (a
    netmap holds hundreds of peers, not millions: rebuilding is simpler than
    patching and cheap next to parsing the map)."""

    def __init__(self, peers: Iterable[PeerRoutes], prefs: RoutePrefs = RoutePrefs(),
                 exit_node_id: int | None = None, lan_prefixes: Sequence[IPNet] = (),
                 own: Sequence[IPNet] = ()) -> None:
        self.prefs = prefs
        self.peers: dict[int, PeerRoutes] = {p.id: p for p in peers}
        self.exit_node_id = exit_node_id
        self.lan_prefixes = tuple(lan_prefixes)
        self.own = tuple(own)
        self.allowed: dict[int, list[IPNet]] = {}
        self.accepted: dict[IPNet, int] = {}  # non-exit routes in use -> the peer that carries them
        self.offered: dict[IPNet, int] = {}  # subnet routes peers offer that are not in use (hints)
        winners: dict[IPNet, int] = {}
        self._addresses: dict[IPAddr, int] = {}
        for peer in sorted(self.peers.values(), key=lambda p: p.id):
            if not peer.reachable:
                continue
            for net in peer.self_prefixes:
                winners.setdefault(net, peer.id)
                self._addresses.setdefault(net.network_address, peer.id)
            for net in peer.routes:
                if net in EXIT_ROUTES:
                    eligible = exit_node_id is not None and peer.id == exit_node_id
                else:
                    eligible = prefs.accept_routes
                    if not eligible:
                        self.offered.setdefault(net, peer.id)
                if eligible:
                    winners.setdefault(net, peer.id)  # lowest node ID first
        for net, peer_id in winners.items():
            self.allowed.setdefault(peer_id, []).append(net)
            peer = self.peers[peer_id]
            if net not in peer.self_prefixes and net not in EXIT_ROUTES:
                self.accepted[net] = peer_id
        for nets in self.allowed.values():
            nets.sort(key=lambda n: (n.version, n.network_address, n.prefixlen))
        self._lpm = _Lpm(winners.items())
        self._offered_lpm = _Lpm(self.offered.items())

    # ------------------------------------------------------------ exit node
    @property
    def exit_node(self) -> PeerRoutes | None:
        return self.peers.get(self.exit_node_id) if self.exit_node_id is not None else None

    def exit_node_problem(self) -> str | None:
        """Why the selected exit node cannot carry traffic now; None when it can (or none is set)."""
        if not self.prefs.exit_node:
            return None
        peer = self.exit_node
        if peer is None:
            return f"exit node {self.prefs.exit_node!r} is not in the netmap any more"
        if not peer.offers_exit:
            return f"exit node {peer.display()} no longer offers exit routes"
        if peer.online is False:
            return f"exit node {peer.display()} is offline"
        if not peer.reachable:
            return f"exit node {peer.display()} has no disco key or DERP region yet"
        return None

    def doh_url(self) -> str | None:
        """The exit node's peer API DNS-over-HTTPS URL (§15.6): over IPv4 when we and the
        peer both have it, else IPv6; None without an exit node or a peer API port."""
        peer = self.exit_node
        if peer is None:
            return None
        have4 = any(n.version == 4 for n in self.own)
        have6 = any(n.version == 6 for n in self.own)
        ip4, ip6 = _first(peer.addresses, 4), _first(peer.addresses, 6)
        if have4 and peer.peerapi4 and ip4 is not None:
            return f"http://{ip4}:{peer.peerapi4}/dns-query"
        if have6 and peer.peerapi6 and ip6 is not None:
            return f"http://[{ip6}]:{peer.peerapi6}/dns-query"
        return None

    # ------------------------------------------------------------- lookups
    def is_lan(self, ip: IPAddr) -> bool:
        return any(ip in n for n in self.lan_prefixes if n.version == ip.version)

    def peer_for(self, ip: IPAddr) -> int | None:
        """The peer a packet to `ip` goes to: an exact node address, else longest prefix."""
        peer_id = self._addresses.get(ip)
        if peer_id is not None:
            return peer_id
        hit = self._lpm.lookup(ip)
        return hit[0] if hit is not None else None

    def route(self, ip: IPAddr) -> Route:
        """How to reach `ip`, or NoRouteError saying why it cannot be reached."""
        if any(ip == n.network_address for n in self.own):
            raise NoRouteError(f"{ip} is this node's own address")
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            raise NoRouteError(f"{ip} is not a unicast address trionet can route")
        peer_id = self._addresses.get(ip)
        if peer_id is not None:
            return Route(RouteKind.PEER, peer_id, "address")
        exit_id = self.exit_node_id
        hit = self._lpm.lookup(ip)
        to_exit_node = hit is not None and hit[0] == exit_id and hit[1] == 0
        if hit is not None and not to_exit_node:
            return Route(RouteKind.PEER, hit[0], "subnet")
        # The LAN exception takes only what would go to the exit node's default route
        # (tailscaled's LocalRoutes); a subnet route inside the LAN still wins.
        if exit_id is not None and self.prefs.exit_node_allow_lan_access and self.is_lan(ip):
            return Route(RouteKind.HOST, via="lan")
        if hit is not None:
            problem = self.exit_node_problem()
            if problem is not None:
                raise NoRouteError(f"cannot reach {ip}: {problem}")
            return Route(RouteKind.PEER, hit[0], "exit node")
        raise NoRouteError(self._why_no_route(ip))

    def _why_no_route(self, ip: IPAddr) -> str:
        if is_tailscale_ip(ip):
            return f"no peer in the netmap has the address {ip}"
        offered = self._offered_lpm.lookup(ip)
        if offered is not None:
            peer = self.peers[offered[0]]
            return (f"{ip} is in a subnet that {peer.display()} routes; start with --accept-routes "
                    "(or `trionet set --accept-routes`) to use it")
        problem = self.exit_node_problem()
        if problem is not None:
            return f"cannot reach {ip}: {problem}"
        return (f"{ip} is outside the tailnet and no exit node is selected: without --exit-node "
                "trionet reaches only tailnet addresses and accepted subnet routes")

    # -------------------------------------------------------------- status
    def exit_node_status(self) -> dict[str, Any] | None:
        if not self.prefs.exit_node:
            return None
        peer = self.exit_node
        return {
            "selected": self.prefs.exit_node,
            "id": self.exit_node_id,
            "name": peer.name if peer is not None else None,
            "addresses": [str(a.network_address) for a in peer.addresses] if peer is not None else [],
            "online": peer.online if peer is not None else None,
            "usable": self.exit_node_problem() is None,
            "problem": self.exit_node_problem(),
            "allow_lan_access": self.prefs.exit_node_allow_lan_access,
            "dns": self.doh_url(),
        }

    def accepted_routes(self) -> list[dict[str, Any]]:
        out = []
        for net, peer_id in sorted(self.accepted.items(), key=lambda kv: (kv[0].version, kv[0].network_address,
                                                                          kv[0].prefixlen)):
            peer = self.peers[peer_id]
            out.append({"prefix": str(net), "peer": peer.display(), "peer_id": peer_id,
                        "primary": net in peer.primary_routes})
        return out


def lan_prefixes_from_proc(route_text: str, inet6_text: str) -> list[IPNet]:
    """The host's LAN prefixes, from /proc/net/route and /proc/net/if_inet6 text (Linux).

    IPv4: the directly connected routes (no gateway) other than the default and
    loopback; IPv6: the prefixes of global addresses. Tailscale's own ranges are
    left out (as tailscaled's interfaceRoutes does): they are the tailnet, not the LAN."""
    out: list[IPNet] = []
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0] == "lo":
            continue
        try:
            dest, gateway, mask = (int(fields[i], 16) for i in (1, 2, 7))
        except ValueError:
            continue
        if gateway or not mask:
            continue
        as_ip = ipaddress.IPv4Address(int.from_bytes(dest.to_bytes(4, "little"), "big"))
        plen = bin(mask).count("1")
        try:
            net = ipaddress.IPv4Network(f"{as_ip}/{plen}")
        except ValueError:
            continue
        if not net.subnet_of(CGNAT):
            out.append(net)
    for line in inet6_text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[5] == "lo":
            continue
        try:
            addr = ipaddress.IPv6Address(int(fields[0], 16))
            plen = int(fields[2], 16)
            scope = int(fields[3], 16)
        except ValueError:
            continue
        if scope != 0 or addr in TAILSCALE_ULA or not 0 < plen <= 128:  # global scope only
            continue
        net6 = ipaddress.IPv6Network((addr, plen), strict=False)
        if net6 not in out:
            out.append(net6)
    return out
