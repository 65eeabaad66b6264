"""What we refuse from the network: counted by kind, logged without flooding.

Input from the network is untrusted, so every subsystem drops things all the
time. Each drop is counted under its kind (the counts are what `statistics()`
and `status --json` show) and logged at debug level, but only for the 1st,
2nd, 4th, ... 1,024th occurrence of a kind and every 1,024th after that: a
flood of garbage costs a few log lines, not a disk. The limit counts events
rather than seconds, so protocol cores can use it without reading a clock.

An exception that escapes the handling of one packet is a bug in trionet, not
bad input. `internal_error` counts it under ``internal_error.<kind>`` and logs
its traceback once per kind at error level (later ones at debug, rate-limited
like drops); the caller drops the packet and goes on.
"""

from __future__ import annotations

import logging
from collections import Counter

__all__ = ["RejectLog", "should_log"]

_EVERY = 1024


def should_log(count: int) -> bool:
    """True for the counts whose occurrence is logged: powers of two up to 1,024, then every 1,024th."""
    return count & (count - 1) == 0 if count <= _EVERY else count % _EVERY == 0


class RejectLog:
    """Counts rejections (and internal errors) by kind for one subsystem."""

    __slots__ = ("_log", "_what", "counts")

    def __init__(self, log: logging.Logger, what: str, counts: Counter[str] | None = None) -> None:
        self._log = log
        self._what = what  # "magicsock", "derp", ...: the start of each log line
        self.counts: Counter[str] = Counter() if counts is None else counts

    def reject(self, kind: str, detail: object = "", n: int = 1) -> None:
        """Count `n` rejections of `kind`; log at debug if this count is one to log."""
        counts = self.counts
        before = counts[kind]
        counts[kind] = after = before + n
        if self._log.isEnabledFor(logging.DEBUG) and _crosses_logged_count(before, after):
            self._log.debug("%s: dropped (%s, %d so far) %s", self._what, kind, after, detail)

    def internal_error(self, kind: str, exc: BaseException) -> None:
        """An unexpected exception while handling one packet (or batch): count and log it."""
        key = "internal_error." + kind
        counts = self.counts
        counts[key] += 1
        count = counts[key]
        if count == 1:
            self._log.error("%s: internal error handling %s (the packet was dropped; "
                            "further ones are counted as %s)", self._what, kind, key,
                            exc_info=(type(exc), exc, exc.__traceback__))
        elif should_log(count):
            self._log.debug("%s: internal error handling %s (%d so far): %r", self._what, kind, count, exc)

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]


def _crosses_logged_count(before: int, after: int) -> bool:
    """Whether some count in (before, after] is one to log."""
    if before < _EVERY:
        next_logged = 1 << before.bit_length()  # the next power of two above `before`
    else:
        next_logged = (before // _EVERY + 1) * _EVERY
    return next_logged <= after
