"""SIGKILL while the state file is being written: it is always whole and 0600."""

from __future__ import annotations

import datetime
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trionet.keys import load_state

WRITER = r"""
import sys, os
from pathlib import Path
from typing import Any
from trionet.keys import load_or_create_state
state = load_or_create_state(Path(sys.argv[1]))
i = 0
print("ready", flush=True)
while True:
    i += 1
    state.extra["counter"] = i
    state.extra["padding"] = "x" * (i % 50000)  # files of changing size: a torn write would show
    state.save()
"""


def test_sigkill_loop_never_leaves_a_torn_state_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    first = None
    kills = 0
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.005, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        path = tmp_path / "state.json"
        doc = json.loads(path.read_text())  # whole JSON every time
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        state = load_state(tmp_path)
        assert state is not None
        if first is None:
            first = (state.machine_private, state.node_private)
        assert (state.machine_private, state.node_private) == first, "keys never change across crashes"
        assert doc["counter"] >= 1
    assert kills == 40
    # temp files killed writers left are swept at the next start
    from trionet.keys import load_or_create_state

    load_or_create_state(tmp_path)
    assert not list(tmp_path.glob(".state.json.*.tmp"))


def test_sigkill_the_daemon_while_it_renews_its_key(newest_stack: Any, tmp_path: Path) -> None:
    """The real daemon, killed at random moments while it starts, registers and renews its key.

    Even rounds kill it during start-up (state created, registration saved).
    Odd rounds let it come up, then Headscale sets our expiry a few seconds
    ahead, which makes the daemon renew its node key at once (pending key
    written, new key registered, swap written), and the kill lands somewhere
    in that. Whatever moment it lands on, the file is whole and 0600, the
    machine key never changes, the node key Headscale holds is always one of
    the keys on disk, and a final clean start comes up Running under it.
    """
    from tests.integration.test_node import Daemon
    from trionet.keys import format_key, public_of

    stack = newest_stack
    hostname = "py-crashloop"
    state_dir = tmp_path / "state"
    rng = random.Random(11)
    machine = None
    renewals_seen = pending_left = 0
    for i in range(12):
        before = load_state(state_dir)
        daemon = Daemon(stack, state_dir, hostname=hostname)
        if i % 2 == 0:
            time.sleep(rng.uniform(0.3, 3.0))
        else:
            daemon.wait_running()
            before = load_state(state_dir)
            node = stack.node_by_hostname(hostname)
            soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=4)
            stack.headscale("nodes", "expire", "-i", str(node["id"]), "--expiry", soon.strftime("%Y-%m-%dT%H:%M:%SZ"))
            time.sleep(rng.uniform(0.0, 1.5))
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
        path = state_dir / "state.json"
        if not path.exists():
            continue  # killed before the first write
        json.loads(path.read_text())  # whole JSON, or this raises
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        after = load_state(state_dir)
        assert after is not None
        machine = machine or after.machine_private
        assert after.machine_private == machine, f"kill {i}: the machine key changed"
        # The safety property: the key Headscale holds is always one we still have.
        server = stack.node_by_hostname(hostname)
        if server is not None:
            ours = {format_key("nodekey:", public_of(k)) for k in (after.node_private, after.pending_node_private)
                    if k is not None}
            assert server["node_key"] in ours, f"kill {i}: Headscale has a node key we lost"
        if before is not None and after.node_private != before.node_private:
            renewals_seen += 1
        pending_left += after.pending_node_private is not None
    daemon = Daemon(stack, state_dir, hostname=hostname)
    try:
        daemon.wait_running()
        status = daemon.status()
        final = load_state(state_dir)
        assert final is not None and final.pending_node_private is None and final.machine_private == machine
        key = format_key("nodekey:", public_of(final.node_private))
        assert status["node_key"] == key
        assert stack.node_by_hostname(hostname)["node_key"] == key
        assert not list(state_dir.glob(".state.json.*.tmp"))
        print(f"\n12 SIGKILLs of the daemon, {renewals_seen} key renewals committed before a kill, "
              f"{pending_left} left pending by one; state whole and 0600 every time")
    finally:
        daemon.stop()
