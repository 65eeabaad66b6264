"""compose/docker-compose.yml, read and run without Docker.

No Docker engine runs here, so tests/integration/test_compose.py runs the
compose services' own command lines natively, with what Docker would have
given them standing in as follows:

* an image's entrypoint: ``IMAGES`` (ko's /ko-app/headscale is the Headscale
  binary realstack builds; the tailscale image's containerboot is built from
  tailscale.com/cmd/containerboot at the same version with the image's build
  tags, and runs realstack's tailscaled and tailscale from PATH; ``python`` is
  this interpreter, importing trionet from the prepared wheel only);
* a container's network: one namespace per service, a bridge namespace per
  compose network, the compose file's addresses (others from .2 up); a
  non-internal network gives the default route, as Docker does; ``none`` is a
  namespace with only lo; ``service:X`` is X's namespace;
* the host: a namespace ``<P>-host`` holding each network's gateway address;
  a published port is a userland TCP proxy there (docker-proxy's part) from
  127.0.0.1:HOSTPORT to the container's address on its gateway network;
* a volume: a directory (bind sources under the prepared compose directory,
  named volumes under the run directory). Container paths in a service's
  environment and command line, and in Headscale's config, are rewritten to
  them: the one edit made to what the compose file says;
* every process gets its own /run (a tmpfs in its own mount namespace) and
  hostname, as a container has: tailscaled's socket (TS_SOCKET) lives there;
  a volume mounted ``:ro`` is read-only in that namespace (the bootstrap
  reaches Headscale's socket through one);
* depends_on: started, healthy (the health check's command, run in the
  container's namespaces with its environment, exits 0), or completed with 0.

Everything is in namespaces named after the run, with no route off the
machine: several runs, and realstack's stacks, can be up at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.realstack import CACHE, REPO, TAILSCALE_VERSION, StackError, headscale_bin, run, tailscale_dir, wait_for

COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
# The files whose text names container paths: rewritten like a command line.
PATH_BEARING_FILES = ("headscale/config.yaml",)
SHELLS = {"sh", "bash", "ash", "dash", "zsh", "busybox"}


@dataclass(frozen=True)
class Image:
    """What the compose file relies on in an image (sources in the notes)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    has_shell: bool = True
    # The programs a distroless image has; None: a full userland.
    programs: frozenset[str] | None = None


IMAGES: dict[str, Image] = {
    # ko on gcr.io/distroless/base-debian13 (headscale v0.29.3 .goreleaser.yml, kos:): Entrypoint
    # /ko-app/headscale, no Cmd, /ko-app appended to PATH (ko pkg/build/gobuild.go); no shell.
    "headscale/headscale:0.29.3": Image(entrypoint=("/ko-app/headscale",), has_shell=False,
                                        programs=frozenset({"headscale", "/ko-app/headscale"})),
    # mkctr on tailscale/alpine-base (tailscale v1.102.5 build_docker.sh): entrypoint containerboot.
    "tailscale/tailscale:v1.102.5": Image(entrypoint=("/usr/local/bin/containerboot",)),
    "python:3.11-slim": Image(cmd=("python3",)),
}

CONTAINERBOOT_TAGS = "ts_kube,ts_package_container"  # build_docker.sh --gotags for the client image


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("services"), dict):
        raise ValueError(f"{path}: no services")
    return spec


