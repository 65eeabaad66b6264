"""Every parser that reads network or user bytes, under a mutation fuzzer.

`make fuzz` runs TRIONET_FUZZ_EXAMPLES inputs per parser (1,000,000 by
default). Inputs are random bytes and mutations (bit flips, truncation,
splices, length-field edits, duplication) of valid seeds, so the fuzzer gets
past the first length check. A parser may only raise the errors it declares
(RemoteProtocolError for network garbage); anything else is a crash: the input
is saved under tests/fuzz/crashes/ and replayed by every `make test` as a
regression case (test_saved_crashes_stay_fixed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import ipaddress
import json
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from trionet.errors import RemoteProtocolError

CRASH_DIR = Path(__file__).parent / "crashes"
EXAMPLES = int(os.environ.get("TRIONET_FUZZ_EXAMPLES", "1000000"))

Target = tuple[Callable[[bytes], Any], tuple[type[BaseException], ...], list[bytes]]
TARGETS: dict[str, Callable[[], Target]] = {}


def target(name: str) -> Callable[[Callable[[], Target]], Callable[[], Target]]:
    def register(fn: Callable[[], Target]) -> Callable[[], Target]:
        TARGETS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------- targets


@target("derp_frames")
def _derp() -> Target:
    from trionet.derp import frames

    def run(data: bytes) -> None:
        parser = frames.FrameParser()
        parser.feed(data)
        while (frame := parser.next_frame()) is not None:
            payload = bytes(frame[1]) if len(frame) > 1 else b""
            for parse in (frames.parse_server_key, frames.parse_client_info, frames.parse_packet,
                          frames.parse_forward_packet, frames.parse_note_preferred):
                try:
                    parse(payload)
                except RemoteProtocolError:
                    pass

    key = bytes(range(32))
    seeds = [frames.build_server_key(key), frames.build_recv_packet(key, b"x" * 40),
             frames.build_ping(b"12345678"), frames.build_restarting(100, 200), frames.build_health("bad"),
             frames.build_peer_gone(key)]
    return run, (RemoteProtocolError,), seeds


@target("derp_client")
def _derp_client() -> Target:
    from nacl.public import PrivateKey

    from trionet.derp import client, frames

    priv = bytes(PrivateKey.generate())
    server = PrivateKey.generate()

    def run(data: bytes) -> None:
        c = client.DerpClient(priv)
        try:
            c.receive_data(frames.build_server_key(bytes(server.public_key)) + data, 0.0)
        except RemoteProtocolError:
            pass

    return run, (RemoteProtocolError,), [frames.build_keep_alive(), frames.build_ping(b"abcdefgh")]


@target("disco")
def _disco() -> Target:
    from nacl.public import PrivateKey

    from trionet.magicsock import disco

    a, b = PrivateKey.generate(), PrivateKey.generate()
    box_b = disco.DiscoBox(bytes(b), bytes(a.public_key))
    box_a = disco.DiscoBox(bytes(a), bytes(b.public_key))

    def run(data: bytes) -> None:
        if disco.looks_like_disco(data):
            disco.sender_key(data)
            box_b.open(data)
        disco.parse_message(data)

    seeds = [box_a.seal(bytes(a.public_key), disco.Ping(tx_id=b"t" * 12, node_key=b"k" * 32)),
             disco.Pong(tx_id=b"t" * 12, src=("10.0.0.1", 1)).encode(),
             disco.CallMeMaybe(endpoints=[("10.0.0.1", 2), ("::1", 3)]).encode()]
    return run, (RemoteProtocolError,), seeds


@target("stun")
def _stun() -> Target:
    from trionet.magicsock import stun

    def run(data: bytes) -> None:
        if stun.is_stun(data):
            try:
                stun.parse_response(data)
            except RemoteProtocolError:
                stun.parse_binding_request(data)

    txid = b"\x01" * 12
    return run, (RemoteProtocolError,), [stun.binding_request(txid),
                                         stun.binding_response(txid, ("10.1.2.3", 4242))]


@target("socks5")
def _socks5() -> Target:
    from trionet.proxy import socks5

    def run(data: bytes) -> None:
        for parse in (socks5.parse_greeting, socks5.parse_userpass, socks5.parse_request):
            try:
                parse(data)
            except RemoteProtocolError:
                pass
        socks5.parse_udp_datagram(data)

    return run, (RemoteProtocolError,), [b"\x05\x02\x00\x02", b"\x05\x01\x00\x03\x03ts1\x00\x50",
                                         socks5.build_udp_datagram("100.64.0.1", 53, b"q")]


@target("ipc_request")
def _ipc() -> Target:
    import trio

    from trionet.daemon import ipc

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"echo": req["cmd"]}

    server = ipc.IpcServer(Path("unused.sock"), handler)

    def run(data: bytes) -> None:
        answer = trio.run(server._answer, data)
        json.dumps(answer)  # every answer must be serialisable

    return run, (), [b'{"cmd":"status"}', b'{"cmd":"ping","peer":"x","count":3}']


@target("packet_filter")
def _filter() -> Target:
    from trionet.filter import PacketFilter

    f = PacketFilter([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}])

    def run(data: bytes) -> None:
        f.check_inbound(data)
        f.note_outbound(data)

    v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, b"\x64\x40\0\2", b"\x64\x40\0\5")
    return run, (), [v4 + b"\x00\x50\x00\x50" + bytes(16)]


@target("wireguard")
def _wireguard() -> Target:
    """Datagrams into three WgDevices with live sessions, a pending handshake and cookies.

    Each input goes in as is; as a handshake message with mac1 made valid (so
    the Noise code runs, not just the mac check); into the pure
    `consume_response` against a pending initiation; and as the plaintext of a
    valid transport packet (so the inner-IP checks see garbage). `receive`
    never raises: a bug shows as drops["internal_error"], a crash here."""
    from cryptography.exceptions import InvalidTag

    from trionet.wg import WgDevice, classify, handshake
    from trionet.wg.constants import MSG_TRANSPORT
    from trionet.wg.crypto import LABEL_MAC1, hash_, mac

    wall0 = 1.8e9
    src = ("192.0.2.9", 41641)
    a, b, c = (WgDevice(bytes([n]) * 32, random.Random(n)) for n in (1, 2, 3))
    a.set_peer(b.public, ["10.0.0.2/32", "fd00::2/128"])
    a.set_peer(c.public, ["10.0.0.3/32"])
    b.set_peer(a.public, ["10.0.0.1/32", "fd00::1/128"])
    c.set_peer(a.public, ["10.0.0.1/32"])

    def ip(src_ip: str, dst_ip: str, payload: bytes, proto: int = 17) -> bytes:
        s, d = ipaddress.ip_address(src_ip).packed, ipaddress.ip_address(dst_ip).packed
        if len(s) == 16:
            return struct.pack("!IHBB", 6 << 28, len(payload), proto, 64) + s + d + payload
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0, s, d) + payload

    # a <-> b: a finished handshake (a initiated); a -> c: an initiation c answered but a never saw
    init_ab = a.send_ip(ip("10.0.0.1", "10.0.0.2", b"first"), 0.0, wall0)[0].data
    resp_ba = b.receive(init_ab, 0.0, wall0, src=src).transmits[0].data
    for t in a.receive(resp_ba, 0.0, wall0, src=src).transmits:
        b.receive(t.data, 0.0, wall0, src=src)
    pending = a.peers[c.public]
    init_ac = a.send_ip(ip("10.0.0.1", "10.0.0.3", b"hello c"), 0.0, wall0)[0].data
    state = pending.handshake
    assert state is not None
    resp_ca = c.receive(init_ac, 0.0, wall0, src=src).transmits[0].data
    c.force_under_load = True
    cookie = c.receive(init_ac, 0.0, wall0, src=src).transmits[0].data
    c.force_under_load = False
    to_b = a.peers[b.public].current
    to_a = b.peers[a.public].current
    assert to_b is not None and to_a is not None
    mac1_key = {dev.public: hash_(LABEL_MAC1, dev.public) for dev in (a, b, c)}

    def seal(kp: Any, plain: bytes) -> bytes:
        counter = kp.send_counter
        kp.send_counter += 1
        return struct.pack("<IIQ", MSG_TRANSPORT, kp.remote_index, counter) + kp.send.encrypt(
            struct.pack("<4xQ", counter), plain, None)

    def with_mac1(data: bytes, dev: WgDevice) -> bytes:
        m = len(data) - 32
        return data[:m] + mac(mac1_key[dev.public], data[:m]) + data[m + 16:]

    clock = [1.0]

    def run(data: bytes) -> None:
        now = clock[0] = clock[0] + 1e-5  # 1,000,000 inputs stay well inside one session (180 s)
        wall = wall0 + now
        for dev in (a, b, c):
            dev.receive(data, now, wall, src=src)
        kind = classify(data)
        if kind == 1:
            b.receive(with_mac1(data, b), now, wall, src=src)
            c.receive(with_mac1(data, c), now, wall, src=src, backlog=len(data) if data[-1] & 1 else 0)
        elif kind == 2:
            a.receive(with_mac1(data, a), now, wall, src=src)
            try:
                handshake.consume_response(a.private, state, data)
            except (InvalidTag, ValueError):
                pass
        b.receive(seal(to_b, data), now, wall, src=src)  # authentic packet, garbage inside
        a.receive(seal(to_a, data[:64]), now, wall, src=src)
        for dev in (a, b, c):
            if dev.drops["internal_error"]:
                raise AssertionError(f"WgDevice internal error: {dict(dev.drops)}")

    # the plaintexts of transport packets as seeds too: the last mode mutates those
    seeds = [init_ab, resp_ba, init_ac, resp_ca, cookie,
             seal(to_b, ip("10.0.0.1", "10.0.0.2", b"x" * 40)), seal(to_b, b""),
             seal(to_a, ip("10.0.0.2", "10.0.0.1", b"y" * 24)),
             ip("10.0.0.1", "10.0.0.2", b"\0\x35\0\x35\0\x10\0\0" + b"q" * 8),
             ip("fd00::1", "fd00::2", b"\x80\0\0\0\0\1\0\1" + b"p" * 16, proto=58)]
    return run, (), seeds


@target("netstack")
def _netstack() -> Target:
    """IP packets into a StackCore that listens (TCP 80, UDP 53), has an
    established connection with data in flight (v4 and v6) and one in SYN-SENT.

    The stack is rebuilt for every input (the same seeds, ISNs and ports each
    time, so a saved crash replays on its own). Each input goes in as is, then
    with its IP and TCP/UDP/ICMP checksums made valid (so mutations reach the
    TCP state machine), then timers run and it comes again. Nothing may
    raise; every packet the stack sends must parse."""
    from trionet.netstack import StackCore
    from trionet.netstack.wire import finish_checksum, ones_sum
    from trionet.netstack.wire import ipv4 as wip4
    from trionet.netstack.wire import ipv6 as wip6
    from trionet.netstack.wire import tcp as wtcp
    from trionet.netstack.wire.tcp import ACK, FIN, PSH, RST, SYN

    local4, peer4 = ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("100.64.0.2")
    local6, peer6 = ipaddress.ip_address("fd7a:115c:a1e0::1"), ipaddress.ip_address("fd7a:115c:a1e0::2")

    def l4_checksum_offset(proto: int) -> int | None:
        return {6: 16, 17: 6, 1: 2, 58: 2}.get(proto)

    def fix(data: bytes) -> bytes:
        """The same packet with its lengths cut to the buffer and every checksum made valid."""
        buf = bytearray(data)
        if len(buf) >= 20 and buf[0] >> 4 == 4:
            ihl = (buf[0] & 0xF) * 4
            if 20 <= ihl <= len(buf):
                if struct.unpack_from("!H", buf, 2)[0] > len(buf):  # truncated: say so
                    buf[2:4] = struct.pack("!H", min(len(buf), 0xFFFF))
                buf[10:12] = b"\0\0"
                buf[10:12] = finish_checksum(ones_sum(buf[:ihl])).to_bytes(2, "big")
                start, end, proto = ihl, min(len(buf), struct.unpack_from("!H", buf, 2)[0]), buf[9]
                pseudo = 0 if proto == 1 else ones_sum(buf[12:20]) + proto + max(0, end - start)
            else:
                return bytes(buf)
        elif len(buf) >= 40 and buf[0] >> 4 == 6:
            if 40 + struct.unpack_from("!H", buf, 4)[0] > len(buf):
                buf[4:6] = struct.pack("!H", min(len(buf) - 40, 0xFFFF))
            start, end, proto = 40, min(len(buf), 40 + struct.unpack_from("!H", buf, 4)[0]), buf[6]
            pseudo = ones_sum(buf[8:40]) + proto + max(0, end - start)
        else:
            return bytes(buf)
        off = l4_checksum_offset(proto)
        if off is not None and end - start >= off + 2:
            buf[start + off:start + off + 2] = b"\0\0"
            buf[start + off:start + off + 2] = finish_checksum(pseudo + ones_sum(buf[start:end])).to_bytes(2, "big")
        return bytes(buf)

    def packet(src: Any, dst: Any, proto: int, body: bytes) -> bytes:
        if src.version == 4:
            return wip4.build_header(src.packed, dst.packed, proto, len(body)) + body
        return wip6.build_header(src.packed, dst.packed, proto, len(body)) + body

    def tcp(src: Any, sport: int, dst: Any, dport: int, seq: int, ack: int, flags: int,
            opts: bytes = b"", payload: bytes = b"", window: int = 65535) -> bytes:
        pb = ones_sum(src.packed + dst.packed) + 6
        return packet(src, dst, 6, wtcp.build(sport, dport, seq, ack, flags, window, opts, payload, pb) + payload)

    def udp(src: Any, dst: Any, dport: int, payload: bytes) -> bytes:
        return fix(packet(src, dst, 17, struct.pack("!HHHH", 5353, dport, 8 + len(payload), 1) + payload))

    def echo(src: Any, dst: Any, typ: int, payload: bytes) -> bytes:
        return fix(packet(src, dst, 1 if src.version == 4 else 58, struct.pack("!BBHHH", typ, 0, 1, 7, 1) + payload))

    syn_opts = wtcp.build_options(mss=1200, wscale=7, sack_perm=True, ts=(100, 0))

    def ts(val: int) -> bytes:
        return wtcp.build_options(ts=(val, 0))

    def our_seq(out: list[bytes]) -> int:
        data = out[-1]
        ihl = 20 if data[0] >> 4 == 4 else 40
        return int(struct.unpack_from("!I", data, ihl + 4)[0])

    def world() -> tuple[StackCore, list[bytes], dict[str, int]]:
        out: list[bytes] = []
        st = StackCore([local4, local6], out.append, seed=7)
        lst = st.tcp_listen(80)
        st.udp_bind(53)
        iss: dict[str, int] = {}
        for name, remote, local in (("v4", peer4, local4), ("v6", peer6, local6)):
            st.deliver(tcp(remote, 40000, local, 80, 1000, 0, SYN, syn_opts), 0.0)
            iss[name] = our_seq(out)
            st.deliver(tcp(remote, 40000, local, 80, 1001, iss[name] + 1, ACK, ts(101)), 0.01)
            conn = lst.accept_queue.popleft()
            conn.send(b"d" * 4000, 0.01)
        active = st.tcp_connect(peer4, 443, 0.02)
        iss["active"], iss["active_port"] = active.iss, active.key[3]
        out.clear()
        return st, out, iss

    _, _, iss = world()
    v4, v6, act = iss["v4"] + 1, iss["v6"] + 1, iss["active"] + 1
    seeds = [
        tcp(peer4, 40001, local4, 80, 7, 0, SYN, syn_opts), tcp(peer6, 40001, local6, 80, 7, 0, SYN, syn_opts),
        tcp(peer4, 40001, local4, 81, 7, 0, SYN), tcp(peer4, 40001, local4, 81, 7, 9, ACK),
        tcp(peer4, 443, local4, iss["active_port"], 5000, act, SYN | ACK, syn_opts),
        tcp(peer4, 40000, local4, 80, 1001, v4, PSH | ACK, ts(102), b"hello"),
        tcp(peer4, 40000, local4, 80, 1101, v4, PSH | ACK, ts(102), b"later"),  # out of order
        tcp(peer4, 40000, local4, 80, 1001, v4 + 1000, ACK, ts(102)),
        tcp(peer4, 40000, local4, 80, 1001, v4, ACK,
            wtcp.build_options(ts=(102, 0), sack=((v4 + 1000, v4 + 2000),))),
        tcp(peer4, 40000, local4, 80, 1001, v4 + 4000, FIN | ACK, ts(103)),
        tcp(peer4, 40000, local4, 80, 1001, 0, RST),
        tcp(peer4, 40000, local4, 80, 1001, v4, ACK, ts(102), window=0),
        tcp(peer6, 40000, local6, 80, 1001, v6, PSH | ACK, ts(102), b"hello v6"),
        tcp(peer6, 40000, local6, 80, 1001, v6 + 1200, ACK, ts(102)),
        udp(peer4, local4, 53, b"query"), udp(peer6, local6, 53, b"query v6"), udp(peer4, local4, 54, b"x"),
        echo(peer4, local4, 8, b"ping"), echo(peer6, local6, 128, b"ping6"), echo(peer4, local4, 0, b"pong"),
    ]

    def run(data: bytes) -> None:
        st, out, _ = world()
        st.deliver(data, 1.0)
        fixed = fix(data)
        st.deliver(fixed, 1.0)
        deadline = st.next_deadline()
        if deadline is not None:
            st.on_timer(deadline)
        st.deliver(fixed, 2.0)
        for sent in out:  # what we send must be well-formed
            view = memoryview(sent)
            if sent[0] >> 4 == 4:
                wip4.parse(view)
            else:
                wip6.parse(view)

    return run, (), seeds


@target("map_response")
def _map_response() -> Target:
    """A map stream (LE32 length, zstd or JSON) into the control client's real
    reader, `ControlConnection.map_updates`, then `Netmap.apply` onto a netmap
    that already holds peers, and the packet filter compiled as the node does.

    Each input is sent once framed as one message and then as raw stream
    bytes, in two chunks. Garbage may only raise RemoteProtocolError."""
    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    import zstandard

    from trionet import proto
    from trionet.control.client import ControlConnection, StreamEnded
    from trionet.control.netmap import Netmap
    from trionet.filter import compile_rules

    class FakeH2:
        def __init__(self, events: list[tuple[str, Any]]) -> None:
            self.events = events

        @asynccontextmanager
        async def request(self, method: str, path: str, body: bytes) -> Any:
            async def gen() -> Any:
                for ev in self.events:
                    yield ev
            yield gen()

    config = SimpleNamespace(hostname="fuzz")
    state = SimpleNamespace(disco_public=bytes(range(32)), node_public=bytes(range(1, 33)))
    magic = SimpleNamespace(endpoints=lambda: [], endpoint_types=lambda: [], home_region=1)

    def node(i: int, **extra: Any) -> dict[str, Any]:
        return {"ID": i, "StableID": f"n{i}", "Name": f"peer{i}.fuzz.ts.net.", "User": 1,
                "Key": "nodekey:" + f"{i:02x}" * 32, "DiscoKey": "discokey:" + f"{i + 50:02x}" * 32,
                "Addresses": [f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"], "AllowedIPs": None,
                "Endpoints": [f"192.0.2.{i}:41641", "[2001:db8::1]:41641"], "HomeDERP": 1,
                "DERP": "127.3.3.40:1", "Hostinfo": {"Hostname": f"peer{i}", "OS": "linux"},
                "Online": True, "LastSeen": "2025-01-01T00:00:00Z", "KeyExpiry": "0001-01-01T00:00:00Z",
                "MachineAuthorized": True, "Cap": 116, "Tags": ["tag:x"], **extra}

    derp = {"Regions": {"1": {"RegionID": 1, "RegionCode": "fz", "RegionName": "Fuzz", "Nodes": [
        {"Name": "1a", "RegionID": 1, "HostName": "derp.example", "IPv4": "192.0.2.1", "IPv6": "2001:db8::2",
         "DERPPort": 443, "STUNPort": 3478, "InsecureForTests": True}]}, "2": None},
        "OmitDefaultRegions": True}
    rules = [{"SrcIPs": ["100.64.0.0/10", "*", "100.64.0.1-100.64.0.9"], "IPProto": [6, 17],
              "DstPorts": [{"IP": "*", "Ports": {"First": 22, "Last": 443}},
                           {"IP": "fd7a:115c:a1e0::/48", "Ports": {"First": 0, "Last": 65535}}]}]
    messages = [
        {"Node": node(1), "DERPMap": derp, "Peers": [node(2), node(3), node(4, Expired=True)],
         "PacketFilter": rules, "Domain": "fuzz.ts.net",
         "DNSConfig": {"Resolvers": [{"Addr": "100.100.100.100"}], "Domains": ["fuzz.ts.net"],
                       "Routes": {"ts.net": None}, "ExtraRecords": [{"Name": "x.", "Type": "A", "Value": "1.2.3.4"}]},
         "UserProfiles": [{"ID": 1, "LoginName": "u@x", "DisplayName": "U"}], "ControlTime": "2025-01-01T00:00:00Z"},
        {"PeersChanged": [node(2, Endpoints=["192.0.2.99:1"]), node(5)], "PeersRemoved": [3, 77]},
        {"PeersChangedPatch": [{"NodeID": 2, "DERPRegion": 2, "Endpoints": ["192.0.2.7:9"], "Online": False,
                                "Key": "nodekey:" + "ab" * 32, "DiscoKey": "discokey:" + "cd" * 32,
                                "LastSeen": "2025-01-02T00:00:00Z", "KeyExpiry": "2030-01-01T00:00:00Z", "Cap": 117},
                               {"NodeID": 99}],
         "OnlineChange": {"2": True, "3": False}, "PeerSeenChange": {"2": True}},
        {"DERPMap": {"Regions": None}}, {"DERPMap": derp, "PacketFilters": {"extra": rules, "*": None}},
        {"PacketFilters": {"base": None, "x": [{"SrcIPs": ["bogus"], "DstPorts": [{"IP": 7}]}]}},
        {"KeepAlive": True}, {"PingRequest": {"URL": "https://x/", "Log": True}, "Health": ["degraded"]},
    ]
    base = Netmap()  # what a session holds after its first, full map
    base.apply(proto.loads(json.dumps(messages[0]), proto.MapResponse))

    def frame(payload: bytes) -> bytes:
        return struct.pack("<I", len(payload)) + payload

    odd_values: list[Any] = [None, True, 0, -1, 1 << 63, 1 << 70, 2.5, float("inf"), float("nan"), "", "*",
                             "x" * 300, "nodekey:zz", "127.3.3.40:99999999999999999999", [], [None], {}, {"": None}]

    def twist(rng: random.Random, value: Any, depth: int = 0) -> Any:
        """A JSON tree with a few leaves or subtrees swapped for values of the wrong type."""
        if rng.random() < 0.08 or depth > 8:
            return rng.choice([*odd_values, value, [value], {"1": value}])
        if isinstance(value, dict):
            out = {k: twist(rng, v, depth + 1) for k, v in value.items() if rng.random() > 0.05}
            if rng.random() < 0.1:
                key = rng.choice(["ID", "NodeID", "Regions", "Peers", "-1", "99999999999999999999"])
                out[key] = rng.choice(odd_values)
            return out
        if isinstance(value, list):
            return [twist(rng, v, depth + 1) for v in value * rng.choice([1, 1, 1, 2])]
        return value

    def run(data: bytes) -> None:
        # bytes in the frame, the raw stream, and (always valid JSON) a typed mutation picked by the bytes
        rng = random.Random(data)
        typed = json.dumps(twist(rng, rng.choice(messages))).encode()
        cut = len(data) // 3
        events = [("status", 200), ("data", frame(typed)), ("data", frame(data)), ("data", data[:cut]),
                  ("data", data[cut:]), ("end", None)]
        conn = ControlConnection(config, state, FakeH2(events))
        conn.netmap = Netmap(base.self_node, dict(base.peers), base.derp_map, dict(base.packet_filters),
                             base.dns, base.domain)
        updates = conn.map_updates(magic)
        try:
            while True:  # FakeH2 never blocks: drive the generator without an event loop
                step = updates.__anext__()
                try:
                    step.send(None)
                except StopIteration as stop:
                    netmap, change = stop.value
                    if change.filter_changed:
                        compile_rules(netmap.packet_filter)
                    for peer in netmap.peers.values():
                        netmap.home_derp_of(peer)
                else:
                    raise AssertionError("map_updates awaited something real")
        except StreamEnded:
            pass
        except StopAsyncIteration:
            pass

    zc = zstandard.ZstdCompressor()
    seeds = [json.dumps(m).encode() for m in messages]
    seeds += [zc.compress(s) for s in seeds[:3]]
    seeds.append(b"".join(frame(s) for s in seeds[1:4]))
    return run, (RemoteProtocolError,), seeds


def _no_internal_errors(where: str, counters: Any) -> None:
    bugs = {k: v for k, v in dict(counters).items() if "internal_error" in k and v}
    if bugs:
        raise AssertionError(f"{where}: internal errors {bugs}")


class _ChurningTailnet:
    """A MagicConn wired to a real WgDevice as the Node wires them, and peers that
    restart (new disco keys) and leave and come back as inputs arrive."""

    def __init__(self, peers: int = 4) -> None:
        from trionet import keys
        from trionet.magicsock import disco, stun
        from trionet.magicsock.conn import MagicConn
        from trionet.wg import WgDevice

        self.keys, self.disco, self.stun = keys, disco, stun
        node, disco_private = keys.new_private(), keys.new_private()
        self.wg = WgDevice(node, random.Random(7))
        self.now = 1.0
        self.conn = MagicConn(node, keys.public_of(node), disco_private, keys.public_of(disco_private),
                              self._on_wireguard, login_server="https://hs.test")
        self.peer_nodes = [keys.new_private() for _ in range(peers)]
        self.peer_discos = [keys.new_private() for _ in range(peers)]
        self.peer_wgs = [WgDevice(p, random.Random(i)) for i, p in enumerate(self.peer_nodes)]
        for i in range(peers):
            self._add(i)
            self.peer_wgs[i].set_peer(self.conn.node_public, ["10.0.0.1/32"])

    def _on_wireguard(self, datagrams: Any, derp_src: bytes | None, path: Any) -> None:
        self.wg.receive_many(datagrams, self.now, 1.8e9 + self.now, src=path)

    def _add(self, i: int) -> None:
        public = self.keys.public_of(self.peer_nodes[i])
        self.wg.set_peer(public, [f"10.0.1.{i}/32"])
        self.conn.upsert_peer(public, self.keys.public_of(self.peer_discos[i]), 999, [("10.9.0.1", 41641 + i)])

    def node_public(self, i: int) -> bytes:
        return bytes(self.keys.public_of(self.peer_nodes[i]))

    def sealed(self, i: int, msg: Any) -> bytes:
        return bytes(self.disco.DiscoBox(self.peer_discos[i], self.conn.disco_public).seal(None, msg))

    def seeds(self) -> list[bytes]:
        d, n = self.disco, len(self.peer_nodes)
        out = [b"\x00" + self.sealed(i % n, msg) for i, msg in enumerate((
            d.Ping(tx_id=b"t" * 12, node_key=b"k" * 32), d.Pong(tx_id=b"t" * 12, src=("10.0.0.1", 2)),
            d.CallMeMaybe(endpoints=[("10.0.0.1", 2), ("::1", 3)]), d.Ignored(5, 0, b"relay")))]
        out.append(b"\x00" + self.stun.binding_response(b"x" * 12, ("10.1.2.3", 4242)))
        to_us = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, bytes(4), bytes([10, 0, 0, 1]))
        init = self.peer_wgs[0].send_ip(to_us, self.now, 1.8e9)[0].data
        out += [b"\x00" + init, b"\xd0" + init, b"\x00\x04\x00\x00\x00" + bytes(40)]
        return out

    def run(self, data: bytes) -> None:
        """First byte: what to do. 0-199 the rest arrives over UDP, 200-239 through DERP from
        a peer, 240-247 a peer restarts (new disco key), 248-255 a peer leaves or comes back."""
        if not data:
            return
        self.now += 1e-4
        op, rest = data[0], data[1:]
        i = op % len(self.peer_nodes)
        conn = self.conn
        if op < 200:
            conn._on_udp_datagram(rest, ("udp", ("10.9.0.1", 41641 + i)))
        elif op < 240:
            conn._on_derp_packet(999, self.node_public(i), rest)
        elif op < 248:
            self.peer_discos[i] = self.keys.new_private()
            self._add(i)
        elif self.node_public(i) in conn.paths.peers:
            conn.remove_peer(self.node_public(i))
            self.wg.remove_peer(self.node_public(i))
        else:
            self._add(i)
        conn.end_batch()
        _no_internal_errors("magicsock", conn.stats)
        _no_internal_errors("wireguard", self.wg.drops)
        live = {p.disco_key for p in conn.paths.peers.values() if p.disco_key}
        if set(conn._disco_peers) - live:
            raise AssertionError("a disco box outlived its peer's key")


@target("magicsock_driver")
def _magicsock_driver() -> Target:
    """magicsock's datagram handlers (UDP and DERP) with a churning peer table, wired to a
    real WgDevice: nothing raises, nothing counts as an internal error, no stale boxes."""
    tailnet = _ChurningTailnet()

    async def one(data: bytes) -> None:  # the driver reads Trio's clock
        tailnet.run(data)

    def run(data: bytes) -> None:
        trio.run(one, data)

    return run, (), tailnet.seeds()


@target("derp_driver")
def _derp_driver() -> Target:
    """Bytes from a DERP server into DerpConnection's receive path, whose packets go on
    to magicsock and WireGuard as in the node. Only a protocol error (which ends the
    link) may come out."""
    from nacl.public import PrivateKey

    from trionet.derp import client, frames
    from trionet.derp.driver import DerpConnection

    tailnet = _ChurningTailnet()
    private = bytes(PrivateKey.generate())
    server = PrivateKey.generate()
    conn = DerpConnection("https://derp.test/derp", private, on_packet=partial(tailnet.conn._on_derp_packet, 999),
                          on_batch_end=tailnet.conn.end_batch)
    login = frames.build_server_key(bytes(server.public_key))

    async def receive(data: bytes) -> None:  # the driver reads Trio's clock
        derp = client.DerpClient(private)
        try:
            conn._receive(derp, login)
            conn._receive(derp, data)
        except RemoteProtocolError:
            pass

    def run(data: bytes) -> None:
        trio.run(receive, data)
        _no_internal_errors("derp", conn.stats)
        _no_internal_errors("magicsock", tailnet.conn.stats)

    peer = tailnet.node_public(0)
    seeds = [frames.build_recv_packet(peer, s[1:]) for s in tailnet.seeds()]
    seeds += [frames.build_keep_alive(), frames.build_ping(b"abcdefgh"), frames.build_health("bad"),
              frames.build_restarting(100, 200), frames.build_peer_gone(peer),
              b"".join(seeds[:3])]
    return run, (RemoteProtocolError,), seeds


@target("proxy_handshakes")
def _proxy_handshakes() -> Target:
    """Client bytes (then EOF) over a real loopback connection into the SOCKS5 proxy (with
    or without a password) or the HTTP proxy; dials go to a fake node whose targets refuse
    or hang up at once. A proxy never raises into its listener: a bug shows as a counted
    internal error, a crash here. Time is Trio's MockClock (timeouts cost nothing)."""
    import trio.testing

    from trionet.errors import TransportError
    from trionet.proxy import server

    class Udp:
        async def send_to(self, data: bytes, host: str, port: int) -> None:
            pass

        async def receive_from(self) -> tuple[bytes, tuple[str, int]]:
            await trio.sleep_forever()
            raise AssertionError  # not reached

        def close(self) -> None:
            pass

    class Dialer:
        async def open_tcp_stream(self, host: str, port: int) -> trio.abc.Stream:
            if port % 2:
                raise TransportError(f"{host}:{port} refused")
            ours, theirs = trio.testing.memory_stream_pair()
            await theirs.aclose()  # the target hangs up at once
            return ours

        async def open_udp(self) -> Any:
            return Udp()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
        """A real loopback TCP connection, as a proxy's clients arrive (UDP ASSOCIATE reads
        the client's address from its socket)."""
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
        return (trio.SocketStream(trio.socket.from_stdlib_socket(near)),
                trio.SocketStream(trio.socket.from_stdlib_socket(far)))

    async def feed(proxy: server.Proxy, data: bytes) -> None:
        client, accepted = tcp_pair()
        async with trio.open_nursery() as nursery:
            proxy._spawn(nursery, accepted)  # as its accept loop hands a client over
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send_all(data)
                await client.send_eof()
            with trio.fail_after(600), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await client.receive_some(65536):
                    pass
            await client.aclose()

    async def one(data: bytes) -> None:
        # The first byte picks the proxy, as a real client's does; odd lengths meet a password.
        dialer = Dialer()
        if data[:1] == b"\x05":
            proxy: server.Proxy = server.Socks5Proxy(0, dialer, auth=("user", "pass") if len(data) % 2 else None)
        else:
            proxy = server.HttpProxy(0, dialer)
        await feed(proxy, data)
        stats = proxy.statistics()
        _no_internal_errors(proxy.name, {k: v for k, v in _flat(stats).items() if isinstance(v, int)})
        if stats["live_connections"] or stats["live_udp_associations"]:
            raise AssertionError(f"{proxy.name}: a client outlived its stream: {stats}")

    def run(data: bytes) -> None:
        trio.run(one, data, clock=trio.testing.MockClock(autojump_threshold=0))

    seeds = [b"\x05\x01\x00\x05\x01\x00\x03\x03ts1\x00\x50",
             b"\x05\x01\x02\x01\x04user\x04pass\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb",
             b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
             b"\x05\x01\x00\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x16",
             b"CONNECT ts1:443 HTTP/1.1\r\nHost: ts1:443\r\n\r\n",
             b"GET http://ts1:8000/index.html HTTP/1.1\r\nHost: ts1\r\n\r\n"]
    return run, (), seeds


