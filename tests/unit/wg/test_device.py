"""Handshakes, data, peer table and bad input of WgDevice (two of our own devices)."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest

from tests.unit.wg.sim import A_IP, B_IP, WALL0, Sim, ip4, kind, pair
from trionet.errors import LocalProtocolError
from trionet.wg import WgDevice, classify, receiver_index
from trionet.wg.constants import MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT


def established() -> tuple[WgDevice, WgDevice, Sim]:
    a, b = pair()
    sim = Sim(a, b)
    sim.send("a", ip4(A_IP, B_IP))
    sim.send("b", ip4(B_IP, A_IP))
    assert len(sim.delivered) == 2
    return a, b, sim


def test_handshake_then_data_both_ways() -> None:
    a, b, sim = established()
    assert a.counters["handshakes_completed"] == b.counters["handshakes_completed"] == 1
    assert [dst for _, dst, _ in sim.delivered] == ["b", "a"]
    assert sim.delivered[0][2] == ip4(A_IP, B_IP)
    assert not a.drops and not b.drops
    s = a.statistics()
    assert s["peers"] == 1 and s["tx_packets"] == 1 and s["rx_packets"] == 1


def test_receiver_index_names_the_peer_without_decrypting() -> None:
    a, b, _ = established()
    tx = a.send_ip(ip4(A_IP, B_IP), 1.0, WALL0)[0]
    assert classify(tx.data) == MSG_TRANSPORT
    idx = receiver_index(tx.data)
    assert idx is not None and b.peer_for_receiver_index(idx) == a.public
    assert b.peer_for_receiver_index((idx + 1) & 0xFFFFFFFF) is None


def test_classify() -> None:
    assert classify(b"") == 0 and classify(b"\x01\x00\x00") == 0
    assert classify(b"\x01\x00\x00\x00" + bytes(144)) == MSG_INITIATION
    assert classify(b"\x01\x00\x00\x00" + bytes(145)) == 0
    assert classify(b"\x02\x00\x00\x00" + bytes(88)) == MSG_RESPONSE
    assert classify(b"\x03\x00\x00\x00" + bytes(60)) == MSG_COOKIE_REPLY
    assert classify(b"\x04\x00\x00\x00" + bytes(28)) == MSG_TRANSPORT
    assert classify(b"\x04\x00\x00\x00" + bytes(27)) == 0
    assert classify(b"\x04\x01\x00\x00" + bytes(28)) == 0  # reserved bytes must be zero
    assert classify(b"\x05\x00\x00\x00" + bytes(28)) == 0
    assert receiver_index(b"\x03\x00\x00\x00\x07\x00\x00\x00" + bytes(56)) == 7
    assert receiver_index(b"\x01\x00\x00\x00" + bytes(144)) is None


def test_tai64n_vector() -> None:
    from trionet.wg.messages import tai64n
    assert tai64n(0.0).hex() == "400000000000000a00000000"
    # 2^24 ns granularity (wireguard-go whitens the low bits)
    assert tai64n(1.5).hex() == "400000000000000b" + "%08x" % (500_000_000 & ~0xFFFFFF)


def test_bad_input_dropped_and_counted_by_reason() -> None:
    a, b, _ = established()
    tx = a.send_ip(ip4(A_IP, B_IP), 1.0, WALL0)[0]
    data = bytes(tx.data)
    cases = {
        "short": [b"", b"\x04\x00", data[:31]],
        "unknown_type": [b"\x09\x00\x00\x00" + bytes(40), b"\x00\x00\x00\x00" + bytes(40)],
        "oversized": [data[:16] + bytes(70000)],
        "unknown_index": [data[:4] + b"\xff\xff\xff\xff" + data[8:]],
        "decrypt_failed": [data[:-1] + bytes([data[-1] ^ 1]), data[:16] + bytes(len(data) - 16)],
        "bad_size": [b"\x01\x00\x00\x00" + bytes(100), b"\x02\x00\x00\x00" + bytes(100),
                     b"\x03\x00\x00\x00" + bytes(10)],
        "bad_mac1": [b"\x01\x00\x00\x00" + bytes(144), b"\x02\x00\x00\x00" + bytes(88)],
    }
    for reason, datagrams in cases.items():
        before = b.drops[reason]
        for d in datagrams:
            got = b.receive(d, 1.0, WALL0)
            assert not got.packets and not got.transmits, reason
        assert b.drops[reason] - before == len(datagrams), (reason, dict(b.drops))
    # a replay: accepted once, then dropped
    assert b.receive(data, 1.0, WALL0).packets
    assert not b.receive(data, 1.0, WALL0).packets
    assert b.drops["replayed"] == 1
    assert b.drops["internal_error"] == 0


def test_replayed_initiation_and_flood_are_dropped() -> None:
    a, b = pair()
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data
    assert b.receive(init, 0.0, WALL0).transmits
    assert not b.receive(init, 1.0, WALL0).transmits
    assert b.drops["replayed_initiation"] == 1
    # a fresh initiation less than 20 ms after the last accepted one is a flood
    a.reset_sessions(b.public)
    init2 = a.send_ip(ip4(A_IP, B_IP), 0.01, WALL0 + 1)[0].data
    assert not b.receive(init2, 0.01, WALL0 + 1).transmits
    assert b.drops["initiation_flood"] == 1


def test_initiation_from_an_unknown_key_is_dropped() -> None:
    _a, b = pair()
    stranger = WgDevice(os.urandom(32))
    stranger.set_peer(b.public, [B_IP + "/32"])
    init = stranger.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0].data
    assert not b.receive(init, 0.0, WALL0).transmits
    assert b.drops["unknown_peer"] == 1


def test_inner_source_must_be_in_the_senders_allowed_ips() -> None:
    a, b, _sim = established()
    got = b.receive(a.send_ip(ip4("10.9.9.9", B_IP), 1.0, WALL0)[0].data, 1.0, WALL0)
    assert not got.packets and b.drops["inner_src_not_allowed"] == 1
    # truncated inner packet: total length says more than arrived
    bad = bytearray(ip4(A_IP, B_IP))
    bad[2:4] = struct.pack("!H", 500)
    assert not b.receive(a.send_ip(bytes(bad), 1.0, WALL0)[0].data, 1.0, WALL0).packets
    assert b.drops["inner_bad_length"] == 1
    # padding is stripped: the packet comes out as long as its IP header says
    odd = ip4(A_IP, B_IP, b"y" * 7)
    got2 = b.receive(a.send_ip(odd, 1.0, WALL0)[0].data, 1.0, WALL0)
    assert got2.packets == [(a.public, odd)]


def test_ipv6_and_longest_prefix_routing() -> None:
    a, b = pair()
    c = WgDevice(os.urandom(32))
    a.set_peer(b.public, ["10.0.0.0/8", "fd00::/16"])
    a.set_peer(c.public, ["10.1.0.0/16", "fd00:1::/32", "0.0.0.0/0"])
    assert a.route(ipaddress.ip_address("10.2.3.4")) == b.public
    assert a.route(ipaddress.ip_address("10.1.3.4")) == c.public
    assert a.route(ipaddress.ip_address("8.8.8.8")) == c.public
    assert a.route(ipaddress.ip_address("fd00:1::5")) == c.public
    assert a.route(ipaddress.ip_address("fd00:2::5")) == b.public
    assert a.route(ipaddress.ip_address("fe80::1")) is None
    # live update: c loses the default route, b gains 10.1.2.0/24
    a.set_peer(c.public, ["10.1.0.0/16"])
    a.set_peer(b.public, ["10.0.0.0/8", "10.1.2.0/24"])
    assert a.route(ipaddress.ip_address("8.8.8.8")) is None
    assert a.route(ipaddress.ip_address("10.1.2.3")) == b.public
    assert a.route(ipaddress.ip_address("10.1.3.3")) == c.public
    assert sorted(map(str, a.allowed_ips(b.public))) == ["10.0.0.0/8", "10.1.2.0/24"]
    a.remove_peer(c.public)
    assert a.route(ipaddress.ip_address("10.1.3.3")) == b.public
    assert a.send_ip(ip4(A_IP, "192.168.1.1"), 0.0, WALL0) == []
    assert a.drops["send_no_route"] == 1


def test_ipv6_data() -> None:
    a, b = pair()
    a.set_peer(b.public, ["fd00::2/128"])
    b.set_peer(a.public, ["fd00::1/128"])
    sim = Sim(a, b)
    pkt = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, ipaddress.ip_address("fd00::1").packed,
                      ipaddress.ip_address("fd00::2").packed) + b"12345678"
    sim.send("a", pkt)
    assert [p for _, _, p in sim.delivered] == [pkt]


def test_removed_peer_loses_its_sessions() -> None:
    a, b, sim = established()
    tx = a.send_ip(ip4(A_IP, B_IP), 1.0, WALL0)[0]
    b.remove_peer(a.public)
    assert not b.receive(tx.data, 1.0, WALL0).packets
    assert b.drops["unknown_index"] == 1
    assert b.statistics()["indices"] == 0
    # and added again: a fresh handshake works
    b.set_peer(a.public, [A_IP + "/32"])
    a.reset_sessions(b.public)
    sim.now = 2.0
    sim.send("a", ip4(A_IP, B_IP))
    assert sim.delivered[-1][1] == "b"


def test_local_misuse_raises() -> None:
    a, _b = pair()
    with pytest.raises(LocalProtocolError):
        WgDevice(b"short")
    with pytest.raises(LocalProtocolError):
        a.set_peer(b"x" * 31, [])
    with pytest.raises(LocalProtocolError):
        a.set_peer(a.public, [])


def test_under_load_cookie_reply_then_mac2_then_ratelimit() -> None:
    a, b = pair()
    b.force_under_load = True
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0]
    got = b.receive(init.data, 0.0, WALL0, src=("10.250.0.1", 4242))
    assert [classify(t.data) for t in got.transmits] == [MSG_COOKIE_REPLY]
    assert got.transmits[0].path == ("10.250.0.1", 4242) and got.transmits[0].peer == b""
    assert b.drops["under_load_no_mac2"] == 1 and b.counters["responses_sent"] == 0
    assert not a.receive(got.transmits[0].data, 0.0, WALL0).transmits
    assert a.counters["cookie_replies_received"] == 1
    # the retransmitted initiation carries mac2 and gets a response
    retry = a.tick(5.4, WALL0 + 5.4)
    assert [classify(t.data) for t in retry] == [MSG_INITIATION]
    assert retry[0].data[-16:] != bytes(16)
    got = b.receive(retry[0].data, 5.4, WALL0 + 5.4, src=("10.250.0.1", 4242))
    assert [classify(t.data) for t in got.transmits] == [MSG_RESPONSE]
    # a cookie from another source address does not count
    got = b.receive(retry[0].data, 5.5, WALL0 + 5.5, src=("10.250.0.9", 4242))
    assert [classify(t.data) for t in got.transmits] == [MSG_COOKIE_REPLY]
    # rate limit: 20/s with a burst of 5 per source address
    before = b.drops["ratelimited"]
    for _ in range(10):
        b.receive(retry[0].data, 5.6, WALL0, src=("10.250.0.1", 4242))
    assert b.drops["ratelimited"] - before >= 5


def test_backlog_puts_the_device_under_load_for_a_second() -> None:
    a, b = pair()
    init = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)[0]
    got = b.receive(init.data, 0.0, WALL0, src=("10.0.0.1", 1), backlog=200)
    assert [classify(t.data) for t in got.transmits] == [MSG_COOKIE_REPLY]
    assert b.under_load(0.9) and not b.under_load(1.1)


def test_memoryview_and_bytearray_inputs() -> None:
    a, b, _ = established()
    pkt = ip4(A_IP, B_IP, b"abc")
    tx = a.send_ip(memoryview(bytearray(pkt)), 1.0, WALL0)
    got = b.receive(memoryview(bytearray(tx[0].data)), 1.0, WALL0)
    assert got.packets == [(a.public, pkt)]
    assert isinstance(tx[0].data, bytes)


def test_new_static_key_restarts_sessions_and_handshakes_under_it() -> None:
    a, b, sim = established()
    old_public = a.public
    old_tx = a.send_ip(ip4(A_IP, B_IP), 1.0, WALL0)[0]
    a.set_private_key(os.urandom(32))
    assert a.public != old_public and a.statistics()["indices"] == 0
    # the peer learns our new key from its netmap, as after a node key renewal
    b.remove_peer(old_public)
    b.set_peer(a.public, [A_IP + "/32"])
    sim.names[a.public] = "a"
    sim.now = 2.0
    before = b.counters["handshakes_completed"]
    sim.send("a", ip4(A_IP, B_IP, b"after renewal"))
    assert sim.delivered[-1] == (2.0, "b", ip4(A_IP, B_IP, b"after renewal"))
    assert b.counters["handshakes_completed"] == before + 1
    # a session made with the old key is gone on both ends
    assert not b.receive(old_tx.data, 2.0, WALL0 + 2).packets


def test_new_static_key_equal_to_a_peers_key_removes_that_peer() -> None:
    a, b, _ = established()
    key = os.urandom(32)
    c = WgDevice(key)
    a.set_peer(c.public, ["10.0.0.3/32"])
    a.set_private_key(key)
    assert c.public not in a.peers and b.public in a.peers


def test_peer_heard_resends_an_unanswered_initiation_once_it_is_worth_it() -> None:
    a, b = pair()
    first = a.send_ip(ip4(A_IP, B_IP), 0.0, WALL0)
    assert [classify(t.data) for t in first] == [MSG_INITIATION]  # lost: b did not know us yet
    assert a.peer_heard(b.public, 0.05, WALL0) == []  # too soon: it may still be answered
    again = a.peer_heard(b.public, 0.3, WALL0 + 0.3)
    assert [classify(t.data) for t in again] == [MSG_INITIATION]
    assert a.counters["initiations_resent_early"] == 1
    got = b.receive(again[0].data, 0.31, WALL0 + 0.31)
    done = a.receive(got.transmits[0].data, 0.32, WALL0 + 0.32)
    assert done.transmits, "the staged packet goes out once the session exists"
    assert a.peer_heard(b.public, 1.0, WALL0 + 1) == []  # a session exists: nothing to resend
    assert a.peer_heard(os.urandom(32), 1.0, WALL0 + 1) == []  # unknown peer


def test_a_burst_is_sent_in_order_with_one_rekey_initiation() -> None:
    from trionet.wg.constants import REKEY_AFTER_MESSAGES

    a, b, sim = established()
    burst = [ip4(A_IP, B_IP, bytes([i]) * (40 + i)) for i in range(20)]
    burst.insert(5, b"\x45short")  # bad packets in a burst are dropped alone
    txs = a.send_ip_many(burst, sim.now, WALL0)
    assert [kind(t) for t in txs] == ["data"] * 20
    got = [b.receive(t.data, sim.now, WALL0).packets for t in txs]
    assert [p for ((_, p),) in got] == [p for p in burst if len(p) > 20]
    assert a.drops["send_short"] == 1
    # past REKEY_AFTER_MESSAGES, a burst asks for one new handshake, not one per packet
    a.peers[b.public].current.send_counter = REKEY_AFTER_MESSAGES + 1  # type: ignore[union-attr]
    sim.now += 10  # past REKEY_TIMEOUT since the last initiation
    txs = a.send_ip_many(burst[:4], sim.now, WALL0)
    assert [kind(t) for t in txs] == ["data"] * 4 + ["initiation"]


def _third_peer(b: WgDevice, ip: str) -> WgDevice:
    """A new device with a live session to ``b`` (address ``ip``)."""
    c = WgDevice(os.urandom(32))
    b.set_peer(c.public, [ip + "/32"])
    c.set_peer(b.public, [B_IP + "/32"])
    init = c.send_ip(ip4(ip, B_IP), 0.0, WALL0)[0].data
    staged = c.receive(b.receive(init, 0.0, WALL0).transmits[0].data, 0.0, WALL0).transmits
    assert [p for t in staged for _, p in b.receive(t.data, 0.0, WALL0).packets] == [ip4(ip, B_IP)]
    return c


def test_a_batch_of_runs_from_two_peers_is_checked_message_by_message() -> None:
    from trionet.wg.constants import KEEPALIVE_TIMEOUT

    a, b, _sim = established()
    c = _third_peer(b, "10.0.0.3")
    peer_a, peer_c = b.peers[a.public], b.peers[c.public]
    before_a, before_c = peer_a.rx_packets, peer_c.rx_packets
    peer_a.t_send_keepalive = None
    now = 1.0
    pa = [ip4(A_IP, B_IP, bytes([i]) * (50 + i)) for i in range(4)]
    a1, a2, a3, a4 = (t.data for t in a.send_ip_many(pa, now, WALL0))
    spoof = a.send_ip(ip4("10.9.9.9", B_IP), now, WALL0)[0].data
    keepalive = a._send_keepalive(a.peers[b.public], now, WALL0, None)[0].data
    pc = ip4("10.0.0.3", B_IP, b"c" * 70)
    c1 = c.send_ip(pc, now, WALL0)[0].data
    a5 = a.send_ip(ip4(A_IP, B_IP, b"late"), now, WALL0)[0].data
    bad = bytearray(a3)
    bad[-1] ^= 1
    batch = [a1, a2, a2, c1, bytes(bad), spoof, keepalive, a4, a3, a4[:20], a5]
    got = b.receive_many(batch, now, WALL0, src=("198.51.100.7", 41641))
    assert got.packets == [(a.public, pa[0]), (a.public, pa[1]), (c.public, pc), (a.public, pa[3]),
                           (a.public, pa[2]), (a.public, ip4(A_IP, B_IP, b"late"))]
    assert dict(b.drops) == {"replayed": 1, "decrypt_failed": 1, "inner_src_not_allowed": 1, "short": 1}
    assert b.counters["keepalives_received"] == 1
    assert peer_a.rx_packets - before_a == 5 and peer_c.rx_packets - before_c == 1
    assert peer_a.t_send_keepalive == now + KEEPALIVE_TIMEOUT and peer_a.need_another_keepalive
    assert peer_a.path == peer_c.path == ("198.51.100.7", 41641)
    assert not got.transmits
    # the same messages again, in any grouping: every one is a replay now
    again = b.receive_many([a1, c1, a3, a5], now, WALL0)
    assert not again.packets and b.drops["replayed"] == 5


def test_a_handshake_inside_a_batch_ends_the_run_and_the_old_session_carries_on() -> None:
    from trionet.wg.constants import REKEY_AFTER_MESSAGES

    a, b, sim = established()
    a.peers[b.public].current.send_counter = REKEY_AFTER_MESSAGES + 1  # type: ignore[union-attr]
    sim.now += 10
    first = a.send_ip_many([ip4(A_IP, B_IP, b"one")], sim.now, WALL0 + sim.now)
    assert [kind(t) for t in first] == ["data", "initiation"]
    second = a.send_ip(ip4(A_IP, B_IP, b"two"), sim.now, WALL0 + sim.now)  # still the old session
    got = b.receive_many([first[0].data, first[1].data, second[0].data], sim.now, WALL0 + sim.now)
    assert [p for _, p in got.packets] == [ip4(A_IP, B_IP, b"one"), ip4(A_IP, B_IP, b"two")]
    assert [kind(t) for t in got.transmits] == ["response"]
    assert not b.drops
    # the response completes a's handshake; its next message confirms the new session to b
    a.receive(got.transmits[0].data, sim.now, WALL0 + sim.now)
    third = a.send_ip(ip4(A_IP, B_IP, b"three"), sim.now, WALL0 + sim.now)
    assert [p for _, p in b.receive(third[0].data, sim.now, WALL0 + sim.now).packets] == [ip4(A_IP, B_IP, b"three")]
    assert b.counters["handshakes_completed"] == 2


def test_a_reordered_batch_with_duplicates_delivers_each_message_once() -> None:
    import random

    a, b, sim = established()
    packets = [ip4(A_IP, B_IP, i.to_bytes(2, "big") * 30) for i in range(300)]
    datagrams = [t.data for t in a.send_ip_many(packets, sim.now, WALL0)]
    rng = random.Random(3)
    order = list(range(300))
    for i in range(0, 300, 7):  # local reordering across 64-counter blocks, and duplicates
        j = min(299, i + rng.randrange(1, 90))
        order[i], order[j] = order[j], order[i]
    order += rng.sample(range(300), 40)
    got = b.receive_many([datagrams[i] for i in order], sim.now, WALL0)
    assert sorted(p for _, p in got.packets) == sorted(packets)
    assert b.drops["replayed"] == 40


def test_a_counter_at_reject_after_messages_is_refused_even_in_order() -> None:
    import struct as st

    from trionet.wg.constants import REJECT_AFTER_MESSAGES

    a, b, sim = established()
    kp = a.peers[b.public].current
    assert kp is not None

    def sealed(counter: int) -> bytes:
        return (st.pack("<IIQ", 4, kp.remote_index, counter)
                + kp.send.encrypt(st.pack("<4xQ", counter), ip4(A_IP, B_IP), None))

    got = b.receive_many([sealed(REJECT_AFTER_MESSAGES - 2), sealed(REJECT_AFTER_MESSAGES - 1),
                          sealed(REJECT_AFTER_MESSAGES)], sim.now, WALL0)
    assert len(got.packets) == 2 and b.drops["replayed"] == 1


def test_a_burst_to_several_peers_goes_to_each_in_order() -> None:
    a, b, sim = established()
    c = _third_peer(b, "10.0.0.3")  # b's peer with a session
    d = WgDevice(os.urandom(32))  # b's peer without one yet
    b.set_peer(d.public, ["10.0.0.4/32"])
    sent_before = b.peers[a.public].tx_packets, b.peers[c.public].tx_packets
    to_a = [ip4(B_IP, A_IP, bytes([i]) * 40) for i in range(3)]
    to_c = [ip4(B_IP, "10.0.0.3", bytes([i]) * 40) for i in range(3)]
    burst = [to_a[0], to_a[1], to_c[0], ip4(B_IP, "10.9.9.9"), to_c[1], ip4(B_IP, "10.0.0.4"),
             to_a[2], to_c[2]]
    txs = b.send_ip_many(burst, sim.now, WALL0)
    assert [(t.peer, kind(t)) for t in txs] == [
        (a.public, "data"), (a.public, "data"), (c.public, "data"), (c.public, "data"),
        (d.public, "initiation"), (a.public, "data"), (c.public, "data")]
    assert b.drops["send_no_route"] == 1
    got_a = [p for t in txs if t.peer == a.public for _, p in a.receive(t.data, sim.now, WALL0).packets]
    got_c = [p for t in txs if t.peer == c.public for _, p in c.receive(t.data, sim.now, WALL0).packets]
    assert got_a == to_a and got_c == to_c
    assert (b.peers[a.public].tx_packets - sent_before[0], b.peers[c.public].tx_packets - sent_before[1]) == (3, 3)
    assert list(b.peers[d.public].staged) == [ip4(B_IP, "10.0.0.4")]


def test_into_collects_the_packets_without_their_peers() -> None:
    a, b, sim = established()
    c = _third_peer(b, "10.0.0.3")
    pa, pc = ip4(A_IP, B_IP, b"to b from a"), ip4("10.0.0.3", B_IP, b"to b from c")
    batch = [a.send_ip(pa, sim.now, WALL0)[0].data, c.send_ip(pc, sim.now, WALL0)[0].data]
    inbox: list[bytes] = [b"earlier"]
    got = b.receive_many(batch, sim.now, WALL0, into=inbox)
    assert inbox == [b"earlier", pa, pc] and got.packets == []
    assert b.peers[c.public].rx_packets == 2  # the handshake's staged packet, and this one
