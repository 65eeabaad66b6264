"""A synthetic 10,000-peer netmap: JSON decode, cattrs, netmap apply, WireGuard peer table."""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

from trionet import proto
from trionet.control.netmap import Netmap
from trionet.wg import WgDevice

PEERS = 10_000


def node(i: int) -> dict[str, object]:
    ip4 = ipaddress.ip_address("100.64.0.0") + i
    return {"ID": i, "StableID": f"n{i}", "Name": f"node{i}.ts.test.", "Key": "nodekey:" + os.urandom(32).hex(),
            "DiscoKey": "discokey:" + os.urandom(32).hex(), "Addresses": [f"{ip4}/32", f"fd7a:115c:a1e0::{i:x}/128"],
            "AllowedIPs": [f"{ip4}/32", f"fd7a:115c:a1e0::{i:x}/128"],
            "Endpoints": [f"10.0.{i >> 8 & 255}.{i & 255}:41641"],
            "HomeDERP": 999, "Hostinfo": {"Hostname": f"node{i}", "OS": "linux"}, "Online": True}


def main() -> dict[str, float]:
    raw = json.dumps({"Node": node(0), "Peers": [node(i) for i in range(1, PEERS + 1)],
                      "DERPMap": {"Regions": {"999": {"RegionID": 999, "Nodes": [{"HostName": "h"}]}}}}).encode()
    gc.collect()
    t0 = time.perf_counter()
    resp = proto.loads(raw, proto.MapResponse)
    t1 = time.perf_counter()
    nm = Netmap()
    nm.apply(resp)
    t2 = time.perf_counter()
    wg = WgDevice(os.urandom(32))
    for peer in nm.peers.values():
        wg.set_peer(bytes.fromhex(peer.Key[8:]), peer.AllowedIPs or [])
    t3 = time.perf_counter()
    del resp, nm, wg
    gc.collect()
    tracemalloc.start()  # a second pass, for memory only (tracemalloc slows everything)
    nm = Netmap()
    nm.apply(proto.loads(raw, proto.MapResponse))
    wg = WgDevice(os.urandom(32))
    for peer in nm.peers.values():
        wg.set_peer(bytes.fromhex(peer.Key[8:]), peer.AllowedIPs or [])
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    r = {"peers": PEERS, "json_MB": len(raw) / 1e6, "decode_s": t1 - t0, "apply_s": t2 - t1, "wg_table_s": t3 - t2,
         "total_s": t3 - t0, "memory_MB": current / 1e6, "peak_MB": peak / 1e6}
    print(f"10,000-peer netmap ({r['json_MB']:.1f} MB JSON): decode+cattrs {r['decode_s']:.3f} s, "
          f"apply {r['apply_s']:.3f} s, WireGuard table {r['wg_table_s']:.3f} s, total {r['total_s']:.3f} s "
          f"(aim < 1 s); memory {r['memory_MB']:.0f} MB (peak {r['peak_MB']:.0f} MB)")
    return r


if __name__ == "__main__":
    res = main()
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(res, indent=2))
