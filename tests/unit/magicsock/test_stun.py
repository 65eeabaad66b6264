"""STUN: the exact request tailscaled sends, response parsing, classification."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trionet.errors import LocalProtocolError, RemoteProtocolError
from trionet.magicsock import stun

TX = bytes(range(1, 13))


def test_request_exact_bytes() -> None:
    req = stun.binding_request(TX)
    assert len(req) == stun.REQUEST_LEN == 40  # stun.go: headerLen+lenAttrSoftware+lenFingerprint
    head = b"\x00\x01\x00\x14\x21\x12\xa4\x42" + TX + b"\x80\x22\x00\x08tailnode"
    assert req[:32] == head
    crc = (zlib.crc32(head) ^ 0x5354554E) & 0xFFFFFFFF
    assert req[32:] == b"\x80\x28\x00\x04" + struct.pack(">I", crc)
    assert stun.parse_binding_request(req) == TX  # what Tailscale's/Headscale's server checks
    assert stun.is_stun(req)


def test_request_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        stun.binding_request(b"short")


def test_server_checks_reject_tampering() -> None:
    req = bytearray(stun.binding_request(TX))
    req[-1] ^= 1
    with pytest.raises(RemoteProtocolError):
        stun.parse_binding_request(bytes(req))


@pytest.mark.parametrize("addr", [("203.0.113.7", 41641), ("2001:db8::1", 3478), ("10.213.0.254", 1)])
def test_response_round_trip(addr: tuple[str, int]) -> None:
    assert stun.parse_response(stun.binding_response(TX, addr)) == (TX, addr)


def _response(attrs: bytes) -> bytes:
    return b"\x01\x01" + struct.pack(">H", len(attrs)) + stun.MAGIC_COOKIE + TX + attrs


def test_alt_xor_and_mapped_fallback() -> None:
    xor = stun.binding_response(TX, ("1.2.3.4", 5))[20:]
    alt = b"\x80\x20" + xor[2:]
    assert stun.parse_response(_response(alt)) == (TX, ("1.2.3.4", 5))
    mapped = b"\x00\x01\x00\x08\x00\x01\x12\x34" + bytes([9, 8, 7, 6])
    assert stun.parse_response(_response(mapped)) == (TX, ("9.8.7.6", 0x1234))
    # XOR-MAPPED wins over MAPPED whatever the order
    assert stun.parse_response(_response(mapped + xor)) == (TX, ("1.2.3.4", 5))
    software = b"\x80\x22\x00\x05hello\x00\x00\x00"  # padded attribute before the address
    assert stun.parse_response(_response(software + xor)) == (TX, ("1.2.3.4", 5))
    assert stun.parse_response(_response(xor) + b"trailing") == (TX, ("1.2.3.4", 5))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x01\x00\x00" + b"\x21\x12\xa4\x43" + TX,  # wrong cookie
        b"\x00\x01\x00\x00" + stun.MAGIC_COOKIE + TX,  # a request, not a response
        b"\x01\x01\x00\x00" + stun.MAGIC_COOKIE + TX,  # no address
        b"\x01\x01\x00\x08" + stun.MAGIC_COOKIE + TX,  # length past the end
        _response(b"\x00\x20\x00\x08\x00\x03\x00\x00\x00\x00\x00\x00"),  # family 3
        _response(b"\x00\x20\x00\x08\x00\x02\x00\x00\x00\x00\x00\x00"),  # v6 too short
        _response(b"\x00\x20\x00"),  # truncated attribute header
    ],
)
def test_bad_responses(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        stun.parse_response(data)


def test_is_stun_classification() -> None:
    assert not stun.is_stun(b"\x40" + bytes(3) + stun.MAGIC_COOKIE + bytes(12))  # top bits set
    assert not stun.is_stun(b"\x01\x00\x00\x00" + stun.MAGIC_COOKIE + bytes(11))  # 19 bytes
    assert not stun.is_stun(b"TS\xf0\x9f\x92\xac" + bytes(60))  # disco
    assert not stun.is_stun(b"\x04\x00\x00\x00" + bytes(28))  # WireGuard transport


@given(st.binary(max_size=120), st.booleans())
def test_garbage_only_remote_errors(data: bytes, force_header: bool) -> None:
    if force_header:
        data = b"\x01\x01" + data[:2].ljust(2, b"\x00") + stun.MAGIC_COOKIE + TX + data[2:]
    try:
        stun.parse_response(data)
    except RemoteProtocolError:
        pass
    try:
        stun.parse_binding_request(data)
    except RemoteProtocolError:
        pass


@given(st.binary(min_size=12, max_size=12), st.ip_addresses().map(str), st.integers(0, 65535))
def test_round_trip_any(tx: bytes, ip: str, port: int) -> None:
    txid, (got_ip, got_port) = stun.parse_response(stun.binding_response(tx, (ip, port)))
    assert txid == tx and got_port == port
    import ipaddress

    want = ipaddress.ip_address(ip)
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    assert ipaddress.ip_address(got_ip) == want
