"""Headscale's embedded DERP with registered node keys, for tests and benchmarks.

Used by tests/integration/test_derp.py (its ``derp_stack`` fixture) and
tests/bench/bench_derp.py (``--headscale``): both need a private stack whose
DERP admits our clients, and DerpConnections dialled the way trionet dials it.

DERP identities are real registered node keys: a stock tailscaled registers
with a pre-auth key, is stopped, and its node private key (from its state
file) becomes one of our DERP clients. So Headscale 0.29's
``verify_clients: true`` admits them for the right reason, and no running
tailscaled shares the key.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tests.realstack import Stack, Tailscaled
from trionet.derp.driver import DerpConnection, derp_url_for_node


def node_private_key(node: Tailscaled) -> bytes:
    """The node (= WireGuard = DERP) private key tailscaled persisted for its profile."""
    state = json.loads((node.dir / "state" / "tailscaled.state").read_text())
    current = base64.b64decode(state["_current-profile"]).decode()
    prefs = json.loads(base64.b64decode(state[current]))
    text = prefs["Config"]["PrivateNodeKey"]
    assert text.startswith("privkey:")
    return bytes.fromhex(text.removeprefix("privkey:"))


class DerpStack:
    """A started Stack plus the private keys of nodes it has registered (and nobody uses)."""

    def __init__(self, stack: Stack, keys: list[bytes]) -> None:
        self.stack = stack
        self.keys = keys
        self.version = stack.version

    def _at_least(self, *want: int) -> bool:
        return tuple(int(x) for x in self.version.split(".")) >= want

    @property
    def at_least_024(self) -> bool:
        """Headscale 0.24 added DERP over WebSocket (serveWebsocket)."""
        return self._at_least(0, 24, 0)

    @property
    def verifies_clients(self) -> bool:
        return self._at_least(0, 27, 0)

    @property
    def transports(self) -> list[str]:
        """The DERP transports this Headscale serves."""
        return ["http", "websocket"] if self.at_least_024 else ["http"]

    def derp_url(self) -> tuple[str, str | None]:
        # the embedded region as Headscale builds it (GenerateRegion): host and port of server_url
        node = {"HostName": self.stack.hs_host.ip, "DERPPort": 8443, "IPv4": self.stack.hs_host.ip}
        return derp_url_for_node(node, self.stack.server_url)

    def connection(self, private: bytes, transport: str = "http", **kw: Any) -> DerpConnection:
        url, ip = self.derp_url()
        kw.setdefault("backoff", lambda n: min(0.2 * 2**n, 2.0))
        return DerpConnection(url, private, ca_file=str(self.stack.ca_file), connect_ip=ip, transport=transport, **kw)


@contextmanager
def derp_stack_for(version: str, names: Sequence[str] = ("dk1", "dk2")) -> Iterator[DerpStack]:
    """A private stack for `version` (no running tailscaled) with one registered key per name."""
    stack = Stack(version)
    try:
        stack.start(tailscaleds=0)
        keys = []
        for name in names:
            node = stack.add_tailscaled(name)
            keys.append(node_private_key(node))
            stack.stop_tailscaled(node)  # its key stays registered; nobody else uses it now
        yield DerpStack(stack, keys)
    finally:
        stack.stop()
