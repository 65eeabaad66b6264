"""The DERP client as a sans-IO state machine.

Rules of this file: everything that decides what a DERP client says and when
lives here; nothing here awaits, opens a socket or reads the clock. The driver
(``driver.py``) calls ``receive_data(data, now)`` with bytes from the server
and gets events back, and sends whatever ``data_to_send()`` returns.

Login (src: tailscale/tailscale derp/derp_client.go, recvServerKey,
sendClientKey, parseServerInfo; derpserver/derpserver.go, accept):

1. the server sends ServerKey: check the magic, keep its public key;
2. we send ClientInfo = our **long-term node public key** ‖ NaCl box sealed
   with the node private key to the server key (random nonce) of
   ``{"version":2,"CanAckPings":true}``. The key in front is our DERP address;
3. the server sends ServerInfo, sealed to us: the link is up. We then say
   NotePreferred (01 on the home region).

Steady state: RecvPacket, KeepAlive, PeerGone, PeerPresent, Ping (answered
with a Pong carrying the same 8 bytes), Pong, Health, Restarting. Frames a
client never receives are skipped and counted; so are unknown frame types
(the server does the same, derpserver.go handleUnknownFrame). A frame that is
oversized or malformed raises RemoteProtocolError: the driver closes that
connection (only that one) and reconnects.

Liveness: the server sends KeepAlive every 60 s + 0-5 s jitter
(derpserver.go sendLoop, ``derp.KeepAlive + rand.N(5s)``) and nothing is ever
required of the client. Two missed keepalives, i.e. 2 × 65 s = 130 s without
any frame, and the link is dead (Go's own client uses a 120 s read deadline,
derp_client.go Recv; netcheck treats 2 × KeepAlive as the limit).
"""

from __future__ import annotations

import enum
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from trionet.derp import frames
from trionet.derp.frames import FrameType
from trionet.errors import LocalProtocolError, RemoteProtocolError, TransportError

KEEPALIVE_INTERVAL: Final = 60.0  # derp.KeepAlive
KEEPALIVE_JITTER: Final = 5.0  # derpserver.go: rand.N(5 * time.Second)
DEAD_AFTER: Final = 2 * (KEEPALIVE_INTERVAL + KEEPALIVE_JITTER)  # 130 s: two missed keepalives
HANDSHAKE_TIMEOUT: Final = 15.0  # the server itself gives ClientInfo 10 s (derpserver.go accept)
CLIENT_INFO: Final = {"version": frames.PROTOCOL_VERSION, "CanAckPings": True}


class DerpProtocolError(RemoteProtocolError):
    """Garbage from the server; ``events`` holds what the frames before it produced."""

    def __init__(self, message: str, events: list[Event]) -> None:
        super().__init__(message)
        self.events = events


class State(enum.Enum):
    AWAIT_SERVER_KEY = "await-server-key"
    AWAIT_SERVER_INFO = "await-server-info"
    CONNECTED = "connected"
    CLOSED = "closed"


# ---------------------------------------------------------------- events out


