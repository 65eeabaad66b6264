"""Interactive login, pure parts: URL shapes, the approval command, the back-off;
the client's Followup request; the status machine's NeedsLogin; the daemon's words."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import pytest
import trio
import trio.testing

from trionet import keys, proto
from trionet.config import NodeConfig
from trionet.control.client import (
    LIVENESS_INTERVAL,
    LIVENESS_TIMEOUT,
    ControlConnection,
    H2Connection,
    LoginFollowupFailed,
)
from trionet.control.login import (
    LOGIN_BACKOFF_MAX,
    approval_command,
    check_login_url,
    login_backoff_delay,
    login_instructions,
)
from trionet.daemon.run import _StatusPrinter
from trionet.errors import AuthError, LocalProtocolError, RemoteProtocolError, TransportError
from trionet.status import Status, StatusChange, StatusMachine

MKEY = "mkey:" + "ab" * 32
HS023_URL = f"https://hs.test:8443/register/{MKEY}"
HS029_URL = "https://hs.test:8443/register/hskey-authreq-AbCdEfGhIjKlMnOpQrStUvWx"


# ------------------------------------------------------------------ URL shapes
def test_the_approval_command_follows_the_url_shape_of_each_headscale_version() -> None:
    assert approval_command(HS023_URL) == f"headscale nodes register --user USER --key {MKEY}"
    assert approval_command(HS029_URL) == ("headscale auth register --auth-id hskey-authreq-AbCdEfGhIjKlMnOpQrStUvWx"
                                           " --user USER")
    # 0.24 to 0.28: a bare registration id, approved with nodes register --key
    assert approval_command("https://hs.test/register/AbCdEfGhIjKlMnOpQrStUvWx", user="alice") == \
        "headscale nodes register --user alice --key AbCdEfGhIjKlMnOpQrStUvWx"


@pytest.mark.parametrize("url", [
    "https://hs.test/oidc/register/" + MKEY,  # OIDC: the identity provider approves
    "https://login.example/a/b",  # not Headscale's shape
    "https://hs.test/register/",  # no id
    "https://hs.test/register/a;rm%20-rf",  # an id that would need shell quoting
])
def test_no_command_is_offered_for_urls_it_cannot_approve(url: str) -> None:
    assert approval_command(url) is None
    assert url in login_instructions(url) and "headscale" not in login_instructions(url)


def test_the_instructions_name_the_url_and_the_command() -> None:
    text = login_instructions(HS029_URL)
    assert HS029_URL in text
    assert "headscale auth register --auth-id hskey-authreq-AbCdEfGhIjKlMnOpQrStUvWx --user USER" in text
    assert "on the Headscale server" in text


@pytest.mark.parametrize("url", [
    "", "javascript:alert(1)", "ftp://hs.test/register/x", "https:///register/x",
    "https://hs.test/register/\x1b[2Jx", "https://hs.test/register/a b", "https://hs.test/" + "a" * 3000,
    "https://hs.test/register/\u00e9",
])
def test_a_login_url_that_is_not_plain_http_is_refused(url: str) -> None:
    with pytest.raises(RemoteProtocolError):
        check_login_url(url)


def test_a_plain_login_url_is_taken_as_it_is() -> None:
    assert check_login_url(HS029_URL) == HS029_URL


def test_login_backoff_grows_as_tailscaleds_and_never_passes_30_s() -> None:
    rng = random.Random(7)
    assert login_backoff_delay(0, rng) == 0.0
    assert 0.005 <= login_backoff_delay(1, rng) <= 0.015  # 10 ms x 0.5-1.5
    assert 0.5 <= login_backoff_delay(10, rng) <= 1.5
    delays = [login_backoff_delay(n, rng) for n in range(1000)]
    assert max(delays) == LOGIN_BACKOFF_MAX == 30.0
    assert all(d == 30.0 for d in delays[78:])  # 78^2 x 10 ms x 0.5 > 30 s


# ---------------------------------------------------------------- status machine
def test_needs_login_carries_its_url_and_announces_a_new_one() -> None:
    seen: list[StatusChange] = []
    machine = StatusMachine(listeners=[seen.append])
    machine.move(Status.CONNECTING)
    machine.move(Status.REGISTERING)
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=HS029_URL)
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=HS029_URL)  # same URL: nothing new
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=HS023_URL)  # a new URL: news
    assert [(c.old, c.new, c.login_url) for c in seen[2:]] == [
        (Status.REGISTERING, Status.NEEDS_LOGIN, HS029_URL), (Status.NEEDS_LOGIN, Status.NEEDS_LOGIN, HS023_URL)]
    assert machine.login_url == HS023_URL
    machine.move(Status.REGISTERING, "login approved")
    assert machine.login_url == "" and seen[-1].login_url == ""
    machine.move(Status.RUNNING)
    machine.move(Status.NEEDS_LOGIN, "key expired", login_url=HS029_URL)  # from Running: an expired key
    with pytest.raises(LocalProtocolError):
        machine.move(Status.NEEDS_LOGIN)  # NeedsLogin without a URL
    with pytest.raises(LocalProtocolError):
        machine.move(Status.RUNNING, login_url=HS029_URL)  # a URL without NeedsLogin


# --------------------------------------------------------------------- daemon
def test_up_tells_each_login_url_once_on_stderr_and_in_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    machine = StatusMachine(listeners=[_StatusPrinter(as_json=True)])
    machine.move(Status.CONNECTING)
    machine.move(Status.REGISTERING)
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=HS029_URL)
    machine.move(Status.RECONNECTING, "lost")  # a reconnect while waiting shows the same URL again
    machine.move(Status.CONNECTING)
    machine.move(Status.REGISTERING)
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=HS029_URL)
    new_url = HS029_URL[:-1] + "y"
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=new_url)  # expired: a new URL
    out, err = capsys.readouterr()
    assert err.count("To log in, visit:") == 2
    assert err.count(HS029_URL) == 1 and err.count(new_url) == 1
    assert "headscale auth register --auth-id hskey-authreq-AbCdEfGhIjKlMnOpQrStUvWx --user USER" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [doc.get("login_url") for doc in lines if doc["status"] == "NeedsLogin"] == [HS029_URL, HS029_URL, new_url]
    assert all("login_url" not in doc for doc in lines if doc["status"] != "NeedsLogin")


def test_a_later_login_is_told_again_even_with_the_same_url(capsys: pytest.CaptureFixture[str]) -> None:
    machine = StatusMachine(listeners=[_StatusPrinter(as_json=False)])
    machine.move(Status.CONNECTING)
    machine.move(Status.REGISTERING)
    machine.move(Status.NEEDS_LOGIN, "log in", login_url=HS023_URL)
    machine.move(Status.REGISTERING, "login approved")
    machine.move(Status.RUNNING)
    machine.move(Status.NEEDS_LOGIN, "key expired", login_url=HS023_URL)  # 0.23: the machine key's URL again
    assert capsys.readouterr().err.count(HS023_URL) == 2


# --------------------------------------------------------------------- client
class ScriptedH2:
    """The HTTP/2 side of a ControlConnection: records requests, answers from a script."""

    def __init__(self, answers: list[tuple[int, Any]], ping_answers: bool = True) -> None:
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        self.ping_answers = ping_answers
        self.pings = 0
        self.hold = trio.Event()
        self.hold_requests = False

    async def simple(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        self.requests.append(json.loads(body))
        if self.hold_requests:
            await self.hold.wait()
        status, doc = self.answers.pop(0)
        return status, (json.dumps(doc) if not isinstance(doc, str) else doc).encode()

    async def ping(self) -> None:
        self.pings += 1
        if not self.ping_answers:
            await trio.sleep_forever()
        await trio.sleep(0.05)


def _conn(tmp_path: Path, h2conn: ScriptedH2, auth_key: str | None = None) -> ControlConnection:
    state = keys.load_or_create_state(tmp_path)
    return ControlConnection(NodeConfig("https://hs.test:8443", tmp_path, auth_key=auth_key, hostname="n"),
                             state, h2conn)  # type: ignore[arg-type]


async def test_without_an_auth_key_the_auth_url_is_returned_and_followed_without_auth(tmp_path: Path) -> None:
    h2c = ScriptedH2([(200, {"AuthURL": HS029_URL}), (200, {"MachineAuthorized": True, "User": {"ID": 1}})])
    conn = _conn(tmp_path, h2c)
    first = await conn.register()
    assert first.AuthURL == HS029_URL
    assert "registered_server" not in conn.state.extra  # nothing committed for a pending login
    done = await conn.register(followup=HS029_URL)
    assert done.MachineAuthorized and not done.AuthURL
    assert [r.get("Followup") for r in h2c.requests] == [None, HS029_URL]
    assert all("Auth" not in r for r in h2c.requests)
    assert {r["NodeKey"] for r in h2c.requests} == {keys.format_key("nodekey:", conn.state.node_public)}
    assert conn.state.extra["registered_server"] == "https://hs.test:8443"


async def test_a_followup_answered_with_an_http_error_is_login_followup_failed(tmp_path: Path) -> None:
    conn = _conn(tmp_path, ScriptedH2([(404, "followup registration not found")]))
    with pytest.raises(LoginFollowupFailed, match=r"404.*followup registration not found"):
        await conn.register(followup=HS029_URL)


async def test_an_auth_url_despite_an_auth_key_is_an_auth_error(tmp_path: Path) -> None:
    conn = _conn(tmp_path, ScriptedH2([(200, {"AuthURL": HS029_URL})]), auth_key="hskey-auth-x")
    with pytest.raises(AuthError, match="interactive login"):
        await conn.register()


async def test_a_hostile_auth_url_is_refused(tmp_path: Path) -> None:
    conn = _conn(tmp_path, ScriptedH2([(200, {"AuthURL": "https://hs.test/\x1b]0;owned\x07"})]))
    with pytest.raises(RemoteProtocolError):
        await conn.register()


async def test_a_followup_waits_as_long_as_the_connection_answers_pings(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    h2c = ScriptedH2([(200, {"MachineAuthorized": True})])
    h2c.hold_requests = True
    conn = _conn(tmp_path, h2c)
    async with trio.open_nursery() as nursery:
        async def approve_after_an_hour() -> None:
            await trio.sleep(3600)
            h2c.hold.set()

        nursery.start_soon(approve_after_an_hour)
        start = trio.current_time()
        resp = await conn.register(followup=HS029_URL)
    assert resp.MachineAuthorized
    assert trio.current_time() - start >= 3600  # no timeout of ours cut the wait short
    assert h2c.pings >= 3600 // LIVENESS_INTERVAL - 1


async def test_a_followup_on_a_dead_connection_fails_once_pings_go_unanswered(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    h2c = ScriptedH2([], ping_answers=False)
    h2c.hold_requests = True
    conn = _conn(tmp_path, h2c)
    start = trio.current_time()
    with pytest.raises(TransportError, match="stopped answering"):
        await conn.register(followup=HS029_URL)
    assert trio.current_time() - start == pytest.approx(LIVENESS_INTERVAL + LIVENESS_TIMEOUT)


async def test_h2_ping_is_answered_by_an_http2_server() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()

    async def serve() -> None:
        await server_side.send_all(server.data_to_send())
        while data := await server_side.receive_some(65536):
            server.receive_data(data)  # h2 queues the PING ACK itself
            await server_side.send_all(server.data_to_send())

    conn = H2Connection(client_side, "hs.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await conn.start()
        nursery.start_soon(conn.reader)
        with trio.fail_after(10):
            await conn.ping()
            await conn.ping()
        assert conn.pings == {}  # nothing left waiting
        nursery.cancel_scope.cancel()


def test_register_response_fields_for_login() -> None:
    resp = proto.loads(json.dumps({"AuthURL": HS023_URL, "MachineAuthorized": False, "NodeKeyExpired": False,
                                   "User": {}, "Login": {}, "Error": ""}).encode(), proto.RegisterResponse)
    assert resp.AuthURL == HS023_URL and not resp.MachineAuthorized
