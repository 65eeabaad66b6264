"""Bad input from the user: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
        (["up", "--login-server", "https://h", "--authkey", "k", "--dns", "x"], "--dns"),
        (["up", "--authkey", "k"], "--login-server"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--advertise-tags", "web"], "is not a tag"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--advertise-tags", "tag:a b"], "is not a tag"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--accept-routes=maybe"], "not true or false"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--advertise-routes", "10.0.0.1/24"],
         "invalid value '10.0.0.1/24' for --advertise-routes"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--advertise-routes", "lan"],
         "not a valid IP address or CIDR prefix"),
        (["up", "--login-server", "https://h", "--authkey", "k", "--advertise-exit-node=maybe"], "not true or false"),
        (["set", "--advertise-routes", "10.0.0.0/8,::/0"], "::/0 advertised without 0.0.0.0/0"),
        (["set"], "nothing to change"),
        (["set", "--exit-node", "ts1"], "trionet is not running"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = run_cli(*args, "--state-dir", str(tmp_path)) if args[0] in ("up", "set") else run_cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_routing_flags_reach_the_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args([
        "up", "--login-server", "https://h", "--authkey", "k", "--state-dir", str(tmp_path),
        "--exit-node", " ts1 ", "--exit-node-allow-lan-access", "--accept-routes=true",
        "--advertise-tags", "tag:a,tag:b-2,tag:a"])
    config = cli.config_from_args(args)
    assert config.exit_node == "ts1"
    assert config.exit_node_allow_lan_access and config.accept_routes
    assert config.advertise_tags == ("tag:a", "tag:b-2")
    plain = cli.config_from_args(cli.build_parser().parse_args(
        ["up", "--login-server", "https://h", "--authkey", "k", "--state-dir", str(tmp_path)]))
    assert (plain.exit_node, plain.accept_routes, plain.advertise_tags) == ("", False, ())


def test_status_without_daemon(tmp_path: Path) -> None:
    proc = run_cli("status", "--state-dir", str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"trionet: trionet is not running (no daemon at {tmp_path}/trionet.sock)"


def test_help_teaches() -> None:
    text = cli.build_parser().format_help()
    for word in ("up", "status", "peers", "ping", "set", "down"):
        assert word in text
    up_help = run_cli("up", "--help").stdout
    assert "--forward" in up_help and "examples:" in up_help


@pytest.fixture
def tarpit() -> Iterator[tuple[str, socket.socket]]:
    """A login server that takes TCP connections and never says a word (the kernel's
    backlog completes the handshakes; nobody accepts)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock
    sock.close()


def _connections_made(listener: socket.socket) -> int:
    listener.setblocking(False)
    made = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return made
        conn.close()
        made += 1


def _final_errors(stderr: str) -> list[str]:
    """The CLI's own lines ("trionet: ..."), as opposed to timestamped log lines."""
    return [line for line in stderr.splitlines() if line.startswith("trionet: ")]


