"""The TCP sender's scoreboard: what it knows about each range of its outstanding data.

Here, two bounded data structures and nothing else: ``SackScoreboard``, the ranges
above SND.UNA the peer said it holds (RFC 2018 SACK blocks, merged; gVisor's
sack_scoreboard.go), and ``Retransmissions``, the ranges resent in the current
loss recovery and still in flight. Not here: deciding what is lost or when to
resend (``recovery``), the receiver's out-of-order data (``reassembly``).
Sequence numbers are unwrapped ints; no clock, no I/O.
"""

from __future__ import annotations

import bisect

from .wire.tcp import MASK

#: The scoreboard holds at most this many disjoint blocks (gVisor's
#: sack_scoreboard.go maxSACKBlocks is 100 too). What does not fit is forgotten,
#: which costs at most a retransmission of bytes the peer already holds; the bound
#: keeps the cost of one ACK flat however many blocks a peer sent before (Linux
#: CVE-2019-11478: crafted SACKs fragmenting the retransmit queue).
SACK_SCOREBOARD_MAX = 100
#: Retransmissions remembered in one recovery (their ranges are disjoint, one per
#: hole or so: at most about one more than the scoreboard's blocks, unless a peer
#: keeps moving its holes).
RTX_MAX = 2 * SACK_SCOREBOARD_MAX
_INF = 1 << 62  # above every sequence number: a bisect key's second half


class SackScoreboard:
    """``blocks``: disjoint ``(left, right)`` ranges, sorted, all above SND.UNA;
    ``nbytes``: their total. ``stats`` is the connection's counter dict
    (``sack_blocks_ignored`` goes there)."""

    __slots__ = ("blocks", "nbytes", "stats")  # one per connection: small

    def __init__(self, stats: dict[str, int]) -> None:
        self.blocks: list[tuple[int, int]] = []
        self.nbytes = 0
        self.stats = stats

    def note(self, blocks: tuple[tuple[int, int], ...], base: int, floor: int, snd_max: int,
             retransmitted: Retransmissions) -> None:
        """Merge an ACK's blocks (wire sequence numbers, unwrapped around ``base``):
        a binary search and the blocks a new one swallows per block, never a walk over
        the rest (gVisor's scoreboard is a btree for the same reason); full, a block
        that would be a new entry is forgotten. Blocks at or below ``floor``, past
        ``snd_max`` or empty are ignored (D-SACK, stale or bogus). What is newly
        SACKed is cut out of ``retransmitted``: no retransmission in it is in flight."""
        sb = self.blocks
        for lw, rw in blocks:
            d = (lw - base) & MASK
            left = base + (d - (1 << 32) if d & 0x80000000 else d)
            right = left + ((rw - lw) & MASK)
            if right <= floor or right > snd_max or left >= right:
                continue
            i = bisect.bisect_left(sb, (left,))
            if i and sb[i - 1][1] >= left:  # joins the block before
                i -= 1
                left = sb[i][0]
            j = i
            swallowed = 0
            n = len(sb)
            while j < n and sb[j][0] <= right:
                r = sb[j][1]
                if r > right:
                    right = r
                swallowed += r - sb[j][0]
                j += 1
            if j == i and n >= SACK_SCOREBOARD_MAX:
                self.stats["sack_blocks_ignored"] += 1
                continue
            grown = right - left - swallowed
            if grown:
                sb[i:j] = ((left, right),)
                self.nbytes += grown
                if retransmitted.entries:
                    retransmitted.cut(left, right)

    def acked_through(self, ack: int) -> bool:
        """A cumulative ACK reached ``ack``: the blocks below it leave (each once: no
        walk over the rest). False, and nothing changed, if a block reaches past it:
        the peer ACKs up to data it had SACKed, so it dropped what it held out of
        order (RFC 2018 reneging) and the caller must forget the board."""
        sb = self.blocks
        k = bisect.bisect_right(sb, (ack, _INF))  # the blocks that start at or below ack
        if k and sb[k - 1][1] > ack:
            return False
        self.nbytes -= sum([r - left for left, r in sb[:k]])
        del sb[:k]
        return True

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0


