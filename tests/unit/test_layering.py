"""Layers point down: the library never reaches up into the daemon or the CLI.

Every module under trionet/ except `cli`, `__main__` and `daemon/` is checked:
neither it nor anything it imports (at module level or inside a function, read
from the source) imports `trionet.daemon` or `trionet.cli`. One real import in a
fresh interpreter confirms it for the library's entry points.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import trionet

PACKAGE = Path(trionet.__file__).parent
UPPER = ("trionet.daemon", "trionet.cli", "trionet.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every trionet module the file imports, anywhere in it."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` steps up
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "trionet" or m.startswith("trionet.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path, name) if m in modules} for name, path in modules.items()}


def is_upper(name: str) -> bool:
    return any(name == u or name.startswith(u + ".") for u in UPPER)


def test_no_library_module_reaches_the_daemon_or_the_cli() -> None:
    edges = graph()
    offenders: dict[str, list[str]] = {}
    for start in sorted(edges):
        if is_upper(start):
            continue
        seen, path_to = {start}, {start: [start]}
        todo = [start]
        while todo:
            current = todo.pop()
            for nxt in edges[current]:
                if nxt in seen:
                    continue
                seen.add(nxt)
                path_to[nxt] = [*path_to[current], nxt]
                if is_upper(nxt):
                    offenders[start] = path_to[nxt]
                todo.append(nxt)
    assert not offenders, "\n".join(" -> ".join(chain) for chain in offenders.values())
    assert len(edges) > 40, "the walk found too few modules to mean anything"


def test_importing_the_library_loads_no_daemon_module() -> None:
    code = ("import sys, trionet, trionet.node, trionet.control.session, trionet.status; "
            "print(sorted(m for m in sys.modules if m.startswith(('trionet.daemon', 'trionet.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
