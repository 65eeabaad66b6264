"""The docs stay true: every module docs/architecture.md names exists, every
`Class.attribute` it names exists, and the README links only inside the repository."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import trionet

REPO = Path(trionet.__file__).parent.parent
ARCHITECTURE = REPO / "docs" / "architecture.md"


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def classes() -> dict[str, list[type]]:
    """Every class trionet defines, by name (two modules may use one name: proto's Node)."""
    out: dict[str, list[type]] = {}
    for info in pkgutil.walk_packages(trionet.__path__, "trionet."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                out.setdefault(name, []).append(obj)
    return out


def has(cls: type, attr: str) -> bool:
    """A class attribute or method, or an attribute its __init__ sets."""
    return hasattr(cls, attr) or f"self.{attr} " in inspect.getsource(cls.__init__) \
        or f"self.{attr}:" in inspect.getsource(cls.__init__)


def test_every_module_the_architecture_names_exists() -> None:
    paths = [p for token in backticked(ARCHITECTURE.read_text()) for p in re.split(r",\s*", token)
             if p.startswith("trionet/")]
    assert len(paths) > 30, "the map names too few modules to mean anything"
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing


def test_every_class_attribute_the_architecture_names_exists() -> None:
    known = classes()
    named = [t for t in backticked(ARCHITECTURE.read_text()) if re.fullmatch(r"[A-Z]\w*\.\w+(\(\))?", t)]
    assert len(named) > 10
    missing = []
    for token in named:
        name, attr = token.removesuffix("()").split(".")
        if not any(has(cls, attr) for cls in known.get(name, [])):
            missing.append(token)
    assert not missing, missing


def test_the_readme_links_only_inside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    assert "../" not in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), target
    assert "docs/architecture.md" in readme
