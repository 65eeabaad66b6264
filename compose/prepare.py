"""`make compose-prepare`: everything docker-compose.yml mounts or builds from.

    python compose/prepare.py [--out DIR] [--no-wheel]

writes, into DIR (default: this directory):

* headscale/config.yaml: Headscale's config, rendered from the template that
  tests/realstack.py renders for the native stack (headscale/config.yaml.in),
  with the container's address (10.213.0.1) and paths (/var/lib/headscale, /tls);
* tls/: a throwaway CA and a server certificate for 10.213.0.1 (made by the
  native stack's own make_tls); an existing pair valid for another 7 days is
  kept, so a stack that is up keeps trusting it;
* dist/trionet-*.whl: the project's wheel, built from a clean copy of the
  sources, for the trionet image (Dockerfile).

The auth key is not made here: the stack's one-shot `bootstrap` service
(bootstrap.py) asks Headscale for one when it starts.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATE = HERE / "headscale" / "config.yaml.in"

# The compose network's addresses and the containers' paths (docker-compose.yml).
HEADSCALE_IP = "10.213.0.1"
HEADSCALE_DATA = "/var/lib/headscale"
TLS_DIR = "/tls"
CERT_MIN_LIFE = datetime.timedelta(days=7)


def render_headscale_config(template: str, ip: str, run_dir: str, tls_dir: str, policy: str = "") -> str:
    """The template with its four placeholders filled, as tests/realstack.py fills them."""
    return (template.replace("@IP@", ip).replace("@RUN@", run_dir)
            .replace("@TLS@", tls_dir).replace("@POLICY@", policy))


def compose_headscale_config() -> str:
    return render_headscale_config(TEMPLATE.read_text(), HEADSCALE_IP, HEADSCALE_DATA, TLS_DIR)


def _tls_still_good(tls: Path) -> bool:
    """ca.crt, server.crt and server.key exist and the certificate lives another week."""
    from cryptography import x509

    if not all((tls / name).is_file() for name in ("ca.crt", "server.crt", "server.key")):
        return False
    try:
        cert = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    except ValueError:
        return False
    now = datetime.datetime.now(datetime.UTC)
    return cert.not_valid_after_utc - now > CERT_MIN_LIFE


def write_tls(out: Path) -> bool:
    """Make the CA and server certificate unless a good pair is there; True if made."""
    sys.path.insert(0, str(REPO))
    from tests.realstack import make_tls

    tls = out / "tls"
    if _tls_still_good(tls):
        return False
    # 127.0.0.1 as the native stack has it: the same certificate shape, byte for byte in its SANs.
    make_tls(tls, [HEADSCALE_IP, "127.0.0.1"])
    return True


def build_wheel(out: Path) -> Path:
    """The project's wheel, from a copy of what it is built from: a stale build/ in
    the checkout cannot slip a deleted module into it."""
    dist = out / "dist"
    shutil.rmtree(dist, ignore_errors=True)  # one wheel: the Dockerfile installs dist/*.whl
    dist.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="trionet-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
            if (REPO / name).exists():
                shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "trionet", src / "trionet",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"compose-prepare: building the wheel failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    wheels = sorted(dist.glob("trionet-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"compose-prepare: expected one wheel in {dist}, found {wheels}")
    return wheels[0]


def prepare(out: Path = HERE, wheel: bool = True) -> list[str]:
    """Write everything into ``out``; returns one line per thing done."""
    config = out / "headscale" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    if config.is_dir() and not any(config.iterdir()):
        config.rmdir()  # Docker makes a missing bind source a directory: `up` ran before this
    done = []
    config.write_text(compose_headscale_config())
    done.append(f"rendered {config}")
    done.append(f"{'made' if write_tls(out) else 'kept'} {out / 'tls'} (CA, server certificate for {HEADSCALE_IP})")
    if wheel:
        done.append(f"built {build_wheel(out)}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compose/prepare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: %(default)s)")
    parser.add_argument("--no-wheel", action="store_true", help="skip the wheel (the trionet image needs it)")
    args = parser.parse_args(argv)
    for line in prepare(args.out.resolve(), wheel=not args.no_wheel):
        print(f"compose-prepare: {line}")
    print("compose-prepare: now `docker compose -f compose/docker-compose.yml up`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