def _flat(stats: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(stats, dict):
        return {prefix: stats}
    out: dict[str, Any] = {}
    for key, value in stats.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _optional(name: str, module: str, build: Callable[[Any], Target]) -> None:
    """Targets for modules that other issues own; registered when the module exists."""

    @target(name)
    def make() -> Target:
        return build(importlib.import_module(module))


# ------------------------------------------------------------------ mutator


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.15 or not seeds:
        return rng.randbytes(rng.randrange(0, 200))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        if op == 0 and data:  # bit flip
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data) + 1):]
        elif op == 2:  # random byte
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 3:  # splice another seed
            other = rng.choice(seeds)
            cut = rng.randrange(len(data) + 1)
            data[cut:] = other[rng.randrange(len(other) + 1):]
        elif op == 4 and len(data) >= 4:  # interesting integers in length fields
            i = rng.randrange(len(data) - 3)
            data[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00",
                                        b"\x7f\xff\xff\xff"])
        elif op == 5:  # duplicate a run
            if data:
                a = rng.randrange(len(data))
                data[a:a] = data[a:a + rng.randrange(1, 64)]
        else:  # append junk
            data += rng.randbytes(rng.randrange(1, 32))
    return bytes(data)


def _save_crash(name: str, data: bytes, exc: BaseException) -> Path:
    CRASH_DIR.mkdir(exist_ok=True)
    path = CRASH_DIR / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return path


