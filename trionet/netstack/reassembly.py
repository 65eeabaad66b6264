"""TCP receive-side reassembly: out-of-order data held until the hole before it fills.

Here: the pieces a receiver keeps above RCV.NXT (``Reassembly``), their merged
ranges, which become the SACK blocks it reports (RFC 2018), and the hand-over of
pieces to the receive buffer once RCV.NXT reaches them. Not here: deciding whether a
segment is acceptable or trimming it to the window (``tcp.TcpConnection._on_data``),
and the sender's view of SACK blocks (``scoreboard``). Sans-IO and clock-free.

Out-of-order data is kept as disjoint pieces inside the receive window: a byte that
arrives twice is stored once and the total never exceeds the window (Linux
tcp_data_queue_ofo trims a new skb against its neighbours and drops those it
covers).
"""

from __future__ import annotations

import bisect

from .rbuf import RecvBuffer

#: A piece costs ~100 bytes beyond its data, so a peer sending one-byte segments with
#: gaps between them meets this cap; past it the highest piece goes (Linux
#: tcp_prune_ofo_queue prunes from the top too), or the new one if it is the highest.
OOO_MAX_PIECES = 1024
#: A piece that continues the one before it is appended to it up to this size, so
#: the usual burst after one loss is a few pieces, not one per segment.
OOO_COALESCE = 64 << 10
#: and the piece after a new one is joined to it up to this size (a copy: kept small)
OOO_JOIN_NEXT = 2048
#: out-of-order arrivals remembered, newest first, to order the SACK blocks
RECENT_MAX = 8
_INF = 1 << 62  # above every sequence number: a bisect key's second half


