"""The control session's interactive login against a fake control connection, under
MockClock: the Followup loop, a replaced URL, errors and back-off, a lost connection,
an expired key without an auth key; and a whole Node whose start waits for its login."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trionet import control, keys, proto
from trionet.config import NodeConfig
from trionet.control.client import LoginFollowupFailed, NodeKeyExpired
from trionet.control.login import LOGIN_BACKOFF_MAX
from trionet.control.netmap import Netmap
from trionet.control.session import ControlSession
from trionet.errors import StartTimeout, TransportError
from trionet.node import Node
from trionet.status import Status, StatusChange, StatusMachine

URL1 = "https://hs.test:8443/register/hskey-authreq-AAAAAAAAAAAAAAAAAAAAAAAA"
URL2 = "https://hs.test:8443/register/hskey-authreq-BBBBBBBBBBBBBBBBBBBBBBBB"
MKEY_URL = "https://hs.test:8443/register/mkey:" + "cd" * 32


@attrs.define
class Call:
    session: int  # which connection (1 = the first)
    renew_to: bytes | None
    followup: str
    at: float


Answer = Callable[[Call], Awaitable[proto.RegisterResponse]]


class FakeControl:
    """`control.open_session` for the session: each register goes to `answer`, the map
    stream yields one netmap (our node) and then waits."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.calls: list[Call] = []
        self.sessions = 0
        self.break_session: Callable[[Call], bool] = lambda call: False

    @asynccontextmanager
    async def open_session(self, config: Any, state: Any) -> AsyncIterator[Any]:
        self.sessions += 1
        yield _FakeConnection(self, self.sessions)


class _FakeConnection:
    def __init__(self, server: FakeControl, number: int) -> None:
        self.server, self.number = server, number

    async def register(self, renew_to: bytes | None = None, followup: str = "") -> proto.RegisterResponse:
        call = Call(self.number, renew_to, followup, trio.current_time())
        self.server.calls.append(call)
        if self.server.break_session(call):
            raise TransportError("control connection closed")
        return await self.server.answer(call)

    async def lite_update(self, endpoints: list[str], types: list[int], home_region: int) -> None:
        await trio.lowlevel.checkpoint()

    async def map_updates(self, magic: Any) -> AsyncIterator[tuple[Netmap, Any]]:
        netmap = Netmap()
        me = {"ID": 1, "Name": "me.ts.test.", "Key": "nodekey:" + "00" * 32,
              "Addresses": ["100.64.0.1/32"], "KeyExpiry": "0001-01-01T00:00:00Z"}
        yield netmap, netmap.apply(proto.structure({"Node": me}, proto.MapResponse))
        await trio.sleep_forever()


def _magic() -> Any:
    async def wait_endpoints(timeout: float) -> None:
        await trio.lowlevel.checkpoint()

    return SimpleNamespace(endpoints=lambda: [], endpoint_types=lambda: [], home_region=0,
                           wait_endpoints=wait_endpoints)


def _session(tmp_path: Path, auth_key: str | None = None,
             on_key: Callable[[bytes], None] | None = None) -> tuple[ControlSession, list[StatusChange]]:
    seen: list[StatusChange] = []
    state = keys.load_or_create_state(tmp_path)
    status = StatusMachine(status=Status.CONNECTING, listeners=[seen.append])
    session = ControlSession(NodeConfig("https://hs.test:8443", tmp_path, auth_key=auth_key, hostname="me"), state,
                             _magic(), lambda *_: None, status, random.Random(3), on_node_key_changed=on_key)
    return session, seen


async def _run_until_running(session: ControlSession) -> None:
    settled = trio.Event()

    def settle(change: StatusChange) -> None:
        if change.new in (Status.RUNNING, Status.ERROR):
            settled.set()

    session.status.listeners.append(settle)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await settled.wait()
        nursery.cancel_scope.cancel()
    assert session.status.status is Status.RUNNING, f"the session gave up: {session.fatal!r}"


def _login_urls(seen: list[StatusChange]) -> list[str]:
    return [c.login_url for c in seen if c.new is Status.NEEDS_LOGIN]


async def _inline(sync_fn: Any, *args: Any, **kwargs: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return sync_fn(*args)


@pytest.fixture(autouse=True)
def _no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # State files are written in threads; a MockClock would jump while one runs.
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)


APPROVED = proto.RegisterResponse(MachineAuthorized=True)


