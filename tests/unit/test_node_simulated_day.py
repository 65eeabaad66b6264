"""Two whole Nodes through a simulated day, under MockClock: no real-time waits.

Each Node is complete (magicsock with a real UDP socket on loopback, WireGuard,
the netstack, the control session); they reach each other directly over UDP and
through an in-process DERP relay on loopback TCP. Only Headscale is played by a
fake at the `control.open_session` boundary: it registers, renews node keys
(6-hour keys, so each node renews about every 4 hours), records endpoints and
pushes netmaps to both sides, as Headscale does.

Over 24 simulated hours: a TCP exchange every 5 minutes (each after the
WireGuard session went stale: a fresh handshake every time), node-key renewals
on both sides (the peer learns each new key and traffic carries on), and a
10-minute DERP outage whose redials follow the backoff schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.unit.derp.fakerelay import FakeRelay
from trionet import control, keys, proto
from trionet.clock import wall
from trionet.config import NodeConfig
from trionet.control.netmap import Netmap
from trionet.derp import frames
from trionet.node import Node

KEY_LIFETIME = 6 * 3600.0
DAY = 24 * 3600.0
EXCHANGE_EVERY = 300.0
ECHO_PORT = 7000
ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]


def go_time(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeHeadscale:
    """Headscale's side of the control protocol, for in-process nodes."""

    def __init__(self, relay_port: int) -> None:
        self.relay_port = relay_port
        self.records: dict[str, dict[str, Any]] = {}  # by hostname
        self.changed = trio.Event()
        self.renewals = 0

    def _bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def record(self, hostname: str) -> dict[str, Any]:
        if hostname not in self.records:
            n = len(self.records) + 1
            self.records[hostname] = {"ID": n, "Addresses": [f"100.64.0.{n}/32", f"fd7a:115c:a1e0::{n}/128"],
                                      "Endpoints": [], "DiscoKey": None, "Key": None, "KeyExpiry": 0.0}
        return self.records[hostname]

    def node(self, hostname: str) -> dict[str, Any]:
        r = self.records[hostname]
        return {"ID": r["ID"], "Name": f"{hostname}.ts.test.", "Key": r["Key"], "KeyExpiry": go_time(r["KeyExpiry"]),
                "DiscoKey": r["DiscoKey"], "Addresses": r["Addresses"], "AllowedIPs": r["Addresses"],
                "Endpoints": r["Endpoints"], "HomeDERP": 1, "Hostinfo": {"Hostname": hostname},
                "Online": True, "MachineAuthorized": True}

    def map_response(self, me: str) -> proto.MapResponse:
        derp = {"Regions": {1: {"RegionID": 1, "RegionCode": "sim", "Nodes": [
            {"Name": "1a", "RegionID": 1, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
             "DERPPort": self.relay_port, "STUNPort": -1}]}}}
        peers = [self.node(h) for h, r in self.records.items() if h != me and r["DiscoKey"]]
        return proto.structure({"Node": self.node(me), "Peers": peers, "DERPMap": derp,
                                "PacketFilter": ALLOW_ALL}, proto.MapResponse)

    @asynccontextmanager
    async def open_session(self, config: Any, state: Any) -> AsyncIterator[FakeConnection]:
        yield FakeConnection(self, config.hostname, state)


class FakeConnection:
    def __init__(self, server: FakeHeadscale, hostname: str, state: Any) -> None:
        self.server, self.hostname, self.state = server, hostname, state

    async def register(self, renew_to: bytes | None = None) -> proto.RegisterResponse:
        record = self.server.record(self.hostname)
        key = keys.public_of(renew_to) if renew_to is not None else self.state.node_public
        if renew_to is not None:
            self.server.renewals += 1
        record["Key"] = keys.format_key("nodekey:", key)
        record["KeyExpiry"] = wall() + KEY_LIFETIME
        self.state.node_key_since = wall()
        self.server._bump()
        await trio.lowlevel.checkpoint()
        return proto.RegisterResponse(MachineAuthorized=True)

    async def lite_update(self, endpoints: list[str], types: list[int], home_region: int,
                          net_info: dict[str, Any] | None = None) -> None:
        self.server.record(self.hostname)["Endpoints"] = list(endpoints)
        self.server._bump()
        await trio.lowlevel.checkpoint()

    async def map_updates(self, magic: Any) -> AsyncIterator[tuple[Netmap, Any]]:
        record = self.server.record(self.hostname)
        record["DiscoKey"] = keys.format_key("discokey:", magic.disco_public)
        self.server._bump()
        netmap = Netmap()
        while True:
            changed = self.server.changed
            yield netmap, netmap.apply(self.server.map_response(self.hostname))
            await changed.wait()


