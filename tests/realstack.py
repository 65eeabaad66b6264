"""Real Headscale + real tailscaled, natively, in network namespaces.

This is trionet's integration stack (see ../shared/docs/real-stack.md). It
builds the binaries once with ``go install`` into a cache directory, then for
each run creates:

* a bridge namespace ``<P>-lan`` holding ``br0`` on ``10.213.N.0/24``;
* ``<P>-hs`` (Headscale, ``10.213.N.1``) and one namespace per tailscaled
  (``10.213.N.11``, ``.12``, ...), each with no default route, so nothing can
  leave the test LAN;
* a veth leg from the namespace this process runs in (``10.213.N.254``), so
  in-process tests (trionet's library API) reach the LAN directly. trionet binds
  its UDP socket to that address in tests.

``N`` is chosen per run so that several runs (and developers) can coexist.

Use it from pytest (``tests/integration/conftest.py``) or by hand:
``python -m tests.realstack build | up | down | status``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TRIONET_REALSTACK_CACHE", Path.home() / ".cache" / "trionet-realstack"))
HEADSCALE_VERSIONS = ("0.23.0", "0.29.3")
NEWEST_HEADSCALE = HEADSCALE_VERSIONS[-1]
TAILSCALE_VERSION = "1.102.5"
# Features that would reach the internet (or are useless here) are compiled out.
TS_OMIT_TAGS = ",".join(
    "ts_omit_" + name
    for name in (
        "portmapper debugportmapper captiveportal cloud clientupdate aws kube tpm ssh "
        "taildrop drive webclient systray tap bird synology"
    ).split()
)
HS_PORT = 8443
STUN_PORT = 3478


class StackError(RuntimeError):
    """The real stack could not be built or started: integration tests fail on it."""


def headscale_bin(version: str) -> Path:
    return CACHE / f"headscale-v{version}" / "headscale"


def tailscale_dir() -> Path:
    return CACHE / f"tailscale-v{TAILSCALE_VERSION}"


def derper_bin() -> Path:
    """Tailscale's own DERP server, the second DERP region of tests/integration/derp_regions.py."""
    return tailscale_dir() / "derper"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-trimpath")
    return env


def _go_install(gobin: Path, *args: str) -> None:
    gobin.mkdir(parents=True, exist_ok=True)
    cmd = ["go", "install", *args]
    print(f"realstack: {' '.join(cmd)}  (GOBIN={gobin})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**_go_env(), "GOBIN": str(gobin)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"go install failed: {' '.join(args)}\n{proc.stderr[-4000:]}")


def build(versions: tuple[str, ...] = HEADSCALE_VERSIONS) -> None:
    """Build every binary the stack needs, once; reruns reuse the cache."""
    if shutil.which("go") is None:
        raise StackError("go is not installed: the real stack is built with `go install`")
    ts = tailscale_dir()
    if not (ts / "tailscaled").exists() or not (ts / "tailscale").exists():
        stamp = f"-X tailscale.com/version.longStamp={TAILSCALE_VERSION}-gomod " \
                f"-X tailscale.com/version.shortStamp={TAILSCALE_VERSION}"
        _go_install(ts, "-tags", TS_OMIT_TAGS, "-ldflags", stamp,
                    f"tailscale.com/cmd/tailscale@v{TAILSCALE_VERSION}",
                    f"tailscale.com/cmd/tailscaled@v{TAILSCALE_VERSION}")
    if not derper_bin().exists():
        _go_install(ts, f"tailscale.com/cmd/derper@v{TAILSCALE_VERSION}")
    for version in versions:
        if not headscale_bin(version).exists():
            _build_headscale(version)


def _build_headscale(version: str) -> None:
    """Build Headscale from its module as the Go module proxy serves it.

    `go install pkg@v` would be the one-liner, but it first asks the proxy for
    the module's version list (to report deprecations), and the proxy here
    refuses that list for headscale with a 403 while serving each version. So:
    download that exact version, then build its ./cmd/headscale with the
    module's own go.mod and go.sum, which is what `go install` does too.
    """
    mod = f"github.com/juanfont/headscale@v{version}"
    dl = subprocess.run(["go", "mod", "download", "-json", mod], env=_go_env(),
                        capture_output=True, text=True, cwd=tempfile.gettempdir())
    if dl.returncode != 0:
        raise StackError(f"go mod download {mod} failed:\n{dl.stdout[-2000:]}{dl.stderr[-2000:]}")
    src = json.loads(dl.stdout)["Dir"]
    out = headscale_bin(version)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"realstack: go build {mod} -> {out}", file=sys.stderr, flush=True)
    for extra in ([], ["-ldflags=-checklinkname=0"]):  # Go >= 1.23 linkname rules vs old deps
        proc = subprocess.run(["go", "build", *extra, "-o", str(out), "./cmd/headscale"],
                              env=_go_env(), cwd=src, capture_output=True, text=True)
        if proc.returncode == 0:
            return
    raise StackError(f"go build {mod} failed:\n{proc.stderr[-4000:]}")


