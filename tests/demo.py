"""`make demo`: the whole story on a fresh machine.

1. a real Headscale and two real tailscaled peers, each in its own network
   namespace (tests/realstack.py);
2. a web page served on peer ts1 (reachable at ts1's tailnet address);
3. `python -m trionet up` with --forward and --socks5;
4. curl fetches the page through --forward and through SOCKS5;
5. what happened: trionet's status, and ts1's view of us.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.realstack import NEWEST_HEADSCALE, REPO, Stack, StackError, build, wait_for

FORWARD_PORT = 18080
SOCKS_PORT = 11080
WEB_PORT = 8000


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    build((NEWEST_HEADSCALE,))
    stack = Stack(NEWEST_HEADSCALE)
    daemon: subprocess.Popen[bytes] | None = None
    web: subprocess.Popen[bytes] | None = None
    state = REPO / ".run" / "demo-state"
    try:
        say(f"starting Headscale {NEWEST_HEADSCALE} and two tailscaled peers (namespaces {stack.prefix}-*)")
        stack.start(tailscaleds=2)
        ts1 = stack.tailscaleds[0]
        ts1_ip = ts1.ip4()
        print(f"Headscale: {stack.server_url}; ts1 = {ts1_ip}, ts2 = {stack.tailscaleds[1].ip4()}")

        site = stack.workdir / "site"
        site.mkdir()
        page = b"<h1>Hello from ts1, a real tailscaled peer</h1>\n"
        (site / "index.html").write_bytes(page)
        web = subprocess.Popen([*ts1.host.exec_prefix(), sys.executable, "-m", "http.server", str(WEB_PORT),
                                "--bind", "127.0.0.1", "--directory", str(site)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        say(f"web page on ts1 port {WEB_PORT} (tailscaled forwards its tailnet port to it)")

        key = stack.preauth_key(reusable=True)
        if state.exists():
            subprocess.run(["rm", "-rf", str(state)], check=True)
        cmd = [sys.executable, "-m", "trionet", "up", "--login-server", stack.server_url,
               "--authkey", "file:" + str(_write_key(stack.workdir / "authkey", key)),
               "--state-dir", str(state), "--hostname", "trionet-demo",
               "--ca-file", str(stack.ca_file), "--udp-bind", stack.local_ip,
               "--forward", f"{FORWARD_PORT}=ts1:{WEB_PORT}", "--socks5", str(SOCKS_PORT)]
        say("python -m trionet up " + " ".join(cmd[4:]).replace(key, "…"))
        log = open(stack.workdir / "trionet.log", "wb")
        daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        def running() -> bool:
            if daemon is not None and daemon.poll() is not None:
                raise StackError("trionet exited:\n" + stack.tail("trionet.log"))
            out = subprocess.run([sys.executable, "-m", "trionet", "status", "--json",
                                  "--state-dir", str(state)], capture_output=True, text=True)
            return out.returncode == 0 and json.loads(out.stdout)["status"] == "Running"

        wait_for(running, 60, "trionet to be Running")
        print(stack.tail("trionet.log"))

        say("python -m trionet status   (our netmap, from a real Headscale)")
        print(subprocess.run([sys.executable, "-m", "trionet", "status", "--state-dir", str(state)],
                             capture_output=True, text=True).stdout)
        say("ts1's view: tailscale status (lists trionet-demo)")
        print(ts1.cli("status").stdout)
        from trionet.node import HAVE_DATA_PLANE

        if not HAVE_DATA_PLANE:
            say("joined; the data plane (trionet.wg, trionet.netstack) is not in this build yet, "
                "so the demo stops after the netmap")
            return 0

        say(f"curl http://127.0.0.1:{FORWARD_PORT}/   (through --forward)")
        got = _curl([f"http://127.0.0.1:{FORWARD_PORT}/"])
        print(got.decode(errors="replace"))
        assert got == page, "page through --forward does not match"

        say(f"curl --socks5-hostname 127.0.0.1:{SOCKS_PORT} http://ts1:{WEB_PORT}/   (through SOCKS5)")
        got = _curl(["--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}", f"http://ts1:{WEB_PORT}/"])
        print(got.decode(errors="replace"))
        assert got == page, "page through SOCKS5 does not match"
        print(f"sha256 {hashlib.sha256(got).hexdigest()} matches the page on ts1")

        say("python -m trionet status")
        print(subprocess.run([sys.executable, "-m", "trionet", "status", "--state-dir", str(state)],
                             capture_output=True, text=True).stdout)
        say("ts1's view: tailscale status")
        print(ts1.cli("status").stdout)
        say("demo done: a real tailscaled peer served a page to curl through trionet")
        return 0
    except (StackError, AssertionError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        if (stack.workdir / "trionet.log").exists():
            print(stack.tail("trionet.log"), file=sys.stderr)
        return 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(5)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if web is not None:
            web.terminate()
        stack.stop()


def _write_key(path: Path, key: str) -> Path:
    path.write_text(key)
    os.chmod(path, 0o600)
    return path


def _curl(args: list[str]) -> bytes:
    start = time.monotonic()
    out = subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True)
    if out.returncode != 0:
        raise StackError(f"curl {' '.join(args)} failed: {out.stderr.decode(errors='replace')}")
    print(f"({len(out.stdout)} bytes in {time.monotonic() - start:.2f} s)")
    return out.stdout


if __name__ == "__main__":
    raise SystemExit(main())
