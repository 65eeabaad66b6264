"""``host:port`` text, written and read one way everywhere (Go's net.JoinHostPort
and net.SplitHostPort rules): an IPv6 address is always in brackets, a port is
1-65535 in ASCII digits. Errors are ValueErrors; callers turn them into their
own kind (ConfigError for flags, a rejection for input from the network).
"""

from __future__ import annotations

__all__ = ["join_host_port", "parse_port", "split_host_port"]


def join_host_port(host: str, port: int, default_port: int | None = None) -> str:
    """``host:port``, ``[ipv6]:port``; only the host (bracketed if IPv6) when `port` is
    `default_port`, as in a URL whose scheme implies the port."""
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port == default_port else f"{bracketed}:{port}"


def parse_port(text: str) -> int:
    """A port number 1-65535 written in ASCII digits."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"{text[:20]!r} is not a port number (1-65535)")
    return int(text)


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) from ``host:port`` or ``[ipv6]:port``; with `default_port`, a bare
    ``host`` or ``[ipv6]`` too. An IPv6 address without brackets is refused (which
    colon would start the port?), as are an empty host and a bad port."""
    shown = text[:80]
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6]:PORT, got {shown!r}")
        port_text: str | None = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError(f"an IPv6 address needs brackets: [IPv6]:PORT, got {shown!r}")
        if not colon:
            port_text = None
    if not host:
        raise ValueError(f"expected HOST:PORT, got {shown!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {shown!r}")
        return host, default_port
    return host, parse_port(port_text)
