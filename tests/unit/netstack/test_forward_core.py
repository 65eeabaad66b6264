"""The stack's forwarding hooks, sans-IO: a SYN for a forwarded address is held
(no SYN-ACK) until the forwarder completes or refuses it; retransmitted SYNs are
swallowed meanwhile; limits drop the SYN; UDP and echo requests reach the hooks;
replies leave from the forwarded address."""

from __future__ import annotations

import ipaddress

from trionet.netstack.stack import ConnKey, StackCore
from trionet.netstack.tcp import State
from trionet.netstack.wire import icmp as wicmp
from trionet.netstack.wire import ipv4 as wip4
from trionet.netstack.wire import udp as wudp
from trionet.netstack.wire.tcp import ACK, RST, SYN

from .fakepeer import PEER, US, make_segment, parse_out

ROUTED = ipaddress.ip_address("192.168.50.7")
OTHER = ipaddress.ip_address("192.168.99.1")  # not forwarded


class Hooks:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.syns: list[ConnKey] = []
        self.datagrams: list[tuple[bytes, int, bytes, int, bytes]] = []
        self.echoes: list[tuple[bytes, bytes, int, int, bytes]] = []

    def wants(self, dst: bytes) -> bool:
        return dst == ROUTED.packed

    def tcp_syn(self, key: ConnKey) -> bool:
        self.syns.append(key)
        return self.accept

    def udp_datagram(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        self.datagrams.append((src, sport, dst, dport, payload))

    def icmp_echo(self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> None:
        self.echoes.append((src, dst, ident, seq, payload))


def make_stack(hooks: Hooks, **limits: int) -> tuple[StackCore, list[bytes]]:
    out: list[bytes] = []
    stack = StackCore([US], out.append, seed=3, **limits)
    stack.forwarder = hooks
    return stack, out


def syn(sport: int = 40000, dst: ipaddress.IPv4Address = ROUTED, src: bytes = PEER.packed) -> bytes:
    return make_segment(sport, 80, 1000, 0, SYN, 65535, src=src, dst=dst.packed)


KEY = (PEER.packed, 40000, ROUTED.packed, 80)


def test_syn_is_held_until_completed_then_the_handshake_finishes_from_the_forwarded_address() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks)
    stack.deliver(syn(), 0.0)
    assert hooks.syns == [KEY]
    assert out == []  # no SYN-ACK before the host has dialed
    stack.deliver(syn(), 1.0)  # the client's retransmission
    assert out == [] and hooks.syns == [KEY]
    assert stack.stats["tcp_forward_syn_swallowed"] == 1
    conn = stack.complete_pending(KEY, 1.5)
    assert conn is not None and conn.state is State.SYN_RECEIVED
    synack = parse_out(out.pop())
    assert synack.flags == SYN | ACK and synack.ack == 1001 and synack.sport == 80
    stack.deliver(make_segment(40000, 80, 1001, synack.seq + 1, ACK, 65535, src=PEER.packed,
                               dst=ROUTED.packed), 2.0)
    assert conn.state is State.ESTABLISHED
    assert stack.statistics()["tcp_forward_pending"] == 0


def test_refused_pending_syn_gets_a_rst_at_once() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks)
    stack.deliver(syn(), 0.0)
    stack.refuse_pending(KEY)
    raw = out.pop()
    rst = parse_out(raw)
    assert rst.flags == RST | ACK and rst.ack == 1001 and rst.sport == 80
    assert wip4.parse(memoryview(raw)).src == ROUTED.packed  # from the address the client dialed
    assert stack.stats["tcp_forward_refused"] == 1 and not stack.pending
    assert stack.complete_pending(KEY, 1.0) is None  # nothing left to complete


def test_rst_from_the_client_forgets_the_held_syn() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks)
    stack.deliver(syn(), 0.0)
    stack.deliver(make_segment(40000, 80, 1001, 0, RST, 0, src=PEER.packed, dst=ROUTED.packed), 0.5)
    assert not stack.pending and stack.stats["tcp_forward_client_reset"] == 1
    assert stack.complete_pending(KEY, 1.0) is None and out == []


def test_not_forwarded_destination_is_dropped_as_not_for_us() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks)
    stack.deliver(syn(dst=OTHER), 0.0)
    assert hooks.syns == [] and out == [] and stack.stats["drop_not_for_us"] == 1


