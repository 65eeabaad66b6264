"""Bad input from the user: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trionet import cli


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trionet", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["up", "--login-server", "ftp://x", "--authkey", "k"], "not an http:// or https:// URL"),
        (["up", "--login-server", "https://h:99999", "--authkey", "k"], "bad port"),
        (["up", "--login-server", "https://h/path", "--authkey", "k"], "bare server URL"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--forward", "8080"], "LOCALPORT=HOST:PORT"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--forward", "x=h:1"], "not a port"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--serve", "80=localhost"], "HOST:PORT"),
        (["up", "--login-server", "https://h", "--authkey", "file:/nonexistent/key"], "cannot read"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--udp-bind", "nope"], "not an IP"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--ca-file", "/nonexistent"], "--ca-file"),
        (["up", "--authkey", "k"], "--login-server"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = run_cli(*args, "--state-dir", str(tmp_path)) if args[0] == "up" else run_cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_status_without_daemon(tmp_path: Path) -> None:
    proc = run_cli("status", "--state-dir", str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"trionet: trionet is not running (no daemon at {tmp_path}/trionet.sock)"


def test_help_teaches() -> None:
    text = cli.build_parser().format_help()
    for word in ("up", "status", "peers", "ping", "down"):
        assert word in text
    up_help = run_cli("up", "--help").stdout
    assert "--forward" in up_help and "examples:" in up_help
