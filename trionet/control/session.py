"""The control session: register, report endpoints, follow the map stream.

Order matters with Headscale (protocol-notes §5.1, §14):

1. TS2021 connection, register with the auth key (or our known node key);
2. the map stream starts; its first message carries the DERP map;
3. magicsock picks the home region, connects DERP, learns STUN endpoints;
4. a lite update (Stream:false, OmitPeers:true) reports DiscoKey, Endpoints
   and PreferredDERP: Headscale <= 0.26 stores them only from this request,
   and tailscaled ignores a peer whose disco key is zero;
5. again whenever the endpoints or the home region change.

Failures before the first netmap are fatal (bad key, unreachable server:
the user gets one line). After that, the session reconnects with backoff
min(2^n, 60) s plus jitter, while WireGuard keeps running on the last netmap.

Node key renewal: when our KeyExpiry nears (a day before it, or a third of
the key's lifetime before it when that is shorter), the session ends on
purpose and the next one registers a new node key with OldNodeKey set and
the auth key (Headscale 0.29 rotates only with a valid auth key; 0.23 also
without one while the key is unexpired). WireGuard and DERP switch to the
new key at once; streams in the netstack live on. An expired key is renewed
the same way; when the server refuses, the status is Error with the reason.

Interactive login (no auth key; protocol-notes-next §19): when the server
answers a register with an AuthURL, the status turns NeedsLogin with that URL
and the session asks again with Followup=URL, the same node key (a pending
one, if the old key had expired) and no Auth. Headscale 0.23 answers each
Followup after 5 s with the same URL; 0.29 holds it until an admin approves,
rejects or the registration expires, and then gives a new URL, which is shown
in its turn. Same URL again, or an HTTP error: back off (n^2 x 10 ms, at most
30 s, as tailscaled). Once approved: Registering, the map stream, Running.
While a login is pending, a lost connection is not fatal even before the
first netmap: the session reconnects (backoff at most 30 s) and follows the
same URL. A key that expires later, with no auth key, leads back here.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import random
from collections.abc import Callable
from typing import Any

import trio

from trionet.backoff import backoff_delay
from trionet.clock import trio_time_of, wall
from trionet.control import ping
from trionet.control.login import LOGIN_BACKOFF_MAX, login_backoff_delay
from trionet.errors import AuthError, ConfigError, TrionetError
from trionet.exc_groups import first_leaf
from trionet.status import Status, StatusMachine

log = logging.getLogger(__name__)

RENEW_BEFORE = 24 * 3600.0  # renew a day before expiry ...
RENEW_LIFETIME_FRACTION = 1 / 3  # ... or a third of the key's lifetime before, if that is sooner
MIN_RENEW_INTERVAL = 60.0  # never renew in a loop, whatever the server says


def parse_go_time(text: str | None) -> float | None:
    """Seconds since the epoch for Go's RFC 3339 time text; None for Go's zero time or nothing."""
    if not text or text.startswith("0001-01-01"):
        return None
    body = text.replace("Z", "+00:00")
    if "." in body:  # Go writes up to nanoseconds; Python parses microseconds
        head, _, rest = body.partition(".")
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        body = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        return datetime.datetime.fromisoformat(body).timestamp()
    except ValueError:
        return None


def renewal_due(expiry: float, key_since: float | None, now: float) -> float:
    """When to renew a node key that expires at `expiry` and was accepted at `key_since`."""
    since = key_since if key_since is not None and key_since < expiry else now
    lifetime = max(expiry - since, 0.0)
    return expiry - min(RENEW_BEFORE, lifetime * RENEW_LIFETIME_FRACTION)


class ControlSession:
    def __init__(self, config: Any, state: Any, magic: Any, on_netmap: Callable[[Any, Any], None],
                 status: StatusMachine, rng: random.Random | None = None,
                 on_node_key_changed: Callable[[bytes], None] | None = None,
                 hostinfo_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        # Hostinfo fields the node decides as it runs (RoutableIPs, the peer API's Services):
        # sent in every register and map request; a change is reported by a lite update.
        self.hostinfo_extra = hostinfo_extra
        self.state = state
        self.magic = magic
        self.on_netmap = on_netmap
        self.status = status
        self.rng = rng or random.Random()
        self.fatal: BaseException | None = None
        self.failed = trio.Event()  # set with `fatal`: the session gave up for good
        self.connected_once = False
        self.reconnects = 0
        self._endpoints_dirty = trio.Event()
        self._reported: tuple[Any, ...] | None = None
        self._session_got_netmap = False
        self.on_node_key_changed = on_node_key_changed
        self.renewals = 0
        self.key_expiry: float | None = None  # ours, from the netmap's self node
        self._expiry_changed = trio.Event()
        self._renewing = False  # this session ends on purpose: the next one renews the key
        self._renewed_against: float | None = None  # the expiry our last renewal tried to push back
        self._hold_until_expiry: float | None = None  # renewal refused or not honoured for this expiry
        self._last_renewal = float("-inf")
        self.login_url: str | None = None  # set while an interactive login waits for an admin
        self.logins = 0  # interactive logins completed
        self.pings = ping.PingAnswerer()  # outlives sessions: a repeated URL after a reconnect is a repeat

    def __repr__(self) -> str:  # the config and state it holds carry secrets: name neither
        return f"<ControlSession {self.config.login_server} {self.status.status.value}>"

    def endpoints_changed(self) -> None:
        self._endpoints_dirty.set()

    def _report_key(self) -> tuple[Any, ...]:
        extra = self.hostinfo_extra() if self.hostinfo_extra is not None else {}
        return (tuple(self.magic.endpoints()), self.magic.home_region, json.dumps(extra, sort_keys=True))

    async def run(self) -> None:
        failures = 0
        while True:
            self._session_got_netmap = False
            try:
                await self._one_session()
                failures = 0  # a planned end (key renewal): the next session starts at once
            except Exception as caught:  # nurseries wrap errors in groups: look inside
                self._set_control_connected(False)
                if self._session_got_netmap:
                    failures = 0  # that session worked: start the backoff afresh
                exc = first_leaf(caught, AuthError, ConfigError, TrionetError)
                if isinstance(exc, (AuthError, ConfigError)):
                    # The server refused us or our config is wrong: retrying cannot help.
                    self._give_up(exc)
                    return
                if not isinstance(exc, (TrionetError, OSError, trio.BrokenResourceError,
                                        trio.ClosedResourceError)):
                    log.exception("control session failed unexpectedly; reconnecting")
                if not self.connected_once and self.login_url is None:
                    self._give_up(exc if isinstance(exc, TrionetError) else _as_transport(exc))
                    return
                failures += 1
                # a person may be about to approve us: ask again sooner than a map stream would
                delay = backoff_delay(failures - 1, self.rng,
                                      cap=LOGIN_BACKOFF_MAX if self.login_url is not None else 60.0)
                log.warning("control connection lost (%s); reconnecting in %.1f s", exc, delay)
                self.status.move(Status.RECONNECTING, f"{exc}; retry in {delay:.1f} s")
                await trio.sleep(delay)
                self.status.move(Status.CONNECTING, "reconnecting to control")
                self.reconnects += 1

    def _set_control_connected(self, up: bool) -> None:
        """magicsock moves its home DERP region only while control can tell peers of it."""
        if hasattr(self.magic, "control_connected"):
            self.magic.control_connected = up

    def _give_up(self, exc: BaseException) -> None:
        self.fatal = exc
        self.status.move(Status.ERROR, str(exc))
        self.failed.set()

    async def _one_session(self) -> None:
        from trionet import control

        self._renewing = False
        async with control.open_session(self.config, self.state) as conn:
            conn.hostinfo_extra = self.hostinfo_extra
            if self.status.status is Status.CONNECTING:
                self.status.move(Status.REGISTERING, "registering")
            await self._register(conn)
            async with trio.open_nursery() as nursery:
                conn.on_ping_request = lambda request: self._on_ping_request(request, conn, nursery)
                nursery.start_soon(self._report_loop, conn)
                nursery.start_soon(self._renewal_timer, nursery.cancel_scope)
                async for netmap, change in conn.map_updates(self.magic):
                    self._session_got_netmap = True
                    self._set_control_connected(True)
                    self.on_netmap(netmap, change)
                    self._note_expiry(netmap.self_node)
                    if not self.connected_once or self.status.status is not Status.RUNNING:
                        self.connected_once = True
                        self._endpoints_dirty.set()
                        self.status.move(Status.RUNNING, f"{len(netmap.peers)} peers")
                nursery.cancel_scope.cancel()
            if self._renewing:
                return
            raise control.StreamEnded("the map stream ended")

    def _on_ping_request(self, request: Any, conn: Any, nursery: trio.Nursery) -> None:
        """Headscale 0.29's health probe: answered as tailscaled does, in the background."""
        how = self.pings.decide(request)
        if how is not None:
            ca = str(self.config.ca_file) if self.config.ca_file else None
            nursery.start_soon(ping.answer, self.pings, how, request["URL"], ca, conn)

    # ------------------------------------------------------------ key renewal
    async def _register(self, conn: Any) -> None:
        """Register; or renew the node key when a renewal is pending or the key expired;
        or, when the server asks for one, an interactive login."""
        from trionet.control import NodeKeyExpired

        pending = self.state.pending_node_private
        if self.login_url is not None:  # the connection broke while we waited for an admin
            await self._login(conn, pending, self.login_url)
            return
        expired = self.key_expiry is not None and self.key_expiry <= wall()
        if pending is None:
            try:
                resp = await conn.register()
            except NodeKeyExpired:
                # Without an auth key the new key goes through an interactive login (tailscaled's regen).
                log.warning("our node key has expired; logging in again %s",
                            "with the auth key" if self.config.auth_key else "(interactive: no auth key)")
                expired = True
                pending = await self.state.begin_node_key_renewal()
            else:
                if resp.AuthURL:  # a new node, or (Headscale 0.23) one whose key expired
                    await self._login(conn, None, resp.AuthURL)
                return
        try:
            resp = await conn.register(renew_to=pending)
        except AuthError as exc:
            await self.state.abandon_node_key_renewal()
            if expired:
                raise AuthError(f"our node key has expired and the login server refused a new one ({exc}); "
                                "start trionet with a valid reusable auth key (--authkey)") from exc
            log.warning("node key renewal refused (%s); keeping the current key until it expires at %s",
                        exc, _when(self.key_expiry))
            self._hold_until_expiry = self.key_expiry
            await conn.register()
            return
        if resp.AuthURL:
            if expired:
                await self._login(conn, pending, resp.AuthURL)
                return
            # A planned renewal without an auth key (Headscale 0.29 wants a person for a new
            # key): not worth an admin's time while the current key is good; log in when it expires.
            await self.state.abandon_node_key_renewal()
            log.warning("node key renewal needs an interactive login; keeping the current key until it "
                        "expires at %s", _when(self.key_expiry))
            self._hold_until_expiry = self.key_expiry
            resp = await conn.register()
            if resp.AuthURL:
                await self._login(conn, None, resp.AuthURL)
            return
        await self._renewed(expired)

    async def _renewed(self, expired: bool) -> None:
        """The server took our pending node key: it is ours now, everywhere."""
        await self.state.finish_node_key_renewal(wall())
        self.renewals += 1
        self._renewed_against = self.key_expiry
        self._last_renewal = wall()
        self._reported = None  # report endpoints and disco key again, for the new key's record
        self._endpoints_dirty.set()
        log.info("node key renewed %s its expiry at %s", "after" if expired else "ahead of",
                 _when(self.key_expiry))
        if self.on_node_key_changed is not None:
            self.on_node_key_changed(self.state.node_private)

    async def _login(self, conn: Any, renew_to: bytes | None, url: str) -> None:
        """Show the login URL and follow it up until an admin approves this node.

        `renew_to`: the pending node key the login is for (our current key when None)."""
        from trionet.control import LoginFollowupFailed

        repeats = 0  # answers in a row that changed nothing
        while True:
            self._show_login(url)
            try:
                resp = await conn.register(renew_to=renew_to, followup=url)
            except LoginFollowupFailed as exc:
                # The server lost the registration (Headscale 0.26 answers 404 once it expired):
                # start a new one rather than follow a dead URL forever.
                repeats += 1
                delay = login_backoff_delay(repeats, self.rng)
                log.warning("%s; asking for a new login URL in %.1f s", exc, delay)
                await trio.sleep(delay)
                resp = await conn.register(renew_to=renew_to)
                if resp.AuthURL:
                    url = resp.AuthURL
                    continue
            if not resp.AuthURL:
                break
            if resp.AuthURL == url:
                repeats += 1
                await trio.sleep(login_backoff_delay(repeats, self.rng))
            else:  # expired or rejected (Headscale 0.29): a new registration, a new URL
                repeats = 0
                log.info("the login server replaced the login URL")
                url = resp.AuthURL
        self.login_url = None
        self.logins += 1
        log.info("login approved")
        self.status.move(Status.REGISTERING, "login approved")
        if renew_to is not None:
            await self._renewed(expired=True)

    def _show_login(self, url: str) -> None:
        if url != self.login_url:  # the status line (NeedsLogin) tells it at info level
            log.debug("waiting for a login at %s", url)
        self.login_url = url  # before the status moves: listeners read it (the node's start deadline)
        self.status.move(Status.NEEDS_LOGIN, f"log in at {url}", login_url=url)

    def _note_expiry(self, me: Any) -> None:
        expiry = parse_go_time(getattr(me, "KeyExpiry", None)) if me is not None else None
        if expiry == self.key_expiry:
            return
        if expiry is not None and expiry == self._renewed_against:
            # The server took the new key but kept the expiry (Headscale 0.23's key
            # refresh): renewing again cannot help; log in again once it passes.
            log.warning("the login server kept our key expiry at %s after a renewal", _when(expiry))
            self._hold_until_expiry = expiry
        self.key_expiry = expiry
        self._expiry_changed.set()

    def renewal_time(self, now: float) -> float | None:
        """Wall-clock time of the next renewal, None while the key does not expire."""
        expiry = self.key_expiry
        if expiry is None:
            return None
        at = expiry if expiry == self._hold_until_expiry else renewal_due(expiry, self.state.node_key_since, now)
        return max(at, self._last_renewal + MIN_RENEW_INTERVAL)

    async def _renewal_timer(self, session: trio.CancelScope) -> None:
        """Sleeps to the renewal time (or until the netmap changes our expiry)."""
        while True:
            self._expiry_changed = trio.Event()
            now = wall()
            at = self.renewal_time(now)
            if at is not None and at <= now:
                log.info("renewing our node key (it expires at %s)", _when(self.key_expiry))
                await self.state.begin_node_key_renewal()
                self._renewing = True
                session.cancel()
                return
            with trio.move_on_at(trio_time_of(at) if at is not None else math.inf):
                await self._expiry_changed.wait()

    async def _report_loop(self, conn: Any) -> None:
        """Lite updates: after the first netmap and whenever endpoints or home DERP change."""
        while True:
            await self._endpoints_dirty.wait()
            self._endpoints_dirty = trio.Event()
            # Give STUN a moment on the first report, so the first update is complete.
            await self.magic.wait_endpoints(2.0)
            key = self._report_key()
            if key == self._reported:
                continue
            net_info = self.magic.net_info() if hasattr(self.magic, "net_info") else None
            await conn.lite_update(self.magic.endpoints(), self.magic.endpoint_types(),
                                   self.magic.home_region, net_info=net_info)
            self._reported = key
            log.info("reported endpoints %s, home DERP %s%s", key[0], key[1],
                     f", {key[2]}" if key[2] != "{}" else "")


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _as_transport(exc: BaseException) -> TrionetError:
    from trionet.errors import TransportError

    return TransportError(str(exc) or exc.__class__.__name__)
