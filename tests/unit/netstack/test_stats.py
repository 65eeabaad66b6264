"""Per-connection TCP counters reach the stack's statistics when a connection ends.

``trionet status --json`` shows the stack's counters; SYN retries were invisible
there while issue 8's connections hung in them.
"""

from __future__ import annotations

from trionet.netstack.wire.tcp import ACK, SYN

from .fakepeer import PEER, Harness


def test_syn_retransmits_and_timeouts_of_closed_connections_are_counted() -> None:
    h = Harness()
    conn = h.stack.tcp_connect(PEER, 80, 0.0)
    (syn,) = h.take()
    now = 0.0
    for _ in range(2):  # two SYNs lost
        d = h.stack.next_deadline()
        assert d is not None
        now = d
        h.stack.on_timer(now)
        (again,) = h.take()
        assert again.flags == SYN and again.seq == syn.seq
    assert "tcp_syn_retransmits" not in h.stack.statistics(), "open connections are not summed"
    h.send(now, 80, syn.sport, 9000, syn.seq + 1, SYN | ACK)
    h.take()
    conn.abort(now + 1, "done")
    stats = h.stack.statistics()
    assert stats["tcp_syn_retransmits"] == 2
    assert stats["tcp_rto_timeouts"] == 2
    assert stats["tcp_retransmits"] == 2
    assert stats["tcp_connections"] == 0