class Relay:
    """FakeRelay that sends DERP keepalives, as a real server does, and can be taken down."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.relay = FakeRelay()
        self.nursery = nursery
        self.scope: trio.CancelScope | None = None
        self.relay.after_login = self._logged_in

    def _logged_in(self, stream: trio.SocketStream, who: bytes) -> None:
        with contextlib.suppress(RuntimeError):  # the test is over and its nursery closing
            self.nursery.start_soon(self._keepalive, stream)

    async def _keepalive(self, stream: trio.SocketStream) -> None:
        try:
            while True:
                await trio.sleep(frames_keepalive_interval())
                await stream.send_all(frames.build_keep_alive())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def up(self) -> None:
        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                self.scope = scope
                listeners = await trio.open_tcp_listeners(self.relay.port, host="127.0.0.1")
                self.relay.port = listeners[0].socket.getsockname()[1]
                task_status.started()
                await trio.serve_listeners(self.relay._handle, listeners)

        await self.nursery.start(serve)

    def down(self) -> None:
        assert self.scope is not None
        self.scope.cancel()
        for stream in list(self.relay.clients.values()):
            self.nursery.start_soon(trio.aclose_forcefully, stream)
        self.relay.clients.clear()


def frames_keepalive_interval() -> float:
    from trionet.derp.client import KEEPALIVE_INTERVAL

    return KEEPALIVE_INTERVAL


async def echo_server(node: Node) -> None:
    listener = await node.listen_tcp(ECHO_PORT)

    async def echo(stream: trio.abc.Stream) -> None:
        async with stream:
            while data := await stream.receive_some(4096):
                await stream.send_all(data)

    await trio.serve_listeners(echo, [listener])


async def _inline(sync_fn: Any, *args: Any, **kwargs: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return sync_fn(*args)


async def test_two_nodes_through_a_simulated_day(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 autojump_clock: trio.testing.MockClock) -> None:
    # State files are written in worker threads; while the loop waits for one, a MockClock
    # with autojump_threshold=0 jumps to the next deadline. Here they are written inline.
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)
    async with trio.open_nursery() as outer:
        relay = Relay(outer)
        await relay.up()
        server = FakeHeadscale(relay.relay.port)
        monkeypatch.setattr(control, "open_session", server.open_session)
        login = f"http://127.0.0.1:{relay.relay.port}"  # Headscale's embedded DERP lives on its URL
        a = Node(config=NodeConfig(login, tmp_path / "a", auth_key="k", hostname="a", udp_bind="127.0.0.1"))
        b = Node(config=NodeConfig(login, tmp_path / "b", auth_key="k", hostname="b", udp_bind="127.0.0.1"))
        start = trio.current_time()
        async with a, b:
            outer.start_soon(echo_server, a)
            exchanges, failures = 0, []
            outage = (8 * 3600.0, 8 * 3600.0 + 600.0)
            derp_attempts_before = derp_attempts_after = 0
            slots = int(DAY // EXCHANGE_EVERY)
            for slot in range(slots):  # an exchange every 5 minutes, on a fixed grid
                await trio.sleep_until(start + slot * EXCHANGE_EVERY)
                elapsed = trio.current_time() - start
                if outage[0] <= elapsed < outage[1]:
                    if relay.scope is not None and not relay.scope.cancel_called:
                        derp_attempts_before = derp_stats(b)["connect_attempts"]
                        relay.down()
                    continue
                if relay.scope is not None and relay.scope.cancel_called:
                    derp_attempts_after = derp_stats(b)["connect_attempts"]
                    await relay.up()
                try:
                    with trio.fail_after(60):
                        stream = await b.open_tcp_stream("a", ECHO_PORT)
                        message = b"hello at %d" % int(elapsed)
                        await stream.send_all(message)
                        got = b""
                        while len(got) < len(message):
                            got += await stream.receive_some(4096)
                        await stream.aclose()
                    if got != message:
                        failures.append(f"{elapsed:.0f}: {got!r}")
                    exchanges += 1
                except Exception as exc:  # counted: the assertions below say how many
                    failures.append(f"{elapsed:.0f}: {exc!r}")
            await trio.sleep_until(start + DAY)
            assert a.wg is not None and b.wg is not None
            result = {
                "exchanges": exchanges, "failures": failures, "renewals": server.renewals,
                "a_renewals": a.control.renewals if a.control else 0,
                "b_renewals": b.control.renewals if b.control else 0,
                "handshakes": a.wg.counters["handshakes_completed"] + b.wg.counters["handshakes_completed"],
                "derp_outage_attempts": derp_attempts_after - derp_attempts_before,
                "derp_connected": derp_stats(b)["connected"],
                "keys_agree": all(server.records[n.config.hostname]["Key"]
                                  == keys.format_key("nodekey:", n.keys.node_public) for n in (a, b) if n.keys),
                "internal_errors": {k: v for n in (a, b) for k, v in flat(n.statistics()).items()
                                    if "internal_error" in k and v},
            }
            outer.cancel_scope.cancel()
    print(result)
    assert trio.current_time() - start >= DAY
    outage_slots = int(600 // EXCHANGE_EVERY)
    assert result["exchanges"] == DAY // EXCHANGE_EVERY - outage_slots  # every slot but the outage's
    assert not result["failures"], result["failures"]
    # 6-hour keys renewed a third of their life early: every 4 hours on each side
    assert result["a_renewals"] >= 5 and result["b_renewals"] >= 5, result
    # (a renewal the server saw may be asked again if its session ended before the answer)
    assert result["renewals"] >= result["a_renewals"] + result["b_renewals"]
    assert result["keys_agree"], "the server and each node hold the same current node key"
    # each exchange found the session stale (more than 180 s idle): a new handshake each time
    assert result["handshakes"] >= result["exchanges"] * 0.9, result
    # redials during a 10-minute outage follow the backoff (1, 2, 4 ... 60 s): about 14, not 600
    assert 8 <= result["derp_outage_attempts"] <= 20, result
    assert result["derp_connected"]
    assert not result["internal_errors"], result["internal_errors"]


def derp_stats(node: Node) -> dict[str, Any]:
    assert node.magic is not None
    conn = node.magic.derps[1]
    return conn.statistics()


def flat(stats: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(stats, dict):
        return {prefix: stats}
    out: dict[str, Any] = {}
    for key, value in stats.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
