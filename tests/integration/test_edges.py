"""The daemon's edges against the real stack: secrets stay out of a debug log,
`trionet down` says the node stopped, a start that times out is one line.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.services import PeerServices
from tests.integration.test_node import Daemon, curl
from tests.realstack import HS_PORT, REPO, Stack, wait_for
from trionet.keys import load_state

pytestmark = [pytest.mark.integration, pytest.mark.netns]

HTTP_PORT = 8200  # apart from the other modules' services on ts1


@pytest.fixture(scope="module")
def ts1_services(newest_stack: Stack) -> Iterator[PeerServices]:
    svc = PeerServices(newest_stack, newest_stack.tailscaleds[0], http_port=HTTP_PORT, udp_port=9200,
                       blob_mb=1).start()
    yield svc
    svc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secret_forms(raw: bytes) -> list[str]:
    """Every text form a 32-byte private key could take in a log line."""
    b64 = base64.b64encode(raw).decode()
    b64url = base64.urlsafe_b64encode(raw).decode()
    return [raw.hex(), raw.hex().upper(), f"privkey:{raw.hex()}", b64, b64.rstrip("="), b64url.rstrip("="),
            repr(raw)]


def private_keys(state_dir: Path) -> list[bytes]:
    state = load_state(state_dir)
    assert state is not None
    return [k for k in (state.machine_private, state.node_private, state.pending_node_private) if k]


def test_debug_log_holds_no_secret(newest_stack: Stack, ts1_services: PeerServices, tmp_path: Path) -> None:
    """The daemon at full debug logging, through registration, a SOCKS5 fetch with a password,
    a refused password, `status --json`, a node key renewal and `down`: its whole output holds
    neither the auth key, nor the SOCKS5 password, nor any private key in any encoding."""
    stack = newest_stack
    hostname = "py-secrets"
    password = "pw-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
    socks_port = free_port()
    daemon = Daemon(stack, tmp_path / "state", "--socks5", str(socks_port), "--socks5-auth", f"alice:{password}",
                    "--log-level", "debug", hostname=hostname)
    auth_key = (tmp_path / f"{hostname}.key").read_text().strip()
    outputs: list[str] = []
    try:
        daemon.wait_running()
        keys_seen = private_keys(daemon.state)

        got = curl("--socks5-hostname", f"127.0.0.1:{socks_port}", "--proxy-user", f"alice:{password}",
                   f"http://ts1:{HTTP_PORT}/index.html")
        assert got.stdout == b"hello from ts1\n", got.stderr
        refused = curl("--socks5-hostname", f"127.0.0.1:{socks_port}", "--proxy-user", "alice:wrong-password",
                       f"http://ts1:{HTTP_PORT}/index.html")
        assert refused.returncode != 0 and refused.stdout == b""

        status = daemon.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        outputs += [status.stdout, status.stderr]
        old_key = json.loads(status.stdout)["node_key"]

        # A node key renewal: Headscale expires our key, the daemon logs in again with the auth key.
        node = stack.node_by_hostname(hostname)
        assert node is not None
        stack.headscale("nodes", "expire", "-i", str(node["id"]))
        wait_for(lambda: daemon.status()["node_key"] != old_key, 45, "the node key renewed")
        keys_seen += private_keys(daemon.state)
        status = daemon.cli("status", "--json")
        outputs += [status.stdout, status.stderr]
        assert json.loads(status.stdout)["status"] == "Running"

        down = daemon.cli("down")
        outputs += [down.stdout, down.stderr]
        assert down.returncode == 0, down.stderr
        assert daemon.proc.wait(30) == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    log = daemon.log.read_text(errors="replace")
    outputs.append(log)
    everything = "\n".join(outputs)

    needles = {"auth key": [auth_key], "SOCKS5 password": [password]}
    for i, key in enumerate(dict.fromkeys(keys_seen)):
        needles[f"private key {i}"] = secret_forms(key)
    # The search would find them: the state file holds the keys in one of these forms.
    state_text = (daemon.state / "state.json").read_text()
    assert any(form in state_text for form in needles["private key 0"])
    leaks = {what: form for what, forms in needles.items() for form in forms if form in everything}
    assert not leaks, f"secrets in the daemon's output: {sorted(leaks)}"
    assert "wrong-password" not in everything  # a mistyped password is a secret too

    debug_lines = [line for line in log.splitlines() if re.match(r"\d\d:\d\d:\d\d DEBUG trionet", line)]
    assert len(debug_lines) >= 10, f"only {len(debug_lines)} DEBUG lines: was debug logging on?\n{log[-3000:]}"
    assert any("register: node key nodekey:" in line and "auth key given" in line for line in debug_lines)
    assert len(keys_seen) >= 2 and len(set(keys_seen)) >= 3  # machine + old and new node key
    print(f"\n{len(log.splitlines())} log lines, {len(debug_lines)} at DEBUG from trionet; "
          f"searched for {sum(map(len, needles.values()))} secret forms: none found")


def test_down_stops_a_running_daemon_and_exits_zero(newest_stack: Stack, ts1_services: PeerServices,
                                                   tmp_path: Path) -> None:
    socks_port = free_port()
    daemon = Daemon(newest_stack, tmp_path / "state", "--socks5", str(socks_port), hostname="py-down")
    try:
        daemon.wait_running()
        got = curl("--socks5-hostname", f"127.0.0.1:{socks_port}", f"http://ts1:{HTTP_PORT}/index.html")
        assert got.stdout == b"hello from ts1\n", got.stderr
        down = daemon.cli("down")
        assert (down.returncode, down.stdout, down.stderr) == (0, "trionet stopped\n", "")
        assert daemon.proc.wait(30) == 0, daemon.log.read_text()[-3000:]
        assert not (daemon.state / "trionet.sock").exists()
        with socket.socket() as probe:  # the proxy stopped with the node
            assert probe.connect_ex(("127.0.0.1", socks_port)) != 0
        log = daemon.log.read_text()
        assert "stopping: asked by `trionet down`" in log and "Stopped" in log
        assert "Traceback" not in log
        again = daemon.cli("down")
        assert again.returncode != 0
        assert again.stderr.strip().splitlines() == [
            f"trionet: trionet is not running (no daemon at {daemon.state / 'trionet.sock'})"]
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


class StallAfterKey:
    """A TCP relay to the real Headscale that carries the first connection (GET /key)
    and swallows every later one (the TS2021 upgrade never gets an answer)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.connections = 0
        self.bytes_from_server = 0
        self.held: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections > 1:
                self.held.append(client)  # open, silent
                continue
            server = socket.create_connection(self.upstream, timeout=10)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server:
                    self.bytes_from_server += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for s in self.held:
            s.close()


