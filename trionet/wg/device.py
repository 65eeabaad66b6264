"""A sans-IO WireGuard device: Noise_IKpsk2 handshakes, sessions, timers.

Facts from WireGuard/wireguard-go device/{noise-protocol,noise-helpers,
constants,timers,receive,send}.go (protocol-notes §10). Time is passed in:
`now` is monotonic seconds, `wall` is Unix time (only for TAI64N). Nothing
here awaits or reads a clock.

    dev = WgDevice(node_private)
    dev.set_peer(peer_node_key, allowed_ips)
    transmits = dev.send_ip(ip_packet, now, wall)      # -> [Transmit(peer, data)]
    got = dev.receive(datagram, now, wall, src=path)   # -> Received(packets, transmits)
    transmits = dev.tick(now, wall); dev.next_deadline()

Bad datagrams are dropped and counted by reason in `drops`; no exception
leaves `receive`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Iterable
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

log = logging.getLogger(__name__)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE, MSG_TRANSPORT = 1, 2, 3, 4
INITIATION_SIZE, RESPONSE_SIZE, COOKIE_SIZE, TRANSPORT_MIN = 148, 92, 64, 32

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER = 0.334
KEEPALIVE_TIMEOUT = 10.0
NEW_HANDSHAKE_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # sent data, nothing heard back
RECEIVING_REKEY_AFTER = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
HANDSHAKE_MIN_INTERVAL = 0.020  # wireguard-go handshakeInitationRate
REPLAY_WINDOW = 8128  # wireguard-go replay/replay.go: (ringBlocks-1) * 64 bits
MAX_QUEUED = 1024


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(key: bytes, data: bytes, n: int) -> list[bytes]:
    t0 = _hmac(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = _hmac(t0, prev + bytes([i]))
        out.append(prev)
    return out


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def _dh(priv: bytes, pub: bytes) -> bytes:
    return bytes(crypto_scalarmult(priv, pub))


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def tai64n(wall: float) -> bytes:
    sec = int(wall)
    nsec = int((wall - sec) * 1e9) & ~0xFFFFFF  # coarse, as wireguard-go whitens it
    return struct.pack(">QI", 0x400000000000000A + sec, nsec)


C0 = _hash(CONSTRUCTION)
H0 = _hash(C0, IDENTIFIER)
ZERO12 = bytes(12)


@attrs.frozen
class Transmit:
    peer: bytes
    data: bytes
    path: Any = None  # the path a datagram we answer came on; reply there


@attrs.define
class Received:
    packets: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    transmits: list[Transmit] = attrs.field(factory=list)


class ReplayWindow:
    """Sliding window over receive counters (accept each counter once)."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.top = -1
        self.bits = 0

    def check(self, n: int) -> bool:
        if n > self.top:
            return True
        return self.top - n < self.size and not (self.bits >> (self.top - n)) & 1

    def accept(self, n: int) -> None:
        if n > self.top:
            shift = n - self.top
            if shift >= self.size:
                self.bits = 1
            else:
                self.bits = (self.bits << shift) | 1
                # trim only now and then: masking a big int on every packet is the cost
                if self.bits.bit_length() > 2 * self.size:
                    self.bits &= (1 << self.size) - 1
            self.top = n
        else:
            self.bits |= 1 << (self.top - n)


@attrs.define(eq=False)
class Session:
    local_index: int
    remote_index: int
    send: ChaCha20Poly1305
    recv: ChaCha20Poly1305
    created: float
    initiator: bool
    send_counter: int = 0
    replay: ReplayWindow = attrs.field(factory=ReplayWindow)
    confirmed: bool = True  # a responder may send only after the initiator's first packet


@attrs.define(eq=False)
class Handshake:
    local_index: int
    e_private: bytes
    c: bytes
    h: bytes
    started: float
    sent: float


@attrs.define(eq=False)
class Peer:
    public: bytes
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    mac1_key: bytes
    static_dh: bytes
    persistent_keepalive: float | None = None
    current: Session | None = None
    previous: Session | None = None
    next: Session | None = None  # responder side, until confirmed
    handshake: Handshake | None = None
    handshake_deadline: float = 0.0
    attempt_started: float | None = None
    queue: list[bytes] = attrs.field(factory=list)
    last_sent: float = -1e9
    last_received: float = -1e9
    last_handshake: float = -1e9
    last_initiation_seen: bytes = b""
    last_initiation_at: float = -1e9
    awaiting_reply_since: float | None = None
    path: Any = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    handshakes: int = 0


