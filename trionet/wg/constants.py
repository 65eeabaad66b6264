"""WireGuard constants (src: wireguard-go device/constants.go, noise-protocol.go,
replay/replay.go, ratelimiter/ratelimiter.go, device/cookie.go)."""

from __future__ import annotations

from typing import Final

# Message types and sizes (noise-protocol.go).
MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3
MSG_TRANSPORT: Final = 4
INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64
TRANSPORT_HEADER_SIZE: Final = 16
TRANSPORT_MIN_SIZE: Final = 32  # header + Poly1305 tag: an empty (keepalive) message
MAX_SEGMENT_SIZE: Final = 65535  # wireguard-go MaxSegmentSize: larger datagrams are dropped
MAX_CONTENT_SIZE: Final = MAX_SEGMENT_SIZE - TRANSPORT_MIN_SIZE

# Timers (constants.go).
REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
REKEY_TIMEOUT_JITTER_MAX_MS: Final = 334  # rand.Int31n(334): 0..333 ms
REJECT_AFTER_TIME: Final = 180.0
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0
HANDSHAKE_INITIATION_RATE: Final = 1.0 / 50  # 20 ms between accepted initiations per peer
# Ours, not wireguard-go's: an unanswered initiation at least this old is resent at
# once when the peer shows it now knows us (WgDevice.peer_heard).
EARLY_RETRY_AFTER: Final = 0.1
ZERO_KEYS_AFTER: Final = 3 * REJECT_AFTER_TIME  # 540 s after the last session was derived
RECEIVING_REKEY_AFTER: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s

# Load (constants.go: QueueHandshakeSize, UnderLoadAfterTime) and staging (QueueStagedSize).
QUEUE_HANDSHAKE_SIZE: Final = 1024
UNDER_LOAD_BACKLOG: Final = QUEUE_HANDSHAKE_SIZE // 8
UNDER_LOAD_AFTER_TIME: Final = 1.0
# Ours: trionet has no handshake queue (a datagram is handled in the task that read it), so
# trionet.wg.load models one that drains at this many handshake messages a second, the rate
# of full handshakes we grant the reader task before cookies take over (see load.py).
HANDSHAKE_SERVICE_RATE: Final = 256.0
QUEUE_STAGED_SIZE: Final = 128

# Handshake rate limiter under load (ratelimiter/ratelimiter.go): 20/s, burst 5, per source IP.
RATELIMIT_PACKETS_PER_SECOND: Final = 20
RATELIMIT_BURST: Final = 5
# Ours (wireguard-go's table is unbounded; the kernel's ratelimiter.c caps it and refuses new
# sources when full): at most this many sources are tracked at once.
RATELIMIT_MAX_SOURCES: Final = 16384

# Anti-replay (replay/replay.go): a ring of 128 blocks of 64 bits, one block kept for the current.
REPLAY_BLOCK_BITS: Final = 64
REPLAY_RING_BLOCKS: Final = 128
REPLAY_WINDOW_SIZE: Final = (REPLAY_RING_BLOCKS - 1) * REPLAY_BLOCK_BITS  # 8128
