from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from trionet import proto
from trionet.errors import RemoteProtocolError

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)


@given(st.dictionaries(st.sampled_from(["Node", "Peers", "DERPMap", "PeersRemoved", "OnlineChange", "Zzz",
                                        "PeersChangedPatch", "KeepAlive", "PacketFilters"]), json_values))
def test_map_response_garbage_is_a_clean_error(doc: dict[str, object]) -> None:
    try:
        proto.loads(json.dumps(doc), proto.MapResponse)
    except RemoteProtocolError:
        pass


def test_unknown_fields_ignored_and_none_omitted() -> None:
    r = proto.loads(b'{"Node":{"ID":1,"Brand":"new","Hostinfo":{"Hostname":"a","X":1}},"Future":[1]}',
                    proto.MapResponse)
    assert r.Node.ID == 1 and r.Node.Hostinfo.Hostname == "a"
    assert json.loads(proto.dumps(proto.Hostinfo(Hostname="h"))) == {"Hostname": "h"}


@given(st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_raw_garbage_is_a_clean_error(raw: bytes) -> None:
    for cls in (proto.MapResponse, proto.RegisterResponse, proto.OverTLSPublicKeyResponse):
        try:
            proto.loads(raw, cls)
        except RemoteProtocolError:
            pass


def test_go_names_and_id_keyed_maps() -> None:
    r = proto.loads(b'{"DERPMap":{"Regions":{"999":{"RegionID":999,"Nodes":[{"Name":"1","HostName":"h"}]}}},'
                    b'"PeersRemoved":[5],"OnlineChange":{"7":true}}', proto.MapResponse)
    assert r.DERPMap.Regions[999].RegionID == 999 and r.PeersRemoved == [5] and r.OnlineChange == {7: True}
    k = proto.loads(b'{"legacyPublicKey":"mkey:00","publicKey":"mkey:11","extra":1}', proto.OverTLSPublicKeyResponse)
    assert k.publicKey == "mkey:11"
    for bad in (b"[]", b"1", b'"x"', b"null", b'{"Node":"nope"}', b'{"PeersRemoved":"x"}'):
        try:
            proto.loads(bad, proto.MapResponse)
        except RemoteProtocolError:
            pass


def test_typed_filter_dns_and_requests() -> None:
    rule = proto.structure({"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}],
                            "New": 1}, proto.FilterRule)
    assert rule.DstPorts[0].Ports.Last == 65535
    dns = proto.structure({"Resolvers": [{"Addr": "1.1.1.1"}], "Routes": {"ts.net": None},
                           "ExtraRecords": [{"Name": "a.", "Value": "100.64.0.1"}]}, proto.DNSConfig)
    assert dns.Resolvers[0].Addr == "1.1.1.1" and dns.Routes == {"ts.net": None}
    dm = proto.structure({"HomeParams": {"RegionScore": {"1": 2.0}}, "Regions": {"1": None}}, proto.DERPMap)
    assert dm.HomeParams.RegionScore == {1: 2.0} and dm.Regions == {1: None}
    req = proto.RegisterRequest(Version=116, NodeKey="nodekey:00", Auth=proto.Auth(AuthKey="k"))
    assert json.loads(proto.dumps(req)) == {"Version": 116, "NodeKey": "nodekey:00", "OldNodeKey": "",
                                            "Auth": {"AuthKey": "k"}, "Ephemeral": False}