@dataclass(frozen=True, slots=True)
class Connected:
    """ServerInfo opened: the link is up."""

    server_public: bytes
    server_info: dict[str, Any]
    connected: bool = True


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Emitted by the driver (never by the state machine) when a link ends."""

    reason: str
    connected: bool = False


class Packet(NamedTuple):
    """A packet relayed to us (a NamedTuple: the hot path makes one per packet)."""

    src: bytes  # node public key of the sender
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: bytes
    reason: int  # frames.PeerGoneReason


@dataclass(frozen=True, slots=True)
class PeerPresent:
    peer: bytes
    addr: tuple[str, int] | None
    flags: int


@dataclass(frozen=True, slots=True)
class Health:
    problem: str  # "" = healthy again


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in: float  # seconds
    try_for: float  # seconds


@dataclass(frozen=True, slots=True)
class PongReceived:
    data: bytes
    rtt: float | None  # seconds, when the Pong answers one of our pings


Event = Connected | Disconnected | Packet | PeerGone | PeerPresent | Health | Restarting | PongReceived


# Which frame types are legal in which state; anything else in CONNECTED is
# skipped (counted as "unexpected"), anything else before it is an error.
EXPECTED: Final[dict[State, frozenset[int]]] = {
    State.AWAIT_SERVER_KEY: frozenset({FrameType.SERVER_KEY}),
    State.AWAIT_SERVER_INFO: frozenset({FrameType.SERVER_INFO}),
    State.CONNECTED: frozenset(
        {
            FrameType.RECV_PACKET,
            FrameType.KEEP_ALIVE,
            FrameType.PEER_GONE,
            FrameType.PEER_PRESENT,
            FrameType.PING,
            FrameType.PONG,
            FrameType.HEALTH,
            FrameType.RESTARTING,
        }
    ),
    State.CLOSED: frozenset(),
}

MAX_OUTGOING_PINGS: Final = 16
RECV_PACKET: Final = int(FrameType.RECV_PACKET)
KEY_LEN: Final = frames.KEY_LEN


class DerpClient:
    """One DERP connection's protocol state; make a new one per connection."""

    def __init__(
        self,
        node_private: bytes,
        *,
        preferred: bool = False,
        now: float = 0.0,
        can_ack_pings: bool = True,
        nonce: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(node_private) != frames.KEY_LEN:
            raise LocalProtocolError("the node private key must be 32 raw bytes")
        self._private = PrivateKey(node_private)
        self.node_public: bytes = bytes(self._private.public_key)
        self.preferred = preferred
        self.can_ack_pings = can_ack_pings
        self._nonce = nonce
        self.state = State.AWAIT_SERVER_KEY
        self.server_public: bytes | None = None
        self.server_info: dict[str, Any] = {}
        self._box: Box | None = None
        self._parser = frames.FrameParser()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._held: list[bytes] = []  # frames queued before ClientInfo went out
        self._started = now
        self.last_received = now
        self._pings: dict[bytes, float] = {}
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------ input side
    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Bytes from the server in, events out.

        Garbage raises DerpProtocolError (a RemoteProtocolError) carrying the
        events of the frames that came before it; the client is then closed.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("receive_data on a closed DERP client")
        if not data:
            return []
        self.stats["bytes_in"] += len(data)
        self.last_received = now
        parser = self._parser
        parser.feed(data)
        events: list[Event] = []
        next_frame = parser.next_frame
        stats = self.stats
        packets = 0
        try:
            while (frame := next_frame()) is not None:
                ftype, payload = frame
                if ftype == RECV_PACKET and self.state is State.CONNECTED:  # the hot path, inline
                    if len(payload) < KEY_LEN:
                        raise RemoteProtocolError(f"short DERP RecvPacket frame: {len(payload)} bytes")
                    events.append(Packet(payload[:KEY_LEN], payload[KEY_LEN:]))
                    packets += 1
                else:
                    stats["frames_in"] += 1
                    self._handle(ftype, payload, now, events)
        except RemoteProtocolError as exc:
            self.state = State.CLOSED
            stats["protocol_errors"] += 1
            raise DerpProtocolError(str(exc), events) from exc
        finally:
            if packets:
                stats["packets_in"] += packets
                stats["frames_in"] += packets
        return events

    def _handle(self, ftype: int, payload: bytes, now: float, events: list[Event]) -> None:
        state = self.state
        if ftype not in EXPECTED[state]:
            if ftype not in frames.KNOWN_FRAME_TYPES:
                self.stats["unknown_frames"] += 1
                return
            if state is State.CONNECTED:
                self.stats["unexpected_frames"] += 1
                return
            raise RemoteProtocolError(f"DERP frame {FrameType(ftype).name} while in state {state.value}")
        if ftype == FrameType.SERVER_KEY:
            self._on_server_key(payload)
        elif ftype == FrameType.SERVER_INFO:
            events.append(self._on_server_info(payload))
        elif ftype == FrameType.KEEP_ALIVE:
            self.stats["keepalives_in"] += 1
        elif ftype == FrameType.PING:
            data = frames.parse_ping(payload)
            self.stats["pings_in"] += 1
            if self.can_ack_pings:
                self._queue(frames.build_pong(data))
        elif ftype == FrameType.PONG:
            data = frames.parse_ping(payload)
            sent = self._pings.pop(data, None)
            self.stats["pongs_in"] += 1
            events.append(PongReceived(data, None if sent is None else now - sent))
        elif ftype == FrameType.PEER_GONE:
            peer, reason = frames.parse_peer_gone(payload)
            events.append(PeerGone(peer, reason))
        elif ftype == FrameType.PEER_PRESENT:
            peer, addr, flags = frames.parse_peer_present(payload)
            events.append(PeerPresent(peer, addr, flags))
        elif ftype == FrameType.HEALTH:
            events.append(Health(frames.parse_health(payload)))
        elif ftype == FrameType.RESTARTING:
            reconnect_ms, try_ms = frames.parse_restarting(payload)
            events.append(Restarting(reconnect_ms / 1000.0, try_ms / 1000.0))

    def _on_server_key(self, payload: bytes) -> None:
        server_public = frames.parse_server_key(payload)
        self.server_public = server_public
        self._box = Box(self._private, PublicKey(server_public))
        info = json.dumps(
            {"version": frames.PROTOCOL_VERSION, "CanAckPings": self.can_ack_pings},
            separators=(",", ":"),
        ).encode()
        sealed = bytes(self._box.encrypt(info, self._nonce(frames.NONCE_LEN)))
        self.state = State.AWAIT_SERVER_INFO
        held, self._held = self._held, []
        self._queue(frames.build_client_info(self.node_public, sealed))
        self._out.extend(held)  # already counted in _out_bytes

    def _on_server_info(self, payload: bytes) -> Connected:
        if len(payload) < frames.NONCE_LEN + 16:
            raise RemoteProtocolError("short DERP ServerInfo frame")
        if len(payload) > frames.NONCE_LEN + frames.MAX_INFO_LEN:
            raise RemoteProtocolError("long DERP ServerInfo frame")
        assert self._box is not None and self.server_public is not None
        try:
            plain = bytes(self._box.decrypt(payload))
        except CryptoError as exc:
            raise RemoteProtocolError("DERP ServerInfo does not open with the server key") from exc
        try:
            info = json.loads(plain) if plain.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"DERP ServerInfo is not JSON: {exc}") from exc
        if not isinstance(info, dict):
            raise RemoteProtocolError("DERP ServerInfo is not a JSON object")
        self.server_info = info
        self.state = State.CONNECTED
        self._queue(frames.build_note_preferred(self.preferred))
        return Connected(self.server_public, info)

    # ----------------------------------------------------------- output side
    def _queue(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)

    def send_packet(self, dst: bytes, data: bytes | bytearray | memoryview) -> None:
        """Queue one packet (≤ 64 KiB) to the peer with node key ``dst``."""
        frame = frames.build_send_packet(dst, data)
        self.stats["packets_out"] += 1
        if self.state is State.AWAIT_SERVER_KEY:
            self._held.append(frame)
            self._out_bytes += len(frame)
            return
        if self.state is State.CLOSED:
            raise LocalProtocolError("send_packet on a closed DERP client")
        self._out.append(frame)
        self._out_bytes += len(frame)

    def note_preferred(self, preferred: bool) -> None:
        """Tell the server whether this is our home region (sent now if connected)."""
        changed = preferred != self.preferred
        self.preferred = preferred
        if changed and self.state is State.CONNECTED:
            self._queue(frames.build_note_preferred(preferred))

    def send_ping(self, now: float) -> bytes:
        """Queue a Ping to the server; its Pong comes back as PongReceived with an RTT."""
        if self.state is not State.CONNECTED:
            raise LocalProtocolError("send_ping before the DERP link is up")
        data = self._nonce(frames.PING_LEN)
        if len(self._pings) >= MAX_OUTGOING_PINGS:
            self._pings.pop(next(iter(self._pings)))
        self._pings[data] = now
        self.stats["pings_out"] += 1
        self._queue(frames.build_ping(data))
        return data

    def data_to_send(self) -> bytes:
        """Everything queued for the server, in order; empties the queue."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes -= len(out)
        self.stats["bytes_out"] += len(out)
        return out

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet taken by ``data_to_send`` (held frames included)."""
        return self._out_bytes

    # ----------------------------------------------------------------- time
    def next_deadline(self) -> float:
        """When ``check_timers`` must next run."""
        if self.state is State.CONNECTED:
            return self.last_received + DEAD_AFTER
        return self._started + HANDSHAKE_TIMEOUT

    def check_timers(self, now: float) -> None:
        """Raise TransportError if the link is dead (silence) or the login stalled."""
        if self.state is State.CLOSED:
            return
        if now < self.next_deadline():
            return
        connected = self.state is State.CONNECTED
        self.state = State.CLOSED
        self.stats["timeouts"] += 1
        if connected:
            raise TransportError(f"DERP server silent for {now - self.last_received:.0f} s")
        raise TransportError(f"DERP login did not finish within {HANDSHAKE_TIMEOUT:.0f} s")

    def close(self) -> None:
        self.state = State.CLOSED

    def statistics(self) -> dict[str, Any]:
        return {"state": self.state.value, **self.stats}
