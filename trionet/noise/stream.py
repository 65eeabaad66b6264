"""`NoiseStream`: a trio Stream of plaintext over a handshaken byte stream."""

from __future__ import annotations

import trio

from trionet.errors import RemoteProtocolError
from trionet.noise.core import HEADER_LEN, NoiseTransport, parse_frame_header


class NoiseStream(trio.abc.Stream):
    def __init__(self, transport_stream: trio.abc.Stream, noise: NoiseTransport, buffered: bytes = b"") -> None:
        self.stream = transport_stream
        self.noise = noise
        self._buf = bytearray(buffered)
        self._plain = bytearray()
        self._send_lock = trio.StrictFIFOLock()

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            self._buf += data
        return True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._plain:
            if not await self._fill(HEADER_LEN):
                if self._buf:
                    raise RemoteProtocolError("control connection closed mid-frame")
                return b""
            ftype, length = parse_frame_header(bytes(self._buf[:HEADER_LEN]))
            if not await self._fill(HEADER_LEN + length):
                raise RemoteProtocolError("control connection closed mid-frame")
            body = bytes(self._buf[HEADER_LEN:HEADER_LEN + length])
            del self._buf[:HEADER_LEN + length]
            self._plain += self.noise.open(ftype, body)
        n = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.noise.seal(bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
