"""A minimal DERP server side, sans-IO, for tests (never used by trionet itself)."""

from __future__ import annotations

import json
import os

from nacl.public import Box, PrivateKey, PublicKey

from trionet.derp import frames
from trionet.derp.frames import FrameParser, FrameType


class FakeServer:
    def __init__(self, server_info: dict[str, object] | None = None) -> None:
        self.private = PrivateKey.generate()
        self.public = bytes(self.private.public_key)
        self.parser = FrameParser(max_frame_len=frames.MAX_SEND_FRAME)
        self.client_public: bytes | None = None
        self.client_info: dict[str, object] | None = None
        self.server_info = server_info if server_info is not None else {"version": 2}
        self.received: list[tuple[int, bytes]] = []

    def hello(self) -> bytes:
        return frames.build_server_key(self.public)

    def feed(self, data: bytes) -> bytes:
        """Client bytes in; the server's reply bytes out (ServerInfo after ClientInfo)."""
        self.parser.feed(data)
        out = b""
        for ftype, payload in self.parser.frames():
            if ftype == FrameType.CLIENT_INFO:
                pub, sealed = frames.parse_client_info(payload)
                box = Box(self.private, PublicKey(pub))
                self.client_public = pub
                self.client_info = json.loads(box.decrypt(sealed))
                reply = json.dumps(self.server_info).encode()
                out += frames.build_server_info(bytes(box.encrypt(reply, os.urandom(24))))
            else:
                self.received.append((ftype, payload))
        return out
