"""A hostile tailnet peer built from trionet's own engines, for the hostile-input tests.

No real peer sends garbage, so this one does. It joins the tailnet as a trionet
`Node` (so the node under test, the *victim*, has it in its netmap and opens a
WireGuard session with it), then sends what its action asks for:

* ``garbage``: datagrams over UDP (to the victim's socket, from a plain socket,
  as anyone on the path could) and packets through DERP (as a tailnet member
  can): random bytes; truncated, forged and undecryptable disco; sealed disco
  that opens but does not parse; STUN-looking garbage and unsolicited STUN
  responses; WireGuard messages of every type with wrong sizes, bad macs,
  unknown receiver indexes, our real session's index with a forged body, and
  replays of transport messages the victim has already accepted.
* ``mutate``: mutated IPv4, IPv6, TCP, UDP and ICMP packets, sealed in the
  authenticated session, so they reach the victim's netstack.
* ``flood``: WireGuard handshake initiations with a valid mac1 (anyone who knows
  the victim's public key can make those) at a given rate.
* ``replay``: datagrams from a capture file, sent again to the victim's socket.

Run it as a process beside the victim (so its CPU is not the victim's):

    python -m tests.integration.hostile_peer SPEC.json

SPEC names the login server, auth key, CA file, UDP bind address, the victim's
hostname and UDP address, and a list of actions. One JSON line per action is
printed: ``{"action": ..., "sent": N, "by_kind": {...}, "seconds": S}``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from trionet import Node
from trionet import keys as keymod
from trionet.magicsock import disco, stun
from trionet.wg.cookie import CookieGenerator
from trionet.wg.device import WgDevice

REPO = Path(__file__).resolve().parents[2]

INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE = 148, 92, 64  # each with 32 bytes of macs at its end
DISCARD_PORT = 9  # inner UDP packets for the victim's netstack to drop (no listener)


# ------------------------------------------------------------ checksums, builders
def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    head = head[:10] + struct.pack("!H", _fold(_sum16(head))) + head[12:]
    if proto in (6, 17):
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(payload))
        at = 16 if proto == 6 else 6
        payload = payload[:at] + struct.pack("!H", _fold(_sum16(pseudo + payload))) + payload[at + 2:]
    elif proto == 1:
        payload = payload[:2] + struct.pack("!H", _fold(_sum16(payload))) + payload[4:]
    return head + payload


def ipv6(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    pseudo = src + dst + struct.pack("!IxxxB", len(payload), proto)
    at = {6: 16, 17: 6, 58: 2}[proto]
    payload = payload[:at] + struct.pack("!H", _fold(_sum16(pseudo + payload))) + payload[at + 2:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, src, dst) + payload


def tcp(sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        options: bytes = b"") -> bytes:
    options += b"\x01" * (-len(options) % 4)
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, 65535, 0, 0) + options + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp_echo(ident: int, seq: int, v6: bool = False) -> bytes:
    return struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq) + b"hostile!" * 4


# ----------------------------------------------------------------- the victim
class Victim:
    """What the hostile node knows of the node under test, from its own netmap."""

    def __init__(self, node: Node, hostname: str, udp_addr: tuple[str, int]) -> None:
        peer = node._peer_for(hostname)
        self.node_public = keymod.parse_public(peer.Key, "nodekey:")
        self.disco_public = keymod.parse_public(peer.DiscoKey, "discokey:")
        self.udp_addr = udp_addr
        addrs = [a.split("/")[0] for a in peer.Addresses or ()]
        self.ip4 = socket.inet_pton(socket.AF_INET, next(a for a in addrs if ":" not in a))
        self.ip6 = socket.inet_pton(socket.AF_INET6, next(a for a in addrs if ":" in a))
        self.region = node.netmap.home_derp_of(peer) or (node.magic.home_region if node.magic else 0)


class Hostile:
    def __init__(self, node: Node, victim: Victim, rng: random.Random) -> None:
        self.node = node
        self.victim = victim
        self.rng = rng
        assert node.netmap is not None and node.netmap.self_node is not None
        addrs = [a.split("/")[0] for a in node.netmap.self_node.Addresses or ()]
        self.ip4 = socket.inet_pton(socket.AF_INET, next(a for a in addrs if ":" not in a))
        self.ip6 = socket.inet_pton(socket.AF_INET6, next(a for a in addrs if ":" in a))
        self.udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_sock.bind((victim.udp_addr[0], 0))
        self.udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.udp_sock.setblocking(False)

    @property
    def wg(self) -> WgDevice:
        assert self.node.wg is not None
        return self.node.wg

    async def session(self) -> Any:
        """Our current WireGuard session with the victim (made by sending it a datagram)."""
        udp_ep = await self.node.open_udp()
        with trio.fail_after(30):
            while True:
                peer = self.wg.peers.get(self.victim.node_public)
                if peer is not None and peer.current is not None:
                    return peer.current
                await udp_ep.send_to(b"hello", _ip_text(self.victim.ip4), DISCARD_PORT)
                await trio.sleep(0.2)

    # ------------------------------------------------------------- sending
    async def send_udp(self, data: bytes) -> None:
        while True:
            try:
                self.udp_sock.sendto(data, self.victim.udp_addr)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.udp_sock)

    async def send_derp(self, data: bytes) -> None:
        magic = self.node.magic
        assert magic is not None
        conn = magic.derps.get(self.victim.region) or magic.derps.get(magic.home_region)
        assert conn is not None, "no DERP connection to the victim's region"
        await conn.send_packet(self.victim.node_public, data)

    def seal(self, kp: Any, inner: bytes) -> bytes:
        return self.wg._seal(kp, inner, len(inner))

    # ------------------------------------------------------------ generators
    def garbage(self, kp: Any) -> Iterator[tuple[str, bytes]]:
        """An endless mix of every kind of garbage, as (kind, datagram)."""
        rng = self.rng
        victim = self.victim
        our_disco_private = self.node.keys.disco_private
        our_disco_public = self.node.keys.disco_public
        our_box = disco.DiscoBox(our_disco_private, victim.disco_public)
        stranger_private = keymod.new_private()
        stranger_box = disco.DiscoBox(stranger_private, victim.disco_public)
        macs = CookieGenerator(victim.node_public)
        accepted: list[bytes] = []  # real transport messages, sent once: the replays
        for _ in range(64):
            inner = ipv4(self.ip4, victim.ip4, 17, udp(40000, DISCARD_PORT, b"once"))
            accepted.append(self.seal(kp, inner))

        def rand(n_min: int, n_max: int) -> bytes:
            return rng.randbytes(rng.randint(n_min, n_max))

        kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("random", lambda: rand(1, 1400)),
            ("disco_truncated", lambda: disco.MAGIC + rand(0, disco.HEADER_LEN - 7)),
            ("disco_forged_box", lambda: disco.MAGIC + our_disco_public + rand(24, 200)),
            ("disco_stranger", lambda: stranger_box.seal(None, disco.Ping(tx_id=rand(12, 12)))),
            ("disco_unparseable", lambda: our_box.seal(None, disco.Ignored(rng.randint(0x0A, 0xFF), 0, rand(0, 40)))),
            ("disco_short_pong", lambda: our_box.seal(None, disco.Ignored(2, 0, rand(0, 20)))),
            ("stun_garbage", lambda: struct.pack("!HH", 0x0101, rng.randint(0, 300)) + stun.MAGIC_COOKIE
             + rand(12, 200)),
            ("stun_unsolicited", lambda: stun.binding_response(rand(12, 12), ("10.1.2.3", 4567))),
            ("wg_bad_size", lambda: bytes([rng.randint(1, 4), 0, 0, 0]) + rand(0, 200)),
            ("wg_initiation_bad_mac1", lambda: b"\x01\0\0\0" + rand(INITIATION_SIZE - 4, INITIATION_SIZE - 4)),
            ("wg_initiation_valid_mac1", lambda: macs.add_macs(b"\x01\0\0\0" + rand(112, 112), 0.0)),
            ("wg_response_garbage", lambda: macs.add_macs(b"\x02\0\0\0" + rand(56, 56), 0.0)),
            ("wg_cookie_reply_garbage", lambda: b"\x03\0\0\0" + rand(COOKIE_REPLY_SIZE - 4, COOKIE_REPLY_SIZE - 4)),
            ("wg_transport_unknown_index", lambda: b"\x04\0\0\0" + rand(28, 1400)),
            ("wg_transport_forged_body", lambda: struct.pack("<II", 4, kp.remote_index) + rand(24, 1400)),
            ("wg_transport_replayed", lambda: accepted[rng.randrange(len(accepted))]),
            ("wg_transport_truncated", lambda: struct.pack("<II", 4, kp.remote_index) + rand(0, 23)),
        ]
        for data in accepted:  # each accepted once first, so what follows are replays
            yield "wg_transport_first", data
        while True:
            kind, make = kinds[rng.randrange(len(kinds))]
            yield kind, make()

    def mutated(self) -> Iterator[tuple[str, bytes]]:
        """Endless mutated inner packets: valid ones, then bits flipped, fields rewritten,
        cut or extended. The addresses mostly survive, so the packets get past
        WireGuard's AllowedIPs check into the victim's netstack."""
        rng = self.rng
        v = self.victim

        def seeds() -> list[tuple[str, bytes]]:
            sport, dport = rng.randint(1024, 65535), rng.choice((DISCARD_PORT, 22, 80, 443, rng.randint(1, 65535)))
            seq, ack = rng.getrandbits(32), rng.getrandbits(32)
            data = rng.randbytes(rng.randint(0, 1200))
            sack = b"\x01\x01\x05\x0a" + rng.randbytes(8)
            opts = b"\x02\x04\x05\x00\x04\x02\x08\x0a" + rng.randbytes(8) + b"\x03\x03\x07"
            return [
                ("ipv4_tcp_syn", ipv4(self.ip4, v.ip4, 6, tcp(sport, dport, seq, 0, 0x02, options=opts))),
                ("ipv4_tcp_data", ipv4(self.ip4, v.ip4, 6, tcp(sport, dport, seq, ack, 0x18, data, sack))),
                ("ipv4_tcp_flags", ipv4(self.ip4, v.ip4, 6, tcp(sport, dport, seq, ack, rng.randrange(256)))),
                ("ipv4_udp", ipv4(self.ip4, v.ip4, 17, udp(sport, dport, data))),
                ("ipv4_icmp", ipv4(self.ip4, v.ip4, 1, icmp_echo(sport, seq & 0xFFFF))),
                ("ipv4_other_proto", ipv4(self.ip4, v.ip4, rng.randrange(256), data)),
                ("ipv6_tcp_syn", ipv6(self.ip6, v.ip6, 6, tcp(sport, dport, seq, 0, 0x02, options=opts))),
                ("ipv6_tcp_data", ipv6(self.ip6, v.ip6, 6, tcp(sport, dport, seq, ack, 0x18, data))),
                ("ipv6_udp", ipv6(self.ip6, v.ip6, 17, udp(sport, dport, data))),
                ("ipv6_icmp", ipv6(self.ip6, v.ip6, 58, icmp_echo(sport, seq & 0xFFFF, v6=True))),
            ]

        while True:
            for kind, packet in seeds():
                yield kind, _mutate(rng, packet)


def _mutate(rng: random.Random, packet: bytes) -> bytes:
    buf = bytearray(packet)
    v6 = buf[0] >> 4 == 6
    addresses = range(8, 40) if v6 else range(12, 20)
    choice = rng.random()
    if choice < 0.1:
        return bytes(buf)  # some arrive valid: the victim's real paths must see them too
    if choice < 0.55:  # flip bits, sparing the addresses most of the time
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(buf))
            if i in addresses and rng.random() < 0.9:
                continue
            buf[i] ^= 1 << rng.randrange(8)
    elif choice < 0.75:  # rewrite a length, offset, flags or protocol field
        fields = (2, 3, 6, 7, 9, 32, 33) if not v6 else (4, 5, 6, 52, 53)
        i = rng.choice(fields)
        if i < len(buf):
            buf[i] = rng.randrange(256)
    elif choice < 0.9:  # cut
        del buf[rng.randint(1, len(buf)):]
    else:  # extend
        buf += rng.randbytes(rng.randint(1, 300))
    return bytes(buf)[:1400]


def _ip_text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


# ------------------------------------------------------------------ actions
async def do_garbage(h: Hostile, count: int, paths: list[str]) -> dict[str, Any]:
    kp = await h.session()
    by_kind: Counter[str] = Counter()
    stream = h.garbage(kp)
    for i in range(count):
        kind, data = next(stream)
        path = paths[i % len(paths)]
        if path == "udp":
            await h.send_udp(data)
        else:
            await h.send_derp(data)
        by_kind[f"{path}.{kind}"] += 1
        if i % 64 == 0:
            await trio.sleep(0)  # let our own node's tasks run (its DERP writer above all)
    return {"sent": count, "by_kind": dict(by_kind)}


async def do_mutate(h: Hostile, count: int, rate: float) -> dict[str, Any]:
    """Mutated inner packets sealed in the session, over UDP, at `rate` per second
    (0: as fast as this process can seal them)."""
    kp = await h.session()
    by_kind: Counter[str] = Counter()
    stream = h.mutated()
    start = time.monotonic()
    sent = 0
    batch = 256
    while sent < count:
        peer = h.wg.peers.get(h.victim.node_public)
        if peer is not None and peer.current is not None:
            kp = peer.current  # follow rekeys
        for _ in range(min(batch, count - sent)):
            kind, packet = next(stream)
            by_kind[kind] += 1
            await h.send_udp(h.seal(kp, packet))
            sent += 1
        if rate:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                await trio.sleep(ahead)
                continue
        await trio.sleep(0)
    return {"sent": sent, "by_kind": dict(by_kind)}


async def do_flood(h: Hostile, rate: float, seconds: float) -> dict[str, Any]:
    """Handshake initiations with a valid mac1 and no mac2, `rate` per second. Each has
    a fresh sender index (and so a fresh mac1): the victim cannot tell them from a
    real peer's first message without doing the handshake's Diffie-Hellman."""
    macs = CookieGenerator(h.victim.node_public)
    body = h.rng.randbytes(108)  # ephemeral, sealed static and timestamp: 116 bytes before the macs
    start = time.monotonic()
    sent = 0
    replies = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            message = macs.add_macs(b"\x01\0\0\0" + struct.pack("<I", sent & 0xFFFFFFFF) + body, 0.0)
            await h.send_udp(message)
            sent += 1
        while True:  # count the cookie replies that come back
            try:
                data = h.udp_sock.recv(2048)
            except BlockingIOError:
                break
            if data[:1] == b"\x03" and len(data) == COOKIE_REPLY_SIZE:
                replies += 1
        await trio.sleep(0.002)
    with trio.move_on_after(1.0):  # the last replies
        while True:
            await trio.lowlevel.wait_readable(h.udp_sock)
            data = h.udp_sock.recv(2048)
            if data[:1] == b"\x03" and len(data) == COOKIE_REPLY_SIZE:
                replies += 1
    return {"sent": sent, "by_kind": {"initiation_valid_mac1": sent}, "cookie_replies": replies,
            "rate": sent / max(seconds, 1e-9)}


async def do_replay(h: Hostile, capture: Path, times: int, paths: list[str]) -> dict[str, Any]:
    """Captured datagrams sent again, over UDP from a plain socket and through DERP."""
    datagrams = [bytes.fromhex(line) for line in capture.read_text().split()]
    by_kind: Counter[str] = Counter()
    for _ in range(times):
        for i, data in enumerate(datagrams):
            path = paths[i % len(paths)]
            if path == "udp":
                await h.send_udp(data)
            else:
                await h.send_derp(data)
            kind = "disco" if data.startswith(disco.MAGIC) else f"wg{data[0]}"
            by_kind[f"{path}.{kind}"] += 1
        await trio.sleep(0)
    return {"sent": sum(by_kind.values()), "by_kind": dict(by_kind)}


# ------------------------------------------------------------ the launcher
class HostilePeer:
    """The hostile peer process (hostile_peer.py), started beside the victim."""

    def __init__(self, stack: Any, tmp_path: Path, victim: str, udp_addr: tuple[str, int],
                 actions: list[dict[str, Any]]) -> None:
        name = "hostile-" + victim  # one per victim: earlier ones stay in the netmap
        spec = {
            "login_server": stack.server_url, "auth_key": stack.preauth_key(), "ca_file": str(stack.ca_file),
            "udp_bind": stack.local_ip, "state_dir": str(tmp_path / f"state-{name}"), "hostname": name,
            "victim": victim, "victim_udp": list(udp_addr), "actions": actions,
        }
        spec_file = tmp_path / f"{name}.json"
        spec_file.write_text(json.dumps(spec))
        os.chmod(spec_file, 0o600)
        self.log = (tmp_path / f"{name}.log").open("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.hostile_peer", str(spec_file)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO)

    def wait_ready(self) -> None:
        """Until it has joined and found the victim: its actions start now."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if '"ready"' not in line:
            self.proc.wait(30)
            self.log.seek(0)
            raise AssertionError(f"hostile peer did not start: {line!r}\n{self.log.read()[-5000:]}")

    def results(self) -> list[dict[str, Any]]:
        out, _ = self.proc.communicate(timeout=1800)
        self.log.seek(0)
        assert self.proc.returncode == 0, f"hostile peer failed:\n{out}\n{self.log.read()[-5000:]}"
        return [r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))
                if r["action"] != "ready"]


