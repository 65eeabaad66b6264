from __future__ import annotations

import time

from trionet import proto
from trionet.control.netmap import Netmap


def node(i: int, **kw: object) -> dict[str, object]:
    return {"ID": i, "Key": f"nodekey:{i:064x}", "DiscoKey": f"discokey:{i:064x}",
            "Addresses": [f"100.64.{i >> 8 & 255}.{i & 255}/32"], "Name": f"n{i}.ts.test.", **kw}


def apply(nm: Netmap, doc: dict[str, object]):  # type: ignore[no-untyped-def]
    return nm.apply(proto.structure(doc, proto.MapResponse))


def test_full_then_deltas_in_tailscale_order() -> None:
    nm = Netmap()
    ch = apply(nm, {"Node": node(100), "Peers": [node(1), node(2)], "DERPMap": {"Regions": {
        "999": {"RegionID": 999, "Nodes": [{"HostName": "10.0.0.1"}]}}},
        "PacketFilter": [{"SrcIPs": ["*"]}]})
    assert ch.peers_added == {1, 2} and ch.self_changed and ch.derp_map_changed and ch.filter_changed
    ch = apply(nm, {"PeersChanged": [node(3)], "PeersRemoved": [1]})
    assert set(nm.peers) == {2, 3} and ch.peers_added == {3} and ch.peers_removed == {1}
    ch = apply(nm, {"OnlineChange": {"2": False}, "PeersChangedPatch": [
        {"NodeID": 3, "DERPRegion": 7, "Endpoints": ["1.2.3.4:5"]}, {"NodeID": 99, "Cap": 5}]})
    assert nm.peers[2].Online is False and nm.peers[3].HomeDERP == 7
    assert nm.peers[3].Endpoints == ["1.2.3.4:5"] and ch.peers_changed == {2, 3}
    # a full Peers list replaces everything, and other deltas in it are ignored
    ch = apply(nm, {"Peers": [node(4)], "PeersRemoved": [4]})
    assert set(nm.peers) == {4} and ch.peers_removed == {2, 3}


def test_derp_map_nil_regions_kept_and_null_dropped() -> None:
    nm = Netmap()
    apply(nm, {"DERPMap": {"Regions": {"1": {"RegionID": 1}, "2": None}}})
    assert nm.derp_map is not None and set(nm.derp_map.Regions or {}) == {1}
    apply(nm, {"DERPMap": {}})
    assert set(nm.derp_map.Regions or {}) == {1}


def test_keepalive_changes_nothing_and_legacy_derp() -> None:
    nm = Netmap()
    apply(nm, {"Peers": [node(1, DERP="127.3.3.40:999")]})
    assert nm.home_derp_of(nm.peers[1]) == 999
    assert apply(nm, {"KeepAlive": True, "Peers": [node(9)]}).keepalive and set(nm.peers) == {1}


def test_packet_filters_by_name() -> None:
    nm = Netmap()
    apply(nm, {"PacketFilters": {"base": [{"SrcIPs": ["a"]}], "extra": [{"SrcIPs": ["b"]}]}})
    assert [r["SrcIPs"] for r in nm.packet_filter] == [["a"], ["b"]]
    apply(nm, {"PacketFilters": {"extra": None}})
    assert len(nm.packet_filter) == 1
    apply(nm, {"PacketFilters": {"*": None}})
    assert nm.packet_filter == []


def test_expired_peer_dropped() -> None:
    nm = Netmap()
    apply(nm, {"Peers": [node(1), node(2)]})
    apply(nm, {"PeersChanged": [node(2, Expired=True)]})
    assert set(nm.peers) == {1}


def test_ten_thousand_peers_apply_fast() -> None:
    doc = {"Node": node(0), "Peers": [node(i) for i in range(1, 10001)]}
    start = time.perf_counter()
    nm = Netmap()
    apply(nm, doc)
    elapsed = time.perf_counter() - start
    assert len(nm.peers) == 10000
    print(f"10k-peer netmap structured and applied in {elapsed:.3f} s")
    assert elapsed < 1.0


def test_seen_change_dns_and_home_derp_precedence() -> None:
    nm = Netmap()
    apply(nm, {"Peers": [node(1, DERP="127.3.3.40:5", HomeDERP=7), node(2, DERP="127.3.3.40:0")]})
    assert nm.home_derp_of(nm.peers[1]) == 7 and nm.home_derp_of(nm.peers[2]) == 0
    ch = apply(nm, {"PeerSeenChange": {"1": True}, "DNSConfig": {"Domains": ["ts.test"]}, "Domain": "ts.test"})
    assert ch.dns_changed and not ch.peers_added and not ch.peers_removed and set(nm.peers) == {1, 2}
    ch = apply(nm, {"PeersChangedPatch": [{"NodeID": 1, "DiscoKey": "discokey:" + "ab" * 32}]})
    assert nm.peers[1].DiscoKey == "discokey:" + "ab" * 32 and ch.peers_changed == {1}
    ch = apply(nm, {"PeersRemoved": [2, 42]})
    assert ch.peers_removed == {2} and set(nm.peers) == {1}