class Reassembly:
    """One connection's out-of-order pieces (sequence numbers unwrapped).

    ``pieces`` maps a piece's first sequence number to its bytes; ``starts`` is
    their keys in order; ``blocks`` the merged ``[left, right)`` ranges they cover
    (pieces that touch form one block); ``recent`` the sequence numbers of the
    latest arrivals, newest first; ``nbytes`` the bytes held. ``stats`` is the
    connection's counter dict (``ooo_dropped``, ``ooo_pruned`` go there)."""

    __slots__ = ("blocks", "nbytes", "pieces", "recent", "starts", "stats")  # one per connection: small

    def __init__(self, stats: dict[str, int]) -> None:
        self.pieces: dict[int, bytearray] = {}
        self.starts: list[int] = []  # sorted
        self.blocks: list[list[int]] = []  # merged [left, right) of the pieces, sorted
        self.recent: list[int] = []
        self.nbytes = 0
        self.stats = stats

    def add(self, seq: int, payload: memoryview) -> None:
        """Keep the bytes of an out-of-order segment that no piece holds yet (the
        caller has cut the segment to the receive window and above RCV.NXT)."""
        end = seq + len(payload)
        blocks = self.blocks
        gaps: list[tuple[int, int]] = []
        i = bisect.bisect_right(blocks, [seq, _INF])  # the first block that starts above seq
        x = seq
        if i and blocks[i - 1][1] > x:
            x = blocks[i - 1][1]
        n = len(blocks)
        while x < end:
            if i < n and blocks[i][0] < end:
                left, right = blocks[i]
                if left > x:
                    gaps.append((x, left))
                x = right
                i += 1
            else:
                gaps.append((x, end))
                break
        for start, stop in gaps:
            if self._put(start, payload[start - seq:stop - seq]):
                self._add_block(start, stop)
            else:
                self.stats["ooo_dropped"] += 1
        recent = self.recent
        recent.insert(0, seq)
        del recent[RECENT_MAX:]

    def _put(self, start: int, data: memoryview) -> bool:
        """Store ``data`` (bytes no piece holds) from ``start``: appended to the piece
        that ends there if that is still small, else as a piece of its own; a small
        piece that starts where it ends is joined to it (segments that overlap at
        random would otherwise leave a piece per gap they filled)."""
        starts = self.starts
        pieces = self.pieces
        end = start + len(data)
        j = bisect.bisect_left(starts, start)
        nxt = pieces.get(end) if j < len(starts) and starts[j] == end else None
        if nxt is not None and len(nxt) > OOO_JOIN_NEXT:
            nxt = None  # (joining copies it: only small ones)
        if j:
            prev = pieces[starts[j - 1]]
            if starts[j - 1] + len(prev) == start and len(prev) < OOO_COALESCE:
                prev += data
                if nxt is not None:
                    prev += nxt
                    del pieces[end], starts[j]
                self.nbytes += len(data)
                return True
        if nxt is not None:  # the next piece now starts here
            piece = bytearray(data)
            piece += nxt
            del pieces[end]
            starts[j] = start
            pieces[start] = piece
            self.nbytes += len(data)
            return True
        if len(starts) >= OOO_MAX_PIECES:
            if j == len(starts):
                return False  # the highest: nothing above it to make room
            self._prune_top()
        starts.insert(j, start)
        pieces[start] = bytearray(data)
        self.nbytes += len(data)
        return True

    def _prune_top(self) -> None:
        """Forget the highest piece, SACKed or not (RFC 2018 lets a receiver renege)."""
        top = self.starts.pop()
        self.nbytes -= len(self.pieces.pop(top))
        blk = self.blocks[-1]  # the piece is the end of the top block
        if blk[0] >= top:
            self.blocks.pop()
        else:
            blk[1] = top
        self.stats["ooo_pruned"] += 1

    def _add_block(self, left: int, right: int) -> None:
        blocks = self.blocks
        i = bisect.bisect_left(blocks, [left])
        if i > 0 and blocks[i - 1][1] >= left:
            i -= 1
            b = blocks[i]
            if right > b[1]:
                b[1] = right
        else:
            b = [left, right]
            blocks.insert(i, b)
        while i + 1 < len(blocks) and blocks[i + 1][0] <= b[1]:
            if blocks[i + 1][1] > b[1]:
                b[1] = blocks[i + 1][1]
            del blocks[i + 1]

    def take_ready(self, rcv_nxt: int, rbuf: RecvBuffer) -> int:
        """Hand the pieces that ``rcv_nxt`` reached to ``rbuf`` (each piece whole, as
        nobody else holds it); returns the new RCV.NXT."""
        starts = self.starts
        pieces = self.pieces
        i = 0
        while i < len(starts) and starts[i] <= rcv_nxt:
            s = starts[i]
            d = pieces.pop(s)
            self.nbytes -= len(d)
            end = s + len(d)
            if end > rcv_nxt:
                rbuf.append(d if s == rcv_nxt else memoryview(d)[rcv_nxt - s:])
                rcv_nxt = end
            i += 1
        del starts[:i]
        blocks = self.blocks
        j = 0
        while j < len(blocks) and blocks[j][0] <= rcv_nxt:
            j += 1
        del blocks[:j]
        return rcv_nxt

    def sack_blocks(self, limit: int) -> tuple[tuple[int, int], ...]:
        """Up to ``limit`` blocks: the one holding the latest out-of-order segment
        first, then those of the arrivals before it (RFC 2018), then the highest
        others."""
        blocks = self.blocks
        out: list[tuple[int, int]] = []
        for s in self.recent:
            i = bisect.bisect_right(blocks, [s, _INF]) - 1
            if i >= 0 and blocks[i][1] > s:
                b = (blocks[i][0], blocks[i][1])
                if b not in out:
                    out.append(b)
                    if len(out) == limit:
                        return tuple(out)
        for blk in reversed(blocks):
            b = (blk[0], blk[1])
            if b not in out:
                out.append(b)
                if len(out) == limit:
                    break
        return tuple(out)

    def clear(self) -> None:
        self.pieces.clear()
        self.starts.clear()
        self.blocks.clear()
        self.recent.clear()
        self.nbytes = 0


__all__ = ["OOO_COALESCE", "OOO_JOIN_NEXT", "OOO_MAX_PIECES", "Reassembly"]