async def test_hs023_login_follows_the_same_url_every_5_s_until_approved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def headscale_023(call: Call) -> proto.RegisterResponse:
        if not call.followup:
            return proto.RegisterResponse(AuthURL=MKEY_URL)
        await trio.sleep(5)  # registrationHoldoff
        followups = sum(1 for c in fake.calls if c.followup)
        return APPROVED if followups >= 6 else proto.RegisterResponse(AuthURL=MKEY_URL)

    fake = FakeControl(headscale_023)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    session, seen = _session(tmp_path)
    await _run_until_running(session)
    assert [c.followup for c in fake.calls] == [""] + [MKEY_URL] * 6
    assert all(c.renew_to is None for c in fake.calls)  # the node's own key, not a new one
    assert _login_urls(seen) == [MKEY_URL]  # the same URL is told once
    assert [c.new for c in seen] == [Status.REGISTERING, Status.NEEDS_LOGIN, Status.REGISTERING, Status.RUNNING]
    assert seen[2].reason == "login approved"
    gaps = [b.at - a.at for a, b in zip(fake.calls[1:], fake.calls[2:], strict=False)]
    assert all(5 <= gap <= 5 + 1 for gap in gaps), gaps  # the hold-off, and a short back-off on top
    assert session.login_url is None and session.logins == 1 and fake.sessions == 1


async def test_hs029_a_replaced_url_is_shown_and_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def headscale_029(call: Call) -> proto.RegisterResponse:
        if not call.followup:
            return proto.RegisterResponse(AuthURL=URL1)
        await trio.sleep(900)  # held until the registration expires (15 min) ...
        if call.followup == URL1:
            return proto.RegisterResponse(AuthURL=URL2)  # ... which gives a new one
        return APPROVED  # the admin approved the second

    fake = FakeControl(headscale_029)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    session, seen = _session(tmp_path)
    await _run_until_running(session)
    assert [c.followup for c in fake.calls] == ["", URL1, URL2]
    assert _login_urls(seen) == [URL1, URL2]
    assert seen[2].old is Status.NEEDS_LOGIN and seen[2].new is Status.NEEDS_LOGIN  # told as news
    assert fake.calls[2].at - fake.calls[1].at == 900  # the new URL is followed at once


async def test_the_same_url_at_once_backs_off_to_at_most_30_s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def instant_same_url(call: Call) -> proto.RegisterResponse:
        await trio.lowlevel.checkpoint()
        return APPROVED if len(fake.calls) > 120 else proto.RegisterResponse(AuthURL=URL1)

    fake = FakeControl(instant_same_url)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    session, _ = _session(tmp_path)
    await _run_until_running(session)
    gaps = [b.at - a.at for a, b in zip(fake.calls, fake.calls[1:], strict=False)]
    assert gaps[0] < 0.1  # the first repeats follow closely: an approval is seen at once
    assert max(gaps) == LOGIN_BACKOFF_MAX
    assert all(gap == LOGIN_BACKOFF_MAX for gap in gaps[80:])


async def test_an_http_error_to_a_followup_backs_off_and_starts_a_new_registration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def headscale_026_forgot(call: Call) -> proto.RegisterResponse:
        await trio.lowlevel.checkpoint()
        if call.followup == URL1:
            raise LoginFollowupFailed("the login server answered the login follow-up with HTTP 404")
        if not call.followup:
            return proto.RegisterResponse(AuthURL=URL1 if len(fake.calls) == 1 else URL2)
        return APPROVED

    fake = FakeControl(headscale_026_forgot)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    session, seen = _session(tmp_path)
    await _run_until_running(session)
    assert [c.followup for c in fake.calls] == ["", URL1, "", URL2]
    assert 0 < fake.calls[2].at - fake.calls[1].at <= LOGIN_BACKOFF_MAX
    assert _login_urls(seen) == [URL1, URL2]


async def test_a_connection_lost_while_waiting_is_redialed_and_the_same_url_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def headscale(call: Call) -> proto.RegisterResponse:
        await trio.sleep(1)
        return proto.RegisterResponse(AuthURL=URL1) if not call.followup else APPROVED

    fake = FakeControl(headscale)
    # the first two connections break under the Followup: before any netmap, yet not fatal
    fake.break_session = lambda call: bool(call.followup) and call.session <= 2
    monkeypatch.setattr(control, "open_session", fake.open_session)
    session, seen = _session(tmp_path)
    await _run_until_running(session)
    assert [(c.session, c.followup) for c in fake.calls] == [(1, ""), (1, URL1), (2, URL1), (3, URL1)]
    assert Status.RECONNECTING in [c.new for c in seen]
    assert _login_urls(seen) == [URL1, URL1, URL1]  # shown again in the status after each reconnect
    gaps = [b.at - a.at for a, b in zip(fake.calls[1:], fake.calls[2:], strict=False)]
    assert all(gap <= LOGIN_BACKOFF_MAX + 1 for gap in gaps), gaps
    assert session.fatal is None


