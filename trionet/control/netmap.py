"""The netmap: full maps and deltas applied in Tailscale's order (sans-IO).

Order (tailscale controlclient/map.go, updatePeersStateFromResponse): a
non-empty `Peers` replaces everything and ends peer processing; otherwise
PeersRemoved, PeersChanged, PeerSeenChange, OnlineChange, PeersChangedPatch
(unknown IDs skipped). `apply` returns what changed, so subscribers (WireGuard,
paths, filter, stack) update only what they must.
"""

from __future__ import annotations

import attrs

from trionet.netaddr import split_host_port
from trionet.proto import DERPMap, MapResponse, Node

DERP_MAGIC_IP = "127.3.3.40"


@attrs.define
class NetmapChange:
    self_changed: bool = False
    derp_map_changed: bool = False
    filter_changed: bool = False
    dns_changed: bool = False
    peers_added: set[int] = attrs.field(factory=set)
    peers_removed: set[int] = attrs.field(factory=set)
    peers_changed: set[int] = attrs.field(factory=set)
    keepalive: bool = False

    @property
    def any(self) -> bool:
        return bool(self.self_changed or self.derp_map_changed or self.filter_changed or self.dns_changed
                    or self.peers_added or self.peers_removed or self.peers_changed)


def legacy_derp_region(text: str) -> int:
    """"127.3.3.40:<region>" -> region (0 when absent or malformed)."""
    try:
        host, port = split_host_port(text)
    except ValueError:
        return 0
    return port if host == DERP_MAGIC_IP else 0


@attrs.define
class Netmap:
    self_node: Node | None = None
    peers: dict[int, Node] = attrs.field(factory=dict)
    derp_map: DERPMap | None = None
    packet_filters: dict[str, list[dict[str, object]]] = attrs.field(factory=dict)
    dns: dict[str, object] | None = None
    domain: str = ""
    applied: int = 0

    @property
    def packet_filter(self) -> list[dict[str, object]]:
        return [rule for name in sorted(self.packet_filters) for rule in self.packet_filters[name]]

    @staticmethod
    def home_derp_of(node: Node) -> int:
        return node.HomeDERP or legacy_derp_region(node.DERP or "")

    def peer_by_node_key(self, key: str) -> Node | None:
        for peer in self.peers.values():
            if peer.Key == key:
                return peer
        return None

    def _set_peer(self, node: Node, change: NetmapChange) -> None:
        if node.Expired:
            if self.peers.pop(node.ID, None) is not None:
                change.peers_removed.add(node.ID)
            return
        if node.ID in self.peers:
            if self.peers[node.ID] != node:
                change.peers_changed.add(node.ID)
        else:
            change.peers_added.add(node.ID)
        self.peers[node.ID] = node

    def apply(self, resp: MapResponse) -> NetmapChange:
        change = NetmapChange()
        self.applied += 1
        if resp.KeepAlive:
            change.keepalive = True
            return change
        if resp.Node is not None:
            change.self_changed = resp.Node != self.self_node
            self.self_node = resp.Node
        if resp.DERPMap is not None:
            self._apply_derp_map(resp.DERPMap)
            change.derp_map_changed = True
        if resp.DNSConfig is not None:
            self.dns = resp.DNSConfig
            change.dns_changed = True
        if resp.Domain:
            self.domain = resp.Domain
        if resp.PacketFilter is not None:
            self.packet_filters = {"base": list(resp.PacketFilter)}
            change.filter_changed = True
        if resp.PacketFilters is not None:
            for name, rules in resp.PacketFilters.items():
                if name == "*" and rules is None:
                    self.packet_filters = {}
                elif rules is None:
                    self.packet_filters.pop(name, None)
                else:
                    self.packet_filters[name] = list(rules)
            change.filter_changed = True
        if resp.Peers:
            new = {p.ID for p in resp.Peers if not p.Expired}
            for gone in set(self.peers) - new:
                del self.peers[gone]
                change.peers_removed.add(gone)
            for node in resp.Peers:
                self._set_peer(node, change)
            return change
        for gone in resp.PeersRemoved or ():
            if self.peers.pop(gone, None) is not None:
                change.peers_removed.add(gone)
        for node in resp.PeersChanged or ():
            self._set_peer(node, change)
        # PeerSeenChange only moves LastSeen, which nothing here uses.
        for node_id, online in (resp.OnlineChange or {}).items():
            if node_id in self.peers and self.peers[node_id].Online != online:
                self.peers[node_id] = attrs.evolve(self.peers[node_id], Online=online)
                change.peers_changed.add(node_id)
        for patch in resp.PeersChangedPatch or ():
            peer = self.peers.get(patch.NodeID)
            if peer is None:
                continue
            updates: dict[str, object] = {}
            if patch.DERPRegion:
                updates["HomeDERP"] = patch.DERPRegion
            if patch.Cap:
                updates["Cap"] = patch.Cap
            for field in ("Endpoints", "Key", "DiscoKey", "Online", "LastSeen", "KeyExpiry"):
                value = getattr(patch, field)
                if value is not None:
                    updates[field] = value
            if updates:
                self.peers[patch.NodeID] = attrs.evolve(peer, **updates)  # type: ignore[arg-type]
                change.peers_changed.add(patch.NodeID)
        return change

    def _apply_derp_map(self, new: DERPMap) -> None:
        if new.Regions is None and self.derp_map is not None:
            return  # nil Regions keeps the old ones
        regions = {rid: r for rid, r in (new.Regions or {}).items() if r is not None}
        self.derp_map = DERPMap(Regions=dict(regions), OmitDefaultRegions=new.OmitDefaultRegions)
