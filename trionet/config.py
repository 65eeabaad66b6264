"""The node's configuration: validated once, with one clear line per mistake."""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
from pathlib import Path

import attrs

from trionet.errors import ConfigError
from trionet.netaddr import parse_port, split_host_port

DEFAULT_STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "trionet"


@attrs.frozen
class Forward:
    """--forward LOCALPORT=HOST:PORT, optionally [BIND:]LOCALPORT."""

    bind: str
    local_port: int
    host: str
    port: int


@attrs.frozen
class Serve:
    """--serve TAILNETPORT=LOCALHOST:PORT."""

    tailnet_port: int
    local_host: str
    local_port: int


@attrs.frozen
class Listen:
    bind: str
    port: int


REDACTED = "<redacted>"


def _redact_auth_key(value: str | None) -> str:
    return repr(REDACTED if value else value)


def _redact_password(value: tuple[str, str] | None) -> str:
    return repr((value[0], REDACTED) if value else value)  # the user name is not a secret


@attrs.frozen
class NodeConfig:
    """Everything `trionet up` was told. Its repr hides the auth key and the SOCKS5
    password, so a config in a log line or a traceback gives neither away."""

    login_server: str
    state_dir: Path
    auth_key: str | None = attrs.field(default=None, repr=_redact_auth_key)
    hostname: str = attrs.field(factory=lambda: socket.gethostname().split(".")[0] or "trionet")
    ca_file: Path | None = None
    ephemeral: bool = False
    forwards: tuple[Forward, ...] = ()
    serves: tuple[Serve, ...] = ()
    socks5: Listen | None = None
    socks5_auth: tuple[str, str] | None = attrs.field(default=None, repr=_redact_password)
    http_proxy: Listen | None = None
    dns: Listen | None = None  # --dns: MagicDNS on a host port, UDP and TCP
    udp_port: int = 0
    udp_bind: str = ""  # "" = all addresses (v4 and v6)
    advertise_endpoints: tuple[str, ...] = ()  # extra "ip:port" to advertise
    start_timeout: float = 60.0  # `up` gives up when not Running by then (tailscale up --timeout)
    exit_node: str = ""  # --exit-node: a peer's tailnet IP, name or StableID; "" = none
    exit_node_allow_lan_access: bool = False  # --exit-node-allow-lan-access
    accept_routes: bool = False  # --accept-routes: use peers' approved subnet routes
    advertise_tags: tuple[str, ...] = ()  # --advertise-tags: Hostinfo.RequestTags
    advertise_routes: tuple[str, ...] = ()  # --advertise-routes: subnets offered (normalized CIDRs)
    advertise_exit_node: bool = False  # --advertise-exit-node: offer 0.0.0.0/0 and ::/0
    # The DNS servers ("ip" or "ip:port") the peer API's DoH asks for our exit node's
    # clients; None = the first nameserver of /etc/resolv.conf, as tailscaled on Linux
    host_resolvers: tuple[str, ...] | None = None
    # The host's LAN prefixes for --exit-node-allow-lan-access; None = read the host's interfaces
    lan_prefixes: tuple[str, ...] | None = None

    @property
    def ipc_socket(self) -> Path:
        return self.state_dir / "trionet.sock"


def _port(text: str, what: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _host_port(text: str, what: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def parse_listen(text: str, what: str, default_bind: str = "127.0.0.1") -> Listen:
    if ":" not in text:
        return Listen(default_bind, _port(text, what))
    host, port = _host_port(text, what)
    return Listen(host, port)


def parse_forward(text: str) -> Forward:
    left, sep, right = text.partition("=")
    if not sep:
        raise ConfigError(f"--forward: expected LOCALPORT=HOST:PORT, got {text!r}")
    listen = parse_listen(left, "--forward")
    host, port = _host_port(right, "--forward")
    return Forward(listen.bind, listen.port, host, port)


def parse_serve(text: str) -> Serve:
    left, sep, right = text.partition("=")
    if not sep:
        raise ConfigError(f"--serve: expected TAILNETPORT=LOCALHOST:PORT, got {text!r}")
    host, port = _host_port(right, "--serve")
    return Serve(_port(left, "--serve"), host, port)


def check_login_server(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--login-server: {url!r} is not an http:// or https:// URL")
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"--login-server: bad port in {url!r}") from exc
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ConfigError(f"--login-server: {url!r} must be a bare server URL (no path or query)")
    return f"{parsed.scheme}://{parsed.netloc}"


def read_auth_key(value: str | None) -> str | None:
    """An auth key, or file:PATH to keep it out of argv (as tailscale does)."""
    if value is None:
        return os.environ.get("TRIONET_AUTHKEY") or None
    if value.startswith("file:"):
        path = Path(value[5:])
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--authkey: cannot read {path}: {exc.strerror}") from exc
        if not key:
            raise ConfigError(f"--authkey: {path} is empty")
        return key
    if not value.strip():
        raise ConfigError("--authkey is empty")
    return value.strip()


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_tags(text: str) -> tuple[str, ...]:
    """--advertise-tags tag:a,tag:b, checked as tailscaled's CheckTag does (tailcfg.go):
    "tag:" then a letter, then letters, digits and dashes."""
    tags: list[str] = []
    for raw in text.split(","):
        tag = raw.strip()
        if not tag:
            continue
        name = tag[4:] if tag.startswith("tag:") else ""
        if not name or not name[0].isascii() or not name[0].isalpha() or not all(
                c.isascii() and (c.isalnum() or c == "-") for c in name):
            raise ConfigError(f"--advertise-tags: {tag!r} is not a tag (tag:NAME, NAME of letters, "
                              "digits and dashes, starting with a letter)")
        if tag not in tags:
            tags.append(tag)
    return tuple(tags)