def load_prepare() -> ModuleType:
    """compose/prepare.py as a module (compose/ is no package)."""
    spec = importlib.util.spec_from_file_location("compose_prepare", COMPOSE_DIR / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- reading the spec


@dataclass(frozen=True)
class Mount:
    source: str  # "./x" (bind, relative to the compose file) or a named volume
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/"))


def mounts(service: dict[str, Any]) -> list[Mount]:
    out = []
    for entry in service.get("volumes", []):
        if not isinstance(entry, str):
            raise ValueError(f"long-form volume entries are not read here: {entry!r}")
        parts = entry.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"volume {entry!r}: expected SOURCE:TARGET[:ro]")
        out.append(Mount(parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
    return out


def as_list(value: Any) -> list[str]:
    """A compose command or entrypoint, which this project writes as lists only."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"write commands as lists (a string is split by a shell-like parser): {value!r}")
    return [str(v) for v in value]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def argv_of(service: dict[str, Any]) -> list[str]:
    """The process Docker starts: entrypoint (the service's, else the image's) + command."""
    image = IMAGES.get(str(service.get("image", "")), Image())
    entrypoint = as_list(service["entrypoint"]) if "entrypoint" in service else list(image.entrypoint)
    command = as_list(service["command"]) if "command" in service else (
        [] if "entrypoint" in service else list(image.cmd))
    return entrypoint + command


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {str(d): "service_started" for d in deps}
    return {str(name): str((cond or {}).get("condition", "service_started")) for name, cond in deps.items()}


def healthcheck_argv(service: dict[str, Any]) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if test is None:
        return None
    if not isinstance(test, list) or test[:1] != ["CMD"]:
        raise ValueError(f"health checks here are [CMD, ...] (no shell): {test!r}")
    return [str(t) for t in test[1:]]


def distroless_violations(name: str, service: dict[str, Any]) -> list[str]:
    """What a service asks of an image that has no shell: a shell, or a program it lacks."""
    image = IMAGES.get(str(service.get("image", "")))
    if image is None or image.has_shell:
        return []
    programs = image.programs or frozenset()
    found = []
    argv = argv_of(service)
    if not argv or argv[0] not in programs:
        found.append(f"{name}: runs {argv[:1]}, which {service['image']} lacks (it has {sorted(programs)})")
    if any(Path(arg).name in SHELLS for arg in argv):
        found.append(f"{name}: a shell in its command line: {argv}")
    test = (service.get("healthcheck") or {}).get("test")
    if test is not None:
        if not isinstance(test, list) or test[:1] != ["CMD"]:
            found.append(f"{name}: health check {test!r} needs a shell (only [CMD, ...] execs directly)")
        elif len(test) < 2 or test[1] not in programs:
            found.append(f"{name}: health check runs {test[1:2]}, which {service['image']} lacks")
    return found


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join((*path, name))}")
        if name in seen:
            return
        svc = services[name]
        deps = list(depends_on(svc))
        mode = str(svc.get("network_mode", ""))
        if mode.startswith("service:"):
            deps.append(mode.split(":", 1)[1])
        for dep in deps:
            visit(dep, (*path, name))
        seen.add(name)
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def rewrite_paths(text: str, mapping: dict[str, str]) -> str:
    """Container paths (whole path components) to host paths, in one pass (a host path
    is never rewritten again), the longest container path first."""
    if not mapping:
        return text
    targets = "|".join(re.escape(t) for t in sorted(mapping, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({targets})(?=/|$|[^\w.-])", lambda m: mapping[m.group(1)], text)


# ----------------------------------------------------------------------------- native binaries


def containerboot_bin() -> Path:
    return CACHE / f"containerboot-v{TAILSCALE_VERSION}" / "containerboot"


def build_containerboot() -> Path:
    """tailscale.com/cmd/containerboot as the tailscale image has it, built once into the cache."""
    out = containerboot_bin()
    if out.exists():
        return out
    if shutil.which("go") is None:
        raise StackError("go is not installed: containerboot is built with `go install`")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run builds it once
        if out.exists():
            return out
        stamp = (f"-X tailscale.com/version.longStamp={TAILSCALE_VERSION}-gomod "
                 f"-X tailscale.com/version.shortStamp={TAILSCALE_VERSION}")
        env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-trimpath",
               "GOBIN": str(out.parent)}
        print(f"compose_native: go install containerboot@v{TAILSCALE_VERSION} -> {out}", file=sys.stderr, flush=True)
        proc = subprocess.run(["go", "install", "-tags", CONTAINERBOOT_TAGS, "-ldflags", stamp,
                               f"tailscale.com/cmd/containerboot@v{TAILSCALE_VERSION}"],
                              env=env, capture_output=True, text=True, cwd="/", timeout=1800)
        if proc.returncode != 0:
            raise StackError(f"building containerboot failed:\n{proc.stderr[-4000:]}")
    return out


def headscale_version(services: dict[str, dict[str, Any]]) -> str:
    images = {str(s.get("image", "")) for s in services.values()}
    versions = [i.split(":", 1)[1].lstrip("v") for i in images if i.startswith("headscale/headscale:")]
    if len(versions) != 1:
        raise StackError(f"expected one headscale image, found {versions}")
    return versions[0]


# ----------------------------------------------------------------------------- the native stack

TCP_PROXY = r'''
import socket, sys, threading
def pipe(src, dst, done):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    with done[0]:
        done[1] += 1
        last = done[1] == 2
    if last:
        src.close(); dst.close()
    else:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
def serve(srv, target):
    while True:
        client, _ = srv.accept()
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        done = [threading.Lock(), 0]
        threading.Thread(target=pipe, args=(client, upstream, done), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, done), daemon=True).start()
servers = []
for arg in sys.argv[1:]:
    listen, target = arg.split("=")
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    servers.append((socket.create_server((lhost, int(lport))), (thost, int(tport))))
print("ready", flush=True)
for srv, target in servers[1:]:
    threading.Thread(target=serve, args=(srv, target), daemon=True).start()
serve(*servers[0])
'''


@dataclass
class Network:
    name: str
    netns: str
    subnet: ipaddress.IPv4Network
    gateway: str
    internal: bool
    next_host: int = 2
    used: set[str] = field(default_factory=set)

    def allocate(self) -> str:
        while True:
            ip = str(self.subnet.network_address + self.next_host)
            self.next_host += 1
            if ip not in self.used and ip != self.gateway:
                self.used.add(ip)
                return ip


@dataclass
class Container:
    name: str
    netns: str
    addresses: dict[str, str] = field(default_factory=dict)  # network -> address
    gateway_network: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


class NativeCompose:
    """The compose services as native processes; see the module's docstring."""

    def __init__(self, compose_dir: Path, run_dir: Path, python: str = sys.executable,
                 python_path: Path | None = None) -> None:
        self.compose_dir = compose_dir
        self.run_dir = run_dir
        self.spec = load_compose(compose_dir / "docker-compose.yml")
        self.services: dict[str, dict[str, Any]] = self.spec["services"]
        self.prefix = f"tc{os.getpid() % 100000}"
        self.host_ns = f"{self.prefix}-host"
        self.python = python
        self.python_path = python_path
        self.networks: dict[str, Network] = {}
        self.containers: dict[str, Container] = {}
        self.namespaces: list[str] = []
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.started: list[str] = []
        self.bindir = run_dir / "bin"
        self.logdir = run_dir / "logs"

    # -- lifecycle
    def start(self, timeout: float = 90) -> NativeCompose:
        try:
            self._binaries()
            self._make_networks()
            for name in start_order(self.services):
                self._start_service(name, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for helper in self.helpers:
            _terminate(helper)
        for name in reversed(self.started):
            proc = self.containers[name].proc
            if proc is not None:
                _terminate(proc)
        for ns in self.namespaces:  # whatever a process left behind in our namespaces (tailscaled)
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.namespaces.clear()

    # -- pieces
    def _binaries(self) -> None:
        self.bindir.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        hs = headscale_bin(headscale_version(self.services))
        for path in (hs, tailscale_dir() / "tailscaled", tailscale_dir() / "tailscale"):
            if not path.exists():
                raise StackError(f"real-stack binary missing (run `make stack-bin`): {path}")
        (self.bindir / "headscale").symlink_to(hs)
        (self.bindir / "containerboot").symlink_to(build_containerboot())
        # A venv's python must be started by its own path to find its site-packages: a wrapper.
        wrapper = self.bindir / "python"
        wrapper.write_text(f'#!/bin/sh\nexec {self.python} "$@"\n')
        wrapper.chmod(0o755)

    def _program(self, argv0: str) -> str:
        """An image's absolute program path -> ours; names are found on our PATH."""
        known = {"/ko-app/headscale": "headscale", "/usr/local/bin/containerboot": "containerboot",
                 "/usr/local/bin/python": "python"}
        name = known.get(argv0, argv0)
        if "/" in name:
            raise StackError(f"no native stand-in for {argv0}")
        return name

    def _add_ns(self, name: str) -> str:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # no stray DNS
        return name

    def _make_networks(self) -> None:
        self._add_ns(self.host_ns)
        # Docker picks a subnet for a network the file leaves open; any will do in our namespaces.
        spare = (ipaddress.IPv4Network(f"172.31.{n}.0/24") for n in range(200, 255))
        for i, (name, net) in enumerate((self.spec.get("networks") or {}).items()):
            net = net or {}
            configs = ((net.get("ipam") or {}).get("config")) or [{}]
            subnet = ipaddress.IPv4Network(configs[0].get("subnet") or next(spare))
            gateway = str(configs[0].get("gateway") or (subnet.network_address + 1))
            ns = self._add_ns(f"{self.prefix}-n{i}")
            network = Network(name, ns, subnet, gateway, bool(net.get("internal")), used={gateway})
            self.networks[name] = network
            run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", ns, "link", "set", "br0", "up"])
            # The host's end of the bridge holds the gateway address, as Docker's bridge does.
            self._attach(self.host_ns, network, f"gw{i}", gateway)
        for svc in self.services.values():  # fixed addresses are taken before any is handed out
            for name, opts in _service_networks(svc).items():
                if opts.get("ipv4_address"):
                    self.networks[name].used.add(str(opts["ipv4_address"]))

    def _attach(self, netns: str, network: Network, ifname: str, ip: str) -> None:
        leg = f"v{len(self.namespaces)}-{ifname}"[:15]
        run(["ip", "-n", network.netns, "link", "add", leg, "type", "veth", "peer", "name", ifname,
             "netns", netns])
        run(["ip", "-n", network.netns, "link", "set", leg, "master", "br0", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{ip}/{network.subnet.prefixlen}", "dev", ifname])
        run(["ip", "-n", netns, "link", "set", ifname, "up"])

    def _container(self, name: str) -> Container:
        svc = self.services[name]
        mode = str(svc.get("network_mode", ""))
        if mode.startswith("service:"):
            return Container(name, self.containers[mode.split(":", 1)[1]].netns)
        container = Container(name, self._add_ns(f"{self.prefix}-{name}"))
        if mode == "none":
            return container
        if mode:
            raise StackError(f"{name}: network_mode {mode!r} is not run natively")
        for k, (net_name, opts) in enumerate(_service_networks(svc).items()):
            network = self.networks[net_name]
            ip = str(opts.get("ipv4_address") or network.allocate())
            self._attach(container.netns, network, f"eth{k}", ip)
            container.addresses[net_name] = ip
            if not network.internal and container.gateway_network is None:
                container.gateway_network = net_name
                run(["ip", "-n", container.netns, "route", "add", "default", "via", network.gateway])
        return container

    def volume_map(self, name: str) -> dict[str, str]:
        """Container path -> host path for one service's volumes."""
        mapping = {}
        for m in mounts(self.services[name]):
            if m.is_bind:
                host = (self.compose_dir / m.source).resolve()
                if not host.exists():
                    raise StackError(f"{name}: {m.source} does not exist (run compose-prepare)")
            else:
                host = self.run_dir / "volumes" / m.source
                host.mkdir(parents=True, exist_ok=True)
            mapping[m.target] = str(host)
        for m in mounts(self.services[name]):  # files naming container paths get host paths too
            rel = os.path.relpath((self.compose_dir / m.source).resolve(), self.compose_dir) if m.is_bind else ""
            if rel in PATH_BEARING_FILES:
                native = self.run_dir / "native" / name / rel
                native.parent.mkdir(parents=True, exist_ok=True)
                native.write_text(rewrite_paths((self.compose_dir / rel).read_text(), mapping))
                mapping[m.target] = str(native)
        return mapping

    def _env(self, name: str, mapping: dict[str, str]) -> dict[str, str]:
        env = {k: rewrite_paths(v, mapping) for k, v in environment(self.services[name]).items()}
        env["PATH"] = f"{self.bindir}:{tailscale_dir()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env["HOME"] = str(self.run_dir / "home" / name)
        Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        if self.python_path is not None:
            env["PYTHONPATH"] = str(self.python_path)
        return env

    def _start_service(self, name: str, timeout: float) -> None:
        svc = self.services[name]
        for dep, condition in depends_on(svc).items():
            self._wait_dependency(dep, condition, timeout)
        container = self._container(name)
        self.containers[name] = container
        mapping = self.volume_map(name)
        argv = [rewrite_paths(a, mapping) for a in argv_of(svc)]
        if not argv:
            raise StackError(f"{name}: nothing to run")
        argv[0] = self._program(argv[0])
        container.argv, container.env = argv, self._env(name, mapping)
        hostname = str(svc.get("hostname") or name)
        log = open(self.logdir / f"{name}.log", "ab")
        # A container's own /run and hostname, and its :ro volumes read-only (for it alone: the
        # mount namespace is its own); `exec` keeps the pid the program's.
        steps = ["mount -t tmpfs -o mode=0755 tmpfs /run", f"hostname {shlex.quote(hostname)}"]
        for m in mounts(svc):
            if m.read_only:
                path = shlex.quote(mapping[m.target])
                steps.append(f"mount --bind {path} {path} && mount -o remount,bind,ro {path}")
        setup = " && ".join([*steps, 'exec "$@"'])
        container.proc = subprocess.Popen(
            ["ip", "netns", "exec", container.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "--", "sh", "-c", setup, "sh", *argv],
            env=container.env, cwd=self.run_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        self.started.append(name)
        for spec in svc.get("ports", []):
            self._publish(name, str(spec))

    def exec_in(self, name: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`docker compose exec`: a command in a running service's namespaces, with its environment."""
        container = self.containers[name]
        assert container.proc is not None
        return run(["nsenter", "--target", str(container.proc.pid), "--mount", "--uts", "--net", "--",
                    *argv], check=False, timeout=timeout, env=container.env)

    def _wait_dependency(self, dep: str, condition: str, timeout: float) -> None:
        container = self.containers[dep]
        proc = container.proc
        assert proc is not None
        if condition == "service_started":
            return
        if condition == "service_completed_successfully":
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise StackError(f"{dep} did not finish in {timeout} s:\n{self.log(dep)}") from None
            if code != 0:
                raise StackError(f"{dep} exited {code}:\n{self.log(dep)}")
            return
        if condition != "service_healthy":
            raise StackError(f"depends_on condition {condition!r} is not run natively")
        check = healthcheck_argv(self.services[dep])
        if check is None:
            raise StackError(f"{dep} has no health check to wait for")
        mapping = self.volume_map(dep)
        argv = [rewrite_paths(a, mapping) for a in check]
        argv[0] = self._program(argv[0])

        def healthy() -> bool:
            if proc.poll() is not None:
                raise StackError(f"{dep} exited {proc.returncode}:\n{self.log(dep)}")
            return self.exec_in(dep, argv, timeout=10).returncode == 0

        try:
            wait_for(healthy, timeout, f"{dep} to be healthy ({' '.join(check)})", interval=0.5)
        except StackError as exc:
            raise StackError(f"{exc}\n{self.log(dep)}") from None

    def _publish(self, name: str, spec: str) -> None:
        """HOSTIP:HOSTPORT:CONTAINERPORT, as docker-proxy serves it on the host."""
        host_ip, host_port, container_port = spec.split(":")
        container = self.containers[name]
        if container.gateway_network is None:
            raise StackError(f"{name} publishes {spec} but is on no non-internal network: Docker "
                             "publishes nothing then (moby/moby#36174)")
        target = container.addresses[container.gateway_network]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.host_ns, self.python, "-c", TCP_PROXY,
             f"{host_ip}:{host_port}={target}:{container_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.helpers.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise StackError(f"port proxy for {spec} did not start: {line!r}{proc.stdout.read()[-2000:]!r}")

    # -- looking in
    def host(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command on the Docker host (its namespace): where published ports are."""
        return run(["ip", "netns", "exec", self.host_ns, *argv], check=False, timeout=timeout)

    def log(self, name: str, n: int = 3000) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"
        return f"--- {name} ---\n{text}"

    def logs(self) -> str:
        return "\n".join(self.log(name, 2000) for name in self.started)


def _service_networks(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nets = service.get("networks")
    if nets is None:
        return {}
    if isinstance(nets, list):
        return {str(n): {} for n in nets}
    return {str(k): (v or {}) for k, v in nets.items()}


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def prepared_compose_dir(dest: Path) -> Path:
    """A copy of compose/ as `make compose-prepare` leaves it (config, TLS, wheel), away from the checkout."""
    shutil.copytree(COMPOSE_DIR, dest, ignore=shutil.ignore_patterns("tls", "dist", "config.yaml", "__pycache__"))
    proc = subprocess.run([sys.executable, str(COMPOSE_DIR / "prepare.py"), "--out", str(dest)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise StackError(f"compose/prepare.py failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return dest
