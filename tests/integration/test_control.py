"""Joining a real tailnet, against Headscale 0.23.0 and the newest release."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.realstack import HEADSCALE_VERSIONS, REPO, Stack, wait_for
from trionet import Node
from trionet.keys import format_key, load_state

pytestmark = [pytest.mark.integration, pytest.mark.netns]


def node_for(stack: Stack, state: Path, hostname: str, key: str | None = None) -> Node:
    return Node(login_server=stack.server_url, auth_key=key or stack.preauth_key(), state_dir=state,
                hostname=hostname, ca_file=stack.ca_file, udp_bind=stack.local_ip)


def hs_node(stack: Stack, hostname: str) -> dict[str, Any]:
    return wait_for(lambda: stack.node_by_hostname(hostname), 10, f"{hostname} in headscale")  # type: ignore[no-any-return]


async def wait_until(pred: Any, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.1)
    assert pred(), what


@pytest.mark.parametrize("ephemeral", [False, True], ids=["reusable", "ephemeral"])
async def test_register_and_netmap(stack: Stack, tmp_path: Path, ephemeral: bool) -> None:
    hostname = f"py-{'eph' if ephemeral else 'reu'}"
    key = stack.preauth_key(reusable=not ephemeral, ephemeral=ephemeral)
    async with node_for(stack, tmp_path, hostname, key) as node:
        state = load_state(tmp_path)
        assert state is not None
        my_key = format_key("nodekey:", state.node_public)

        def stored() -> bool:
            n = stack.node_by_hostname(hostname) or {}
            disco = n.get("disco_key", "")
            return bool(n.get("online")) and disco.startswith("discokey:") and disco != "discokey:" + "0" * 64

        await trio.to_thread.run_sync(lambda: wait_for(stored, 15, "our node online with a disco key"))
        row = await trio.to_thread.run_sync(hs_node, stack, hostname)
        assert row["node_key"] == my_key
        marked = row.get("ephemeral", (row.get("pre_auth_key") or {}).get("ephemeral", False))
        assert bool(marked) == ephemeral, sorted(row)
        # our netmap: both tailscaled peers, with addresses, keys, disco keys, home DERP
        peers = {p["hostname"]: p for p in node.peers()}
        for ts in stack.tailscaleds:
            p = peers[ts.name]
            assert p["addresses"] and p["node_key"].startswith("nodekey:")
            assert p["disco_key"].startswith("discokey:") and p["home_derp"] == 999
            assert p["node_key"] == ts.node_key()

        # and each tailscaled lists us
        def listed() -> bool:
            return all(my_key in (ts.status().get("Peer") or {}) for ts in stack.tailscaleds)

        await trio.to_thread.run_sync(lambda: wait_for(listed, 15, "tailscaled peers list us"))
    if ephemeral:  # leave the shared stack as we found it
        await trio.to_thread.run_sync(lambda: stack.headscale("nodes", "delete", "-i", str(row["id"]), "--force"))


async def test_peers_join_and_leave_live(make_stack: Any, tmp_path: Path) -> None:
    for version in HEADSCALE_VERSIONS:
        stack = make_stack(version)
        async with node_for(stack, tmp_path / version, "py-live") as node:
            reconnects = node.control.reconnects
            names = lambda node=node: {p["hostname"] for p in node.peers()}  # noqa: E731
            assert names() == {"ts1", "ts2"}
            await trio.to_thread.run_sync(stack.add_tailscaled, "ts3")
            await wait_until(lambda: "ts3" in names(), 10, "ts3 appears")  # noqa: B023
            await trio.to_thread.run_sync(lambda: stack.tailscaleds[0].cli("logout"))  # noqa: B023

            def ts1_gone_or_offline() -> bool:
                peer = next((p for p in node.peers() if p["hostname"] == "ts1"), None)
                return peer is None or peer["online"] is False

            await wait_until(ts1_gone_or_offline, 10, "ts1 leaves")
            assert node.control.reconnects == reconnects, "netmap changes must arrive without reconnecting"


@pytest.mark.parametrize("version", HEADSCALE_VERSIONS)
async def test_headscale_restart_reconnects(make_stack: Any, tmp_path: Path, version: str) -> None:
    stack = make_stack(version, tailscaleds=1)
    async with node_for(stack, tmp_path, "py-restart") as node:
        old = node.netmap  # each control session builds its netmap from the full map it is sent
        await trio.to_thread.run_sync(lambda: stack.restart_headscale(down_for=2.0))
        await wait_until(lambda: node.control.reconnects >= 1 and node.status()["status"] == "Running", 30,
                         "reconnected")
        await wait_until(lambda: node.netmap is not old and node.netmap.self_node is not None, 10, "fresh netmap")
        assert {p["hostname"] for p in node.peers()} == {"ts1"}
        history = [c.new.value for c in node.status_machine.history]
        assert "Reconnecting" in history


# ---------------------------------------------------------- bad user input


def up(stack: Stack | None, state: Path, *args: str, server: str | None = None) -> subprocess.CompletedProcess[str]:
    url = server or (stack.server_url if stack else "https://127.0.0.1:1")
    extra = ["--ca-file", str(stack.ca_file), "--udp-bind", stack.local_ip] if stack else []
    return subprocess.run([sys.executable, "-m", "trionet", "up", "--login-server", url, "--state-dir", str(state),
                           "--hostname", "py-bad", *extra, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trionet: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_bad_auth_keys(stack: Stack, tmp_path: Path) -> None:
    line = one_line(up(stack, tmp_path / "a", "--authkey", "0" * 48))
    print("wrong key (short form):", line)
    assert "auth" in line.lower(), line
    line = one_line(up(stack, tmp_path / "a", "--authkey", "hskey-auth-000000000000-" + "0" * 64))
    print("wrong key:", line)
    assert "auth" in line.lower(), line
    expired = stack.preauth_key(expiration="1s")
    import time

    time.sleep(2)
    line = one_line(up(stack, tmp_path / "b", "--authkey", expired))
    print("expired key:", line)
    assert "auth" in line.lower(), line
    used = stack.preauth_key(reusable=False)
    ok = subprocess.Popen([sys.executable, "-m", "trionet", "up", "--login-server", stack.server_url, "--authkey",
                           used, "--state-dir", str(tmp_path / "c"), "--hostname", "py-once", "--ca-file",
                           str(stack.ca_file), "--udp-bind", stack.local_ip], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: stack.node_by_hostname("py-once"), 30, "first use of the one-time key")
    finally:
        ok.terminate()
        ok.wait(10)
    line = one_line(up(stack, tmp_path / "d", "--authkey", used))
    print("used-up key:", line)
    assert "auth" in line.lower(), line


def test_unreachable_and_malformed_server(tmp_path: Path) -> None:
    line = one_line(up(None, tmp_path, "--authkey", "k", server="http://127.0.0.1:9"))
    assert "cannot reach login server" in line
    line = one_line(up(None, tmp_path, "--authkey", "k", server="not a url"))
    assert "--login-server" in line


def test_corrupt_state_file_untouched(stack: Stack, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text('{"version": 1, "machine_private": "garbage"')
    before = hashlib.sha256((state / "state.json").read_bytes()).hexdigest()
    line = one_line(up(stack, state, "--authkey", stack.preauth_key()))
    assert "corrupt" in line
    assert hashlib.sha256((state / "state.json").read_bytes()).hexdigest() == before


def test_cli_up_status_json(stack: Stack, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(stack.preauth_key())
    proc = subprocess.Popen([sys.executable, "-m", "trionet", "up", "--login-server", stack.server_url, "--authkey",
                             f"file:{key}", "--state-dir", str(tmp_path / "s"), "--hostname", "py-cli-status",
                             "--ca-file", str(stack.ca_file), "--udp-bind", stack.local_ip], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def status() -> dict[str, Any] | None:
            out = subprocess.run([sys.executable, "-m", "trionet", "status", "--json", "--state-dir",
                                  str(tmp_path / "s")], capture_output=True, text=True)
            if out.returncode != 0:
                return None
            doc: dict[str, Any] = json.loads(out.stdout)
            return doc if doc["status"] == "Running" else None

        try:
            doc = wait_for(status, 60, "status Running")
        except Exception:
            proc.terminate()
            raise AssertionError(proc.communicate(timeout=10)[0].decode()[-3000:]) from None
        assert {p["hostname"] for p in doc["peers"]} >= {"ts1", "ts2"}
        assert doc["self"]["name"].startswith("py-cli-status")
        assert oct((tmp_path / "s" / "state.json").stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "s" / "trionet.sock").stat().st_mode & 0o777) == "0o600"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out.decode()
    assert b"Running" in out and b"Traceback" not in out
