"""The wheel stands alone: `python -m build` gives a pure-Python wheel that, installed
into a fresh venv with nothing from the checkout, runs `trionet --help` and joins the
real stack.

The wheel and the venv are made once for this module (tests/integration/wheel_env.py);
pip fetches the runtime dependencies as a user's pip would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tomllib
import zipfile
from collections.abc import Iterator
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import trionet
from tests.integration.services import PeerServices
from tests.integration.wheel_env import WheelVenv, build_dists
from tests.realstack import REPO, Stack, wait_for

pytestmark = [pytest.mark.integration]

# The design's runtime set; pytest-trio and the rest of the tooling are dev-only.
RUNTIME_DEPENDENCIES = {"trio", "trio-websocket", "cryptography", "pynacl", "h2", "zstandard", "attrs", "cattrs",
                        "dnspython"}
# Modules the dev extra brings that a user's install must not have.
DEV_ONLY_MODULES = ("pytest", "pytest_trio", "hypothesis", "mypy", "yaml", "build", "tests")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_dists(tmp_path_factory.mktemp("wheel-build"))


@pytest.fixture(scope="module")
def wheel(dists: tuple[Path, Path]) -> Path:
    return dists[1]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> WheelVenv:
    return WheelVenv(tmp_path_factory.mktemp("wheel-venv") / "venv", wheel)


@pytest.fixture(scope="module")
def services(newest_stack: Stack) -> Iterator[PeerServices]:
    svc = PeerServices(newest_stack, newest_stack.tailscaleds[0], blob_mb=1).start()
    yield svc
    svc.stop()


def _metadata(whl: zipfile.ZipFile, dist_info: str, name: str) -> Message:
    return Parser().parsestr(whl.read(f"{dist_info}/{name}").decode())


def _source_files() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "trionet").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_is_pure_python_and_holds_exactly_the_package_and_license(wheel: Path) -> None:
    version = trionet.__version__
    dist_info = f"trionet-{version}.dist-info"
    assert wheel.name == f"trionet-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        tags = _metadata(whl, dist_info, "WHEEL")
        assert tags["Root-Is-Purelib"] == "true"
        assert tags.get_all("Tag") == ["py3-none-any"]
        # nothing beside the package and its metadata: no tests/, compose/, docs/
        assert {n.split("/", 1)[0] for n in names} == {"trionet", dist_info}
        # every module of every subpackage (netstack/wire, ...), and nothing built or stale
        packaged, sources = {n for n in names if n.startswith("trionet/")}, _source_files()
        assert {"missing": sources - packaged, "extra": packaged - sources} == {"missing": set(), "extra": set()}
        assert f"{dist_info}/licenses/LICENSE" in names, sorted(n for n in names if n.startswith(dist_info))
        assert whl.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
        assert "[console_scripts]\ntrionet = trionet.cli:main" in entry_points


def test_wheel_metadata_has_one_version_and_the_runtime_dependencies(wheel: Path) -> None:
    # one source: pyproject.toml names no version of its own, setuptools reads trionet.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dist_info = f"trionet-{trionet.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as whl:
        meta = _metadata(whl, dist_info, "METADATA")
    assert meta["Name"] == "trionet"
    assert meta["Version"] == trionet.__version__
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    runtime = {canonicalize_name(r.name) for r in requirements if r.marker is None}
    assert runtime == RUNTIME_DEPENDENCIES
    dev = {canonicalize_name(r.name) for r in requirements
           if r.marker is not None and r.marker.evaluate({"extra": "dev"})}
    assert "pytest-trio" in dev and "build" in dev
    assert not dev & runtime


def test_installed_wheel_runs_help_and_version_without_the_checkout(venv: WheelVenv) -> None:
    where = venv.python_c("import trionet; print(trionet.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv.root), where.stdout

    helped = venv.run(str(venv.trionet), "--help")
    assert helped.returncode == 0, helped.stderr
    assert "up" in helped.stdout and "down" in helped.stdout, helped.stdout

    installed = venv.python_c("import importlib.metadata as m, trionet; "
                              "print(m.version('trionet'), trionet.__version__)")
    assert installed.stdout.split() == [trionet.__version__] * 2, installed.stdout + installed.stderr
    for cmd in ([str(venv.trionet)], [str(venv.python), "-m", "trionet"]):
        shown = venv.run(*cmd, "--version")
        assert (shown.returncode, shown.stdout) == (0, f"trionet {trionet.__version__}\n"), shown.stderr

    # the dev extra stayed out: the venv holds the wheel and its runtime dependencies only
    absent = venv.python_c(f"import importlib.util as u; print([m for m in {DEV_ONLY_MODULES!r} if u.find_spec(m)])")
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.netns
def test_installed_wheel_joins_the_real_stack_and_proxies_to_a_peer(
        venv: WheelVenv, newest_stack: Stack, services: PeerServices, tmp_path: Path) -> None:
    keyfile = tmp_path / "authkey"
    keyfile.write_text(newest_stack.preauth_key())
    keyfile.chmod(0o600)
    state = tmp_path / "state"
    log = tmp_path / "up.log"
    socks_port = _free_local_port()
    daemon = venv.popen(str(venv.trionet), "up", "--login-server", newest_stack.server_url,
                        "--authkey", f"file:{keyfile}", "--state-dir", str(state), "--hostname", "py-wheel",
                        "--ca-file", str(newest_stack.ca_file), "--udp-bind", newest_stack.local_ip,
                        "--socks5", str(socks_port), log=log)
    try:
        def running() -> bool:
            if daemon.poll() is not None:
                raise AssertionError("trionet up exited:\n" + log.read_text()[-3000:])
            out = venv.run(str(venv.trionet), "status", "--json", "--state-dir", str(state))
            return out.returncode == 0 and json.loads(out.stdout)["status"] == "Running"

        wait_for(running, 60, "trionet (from the wheel) Running")
        page = subprocess.run(["curl", "-sS", "--max-time", "60", "--socks5-hostname", f"127.0.0.1:{socks_port}",
                               f"http://ts1:{services.http_port}/index.html"], capture_output=True, timeout=90)
        assert page.stdout == b"hello from ts1\n", page.stderr

        down = venv.run(str(venv.trionet), "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stdout + down.stderr
        assert daemon.wait(30) == 0, log.read_text()[-3000:]
        assert not (state / "trionet.sock").exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
