"""Interactive login against the real stack: a `trionet up` without an auth key whose
stderr the test reads as a user would, and the admin's side on Headscale's CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.realstack import REPO, Stack, StackError, run, wait_for

# The user tests/realstack.py creates on every stack; an admin names a user by name.
ADMIN_USER = "alice"

_URL_AFTER_VISIT = re.compile(r"To log in, visit:\s*\n\s*\n\s*(\S+)")
_COMMAND = re.compile(r"^\s*(headscale (?:auth|nodes) register .*?)\s*$", re.M)


class LoginDaemon:
    """`trionet up` with no auth key (none in the environment either)."""

    def __init__(self, stack: Stack, state: Path, *extra: str, hostname: str) -> None:
        self.state = state
        self.stderr_path = state.parent / f"{hostname}.stderr"
        self.stdout_path = state.parent / f"{hostname}.stdout"
        env = {k: v for k, v in os.environ.items() if k != "TRIONET_AUTHKEY"}
        cmd = [sys.executable, "-m", "trionet", "up", "--login-server", stack.server_url,
               "--state-dir", str(state), "--hostname", hostname, "--ca-file", str(stack.ca_file),
               "--udp-bind", stack.local_ip, *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"),
                                     cwd=REPO, env=env)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout_path.read_text().splitlines() if line.startswith("{")]

    def told_logins(self) -> list[tuple[str, str | None]]:
        """Every (URL, approval command) told on stderr so far, in order."""
        out = []
        for block in self.stderr.split("To log in, visit:")[1:]:
            text = "To log in, visit:" + block
            url = _URL_AFTER_VISIT.search(text)
            if url is None:
                continue  # still being written
            command = _COMMAND.search(block)
            out.append((url.group(1), command.group(1) if command else None))
        return out

    def wait_told(self, count: int, timeout: float = 60) -> tuple[str, str | None]:
        """The `count`-th login told on stderr (1 = the first)."""
        def told() -> tuple[str, str | None] | None:
            self.check_alive()
            logins = self.told_logins()
            return logins[count - 1] if len(logins) >= count else None

        result: tuple[str, str | None] = wait_for(told, timeout, f"login URL #{count} on stderr")
        return result

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "trionet", *args, "--state-dir", str(self.state)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        if out.returncode != 0:
            raise StackError(out.stderr)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"trionet up exited with {self.proc.returncode}:\n{self.stderr[-4000:]}")

    def wait_running(self, timeout: float = 60) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            self.check_alive()
            status = self.status()
            return status if status["status"] == "Running" else None

        result: dict[str, Any] = wait_for(running, timeout, "trionet Running")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def approve(stack: Stack, command: str, user: str = ADMIN_USER) -> subprocess.CompletedProcess[str]:
    """Run the approval command trionet printed, as an admin on the Headscale server
    would: the placeholder USER becomes a real user; `headscale` is this stack's
    binary with its config."""
    words = shlex.split(command)
    if words[0] != "headscale" or "USER" not in words:
        raise AssertionError(f"not an approval command with a USER placeholder: {command!r}")
    words = [user if w == "USER" else w for w in words]
    return run(stack.headscale_cmd(*words[1:]))


def forget_node(stack: Stack, hostname: str) -> None:
    """Delete a node a test registered, so the shared stack is left as it was found."""
    node = stack.node_by_hostname(hostname)
    if node is not None:
        run(stack.headscale_cmd("nodes", "delete", "--identifier", str(node["id"]), "--force"), check=False)


def set_register_cache_expiration(stack: Stack, duration: str) -> None:
    """Headscale 0.29's `tuning.register_cache_expiration` (default 15m): how long a
    pending interactive registration lives. Takes a Headscale restart."""
    text = stack.hs_config.read_text()
    if "\ntuning:" in text:
        raise StackError("the Headscale config already has a tuning section")
    stack.hs_config.write_text(text + f"tuning:\n  register_cache_expiration: {duration}\n")
    stack.stop_headscale()
    stack.start_headscale()
