"""The README's library examples: each is the ```python block right after an
``<!-- example: NAME -->`` line. tests/integration/test_library_examples.py runs them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"
#: Every example, and how many times its output shows the peer's page.
EXAMPLES = {"trio": 1, "forward": 1, "threaded": 2, "asyncio": 1, "httpx": 1}
_BLOCK = re.compile(r"^<!-- example: (\S+) -->\n```python\n(.*?)^```$", re.S | re.M)


def readme_examples() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, code in _BLOCK.findall(README.read_text()):
        assert name not in found, f"two README examples are named {name!r}"
        found[name] = code
    return found
