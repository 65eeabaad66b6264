"""`make bench`: every benchmark in one run; one table; JSON and a PNG chart.

Each row is a ratio measured in the same run: trionet against tailscaled
(through the same kind of SOCKS5 door, to the same service) or against a raw
baseline (bare ChaCha20-Poly1305, kernel-to-kernel TCP).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.realstack import REPO

OUT = REPO / "bench-results"
SCRIPTS = ["bench_wg.py", "bench_udp.py", "bench_datapath.py", "bench_netstack.py", "bench_tcp_bounds.py",
           "bench_derp.py", "bench_netmap.py", "bench_hostile.py"]


def run_script(name: str) -> dict[str, Any]:
    path = REPO / "tests" / "bench" / name
    if not path.exists():
        return {"error": f"{name} missing"}
    out_json = OUT / (path.stem + ".json")
    print(f"\n### {name}", flush=True)
    proc = subprocess.run([sys.executable, str(path), "--json", str(out_json)], cwd=REPO,
                          env={"PYTHONPATH": str(REPO), **__import__("os").environ})
    if proc.returncode != 0 or not out_json.exists():
        return {"error": f"{name} exited {proc.returncode}"}
    result: dict[str, Any] = json.loads(out_json.read_text())
    return result


def _lower_is_better(node: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """The figures bench_node prints beside its rows: (label, trionet, tailscaled)."""
    out: list[tuple[str, float | None, float | None]] = []
    for row in node.get("rows", []):
        if row["metric"].startswith("64-byte round trip p50"):
            out.append(("64-byte round trip p99 (ms)", row.get("trionet_detail", {}).get("p99_ms"),
                        row.get("tailscaled_detail", {}).get("p99_ms")))
        if row["metric"] == "single stream 200 MB, direct (MB/s)":
            out.append(("CPU s per GB, direct download", row.get("trionet_cpu_s_per_gb"),
                        row.get("tailscaled_cpu_s_per_gb")))
    for key, label in (("rss_idle_mb", "resident memory idle (MB)"),
                       ("rss_after_mb", "resident memory after load (MB)")):
        rss = node.get(key) or {}
        out.append((label, rss.get("trionet"), rss.get("tailscaled")))
    return out


def chart(node: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in node.get("rows", []) if r.get("ratio")]
    if not rows:
        return
    labels = [r["metric"] for r in rows]
    ratios = [r["ratio"] if r.get("higher_is_better", True) else 1 / r["ratio"] for r in rows]
    for label, ours, theirs in _lower_is_better(node):  # drawn as theirs / ours, like the rest
        if ours and theirs:
            labels.append(label)
            ratios.append(theirs / ours)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(labels) + 1.5))
    bars = ax.barh(labels, ratios, color=["tab:green" if x >= 0.5 else "tab:orange" for x in ratios])
    ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("trionet / tailscaled (higher is better for trionet)")
    ax.set_title(f"trionet vs tailscaled, {time.strftime('%Y-%m-%d %H:%M')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    results: dict[str, Any] = {"when": time.time()}
    for name in SCRIPTS:
        results[name] = run_script(name)
    print("\n### trionet vs tailscaled (bench_node.py)", flush=True)
    from tests.bench import bench_node

    results["node"] = bench_node.main(OUT / "bench_node.json")
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    chart(results["node"], OUT / "results.png")
    print(f"\nwrote {OUT / 'results.json'} and {OUT / 'results.png'}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if failed:
        print("benchmarks that failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
