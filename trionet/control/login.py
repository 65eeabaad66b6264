"""Interactive login, the pure parts: which login URL we accept from the server,
the Headscale command that approves it, and how long to wait between asks.

What the URL looks like tells the Headscale version (protocol-notes-next §19):

* 0.23: ``<server>/register/mkey:<hex>`` (the machine key; the same URL every
  time), approved with ``headscale nodes register --user USER --key mkey:<hex>``;
* 0.24 to 0.28: ``<server>/register/<id>``, ``headscale nodes register --key <id>``;
* 0.29 on: ``<server>/register/hskey-authreq-<id>``, approved with
  ``headscale auth register --auth-id hskey-authreq-<id> --user USER``
  (``auth approve`` is for SSH check sessions: for a registration it only
  makes Headscale issue a new URL).

The URL comes from the network and ends up on a terminal: anything but a
plain printable http(s) URL is refused, and the command is offered only for
an id made of characters that need no shell quoting.
"""

from __future__ import annotations

import random
import re
import urllib.parse

from trionet.errors import RemoteProtocolError

__all__ = ["LOGIN_BACKOFF_MAX", "MAX_LOGIN_URL", "approval_command", "check_login_url", "login_backoff_delay",
           "login_instructions"]

MAX_LOGIN_URL = 2048
LOGIN_BACKOFF_MAX = 30.0  # tailscaled's authRoutine caps its backoff here too
_REGISTRATION_ID = re.compile(r"[A-Za-z0-9_:-]{1,200}")
_AUTH_REQUEST_PREFIX = "hskey-authreq-"


def check_login_url(url: str) -> str:
    """The server's AuthURL if it is a plain http(s) URL we can show and send back."""
    if not url or len(url) > MAX_LOGIN_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise RemoteProtocolError(f"the login server sent an unusable login URL ({len(url)} characters)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteProtocolError("the login server sent a login URL that is not http(s)")
    return url


def approval_command(url: str, user: str = "USER") -> str | None:
    """The command that approves this login on the Headscale server; None when the
    URL is not one of Headscale's CLI-approvable shapes (OIDC, another server)."""
    path = urllib.parse.urlsplit(url).path
    if path.startswith("/oidc/"):
        return None  # the user logs in through the identity provider
    _, sep, ident = path.rpartition("/register/")
    if not sep or not _REGISTRATION_ID.fullmatch(ident):
        return None
    if ident.startswith(_AUTH_REQUEST_PREFIX):
        return f"headscale auth register --auth-id {ident} --user {user}"
    return f"headscale nodes register --user {user} --key {ident}"


def login_instructions(url: str) -> str:
    """What `trionet up` and `trionet status` tell a person about a pending login."""
    text = f"To log in, visit:\n\n    {url}\n"
    command = approval_command(url)
    if command is not None:
        text += ("\nor have an admin approve this node on the Headscale server\n"
                 f"(USER: the Headscale user who will own it):\n\n    {command}\n")
    return text


def login_backoff_delay(repeats: int, rng: random.Random | None = None) -> float:
    """Wait before asking again after `repeats` answers in a row that changed nothing
    (the same URL back, an error): tailscaled's n^2 x 10 ms times 0.5-1.5, at most 30 s.

    Headscale 0.23 holds each Followup 5 s itself and 0.29 until something
    happens, so the first repeats follow each other closely and an approval is
    seen within seconds; only a login left waiting for long backs off to 30 s."""
    r = rng if rng is not None else random
    n = max(repeats, 0)
    return min(n * n * 0.01 * (0.5 + r.random()), LOGIN_BACKOFF_MAX)
