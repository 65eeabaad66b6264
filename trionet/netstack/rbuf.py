"""A TCP receive buffer that keeps the payloads themselves, not a copy of them.

A bytearray receive buffer copies every byte in, then again out, and reallocates as
it grows and shrinks (a reader that empties it makes it start over small). Here a
payload of ``VIEW_MIN`` bytes or more is kept as a view of the ``bytes`` packet it
came in (a decrypted WireGuard packet is a fresh ``bytes`` nobody writes to), so a
byte is copied once: into what ``read`` returns. Smaller payloads are copied into a
bytearray chunk, so a peer sending tiny segments cannot make the per-chunk overhead
(a view and the packet headers it keeps alive) large.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

#: Payloads at least this long are kept by reference. What each such chunk costs
#: beyond its data (the view, and the packet's headers: up to 120 bytes) stays
#: within a third of the data; full-sized segments (1,200 bytes and more) qualify.
VIEW_MIN = 1024
_OWNER, _BYTES_ONLY = attrgetter("obj"), {bytes}  # views of bytes: memory nobody can write


class RecvBuffer:
    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[memoryview | bytes | bytearray] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __bytes__(self) -> bytes:
        return b"".join(self._chunks)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self._size += n
        chunks = self._chunks
        if n >= VIEW_MIN:
            if type(data) is bytes or type(data) is bytearray:  # a bytearray is handed over:
                chunks.append(data)  # the caller keeps no reference (out-of-order pieces)
                return
            if type(data) is memoryview and type(data.obj) is bytes:
                chunks.append(data)
                return
        if chunks:
            last = chunks[-1]
            if type(last) is bytearray and len(last) < 4 * VIEW_MIN:  # a few KiB: cheap to grow
                last += data
                return
        chunks.append(bytearray(data))

    def extend(self, payloads: list[memoryview], nbytes: int) -> None:
        """Append views, ``nbytes`` in all (the receive fast path's runs)."""
        chunks = self._chunks
        if min(map(len, payloads)) >= VIEW_MIN and set(map(type, map(_OWNER, payloads))) == _BYTES_ONLY:
            chunks.extend(payloads)  # full-sized segments of immutable packets: the usual run
            self._size += nbytes
            return
        for view in payloads:
            if type(view.obj) is bytes and len(view) >= VIEW_MIN:
                chunks.append(view)
            else:
                self._size -= len(view)  # append() counts it again
                self.append(view)
        self._size += nbytes

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` from the front, removed."""
        chunks = self._chunks
        if not self._size:
            return b""
        if max_bytes >= self._size:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._size = 0
            return data if type(data) is bytes else bytes(data)
        out: list[memoryview | bytes | bytearray] = []
        need = max_bytes
        while need:
            chunk = chunks[0]
            n = len(chunk)
            if n <= need:
                out.append(chunks.popleft())
                need -= n
            elif type(chunk) is bytearray:
                out.append(chunk[:need])
                del chunk[:need]
                need = 0
            else:
                view = memoryview(chunk)
                out.append(view[:need])
                chunks[0] = view[need:]
                need = 0
        self._size -= max_bytes
        return b"".join(out)
