"""Node._on_netmap with malformed peers from control: they are skipped and counted."""

from __future__ import annotations

from pathlib import Path

from trionet import keys, proto
from trionet.control.netmap import Netmap
from trionet.magicsock.conn import MagicConn
from trionet.node import Node
from trionet.wg import WgDevice


def peer(i: int, **kw: object) -> dict[str, object]:
    pub = keys.public_of(keys.new_private())
    return {"ID": i, "Key": keys.format_key("nodekey:", pub), "DiscoKey": f"discokey:{i:064x}",
            "Addresses": [f"100.64.0.{i}/32"], "Name": f"n{i}.ts.test.", "Endpoints": ["10.0.0.1:41641"], **kw}


def test_malformed_peers_are_skipped_and_counted(tmp_path: Path) -> None:
    node = Node(login_server="https://hs.test", state_dir=tmp_path)
    me = keys.new_private()
    node.magic = MagicConn(me, keys.public_of(me), keys.new_private(), keys.public_of(keys.new_private()),
                           lambda *a: None, login_server="https://hs.test")
    node.wg = WgDevice(me)
    good = peer(1)
    bad = [peer(2, Key="nodekey:zz"), peer(3, DiscoKey="discokey:12"), peer(4, AllowedIPs=["not an ip"]),
           peer(5, Key=keys.format_key("nodekey:", keys.public_of(me)))]  # our own key
    netmap = Netmap()
    change = netmap.apply(proto.structure({"Peers": [good, *bad]}, proto.MapResponse))
    node._on_netmap(netmap, change)
    good_key = keys.parse_public(str(good["Key"]), "nodekey:")
    assert list(node.wg.peers) == [good_key]
    assert set(node.magic.paths.peers) == {good_key}
    assert node.stats["netmap.bad_peer"] == 4
