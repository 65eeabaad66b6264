"""`python -m trionet up | status | peers | ping | set | down`.

Words follow the `tailscale` CLI. Every mistake a user can make ends in one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from trionet import __version__
from trionet import config as cfg
from trionet.errors import ConfigError, TrionetError, find_trionet_error

log = logging.getLogger("trionet")

EPILOG_UP = """\
examples:
  trionet up --login-server https://hs.example:8443 --authkey file:/run/secrets/key \\
      --forward 8080=web-server:80
  curl http://127.0.0.1:8080/

  trionet up --login-server URL --authkey KEY --socks5 1080
  curl --socks5-hostname 127.0.0.1:1080 http://web-server/

HOST may be a MagicDNS name (web-server.ts.test), a short name (web-server)
or a tailnet IP. Listeners bind 127.0.0.1 unless you give BIND:PORT.
The auth key may also come from $TRIONET_AUTHKEY; file:PATH keeps it out of
the process list. State (keys, 0600) lives in --state-dir.

Without an auth key, `up` prints a login URL and the Headscale command that
approves it, and waits (as long as it takes) until an admin has done so.
"""


LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every other mistake
        self.exit(2, f"trionet: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trionet", description="A userspace Tailscale node in pure Python.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (overrides -v; default info)")
    # Also after the command (`trionet up --log-level debug`); SUPPRESS keeps a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def state_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, default=Path(os.environ.get(
            "TRIONET_STATE_DIR", cfg.DEFAULT_STATE_DIR)), help="keys, state and the IPC socket "
            "(default: $TRIONET_STATE_DIR or ~/.local/state/trionet)")

    up = sub.add_parser("up", help="join the tailnet and stay connected", parents=[common],
                        epilog=EPILOG_UP, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--login-server", required=True, metavar="URL", help="Headscale URL")
    up.add_argument("--authkey", "--auth-key", dest="authkey", metavar="KEY",
                    help="pre-auth key, or file:PATH (default: $TRIONET_AUTHKEY; "
                    "none: log in interactively, approved on the Headscale server)")
    state_arg(up)
    up.add_argument("--hostname", help="node name in the tailnet (default: this host's name)")
    up.add_argument("--ca-file", type=Path, help="CA bundle for the login server and DERP (PEM)")
    up.add_argument("--forward", action="append", default=[], metavar="[BIND:]LOCALPORT=HOST:PORT",
                    help="local port -> tailnet host:port (repeatable)")
    up.add_argument("--serve", action="append", default=[], metavar="TAILNETPORT=LOCALHOST:PORT",
                    help="tailnet port on this node -> local host:port (repeatable)")
    up.add_argument("--socks5", metavar="[BIND:]PORT", help="run a SOCKS5 proxy into the tailnet")
    up.add_argument("--socks5-auth", metavar="USER:PASS", help="require this SOCKS5 username/password")
    up.add_argument("--http-proxy", metavar="[BIND:]PORT", help="run an HTTP CONNECT proxy into the tailnet")
    up.add_argument("--dns", metavar="[BIND:]PORT",
                    help="answer DNS as MagicDNS (100.100.100.100) does, on this UDP+TCP port")
    up.add_argument("--udp-port", type=int, default=0, help="WireGuard/disco UDP port (default: random)")
    up.add_argument("--udp-bind", default="", metavar="ADDR", help="bind UDP to this address only")
    up.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                    help="give up when not connected within this time (default: 60); "
                    "waiting for a login approval does not count")
    up.add_argument("--json", action="store_true", help="print status changes as JSON lines")
    _routing_args(up)
    up.add_argument("--advertise-tags", metavar="TAG,TAG", default="",
                    help="ACL tags to request for this node (tag:a,tag:b); the policy's tagOwners decide")

    for name, helptext in (("status", "show this node and its peers"), ("peers", "list peers")):
        p = sub.add_parser(name, help=helptext, parents=[common])
        state_arg(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    ping = sub.add_parser("ping", help="disco-ping a peer (name or IP) and report the path", parents=[common])
    state_arg(ping)
    ping.add_argument("peer")
    ping.add_argument("-c", "--count", type=int, default=3)
    ping.add_argument("--json", action="store_true")
    down = sub.add_parser("down", help="stop the running daemon", parents=[common])
    state_arg(down)
    set_ = sub.add_parser("set", help="change routing of the running daemon (exit node, routes)",
                          parents=[common])
    state_arg(set_)
    _routing_args(set_, for_set=True)
    set_.add_argument("--json", action="store_true", help="print the new routing as JSON")
    return parser


def _flag_bool(text: str) -> bool:
    """Go flag syntax, as tailscale takes it: --accept-routes, --accept-routes=false."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _routing_args(p: argparse.ArgumentParser, for_set: bool = False) -> None:
    """--exit-node, --exit-node-allow-lan-access, --accept-routes, --advertise-routes,
    --advertise-exit-node: on `up` and on `set`."""
    p.add_argument("--exit-node", metavar="NAME|IP", default=None,
                   help="send traffic outside the tailnet through this peer (a name or tailnet IP; "
                        + ('"" stops using one)' if for_set else "it must offer exit routes)"))
    p.add_argument("--exit-node-allow-lan-access", type=_flag_bool, nargs="?", const=True, default=None,
                   metavar="BOOL", help="with an exit node, dial this host's LAN directly, not through it")
    p.add_argument("--accept-routes", type=_flag_bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="use the subnet routes other nodes advertise (and Headscale approved)")
    p.add_argument("--advertise-routes", metavar="CIDR,CIDR", default=None,
                   help="offer these subnets to the tailnet as a subnet router (Headscale must approve them)"
                        + ('; "" stops offering any' if for_set else ""))
    p.add_argument("--advertise-exit-node", type=_flag_bool, nargs="?", const=True, default=None,
                   metavar="BOOL", help="offer this node as an exit node (0.0.0.0/0 and ::/0; Headscale "
                   "must approve them)")


