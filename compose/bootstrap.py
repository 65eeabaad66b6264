"""The compose stack's auth-key bootstrap: a user and a reusable pre-auth key.

Runs once per `docker compose up`, in the `bootstrap` service: python:3.11-slim
with Headscale's own CLI copied from the Headscale image (Dockerfile, stage
`bootstrap`), because that image has no shell to run these steps in. The CLI
reaches the server through its unix socket in the shared headscale-data volume
(HEADSCALE_CONFIG names the config, which names the socket); the service starts
only once Headscale's health check passes.

    python bootstrap.py --user alice --out /bootstrap/authkey

The key is written 0600, atomically: a peer never reads half of it. The user
is created only when missing, so a second `up` reuses it; each `up` makes a
new key (Headscale shows a key only when it creates it). Headscale 0.26+ takes
the user's ID for --user.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def headscale(*args: str) -> Any:
    proc = subprocess.run(["headscale", *args, "-o", "json"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"bootstrap: headscale {' '.join(args)} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def user_id(name: str) -> str | None:
    for user in headscale("users", "list") or []:
        if user.get("name") == name:
            return str(user["id"])
    return None


def write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", default="alice")
    parser.add_argument("--out", type=Path, required=True, help="where the key goes")
    parser.add_argument("--expiration", default="24h", help="how long the key admits new nodes")
    args = parser.parse_args(argv)
    uid = user_id(args.user)
    if uid is None:
        headscale("users", "create", args.user)
        uid = user_id(args.user)
        if uid is None:
            raise SystemExit(f"bootstrap: user {args.user} not listed after it was created")
    key = headscale("preauthkeys", "create", "--user", uid, "--reusable", "--expiration", args.expiration)
    write_secret(args.out, str(key["key"]))
    print(f"bootstrap: user {args.user} (id {uid}), reusable key for {args.expiration} in {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
