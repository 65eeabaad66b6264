"""trionet as a user gets it: `python -m build`, then the wheel alone in a fresh venv.

The build runs on a copy of the checkout without what .gitignore keeps out of
commits: a stale build/ or trionet.egg-info/ (which `pip install -e .` leaves
in every dev checkout, and whose SOURCES.txt setuptools reads back) cannot
slip a deleted module into the wheel. The venv has no system site-packages,
and every command in it runs with no PYTHON* variable (the test run's
PYTHONPATH points at the source tree) from a directory outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.realstack import REPO, StackError

# .gitignore's entries, and .git itself: nothing the wheel may be built from.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".hypothesis", "build", "dist", "*.egg-info", ".run", "bench-results")


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def build_dists(out: Path) -> tuple[Path, Path]:
    """(sdist, wheel) from `python -m build` on a clean copy of the checkout.

    Without --wheel, build makes the sdist and then the wheel from the unpacked
    sdist, so a file the sdist forgets is missing from the wheel too. Build
    isolation stays on: the wheel comes from the declared [build-system]
    requirements alone, not from whatever setuptools the dev venv has.
    """
    src = out / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    dist = out / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise StackError(f"python -m build failed:\n{_tail(proc)}")
    sdists, wheels = sorted(dist.glob("trionet-*.tar.gz")), sorted(dist.glob("trionet-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise StackError(f"expected one sdist and one wheel in {dist}, found {sdists + wheels}")
    return sdists[0], wheels[0]


class WheelVenv:
    """A fresh venv with the wheel and its declared dependencies, nothing else."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.python = self.bin / "python"
        self.trionet = self.bin / "trionet"
        # Commands run here: no trionet/ or tests/ beside them to import by accident.
        self.elsewhere = root.parent / "elsewhere"
        self.elsewhere.mkdir(exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(root)], capture_output=True, text=True,
                              timeout=300, env=self.env(), cwd=self.elsewhere)
        if made.returncode != 0:
            raise StackError(f"python -m venv failed:\n{_tail(made)}")
        installed = self.run(str(self.python), "-m", "pip", "install", "-q", str(wheel), timeout=900)
        if installed.returncode != 0:
            raise StackError(f"pip install {wheel.name} failed:\n{_tail(installed)}")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["VIRTUAL_ENV"] = str(self.root)
        return env

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env=self.env(), cwd=self.elsewhere)

    def python_c(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.python), "-c", code)

    def popen(self, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                    cwd=self.elsewhere)