def config_from_args(args: argparse.Namespace) -> cfg.NodeConfig:
    login = cfg.check_login_server(args.login_server)
    key = cfg.read_auth_key(args.authkey)
    socks_auth = None
    if args.socks5_auth:
        user, sep, password = args.socks5_auth.partition(":")
        if not sep or not user:
            raise ConfigError("--socks5-auth: expected USER:PASS")
        socks_auth = (user, password)
    if args.ca_file is not None and not args.ca_file.is_file():
        raise ConfigError(f"--ca-file: {args.ca_file} is not a readable file")
    if not 0 <= args.udp_port < 65536:
        raise ConfigError(f"--udp-port: {args.udp_port} is not a port number")
    if args.udp_bind and not cfg.is_ip(args.udp_bind):
        raise ConfigError(f"--udp-bind: {args.udp_bind!r} is not an IP address")
    if not 0 < args.timeout < float("inf"):
        raise ConfigError(f"--timeout: {args.timeout:g} is not a positive number of seconds")
    kwargs: dict[str, Any] = {}
    if args.hostname:
        kwargs["hostname"] = args.hostname
    return cfg.NodeConfig(
        login_server=login, state_dir=args.state_dir, auth_key=key, ca_file=args.ca_file,
        forwards=tuple(cfg.parse_forward(f) for f in args.forward),
        serves=tuple(cfg.parse_serve(s) for s in args.serve),
        socks5=cfg.parse_listen(args.socks5, "--socks5") if args.socks5 else None,
        socks5_auth=socks_auth,
        http_proxy=cfg.parse_listen(args.http_proxy, "--http-proxy") if args.http_proxy else None,
        dns=cfg.parse_listen(args.dns, "--dns") if args.dns else None,
        udp_port=args.udp_port, udp_bind=args.udp_bind, start_timeout=args.timeout,
        exit_node=(args.exit_node or "").strip(),
        exit_node_allow_lan_access=bool(args.exit_node_allow_lan_access),
        accept_routes=bool(args.accept_routes), advertise_tags=cfg.parse_tags(args.advertise_tags),
        advertise_routes=_advertise_routes(args.advertise_routes),
        advertise_exit_node=bool(args.advertise_exit_node), **kwargs)


def _advertise_routes(text: str | None) -> tuple[str, ...]:
    from trionet.advertise import parse_advertise_routes

    return tuple(str(n) for n in parse_advertise_routes(text or ""))


