"""Interactive login (issue 17, deliverable 4) against real Headscale and tailscaled.

`trionet up` starts without an auth key; the test reads the login URL and the
approval command from its stderr (and the URL from `status --json`), plays the
admin by running that command on Headscale's CLI exactly as printed (USER
filled in), and then moves a sha256-checked file from a tailscaled peer through
trionet's SOCKS5 proxy. On Headscale 0.29 a registration left to expire gives a
new URL, which trionet shows and which then gets approved.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.login_helpers import (
    ADMIN_USER,
    LoginDaemon,
    approve,
    forget_node,
    set_register_cache_expiration,
)
from tests.integration.services import PeerServices, sha256_file
from tests.integration.test_node import http_get_sha
from tests.realstack import NEWEST_HEADSCALE, Stack, run, wait_for
from trionet import Node
from trionet.status import StatusChange

pytestmark = [pytest.mark.integration, pytest.mark.netns]

HTTP_PORT = 8010  # apart from other modules' PeerServices on the same peer
UDP_PORT = 9990


@pytest.fixture(scope="module")
def peer_files(stack: Stack) -> Iterator[PeerServices]:
    svc = PeerServices(stack, stack.tailscaleds[0], http_port=HTTP_PORT, udp_port=UDP_PORT, blob_mb=8).start()
    yield svc
    svc.stop()


def _expected_command_start(stack: Stack) -> str:
    return ("headscale auth register --auth-id hskey-authreq-" if stack.version == NEWEST_HEADSCALE
            else "headscale nodes register --user USER --key mkey:")


def test_up_without_an_auth_key_is_approved_on_headscale_and_carries_traffic(
        stack: Stack, peer_files: PeerServices, tmp_path: Path) -> None:
    hostname = f"py-login-{stack.version.replace('.', '')}"
    # --timeout 5: the wait for the admin below is longer, and must not end the start
    daemon = LoginDaemon(stack, tmp_path / "state", "--socks5", "11091", "--json", "--timeout", "5",
                         hostname=hostname)
    try:
        url, command = daemon.wait_told(1)
        told_at = time.monotonic()
        assert url.startswith(f"{stack.server_url}/register/"), url
        assert command is not None and command.startswith(_expected_command_start(stack)), command
        assert url.rsplit("/", 1)[1] in command  # the command approves this very URL
        status = daemon.status()
        assert (status["status"], status["login_url"]) == ("NeedsLogin", url)
        assert url in daemon.cli("status").stdout and command in daemon.cli("status").stdout
        assert {"status": "NeedsLogin", "login_url": url}.items() <= daemon.json_lines()[-1].items()

        # the admin takes longer than --timeout: trionet keeps waiting, with the same URL
        wait_for(lambda: time.monotonic() - told_at > 7, 10, "7 s to pass")
        daemon.check_alive()
        assert daemon.status()["login_url"] == url
        approve(stack, command)

        status = daemon.wait_running()
        assert status["login_url"] is None
        assert status["stats"]["control"]["interactive_logins"] == 1
        assert daemon.told_logins() == [(url, command)]  # told once, though 0.23 repeats it every 5 s
        node = stack.node_by_hostname(hostname)
        assert node is not None and ADMIN_USER in str(node.get("user")), node

        out = tmp_path / "blob"
        got = subprocess.run(["curl", "-sS", "--max-time", "120", "-o", str(out), "--socks5-hostname",
                              "127.0.0.1:11091", f"http://ts1:{HTTP_PORT}/blob"], capture_output=True)
        assert got.returncode == 0, got.stderr
        assert sha256_file(out) == peer_files.blob_sha256

        # a restart logs in with the registered key: no URL this time
        daemon.stop()
        assert daemon.proc.returncode == 0, daemon.stderr[-3000:]
        daemon = LoginDaemon(stack, tmp_path / "state", "--socks5", "11091", hostname=hostname)
        daemon.wait_running()
        assert daemon.told_logins() == []
    finally:
        daemon.stop()
        forget_node(stack, hostname)


async def test_a_library_node_logs_in_through_an_admin_and_fetches(newest_stack: Stack, tmp_path: Path) -> None:
    stack = newest_stack
    hostname = "py-login-lib"
    peer_files = PeerServices(stack, stack.tailscaleds[0], http_port=HTTP_PORT + 1, udp_port=UDP_PORT + 1,
                              blob_mb=4).start()
    node = Node(login_server=stack.server_url, state_dir=tmp_path, hostname=hostname, ca_file=stack.ca_file,
                udp_bind=stack.local_ip)
    told: list[str] = []

    def on_status(change: StatusChange) -> None:  # as the README shows
        if change.login_url:
            told.append(change.login_url)

    node.status_machine.listeners.append(on_status)
    approvals: list[subprocess.CompletedProcess[str]] = []

    async def admin() -> None:
        url = await node.wait_login_url()
        auth_id = url.rsplit("/", 1)[1]
        command = f"headscale auth register --auth-id {auth_id} --user USER"
        await trio.to_thread.run_sync(lambda: approvals.append(approve(stack, command)))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admin)
            async with node:
                assert node.status()["status"] == "Running" and node.status()["login_url"] is None
                stream = await node.open_tcp_stream("ts1", HTTP_PORT + 1)
                with trio.fail_after(120):
                    size, digest = await http_get_sha(stream, "/blob")
                await stream.aclose()
                assert (size, digest) == (peer_files.blob_size, peer_files.blob_sha256)
        assert len(told) == 1 and len(approvals) == 1
    finally:
        peer_files.stop()
        forget_node(stack, hostname)


def test_an_expired_registration_gives_a_new_url_that_is_shown_and_approved(
        make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    stack = make_stack(version=NEWEST_HEADSCALE, tailscaleds=0)
    set_register_cache_expiration(stack, "15s")
    daemon = LoginDaemon(stack, tmp_path / "state", hostname="py-login-expiry")
    try:
        first_url, first_command = daemon.wait_told(1)
        # Headscale evicts the registration after 15 s; the held Followup then returns a new URL
        second_url, second_command = daemon.wait_told(2, timeout=90)
        assert second_url != first_url and second_command is not None and first_command is not None
        assert daemon.status()["login_url"] == second_url
        # the expired one cannot be approved any more; the new one can
        stale = run(stack.headscale_cmd(*first_command.replace("USER", ADMIN_USER).split()[1:]), check=False)
        assert stale.returncode != 0, stale.stdout
        approve(stack, second_command)
        status = daemon.wait_running()
        assert status["self"]["name"].startswith("py-login-expiry"), status["self"]
        assert [u for u, _ in daemon.told_logins()][:2] == [first_url, second_url]
    finally:
        daemon.stop()


def test_an_expired_key_without_an_auth_key_asks_for_a_login_again(
        stack: Stack, peer_files: PeerServices, tmp_path: Path) -> None:
    hostname = f"py-relogin-{stack.version.replace('.', '')}"
    daemon = LoginDaemon(stack, tmp_path / "state", "--socks5", "11092", hostname=hostname)
    try:
        _, command = daemon.wait_told(1)
        assert command is not None
        approve(stack, command)
        first_key = daemon.wait_running()["node_key"]
        node = stack.node_by_hostname(hostname)
        assert node is not None
        stack.headscale("nodes", "expire", "--identifier", str(node["id"]))  # the admin expires our key

        url, command = daemon.wait_told(2)  # told again (on 0.23 it is the same machine-key URL)
        assert command is not None and command.startswith(_expected_command_start(stack)), command
        status = daemon.status()
        assert (status["status"], status["login_url"]) == ("NeedsLogin", url)
        approve(stack, command)
        status = daemon.wait_running()
        assert status["node_key"] != first_key  # a new node key, as tailscaled's regen
        assert stack.node_by_hostname(hostname)["node_key"] == status["node_key"]  # type: ignore[index]
        assert status["stats"]["control"]["interactive_logins"] == 2

        out = tmp_path / "blob"
        got = subprocess.run(["curl", "-sS", "--max-time", "120", "--retry", "5", "--retry-all-errors",
                              "-o", str(out), "--socks5-hostname", "127.0.0.1:11092",
                              f"http://ts1:{HTTP_PORT}/blob"], capture_output=True)
        assert got.returncode == 0, got.stderr
        assert sha256_file(out) == peer_files.blob_sha256
    finally:
        daemon.stop()
        forget_node(stack, hostname)