def fuzz(name: str, examples: int, seed: int = 0) -> int:
    run, allowed, seeds = TARGETS[name]()
    rng = random.Random(seed)
    for seed_input in seeds:  # seeds must parse without surprises
        try:
            run(seed_input)
        except allowed:
            pass
    crashes = 0
    for _ in range(examples):
        data = mutate(rng, seeds)
        try:
            run(data)
        except allowed:
            continue
        except Exception as exc:
            crashes += 1
            path = _save_crash(name, data, exc)
            if crashes >= 5:
                raise AssertionError(f"{name}: {crashes} crashes, last saved to {path}") from exc
    return crashes


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_quick(name: str) -> None:
    """A short run in every `make test` (the seeds and 3,000 mutations)."""
    assert fuzz(name, 3000, seed=1) == 0


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_long(name: str) -> None:
    start = time.monotonic()
    crashes = fuzz(name, EXAMPLES, seed=int(os.environ.get("TRIONET_FUZZ_SEED", "0")))
    print(f"\nfuzz {name}: {EXAMPLES} inputs, {crashes} crashes, {time.monotonic() - start:.0f} s")
    assert crashes == 0


def test_saved_crashes_stay_fixed() -> None:
    """Every input a fuzzer ever crashed on is replayed; none may crash again."""
    for path in sorted(CRASH_DIR.glob("*.bin")) if CRASH_DIR.exists() else []:
        name = path.name.rsplit("-", 1)[0]
        run, allowed, _ = TARGETS[name]()
        try:
            run(path.read_bytes())
        except allowed:
            pass