def _setup_logging(verbose: int, level_name: str | None = None) -> None:
    level = (getattr(logging, level_name.upper()) if level_name
             else logging.WARNING - 10 * min(verbose + 1, 2))  # default INFO, -v/-vv DEBUG
    # At debug, lines name their level: "DEBUG" tells detail from news when reading a long log.
    fmt = ("%(asctime)s %(levelname)s %(name)s: %(message)s" if level <= logging.DEBUG
           else "%(asctime)s %(name)s: %(message)s")
    logging.basicConfig(level=max(level, logging.INFO), format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    # Debug is for trionet's own loggers; libraries' debug (hpack: every header, byte by byte)
    # would drown it.
    logging.getLogger("trionet").setLevel(level)


def cmd_up(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # validate before importing the daemon: fail fast
    _check_state_file(config)

    import trio

    from trionet.daemon.run import run_daemon

    _tune_gc()
    return trio.run(run_daemon, config, args.json)


def _check_state_file(config: cfg.NodeConfig) -> None:
    """A corrupt or unreadable state file is reported here, before any network I/O, once.

    Read only (blocking, before the event loop exists): creating a missing file
    and sweeping a killed writer's temp files wait until the daemon holds the
    IPC socket, so a second `up` on a running daemon's directory touches nothing.
    """
    from trionet.keys import load_state

    load_state(config.state_dir)


def _tune_gc() -> None:
    """The daemon's data path makes and drops short-lived containers (header tuples,
    memory views) at hundreds of thousands a second, nearly all freed by reference
    counting. At the default threshold of 700 the cyclic collector ran thousands of
    times a second and took 3% of a download's CPU (perf). Everything imported by now
    lives as long as the process: frozen, no full collection walks it again."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _ipc(args: argparse.Namespace, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    from trionet.daemon import ipc

    answer = ipc.request(args.state_dir / "trionet.sock", req, timeout)
    if not answer.get("ok"):
        raise TrionetError(str(answer.get("error", "the daemon refused the request")))
    return answer


def _fmt_peer(p: dict[str, Any]) -> str:
    addrs = ",".join(a.split("/")[0] for a in p.get("addresses", [])[:1])
    path = p.get("path") or "-"
    online = "online" if p.get("online") else "offline"
    extra = ""
    if p.get("exit_node"):
        extra = "; exit node"
    elif p.get("exit_node_option"):
        extra = "; offers exit node"
    if p.get("routes"):
        extra += "; routes " + ",".join(p["routes"])
    return f"{addrs:<16} {p.get('name', '?'):<30} {online:<8} {path}{extra}"


def _fmt_dns(dns: dict[str, Any]) -> str:
    """One line: MagicDNS on/off and its domain, where other names go, our listeners."""
    magic = f"MagicDNS {'on' if dns.get('magic_dns') else 'off'}"
    if dns.get("base_domain"):
        magic += f" ({dns['base_domain']})"
    default = (dns.get("forwarding") or {}).get(".") or []
    parts = [magic, "resolvers " + (",".join(default) or "none")]
    split = dns.get("split_routes") or {}
    if split:
        parts.append("split " + ",".join(f"{k.rstrip('.')}->{'/'.join(v)}" for k, v in split.items()))
    if dns.get("extra_records"):
        parts.append(f"{dns['extra_records']} extra records")
    listeners = [w.split(" ", 1)[1] for w in dns.get("listeners", []) if w.startswith("udp+tcp ")]
    if listeners:
        parts.append("--dns " + ",".join(listeners))
    return "dns: " + "; ".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    st = _ipc(args, {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    me = st.get("self") or {}
    addrs = ",".join(a.split("/")[0] for a in me.get("addresses", []))
    print(f"{st['status']}{': ' + st['reason'] if st.get('reason') else ''}")
    if st.get("login_url"):
        from trionet.control.login import login_instructions

        print(login_instructions(st["login_url"]))
    print(f"{addrs:<16} {me.get('name', '?'):<30} home DERP {st.get('home_derp') or '-'}")
    dns = st.get("dns")
    if dns:
        print(_fmt_dns(dns))
    for line in _routing_lines(st):
        print(line)
    for p in st.get("peers", []):
        print(_fmt_peer(p))
    for line in _fmt_derp(st.get("derp") or {}):
        print(line)
    return 0


def _fmt_derp(derp: dict[str, Any]) -> list[str]:
    """The DERP regions: latency from the last netcheck, the link, which one is home."""
    regions = derp.get("regions") or []
    if not regions:
        return []
    lines = [f"DERP regions (netcheck {derp.get('last_netcheck') or 'not run yet'}):"]
    for r in regions:
        latency = r.get("latency_ms")
        measured = f"{latency:.1f} ms" if latency is not None else "no answer"
        if latency is not None and r.get("measured_by") == "https":
            measured += " (https)"
        home = "  home" if r.get("home") else ""
        lines.append(f"  {r.get('id'):>5} {r.get('code') or '-':<8} {measured:<18} link {r.get('link')}{home}")
    return lines


def _routing_lines(st: dict[str, Any]) -> list[str]:
    """The exit node in use and the accepted routes, as `status` shows them."""
    lines = []
    exit_node = st.get("exit_node")
    if exit_node:
        name = exit_node.get("name") or exit_node.get("selected")
        addrs = ",".join(exit_node.get("addresses", [])[:1])
        state = "in use" if exit_node.get("usable") else f"NOT USABLE: {exit_node.get('problem')}"
        extras = [f"DNS {exit_node['dns']}" if exit_node.get("dns") else "no DNS"]
        if exit_node.get("allow_lan_access"):
            extras.append("LAN access allowed")
        lines.append(f"exit node: {name} ({addrs}) {state}; {', '.join(extras)}")
    routes = st.get("routes") or []
    if routes:
        lines.append("accepted routes: " + ", ".join(f"{r['prefix']} via {r['peer']}" for r in routes))
    elif st.get("accept_routes"):
        lines.append("accepted routes: none offered")
    lines.extend(_advertise_lines(st.get("advertise") or {}, st.get("forwarding") or {}))
    return lines


def _advertise_lines(adv: dict[str, Any], forwarding: dict[str, Any]) -> list[str]:
    """What we offer as a subnet router / exit node and whether Headscale approved it;
    the forwarder's summary (its scalar counters) when it reports one."""
    parts = []
    approved = set(adv.get("approved_routes") or [])
    if adv.get("routes"):
        parts.append("routes " + ", ".join(
            f"{r} ({'approved' if r in approved else 'NOT APPROVED'})" for r in adv["routes"]))
    if adv.get("exit_node"):
        parts.append(f"exit node ({'approved' if adv.get('exit_node_approved') else 'NOT APPROVED'})")
    lines = ["advertising: " + "; ".join(parts)] if parts else []
    if parts and adv.get("pending"):
        lines.append("  (approve on Headscale: `headscale nodes approve-routes` on 0.26+, "
                     "`headscale routes enable` on 0.23-0.25)")
    summary = [f"{k} {v}" for k, v in sorted(forwarding.items()) if isinstance(v, (int, float, str))]
    if summary:
        lines.append("forwarding: " + ", ".join(summary))
    return lines


def cmd_peers(args: argparse.Namespace) -> int:
    st = _ipc(args, {"cmd": "peers"})
    if args.json:
        print(json.dumps(st["peers"], indent=2, sort_keys=True))
    else:
        for p in st["peers"]:
            print(_fmt_peer(p))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    st = _ipc(args, {"cmd": "ping", "peer": args.peer, "count": args.count}, timeout=10 + 6 * args.count)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        for r in st["results"]:
            if r.get("latency_ms") is None:
                print(f"timeout waiting for pong from {args.peer}")
            else:
                print(f"pong from {st['peer']} ({st['ip']}) via {r['path']} in {r['latency_ms']:.1f}ms")
    return 0 if any(r.get("latency_ms") is not None for r in st["results"]) else 1


def cmd_set(args: argparse.Namespace) -> int:
    """`tailscale set` for routing: only the flags given change."""
    req: dict[str, Any] = {"cmd": "set"}
    if args.exit_node is not None:
        req["exit_node"] = args.exit_node.strip()
    if args.exit_node_allow_lan_access is not None:
        req["exit_node_allow_lan_access"] = args.exit_node_allow_lan_access
    if args.accept_routes is not None:
        req["accept_routes"] = args.accept_routes
    if args.advertise_routes is not None:
        req["advertise_routes"] = list(_advertise_routes(args.advertise_routes))
    if args.advertise_exit_node is not None:
        req["advertise_exit_node"] = args.advertise_exit_node
    if len(req) == 1:
        raise ConfigError("set: nothing to change (--exit-node, --exit-node-allow-lan-access, --accept-routes, "
                          "--advertise-routes, --advertise-exit-node)")
    st = _ipc(args, req)
    if args.json:
        print(json.dumps({k: v for k, v in st.items() if k != "ok"}, indent=2, sort_keys=True))
    else:
        for line in _routing_lines(st) or ["no exit node, no accepted routes"]:
            print(line)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """The daemon answers once its node has stopped; then it exits and removes its socket."""
    answer = _ipc(args, {"cmd": "down"})
    if not answer.get("stopped"):
        raise TrionetError("the daemon is exiting, but its node did not stop cleanly in time")
    sock = args.state_dir / "trionet.sock"
    deadline = time.monotonic() + 5
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("trionet stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.log_level)
    handlers = {"up": cmd_up, "status": cmd_status, "peers": cmd_peers, "ping": cmd_ping, "down": cmd_down,
                "set": cmd_set}
    try:
        return handlers[args.command](args)
    except (TrionetError, BaseExceptionGroup) as exc:
        err = find_trionet_error(exc)
        if err is None:
            raise
        print(f"trionet: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return 1
