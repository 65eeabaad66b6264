"""Handshake rate limiter used under load: a token bucket per source address
(src: wireguard-go ratelimiter/ratelimiter.go: 20 packets/s, burst 5)."""

from __future__ import annotations

from collections.abc import Hashable

from trionet.wg.constants import RATELIMIT_BURST, RATELIMIT_GC_INTERVAL, RATELIMIT_PACKETS_PER_SECOND

PACKET_COST = 1.0 / RATELIMIT_PACKETS_PER_SECOND
MAX_TOKENS = PACKET_COST * RATELIMIT_BURST


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, last)
        self._last_gc = 0.0

    def allow(self, key: Hashable, now: float) -> bool:
        if now - self._last_gc >= RATELIMIT_GC_INTERVAL:
            self._last_gc = now
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < RATELIMIT_GC_INTERVAL}
        entry = self._buckets.get(key)
        if entry is None:
            self._buckets[key] = (MAX_TOKENS - PACKET_COST, now)
            return True
        tokens, last = entry
        tokens = min(MAX_TOKENS, tokens + max(0.0, now - last))
        if tokens > PACKET_COST:
            self._buckets[key] = (tokens - PACKET_COST, now)
            return True
        self._buckets[key] = (tokens, now)
        return False

    def __len__(self) -> int:
        return len(self._buckets)
