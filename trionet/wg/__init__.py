"""WireGuard, sans-IO: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, cookies, sessions, timers.

Nothing in this package awaits, touches a socket or reads a clock. Time comes
in as `now` (monotonic seconds) and `wall` (Unix seconds, only for the TAI64N
timestamp of initiations); the driver sleeps until `next_deadline()` and then
calls `tick()`. Our static key is the Tailscale node key (32 raw bytes).

    dev = WgDevice(static_private: bytes, rng: random.Random | None = None)
    dev.set_peer(public_key: bytes, allowed_ips: Iterable[str | ip network],
                 persistent_keepalive: float | None = None)   # add or update, live
    dev.remove_peer(public_key); dev.reset_sessions(public_key)
    dev.send_ip(packet, now, wall) -> list[Transmit]          # stages while handshaking
    dev.receive(datagram, now, wall, src=None, backlog=0, src_key=None) -> Received
    dev.receive_many(datagrams, now, wall, src=None, backlog=0, into=None, src_key=None) -> Received
        src: the path tag ("udp", (host, port)) / ("derp", region); src_key: the DERP
        source node key (None for UDP). Handshake load is measured inside (load.py).
    dev.tick(now, wall) -> list[Transmit]; dev.next_deadline() -> float | None
    dev.route(ip_address) -> bytes | None; dev.allowed_ips(public_key)
    dev.peer_for_receiver_index(index) -> bytes | None
    dev.statistics() -> dict; dev.peer_statistics(public_key) -> dict
    dev.drops: Counter[str] (by reason); dev.counters: Counter[str]
    dev.under_load(now) -> bool; dev.force_under_load: bool
        (a driver with a real handshake queue may pass backlog=its depth: >= 128 is under load)

    Transmit(peer: bytes, data: bytes, path: Any = None)
        path is the `src` of the datagram being answered (reply there), else None.
        peer is the src_key (b"" from UDP) for a cookie reply to an initiation.
    Received.packets: list[tuple[peer, ip_packet]]; Received.transmits: list[Transmit]

    classify(datagram) -> 0..4 (0: not a well-sized WireGuard message)
    receiver_index(datagram) -> int | None   (types 2, 3, 4; no decryption)

Modules: `constants` (wireguard-go constants.go), `messages` (wire format),
`crypto` (Noise primitives), `handshake` (IKpsk2 as functions), `cookie`
(mac1/mac2, cookie replies), `replay` (8128-counter window), `allowedips`
(longest-prefix match), `ratelimit` (per-source token bucket under load),
`load` (how loaded the handshake path is), `device` (peer table, sessions,
timers, data path).

Bad input never raises: it is dropped, counted in `drops` by reason and
logged at debug, rate-limited (`trionet.rejects.RejectLog`).
"""

from trionet.wg.device import Received, Transmit, WgDevice
from trionet.wg.messages import classify, receiver_index

__all__ = ["Received", "Transmit", "WgDevice", "classify", "receiver_index"]
