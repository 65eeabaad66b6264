"""compose/docker-compose.yml's services, run natively with their own command lines.

No Docker engine runs here. tests/integration/compose_native.py starts each
service's entrypoint + command + environment as the compose file has them, in
network namespaces with the compose addresses, in depends_on order (Headscale's
health check, the bootstrap's exit code), after compose/prepare.py; then the
host fetches a page from ts1 through trionet's published --forward and --socks5
ports, as the README tells Docker users to.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.compose_native import (
    NativeCompose,
    load_compose,
    mounts,
    prepared_compose_dir,
)
from tests.realstack import StackError, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tc-"))  # short: Headscale's unix socket path lives under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def prepared(run_dir: Path) -> Path:
    """compose/ after `make compose-prepare`, in a copy."""
    return prepared_compose_dir(run_dir / "compose")


@pytest.fixture(scope="module")
def wheel_site(prepared: Path, run_dir: Path) -> Path:
    """What the trionet image installs: the prepared wheel (its dependencies come from our venv)."""
    wheels = sorted((prepared / "dist").glob("trionet-*.whl"))
    assert len(wheels) == 1, wheels
    site = run_dir / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheels[0])], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise StackError(f"installing the wheel failed:\n{proc.stderr[-3000:]}")
    return site


@pytest.fixture(scope="module")
def stack(prepared: Path, run_dir: Path, wheel_site: Path) -> Iterator[NativeCompose]:
    native = NativeCompose(prepared, run_dir, python_path=wheel_site).start()
    yield native
    native.stop()


def test_prepare_leaves_every_mounted_and_copied_file(prepared: Path) -> None:
    """After compose/prepare.py every bind mount's source exists, and the build context holds
    the Dockerfile and exactly one wheel (the Dockerfile installs dist/trionet-*.whl)."""
    spec = load_compose(prepared / "docker-compose.yml")
    binds = [(name, m) for name, svc in spec["services"].items() for m in mounts(svc) if m.is_bind]
    assert binds
    missing = [f"{name}: {m.source}" for name, m in binds if not (prepared / m.source).exists()]
    assert not missing, missing
    for name, svc in spec["services"].items():
        if "build" in svc:
            context = prepared / svc["build"]["context"]
            assert (context / svc["build"].get("dockerfile", "Dockerfile")).is_file(), name
            assert len(list((context / "dist").glob("trionet-*.whl"))) == 1, name
    key = prepared / "tls" / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_native_python_imports_trionet_from_the_wheel(wheel_site: Path, run_dir: Path) -> None:
    """The trionet service below runs the wheel's code, not the checkout's (as in the image)."""
    out = subprocess.run([sys.executable, "-c", "import trionet, trionet.cli; print(trionet.__file__)"],
                         env={"PYTHONPATH": str(wheel_site), "PATH": "/usr/bin:/bin"}, cwd=run_dir,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).is_relative_to(wheel_site), out


def test_compose_stack_serves_a_peer_page_through_trionet(stack: NativeCompose, prepared: Path) -> None:
    """The peers join by themselves (containerboot with the bootstrap's key), and from the
    host a page on ts1 arrives through trionet's published --forward and --socks5 ports."""
    page = (prepared / "www" / "index.html").read_text()
    key = stack.run_dir / "volumes" / "bootstrap" / "authkey"
    assert key.read_text().strip() and stat.S_IMODE(key.stat().st_mode) == 0o600

    def fetch(*args: str) -> str | None:
        proc = stack.host("curl", "-fsS", "--max-time", "5", *args, timeout=15)
        return proc.stdout if proc.returncode == 0 else None

    try:
        forwarded = wait_for(lambda: fetch("http://127.0.0.1:8080/"), 90, "a page through --forward")
        proxied = wait_for(lambda: fetch("--socks5-hostname", "127.0.0.1:1080", "http://ts1/"), 30,
                           "a page through --socks5")
    except StackError as exc:
        raise StackError(f"{exc}\n{stack.logs()}") from None
    assert forwarded == page
    assert proxied == page

    # Volumes mounted :ro are read-only natively too, as in Docker: the bootstrap met Headscale's
    # socket through one, and trionet cannot touch the key's.
    touch = stack.exec_in("trionet", ["touch", str(key.parent / "written-by-trionet")])
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr, touch

    # `docker compose exec trionet python -m trionet status`, as the README has it.
    status_proc = stack.exec_in("trionet", ["python", "-m", "trionet", "status"])
    assert status_proc.returncode == 0, status_proc.stderr
    assert status_proc.stdout.startswith("Running"), status_proc.stdout

    for peer, other in (("ts1", "ts2"), ("ts2", "ts1")):
        # `docker compose exec ts1 tailscale status --json`: the CLI's default socket (TS_SOCKET).
        proc = stack.exec_in(peer, ["tailscale", "status", "--json"])
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["BackendState"] == "Running"
        names = {p.get("HostName") for p in (status.get("Peer") or {}).values()}
        assert {other, "trionet"} <= names, names
