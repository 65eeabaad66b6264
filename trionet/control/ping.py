"""Answering the control server's `MapResponse.PingRequest` (protocol-notes-next §16.2).

Headscale 0.29 probes every subnet router that shares a prefix with another
(``node.routes.ha.probe_interval``) and its debug page pings on demand: it
sends ``{"URL": "<server_url>/machine/ping-response?id=..."}`` and marks a node
that does not answer in time unhealthy, moving its primary routes away.
tailscaled answers (tailscale control/controlclient/direct.go, answerPing,
answerHeadPing, isUniquePingRequest):

* a URL equal to the last one is a repeat: skipped;
* ``Types == ""``: ``HEAD <URL>`` with a 15 s timeout, the reply ignored; over
  the Noise connection only if ``URLIsNoise``, else plain HTTPS with the same
  TLS settings as the login server;
* other types (disco, TSMP, ICMP, peerapi pings; c2n) are not answered here.

`PingAnswerer` decides (sans-IO); `head_ping` is the request.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections import Counter
from typing import Any

import trio

from trionet.errors import TrionetError
from trionet.http1 import read_response_head

log = logging.getLogger(__name__)

HEAD_PING_TIMEOUT = 15.0
MAX_IN_FLIGHT = 4  # answers at once; more (a server gone mad) are dropped and counted
MAX_URL = 2048


class PingAnswerer:
    """Which PingRequests to answer, and how: ``"head"``, ``"noise"`` or None (skip)."""

    def __init__(self) -> None:
        self.last_url = ""
        self.in_flight = 0
        self.stats: Counter[str] = Counter()

    def decide(self, request: Any) -> str | None:
        if not isinstance(request, dict):
            self.stats["ping_bad"] += 1
            return None
        url = request.get("URL")
        if not isinstance(url, str) or not url or len(url) > MAX_URL:
            self.stats["ping_bad"] += 1
            return None
        if url == self.last_url:
            self.stats["ping_repeat"] += 1
            return None
        self.last_url = url
        types = request.get("Types") or ""
        if types != "":
            self.stats["ping_unsupported_type"] += 1
            log.debug("control ping: type %r is not answered", str(types)[:40])
            return None
        if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
            self.stats["ping_bad"] += 1
            return None
        if self.in_flight >= MAX_IN_FLIGHT:
            self.stats["ping_dropped_busy"] += 1
            return None
        return "noise" if request.get("URLIsNoise") else "head"


async def head_ping(url: str, ca_file: str | None, timeout: float = HEAD_PING_TIMEOUT) -> int:
    """``HEAD url`` over HTTP/1.1 (TLS for https, with `ca_file`); the status code."""
    from trionet.control.client import _open_stream  # the login server's TLS settings, one copy

    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(timeout):
        stream, netloc = await _open_stream(url, ca_file)
        try:
            await stream.send_all(f"HEAD {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: trionet\r\n"
                                  "Connection: close\r\n\r\n".encode())
            status, _headers, _rest = await read_response_head(stream, "the ping URL")
        finally:
            await trio.aclose_forcefully(stream)
    return status


async def answer(answerer: PingAnswerer, how: str, url: str, ca_file: str | None, conn: Any = None) -> None:
    """Send the answer `how` says; failures are logged, never raised (as tailscaled's are)."""
    answerer.in_flight += 1
    try:
        if how == "noise" and conn is not None:
            parts = urllib.parse.urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            with trio.fail_after(HEAD_PING_TIMEOUT):
                status, _ = await conn.h2.simple("HEAD", target, b"")
        else:
            status = await head_ping(url, ca_file)
        answerer.stats["ping_answered"] += 1
        log.debug("control ping: HEAD %s -> HTTP %d", url.split("?")[0], status)
    except (trio.TooSlowError, TrionetError, OSError, trio.BrokenResourceError) as exc:
        answerer.stats["ping_failed"] += 1
        log.info("control ping: HEAD %s failed: %s", url.split("?")[0], exc or type(exc).__name__)
    finally:
        answerer.in_flight -= 1
