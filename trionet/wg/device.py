"""The WireGuard device: peer table, sessions, timers, data path (sans-IO).

Facts from WireGuard/wireguard-go device/{noise-protocol,receive,send,timers,
peer,keypair}.go (see protocol-notes §10). Nothing here awaits or reads a
clock: `now` is monotonic seconds and `wall` Unix time (used only for the
TAI64N timestamp of initiations). The driver calls `tick(now, wall)` at
`next_deadline()`.

Every timer of wireguard-go's timers.go is a per-peer deadline here (float or
None): retransmit_handshake, send_keepalive, new_handshake, zero_key_material,
persistent_keepalive. The hooks that arm and disarm them (timersDataSent,
timersAnyAuthenticatedPacketReceived, ...) are methods of the same names, in
snake case, called at the same points as in receive.go and send.go.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, NamedTuple, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from trionet.errors import LocalProtocolError
from trionet.rejects import RejectLog
from trionet.wg import crypto, handshake
from trionet.wg.allowedips import AllowedIPs, Network
from trionet.wg.constants import (
    COOKIE_REPLY_SIZE,
    EARLY_RETRY_AFTER,
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    MAX_SEGMENT_SIZE,
    MAX_TIMER_HANDSHAKES,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    QUEUE_STAGED_SIZE,
    RECEIVING_REKEY_AFTER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX_MS,
    REPLAY_WINDOW_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
    ZERO_KEYS_AFTER,
)
from trionet.wg.cookie import CookieChecker, CookieGenerator, source_identity
from trionet.wg.handshake import InitiationState
from trionet.wg.load import HandshakeLoad
from trionet.wg.ratelimit import RateLimiter
from trionet.wg.replay import ReplayWindow

log = logging.getLogger(__name__)

__all__ = [
    "KEEPALIVE_TIMEOUT", "REJECT_AFTER_TIME", "REKEY_AFTER_TIME", "REKEY_ATTEMPT_TIME", "REKEY_TIMEOUT",
    "REPLAY_WINDOW_SIZE", "Keypair", "Peer", "Received", "ReplayWindow", "Transmit", "WgDevice",
]

_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")
_PAD = bytes(16)
_tuple_new = tuple.__new__
_IP4_LENGTH_SRC = struct.Struct("!H8x4s")  # from offset 2: total length, source address
_IP6_LENGTH_SRC = struct.Struct("!H2x16s")  # from offset 4: payload length, source address


_NO_REPLAY = ReplayWindow()  # placeholders until a run starts; never used


def _no_cipher(*args: Any) -> bytes:
    raise AssertionError("no session")


class Transmit(NamedTuple):
    """A datagram to send to `peer` (its public key).

    `path` is the `src` of the datagram this answers (send it back there), or
    None: then the driver picks the peer's best path. A cookie reply to an
    initiation (whose sender we cannot know before its handshake) has the
    `src_key` it came with as `peer` (a DERP sender), else b"" (a UDP sender):
    send it on `path`. None is made for a DERP path without a `src_key`."""

    peer: bytes
    data: bytes
    path: Any = None


class Received(NamedTuple):
    """What one datagram produced: decrypted IP packets `(peer, packet)` and
    datagrams to send (handshake responses, keepalives, staged packets)."""

    packets: list[tuple[bytes, bytes]]
    transmits: list[Transmit]


class Keypair:
    """One session: a ChaCha20Poly1305 object per direction (wireguard-go Keypair)."""

    __slots__ = ("created", "initiator", "local_index", "recv", "remote_index", "replay", "send", "send_counter")

    def __init__(self, local_index: int, remote_index: int, keys: handshake.SessionKeys, created: float,
                 initiator: bool) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.send = ChaCha20Poly1305(keys.send)
        self.recv = ChaCha20Poly1305(keys.receive)
        self.created = created
        self.initiator = initiator
        self.send_counter = 0
        self.replay = ReplayWindow()


class Peer:
    __slots__ = (
        "cookies",
        "current",
        "handshake",
        "handshake_attempts",
        "handshakes",
        "last_handshake",
        "last_initiation_consumption",
        "last_sent_handshake",
        "last_timestamp",
        "need_another_keepalive",
        "next",
        "path",
        "persistent_keepalive",
        "previous",
        "public",
        "rx_bytes",
        "rx_packets",
        "sent_last_minute_handshake",
        "staged",
        "static_static",
        "t_new_handshake",
        "t_persistent_keepalive",
        "t_retransmit_handshake",
        "t_send_keepalive",
        "t_zero_key_material",
        "tx_bytes",
        "tx_packets",
    )

    def __init__(self, public: bytes, static_static: bytes, persistent_keepalive: float | None) -> None:
        self.public = public
        self.static_static = static_static
        self.cookies = CookieGenerator(public)
        self.persistent_keepalive = persistent_keepalive or 0.0
        self.handshake: InitiationState | None = None
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: deque[bytes] = deque(maxlen=QUEUE_STAGED_SIZE)
        self.t_retransmit_handshake: float | None = None
        self.t_send_keepalive: float | None = None
        self.t_new_handshake: float | None = None
        self.t_zero_key_material: float | None = None
        self.t_persistent_keepalive: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.last_sent_handshake: float | None = None
        self.last_timestamp = b""
        self.last_initiation_consumption: float | None = None
        self.last_handshake: float | None = None
        self.path: Any = None
        self.rx_bytes = self.tx_bytes = self.rx_packets = self.tx_packets = self.handshakes = 0

    def timers(self) -> dict[str, float | None]:
        return {"retransmit_handshake": self.t_retransmit_handshake, "send_keepalive": self.t_send_keepalive,
                "new_handshake": self.t_new_handshake, "zero_key_material": self.t_zero_key_material,
                "persistent_keepalive": self.t_persistent_keepalive}


def _usable(kp: Keypair | None, now: float) -> bool:
    return kp is not None and kp.send_counter < REJECT_AFTER_MESSAGES and now - kp.created < REJECT_AFTER_TIME


class WgDevice:
    """A WireGuard interface without I/O. See the package docstring for the API."""

    def __init__(self, static_private: bytes, rng: random.Random | None = None) -> None:
        if len(static_private) != 32:
            raise LocalProtocolError("WireGuard private key must be 32 bytes")
        self.private = bytes(static_private)
        self.public = crypto.public_key(self.private)
        self.rng = rng if rng is not None else random.Random()
        self.peers: dict[bytes, Peer] = {}
        self._index: dict[int, tuple[Peer, Keypair | InitiationState]] = {}
        self._allowed: AllowedIPs[Peer] = AllowedIPs()
        self._route_cache = self._allowed.cache  # read-only fast path; AllowedIPs fills and clears it
        self._checker = CookieChecker(self.public)
        self._ratelimiter = RateLimiter()
        self._load = HandshakeLoad()
        self.force_under_load = False
        # No timer of any peer is due before this (a lower bound, updated as timers are
        # set): a driver sleeping to the next deadline checks it after each call and
        # wakes sooner when it moved earlier; `next_deadline()` makes it exact again.
        self.soonest = math.inf
        self.drops: Counter[str] = Counter()
        self._rejects = RejectLog(log, "wireguard", self.drops)  # counts into self.drops
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------ peer table
    def set_peer(self, public: bytes, allowed_ips: Iterable[Any],
                 persistent_keepalive: float | None = None) -> None:
        """Add a peer or update its AllowedIPs and persistent keepalive (live)."""
        if len(public) != 32:
            raise LocalProtocolError("WireGuard public key must be 32 bytes")
        if public == self.public:
            raise LocalProtocolError("a peer cannot have our own public key")
        nets: list[Network] = [ipaddress.ip_network(n, strict=False) for n in allowed_ips]
        peer = self.peers.get(public)
        if peer is None:
            # DH(our static, its static) is computed at the first handshake: most
            # peers of a big netmap never handshake with us
            peer = self.peers[public] = Peer(public, b"", persistent_keepalive)
        else:
            old = peer.persistent_keepalive
            peer.persistent_keepalive = persistent_keepalive or 0.0
            if not peer.persistent_keepalive:
                peer.t_persistent_keepalive = None
            elif not old:
                peer.t_persistent_keepalive = 0.0  # wireguard-go (uapi.go) sends a keepalive at once
                self._arm(peer.t_persistent_keepalive)
        if persistent_keepalive and peer.t_persistent_keepalive is None and peer.current is None:
            peer.t_persistent_keepalive = 0.0
            self._arm(peer.t_persistent_keepalive)
        self._allowed.replace(peer, nets)

    def remove_peer(self, public: bytes) -> None:
        peer = self.peers.pop(public, None)
        if peer is None:
            return
        self._allowed.remove_value(peer)
        self._zero_and_flush_all(peer)

    def set_private_key(self, static_private: bytes) -> None:
        """Switch our static key (node key renewal): every session restarts under the new key.

        As wireguard-go's SetPrivateKey: static-static DH is recomputed, sessions
        made with the old key end, and a peer holding the new public key goes.
        """
        if len(static_private) != 32:
            raise LocalProtocolError("WireGuard private key must be 32 bytes")
        self.private = bytes(static_private)
        self.public = crypto.public_key(self.private)
        self._checker = CookieChecker(self.public)
        self.remove_peer(self.public)
        for peer in self.peers.values():
            peer.static_static = b""  # recomputed at the next handshake
            self._reset_peer(peer)

    def reset_sessions(self, public: bytes) -> None:
        """Forget a peer's sessions (it restarted): the next packet handshakes at once."""
        peer = self.peers.get(public)
        if peer is not None:
            self._reset_peer(peer)

    def _reset_peer(self, peer: Peer) -> None:
        staged = list(peer.staged)
        self._zero_and_flush_all(peer)
        peer.staged.extend(staged)
        peer.last_sent_handshake = None
        peer.t_retransmit_handshake = peer.t_new_handshake = peer.t_send_keepalive = None
        self.counters["sessions_reset"] += 1

    def allowed_ips(self, public: bytes) -> list[Network]:
        peer = self.peers.get(public)
        return self._allowed.networks_of(peer) if peer is not None else []

    def route(self, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes | None:
        """The public key of the peer whose AllowedIPs hold `dst` (longest prefix)."""
        peer = self._allowed.lookup(dst)
        return peer.public if peer is not None else None

    def peer_for_receiver_index(self, index: int) -> bytes | None:
        """The peer a type 2/3/4 datagram with this receiver index belongs to."""
        entry = self._index.get(index)
        return entry[0].public if entry is not None else None

    # ---------------------------------------------------------------- helpers
    def _drop(self, reason: str, detail: object = "") -> None:
        self._rejects.reject(reason, detail)

    def _internal_error(self, exc: Exception) -> None:
        """A bug, not bad input: counted as drops["internal_error"], its traceback logged once."""
        self._rejects.reject("internal_error", repr(exc))
        if self.drops["internal_error"] == 1:
            log.error("wireguard: internal error on a datagram (dropped; later ones are counted as "
                      "drops['internal_error'])", exc_info=exc)

    def _new_index(self, peer: Peer, what: Keypair | InitiationState) -> int:
        while True:
            idx = int.from_bytes(crypto.random_bytes(4), "little")
            if idx not in self._index:
                self._index[idx] = (peer, what)
                return idx

    def _delete_keypair(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._index.pop(kp.local_index, None)

    def _clear_handshake(self, peer: Peer) -> None:
        if peer.handshake is not None:
            entry = self._index.get(peer.handshake.local_index)
            if entry is not None and entry[1] is peer.handshake:
                del self._index[peer.handshake.local_index]
            peer.handshake = None

    def _zero_and_flush_all(self, peer: Peer) -> None:
        for kp in (peer.previous, peer.current, peer.next):
            self._delete_keypair(kp)
        peer.previous = peer.current = peer.next = None
        self._clear_handshake(peer)
        peer.staged.clear()

    def _jitter(self) -> float:
        return self.rng.randrange(REKEY_TIMEOUT_JITTER_MAX_MS) / 1000.0

    # ------------------------------------------------ timer hooks (timers.go)
    def _timers_data_sent(self, peer: Peer, now: float) -> None:
        if peer.t_new_handshake is None:
            peer.t_new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self._arm(peer.t_new_handshake)

    def _timers_data_received(self, peer: Peer, now: float) -> None:
        if peer.t_send_keepalive is None:
            peer.t_send_keepalive = now + KEEPALIVE_TIMEOUT
            self._arm(peer.t_send_keepalive)
        else:
            peer.need_another_keepalive = True

    def _timers_handshake_initiated(self, peer: Peer, now: float) -> None:
        peer.t_retransmit_handshake = now + REKEY_TIMEOUT + self._jitter()
        self._arm(peer.t_retransmit_handshake)

    def _timers_handshake_complete(self, peer: Peer, now: float) -> None:
        peer.t_retransmit_handshake = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now
        peer.handshakes += 1
        self.counters["handshakes_completed"] += 1

    def _timers_session_derived(self, peer: Peer, now: float) -> None:
        peer.t_zero_key_material = now + ZERO_KEYS_AFTER
        self._arm(peer.t_zero_key_material)

    def _timers_traversal(self, peer: Peer, now: float) -> None:
        if peer.persistent_keepalive:
            peer.t_persistent_keepalive = now + peer.persistent_keepalive
            self._arm(peer.t_persistent_keepalive)

    # ----------------------------------------------------------------- send
    def send_ip(self, packet: bytes | bytearray | memoryview, now: float, wall: float) -> list[Transmit]:
        """Encrypt one IP packet for the peer whose AllowedIPs hold its destination.

        Without a usable session the packet is staged (up to 128 per peer,
        oldest dropped) and a handshake initiation is returned instead."""
        return self.send_ip_many((packet,), now, wall)

    def send_ip_many(self, packets: Iterable[bytes | bytearray | memoryview], now: float,
                     wall: float) -> list[Transmit]:
        """`send_ip` for a burst (one netstack step's packets), in order. The timer
        hooks and the rekey check run once per peer per burst, not per packet."""
        out: list[Transmit] = []
        append = out.append
        route_cache = self._route_cache
        touched: list[Peer] = []
        # A run: packets to one destination address in a row (a TCP burst). Its peer and
        # session are looked up and checked once; each packet still checks its counter.
        run_dst = b""
        run_peer = cast(Peer, None)  # set whenever run_dst is
        kp: Keypair | None = None
        encrypt: Callable[..., bytes] = _no_cipher
        public = b""
        remote_index = 0
        for packet in packets:
            n = len(packet)
            if n < 20:
                self._drop("send_short", n)
                continue
            version = packet[0] >> 4
            if version == 4:
                raw = packet[16:20]
            elif version == 6 and n >= 40:
                raw = packet[24:40]
            else:
                self._drop("send_not_ip", version)
                continue
            if n > MAX_SEGMENT_SIZE - TRANSPORT_MIN_SIZE:
                self._drop("send_too_big", n)
                continue
            if raw != run_dst or kp is None or kp.send_counter >= REJECT_AFTER_MESSAGES:
                run_dst = b""
                if type(raw) is not bytes:
                    raw = bytes(raw)
                peer = route_cache.get(raw)
                if peer is None:
                    peer = self._allowed.lookup_raw(raw)
                    if peer is None:
                        self._drop("send_no_route", raw.hex())
                        continue
                kp = peer.current
                if peer.staged or kp is None or kp.send_counter >= REJECT_AFTER_MESSAGES \
                        or now - kp.created >= REJECT_AFTER_TIME:
                    self._stage(peer, bytes(packet))
                    out.extend(self._send_staged(peer, now, wall, None))
                    kp = None
                    continue
                run_dst, run_peer, encrypt = raw, peer, kp.send.encrypt
                public, remote_index = peer.public, kp.remote_index
                if not touched or touched[-1] is not peer:
                    touched.append(peer)
            # the common case: the current session (an inlined _seal)
            counter = kp.send_counter
            kp.send_counter = counter + 1
            if n & 15:
                packet = bytes(packet) + _PAD[:-n & 15]
            append(_tuple_new(Transmit, (public, _HEADER.pack(MSG_TRANSPORT, remote_index, counter)
                                         + encrypt(_NONCE.pack(counter), packet, None), None)))
            run_peer.tx_packets += 1
            run_peer.tx_bytes += n
        for peer in touched if len(touched) == 1 else dict.fromkeys(touched):
            # timersDataSent and keepKeyFreshSending, once for the burst
            if peer.persistent_keepalive:
                peer.t_persistent_keepalive = now + peer.persistent_keepalive
                self._arm(peer.t_persistent_keepalive)
            peer.t_send_keepalive = None
            if peer.t_new_handshake is None:
                peer.t_new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
                self._arm(peer.t_new_handshake)
            kp = peer.current
            if kp is not None and (kp.send_counter > REKEY_AFTER_MESSAGES
                                   or (kp.initiator and now - kp.created > REKEY_AFTER_TIME)):
                out.extend(self._send_handshake_initiation(peer, now, wall, False))
        return out

    def _seal(self, kp: Keypair, packet: bytes | bytearray | memoryview, n: int) -> bytes:
        counter = kp.send_counter
        kp.send_counter = counter + 1
        if n & 15:
            packet = bytes(packet) + _PAD[:-n & 15]
        return _HEADER.pack(MSG_TRANSPORT, kp.remote_index, counter) + kp.send.encrypt(_NONCE.pack(counter), packet,
                                                                                        None)

    def _stage(self, peer: Peer, packet: bytes) -> None:
        if len(peer.staged) == QUEUE_STAGED_SIZE:
            self._drop("staged_overflow")
        peer.staged.append(packet)

    def _send_staged(self, peer: Peer, now: float, wall: float, path: Any) -> list[Transmit]:
        """wireguard-go SendStagedPackets: encrypt what is staged, or handshake."""
        if not peer.staged:
            return []
        kp = peer.current
        if kp is None or not _usable(kp, now):
            return self._send_handshake_initiation(peer, now, wall, False)
        out: list[Transmit] = []
        data_sent = False
        while peer.staged:
            pkt = peer.staged.popleft()
            out.append(Transmit(peer.public, self._seal(kp, pkt, len(pkt)), path))
            if pkt:
                data_sent = True
                peer.tx_packets += 1
                peer.tx_bytes += len(pkt)
            else:
                self.counters["keepalives_sent"] += 1
        self._timers_traversal(peer, now)
        peer.t_send_keepalive = None  # timersAnyAuthenticatedPacketSent
        if data_sent:
            self._timers_data_sent(peer, now)
        if kp.send_counter > REKEY_AFTER_MESSAGES or (kp.initiator and now - kp.created > REKEY_AFTER_TIME):
            out += self._send_handshake_initiation(peer, now, wall, False)
        return out

    def _send_keepalive(self, peer: Peer, now: float, wall: float, path: Any) -> list[Transmit]:
        if not peer.staged:
            peer.staged.append(b"")
        return self._send_staged(peer, now, wall, path)

    def _send_handshake_initiation(self, peer: Peer, now: float, wall: float, is_retry: bool) -> list[Transmit]:
        if not is_retry:
            peer.handshake_attempts = 0
        if peer.last_sent_handshake is not None and now - peer.last_sent_handshake < REKEY_TIMEOUT:
            return []
        peer.last_sent_handshake = now
        self._clear_handshake(peer)
        try:
            ss = self._static_static(peer)
        except ValueError:
            self._drop("bad_peer_key")
            return []
        local = self._new_index(peer, _PLACEHOLDER)
        try:
            msg, state = handshake.create_initiation(self.public, peer.public, ss, local, wall)
        except ValueError:
            del self._index[local]
            self._drop("bad_peer_key")
            return []
        self._index[local] = (peer, state)
        peer.handshake = state
        msg = peer.cookies.add_macs(msg, now)
        self._timers_traversal(peer, now)
        peer.t_send_keepalive = None
        self._timers_handshake_initiated(peer, now)
        self.counters["initiations_sent"] += 1
        return [Transmit(peer.public, msg)]

    def peer_heard(self, public: bytes, now: float, wall: float) -> list[Transmit]:
        """The peer just proved it knows us (a disco message from it): resend an unanswered initiation now.

        A tailnet peer drops our first initiation when its netmap does not hold
        us yet; the disco message shows it does now, so waiting out the rest
        of REKEY_TIMEOUT (up to 5 s on a first connection) gains nothing.
        """
        peer = self.peers.get(public)
        if peer is None or peer.handshake is None or _usable(peer.current, now):
            return []
        sent = peer.last_sent_handshake
        if sent is None or now - sent < EARLY_RETRY_AFTER:
            return []
        peer.last_sent_handshake = None  # lift the REKEY_TIMEOUT guard for this one resend
        self.counters["initiations_resent_early"] += 1
        return self._send_handshake_initiation(peer, now, wall, True)

    # -------------------------------------------------------------- receive
    def receive(self, datagram: bytes | bytearray | memoryview, now: float, wall: float, src: Any = None,
                backlog: int = 0, src_key: bytes | None = None) -> Received:
        """Handle one datagram from the network. Never raises on bad input.

        `src` is an opaque path tag, handed back on the Transmits that answer
        this datagram. Under load it also names the sender for cookies and
        the rate limiter (`cookie.source_identity`): a magicsock path tag
        `("udp", (host, port))` or `("derp", region)`, or a `(host, port)`.
        `src_key` is the DERP source node key of a relayed datagram (None for
        UDP): relayed senders are then told apart by key, not only by region,
        and a cookie reply to an unknown sender is addressed to that key.

        Load is measured here (`load.HandshakeLoad`): a driver without a
        handshake queue passes nothing for it. `backlog` is for one with a
        queue: its depth, under load at 128 or more, as wireguard-go. Or set
        `force_under_load`."""
        return self.receive_many((datagram,), now, wall, src, backlog, src_key=src_key)

    def receive_many(self, datagrams: Iterable[bytes | bytearray | memoryview], now: float, wall: float,
                     src: Any = None, backlog: int = 0, into: list[bytes] | None = None,
                     src_key: bytes | None = None) -> Received:
        """`receive` for datagrams from one source read together (a GRO batch),
        in order; what they produce comes back in one Received. With `into`, the
        decrypted packets are appended there instead, without their peers (a
        netstack does not need them), and `Received.packets` stays empty.

        Transport messages for one session arrive in runs. The session lookup,
        the expiry check and the timer hooks of receive.go run once per run
        (`now` is the same for all of them, so once is what per message would
        do); each message still gets its own replay check, decryption and
        inner-packet checks."""
        got = _tuple_new(Received, ([], []))
        pairs = got.packets if into is None else None
        packets = [] if into is None else into
        run_start = len(packets)
        drop = self._drop
        run_index = -1  # the receiver index of the current run; -1: none
        peer: Peer | None = None
        kp: Keypair | None = None
        replay = _NO_REPLAY
        decrypt: Callable[..., bytes] = _no_cipher
        last = block_max = slot = 0  # the replay window's newest counter, its block's last, its ring slot
        ring = replay.ring
        fresh = False  # the run's first authentic message still owes receive.go's hooks
        run_src = b""  # an inner source address already checked against the peer's AllowedIPs
        data_packets = rx_bytes = keepalives = 0
        for datagram in datagrams:
            try:
                n = len(datagram)
                if n >= TRANSPORT_MIN_SIZE:
                    mtype, receiver, counter = _HEADER.unpack_from(datagram)
                elif n >= 4:
                    mtype, receiver = _U32.unpack_from(datagram)[0], -2  # -2: never a run's index
                else:
                    drop("short", n)
                    continue
                if mtype != MSG_TRANSPORT or receiver != run_index:
                    if peer is not None:  # a handshake may retire the run's keypair: end the run here
                        ended, counts = peer, (data_packets, rx_bytes, keepalives)
                        peer, run_index, data_packets, rx_bytes, keepalives = None, -1, 0, 0, 0  # even if it raises
                        self._end_receive_run(ended, now, *counts, packets, run_start, pairs)
                    if mtype != MSG_TRANSPORT:
                        self._on_other(mtype, datagram, now, wall, src, src_key, backlog, got)
                        continue
                    if n < TRANSPORT_MIN_SIZE:
                        drop("short", n)
                        continue
                    if n > MAX_SEGMENT_SIZE:
                        drop("oversized", n)
                        continue
                    session = self._transport_session(receiver, now)
                    if session is None:
                        continue
                    peer, kp = session
                    run_index, replay, decrypt = receiver, kp.replay, kp.recv.decrypt
                    last, fresh, run_src, run_start = replay.last, True, b"", len(packets)
                    ring, block_max, slot = replay.ring, min(last | 63, REJECT_AFTER_MESSAGES - 1), (last >> 6) & 127
                elif n > MAX_SEGMENT_SIZE:
                    drop("oversized", n)
                    continue
                if counter <= last and not replay.check(counter):
                    drop("replayed", counter)
                    continue
                try:
                    plain = decrypt(_NONCE.pack(counter),
                                    (datagram if type(datagram) is memoryview else memoryview(datagram))[16:], None)
                except InvalidTag:
                    drop("decrypt_failed")
                    continue
                if last < counter <= block_max:  # in order, in the newest block: the common case
                    ring[slot] |= 1 << (counter & 63)
                    replay.last = last = counter
                elif replay.validate(counter):
                    last = replay.last
                    block_max, slot = min(last | 63, REJECT_AFTER_MESSAGES - 1), (last >> 6) & 127
                else:
                    drop("replayed", counter)
                    continue
                if fresh:
                    fresh = False
                    assert peer is not None and kp is not None
                    self._authenticated(peer, kp, now, wall, src, got)
                if not plain:
                    keepalives += 1
                    continue
                data_packets += 1
                size = len(plain)
                version = plain[0] >> 4
                if version == 4 and size >= 20:
                    length, raw_src = _IP4_LENGTH_SRC.unpack_from(plain, 2)
                elif version == 6 and size >= 40:
                    length, raw_src = _IP6_LENGTH_SRC.unpack_from(plain, 4)
                    length += 40
                else:
                    drop("inner_not_ip", version)
                    continue
                if length > size or length < 20:
                    drop("inner_bad_length", length)
                    continue
                if raw_src != run_src:
                    owner = self._route_cache.get(raw_src)
                    if owner is None:
                        owner = self._allowed.lookup_raw(raw_src)
                    if owner is not peer:
                        drop("inner_src_not_allowed", raw_src.hex())
                        continue
                    run_src = raw_src
                rx_bytes += length
                packets.append(plain if length == size else plain[:length])
            except Exception as exc:  # a bug, not bad input: count it, never crash the driver
                self._internal_error(exc)
        if peer is not None:
            try:
                self._end_receive_run(peer, now, data_packets, rx_bytes, keepalives, packets, run_start, pairs)
            except Exception as exc:
                self._internal_error(exc)
        return got

    def _on_other(self, mtype: int, datagram: bytes | bytearray | memoryview, now: float, wall: float,
                  src: Any, src_key: bytes | None, backlog: int, got: Received) -> None:
        if mtype == MSG_INITIATION or mtype == MSG_RESPONSE:
            self._on_handshake(mtype, bytes(datagram), now, wall, src, src_key, backlog, got)
        elif mtype == MSG_COOKIE_REPLY:
            self._on_cookie_reply(bytes(datagram), now)
        else:
            self._drop("unknown_type", mtype)

    def _transport_session(self, receiver: int, now: float) -> tuple[Peer, Keypair] | None:
        """The live session a transport message's receiver index names, or None (counted)."""
        entry = self._index.get(receiver)
        kp = None if entry is None else entry[1]
        if not isinstance(kp, Keypair):
            self._drop("unknown_index", receiver)
            return None
        peer = entry[0]  # type: ignore[index]
        if now - kp.created >= REJECT_AFTER_TIME:
            self._drop("expired_keypair")
            return None
        return peer, kp

    def _authenticated(self, peer: Peer, kp: Keypair, now: float, wall: float, src: Any, got: Received) -> None:
        """receive.go's hooks for an authentic transport message (once per run)."""
        if kp is peer.next:  # ReceivedWithKeypair: the initiator confirmed our response
            self._delete_keypair(peer.previous)
            peer.previous, peer.current, peer.next = peer.current, kp, None
            self._timers_handshake_complete(peer, now)
            got.transmits.extend(self._send_staged(peer, now, wall, src))
        cur = peer.current
        if cur is not None and cur.initiator and not peer.sent_last_minute_handshake \
                and now - cur.created > RECEIVING_REKEY_AFTER:  # keepKeyFreshReceiving
            peer.sent_last_minute_handshake = True
            got.transmits.extend(self._send_handshake_initiation(peer, now, wall, False))
        if peer.persistent_keepalive:
            peer.t_persistent_keepalive = now + peer.persistent_keepalive
            self._arm(peer.t_persistent_keepalive)
        peer.t_new_handshake = None
        peer.path = src

    def _end_receive_run(self, peer: Peer, now: float, data_packets: int, rx_bytes: int, keepalives: int,
                         packets: list[bytes], run_start: int, pairs: list[tuple[bytes, bytes]] | None) -> None:
        """The per-message counters and timersDataReceived of a run, applied once;
        the run's packets (from `run_start` in `packets`) paired with their peer."""
        if keepalives:
            self.counters["keepalives_received"] += keepalives
        if pairs is not None and len(packets) > run_start:
            pairs += zip(repeat(peer.public), packets[run_start:])
        if data_packets:
            peer.rx_packets += len(packets) - run_start
            peer.rx_bytes += rx_bytes
            self._timers_data_received(peer, now)
            if data_packets > 1:  # what the second call of the hook would do
                peer.need_another_keepalive = True

    def under_load(self, now: float, backlog: int = 0) -> bool:
        """Whether handshake messages now need a valid mac2 (wireguard-go IsUnderLoad),
        from the load measured in receive (see `load.HandshakeLoad`) or `backlog`."""
        return self._load.under_load(now, backlog) or self.force_under_load

    def _on_handshake(self, mtype: int, data: bytes, now: float, wall: float, src: Any, src_key: bytes | None,
                      backlog: int, got: Received) -> None:
        if len(data) != (INITIATION_SIZE if mtype == MSG_INITIATION else RESPONSE_SIZE):
            self._drop("bad_size", len(data))
            return
        if not self._checker.check_mac1(data):
            self._drop("bad_mac1")
            return
        # Only messages past mac1 count towards load: they alone can reach the costly
        # handshake, and a sender must know our public key to make one.
        if self._load.arrived(now, 1, backlog) or self.force_under_load:
            cookie_source, limiter_key = source_identity(src, src_key)
            reply = self._checker.reply_unless_mac2(data, cookie_source, now)
            if reply is not None:
                entry = self._index.get(_U32.unpack_from(data, 8)[0]) if mtype == MSG_RESPONSE else None
                who = entry[0].public if entry is not None else (src_key or b"")
                self._drop("under_load_no_mac2")
                if not who and type(src) is tuple and src and src[0] == "derp":
                    self._drop("cookie_reply_unaddressed")  # a relay needs a node key to deliver it
                    return
                got.transmits.append(Transmit(who, reply, src))
                self.counters["cookie_replies_sent"] += 1
                return
            if not self._ratelimiter.allow(limiter_key, now):
                self._drop("ratelimited")
                return
        if mtype == MSG_INITIATION:
            self._on_initiation(data, now, src, got)
        else:
            self._on_response(data, now, wall, src, got)

    def _static_static(self, peer: Peer) -> bytes:
        """DH(our static, peer static), precomputed once; ValueError for a low-order key."""
        if not peer.static_static:
            peer.static_static = crypto.dh(self.private, peer.public)
        return peer.static_static

    def _static_static_of(self, public: bytes) -> bytes | None:
        peer = self.peers.get(public)
        return self._static_static(peer) if peer is not None else None

    def _on_initiation(self, data: bytes, now: float, src: Any, got: Received) -> None:
        try:
            ci = handshake.consume_initiation(self.private, self.public, data, self._static_static_of)
        except LookupError:
            self._drop("unknown_peer")
            return
        except InvalidTag:
            self._drop("decrypt_failed_initiation")
            return
        except ValueError:
            self._drop("bad_public_key")
            return
        peer = self.peers[ci.peer_static]
        if ci.timestamp <= peer.last_timestamp:
            self._drop("replayed_initiation")
            return
        if peer.last_initiation_consumption is not None \
                and now - peer.last_initiation_consumption <= HANDSHAKE_INITIATION_RATE:
            self._drop("initiation_flood")
            return
        peer.last_timestamp = ci.timestamp
        peer.last_initiation_consumption = now
        self._clear_handshake(peer)  # our own initiation, if any, is superseded (one handshake per peer)
        peer.path = src
        self._timers_traversal(peer, now)
        peer.t_new_handshake = None
        local = self._new_index(peer, _PLACEHOLDER)
        try:
            msg, keys = handshake.create_response(ci, local)
        except ValueError:
            del self._index[local]
            self._drop("bad_public_key")
            return
        kp = Keypair(local, ci.sender, keys, now, initiator=False)
        self._index[local] = (peer, kp)
        # BeginSymmetricSession, responder: the new keypair waits in `next`
        self._delete_keypair(peer.next)
        self._delete_keypair(peer.previous)
        peer.next, peer.previous = kp, None
        self._timers_session_derived(peer, now)
        self._timers_traversal(peer, now)
        peer.t_send_keepalive = None
        self.counters["responses_sent"] += 1
        got.transmits.append(Transmit(peer.public, peer.cookies.add_macs(msg, now), src))

    def _on_response(self, data: bytes, now: float, wall: float, src: Any, got: Received) -> None:
        receiver = _U32.unpack_from(data, 8)[0]
        entry = self._index.get(receiver)
        if entry is None or type(entry[1]) is not InitiationState:
            self._drop("unknown_index", receiver)
            return
        peer, state = entry
        assert isinstance(state, InitiationState)
        try:
            remote, keys = handshake.consume_response(self.private, state, data)
        except InvalidTag:
            self._drop("decrypt_failed_response")
            return
        except ValueError:
            self._drop("bad_public_key")
            return
        peer.path = src
        self._timers_traversal(peer, now)
        peer.t_new_handshake = None
        kp = Keypair(state.local_index, remote, keys, now, initiator=True)
        self._index[state.local_index] = (peer, kp)
        peer.handshake = None
        # BeginSymmetricSession, initiator
        if peer.next is not None:
            new_previous: Keypair | None = peer.next
            peer.next = None
            self._delete_keypair(peer.current)
        else:
            new_previous = peer.current
        self._delete_keypair(peer.previous)
        peer.previous, peer.current = new_previous, kp
        self._timers_session_derived(peer, now)
        self._timers_handshake_complete(peer, now)
        got.transmits.extend(self._send_keepalive(peer, now, wall, src))

    def _on_cookie_reply(self, data: bytes, now: float) -> None:
        if len(data) != COOKIE_REPLY_SIZE:
            self._drop("bad_size", len(data))
            return
        entry = self._index.get(_U32.unpack_from(data, 4)[0])
        if entry is None:
            self._drop("unknown_index")
            return
        if not entry[0].cookies.consume_reply(data, now):
            self._drop("bad_cookie_reply")
            return
        self.counters["cookie_replies_received"] += 1

    # ---------------------------------------------------------------- timers
    def tick(self, now: float, wall: float) -> list[Transmit]:
        """Run every per-peer timer that is due (timers.go expired* functions)."""
        out: list[Transmit] = []
        for peer in list(self.peers.values()):
            t = peer.t_retransmit_handshake
            if t is not None and now >= t:
                peer.t_retransmit_handshake = None
                if peer.handshake_attempts > MAX_TIMER_HANDSHAKES:
                    self.counters["handshake_gave_up"] += 1
                    log.debug("wireguard: handshake gave up after %d attempts", MAX_TIMER_HANDSHAKES + 2)
                    peer.t_send_keepalive = None
                    if peer.staged:
                        self.drops["staged_flushed"] += len(peer.staged)
                    peer.staged.clear()
                    if peer.t_zero_key_material is None:
                        peer.t_zero_key_material = now + ZERO_KEYS_AFTER
                        self._arm(peer.t_zero_key_material)
                else:
                    peer.handshake_attempts += 1
                    self.counters["handshake_retransmits"] += 1
                    out += self._send_handshake_initiation(peer, now, wall, True)
            t = peer.t_send_keepalive
            if t is not None and now >= t:
                peer.t_send_keepalive = None
                out += self._send_keepalive(peer, now, wall, None)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.t_send_keepalive = now + KEEPALIVE_TIMEOUT
                    self._arm(peer.t_send_keepalive)
            t = peer.t_new_handshake
            if t is not None and now >= t:
                peer.t_new_handshake = None
                self.counters["new_handshake_no_reply"] += 1
                out += self._send_handshake_initiation(peer, now, wall, False)
            t = peer.t_zero_key_material
            if t is not None and now >= t:
                peer.t_zero_key_material = None
                self.counters["keys_zeroed"] += 1
                self._zero_and_flush_all(peer)
            t = peer.t_persistent_keepalive
            if t is not None and now >= t:
                peer.t_persistent_keepalive = None
                if peer.persistent_keepalive:
                    out += self._send_keepalive(peer, now, wall, None)
        return out

    def next_deadline(self) -> float | None:
        """The earliest pending timer of any peer, or None (a walk over every peer: the
        driver calls it after `tick`, and between ticks watches the cheap `soonest`)."""
        best: float | None = None
        for p in self.peers.values():
            for t in (p.t_retransmit_handshake, p.t_send_keepalive, p.t_new_handshake, p.t_zero_key_material,
                      p.t_persistent_keepalive):
                if t is not None and (best is None or t < best):
                    best = t
        self.soonest = math.inf if best is None else best
        return best

    def _arm(self, t: float) -> None:
        """A timer was set: keep `soonest` a lower bound of every pending timer."""
        if t < self.soonest:
            self.soonest = t

    # ------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, Any]:
        return {
            "peers": len(self.peers),
            "indices": len(self._index),
            "under_load_entered": self._load.entered,
            "ratelimited_sources": len(self._ratelimiter),
            "drops": dict(self.drops),
            "counters": dict(self.counters),
            "rx_packets": sum(p.rx_packets for p in self.peers.values()),
            "tx_packets": sum(p.tx_packets for p in self.peers.values()),
            "rx_bytes": sum(p.rx_bytes for p in self.peers.values()),
            "tx_bytes": sum(p.tx_bytes for p in self.peers.values()),
        }

    def peer_statistics(self, public: bytes) -> dict[str, Any]:
        p = self.peers.get(public)
        if p is None:
            return {}
        return {"handshakes": p.handshakes, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
                "rx_packets": p.rx_packets, "tx_packets": p.tx_packets, "session": p.current is not None,
                "queued": len(p.staged), "last_handshake": p.last_handshake,
                "handshake_attempts": p.handshake_attempts, "timers": p.timers()}


_PLACEHOLDER = InitiationState(0, b"", b"", b"")  # reserves an index while a message is built