class Retransmissions:
    """Retransmissions still in flight in this recovery: ``entries`` of ``[start,
    end, mark]`` (``mark``: SND.MAX when it was sent), sorted and disjoint. SACKs of
    data sent after one of them say whether it was lost in turn. What is SACKed is
    cut out of them (``cut``), so their bytes (``nbytes``), and the oldest mark with
    its count (``min_mark``, ``min_count``), are kept as they change: an ACK never
    walks the list."""

    __slots__ = ("entries", "min_count", "min_mark", "nbytes")

    def __init__(self) -> None:
        self.entries: list[list[int]] = []
        self.nbytes = 0
        self.min_mark = _INF
        self.min_count = 0

    def add(self, start: int, n: int, mark: int) -> None:
        """``n`` bytes from ``start`` (a hole: none of it SACKed or already here) were
        sent again when SND.MAX was ``mark``."""
        rtx = self.entries
        i = bisect.bisect_left(rtx, [start])
        self.nbytes += n
        if i and rtx[i - 1][1] == start:  # extends a run of retransmissions
            e = rtx[i - 1]
            old, e[1], e[2] = e[2], start + n, mark
            if old != mark:
                self._mark_added(mark)
                self._mark_removed(old)
        else:
            rtx.insert(i, [start, start + n, mark])
            self._mark_added(mark)
            if len(rtx) > RTX_MAX:
                self._drop_lowest()

    def trim(self, una: int) -> None:
        """Forget what SND.UNA passed (from the front: each leaves once)."""
        rtx = self.entries
        k = 0
        n = len(rtx)
        while k < n and rtx[k][1] <= una:
            self.nbytes -= rtx[k][1] - rtx[k][0]
            k += 1
        gone = rtx[:k]
        del rtx[:k]
        if rtx and rtx[0][0] < una:
            self.nbytes -= una - rtx[0][0]
            rtx[0][0] = una
        for e in gone:
            self._mark_removed(e[2])

    def cut(self, left: int, right: int) -> None:
        """[left, right) is SACKed: no retransmission in it is in flight any more. Only
        the entries that overlap it are looked at (and each leaves or shrinks)."""
        rtx = self.entries
        i = bisect.bisect_right(rtx, [left, _INF])
        if i and rtx[i - 1][1] > left:
            i -= 1
        j = i
        n = len(rtx)
        if j >= n or rtx[j][0] >= right:
            return
        kept: list[list[int]] = []
        changes: list[tuple[int, int]] = []  # (mark, entries it has now less the one it had)
        while j < n and rtx[j][0] < right:
            s, e, m = rtx[j]
            pieces = 0
            if s < left:
                kept.append([s, left, m])
                pieces += 1
            if e > right:
                kept.append([right, e, m])
                pieces += 1
            self.nbytes -= min(e, right) - max(s, left)
            if pieces != 1:
                changes.append((m, pieces - 1))
            j += 1
        rtx[i:j] = kept
        for m, delta in changes:
            if delta > 0:
                self._mark_added(m)
            else:
                self._mark_removed(m)
        if len(rtx) > RTX_MAX:
            self._drop_lowest()

    def remove_older(self, limit: int) -> tuple[int, int]:
        """Take out the entries whose mark is below ``limit`` (sent before data that has
        since been SACKed: lost again). Returns how many went and the lowest start
        among them (``_INF`` if none)."""
        if self.min_mark >= limit:
            return 0, _INF  # none is that old
        keep = []
        count = 0
        low = _INF
        for e in self.entries:
            if e[2] < limit:
                count += 1
                self.nbytes -= e[1] - e[0]
                if e[0] < low:
                    low = e[0]
            else:
                keep.append(e)
        self.entries = keep
        self._recount()
        return count, low

    def reset(self) -> None:
        self.entries = []
        self.nbytes = 0
        self.min_mark = _INF
        self.min_count = 0

    def _drop_lowest(self) -> None:
        # below the recovery's search hint it is not sent again, only counted out of
        # the pipe (a peer that keeps moving its holes gets here)
        e = self.entries.pop(0)
        self.nbytes -= e[1] - e[0]
        self._mark_removed(e[2])

    def _mark_added(self, mark: int) -> None:
        if mark < self.min_mark:
            self.min_mark = mark
            self.min_count = 1
        elif mark == self.min_mark:
            self.min_count += 1

    def _mark_removed(self, mark: int) -> None:
        if mark == self.min_mark:
            self.min_count -= 1
            if not self.min_count:
                self._recount()  # (only when the last of the oldest goes)

    def _recount(self) -> None:
        marks = [e[2] for e in self.entries]
        self.min_mark = min(marks, default=_INF)
        self.min_count = marks.count(self.min_mark)


__all__ = ["RTX_MAX", "SACK_SCOREBOARD_MAX", "Retransmissions", "SackScoreboard"]
