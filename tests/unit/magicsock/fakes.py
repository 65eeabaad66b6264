"""Stand-ins for magicsock's parts, shared by its tests and the send-path benchmark."""

from __future__ import annotations


class FixedPath:
    """A path chooser that always names one UDP address (and no DERP)."""

    wake = False

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr

    def paths_for_send(self, node_key: bytes, now: float) -> tuple[tuple[str, int], int]:
        return self.addr, 0