async def test_an_expired_key_without_an_auth_key_logs_in_again_with_a_new_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def headscale_029(call: Call) -> proto.RegisterResponse:
        await trio.lowlevel.checkpoint()
        if call.renew_to is None:
            raise NodeKeyExpired("this node's key has expired")
        if not call.followup:
            return proto.RegisterResponse(AuthURL=URL1)
        return APPROVED

    fake = FakeControl(headscale_029)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    changed: list[bytes] = []
    session, seen = _session(tmp_path, on_key=changed.append)
    old_key = session.state.node_private
    await _run_until_running(session)
    new_key = fake.calls[1].renew_to
    assert new_key is not None and new_key != old_key
    assert [(c.renew_to, c.followup) for c in fake.calls] == [(None, ""), (new_key, ""), (new_key, URL1)]
    assert session.state.node_private == new_key and session.state.pending_node_private is None
    assert changed == [new_key]  # WireGuard and DERP get the new key
    assert _login_urls(seen) == [URL1]


async def test_a_planned_renewal_that_wants_a_login_keeps_the_current_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    async def headscale_029(call: Call) -> proto.RegisterResponse:
        await trio.lowlevel.checkpoint()
        return proto.RegisterResponse(AuthURL=URL1) if call.renew_to is not None else APPROVED

    fake = FakeControl(headscale_029)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    session, seen = _session(tmp_path)
    old_key = session.state.node_private
    from trionet.clock import wall
    session.key_expiry = wall() + 3600.0  # good for an hour: no admin needed yet
    await session.state.begin_node_key_renewal()
    await _run_until_running(session)
    assert [c.renew_to is not None for c in fake.calls] == [True, False]
    assert session.state.node_private == old_key and session.state.pending_node_private is None
    assert _login_urls(seen) == [] and session.renewal_time(wall()) == session.key_expiry


# ------------------------------------------------------------------ whole node
class _NodeFake(FakeControl):
    def __init__(self, approve_after: float) -> None:
        super().__init__(self._answer)
        self.approve_after = approve_after
        self.approved_at: float | None = None
        self.map_comes = True

    async def _answer(self, call: Call) -> proto.RegisterResponse:
        if not call.followup:
            await trio.lowlevel.checkpoint()
            return proto.RegisterResponse(AuthURL=URL1)
        await trio.sleep_until(self.approve_after)
        self.approved_at = trio.current_time()
        return APPROVED


def _node(tmp_path: Path) -> Node:
    return Node(config=NodeConfig("http://127.0.0.1:9", tmp_path, hostname="me", udp_bind="127.0.0.1",
                                  start_timeout=5.0))


async def test_a_node_waits_for_its_login_beyond_the_start_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    fake = _NodeFake(approve_after=trio.current_time() + 3600)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    node = _node(tmp_path)
    told: list[str] = []

    def tell(change: StatusChange) -> None:
        if change.login_url:
            told.append(change.login_url)

    node.status_machine.listeners.append(tell)
    async with trio.open_nursery() as nursery:
        async def watch_login() -> None:
            told.append(await node.wait_login_url())
            assert node.status()["login_url"] == URL1 and node.status()["status"] == "NeedsLogin"

        nursery.start_soon(watch_login)
        async with node:
            assert node.status()["status"] == "Running" and node.status()["login_url"] is None
            assert node.statistics()["control"]["interactive_logins"] == 1
    assert told == [URL1, URL1]  # the listener and wait_login_url
    assert fake.approved_at is not None and fake.approved_at >= 3600  # an hour, with a 5 s start timeout


async def test_after_the_login_the_start_timeout_counts_afresh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    fake = _NodeFake(approve_after=trio.current_time() + 600)

    async def no_map(self: Any, magic: Any) -> AsyncIterator[tuple[Netmap, Any]]:
        await trio.sleep_forever()
        yield  # pragma: no cover

    monkeypatch.setattr(_FakeConnection, "map_updates", no_map)
    monkeypatch.setattr(control, "open_session", fake.open_session)
    with pytest.raises(StartTimeout, match="not connected after 5 s"):
        async with _node(tmp_path):
            pass
    assert fake.approved_at is not None
    assert trio.current_time() - fake.approved_at == pytest.approx(5.0, abs=0.1)


async def test_wait_login_url_after_the_shown_url_returns_the_next_one(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    node = _node(tmp_path)
    machine = node.status_machine
    async with trio.open_nursery() as nursery:
        got: list[str] = []

        async def waiter() -> None:
            got.append(await node.wait_login_url(after=URL1))

        nursery.start_soon(waiter)
        machine.move(Status.CONNECTING)
        machine.move(Status.REGISTERING)
        machine.move(Status.NEEDS_LOGIN, "log in", login_url=URL1)
        await trio.sleep(1)
        assert got == []
        machine.move(Status.NEEDS_LOGIN, "log in", login_url=URL2)
    assert got == [URL2]
    machine.move(Status.ERROR, "refused")
    with pytest.raises(TransportError, match="Error"):
        await node.wait_login_url(after=URL2)
