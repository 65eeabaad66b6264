"""`trionet up`: the daemon around a Node.

run_daemon (root nursery)          <- SIGINT/SIGTERM cancel here
|-- ipc server                     (status, peers, ping, set, down)
|-- status printer                 (one line per change; a progress line while connecting;
|                                   the login URL and its approval command, once per URL)
`-- node scope                     <- `trionet down` cancels here, waits, answers, then the root
    |-- Node.run                   (control, map stream, wg, magicsock, netstack)
    `-- proxies                    (--forward, --socks5, --http-proxy, --serve)

A start that fails (bad key, unreachable server, --timeout passed) is told
once, by the CLI's last line: the status printer keeps Error, ShuttingDown
and Stopped of a node that never ran at debug level.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

import trio

from trionet.config import NodeConfig
from trionet.control.login import login_instructions
from trionet.daemon import ipc
from trionet.errors import ConfigError, TrionetError, find_trionet_error
from trionet.node import Node
from trionet.proxy import server as proxy
from trionet.status import Status, StatusChange

log = logging.getLogger("trionet")

DOWN_TIMEOUT = 10.0  # `down` answers by then whether or not the node has finished stopping


class _Daemon:
    """What the IPC handler needs to reach: the node, and the scopes `down` cancels."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.node_scope = trio.CancelScope()
        self.node_stopped = trio.Event()
        self.root: trio.CancelScope | None = None

    async def handle(self, request: dict[str, Any]) -> dict[str, Any] | ipc.AfterReply:
        node = self.node
        cmd = request["cmd"]
        if cmd == "status":
            return node.status()
        if cmd == "peers":
            return {"peers": node.peers()}
        if cmd == "ping":
            peer = request.get("peer")
            count = request.get("count", 1)
            if not isinstance(peer, str) or not isinstance(count, int) or not 0 < count <= 100:
                raise ConfigError('ping needs {"peer": NAME, "count": 1..100}')
            results = await node.ping(peer, count)
            return {"peer": peer, "ip": await node.resolve(peer), "results": results}
        if cmd == "set":
            return self.set(request)
        if cmd in ("down", "disconnect"):  # "disconnect": the name older CLIs send
            return await self.down()
        raise ConfigError(f"unknown command {cmd!r} (status, peers, ping, set, down)")

    def set(self, request: dict[str, Any]) -> dict[str, Any]:
        """`trionet set`: {"exit_node": NAME|IP|"", "accept_routes": bool, "exit_node_allow_lan_access": bool,
        "advertise_routes": [CIDR, ...], "advertise_exit_node": bool}, each optional; refused whole
        (nothing changes) when one is wrong."""
        exit_node = request.get("exit_node")
        flags = {k: request.get(k) for k in ("accept_routes", "exit_node_allow_lan_access", "advertise_exit_node")}
        if exit_node is not None and not isinstance(exit_node, str):
            raise ConfigError('set: "exit_node" must be a string ("" clears it)')
        if any(v is not None and not isinstance(v, bool) for v in flags.values()):
            raise ConfigError('set: "accept_routes", "exit_node_allow_lan_access" and "advertise_exit_node" '
                              "must be true or false")
        routes = request.get("advertise_routes")
        if routes is not None and (not isinstance(routes, list) or not all(isinstance(r, str) for r in routes)):
            raise ConfigError('set: "advertise_routes" must be a list of CIDR prefixes')
        return self.node.set(exit_node=exit_node, advertise_routes=routes, **flags)

    async def down(self) -> ipc.AfterReply:
        """Stop the node, say so, then end the daemon (after the answer is out)."""
        log.info("stopping: asked by `trionet down`")
        self.node_scope.cancel()
        with trio.move_on_after(DOWN_TIMEOUT):
            await self.node_stopped.wait()
        assert self.root is not None
        return ipc.AfterReply({"stopped": self.node_stopped.is_set()}, self.root.cancel)