def require_binaries(version: str) -> None:
    missing = [str(p) for p in (headscale_bin(version), tailscale_dir() / "tailscaled",
                                tailscale_dir() / "tailscale") if not p.exists()]
    if missing:
        raise StackError("real-stack binaries missing (run `make stack-bin`): " + ", ".join(missing))


def run(cmd: list[str], check: bool = True, timeout: float = 60,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise StackError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


# --------------------------------------------------------------------------- TLS


def make_tls(directory: Path, ips: list[str]) -> None:
    """A throwaway CA and a server certificate whose SANs are the IPs we use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trionet realstack test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans.append(x509.DNSName("localhost"))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "headscale.test")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(directory / "server.key", 0o600)


# --------------------------------------------------------------------- namespaces


def _used_subnets() -> set[int]:
    out = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    used = set()
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("10.213."):
                used.add(int(word.split(".")[2]))
    return used


def pick_subnet() -> int:
    used = _used_subnets()
    start = os.getpid() % 200
    for i in range(200):
        n = 20 + (start + i) % 200
        if n not in used:
            return n
    raise StackError("no free 10.213.N.0/24 test subnet")


@dataclass
class Host:
    name: str
    netns: str
    ip: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Tailscaled:
    name: str
    host: Host
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    socks_port: int = 1055
    port: int = 41641
    env_extra: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.dir / "tailscaled.sock"

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [*self.host.exec_prefix(), str(tailscale_dir() / "tailscale"),
               f"--socket={self.socket}", *args]
        return run(cmd, check=check, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def cur_addr_of(self, node_key: str) -> str:
        """The UDP address this tailscaled sends to ``node_key`` on, "" while it
        relays through DERP: its own choice of path, which ours does not decide."""
        peer = self.status().get("Peer", {}).get(node_key) or {}
        return str(peer.get("CurAddr") or "")

    def ip4(self) -> str:
        return self.cli("ip", "-4").stdout.strip()

    def node_key(self) -> str:
        return str(self.status()["Self"]["PublicKey"])


class Stack:
    """One Headscale and N tailscaled, each in its own namespace, on one bridge."""

    def __init__(self, headscale_version: str = NEWEST_HEADSCALE, workdir: Path | None = None,
                 prefix: str | None = None, subnet: int | None = None, policy: str | None = None,
                 dns: dict[str, Any] | None = None) -> None:
        self.version = headscale_version
        self.subnet = subnet if subnet is not None else pick_subnet()
        self.prefix = prefix or f"tn{self.subnet}"
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"trionet-stack-{self.prefix}-"))
        self.lan_ns = f"{self.prefix}-lan"
        self.hs_host = Host("hs", f"{self.prefix}-hs", self.ip(1))
        self.local_ip = self.ip(254)
        self.local_if = f"{self.prefix}-r"
        self.tailscaleds: list[Tailscaled] = []
        self.hosts: list[Host] = []
        self.hs_proc: subprocess.Popen[bytes] | None = None
        self._next_host = 11
        self._started = False
        self.user_id: str = ""
        self.dns = dns  # keys that replace those of the config's `dns:` section (see dns_config)
        self.policy_path = self.workdir / "hs" / "policy.hujson"
        if policy is not None:  # an ACL policy (HuJSON); none = allow all
            self.policy_path.parent.mkdir(parents=True, exist_ok=True)
            self.policy_path.write_text(policy)

    # -- addresses
    def ip(self, last: int) -> str:
        return f"10.213.{self.subnet}.{last}"

    @property
    def server_url(self) -> str:
        return f"https://{self.hs_host.ip}:{HS_PORT}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "tls" / "ca.crt"

    # -- lifecycle
    def start(self, tailscaleds: int = 2) -> Stack:
        require_binaries(self.version)
        try:
            self._make_lan()
            self._add_host(self.hs_host)
            make_tls(self.workdir / "tls", [self.hs_host.ip, "127.0.0.1"])
            self._write_headscale_config()
            self.start_headscale()
            self.user_id = self._create_user("alice")
            for _ in range(tailscaleds):
                self.add_tailscaled()
            self.wait_mesh()
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self

    def _make_lan(self) -> None:
        ns = self.lan_ns
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", ns, "link", "set", "br0", "up"])
        # The leg from our own namespace into the LAN.
        run(["ip", "link", "add", self.local_if, "type", "veth", "peer", "name", "v-local",
             "netns", ns])
        run(["ip", "-n", ns, "link", "set", "v-local", "master", "br0", "up"])
        run(["ip", "addr", "add", f"{self.local_ip}/24", "dev", self.local_if])
        run(["ip", "link", "set", self.local_if, "up"])

    def _add_host(self, host: Host) -> None:
        run(["ip", "netns", "add", host.netns])
        run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.lan_ns, "link", "add", f"v-{host.name}", "type", "veth",
             "peer", "name", "eth0", "netns", host.netns])
        run(["ip", "-n", self.lan_ns, "link", "set", f"v-{host.name}", "master", "br0", "up"])
        run(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
        # No stray DNS: `ip netns exec` bind-mounts this resolv.conf.
        etc = Path("/etc/netns") / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.hosts.append(host)

    def new_host(self, name: str) -> Host:
        host = Host(name, f"{self.prefix}-{name}", self.ip(self._next_host))
        self._next_host += 1
        self._add_host(host)
        return host

    def _write_headscale_config(self) -> None:
        hsdir = self.workdir / "hs"
        hsdir.mkdir(parents=True, exist_ok=True)
        template = (REPO / "compose" / "headscale" / "config.yaml.in").read_text()
        policy = ""
        if self.policy_path.exists():
            policy = str(self.policy_path)
        text = (template.replace("@IP@", self.hs_host.ip).replace("@RUN@", str(hsdir))
                .replace("@TLS@", str(self.workdir / "tls")).replace("@POLICY@", policy))
        if self.dns is not None:
            text = dns_config(text, self.dns)
        (hsdir / "config.yaml").write_text(text)

    @property
    def hs_config(self) -> Path:
        return self.workdir / "hs" / "config.yaml"

    def start_headscale(self) -> None:
        log = open(self.workdir / "hs" / "log", "ab")
        self.hs_proc = subprocess.Popen(
            [*self.hs_host.exec_prefix(), str(headscale_bin(self.version)), "serve",
             "-c", str(self.hs_config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.hs_proc.poll() is not None:
                raise StackError(f"headscale exited: {self.tail('hs/log')}")
            probe = run(["curl", "-fsS", "--max-time", "1", "--cacert", str(self.ca_file),
                         f"{self.server_url}/health"], check=False)
            if probe.returncode == 0:
                sock = run(self.headscale_cmd("users", "list", "-o", "json"), check=False)
                if sock.returncode == 0:
                    return
            time.sleep(0.1)
        raise StackError(f"headscale did not become healthy in 30 s: {self.tail('hs/log')}")

    def stop_headscale(self, sig: int = signal.SIGTERM) -> None:
        _stop_process(self.hs_proc, sig)
        self.hs_proc = None

    def restart_headscale(self, down_for: float = 0.0) -> None:
        self.stop_headscale(signal.SIGKILL)
        time.sleep(down_for)
        self.start_headscale()

    def tail(self, rel: str, n: int = 3000) -> str:
        path = self.workdir / rel
        return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"

    # -- headscale CLI
    def headscale_cmd(self, *args: str) -> list[str]:
        return [str(headscale_bin(self.version)), "-c", str(self.hs_config), *args]

    def headscale(self, *args: str) -> Any:
        """Run the headscale CLI with `-o json` and parse its answer."""
        out = run(self.headscale_cmd(*args, "-o", "json")).stdout
        return json.loads(out) if out.strip() else None

    @property
    def users_by_id(self) -> bool:
        major, minor, _ = (int(x) for x in self.version.split("."))
        return (major, minor) >= (0, 26)

    def _create_user(self, name: str) -> str:
        self.headscale("users", "create", name)
        if not self.users_by_id:
            return name
        for user in self.headscale("users", "list"):
            if user["name"] == name:
                return str(user["id"])
        raise StackError(f"user {name} not found after create")

    def preauth_key(self, reusable: bool = True, ephemeral: bool = False,
                    expiration: str = "1h") -> str:
        args = ["preauthkeys", "create", "--user", self.user_id, "--expiration", expiration]
        if reusable:
            args.append("--reusable")
        if ephemeral:
            args.append("--ephemeral")
        return str(self.headscale(*args)["key"])

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.headscale("nodes", "list") or [])

    def node_by_hostname(self, hostname: str) -> dict[str, Any] | None:
        for node in self.nodes():
            if node.get("name") == hostname or node.get("given_name") == hostname:
                return node
        return None

    # -- routes (protocol-notes-next §17.2)
    def _route_rows(self, hostname: str) -> list[dict[str, Any]]:
        """0.23: `routes list` rows of `hostname` (id, prefix, advertised, enabled, is_primary)."""
        return [r for r in self.headscale("routes", "list") or []
                if (r.get("node") or {}).get("name") == hostname
                or (r.get("node") or {}).get("given_name") == hostname]

    def announced_routes(self, hostname: str) -> set[str]:
        """The routes Headscale has seen `hostname` announce (Hostinfo.RoutableIPs)."""
        if self.users_by_id:  # 0.26 and later
            node = self.node_by_hostname(hostname)
            return set(node.get("available_routes") or []) if node is not None else set()
        return {r["prefix"] for r in self._route_rows(hostname) if r.get("advertised")}

    def approved_routes(self, hostname: str) -> set[str]:
        """The routes of `hostname` an admin (or autoApprovers) approved."""
        if self.users_by_id:
            node = self.node_by_hostname(hostname)
            return set(node.get("approved_routes") or []) if node is not None else set()
        return {r["prefix"] for r in self._route_rows(hostname) if r.get("enabled")}

    def approve_routes(self, hostname: str, prefixes: Any, timeout: float = 30) -> None:
        """Approve `prefixes` that node `hostname` announces, once Headscale has seen them:
        0.26+ `nodes approve-routes -i ID -r a,b` (it replaces the approved set: we add to
        it), 0.23 `routes enable -r ROUTE_ID` per route (an exit route enables both families)."""
        want = set(prefixes)
        wait_for(lambda: want <= self.announced_routes(hostname), timeout,
                 f"Headscale to see {hostname} announce {sorted(want)}")
        if self.users_by_id:
            node = self.node_by_hostname(hostname)
            assert node is not None
            approved = sorted(set(node.get("approved_routes") or []) | want)
            self.headscale("nodes", "approve-routes", "-i", str(node["id"]), "-r", ",".join(approved))
        else:
            for route in self._route_rows(hostname):
                if route.get("prefix") in want and not route.get("enabled"):
                    self.headscale("routes", "enable", "-r", str(route["id"]))
        wait_for(lambda: want <= self.approved_routes(hostname), timeout,
                 f"Headscale to list {sorted(want)} of {hostname} as approved")

    # -- tailscaled
    def add_tailscaled(self, name: str | None = None, up: bool = True,
                       env_extra: dict[str, str] | None = None) -> Tailscaled:
        name = name or f"ts{len(self.tailscaleds) + 1}"
        host = self.new_host(name)
        node = Tailscaled(name, host, self.workdir / name, env_extra=dict(env_extra or {}))
        (node.dir / "state").mkdir(parents=True, exist_ok=True)
        (node.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.tailscaleds.append(node)
        self.start_tailscaled(node)
        if up:
            self.tailscale_up(node)
        return node

    def start_tailscaled(self, node: Tailscaled) -> None:
        env = {
            "SSL_CERT_FILE": str(self.ca_file),
            "TS_NO_LOGS_NO_SUPPORT": "true",
            "TS_LOGS_DIR": str(node.dir / "logs"),
            "TS_DISABLE_PORTMAPPER": "1",
            "TS_FORCE_NOISE_443": "true",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(node.dir),
            **node.env_extra,
        }
        log = open(node.dir / "log", "ab")
        node.proc = subprocess.Popen(
            [*node.host.exec_prefix(), "env", "-i", *(f"{k}={v}" for k, v in env.items()),
             str(tailscale_dir() / "tailscaled"), "--tun=userspace-networking",
             f"--statedir={node.dir / 'state'}", f"--socket={node.socket}", f"--port={node.port}",
             "--no-logs-no-support", "--verbose=1",
             f"--socks5-server=127.0.0.1:{node.socks_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise StackError(f"tailscaled {node.name} exited: {self.tail(node.name + '/log')}")
            if node.socket.exists() and node.cli("status", "--json", check=False).returncode in (0, 1):
                return
            time.sleep(0.1)
        raise StackError(f"tailscaled {node.name} socket did not appear")

    def stop_tailscaled(self, node: Tailscaled) -> None:
        _stop_process(node.proc, signal.SIGTERM)
        node.proc = None

    def tailscale_up(self, node: Tailscaled, key: str | None = None) -> None:
        keyfile = node.dir / "authkey"
        keyfile.write_text(key or self.preauth_key())
        os.chmod(keyfile, 0o600)
        node.cli("up", f"--login-server={self.server_url}", f"--auth-key=file:{keyfile}",
                 f"--hostname={node.name}", "--accept-dns=false", "--accept-routes=false",
                 "--timeout=60s", timeout=90)
        wait_for(lambda: node.status().get("BackendState") == "Running", 30,
                 f"tailscaled {node.name} Running")

    def wait_mesh(self, timeout: float = 30) -> None:
        """Poll until every tailscaled lists every other one as a peer."""
        names = {t.name for t in self.tailscaleds}
        for node in self.tailscaleds:
            others = names - {node.name}
            wait_for(lambda node=node, others=others: others <= {
                p.get("HostName") for p in (node.status().get("Peer") or {}).values()},
                timeout, f"{node.name} to see {sorted(others)}")

    def block_udp_between_nodes(self) -> None:
        """DERP-only: drop UDP on the bridge except to and from Headscale (STUN)."""
        rules = (
            "table bridge tn_block {\n chain udp_block {\n"
            "  type filter hook forward priority 0; policy accept;\n"
            f"  ip saddr {self.hs_host.ip} accept\n  ip daddr {self.hs_host.ip} accept\n"
            "  ip protocol udp drop\n }\n}\n"
        )
        run(["ip", "netns", "exec", self.lan_ns, "nft", "-f", "-"], input=rules)

    def unblock_udp(self) -> None:
        run(["ip", "netns", "exec", self.lan_ns, "nft", "delete", "table", "bridge", "tn_block"],
            check=False)

    # -- impairments: loss, delay, DERP drops (issue 9)
    def add_loss(self, percent: int, peer_ip: str, local_ip: str | None = None) -> None:
        """Drop ``percent``% of packets, at random, each way between our leg and ``peer_ip``.

        The rules sit on the bridge (``<P>-lan``), i.e. between the namespaces:
        every IPv4 packet from ``local_ip`` (default: our veth leg, where trionet
        runs) to ``peer_ip`` and back draws ``numgen random mod 100`` and is
        dropped below ``percent``; this kernel has no netem. ``loss_counters``
        reads how many were dropped.
        """
        local_ip = local_ip or self.local_ip
        rules = (
            "table bridge tn_loss {\n chain loss {\n"
            "  type filter hook forward priority -10; policy accept;\n"
            f"  ip saddr {local_ip} ip daddr {peer_ip} counter numgen random mod 100 < {percent}"
            " counter drop comment \"out\"\n"
            f"  ip saddr {peer_ip} ip daddr {local_ip} counter numgen random mod 100 < {percent}"
            " counter drop comment \"in\"\n }\n}\n"
        )
        self.remove_loss()
        run(["ip", "netns", "exec", self.lan_ns, "nft", "-f", "-"], input=rules)

    def loss_counters(self) -> dict[str, dict[str, int]]:
        """{"out"/"in": {"seen": packets, "dropped": packets}} for the ``add_loss`` rules."""
        out = run(["ip", "netns", "exec", self.lan_ns, "nft", "-j", "list", "table", "bridge", "tn_loss"]).stdout
        result: dict[str, dict[str, int]] = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            counters = [e["counter"] for e in rule["expr"] if "counter" in e]
            result[rule["comment"]] = {"seen": counters[0]["packets"], "dropped": counters[1]["packets"]}
        return result

    def remove_loss(self) -> None:
        run(["ip", "netns", "exec", self.lan_ns, "nft", "delete", "table", "bridge", "tn_loss"], check=False)

    def add_delay_relay(self, peer: Tailscaled, local_port: int, delay: float = 0.05) -> DelayRelay:
        """Put a delaying userspace UDP relay on the direct path to ``peer``.

        ``local_port`` is trionet's UDP port (``Node(udp_port=...)``, bound on
        our leg). See ``tests/integration/udprelay.py`` for the relay:

        * in our namespace, ``nat output``: trionet's datagrams from
          ``local_ip:local_port`` to ``peer_ip:41641`` are DNATed to the relay's
          socket A; its answers from A go back through the same conntrack entry,
          so trionet sees them from ``peer_ip:41641``: to trionet this is a plain
          direct path, only 2 x ``delay`` slower;
        * the relay's socket B (``local_ip``, another port) talks to the peer,
          which sees trionet there, as behind a NAT, and finds it by disco;
        * on the bridge the peer may not reach ``local_ip:local_port`` itself
          (that endpoint is advertised via STUN and the netmap), so the only
          direct path either way runs through the relay. DERP is untouched: if
          the relayed path failed, traffic would fall back to DERP, and the
          tests check the path is the relayed direct one.
        """
        relay = DelayRelay(self, peer, local_port, delay)
        relay.start()
        return relay

    def derp_connections(self) -> list[dict[str, Any]]:
        """Our namespace's TCP connections to Headscale's port (control and DERP), with byte counts."""
        out = run(["ss", "-tinH", "state", "established", "dst", self.hs_host.ip,
                   "dport", "=", f":{HS_PORT}"]).stdout
        conns: list[dict[str, Any]] = []
        for line in out.splitlines():
            words = line.split()
            if not words:
                continue
            if not line[0].isspace():  # "Recv-Q Send-Q Local:Port Peer:Port"; then an indented info line
                local = next((w for w in words if w.startswith(self.local_ip + ":")), None)
                conns.append({"sport": int(local.rsplit(":", 1)[1]) if local else 0, "bytes": 0})
            elif conns:
                for w in words:
                    for key in ("bytes_acked:", "bytes_received:"):
                        if w.startswith(key):
                            conns[-1]["bytes"] += int(w[len(key):])
        return [c for c in conns if c["sport"]]

    def drop_derp_connection(self, sample: float = 0.5, patience: float = 15) -> int | None:
        """Abort our busiest TCP connection to Headscale (= DERP while it carries the data).

        Control (TS2021) and DERP both go to Headscale's one port, so the DERP
        one is told apart by traffic: with UDP blocked it carries every packet
        of the transfer, while control carries a few keep-alives. We sample
        the byte counters twice and ``ss -K`` the one that grew most: the
        kernel aborts it (trionet's next read gets ECONNABORTED) and sends a
        RST to Headscale, the way a middlebox or a server crash drops it.
        Returns the source port killed, or None when no connection moved data
        for ``patience`` seconds (the transfer is stalled: nothing to drop).
        """
        grown: dict[int, int] = {}
        deadline = time.monotonic() + patience  # the transfer may be between two bursts
        while True:
            before = {c["sport"]: c["bytes"] for c in self.derp_connections()}
            time.sleep(sample)
            after = {c["sport"]: c["bytes"] for c in self.derp_connections()}
            grown = {port: n - before.get(port, 0) for port, n in after.items()}
            port, delta = max(grown.items(), key=lambda kv: int(kv[1])) if grown else (0, 0)
            if delta >= 16 << 10:
                break
            if time.monotonic() > deadline:
                return None
        run(["ss", "-K", "-tn", "dst", self.hs_host.ip, "dport", "=", f":{HS_PORT}",
             "sport", "=", f":{port}"])
        return int(port)

    # -- teardown
    def stop(self) -> None:
        for node in self.tailscaleds:
            with contextlib.suppress(Exception):
                self.stop_tailscaled(node)
        with contextlib.suppress(Exception):
            self.stop_headscale()
        run(["ip", "link", "del", self.local_if], check=False)
        for host in self.hosts:
            run(["ip", "netns", "del", host.netns], check=False)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
        run(["ip", "netns", "del", self.lan_ns], check=False)
        self.hosts.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "headscale_version": self.version, "server_url": self.server_url,
            "ca_file": str(self.ca_file), "workdir": str(self.workdir), "prefix": self.prefix,
            "subnet": self.subnet, "local_ip": self.local_ip, "local_if": self.local_if,
            "hs_config": str(self.hs_config), "headscale_bin": str(headscale_bin(self.version)),
            "hs_pid": self.hs_proc.pid if self.hs_proc else None,
            "tailscaleds": [
                {"name": t.name, "netns": t.host.netns, "lan_ip": t.host.ip, "socket": str(t.socket),
                 "socks5": f"127.0.0.1:{t.socks_port}", "pid": t.proc.pid if t.proc else None}
                for t in self.tailscaleds
            ],
            "hosts": [h.netns for h in self.hosts], "lan_ns": self.lan_ns,
        }


class DelayRelay:
    """The delaying UDP relay on the path to one peer; see ``Stack.add_delay_relay``."""

    def __init__(self, stack: Stack, peer: Tailscaled, local_port: int, delay: float) -> None:
        self.stack = stack
        self.peer = peer
        self.local_port = local_port
        self.delay = delay
        self.proc: subprocess.Popen[str] | None = None
        self.client_side: tuple[str, int] = ("", 0)
        self.peer_side: tuple[str, int] = ("", 0)
        self.counts: dict[str, Any] = {}
        self.nat_table = f"tn_delay_{stack.prefix}"  # our namespace is shared by concurrent runs

    def start(self) -> None:
        ip = self.stack.local_ip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.udprelay", "--client-side", f"{ip}:0",
             "--peer-side", f"{ip}:0", "--peer", f"{self.peer.host.ip}:{self.peer.port}",
             "--delay", str(self.delay)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        try:
            ready = json.loads(first)
        except ValueError:
            self.proc.kill()
            raise StackError(f"UDP relay did not start: {first}{self.proc.stdout.read()[-2000:]}") from None
        self.client_side = (str(ready["a"][0]), int(ready["a"][1]))
        self.peer_side = (str(ready["b"][0]), int(ready["b"][1]))
        peer_ip, peer_port = self.peer.host.ip, self.peer.port
        run(["nft", "-f", "-"], input=(
            f"table ip {self.nat_table} {{\n chain out {{\n"
            "  type nat hook output priority -100; policy accept;\n"
            f"  ip saddr {ip} udp sport {self.local_port} ip daddr {peer_ip} udp dport {peer_port}"
            f" counter dnat to {ip}:{self.client_side[1]}\n }}\n}}\n"))
        run(["ip", "netns", "exec", self.stack.lan_ns, "nft", "-f", "-"], input=(
            "table bridge tn_delay {\n chain f {\n  type filter hook forward priority -20; policy accept;\n"
            f"  ip saddr {peer_ip} ip daddr {ip} udp dport {self.local_port} counter drop\n }}\n}}\n"))

    def stop(self) -> dict[str, Any]:
        run(["nft", "delete", "table", "ip", self.nat_table], check=False)
        run(["ip", "netns", "exec", self.stack.lan_ns, "nft", "delete", "table", "bridge", "tn_delay"],
            check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                out, _ = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            for line in out.splitlines():
                if line.startswith("{"):
                    self.counts = json.loads(line)
        self.proc = None
        return self.counts


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Signal a process, give it 10 s, then kill it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dns_config(config_text: str, dns: dict[str, Any]) -> str:
    """Headscale's config with these keys set in its `dns:` section (e.g. extra_records,
    nameservers, override_local_dns: 0.29 refuses override_local_dns without global
    nameservers, 0.23 ignores the key)."""
    import yaml

    config = yaml.safe_load(config_text)
    config["dns"] = {**config.get("dns", {}), **dns}
    return str(yaml.safe_dump(config, sort_keys=False))


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll (never sleep blindly): return the first truthy result or raise."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise StackError(f"timed out after {timeout} s waiting for {what}" +
                     (f" (last error: {last_exc})" if last_exc else ""))


# ---------------------------------------------------------------------------- CLI

STATE_FILE = REPO / ".run" / "stack.json"


def _down_from_file(path: Path) -> None:
    if not path.exists():
        print("realstack: no stack is up", file=sys.stderr)
        return
    info = json.loads(path.read_text())
    for pid in [t.get("pid") for t in info["tailscaleds"]] + [info.get("hs_pid")]:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    time.sleep(0.5)
    run(["ip", "link", "del", info["local_if"]], check=False)
    for ns in info["hosts"] + [info["lan_ns"]]:
        run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    path.unlink()
    print(f"realstack: down ({info['prefix']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.realstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="go install Headscale and tailscale into the cache")
    up = sub.add_parser("up", help="start a stack and leave it running")
    up.add_argument("--headscale", default=NEWEST_HEADSCALE, choices=HEADSCALE_VERSIONS)
    up.add_argument("--tailscaleds", type=int, default=2)
    sub.add_parser("down", help="stop the stack started by `up`")
    sub.add_parser("status", help="print the running stack as JSON")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            build()
        elif args.cmd == "up":
            if STATE_FILE.exists():
                _down_from_file(STATE_FILE)
            build((args.headscale,))
            stack = Stack(args.headscale, workdir=REPO / ".run" / "stack")
            shutil.rmtree(stack.workdir, ignore_errors=True)
            stack.workdir.mkdir(parents=True)
            stack.start(args.tailscaleds)
            info = stack.describe()
            info["authkey"] = stack.preauth_key(reusable=True, expiration="24h")
            STATE_FILE.write_text(json.dumps(info, indent=2))
            os.chmod(STATE_FILE, 0o600)
            print(json.dumps(info, indent=2))
        elif args.cmd == "down":
            _down_from_file(STATE_FILE)
        elif args.cmd == "status":
            print(STATE_FILE.read_text() if STATE_FILE.exists() else "{}")
    except StackError as exc:
        print(f"realstack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
