"""The helpers DERP shares with the rest of trionet (one copy each): backoff delays,
exception-group leaves, HTTP response heads, host:port text."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from trionet.backoff import backoff_delay
from trionet.errors import AuthError, ConfigError, RemoteProtocolError, TransportError
from trionet.exc_groups import contains, first_leaf, leaves
from trionet.http1 import parse_response_head, read_response_head
from trionet.netaddr import join_host_port, parse_port, split_host_port


def test_backoff_doubles_from_one_second_to_the_cap_with_jitter_below_a_second() -> None:
    rng = random.Random(7)
    for failures in range(12):
        base = min(2**failures, 60)
        assert base <= backoff_delay(failures, rng) < base + 1
    assert backoff_delay(10_000, rng) < 61  # no overflow for a link down for days
    assert backoff_delay(3, rng, cap=5.0, jitter=0.0) == 5.0


def test_leaves_are_in_order_and_the_preferred_kind_wins() -> None:
    a, b, c = ValueError("a"), ConfigError("b"), AuthError("c")
    group = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b, c])])
    assert list(leaves(group)) == [a, b, c]
    assert first_leaf(group) is a
    assert first_leaf(group, AuthError, ConfigError) is c
    assert first_leaf(group, KeyError) is a
    assert first_leaf(a) is a
    assert contains(group, AuthError) and not contains(group, KeyError)
    assert contains(a, ValueError)


def test_a_response_head_is_parsed_and_what_follows_is_kept() -> None:
    status, headers = parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nbroken line")
    assert status == 101 and headers == {"upgrade": "DERP"}


@pytest.mark.parametrize("line", [b"SSH-2.0-OpenSSH", b"HTTP/1.1", b"HTTP/1.1 1x1 ok", b"HTTP/1.1 \xb2\xb2\xb2 x",
                                  b"HTTP/2 200 ok", b"HTTP/1.1 2000 ok"])
def test_a_bad_status_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="bad HTTP status line"):
        parse_response_head(line + b"\r\nA: b")


async def test_reading_a_head_byte_by_byte_keeps_the_bytes_after_it() -> None:
    left, right = trio.testing.memory_stream_pair()
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcDEF"
    for i in range(len(data)):
        await left.send_all(data[i:i + 1])
    status, headers, rest = await read_response_head(right, receive_size=1)
    assert (status, headers) == (200, {"content-length": "3"})
    assert rest == b""  # receive_size=1: nothing was read past the blank line
    assert await right.receive_some() == b"abcDEF"


async def test_a_head_too_long_or_cut_short_is_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100)
    with pytest.raises(RemoteProtocolError, match="longer than 256"):
        await read_response_head(right, max_size=256)
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"HTTP/1.1 200 OK\r\n")
    await left.aclose()
    with pytest.raises(TransportError, match="closed the connection"):
        await read_response_head(right, "the login server")


def test_join_host_port_brackets_ipv6_and_omits_a_default_port() -> None:
    assert join_host_port("derp.example", 443) == "derp.example:443"
    assert join_host_port("fd7a::1", 41641) == "[fd7a::1]:41641"
    assert join_host_port("derp.example", 443, 443) == "derp.example"
    assert join_host_port("::1", 80, 80) == "[::1]"


@pytest.mark.parametrize(("text", "default", "want"), [
    ("localhost:8080", None, ("localhost", 8080)),
    ("[fd7a::1]:41641", None, ("fd7a::1", 41641)),
    ("example.com", 443, ("example.com", 443)),
    ("[::1]", 80, ("::1", 80)),
    ("10.0.0.1:65535", None, ("10.0.0.1", 65535)),
])
def test_split_host_port(text: str, default: int | None, want: tuple[str, int]) -> None:
    assert split_host_port(text, default) == want
    assert split_host_port(join_host_port(*want)) == want  # the two agree


@pytest.mark.parametrize("text", ["localhost", "[::1]", ":80", "host:", "host:0", "host:65536", "host:8o",
                                  "host:٨٠", "::1:80", "fe80::1", "[::1]80", "[::1:80", "[]:80"])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(text)


def test_parse_port() -> None:
    assert parse_port("1") == 1 and parse_port("65535") == 65535
    for bad in ("0", "65536", "", "-1", " 80", "+80"):
        with pytest.raises(ValueError, match="not a port number"):
            parse_port(bad)
