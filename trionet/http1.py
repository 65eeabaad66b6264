"""HTTP/1.1 response heads, read and parsed one way wherever we speak plain HTTP
ourselves (the DERP upgrade, the control server's ``/key`` and ``/ts2021``).

The head is untrusted input: its size is bounded, a status line that is not
``HTTP/1.x NNN`` is a RemoteProtocolError, and header lines without a colon
are skipped. Header names are lower-cased; a repeated header keeps its last
value (nothing we read may repeat).
"""

from __future__ import annotations

import trio

from trionet.errors import RemoteProtocolError, TransportError

__all__ = ["MAX_HEAD", "parse_response_head", "read_response_head"]

MAX_HEAD = 64 << 10


def parse_response_head(head: bytes, peer: str = "the server") -> tuple[int, dict[str, str]]:
    """(status, headers) of a response head, without its blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if (len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3
            or not (parts[1].isascii() and parts[1].isdigit())):
        raise RemoteProtocolError(f"bad HTTP status line from {peer}: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_response_head(stream: trio.abc.Stream, peer: str = "the server", *,
                             max_size: int = MAX_HEAD,
                             receive_size: int = 4096) -> tuple[int, dict[str, str], bytes]:
    """Reads a response through its blank line: (status, headers, what followed it),
    which is the body's start or, after a 101, the new protocol's first bytes."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(receive_size)
        if not chunk:
            raise TransportError(f"{peer} closed the connection before its HTTP response head ended")
        buf += chunk
        if len(buf) > max_size and b"\r\n\r\n" not in buf[:max_size + 4]:
            raise RemoteProtocolError(f"HTTP response head from {peer} longer than {max_size} bytes")
    head, _, rest = buf.partition(b"\r\n\r\n")
    status, headers = parse_response_head(head, peer)
    return status, headers, rest