async def run(spec: dict[str, Any]) -> None:
    node = Node(login_server=spec["login_server"], auth_key=spec["auth_key"], state_dir=spec["state_dir"],
                hostname=spec.get("hostname", "hostile"), ca_file=spec["ca_file"], udp_bind=spec["udp_bind"])
    async with node:
        with trio.fail_after(60):
            while True:
                try:
                    victim = Victim(node, spec["victim"], tuple(spec["victim_udp"]))  # type: ignore[arg-type]
                    break
                except Exception:  # not in our netmap yet
                    await trio.sleep(0.2)
        hostile = Hostile(node, victim, random.Random(spec.get("seed", 15)))
        print(json.dumps({"action": "ready"}), flush=True)
        for action in spec["actions"]:
            start = time.monotonic()
            kind = action["kind"]
            if kind == "garbage":
                result = await do_garbage(hostile, action["count"], action.get("paths", ["udp", "derp"]))
            elif kind == "mutate":
                result = await do_mutate(hostile, action["count"], action.get("rate", 0))
            elif kind == "flood":
                result = await do_flood(hostile, action["rate"], action["seconds"])
            elif kind == "replay":
                result = await do_replay(hostile, Path(action["file"]), action.get("times", 1),
                                         action.get("paths", ["udp", "derp"]))
            else:
                raise SystemExit(f"unknown action {kind!r}")
            result.update(action=kind, seconds=round(time.monotonic() - start, 3))
            print(json.dumps(result), flush=True)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.makedirs(spec["state_dir"], exist_ok=True)
    trio.run(run, spec)


if __name__ == "__main__":
    main()