def test_corrupt_state_is_reported_once_before_the_login_server_is_contacted(
        tmp_path: Path, tarpit: tuple[str, socket.socket]) -> None:
    url, listener = tarpit
    (tmp_path / "state.json").write_bytes(b"{garbage")
    proc = run_cli("up", "--login-server", url, "--authkey", "k", "--state-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("is corrupt") == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _connections_made(listener) == 0
    assert (tmp_path / "state.json").read_bytes() == b"{garbage"


def test_start_timeout_ends_in_one_line(tmp_path: Path, tarpit: tuple[str, socket.socket]) -> None:
    url, listener = tarpit
    proc = run_cli("up", "--login-server", url, "--authkey", "k", "--state-dir", str(tmp_path), "--timeout", "1")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and "TooSlowError" not in proc.stderr
    assert _final_errors(proc.stderr) == [
        f"trionet: not connected after 1 s (still Connecting: contacting {url}); is {url} answering? "
        "(--timeout to wait longer)"], proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("trionet: not connected")
    assert _connections_made(listener) >= 1  # it did try


def test_unreachable_login_server_is_told_once(tmp_path: Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    proc = run_cli("up", "--login-server", f"http://127.0.0.1:{port}", "--authkey", "k",
                   "--state-dir", str(tmp_path))
    assert proc.returncode == 4
    assert proc.stderr.count("cannot reach login server") == 1, proc.stderr
    assert _final_errors(proc.stderr)[-1].startswith("trionet: cannot reach login server")
    assert "Traceback" not in proc.stderr


def test_bad_timeout_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("up", "--login-server", "https://h", "--authkey", "k", "--state-dir", str(tmp_path),
                   "--timeout", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "trionet: --timeout: 0 is not a positive number of seconds"


def test_down_without_daemon_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_cli("down", "--state-dir", str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"trionet: trionet is not running (no daemon at {tmp_path}/trionet.sock)"


def test_down_stops_a_starting_daemon_and_says_so(tmp_path: Path, tarpit: tuple[str, socket.socket]) -> None:
    """The daemon is stuck connecting (the tarpit): `down` still stops it, answers, exits 0."""
    url, _ = tarpit
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "trionet", "up", "--login-server", url, "--authkey", "k",
                           "--state-dir", str(tmp_path / "st"), "--timeout", "600"],
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        sock = tmp_path / "st" / "trionet.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.05)
        proc = run_cli("down", "--state-dir", str(tmp_path / "st"))
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "trionet stopped\n", "")
        assert up.wait(30) == 0
        assert not sock.exists()
    finally:
        if up.poll() is None:
            up.kill()
        log.close()


def test_log_level_debug_names_levels(tmp_path: Path, tarpit: tuple[str, socket.socket]) -> None:
    url, _ = tarpit
    proc = run_cli("up", "--login-server", url, "--authkey", "k", "--state-dir", str(tmp_path),
                   "--timeout", "1", "--log-level", "debug")
    lines = proc.stderr.splitlines()
    assert any(" DEBUG " in line for line in lines), proc.stderr
    assert any(" INFO trionet: Connecting" in line for line in lines), proc.stderr


def test_log_level_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--log-level", "debug", "status"]).log_level == "debug"
    assert parser.parse_args(["status", "--log-level", "warning"]).log_level == "warning"
    assert parser.parse_args(["status"]).log_level is None


async def test_a_library_node_that_cannot_start_raises_one_start_timeout(
        tmp_path: Path, tarpit: tuple[str, socket.socket]) -> None:
    """`async with Node(...)` gets the same one error as the CLI, not a TooSlowError group."""
    import trionet
    from trionet.config import NodeConfig
    from trionet.errors import StartTimeout

    url, _ = tarpit
    node = trionet.Node(config=NodeConfig(url, tmp_path, auth_key="k", start_timeout=0.5))
    with pytest.raises(StartTimeout, match=r"^not connected after 0.5 s \(still Connecting"):
        async with node:
            pass


def test_status_lists_derp_regions_with_latency_link_and_home() -> None:
    lines = cli._fmt_derp({"last_netcheck": "2026-01-02T03:04:05+00:00", "regions": [
        {"id": 900, "code": "d2", "latency_ms": 0.412, "measured_by": "stun", "home": True, "link": "connected"},
        {"id": 999, "code": "hs", "latency_ms": None, "measured_by": None, "home": False, "link": "none"},
        {"id": 901, "code": "d3", "latency_ms": 31.0, "measured_by": "https", "home": False, "link": "down"},
    ]})
    assert lines[0] == "DERP regions (netcheck 2026-01-02T03:04:05+00:00):"
    assert lines[1].split() == ["900", "d2", "0.4", "ms", "link", "connected", "home"]
    assert lines[2].split() == ["999", "hs", "no", "answer", "link", "none"]
    assert lines[3].split() == ["901", "d3", "31.0", "ms", "(https)", "link", "down"]
    assert cli._fmt_derp({}) == []


def test_dns_flag_binds_loopback_unless_told() -> None:
    parser = cli.build_parser()
    base = ["up", "--login-server", "https://h", "--authkey", "k"]
    assert cli.config_from_args(parser.parse_args([*base, "--dns", "5353"])).dns == cli.cfg.Listen("127.0.0.1", 5353)
    assert cli.config_from_args(parser.parse_args([*base, "--dns", "[::1]:53"])).dns == cli.cfg.Listen("::1", 53)
    assert cli.config_from_args(parser.parse_args(base)).dns is None


def test_status_dns_line_names_magicdns_resolvers_and_the_listener() -> None:
    line = cli._fmt_dns({"magic_dns": True, "base_domain": "ts.test", "forwarding": {".": ["10.0.0.53"]},
                         "split_routes": {"corp.example.": ["10.1.1.1"]}, "extra_records": 2,
                         "listeners": ["quad-100 (100.100.100.100, fd7a:115c:a1e0::53) udp+tcp 53",
                                       "udp+tcp 127.0.0.1:5353"]})
    assert line == ("dns: MagicDNS on (ts.test); resolvers 10.0.0.53; split corp.example->10.1.1.1; "
                    "2 extra records; --dns 127.0.0.1:5353")