async def _signals(stop: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.cancel()
            return


class _StatusPrinter:
    """One line per status change; --json: one JSON object per change on stdout.

    A login URL (NeedsLogin) is also told on stderr in words, with the Headscale
    command that approves it, once per URL and login: a reconnect while waiting
    shows the same URL again in the status, not in a second set of instructions;
    a later login (an expired key) is told again, even with the same URL
    (Headscale 0.23's URL is the machine key's, the same every time)."""

    QUIET_BEFORE_RUNNING = (Status.ERROR, Status.SHUTTING_DOWN, Status.STOPPED)

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.ran = False
        self.told_login_url = ""

    def __call__(self, change: StatusChange) -> None:
        self.ran = self.ran or change.new is Status.RUNNING
        if change.new is Status.RUNNING:
            self.told_login_url = ""
        if change.login_url and change.login_url != self.told_login_url:
            self.told_login_url = change.login_url
            clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # the progress line, if any
            sys.stderr.write(f"{clear}\n{login_instructions(change.login_url)}\n")
            sys.stderr.flush()
        if self.as_json:
            doc: dict[str, Any] = {"status": change.new.value, "reason": change.reason, "at": change.at}
            if change.login_url:
                doc["login_url"] = change.login_url
            print(json.dumps(doc), flush=True)
            return
        tail = f": {change.reason}" if change.reason else ""
        # A start that fails is told once, by the CLI's last line; not here as well.
        level = logging.DEBUG if not self.ran and change.new in self.QUIET_BEFORE_RUNNING else logging.INFO
        log.log(level, "%s%s", change.new.value, tail)


async def _progress(node: Node) -> None:
    """A live line on a terminal while we are not yet Running."""
    if not sys.stderr.isatty():
        return
    frames = "|/-\\"
    start = time.monotonic()
    i = 0
    while node.status_machine.status not in (Status.RUNNING, Status.STOPPED, Status.ERROR):
        sys.stderr.write(f"\r{frames[i % 4]} {node.status_machine.status.value}... "
                         f"{time.monotonic() - start:4.1f}s ")
        sys.stderr.flush()
        i += 1
        await trio.sleep(0.1)
    sys.stderr.write("\r\x1b[K")


async def start_proxies(node: Node, config: NodeConfig, nursery: trio.Nursery) -> None:
    """Every configured listener, bound before we report Running (port errors surface now)."""
    proxies: list[proxy.Proxy] = []
    for fwd in config.forwards:
        proxies.append(proxy.ForwardProxy(fwd.local_port, fwd.host, fwd.port, node, fwd.bind))
    if config.socks5:
        proxies.append(proxy.Socks5Proxy(config.socks5.port, node, config.socks5.bind, config.socks5_auth))
    if config.http_proxy:
        proxies.append(proxy.HttpProxy(config.http_proxy.port, node, config.http_proxy.bind))
    for srv in config.serves:
        listener = await node.listen_tcp(srv.tailnet_port)
        proxies.append(proxy.InboundServer(listener, srv.local_host, srv.local_port))
    for server in proxies:
        await nursery.start(server.serve)
        node.attach_statistics(server)  # `status --json` shows its counters (it logs where it listens)
    if config.dns:  # its counters and address are in `status --json` under "dns"
        await node.serve_dns(config.dns.bind, config.dns.port)


async def run_daemon(config: NodeConfig, as_json: bool = False) -> int:
    node = Node(config=config)
    node.status_machine.listeners.append(_StatusPrinter(as_json))
    daemon = _Daemon(node)
    try:
        async with trio.open_nursery() as root:
            daemon.root = root.cancel_scope
            root.start_soon(_signals, root.cancel_scope)
            ipc_server = ipc.IpcServer(config.ipc_socket, daemon.handle)
            await root.start(ipc_server.serve)
            node.attach_statistics(ipc_server)
            root.start_soon(_progress, node)
            try:
                with daemon.node_scope:
                    async with trio.open_nursery() as node_nursery:
                        await node_nursery.start(node.run)
                        await start_proxies(node, config, node_nursery)
                        await trio.sleep_forever()
            finally:
                daemon.node_stopped.set()
            await trio.sleep_forever()  # `down` stopped the node; it ends the root once it has answered
    except (TrionetError, BaseExceptionGroup) as exc:
        err = find_trionet_error(exc)
        if err is not None:
            _safe_move(node, Status.ERROR, str(err))
        raise
    return 0


def _safe_move(node: Node, status: Status, reason: str) -> None:
    try:
        node.status_machine.move(status, reason)
    except TrionetError:
        pass
