from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trionet.errors import RemoteProtocolError
from trionet.proxy import socks5


def test_greeting_needs_all_methods() -> None:
    assert socks5.parse_greeting(b"\x05") is None
    assert socks5.parse_greeting(b"\x05\x02\x00") is None
    greeting, used = socks5.parse_greeting(b"\x05\x02\x00\x02rest")  # type: ignore[misc]
    assert greeting.methods == {0, 2} and used == 4


def test_greeting_rejects_socks4_and_empty() -> None:
    with pytest.raises(RemoteProtocolError):
        socks5.parse_greeting(b"\x04\x01\x00\x50")
    with pytest.raises(RemoteProtocolError):
        socks5.parse_greeting(b"\x05\x00")


@pytest.mark.parametrize(
    ("wire", "host", "port"),
    [
        (b"\x05\x01\x00\x01\x64\x40\x00\x02\x00\x50", "100.64.0.2", 80),
        (b"\x05\x01\x00\x03\x03ts1\x1f\x90", "ts1", 8080),
        (b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x01\xbb", "::1", 443),
    ],
)
def test_request_forms(wire: bytes, host: str, port: int) -> None:
    for cut in range(len(wire)):
        assert socks5.parse_request(wire[:cut]) is None
    request, used = socks5.parse_request(wire + b"extra")  # type: ignore[misc]
    assert (request.command, request.host, request.port, used) == (1, host, port, len(wire))


def test_request_rejects_unknown_address_type() -> None:
    with pytest.raises(RemoteProtocolError):
        socks5.parse_request(b"\x05\x01\x00\x09\x00\x00")


def test_userpass() -> None:
    creds, used = socks5.parse_userpass(b"\x01\x03bob\x02pw")  # type: ignore[misc]
    assert (creds.username, creds.password, used) == ("bob", "pw", 8)
    assert socks5.parse_userpass(b"\x01\x03bob\x02p") is None


def test_reply_and_udp_datagram_round_trip() -> None:
    assert socks5.build_reply(socks5.Reply.SUCCEEDED, "127.0.0.1", 1080) == (
        b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", 1080))
    wire = socks5.build_udp_datagram("100.64.0.3", 53, b"payload")
    dgram = socks5.parse_udp_datagram(wire)
    assert (dgram.host, dgram.port, dgram.data) == ("100.64.0.3", 53, b"payload")
    with pytest.raises(RemoteProtocolError):
        socks5.parse_udp_datagram(b"\x00\x00\x01" + wire[3:])  # fragmented


@given(st.binary(max_size=300))
def test_parsers_never_crash_on_garbage(data: bytes) -> None:
    for parse in (socks5.parse_greeting, socks5.parse_request, socks5.parse_userpass,
                  socks5.parse_udp_datagram):
        try:
            parse(data)
        except RemoteProtocolError:
            pass


@given(st.sampled_from(["1.2.3.4", "::ffff:1.2.3.4", "fd7a:115c:a1e0::1", "peer.ts.test"]),
       st.integers(0, 65535))
def test_address_round_trip(host: str, port: int) -> None:
    request, _ = socks5.parse_request(b"\x05\x01\x00" + socks5.encode_address(host, port))  # type: ignore[misc]
    assert request.port == port
    assert request.host == host or request.host == "::ffff:102:304"
