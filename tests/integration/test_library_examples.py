"""The README's library examples, run unchanged against the real stack.

Each example runs as its own program (in a fresh directory, so ``./state`` is
new) with the stack's login server, a pre-auth key, the stack's CA and ``ts1``
as the peer in the environment variables the examples read; ts1 serves its page
on port 80. An example that cannot reach the stack fails here: nothing skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.services import PeerServices
from tests.realstack import REPO, Stack
from tests.unit.library.readme import EXAMPLES, readme_examples
from trionet.errors import ConfigError, TransportError
from trionet.threaded import ThreadedNode

pytestmark = [pytest.mark.integration, pytest.mark.netns]

PAGE = "hello from ts1"


@pytest.fixture(scope="module")
def web(newest_stack: Stack) -> Iterator[PeerServices]:
    """ts1's page on port 80, as the examples expect of a web server."""
    svc = PeerServices(newest_stack, newest_stack.tailscaleds[0], http_port=80, udp_port=9998, blob_mb=1).start()
    yield svc
    svc.stop()


def example_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, "TS_LOGIN_SERVER": stack.server_url, "TS_AUTHKEY": stack.preauth_key(),
            "TS_CA_FILE": str(stack.ca_file), "TS_PEER": "ts1", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs_unchanged_against_the_real_stack(name: str, newest_stack: Stack, web: PeerServices,
                                                             tmp_path: Path) -> None:
    script = tmp_path / f"example_{name}.py"
    script.write_text(readme_examples()[name])
    proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=example_env(newest_stack),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(PAGE) == EXAMPLES[name], proc.stdout
    assert (tmp_path / "state" / "state.json").exists()  # it registered a node of its own


def test_threaded_node_against_the_real_stack_tells_refused_and_unknown_peers_apart(
        newest_stack: Stack, web: PeerServices, tmp_path: Path) -> None:
    threads = {t for t in threading.enumerate() if not t.name.startswith("Trio thread")}
    with ThreadedNode(login_server=newest_stack.server_url, auth_key=newest_stack.preauth_key(),
                      state_dir=tmp_path, hostname="py-threaded", ca_file=newest_stack.ca_file) as node:
        with pytest.raises(TransportError, match="refused"):
            node.open_connection("ts1", 1)  # nothing listens there on ts1
        with pytest.raises(ConfigError, match="unknown peer"):
            node.open_connection("no-such-peer", 80)
        with node.open_connection("ts1", 80) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.0 200") and PAGE.encode() in response
        assert node.status()["status"] == "Running"
    assert node.status()["status"] == "Stopped"
    assert {t for t in threading.enumerate() if not t.name.startswith("Trio thread")} == threads
