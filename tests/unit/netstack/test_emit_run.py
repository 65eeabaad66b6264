"""A run of new data leaves as MSS-sized segments in one host call: valid checksums,
PSH only where the buffer empties, and the window's remainder held back (SWS)."""

from __future__ import annotations

from trionet.netstack.wire import tcp as wtcp

from .fakepeer import Harness


def test_a_run_is_mss_segments_with_psh_on_the_last() -> None:
    h = Harness()
    _port, seq, _ = h.connect(mss=1000, peer_window=65535)
    data = bytes(range(256)) * 14  # 3584 bytes
    assert h.conn.send(data, 1.0) == len(data)
    segs = h.take()  # parse_out checks both checksums
    assert [len(s.payload) for s in segs] == [1000, 1000, 1000, 584]
    assert [s.seq for s in segs] == [seq, seq + 1000, seq + 2000, seq + 3000]
    assert b"".join(s.payload for s in segs) == data
    assert [bool(s.flags & wtcp.PSH) for s in segs] == [False, False, False, True]
    assert all(s.flags & wtcp.ACK for s in segs)
    assert h.conn.stats["segments_out"] >= 4
    assert h.stack.stats["tcp_out"] == h.stack.stats["ip_out"]


def test_the_window_ends_a_run_on_a_segment_boundary() -> None:
    h = Harness()
    port, seq, peer_seq = h.connect(mss=1000, peer_window=2500)
    h.conn.send(b"x" * 4000, 1.0)
    segs = h.take()
    assert [len(s.payload) for s in segs] == [1000, 1000]  # not the 500 the window has left
    assert not any(s.flags & wtcp.PSH for s in segs)
    h.send(1.1, 80, port, peer_seq, seq + 2000, wtcp.ACK, window=2500)
    segs = h.take()
    assert [(s.seq - seq, len(s.payload)) for s in segs] == [(2000, 1000), (3000, 1000)]
    assert segs[-1].flags & wtcp.PSH