class WgDevice:
    def __init__(self, static_private: bytes, rng: random.Random | None = None) -> None:
        self.private = static_private
        self.public = bytes(crypto_scalarmult_base(static_private))
        self.mac1_key = _hash(LABEL_MAC1, self.public)
        self.rng = rng or random.Random()
        self.peers: dict[bytes, Peer] = {}
        self.by_index: dict[int, tuple[Peer, Any]] = {}
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        # Per-address caches (raw address bytes): routing and inbound source
        # checks cost a dict lookup per packet instead of a prefix scan.
        self._route_cache: dict[bytes, Peer | None] = {}
        self._src_ok: dict[tuple[bytes, bytes], bool] = {}

    def _invalidate(self) -> None:
        self._route_cache.clear()
        self._src_ok.clear()

    # ------------------------------------------------------------- peer table
    def set_peer(self, public: bytes, allowed_ips: Iterable[Any], persistent_keepalive: float | None = None) -> None:
        nets = [ipaddress.ip_network(n, strict=False) for n in allowed_ips]
        peer = self.peers.get(public)
        if peer is None:
            # static_dh is computed at the first handshake: a 10,000-peer netmap
            # should not cost 10,000 X25519 operations up front.
            self.peers[public] = Peer(public, nets, _hash(LABEL_MAC1, public), b"", persistent_keepalive)
        else:
            peer.networks = nets
            peer.persistent_keepalive = persistent_keepalive
        self._invalidate()

    def remove_peer(self, public: bytes) -> None:
        peer = self.peers.pop(public, None)
        if peer is None:
            return
        self._invalidate()
        for idx, (p, _) in list(self.by_index.items()):
            if p is peer:
                del self.by_index[idx]

    def reset_sessions(self, public: bytes) -> None:
        """Forget a peer's sessions (it restarted): the next packet handshakes at once."""
        peer = self.peers.get(public)
        if peer is None:
            return
        for idx, (p, _) in list(self.by_index.items()):
            if p is peer:
                del self.by_index[idx]
        peer.current = peer.previous = peer.next = None
        peer.handshake = None
        peer.attempt_started = None
        self.counters["sessions_reset"] += 1

    def _static_dh(self, peer: Peer) -> bytes:
        if not peer.static_dh:
            peer.static_dh = _dh(self.private, peer.public)
        return peer.static_dh

    def route(self, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Peer | None:
        best: Peer | None = None
        best_len = -1
        for peer in self.peers.values():
            for net in peer.networks:
                if net.version == dst.version and net.prefixlen > best_len and dst in net:
                    best, best_len = peer, net.prefixlen
        return best

    def _new_index(self, peer: Peer, what: Any) -> int:
        while True:
            idx = self.rng.getrandbits(32)
            if idx not in self.by_index:
                self.by_index[idx] = (peer, what)
                return idx

    # --------------------------------------------------------------- sending
    def send_ip(self, packet: bytes | memoryview, now: float, wall: float) -> list[Transmit]:
        pkt = packet if isinstance(packet, bytes) else bytes(packet)
        if len(pkt) < 20:
            self.drops["send_short"] += 1
            return []
        raw = pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40]
        try:
            peer = self._route_cache[raw]
        except KeyError:
            try:
                peer = self.route(ipaddress.ip_address(raw))
            except ValueError:
                self.drops["send_bad_ip"] += 1
                return []
            if len(self._route_cache) > 65536:
                self._route_cache.clear()
            self._route_cache[raw] = peer
        if peer is None:
            self.drops["send_no_route"] += 1
            return []
        return self._send(peer, pkt, now, wall)

    def _usable(self, s: Session | None, now: float) -> bool:
        return (s is not None and s.confirmed and now - s.created < REJECT_AFTER_TIME
                and s.send_counter < REJECT_AFTER_MESSAGES)

    def _send(self, peer: Peer, pkt: bytes, now: float, wall: float) -> list[Transmit]:
        out: list[Transmit] = []
        s = peer.current
        if not self._usable(s, now):
            if len(peer.queue) < MAX_QUEUED:
                peer.queue.append(pkt)
            else:
                self.drops["send_queue_full"] += 1
            out += self._maybe_initiate(peer, now, wall)
            return out
        assert s is not None
        out.append(self._encrypt(peer, s, pkt, now))
        if s.initiator and (now - s.created >= REKEY_AFTER_TIME or s.send_counter >= REKEY_AFTER_MESSAGES):
            out += self._maybe_initiate(peer, now, wall)
        return out

    def _encrypt(self, peer: Peer, s: Session, pkt: bytes, now: float) -> Transmit:
        pad = (-len(pkt)) % 16
        ct = s.send.encrypt(_nonce(s.send_counter), pkt + bytes(pad) if pad else pkt, None)
        header = struct.pack("<IIQ", MSG_TRANSPORT, s.remote_index, s.send_counter)
        s.send_counter += 1
        peer.last_sent = now
        peer.tx_bytes += len(pkt)
        if pkt and peer.awaiting_reply_since is None:
            peer.awaiting_reply_since = now
        return Transmit(peer.public, header + ct)

    def _maybe_initiate(self, peer: Peer, now: float, wall: float) -> list[Transmit]:
        if peer.handshake is not None and now < peer.handshake_deadline:
            return []
        if peer.attempt_started is None:
            peer.attempt_started = now
        elif now - peer.attempt_started > REKEY_ATTEMPT_TIME:
            self.counters["handshake_gave_up"] += 1
            peer.queue.clear()
            peer.attempt_started = None
            peer.handshake = None
            return []
        return [self._initiation(peer, now, wall)]

    def _initiation(self, peer: Peer, now: float, wall: float) -> Transmit:
        if peer.handshake is not None:
            self.by_index.pop(peer.handshake.local_index, None)
        e = os.urandom(32)
        e_pub = bytes(crypto_scalarmult_base(e))
        c, h = C0, _hash(H0, peer.public)
        (c,) = _kdf(c, e_pub, 1)
        h = _hash(h, e_pub)
        c, k = _kdf(c, _dh(e, peer.public), 2)
        static = ChaCha20Poly1305(k).encrypt(ZERO12, self.public, h)
        h = _hash(h, static)
        c, k = _kdf(c, self._static_dh(peer), 2)
        ts = ChaCha20Poly1305(k).encrypt(ZERO12, tai64n(wall), h)
        h = _hash(h, ts)
        hs = Handshake(0, e, c, h, now, now)
        hs.local_index = self._new_index(peer, hs)
        peer.handshake = hs
        peer.handshake_deadline = now + REKEY_TIMEOUT + self.rng.random() * REKEY_TIMEOUT_JITTER
        msg = struct.pack("<II", MSG_INITIATION, hs.local_index) + e_pub + static + ts
        msg += _mac(peer.mac1_key, msg) + bytes(16)
        self.counters["initiations_sent"] += 1
        return Transmit(peer.public, msg)

    # ------------------------------------------------------------- receiving
    def receive(self, datagram: bytes | memoryview, now: float, wall: float, src: Any = None) -> Received:
        data = datagram if isinstance(datagram, bytes) else bytes(datagram)
        got = Received()
        if len(data) < 4:
            self.drops["short"] += 1
            return got
        mtype = struct.unpack_from("<I", data)[0]
        try:
            if mtype == MSG_TRANSPORT:
                self._on_transport(data, now, wall, src, got)
            elif mtype == MSG_INITIATION:
                self._on_initiation(data, now, wall, src, got)
            elif mtype == MSG_RESPONSE:
                self._on_response(data, now, wall, src, got)
            elif mtype == MSG_COOKIE:
                self.drops["cookie_reply_unsupported"] += 1
            else:
                self.drops["unknown_type"] += 1
        except InvalidTag:
            self.drops["decrypt_failed"] += 1
        except (ValueError, struct.error) as exc:
            self.drops["malformed"] += 1
            log.debug("wireguard: malformed datagram: %s", exc)
        return got

    def _on_initiation(self, data: bytes, now: float, wall: float, src: Any, got: Received) -> None:
        if len(data) != INITIATION_SIZE:
            self.drops["bad_size"] += 1
            return
        if not hmac.compare_digest(_mac(self.mac1_key, data[:116]), data[116:132]):
            self.drops["bad_mac1"] += 1
            return
        sender = struct.unpack_from("<I", data, 4)[0]
        e_pub = data[8:40]
        c, h = C0, _hash(H0, self.public)
        (c,) = _kdf(c, e_pub, 1)
        h = _hash(h, e_pub)
        c, k = _kdf(c, _dh(self.private, e_pub), 2)
        static = ChaCha20Poly1305(k).decrypt(ZERO12, data[40:88], h)
        peer = self.peers.get(static)
        if peer is None:
            self.drops["unknown_peer"] += 1
            return
        h = _hash(h, data[40:88])
        c, k = _kdf(c, self._static_dh(peer), 2)
        ts = ChaCha20Poly1305(k).decrypt(ZERO12, data[88:116], h)
        h = _hash(h, data[88:116])
        if ts <= peer.last_initiation_seen:
            self.drops["replayed_initiation"] += 1
            return
        if now - peer.last_initiation_at < HANDSHAKE_MIN_INTERVAL:
            self.drops["initiation_flood"] += 1
            return
        peer.last_initiation_seen, peer.last_initiation_at = ts, now
        # respond
        e = os.urandom(32)
        er_pub = bytes(crypto_scalarmult_base(e))
        (c,) = _kdf(c, er_pub, 1)
        h = _hash(h, er_pub)
        (c,) = _kdf(c, _dh(e, e_pub), 1)
        (c,) = _kdf(c, _dh(e, static), 1)
        c, tau, k = _kdf(c, bytes(32), 3)
        h = _hash(h, tau)
        empty = ChaCha20Poly1305(k).encrypt(ZERO12, b"", h)
        t_recv, t_send = _kdf(c, b"", 2)
        s = Session(0, sender, ChaCha20Poly1305(t_send), ChaCha20Poly1305(t_recv), now, initiator=False,
                    confirmed=False)
        s.local_index = self._new_index(peer, s)
        if peer.next is not None:
            self.by_index.pop(peer.next.local_index, None)
        peer.next = s
        msg = struct.pack("<III", MSG_RESPONSE, s.local_index, sender) + er_pub + empty
        msg += _mac(peer.mac1_key, msg) + bytes(16)
        peer.path = src
        self.counters["responses_sent"] += 1
        got.transmits.append(Transmit(peer.public, msg, src))

    def _on_response(self, data: bytes, now: float, wall: float, src: Any, got: Received) -> None:
        if len(data) != RESPONSE_SIZE:
            self.drops["bad_size"] += 1
            return
        if not hmac.compare_digest(_mac(self.mac1_key, data[:60]), data[60:76]):
            self.drops["bad_mac1"] += 1
            return
        sender, receiver = struct.unpack_from("<II", data, 4)
        entry = self.by_index.get(receiver)
        if entry is None or not isinstance(entry[1], Handshake):
            self.drops["unknown_index"] += 1
            return
        peer, hs = entry
        er_pub = data[12:44]
        c, h = hs.c, hs.h
        (c,) = _kdf(c, er_pub, 1)
        h = _hash(h, er_pub)
        (c,) = _kdf(c, _dh(hs.e_private, er_pub), 1)
        (c,) = _kdf(c, _dh(self.private, er_pub), 1)
        c, tau, k = _kdf(c, bytes(32), 3)
        h = _hash(h, tau)
        ChaCha20Poly1305(k).decrypt(ZERO12, data[44:60], h)
        t_send, t_recv = _kdf(c, b"", 2)
        s = Session(hs.local_index, sender, ChaCha20Poly1305(t_send), ChaCha20Poly1305(t_recv), now, initiator=True)
        self.by_index[hs.local_index] = (peer, s)
        self._install(peer, s)
        peer.handshake = None
        peer.attempt_started = None
        peer.last_handshake = now
        peer.handshakes += 1
        peer.path = src
        self.counters["handshakes_completed"] += 1
        # keepalive confirms the session to the responder; then flush the queue
        got.transmits.append(self._encrypt(peer, s, b"", now))
        for pkt in peer.queue:
            got.transmits.append(self._encrypt(peer, s, pkt, now))
        peer.queue.clear()

    def _install(self, peer: Peer, s: Session) -> None:
        if peer.previous is not None:
            self.by_index.pop(peer.previous.local_index, None)
        peer.previous, peer.current = peer.current, s

    def _on_transport(self, data: bytes, now: float, wall: float, src: Any, got: Received) -> None:
        if len(data) < TRANSPORT_MIN:
            self.drops["short"] += 1
            return
        receiver, counter = struct.unpack_from("<IQ", data, 4)
        entry = self.by_index.get(receiver)
        if entry is None or not isinstance(entry[1], Session):
            self.drops["unknown_index"] += 1
            return
        peer, s = entry[0], entry[1]
        assert isinstance(s, Session)
        if now - s.created >= REJECT_AFTER_TIME or counter >= REJECT_AFTER_MESSAGES:
            self.drops["expired_session"] += 1
            return
        if not s.replay.check(counter):
            self.drops["replayed"] += 1
            return
        plain = s.recv.decrypt(_nonce(counter), memoryview(data)[16:], None)
        s.replay.accept(counter)
        peer.last_received = now
        peer.awaiting_reply_since = None
        peer.path = src
        if not s.confirmed:  # the initiator's first packet on this session
            s.confirmed = True
            if peer.next is not None and peer.next is s:
                peer.next = None
                self._install(peer, s)
                peer.last_handshake = now
                peer.handshakes += 1
                self.counters["handshakes_completed"] += 1
                for pkt in peer.queue:
                    got.transmits.append(self._encrypt(peer, s, pkt, now))
                peer.queue.clear()
        if not plain:
            self.counters["keepalives_received"] += 1
            return
        version = plain[0] >> 4
        if version == 4 and len(plain) >= 20:
            length = (plain[2] << 8) | plain[3]
            raw_src = plain[12:16]
        elif version == 6 and len(plain) >= 40:
            length = 40 + ((plain[4] << 8) | plain[5])
            raw_src = plain[8:24]
        else:
            self.drops["inner_not_ip"] += 1
            return
        if length > len(plain):
            self.drops["inner_truncated"] += 1
            return
        key = (peer.public, raw_src)
        ok = self._src_ok.get(key)
        if ok is None:
            src_ip = ipaddress.ip_address(raw_src)
            ok = any(n.version == src_ip.version and src_ip in n for n in peer.networks)
            if len(self._src_ok) > 65536:
                self._src_ok.clear()
            self._src_ok[key] = ok
        if not ok:
            self.drops["inner_src_not_allowed"] += 1
            return
        peer.rx_bytes += length
        got.packets.append((peer.public, plain if length == len(plain) else plain[:length]))
        if s.initiator and now - s.created >= RECEIVING_REKEY_AFTER:
            got.transmits += self._maybe_initiate(peer, now, wall)

    # ---------------------------------------------------------------- timers
    def tick(self, now: float, wall: float) -> list[Transmit]:
        out: list[Transmit] = []
        for peer in self.peers.values():
            if peer.handshake is not None and now >= peer.handshake_deadline:
                self.counters["handshake_retransmits"] += 1
                out += self._maybe_initiate(peer, now, wall)
            s = peer.current
            if s is not None and now - s.created >= 3 * REJECT_AFTER_TIME:
                self.by_index.pop(s.local_index, None)
                peer.current = None  # keys zeroed: a stale session is never used again
                self.counters["sessions_expired"] += 1
            if self._usable(s, now) and s is not None:
                if (peer.last_received > peer.last_sent and now - peer.last_received >= KEEPALIVE_TIMEOUT
                        and now - peer.last_sent >= KEEPALIVE_TIMEOUT):
                    out.append(self._encrypt(peer, s, b"", now))  # passive keepalive
                elif peer.persistent_keepalive and now - peer.last_sent >= peer.persistent_keepalive:
                    out.append(self._encrypt(peer, s, b"", now))
            if (peer.awaiting_reply_since is not None and now - peer.awaiting_reply_since >= NEW_HANDSHAKE_AFTER
                    and peer.handshake is None):
                peer.awaiting_reply_since = None
                out += self._maybe_initiate(peer, now, wall)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [p.handshake_deadline for p in self.peers.values() if p.handshake is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        return {"peers": len(self.peers), "drops": dict(self.drops), "counters": dict(self.counters)}

    def peer_statistics(self, public: bytes) -> dict[str, Any]:
        p = self.peers.get(public)
        if p is None:
            return {}
        return {"handshakes": p.handshakes, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
                "session": p.current is not None, "queued": len(p.queue)}
