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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import trio

from trionet.daemon.state import Status, StatusMachine
from trionet.errors import AuthError, ConfigError, TrionetError

log = logging.getLogger(__name__)


def backoff(failures: int, rng: random.Random) -> float:
    """min(2^n, 60) seconds plus up to a second of jitter."""
    return float(min(2 ** max(failures - 1, 0), 60)) + rng.random()


class ControlSession:
    def __init__(self, config: Any, state: Any, magic: Any, on_netmap: Callable[[Any, Any], None],
                 status: StatusMachine, rng: random.Random | None = None) -> None:
        self.config = config
        self.state = state
        self.magic = magic
        self.on_netmap = on_netmap
        self.status = status
        self.rng = rng or random.Random()
        self.fatal: BaseException | None = None
        self.connected_once = False
        self.reconnects = 0
        self._endpoints_dirty = trio.Event()
        self._reported: tuple[Any, ...] | None = None
        self._session_got_netmap = False

    def endpoints_changed(self) -> None:
        self._endpoints_dirty.set()

    def _report_key(self) -> tuple[Any, ...]:
        return (tuple(self.magic.endpoints()), self.magic.home_region)

    async def run(self) -> None:
        failures = 0
        while True:
            self._session_got_netmap = False
            try:
                await self._one_session()
                failures = 0
            except Exception as caught:  # nurseries wrap errors in groups: look inside
                if self._session_got_netmap:
                    failures = 0  # that session worked: start the backoff afresh
                exc = _unwrap(caught)
                if isinstance(exc, (AuthError, ConfigError)):
                    # The server refused us or our config is wrong: retrying cannot help.
                    self.fatal = exc
                    self.status.move(Status.ERROR, str(exc))
                    return
                if not isinstance(exc, (TrionetError, OSError, trio.BrokenResourceError,
                                        trio.ClosedResourceError)):
                    log.exception("control session failed unexpectedly; reconnecting")
                if not self.connected_once:
                    self.fatal = exc if isinstance(exc, TrionetError) else _as_transport(exc)
                    self.status.move(Status.ERROR, str(self.fatal))
                    return
                failures += 1
                delay = backoff(failures, self.rng)
                log.warning("control connection lost (%s); reconnecting in %.1f s", exc, delay)
                self.status.move(Status.RECONNECTING, f"{exc}; retry in {delay:.1f} s")
                await trio.sleep(delay)
                self.status.move(Status.CONNECTING, "reconnecting to control")
                self.reconnects += 1

    async def _one_session(self) -> None:
        from trionet import control

        async with control.open_session(self.config, self.state) as conn:
            if self.status.status is Status.CONNECTING:
                self.status.move(Status.REGISTERING, "registering")
            await conn.register()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_loop, conn)
                async for netmap, change in conn.map_updates(self.magic):
                    self._session_got_netmap = True
                    self.on_netmap(netmap, change)
                    if not self.connected_once or self.status.status is not Status.RUNNING:
                        self.connected_once = True
                        self._endpoints_dirty.set()
                        self.status.move(Status.RUNNING, f"{len(netmap.peers)} peers")
                nursery.cancel_scope.cancel()
            raise control.StreamEnded("the map stream ended")

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
            await conn.lite_update(self.magic.endpoints(), self.magic.endpoint_types(),
                                   self.magic.home_region)
            self._reported = key
            log.info("reported endpoints %s, home DERP %s", key[0], key[1])


def _unwrap(exc: BaseException) -> BaseException:
    """The most telling error inside nested exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        stack: list[BaseException] = [exc]
        while stack:
            e = stack.pop()
            if isinstance(e, BaseExceptionGroup):
                stack.extend(e.exceptions)
            else:
                leaves.append(e)
        for kind in (AuthError, ConfigError, TrionetError):
            for leaf in leaves:
                if isinstance(leaf, kind):
                    return leaf
        return leaves[0] if leaves else exc
    return exc


def _as_transport(exc: BaseException) -> TrionetError:
    from trionet.errors import TransportError

    return TransportError(str(exc) or exc.__class__.__name__)