def test_pending_limits_drop_the_syn_per_peer_and_in_total() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks, max_forward_pending=3, max_forward_pending_per_peer=2)
    for port in (1, 2, 3):
        stack.deliver(syn(sport=port), 0.0)
    assert len(stack.pending) == 2 and stack.stats["drop_forward_pending_limit_peer"] == 1
    other = ipaddress.ip_address("10.0.0.9").packed
    stack.deliver(syn(sport=5, src=other), 0.0)
    stack.deliver(syn(sport=6, src=other), 0.0)
    assert len(stack.pending) == 3 and stack.stats["drop_forward_pending_limit"] == 1
    assert out == []  # dropped, not reset: the client's retry may find room


def test_forwarder_saying_no_drops_the_syn() -> None:
    hooks = Hooks(accept=False)
    stack, out = make_stack(hooks)
    stack.deliver(syn(), 0.0)
    assert not stack.pending and out == [] and stack.stats["drop_forward_refused"] == 1


def test_complete_past_the_connection_limit_resets() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks, max_connections=1, max_connections_per_peer=5)
    stack.deliver(syn(sport=1), 0.0)
    stack.deliver(syn(sport=2), 0.0)  # both pending: a pending SYN holds no connection yet
    assert stack.complete_pending((PEER.packed, 1, ROUTED.packed, 80), 0.1) is not None
    out.clear()
    assert stack.complete_pending((PEER.packed, 2, ROUTED.packed, 80), 0.1) is None
    assert parse_out(out.pop()).flags & RST


def test_udp_and_echo_to_a_forwarded_address_reach_the_hooks_and_replies_leave_from_it() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks)
    src, dst = PEER.packed, ROUTED.packed
    dg = wudp.build(5353, 53, b"query", wip4.pseudo_sum(src, dst, 17, 0))
    stack.deliver(wip4.build_header(src, dst, 17, len(dg)) + dg, 0.0)
    assert hooks.datagrams == [(src, 5353, dst, 53, b"query")]
    assert stack.udp_send_from(dst, 53, src, 5353, b"answer")
    reply = memoryview(out.pop())
    ip = wip4.parse(reply)
    assert ip.src == dst and ip.dst == src
    assert wudp.parse(reply[ip.header_len:ip.total_len], wip4.pseudo_sum(dst, src, 17, ip.total_len - 20),
                      True).dst_port == 5353
    assert not stack.udp_send_from(dst, 53, src, 5353, b"x" * 2000)  # past the MTU: dropped, counted
    assert stack.stats["drop_udp_forward_too_big"] == 1

    echo = wicmp.build(wicmp.V4_ECHO_REQUEST, 0, 7, 9, b"ping")
    stack.deliver(wip4.build_header(src, dst, 1, len(echo)) + echo, 0.0)
    assert hooks.echoes == [(src, dst, 7, 9, b"ping")]
    assert out == []  # no answer of its own: the forwarder decides
    stack.echo_reply_from(dst, src, 7, 9, b"ping")
    reply = memoryview(out.pop())
    ip = wip4.parse(reply)
    m = wicmp.parse(reply[ip.header_len:ip.total_len], 0)
    assert ip.src == dst and m.type == wicmp.V4_ECHO_REPLY and (m.ident, m.seq) == (7, 9)


def test_established_forwarded_connection_takes_the_fast_path() -> None:
    hooks = Hooks()
    stack, out = make_stack(hooks)
    stack.deliver(syn(), 0.0)
    conn = stack.complete_pending(KEY, 0.0)
    assert conn is not None
    synack = parse_out(out.pop())
    stack.deliver(make_segment(40000, 80, 1001, synack.seq + 1, ACK, 65535, src=PEER.packed,
                               dst=ROUTED.packed), 0.1)
    before = stack.fast_segments
    stack.deliver_many([make_segment(40000, 80, 1001 + i * 100, synack.seq + 1, ACK, 65535, b"d" * 100,
                                     src=PEER.packed, dst=ROUTED.packed) for i in range(4)], 0.2)
    assert stack.fast_segments - before >= 3
    assert conn.read(1000, 0.3) == b"d" * 400
