"""An in-process DERP relay over real TCP (HTTP upgrade) for driver tests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import trio
from nacl.public import Box, PrivateKey, PublicKey

from trionet.derp import frames
from trionet.derp.frames import FrameParser, FrameType


class FakeRelay:
    """Routes SendPacket to RecvPacket by node key, like a one-node DERP region.

    ``script`` hooks let a test misbehave: ``after_login(stream, client_pub)``
    runs once a client is logged in.
    """

    def __init__(self) -> None:
        self.private = PrivateKey.generate()
        self.public = bytes(self.private.public_key)
        self.clients: dict[bytes, trio.SocketStream] = {}
        self.logins: list[bytes] = []
        self.preferred: dict[bytes, bool] = {}
        self.pings: list[bytes] = []
        self.port = 0
        self.status_line = b"HTTP/1.1 101 Switching Protocols"
        self.after_login: Callable[[trio.SocketStream, bytes], object] | None = None
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
        assert buf.startswith(b"GET /derp HTTP/1.1\r\n"), buf
        assert b"\r\nUpgrade: DERP\r\n" in buf
        if not self.status_line.startswith(b"HTTP/1.1 101"):
            await stream.send_all(self.status_line + b"\r\nContent-Length: 4\r\n\r\nnope")
            await stream.aclose()
            return
        # headers and the first frame in ONE write: the client must not over-read or drop it
        head = self.status_line + b"\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n\r\n"
        await stream.send_all(head + frames.build_server_key(self.public))
        parser = FrameParser(max_frame_len=frames.MAX_SEND_FRAME)
        me: bytes | None = None
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                parser.feed(data)
                for ftype, payload in parser.frames():
                    if ftype == FrameType.CLIENT_INFO:
                        me, sealed = frames.parse_client_info(payload)
                        box = Box(self.private, PublicKey(me))
                        info = json.loads(box.decrypt(sealed))
                        assert info == {"version": 2, "CanAckPings": True}
                        self.clients[me] = stream
                        self.logins.append(me)
                        reply = bytes(box.encrypt(b'{"version":2}', os.urandom(24)))
                        await stream.send_all(frames.build_server_info(reply))
                        if self.after_login is not None:
                            result = self.after_login(stream, me)
                            if hasattr(result, "__await__"):
                                await result  # type: ignore[misc]
                    elif ftype == FrameType.SEND_PACKET:
                        dst, pkt = frames.parse_packet(payload, "SendPacket")
                        assert me is not None
                        peer = self.clients.get(dst)
                        if peer is None:
                            await stream.send_all(frames.build_peer_gone(dst, 1))
                        else:
                            await peer.send_all(frames.build_recv_packet(me, pkt))
                    elif ftype == FrameType.NOTE_PREFERRED:
                        assert me is not None
                        self.preferred[me] = frames.parse_note_preferred(payload)
                    elif ftype == FrameType.PING:
                        self.pings.append(payload)
                        await stream.send_all(frames.build_pong(payload))
                    elif ftype == FrameType.PONG:
                        self.pings.append(b"pong:" + payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if me is not None and self.clients.get(me) is stream:
                del self.clients[me]
