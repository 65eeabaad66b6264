"""A DERP node's CertName, honoured as tailscaled's tlsClient does: "sha256-raw:<hex>"
pins a self-signed certificate (derper's for an IP host name), another name replaces
the host name in the check; and netcheck's HTTPS latency probe over such links."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.realstack import make_tls
from trionet.derp import transport
from trionet.errors import TransportError

NOW = datetime.datetime.now(datetime.UTC)


def self_signed(ip: str, *, valid_from: datetime.datetime | None = None,
                days: int = 30) -> tuple[bytes, bytes, bytes]:
    """(cert PEM, key PEM, cert DER) like derper's createSelfSignedIPCert: an IP SAN, self-issued."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    start = valid_from or NOW - datetime.timedelta(hours=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.DER))


def pin_of(der: bytes) -> str:
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def test_a_pinned_certificate_passes_only_with_its_own_hash_and_address() -> None:
    _, _, der = self_signed("10.0.0.12")
    transport.check_server_cert(der, "10.0.0.12", pin_of(der))
    with pytest.raises(TransportError, match="not the one its CertName pins"):
        transport.check_server_cert(der, "10.0.0.12", pin_of(der + b"x"))
    with pytest.raises(TransportError, match=re.escape("not valid for '10.0.0.13'")):
        transport.check_server_cert(der, "10.0.0.13", pin_of(der))
    with pytest.raises(TransportError, match="no certificate"):
        transport.check_server_cert(None, "10.0.0.12", pin_of(der))


def test_a_pinned_certificate_must_be_valid_now() -> None:
    _, _, der = self_signed("10.0.0.12", valid_from=NOW - datetime.timedelta(days=40), days=30)
    with pytest.raises(TransportError, match="not valid now"):
        transport.check_server_cert(der, "10.0.0.12", pin_of(der))


def test_another_cert_name_is_the_name_checked() -> None:
    _, _, der = self_signed("10.0.0.12")
    with pytest.raises(TransportError, match=re.escape("not valid for 'derp.example'")):
        transport.check_server_cert(der, "10.0.0.12", "derp.example")
    transport.check_server_cert(der, "10.0.0.12", "10.0.0.12")  # CertName = host: the handshake checked it


def test_contexts_verify_what_the_cert_name_leaves_to_them(tmp_path: Path) -> None:
    pinned = transport.tls_context(None, "10.0.0.12", "sha256-raw:00")
    assert pinned.verify_mode == ssl.CERT_NONE and not pinned.check_hostname
    renamed = transport.tls_context(None, "10.0.0.12", "derp.example")
    assert renamed.verify_mode == ssl.CERT_REQUIRED and not renamed.check_hostname
    plain = transport.tls_context(None, "derp.example", None)
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname


async def serve_https(nursery: trio.Nursery, cert_pem: bytes, key_pem: bytes, tmp_path: Path, answer: bytes,
                      seen: list[bytes]) -> int:
    """A one-answer HTTPS server on loopback; its port."""
    (tmp_path / "s.crt").write_bytes(cert_pem)
    (tmp_path / "s.key").write_bytes(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await tls.receive_some(4096)
            seen.append(request)
            await tls.send_all(answer)
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def test_https_latency_through_a_pinned_self_signed_server(tmp_path: Path) -> None:
    cert, key, der = self_signed("127.0.0.1")
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await serve_https(nursery, cert, key, tmp_path, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                                 seen)
        ctx = transport.tls_context(None, "127.0.0.1", pin_of(der))
        took = await transport.https_latency("127.0.0.1", port, ssl_context=ctx, cert_name=pin_of(der))
        assert took >= 0
        assert seen[0].startswith(b"GET /derp/latency-check HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # the wrong pin: refused after the handshake, before any request
        with pytest.raises(TransportError, match="pins"):
            await transport.https_latency("127.0.0.1", port, ssl_context=ctx, cert_name=pin_of(b"other"))
        assert len(seen) == 1
        # no CertName: the self-signed certificate does not verify
        with pytest.raises(trio.BrokenResourceError):
            await transport.https_latency("127.0.0.1", port, ssl_context=transport.tls_context(None, "127.0.0.1",
                                                                                                None))
        nursery.cancel_scope.cancel()


async def test_https_latency_refuses_an_answer_above_299(tmp_path: Path) -> None:
    make_tls(tmp_path / "ca", ["127.0.0.1"])
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await serve_https(nursery, (tmp_path / "ca" / "server.crt").read_bytes(),
                                 (tmp_path / "ca" / "server.key").read_bytes(), tmp_path,
                                 b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", seen)
        # A CA-verified certificate checked against CertName "localhost" (one of its SANs).
        ctx = transport.tls_context(str(tmp_path / "ca" / "ca.crt"), "127.0.0.1", "localhost")
        with pytest.raises(TransportError, match="HTTP 404"):
            await transport.https_latency("127.0.0.1", port, ssl_context=ctx, cert_name="localhost")
        with pytest.raises(TransportError, match=re.escape("not valid for 'elsewhere.test'")):
            await transport.https_latency("127.0.0.1", port, ssl_context=ctx, cert_name="elsewhere.test")
        nursery.cancel_scope.cancel()
