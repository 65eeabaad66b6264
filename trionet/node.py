"""`trionet.Node`: a tailnet node inside a Trio program.

    async with trionet.Node(login_server=URL, auth_key=KEY, state_dir=DIR) as node:
        stream = await node.open_tcp_stream("peer-name", 80)

Without an auth key the login server may ask for an interactive login: the
status turns NeedsLogin with the URL (`status()["login_url"]`, the status
listeners' `StatusChange.login_url`, `await node.wait_login_url()`), and the
start waits for the admin however long it takes: the start timeout counts
only outside NeedsLogin, afresh once the login is approved.

The node is a nursery tree (architecture.md): control + map stream, the
WireGuard timer, magicsock (UDP reader, DERP connections, disco), the
netstack timer and whatever listeners the caller starts. Leaving the
`async with` cancels the tree; everything closes with it.

The hot path runs in the task that read the datagram: magicsock's reader calls
`_on_wireguard`, which decrypts, filters and hands IP packets to the netstack,
which wakes the stream's reader. The netstack's output callback encrypts and
sends in the caller's task. No queue or task hop in between.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from trionet import keys as keymod
from trionet import peerapi
from trionet.advertise import (
    Advertised,
    HostInterfaces,
    advertise_status,
    approved_routes,
    host_interfaces_from_proc,
    local_nets,
    parse_advertise_routes,
)
from trionet.clock import now as clock_now
from trionet.clock import wall
from trionet.config import NodeConfig, check_login_server, is_ip
from trionet.control.netmap import Netmap, legacy_derp_region
from trionet.control.session import ControlSession
from trionet.dns.driver import MagicDns, default_via_tailnet, parse_upstream
from trionet.dns.view import QUAD100_V4, QUAD100_V6
from trionet.errors import ConfigError, StartTimeout, TransportError, TrionetError, find_trionet_error
from trionet.exc_groups import contains
from trionet.exitdns import doh_query
from trionet.filter import PacketFilter
from trionet.magicsock.conn import MagicConn, PathTag
from trionet.netaddr import split_host_port
from trionet.netstack import NetStack
from trionet.peerapi_server import PeerApiServer
from trionet.rejects import RejectLog
from trionet.router import Router
from trionet.routes import (
    EXIT_ROUTES,
    ExitNodeChoiceError,
    IPNet,
    NoRouteError,
    PeerRoutes,
    Route,
    RouteKind,
    RoutePrefs,
    RouteTable,
    choose_exit_node,
    lan_prefixes_from_proc,
)
from trionet.status import Status, StatusChange, StatusMachine
from trionet.wg import WgDevice

if TYPE_CHECKING:
    from trionet.forwarding import LocalForward

log = logging.getLogger(__name__)

# Outbound packets are encrypted and written in bursts of this many: one GSO write
# of full-size datagrams (48 x 1312 bytes fits magicsock's 65,000-byte limit).
OUTBOUND_BURST = 48
_PEER_AND_PATH = itemgetter(0, 2)  # a wg Transmit's peer and path

MAGIC_DNS_IP = "100.100.100.100"
RESOLV_CONF = "/etc/resolv.conf"  # the host's resolver, for our exit node's clients (as tailscaled on Linux)


class StatisticsSource(Protocol):
    """Something built on the node (a proxy, say) whose counters `statistics()` shows."""

    name: str

    def statistics(self) -> dict[str, Any]: ...


def _ip_net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


class Node:
    def __init__(
        self,
        login_server: str | None = None,
        auth_key: str | None = None,
        state_dir: str | Path | None = None,
        hostname: str | None = None,
        ca_file: str | Path | None = None,
        *,
        config: NodeConfig | None = None,
        udp_port: int = 0,
        udp_bind: str = "",
        exit_node: str | None = None,
        exit_node_allow_lan_access: bool | None = None,
        accept_routes: bool | None = None,
        advertise_routes: Sequence[str] | str | None = None,
        advertise_exit_node: bool | None = None,
        host_resolvers: Sequence[str] | None = None,
    ) -> None:
        if config is None:
            if login_server is None or state_dir is None:
                raise ConfigError("Node needs login_server and state_dir (or a NodeConfig)")
            kwargs: dict[str, Any] = {}
            if hostname:
                kwargs["hostname"] = hostname
            config = NodeConfig(login_server=check_login_server(login_server), state_dir=Path(state_dir),
                                auth_key=auth_key, ca_file=Path(ca_file) if ca_file else None,
                                udp_port=udp_port, udp_bind=udp_bind, **kwargs)
        routing: dict[str, Any] = {k: v for k, v in (("exit_node", exit_node), ("accept_routes", accept_routes),
                                     ("exit_node_allow_lan_access", exit_node_allow_lan_access)) if v is not None}
        if advertise_routes is not None:
            routing["advertise_routes"] = _advertise_texts(advertise_routes)
        if advertise_exit_node is not None:
            routing["advertise_exit_node"] = bool(advertise_exit_node)
        if host_resolvers is not None:
            routing["host_resolvers"] = tuple(host_resolvers)
        if routing:  # keyword arguments win over the config's
            config = attrs.evolve(config, **routing)
        self.config = config
        #: What we offer the tailnet (--advertise-routes, --advertise-exit-node); what Headscale
        #: approved is in the netmap (`approved_routes`)
        self.advertised = Advertised.from_prefixes(
            parse_advertise_routes(",".join(config.advertise_routes)), config.advertise_exit_node)
        self._host_interfaces: HostInterfaces | None = None  # read when an exit node needs them
        #: The forwarder's live flows for `routing_status()["forwarding"]`; set by whoever forwards
        self.forwarding_status: Callable[[], dict[str, Any]] = dict
        # Routing (trionet.routes): the user's choices, each peer's prefixes, the table built from both.
        self.route_prefs = RoutePrefs(exit_node=(config.exit_node or "").strip(),
                                      exit_node_allow_lan_access=config.exit_node_allow_lan_access,
                                      accept_routes=config.accept_routes)
        self.routes = RouteTable((), self.route_prefs)
        self._exit_node_id: int | None = None  # the exit node, pinned by node ID once found
        self._peer_routes: dict[int, tuple[Any, PeerRoutes]] = {}  # by ID: (the netmap peer it was read from, it)
        self._lan_prefixes: list[Any] | None = None
        self._exit_node_warned: str | None = None
        self._exit_doh_url: str | None = None  # the exit node DNS MagicDNS forwards to, if any
        self.status_machine = StatusMachine(clock=wall)
        self.stats: Counter[str] = Counter()
        self.rejects = RejectLog(log, "node", self.stats)
        self.netmap: Netmap | None = None
        self.filter = PacketFilter()
        #: MagicDNS: quad-100 in the netstack, `serve_dns`, and every name `resolve` looks up
        self.dns = MagicDns(via_tailnet=self._dns_via_tailnet)
        #: The peer API on our tailnet addresses: DNS for the clients of our exit node
        self.peerapi = PeerApiServer(self._peerapi_access, self._ask_host_resolver)
        self.wg: WgDevice | None = None
        self.stack: NetStack | None = None
        #: forwards peers' traffic for the routes we advertise and Headscale approved
        self.router: Router | None = None
        self.magic: MagicConn | None = None
        self.control: ControlSession | None = None
        self.keys: keymod.State | None = None
        self._nursery: trio.Nursery | None = None
        self._running = trio.Event()
        self._peer_ids_by_key: dict[bytes, int] = {}
        self._key_by_peer_id: dict[int, bytes] = {}
        self._stack_ready = trio.Event()
        self._cm: Any = None
        self._inbound: list[bytes] = []  # decrypted packets of the current UDP read batch, not yet filtered
        self._outbound: list[bytes] = []  # the current netstack step's packets, sent at its end
        self._attached: list[StatisticsSource] = []
        self._wg_sleep: trio.CancelScope | None = None  # the WireGuard timer task's sleep, to its deadline
        self._start_scope: trio.CancelScope | None = None  # the start timeout, until Running
        self._status_changed = trio.Event()  # set (and replaced) on every status change
        self.status_machine.listeners.append(self._on_status_change)

    # --------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Node:
        self._cm = self._open()
        try:
            await self._cm.__aenter__()
        except BaseExceptionGroup as group:  # the nursery's wrapping: callers get our one error
            err = find_trionet_error(group)
            if err is None:
                raise
            raise err from None
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        cm, self._cm = self._cm, None
        return bool(await cm.__aexit__(*exc))

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The node's nursery tree; `task_status.started()` once the node is Running."""
        # Read (or on a first start, create with its fsyncs) off the loop, and before
        # anything says it is contacting the server: a bad state file is told first.
        state = await trio.to_thread.run_sync(keymod.load_or_create_state, self.config.state_dir)
        self.keys = state
        self.status_machine.move(Status.CONNECTING, f"contacting {self.config.login_server}")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.magic = MagicConn(
                    state.node_private, state.node_public, state.disco_private, state.disco_public,
                    self._on_wireguard, login_server=self.config.login_server,
                    ca_file=str(self.config.ca_file) if self.config.ca_file else None,
                    udp_port=self.config.udp_port, udp_bind=self.config.udp_bind,
                    on_endpoints_changed=self._endpoints_changed, on_batch_end=self._flush_inbound,
                    on_peer_heard=self._on_peer_heard)
                try:
                    self.magic.bind()
                except OSError as exc:  # UDP is optional: DERP carries everything alone
                    log.warning("UDP socket unavailable (%s); using DERP only", exc)
                self.wg = WgDevice(state.node_private)
                self.control = ControlSession(self.config, state, self.magic, self._on_netmap,
                                              self.status_machine, on_node_key_changed=self._on_node_key_changed,
                                              hostinfo_extra=self._hostinfo_extra)
                await nursery.start(self.magic.run)
                nursery.start_soon(self.control.run)
                nursery.start_soon(self._wg_timer)
                with trio.CancelScope(deadline=trio.current_time() + self.config.start_timeout) as start:
                    self._start_scope = start
                    try:
                        await self._wait_running(self.control)
                    finally:
                        self._start_scope = None
                if start.cancelled_caught:
                    raise trio.TooSlowError
                task_status.started()
                await trio.sleep_forever()
        except BaseException as exc:
            if find_trionet_error(exc) is None and contains(exc, trio.TooSlowError):
                raise StartTimeout(self._start_timeout_message()) from None
            raise
        finally:
            if self.status_machine.status not in (Status.STOPPED, Status.SHUTTING_DOWN):
                self.status_machine.move(Status.SHUTTING_DOWN, "stopping")
            self.status_machine.move(Status.STOPPED, "")

    def _start_timeout_message(self) -> str:
        """Where the start got stuck: the last status before the node began to shut down."""
        status = self.status_machine
        stuck = next((c for c in reversed(status.history)
                      if c.new not in (Status.SHUTTING_DOWN, Status.STOPPED, Status.ERROR)), None)
        where = f"{stuck.new.value}: {stuck.reason}" if stuck and stuck.reason else (
            stuck.new.value if stuck else status.status.value)
        return (f"not connected after {self.config.start_timeout:g} s (still {where}); "
                f"is {self.config.login_server} answering? (--timeout to wait longer)")

    def _on_status_change(self, change: StatusChange) -> None:
        """Wake `wait_login_url`; and while an admin has yet to approve our login,
        the start timeout is off (tailscale up waits for a login as long as it takes)."""
        self._status_changed.set()
        self._status_changed = trio.Event()
        start = self._start_scope
        if start is None:
            return
        if self.control is not None and self.control.login_url is not None:
            start.deadline = math.inf
        elif start.deadline == math.inf:  # approved: the rest of the start gets the whole timeout
            start.deadline = trio.current_time() + self.config.start_timeout

    async def wait_login_url(self, after: str | None = None) -> str:
        """The URL at which to log this node in, once the login server asks for one
        (at once if it already has). `after`: wait for a URL other than this one;
        Headscale 0.29 replaces a URL whose registration expired or was rejected.
        TransportError if the node stops or fails first."""
        while True:
            url = self.status_machine.login_url
            if url and url != after:
                return url
            if self.status_machine.status in (Status.STOPPED, Status.ERROR):
                raise TransportError(f"the node is {self.status_machine.status.value}: no login to wait for")
            await self._status_changed.wait()

    async def _wait_running(self, control: ControlSession) -> None:
        """Until the first netmap, or the control session gives up (its error, raised)."""
        async with trio.open_nursery() as waiters:
            async def first(event: trio.Event) -> None:
                await event.wait()
                waiters.cancel_scope.cancel()

            waiters.start_soon(first, self._running)
            waiters.start_soon(first, control.failed)
        if not self._running.is_set() and control.fatal is not None:
            raise control.fatal

    # ---------------------------------------------------------------- netmap
    def _on_netmap(self, netmap: Any, change: Any) -> None:
        """Every netmap change reaches WireGuard, paths, the filter and the stack."""
        self.netmap = netmap
        assert self.magic is not None
        self.dns.update(netmap.self_node, netmap.peers.values(), netmap.dns)
        if getattr(change, "derp_map_changed", True) and netmap.derp_map is not None:
            self.magic.set_derp_map(netmap.derp_map)
        me = netmap.self_node
        if me is not None and self.stack is None:
            self._start_stack(me)
        elif me is not None and self.stack is not None:
            self._update_local_nets()
        if me is not None:
            self._update_forwarding()
        if getattr(change, "filter_changed", True):
            self.filter.update(rules=netmap.packet_filter or [])
        unreadable, routes_changed = self._read_peer_routes(netmap)
        if routes_changed or getattr(change, "self_changed", True):
            self._rebuild_routes()  # (an endpoint or DERP change moves no route: most map messages)
        seen: set[bytes] = set()
        for peer in netmap.peers.values():
            if peer.ID in unreadable:
                continue
            try:
                self._apply_peer(peer, netmap, seen)
            except (ValueError, TypeError) as exc:  # one malformed peer must not cost us the rest
                self.stats["netmap.bad_peer"] += 1
                log.debug("netmap: skipping peer %s: %s", getattr(peer, "ID", "?"), exc)
        for key in list(self._peer_ids_by_key):
            if key not in seen:
                if self.wg is not None:
                    self.wg.remove_peer(key)
                self.magic.remove_peer(key)
                peer_id = self._peer_ids_by_key.pop(key)
                if self._key_by_peer_id.get(peer_id) == key:
                    del self._key_by_peer_id[peer_id]
        self._wg_timers_moved()  # new peers may have timers (a persistent keepalive)
        if me is not None and not self._running.is_set():
            # An unusable --exit-node ends the start here, before anything says Running: the
            # control session gives up on a ConfigError and the start raises it.
            self._check_exit_node_at_start()
            self._running.set()

    def _apply_peer(self, peer: Any, netmap: Any, seen: set[bytes]) -> None:
        """One peer into WireGuard and magicsock; everything parsed before anything changes."""
        assert self.magic is not None
        key = keymod.parse_public(peer.Key, "nodekey:")
        nets = self.routes.allowed.get(peer.ID, [])  # what this peer carries under our routing prefs
        disco = keymod.parse_public(peer.DiscoKey, "discokey:") if peer.DiscoKey else None
        endpoints = [e for e in map(_split_endpoint, peer.Endpoints or ()) if e]
        if key == self.magic.node_public:
            raise ValueError("a peer with our own node key")
        seen.add(key)
        old_key = self._key_by_peer_id.get(peer.ID)
        if old_key is not None and old_key != key:  # re-keyed peer: forget the old key
            if self.wg is not None:
                self.wg.remove_peer(old_key)
            self.magic.remove_peer(old_key)
        self._key_by_peer_id[peer.ID] = key
        self._peer_ids_by_key[key] = peer.ID
        if self.wg is not None:
            self.wg.set_peer(key, nets)
        known = self.magic.paths.peers.get(key)
        if (self.wg is not None and known is not None and known.disco_key and disco
                and known.disco_key != disco):
            # A new disco key means the peer restarted and lost its WireGuard
            # sessions; waiting for our no-reply timer would stall for 15 s.
            self.wg.reset_sessions(key)
        self.magic.upsert_peer(key, disco, netmap.home_derp_of(peer), endpoints)

    # --------------------------------------------------------------- routing
    def _read_peer_routes(self, netmap: Any) -> tuple[set[int], bool]:
        """Each peer's prefixes, read again only when the peer changed. Returns the IDs of
        peers whose AllowedIPs cannot be read (counted and skipped, like any malformed
        peer) and whether anything routing depends on changed."""
        cache = self._peer_routes
        fresh: dict[int, tuple[Any, PeerRoutes]] = {}
        unreadable: set[int] = set()
        changed = len(cache) != len(netmap.peers)
        for peer in netmap.peers.values():
            known = cache.get(peer.ID)
            if known is not None and known[0] is peer:
                fresh[peer.ID] = known
                continue
            try:
                routes = PeerRoutes.from_node(peer, home_derp=netmap.home_derp_of(peer))
            except (ValueError, TypeError) as exc:
                self.stats["netmap.bad_peer"] += 1
                log.debug("netmap: skipping peer %s: %s", getattr(peer, "ID", "?"), exc)
                unreadable.add(peer.ID)
                changed = True
                continue
            if known is not None and known[1] == routes:
                routes = known[1]  # the same routing (a new endpoint, say)
            else:
                changed = True
            fresh[peer.ID] = (peer, routes)
        self._peer_routes = fresh
        return unreadable, changed

    def _own_nets(self) -> list[Any]:
        me = self.netmap.self_node if self.netmap is not None else None
        return [_ip_net(a) for a in me.Addresses or ()] if me is not None else []

    def _lan(self) -> list[Any]:
        """The host's LAN prefixes (--exit-node-allow-lan-access): the config's, else the
        host's interfaces (Linux /proc), read once and again at each `set`."""
        if self._lan_prefixes is None:
            if self.config.lan_prefixes is not None:
                self._lan_prefixes = [_ip_net(p) for p in self.config.lan_prefixes]
            else:
                self._lan_prefixes = _read_host_lan()
        return self._lan_prefixes

    def _rebuild_routes(self) -> None:
        """The route table from the current peers and prefs; WireGuard follows in the caller."""
        peers = [pr for _, pr in self._peer_routes.values()]
        prefs = self.route_prefs
        own = self._own_nets()
        if prefs.exit_node and self._exit_node_id is None:
            try:  # pinned by ID once found, as tailscaled turns ExitNodeIP into ExitNodeID
                self._exit_node_id = choose_exit_node(prefs.exit_node, peers, own).id
            except ExitNodeChoiceError:
                pass  # not (yet) usable: the start check or `status` says why
        lan = self._lan() if prefs.exit_node and prefs.exit_node_allow_lan_access else []
        self.routes = RouteTable(peers, prefs, exit_node_id=self._exit_node_id if prefs.exit_node else None,
                                 lan_prefixes=lan, own=own)
        problem = self.routes.exit_node_problem() if self._exit_node_id is not None else None
        if problem != self._exit_node_warned:
            if problem is not None:
                log.warning("%s: traffic to addresses outside the tailnet fails until it is back", problem)
            elif self._exit_node_warned is not None:
                log.info("exit node %s is usable again", prefs.exit_node)
            self._exit_node_warned = problem
        self._follow_exit_node_dns()

    def _dns_via_tailnet(self, ip: Any) -> bool:
        """Whether a DNS resolver at `ip` is asked through the tailnet: a tailnet address,
        or one the route table sends to a peer (an accepted subnet, the exit node)."""
        if default_via_tailnet(ip):
            return True
        try:
            return self.routes.route(ip).kind is RouteKind.PEER
        except NoRouteError:
            return False

    def _follow_exit_node_dns(self) -> None:
        """MagicDNS forwards through the exit node's DNS (its peer API DoH) while one that
        offers it is in use, as tailscaled's quad-100 does; else to Headscale's resolvers."""
        url = self.routes.doh_url() if self.routes.exit_node_problem() is None else None
        if url != self._exit_doh_url:
            self._exit_doh_url = url
            self.dns.set_exit_node_upstream(None if url is None else partial(doh_query, self, url))

    def _apply_routes_to_wireguard(self) -> None:
        """Every peer's allowed IPs after the prefs changed: at once, sessions kept."""
        if self.wg is None:
            return
        for peer_id, key in self._key_by_peer_id.items():
            if key in self.wg.peers:
                self.wg.set_peer(key, self.routes.allowed.get(peer_id, []))  # (clears its route cache)

    def _check_exit_node_at_start(self) -> None:
        """`up --exit-node X` / `Node(exit_node=X)`: X must exist, be online and offer exit routes."""
        if self.route_prefs.exit_node and self._exit_node_id is None:
            peers = [pr for _, pr in self._peer_routes.values()]
            choose_exit_node(self.route_prefs.exit_node, peers, self._own_nets())  # raises why
        problem = self.routes.exit_node_problem()
        if problem is not None:
            raise ExitNodeChoiceError(problem)

    def set(self, *, exit_node: str | None = None, accept_routes: bool | None = None,
            exit_node_allow_lan_access: bool | None = None, advertise_routes: Sequence[str] | str | None = None,
            advertise_exit_node: bool | None = None) -> dict[str, Any]:
        """Change routing at run time (`tailscale set`): None leaves a setting as it is;
        ``exit_node=""`` clears it, ``advertise_routes=()`` offers no subnet. All is checked
        before anything changes; WireGuard's allowed IPs follow at once, a change of what we
        advertise reaches the control server in a lite update. Returns the new routing status."""
        advertised = self.advertised
        if advertise_routes is not None or advertise_exit_node is not None:
            subnets = (parse_advertise_routes(",".join(_advertise_texts(advertise_routes)))
                       if advertise_routes is not None else advertised.subnets)
            offer_exit = advertised.exit_node if advertise_exit_node is None else bool(advertise_exit_node)
            advertised = Advertised.from_prefixes(subnets, offer_exit)  # (both /0 in the routes: an exit node)
        prefs = self.route_prefs
        exit_id = self._exit_node_id
        if exit_node is not None:
            selector = exit_node.strip()
            if selector:
                if self.netmap is None:
                    raise TransportError("not connected yet: no netmap to find the exit node in")
                peers = [pr for _, pr in self._peer_routes.values()]
                exit_id = choose_exit_node(selector, peers, self._own_nets()).id  # ExitNodeChoiceError
            else:
                exit_id = None
            prefs = attrs.evolve(prefs, exit_node=selector)
        if accept_routes is not None:
            prefs = attrs.evolve(prefs, accept_routes=bool(accept_routes))
        if exit_node_allow_lan_access is not None:
            prefs = attrs.evolve(prefs, exit_node_allow_lan_access=bool(exit_node_allow_lan_access))
            self._lan_prefixes = None  # read the host's LAN again: it may have moved
        self.route_prefs, self._exit_node_id = prefs, exit_id
        self._rebuild_routes()
        self._apply_routes_to_wireguard()
        log.info("routing: exit node %s, accept routes %s, LAN access %s", prefs.exit_node or "none",
                 prefs.accept_routes, prefs.exit_node_allow_lan_access)
        if advertised != self.advertised:
            self.advertised = advertised
            self._host_interfaces = None  # read the host's interfaces again: they may have changed
            self._update_local_nets()
            self._update_forwarding()
            if self.control is not None:
                self.control.endpoints_changed()  # the lite update carries the new RoutableIPs
            log.info("advertising routes %s, exit node %s",
                     ",".join(map(str, advertised.subnets)) or "none", "yes" if advertised.exit_node else "no")
        return self.routing_status()

    def set_exit_node(self, exit_node: str | None) -> dict[str, Any]:
        """Use `exit_node` (a peer's tailnet IP, name or StableID) for traffic outside the
        tailnet; None or "" stops using one. ExitNodeChoiceError when it cannot be used."""
        return self.set(exit_node=exit_node or "")

    def routing_status(self) -> dict[str, Any]:
        try:
            forwarding = self.forwarding_status()
        except Exception as exc:  # status must not fail for a bug in the forwarder's report
            self.rejects.internal_error("forwarding_status", exc)
            forwarding = {}
        return {
            "exit_node": self.routes.exit_node_status(),
            "accept_routes": self.route_prefs.accept_routes,
            "exit_node_allow_lan_access": self.route_prefs.exit_node_allow_lan_access,
            "routes": self.routes.accepted_routes(),
            "advertise": advertise_status(self.advertised, self.approved_routes()),
            "forwarding": forwarding,
        }

    # -------------------------------------------------- subnet router / exit node
    def approved_routes(self) -> tuple[IPNet, ...]:
        """The routes of ours that Headscale approved and hands our peers (our netmap node's
        AllowedIPs beyond its addresses); () before the first netmap."""
        return approved_routes(self.netmap.self_node if self.netmap is not None else None)

    @property
    def offers_exit_node(self) -> bool:
        """Whether we advertise an exit node (approved or not: see `exit_node_approved`)."""
        return self.advertised.exit_node

    @property
    def exit_node_approved(self) -> bool:
        """Whether peers may use us as their exit node: both /0 approved."""
        approved = self.approved_routes()
        return self.advertised.exit_node and all(r in approved for r in EXIT_ROUTES)

    def local_nets(self) -> list[IPNet]:
        """The destinations the inbound packet filter takes as ours: our addresses, the
        subnets we advertise and, offering an exit node, the internet (§17.3)."""
        return local_nets(self._own_nets(), self.advertised, self._host_ifaces())

    def _host_ifaces(self) -> HostInterfaces:
        """The host's interfaces, read (Linux /proc) only when an exit node needs them."""
        if not self.advertised.exit_node:
            return HostInterfaces()
        if self._host_interfaces is None:
            self._host_interfaces = _read_host_interfaces()
        return self._host_interfaces

    def _update_local_nets(self) -> None:
        self.filter.update(local=self.local_nets())

    def _hostinfo_extra(self) -> dict[str, Any]:
        """Hostinfo fields of ours beyond the config's: RoutableIPs as tailscaled sends them."""
        extra: dict[str, Any] = {}
        if self.advertised:
            extra["RoutableIPs"] = self.advertised.hostinfo_routes()
        services = self.peerapi.services()
        if services:  # in the first Hostinfo Headscale 0.23 stores: it tells peers of a change in count only
            extra["Services"] = services
        return extra

    def _peerapi_access(self, caller: Any) -> peerapi.Access | None:
        """What the peer API's access rule needs to know of `caller`; None: not a peer."""
        netmap = self.netmap
        me = netmap.self_node if netmap is not None else None
        if netmap is None or me is None:
            return None
        peer = next((p for p in netmap.peers.values()
                     if any(ipaddress.ip_interface(a).ip == caller for a in p.Addresses or ())), None)
        if peer is None:
            return None
        filtered = (netmap.dns or {}).get("ExitNodeFilteredSet") or ()
        return peerapi.Access(
            own_addresses=peerapi.own_addresses(me.Addresses or ()),
            same_user=bool(me.User) and peer.User == me.User,
            offers_exit_node=self.advertised.exit_node,
            caller_may_use_internet=self.filter.would_accept_tcp(caller, peerapi.caller_probe_address(caller), 53),
            filtered_names=tuple(str(n) for n in filtered) if isinstance(filtered, list) else ())

    async def _ask_host_resolver(self, wire: bytes) -> bytes:
        """A query of our exit node's clients, to the host's resolver: `host_resolvers`'
        first, else the first nameserver of /etc/resolv.conf, over TCP (as tailscaled)."""
        if self.config.host_resolvers is not None:
            first = next(iter(self.config.host_resolvers), None)
            nameserver = parse_upstream(first) if first is not None else None
        else:
            try:
                text = await trio.Path(RESOLV_CONF).read_text()
            except OSError:
                text = ""
            ip = peerapi.resolv_conf_nameserver(text)
            nameserver = (ip, 53) if ip is not None else None
        return await self.dns.ask_host_resolver(wire, nameserver)

    def _on_node_key_changed(self, node_private: bytes) -> None:
        """Renewed node key: WireGuard and DERP use it now; netstack streams carry on."""
        assert self.magic is not None
        if self.wg is not None:
            self.wg.set_private_key(node_private)
        self.magic.set_node_key(node_private, keymod.public_of(node_private))
        self.stats["node_key_renewals"] += 1
        self._wg_timers_moved()

    def _start_stack(self, me: Any) -> None:
        addrs = [ipaddress.ip_interface(a).ip for a in me.Addresses or ()]
        self._update_local_nets()
        # Packets reach the stack only through WireGuard, whose AEAD already proved them
        # intact; tailscaled's netstack skips these checksums too.
        self.stack = NetStack(addresses=addrs, output=self._on_ip_out, mtu=1280, verify_checksums=False,
                              output_done=self._flush_outbound)
        assert self._nursery is not None
        self._nursery.start_soon(self.stack.run)
        self._nursery.start_soon(self.dns.serve_netstack, self.stack)
        self.router = Router(self.stack)
        self.forwarding_status = self.router.status
        self._nursery.start_soon(self.router.run)
        # now: the first lite update carries its Services; the ports --serve takes are left to it
        self.peerapi.listen(self.stack, addrs, reserved={s.tailnet_port for s in self.config.serves})
        self._nursery.start_soon(self.peerapi.serve)
        self._stack_ready.set()

    def forwarded_prefixes(self) -> list[IPNet]:
        """What peers may reach through us: what we advertise, as tailscaled forwards it
        (its filter's local nets are the advertised prefixes, approval not checked). Peers
        route only what Headscale approved, and Headscale 0.29 tells us of an approval
        only with a later full netmap, so waiting for it here would refuse approved
        routes for minutes. The packet filter (the ACLs) sees every packet first, and an
        exit node's /0 is shrunk there (`local_nets`)."""
        return list(self.advertised.routable_ips)

    def _update_forwarding(self) -> None:
        if self.router is not None:
            prefixes = self.forwarded_prefixes()
            if set(prefixes) != set(self.router.policy.prefixes):
                log.info("forwarding for peers: %s", ", ".join(map(str, prefixes)) or "nothing")
                self.router.set_prefixes(prefixes)

    def _endpoints_changed(self) -> None:
        if self.control is not None:
            self.control.endpoints_changed()

    # -------------------------------------------------------------- hot path
    def _on_ip_out(self, packet: bytes) -> None:
        outbound = self._outbound
        outbound.append(packet)  # sent at the end of the netstack step (_flush_outbound),
        if len(outbound) >= OUTBOUND_BURST:  # or sooner, so the peer works while we build more
            self._flush_outbound()

    def _flush_outbound(self) -> None:
        """One netstack step's packets: encrypted as a burst, and each run of datagrams
        to one peer handed to magicsock together, so it leaves in one GSO write."""
        if not self._outbound:
            return
        batch, self._outbound = self._outbound, []
        assert self.wg is not None and self.magic is not None
        self.filter.note_outbound_many(batch)
        txs = self.wg.send_ip_many(batch, clock_now(), wall())
        magic = self.magic
        magic.cork()
        try:
            for (peer, path), run in groupby(txs, _PEER_AND_PATH):
                magic.send_wireguard_many(peer, [tx[1] for tx in run], path)
        finally:
            magic.uncork()
        self._wg_timers_moved()

    def _on_wireguard(self, datagrams: Sequence[bytes | memoryview], derp_src: bytes | None,
                      path: PathTag) -> None:
        """WireGuard datagrams from one source, read together (one, or a GRO batch)."""
        if self.wg is None or self.magic is None:
            self.stats["drop.no_wireguard"] += len(datagrams)
            return
        inbound = self._inbound
        before = len(inbound)
        # derp_src: the DERP server vouches for the sender's node key, so it names the sender
        # for cookies and rate limits under load as a UDP source address does
        got = self.wg.receive_many(datagrams, clock_now(), wall(), src=path, into=inbound, src_key=derp_src)
        for tx in got.transmits:
            self.magic.send_wireguard(tx.peer, tx.data, getattr(tx, "path", None) or path)
        self._wg_timers_moved()
        if self.stack is None and len(inbound) > before:
            self.stats["drop.no_stack"] += len(inbound) - before
            del inbound[before:]

    def _on_peer_heard(self, node_key: bytes) -> None:
        if self.wg is None or self.magic is None:
            return
        for tx in self.wg.peer_heard(node_key, clock_now(), wall()):
            self.magic.send_wireguard(tx.peer, tx.data, getattr(tx, "path", None))
        self._wg_timers_moved()

    def _flush_inbound(self) -> None:
        """One netstack batch per socket read: ACKs and wake-ups once, not per packet.

        The packet filter sees every packet but the segments of established
        connections' fast path (which it would pass: they are not SYNs)."""
        if self._inbound and self.stack is not None:
            batch, self._inbound = self._inbound, []
            self.stack.deliver_many(batch, self._admit_inbound)

    def _admit_inbound(self, packet: bytes | bytearray | memoryview) -> bool:
        if self.filter.allow_inbound(packet):
            return True
        self.stats["drop.filtered"] += 1
        return False

    async def _wg_timer(self) -> None:
        """WireGuard's timers: sleeps to the earliest one; traffic that sets an earlier
        one moves the wake-up forward (`_wg_timers_moved`)."""
        wg, magic = self.wg, self.magic
        assert wg is not None and magic is not None
        while True:
            try:
                for tx in wg.tick(clock_now(), wall()):
                    magic.send_wireguard(tx.peer, tx.data, getattr(tx, "path", None))
                self._flush_outbound()  # a backstop: a netstack step that raised never reached output_done
            except Exception as exc:  # a bug: count it and keep the timers running
                self.rejects.internal_error("wireguard_timer", exc)
            deadline = wg.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as sleep:
                self._wg_sleep = sleep
                await trio.sleep_forever()
            self._wg_sleep = None

    def _wg_timers_moved(self) -> None:
        """After a call into WireGuard: if it set a timer sooner than the timer task
        sleeps to, wake the task then. (One float compare: this runs per batch.)"""
        sleep = self._wg_sleep
        if sleep is not None and self.wg is not None and self.wg.soonest < sleep.deadline:
            sleep.deadline = self.wg.soonest

    # ------------------------------------------------------------------ names
    async def resolve(self, host: str) -> str:
        """An IP for `host`: an IP literal; a tailnet name (MagicDNS FQDN, short name, an
        extra record) from the netmap; any other name from the resolvers MagicDNS
        forwards it to (`self.dns`: the same answers as 100.100.100.100 gives)."""
        if is_ip(host):
            return host
        if self.netmap is None:
            raise TransportError("not connected yet: no netmap to resolve names from")
        return await self.dns.resolve(host)

    def _peer_for(self, host: str) -> Any:
        """The peer with this tailnet name or address."""
        if self.netmap is None:
            raise TransportError("not connected yet: no netmap to resolve names from")
        ip_text = host if is_ip(host) else self.dns.lookup_tailnet(host)
        if ip_text is None:
            raise ConfigError(f"unknown peer {host!r}: not in this node's netmap")
        ip = ipaddress.ip_address(ip_text)
        for peer in self.netmap.peers.values():
            for addr in peer.Addresses or ():
                if ipaddress.ip_interface(addr).ip == ip:
                    return peer
        raise ConfigError(f"{host!r} is not a peer of this node")

    # -------------------------------------------------------------------- API
    async def _ready_stack(self) -> NetStack:
        await self._stack_ready.wait()
        assert self.stack is not None
        return self.stack

    async def addresses_of(self, host: str) -> list[str]:
        """`host` as addresses to dial: an IP literal; a tailnet name (MagicDNS name, short
        name, extra record); else a name resolved as MagicDNS resolves it: through the
        exit node's DNS when one is in use, else by the resolvers Headscale sends."""
        if is_ip(host):
            return [host]
        if self.netmap is not None and self.routes.prefs.exit_node and self.dns.lookup_tailnet(host) is None:
            problem = self.routes.exit_node_problem()
            if problem is not None:  # say why at once, rather than a resolver's timeout
                raise NoRouteError(f"cannot resolve {host!r}: {problem}")
        return [await self.resolve(host)]

    def _dial_route(self, addr: str) -> Route | None:
        """The route table's word on dialing `addr` (NoRouteError when nothing reaches it);
        None when the netstack takes it as it is: MagicDNS's own addresses, served in
        this process, or no netmap to consult (a stack wired up by hand, as in tests)."""
        ip = ipaddress.ip_address(addr)
        if self.netmap is None or ip in (QUAD100_V4, QUAD100_V6):
            return None
        return self.routes.route(ip)

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        """A TCP connection to `host`: a tailnet host (MagicDNS name, short name or IP), or,
        through an exit node or an accepted subnet route, any address (names resolved by
        the exit node's DNS). Each address of a name is tried in turn (IPv4 first).
        NoRouteError (a TransportError) says at once why an address cannot be reached."""
        stack = await self._ready_stack()
        first_error: TrionetError | None = None
        for addr in await self.addresses_of(host):
            try:
                route = self._dial_route(addr)
                if route is not None and route.kind is RouteKind.HOST:  # LAN, with --exit-node-allow-lan-access
                    host_stream: trio.abc.HalfCloseableStream = await trio.open_tcp_stream(addr, port)
                    return host_stream
                stream: trio.abc.HalfCloseableStream = await stack.open_tcp_stream(addr, port)
                return stream
            except TrionetError as exc:
                first_error = first_error or exc
            except OSError as exc:
                first_error = first_error or TransportError(f"connecting to {host}:{port} failed: "
                                                            f"{exc.strerror or exc}")
        assert first_error is not None  # addresses_of gives at least one address or raises
        raise first_error

    async def listen_tcp(self, port: int) -> trio.abc.Listener[Any]:
        """Accept TCP connections to this node's tailnet addresses on `port`."""
        stack = await self._ready_stack()
        listener: trio.abc.Listener[Any] = stack.listen_tcp(port)
        return listener

    async def open_udp(self, port: int = 0) -> Any:
        stack = await self._ready_stack()
        return _NamedUdp(self, stack.udp_bind(port))

    async def forward(self, host: str, port: int, *, bind: str = "127.0.0.1", local_port: int = 0) -> LocalForward:
        """A local listener (``bind:local_port``, 0 = any free port) whose every connection
        is relayed to tailnet ``host:port``: for libraries that only take a host and a port.
        Returns once listening; unpacks to the bound address. It lives until the node
        stops or its `aclose()`; its counters show in `statistics()["attached"]`."""
        # Imported here: the relay is trionet.proxy's, which takes the node as its dialer
        # (a layer above); `import trionet.node` stays without it.
        from trionet.forwarding import LocalForward

        if self._nursery is None or self.status_machine.status in (Status.SHUTTING_DOWN, Status.STOPPED):
            raise TransportError("the node is not running")

        def detach(closed: LocalForward) -> None:  # a closed forward's counters go: the list stays bounded
            if closed in self._attached:
                self._attached.remove(closed)

        forward = await LocalForward.start(self._nursery, self, host, port, bind=bind, local_port=local_port,
                                           on_close=detach)
        self._attached.append(forward)
        return forward

    async def serve_dns(self, bind: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """MagicDNS on a host port, UDP and TCP (`up --dns`), so host programs can ask it
        (`dig @127.0.0.1 -p PORT name`). Returns once listening, with (bind, port) (port 0:
        any free one); it lives until the node stops."""
        if self._nursery is None or self.status_machine.status in (Status.SHUTTING_DOWN, Status.STOPPED):
            raise TransportError("the node is not running")
        where: tuple[str, int] = await self._nursery.start(self.dns.serve_host, bind, port)
        return where

    async def ping(self, peer: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Disco-ping a peer; one result per ping: latency and the path it took."""
        assert self.magic is not None
        node = self._peer_for(peer)
        key = keymod.parse_public(node.Key, "nodekey:")
        results = []
        for i in range(count):
            if i:
                await trio.sleep(1)
            results.append(await self.magic.disco_ping(key, timeout))
        return results

    def status(self) -> dict[str, Any]:
        me = self.netmap.self_node if self.netmap else None
        return {
            "status": self.status_machine.status.value,
            "reason": self.status_machine.reason,
            "since": self.status_machine.since,
            "login_url": self.status_machine.login_url or None,  # while NeedsLogin: where to log in
            "self": _node_json(me) if me else None,
            "node_key": keymod.format_key("nodekey:", self.keys.node_public) if self.keys else None,
            "key_expiry": me.KeyExpiry if me else None,
            "home_derp": self.magic.home_region if self.magic else 0,
            "derp": self.magic.derp_status() if self.magic else None,
            "endpoints": self.magic.endpoints() if self.magic else [],
            **self.routing_status(),
            "peers": self.peers(),
            "dns": self.dns.status(),
            "stats": self.statistics(),
        }

    def peers(self) -> list[dict[str, Any]]:
        if self.netmap is None:
            return []
        try:
            now: float | None = clock_now()
        except RuntimeError:  # asked from outside the node's Trio run (it has ended): no path is live
            now = None
        out = []
        for peer in sorted(self.netmap.peers.values(), key=lambda p: p.ID):
            info = _node_json(peer)
            known = self._peer_routes.get(peer.ID)
            if known is not None:
                info.update(_peer_routes_json(known[1], self.routes))
            key = self._key_by_peer_id.get(peer.ID)
            if key is not None and self.magic is not None:
                path = self.magic.paths.peers.get(key)
                if path is not None and now is not None and path.direct(now):
                    info["path"] = f"direct {path.best_addr[0]}:{path.best_addr[1]}"  # type: ignore[index]
                elif path is not None:
                    info["path"] = f"derp {path.home_derp or path.last_derp_region}"
                if self.wg is not None:
                    info["wireguard"] = self.wg.peer_statistics(key)
            out.append(info)
        return out

    def attach_statistics(self, source: StatisticsSource) -> None:
        """Show `source.statistics()` in ours, under "attached", by its name."""
        self._attached.append(source)

    def statistics(self) -> dict[str, Any]:
        return {
            "node": dict(self.stats),
            "control": ({"reconnects": self.control.reconnects, "node_key_renewals": self.control.renewals,
                         "interactive_logins": self.control.logins, **self.control.pings.stats}
                        if self.control is not None else {}),
            "filter_drops": dict(self.filter.drops),
            "magicsock": self.magic.statistics() if self.magic else {},
            "wireguard": self.wg.statistics() if self.wg else {},
            "netstack": self.stack.statistics() if self.stack else {},
            "forwarding": self.router.statistics() if self.router else {},
            "dns": dict(self.dns.stats),
            "peerapi": self.peerapi.statistics(),
            "attached": {source.name: source.statistics() for source in self._attached},
        }


class _NamedUdp:
    """A netstack UDP endpoint that also takes tailnet names."""

    def __init__(self, node: Node, endpoint: Any) -> None:
        self.node = node
        self.endpoint = endpoint

    async def send_to(self, data: bytes, host: str, port: int) -> None:
        addr = (await self.node.addresses_of(host))[0]
        route = self.node._dial_route(addr)
        if route is not None and route.kind is RouteKind.HOST:
            raise NoRouteError(f"UDP to the LAN address {addr}: only TCP is dialed from the host network")
        await self.endpoint.send(data, (addr, port))

    async def receive_from(self) -> tuple[bytes, tuple[str, int]]:
        data, addr = await self.endpoint.receive()
        return data, (str(addr[0]), int(addr[1]))

    def close(self) -> None:
        if self.node._nursery is not None:
            self.node._nursery.start_soon(self.endpoint.aclose)


def _node_json(node: Any) -> dict[str, Any]:
    return {
        "id": node.ID,
        "name": (node.Name or "").rstrip("."),
        "hostname": node.Hostinfo.Hostname if node.Hostinfo else None,
        "node_key": node.Key,
        "disco_key": node.DiscoKey,
        "addresses": list(node.Addresses or ()),
        "online": node.Online,
        "home_derp": node.HomeDERP or legacy_derp_region(node.DERP or ""),
        "endpoints": list(node.Endpoints or ()),
    }


def _peer_routes_json(peer: PeerRoutes, table: RouteTable) -> dict[str, Any]:
    """A peer's routing in `status`: what it offers, what we route to it."""
    ours = [str(n) for n in table.allowed.get(peer.id, []) if n not in peer.self_prefixes]
    return {
        "exit_node_option": peer.offers_exit,
        "exit_node": peer.id == table.exit_node_id,
        "primary_routes": [str(n) for n in peer.primary_routes],
        "routes": ours,
    }


def _advertise_texts(routes: Sequence[str] | str | None) -> tuple[str, ...]:
    """Routes to advertise as the user gave them ("a,b" or a list), checked and normalized."""
    text = routes if isinstance(routes, str) else ",".join(routes or ())
    return tuple(str(n) for n in parse_advertise_routes(text))


def _read_host_interfaces() -> HostInterfaces:
    """The host's interface prefixes and addresses from /proc (Linux); none elsewhere."""
    texts = []
    for name in ("/proc/net/fib_trie", "/proc/net/if_inet6"):
        try:
            texts.append(Path(name).read_text())
        except OSError:
            texts.append("")
    return host_interfaces_from_proc(*texts)


def _read_host_lan() -> list[Any]:
    """The host's LAN prefixes from /proc (Linux); none elsewhere (LAN access then has no effect)."""
    try:
        route = Path("/proc/net/route").read_text()
    except OSError:
        return []
    try:
        inet6 = Path("/proc/net/if_inet6").read_text()
    except OSError:
        inet6 = ""
    return list(lan_prefixes_from_proc(route, inet6))


def _split_endpoint(text: str) -> tuple[str, int] | None:
    """An endpoint from the netmap ("ip:port", "[ipv6]:port"); None when it is not one."""
    try:
        host, port = split_host_port(text)
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, port
