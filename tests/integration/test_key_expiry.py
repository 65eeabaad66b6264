"""Our node key nearing expiry, and expired, against real Headscale and tailscaled.

Headscale sets the expiry (`headscale nodes expire`); trionet must renew the
key before it passes (a new node key registered with OldNodeKey and the auth
key), log in again after it passed, or say clearly why it cannot.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.services import PeerServices
from tests.integration.test_node import http_get_sha
from tests.realstack import Stack
from trionet import Node
from trionet.keys import format_key, load_state, public_of

pytestmark = [pytest.mark.integration, pytest.mark.netns]

HTTP_PORT = 8100


@pytest.fixture(scope="module")
def ts1_services(newest_stack: Stack) -> Iterator[PeerServices]:
    svc = PeerServices(newest_stack, newest_stack.tailscaleds[0], http_port=HTTP_PORT, udp_port=9100,
                       blob_mb=1).start()
    yield svc
    svc.stop()


def node_for(stack: Stack, state: Path, hostname: str, key: str) -> Node:
    return Node(login_server=stack.server_url, auth_key=key, state_dir=state, hostname=hostname,
                ca_file=stack.ca_file, udp_bind=stack.local_ip)


def hs_node(stack: Stack, hostname: str) -> dict[str, Any]:
    node = stack.node_by_hostname(hostname)
    assert node is not None, f"{hostname} not in headscale"
    return node


def expire(stack: Stack, hostname: str, at: datetime.datetime | None = None) -> None:
    args = ["nodes", "expire", "-i", str(hs_node(stack, hostname)["id"])]
    if at is not None:
        args += ["--expiry", at.strftime("%Y-%m-%dT%H:%M:%SZ")]
    stack.headscale(*args)


def hs_expiry(node: dict[str, Any]) -> float | None:
    """Headscale's JSON expiry (protobuf Timestamp) in epoch seconds; None when unset."""
    exp = node.get("expiry")
    if not exp:
        return None
    secs = float(exp.get("seconds", 0)) if isinstance(exp, dict) else 0.0
    return secs if secs > 0 else None


def state_node_key(state_dir: Path) -> str:
    state = load_state(state_dir)
    assert state is not None
    return format_key("nodekey:", public_of(state.node_private))


async def fetch(node: Node, svc: PeerServices, timeout: float) -> str:
    """The blob's sha256 from ts1 through the node, retrying while paths settle."""
    with trio.fail_after(timeout):
        while True:
            try:
                with trio.fail_after(5):
                    stream = await node.open_tcp_stream("ts1", svc.http_port)
                    digest = (await http_get_sha(stream, "/blob"))[1]
                await stream.aclose()
                return digest
            except (trio.TooSlowError, trio.BrokenResourceError, OSError):
                await trio.sleep(0.2)


async def wait_until(pred: Any, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.2)
    assert pred(), what


def ts1_sees(stack: Stack, node_key: str) -> bool:
    peers = stack.tailscaleds[0].status().get("Peer") or {}
    return any(p.get("PublicKey") == node_key for p in peers.values())


async def test_key_renewed_before_expiry_and_streams_carry_on(newest_stack: Stack, ts1_services: PeerServices,
                                                              tmp_path: Path) -> None:
    stack = newest_stack
    async with node_for(stack, tmp_path, "py-renew", stack.preauth_key()) as node:
        assert await fetch(node, ts1_services, 20) == ts1_services.blob_sha256
        old_key = state_node_key(tmp_path)
        # A stream opened under the old key; its request goes out after the renewal.
        early = await node.open_tcp_stream("ts1", ts1_services.http_port)
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=45)
        await trio.to_thread.run_sync(expire, stack, "py-renew", soon)
        await wait_until(lambda: node.control.key_expiry is not None, 10, "the new expiry in our netmap")
        started = trio.current_time()
        await wait_until(lambda: node.control.renewals >= 1, 45, "renewed before expiry")
        renewed_after = trio.current_time() - started
        new_key = state_node_key(tmp_path)
        assert new_key != old_key and node.status()["node_key"] == new_key
        assert node.status()["status"] == "Running"
        hs = await trio.to_thread.run_sync(hs_node, stack, "py-renew")
        assert hs["node_key"] == new_key, hs
        assert hs_expiry(hs) is None or hs_expiry(hs) > soon.timestamp() + 60, hs  # the expiry moved on
        await wait_until(lambda: ts1_sees(stack, new_key), 15, "ts1 knows our new node key")
        t0 = trio.current_time()
        assert await fetch(node, ts1_services, 15) == ts1_services.blob_sha256
        resumed = trio.current_time() - t0
        with trio.fail_after(15):
            assert (await http_get_sha(early, "/blob"))[1] == ts1_services.blob_sha256
        await early.aclose()
        assert json.loads((tmp_path / "state.json").read_text()).get("pending_node_private") is None
        print(f"\nrenewed {renewed_after:.1f} s after the expiry was set; traffic under the new key "
              f"in {resumed:.1f} s; the stream opened before the renewal finished its transfer")


async def test_expired_key_logs_in_again_with_a_reusable_key(stack: Stack, tmp_path: Path) -> None:
    svc = PeerServices(stack, stack.tailscaleds[0], http_port=HTTP_PORT + 1, udp_port=9101, blob_mb=1).start()
    hostname = f"py-expired-{stack.version.replace('.', '')}"
    try:
        async with node_for(stack, tmp_path, hostname, stack.preauth_key()) as node:
            assert await fetch(node, svc, 20) == svc.blob_sha256
            old_key = state_node_key(tmp_path)
            await trio.to_thread.run_sync(expire, stack, hostname)
            started = trio.current_time()
            await wait_until(lambda: node.control.renewals >= 1, 30, "logged in again after expiry")
            hs = await trio.to_thread.run_sync(hs_node, stack, hostname)
            new_key = state_node_key(tmp_path)
            assert new_key != old_key and hs["node_key"] == new_key, hs
            assert hs_expiry(hs) is None or hs_expiry(hs) > datetime.datetime.now().timestamp(), hs
            assert await fetch(node, svc, 20) == svc.blob_sha256
            assert node.status()["status"] == "Running"
            print(f"\nHeadscale {stack.version}: expired, logged in again and serving after "
                  f"{trio.current_time() - started:.1f} s")
    finally:
        svc.stop()


async def test_expired_key_without_a_usable_auth_key_is_a_clear_error(stack: Stack, tmp_path: Path) -> None:
    hostname = f"py-noreauth-{stack.version.replace('.', '')}"
    async with node_for(stack, tmp_path, hostname, stack.preauth_key(reusable=False)) as node:
        await trio.to_thread.run_sync(expire, stack, hostname)
        await wait_until(lambda: node.status()["status"] == "Error", 30, "Error status after expiry")
        reason = node.status()["reason"]
        assert "expired" in reason and "auth key" in reason, reason
        assert node.control.fatal is not None and "Traceback" not in reason
        # the state file still holds the old key: nothing half-renewed is left behind
        assert json.loads((tmp_path / "state.json").read_text()).get("pending_node_private") is None
        print(f"\nHeadscale {stack.version}: {reason}")
