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
