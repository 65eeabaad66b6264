"""SIGKILL while the state file is being written: it is always whole and 0600."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from trionet.keys import load_state

WRITER = r"""
import sys, os
from pathlib import Path
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
