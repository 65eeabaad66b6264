"""How long to wait before the next try after consecutive failures, one rule for
every redial (control connection, DERP links): 1, 2, 4 ... seconds, capped at
60, plus up to a second of random jitter so that many clients that failed
together do not come back together.
"""

from __future__ import annotations

import random

__all__ = ["BACKOFF_JITTER", "BACKOFF_MAX", "backoff_delay"]

BACKOFF_MAX = 60.0
BACKOFF_JITTER = 1.0


def backoff_delay(failures: int, rng: random.Random | None = None, *, cap: float = BACKOFF_MAX,
                  jitter: float = BACKOFF_JITTER) -> float:
    """min(2^failures, cap) seconds plus up to `jitter` seconds; `failures` counts the
    consecutive failures before this one (0 for the first retry: about 1 s)."""
    r = rng if rng is not None else random
    return min(2.0 ** min(max(failures, 0), 16), cap) + r.random() * jitter
