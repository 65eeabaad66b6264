"""`make bench`'s in-process data-path row and `make bench-ir` still run and count what they say.

They drive Node's hot path by hand, so a change to the node's drivers (the one
clock was one) can break it without any other test noticing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_datapath_counts_every_segment_of_both_rounds(tmp_path: Path) -> None:
    out = tmp_path / "datapath.json"
    proc = subprocess.run([sys.executable, "tests/bench/bench_datapath.py", "--rounds", "1", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["segments"] == 3383  # 4 MiB in 1240-byte segments, checked at TCP, IP and the socket
    assert result["receive_segments"] == 3415  # 4 MiB in 1228-byte segments, all read by the application
    assert result["pipeline_us_per_segment"] > result["floor_us_per_segment"] > 0


def test_bench_instructions_children_run_both_paths() -> None:
    """`make bench-ir` counts instructions of these children under cachegrind; here they run
    bare, so a break shows without valgrind. 1 MiB rounds: 846 segments sent, 853 read."""
    for path, segments in (("send", 846), ("receive", 853)):
        proc = subprocess.run([sys.executable, "tests/bench/bench_instructions.py", "--child", path, "--rounds", "1"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split() == ["segments", str(segments)], proc.stdout
