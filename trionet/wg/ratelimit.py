"""Handshake rate limiter used under load: a token bucket per source (sans-IO).

The bucket is wireguard-go's (ratelimiter/ratelimiter.go) and the kernel's
(drivers/net/wireguard/ratelimiter.c): 20 packets a second, a burst of 5,
tokens counted in nanoseconds. The key is whatever names the source; the
device passes one per host (`cookie.source_identity`: an IPv4 address, an
IPv6 /64, a DERP node key), so two hosts never share a bucket.

Bounded: a bucket idle long enough to have refilled (0.25 s) allows exactly
what a new one would, so it is dropped whenever a new source arrives
(wireguard-go instead sweeps every second). Buckets are kept least recently
used first, so that looks only at the oldest ones. With `max_sources` buckets
all still draining, a new source is refused, as the kernel does when its table
is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from trionet.wg.constants import RATELIMIT_BURST, RATELIMIT_MAX_SOURCES, RATELIMIT_PACKETS_PER_SECOND

PACKET_COST = 1_000_000_000 // RATELIMIT_PACKETS_PER_SECOND  # nanoseconds of tokens per packet
MAX_TOKENS = PACKET_COST * RATELIMIT_BURST


class RateLimiter:
    __slots__ = ("_buckets", "max_sources", "refused")

    def __init__(self, max_sources: int = RATELIMIT_MAX_SOURCES) -> None:
        self.max_sources = max_sources
        self._buckets: OrderedDict[Hashable, list[int]] = OrderedDict()  # key -> [tokens, last seen], in ns
        self.refused = 0  # new sources turned away because every bucket was in use

    def allow(self, key: Hashable, now: float) -> bool:
        """Take one packet's tokens from `key`'s bucket; False if it has too few."""
        now_ns = int(now * 1e9)
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            self._collect(now_ns)
            if len(buckets) >= self.max_sources:
                self.refused += 1
                return False
            buckets[key] = [MAX_TOKENS - PACKET_COST, now_ns]
            return True
        buckets.move_to_end(key)
        tokens = entry[0]
        elapsed = now_ns - entry[1]
        if elapsed > 0:  # a clock that stepped back neither adds nor takes tokens
            tokens = min(MAX_TOKENS, tokens + elapsed)
            entry[1] = now_ns
        # >= as the kernel (the full burst at one instant); wireguard-go's > allows one fewer
        if tokens >= PACKET_COST:
            entry[0] = tokens - PACKET_COST
            return True
        entry[0] = tokens
        return False

    def _collect(self, now_ns: int) -> None:
        """Drop the least recently used buckets that have refilled (idle for MAX_TOKENS ns)."""
        buckets = self._buckets
        while buckets:
            key = next(iter(buckets))
            if now_ns - buckets[key][1] < MAX_TOKENS:
                return
            del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