def test_start_timeout_against_a_stalling_login_server_is_one_line(newest_stack: Stack, tmp_path: Path) -> None:
    stack = newest_stack
    relay = StallAfterKey((stack.hs_host.ip, HS_PORT))
    url = f"https://127.0.0.1:{relay.port}"  # the stack's certificate names 127.0.0.1 too
    try:
        started = datetime.datetime.now()
        proc = subprocess.run(
            [sys.executable, "-m", "trionet", "up", "--login-server", url, "--authkey", stack.preauth_key(),
             "--state-dir", str(tmp_path / "state"), "--ca-file", str(stack.ca_file),
             "--udp-bind", stack.local_ip, "--timeout", "5"],
            capture_output=True, text=True, timeout=120, cwd=REPO)
        took = (datetime.datetime.now() - started).total_seconds()
    finally:
        relay.close()
    assert relay.bytes_from_server > 0, "the real Headscale answered /key through the relay"
    assert relay.connections >= 2, "the TS2021 upgrade was attempted"
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and "TooSlowError" not in proc.stderr
    final = [line for line in proc.stderr.splitlines() if line.startswith("trionet: ")]
    assert final == [f"trionet: not connected after 5 s (still Connecting: contacting {url}); "
                     f"is {url} answering? (--timeout to wait longer)"], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == final[0]
    print(f"\nstart gave up after {took:.1f} s with: {final[0]}")
