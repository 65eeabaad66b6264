"""magicsock's trio driver: the wiring of paths, disco, STUN and DERP links.

It moves WireGuard datagrams to and from peers (addressed by node key) over
the best path the PathChooser (paths.py) knows, and answers and sends disco
messages. The UDP socket itself (GRO reads, GSO writes) is `udp.UdpSocket`;
DERP links are `derp.driver.DerpConnection`s, one per region.
The hot path runs in the task that read the datagram: the UDP reader and each
DERP reader call `on_wireguard` synchronously, which decrypts and hands IP
packets to the netstack without another task hop.

Path tags name where a datagram came from, so answers go back the same way:
``("udp", (ip, port))`` or ``("derp", region)``.

netcheck (netcheck.py) measures every DERP region and picks the home one; this
driver runs its reports over the same UDP socket (their STUN replies also give
our public endpoint), at start, every 20-26 s while peers are active, every
5 minutes in full, and at once when the home link breaks. A new home is told
to control (`on_endpoints_changed`: the lite update carries PreferredDERP),
dialled, and the old one is told it is no longer preferred. Peers homed in
other regions are reached through a link to their region, made on demand.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from trionet.clock import wall
from trionet.config import is_ip
from trionet.derp import client as derp_client
from trionet.derp import transport as derp_transport
from trionet.derp.driver import DerpConnection, derp_url_for_node
from trionet.errors import RemoteProtocolError, TrionetError
from trionet.magicsock import disco, netcheck, stun
from trionet.magicsock.paths import Addr, CallMeMaybeAction, PathChooser, PingAction
from trionet.magicsock.udp import UdpSocket, plain_addr
from trionet.netaddr import join_host_port
from trionet.rejects import RejectLog

log = logging.getLogger(__name__)

PathTag = tuple[str, Any]
DERP_MAGIC_IP = "127.3.3.40"  # tailcfg.DerpMagicIP: a DERP region as a pseudo-address
NETCHECK_RETRY = 0.5  # after a report no STUN reply reached: again this soon, doubling ...
NETCHECK_RETRY_MAX = 25.0  # ... up to this
STUN_RESOLVE_TIMEOUT = 5.0
DERP_IDLE_CLOSE = 60.0  # a link that is not home and not written to this long is closed (derpInactiveCleanupTime)
DERP_CLEAN_INTERVAL = 15.0  # how often that is looked at while such links exist (derpCleanStaleInterval)


_WIREGUARD_HANDSHAKE_TYPES = frozenset((b"\x01", b"\x02", b"\x03"))  # initiation, response, cookie
# A CallMeMaybe lists the sender's endpoints (a handful); each one is pinged at once,
# so a crafted one with thousands must not turn into thousands of pings.
MAX_CALL_ME_MAYBE_ENDPOINTS = 32


class MagicConn:
    def __init__(
        self,
        node_private: bytes,
        node_public: bytes,
        disco_private: bytes,
        disco_public: bytes,
        on_wireguard: Callable[[Sequence[bytes | memoryview], bytes | None, PathTag], None],
        *,
        login_server: str,
        ca_file: str | None = None,
        udp_port: int = 0,
        udp_bind: str = "",
        on_endpoints_changed: Callable[[], None] | None = None,
        on_batch_end: Callable[[], None] | None = None,
        on_peer_heard: Callable[[bytes], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_private = node_private
        self.node_public = node_public
        self.disco_private = disco_private
        self.disco_public = disco_public
        self.on_wireguard = on_wireguard
        self.login_server = login_server
        self.ca_file = ca_file
        self.on_endpoints_changed = on_endpoints_changed
        self.on_batch_end = on_batch_end  # after each drained batch: flush work batched per read
        self.on_peer_heard = on_peer_heard  # an authentic disco message: the peer knows our keys now
        self.paths = PathChooser()
        self.stats: Counter[str] = Counter()
        self.rejects = RejectLog(log, "magicsock", self.stats)  # drops and internal errors, in `stats`
        self.udp = UdpSocket(udp_bind, udp_port, stats=self.stats, rejects=self.rejects)  # counts in `stats` too
        self.derp_map: Any = None
        self.home_region = 0
        self.derps: dict[int, DerpConnection] = {}
        self._nursery: trio.Nursery | None = None
        # A peer's disco key -> (its node key, the box that seals to and opens from it).
        # One map, so a disco key and its box are forgotten together when the peer
        # restarts with a new key or leaves the netmap.
        self._disco_peers: dict[bytes, tuple[bytes, disco.DiscoBox]] = {}
        self.stun_endpoints: list[Addr] = []
        self.local_endpoints: list[Addr] = []
        self._user_pings: dict[bytes, tuple[trio.Event, list[Any]]] = {}
        self._endpoints_ready = trio.Event()
        self._disco_wake = trio.Event()
        self.rng = rng or random.Random()
        self.netcheck = netcheck.Netcheck()
        self.last_report: netcheck.Report | None = None
        self.last_netcheck_wall: float | None = None
        self.home_changes = 0
        # Whether the control session is up: without it a new home could not be told
        # to peers, so the home does not move (magicsock maybeSetNearestDERP).
        self.control_connected = False
        self._run: netcheck.ReportRun | None = None  # the report being gathered
        self._stun_reply = trio.Event()
        self._netcheck_wake = trio.Event()
        self._netcheck_idle = False  # the loop waits for activity
        self._last_active = float("-inf")  # when WireGuard data last went out
        self._derp_last_write: dict[int, float] = {}  # per region: when we last sent through it
        self._non_home_links = trio.Event()  # set while a link that is not home may be idle

    # ------------------------------------------------------------------ setup
    def bind(self) -> None:
        self.udp.bind()
        self.local_endpoints = self.udp.local_endpoints()

    def endpoints(self) -> list[str]:
        seen: list[Addr] = []
        for ep in [*self.stun_endpoints, *self.local_endpoints]:
            if ep not in seen:
                seen.append(ep)
        return [join_host_port(h, p) for h, p in seen]

    def endpoint_types(self) -> list[int]:
        types = []
        seen: list[Addr] = []
        for ep, kind in [*((e, 2) for e in self.stun_endpoints), *((e, 1) for e in self.local_endpoints)]:
            if ep not in seen:
                seen.append(ep)
                types.append(kind)
        return types

    # ------------------------------------------------------------- netmap in
    def set_derp_map(self, derp_map: Any) -> None:
        """A new DERP map: measure it (at once, in full when the home region went away)."""
        self.derp_map = derp_map
        regions = self._region_ids()
        for region in [r for r in self.derps if r not in regions]:  # gone from the map
            self.derps.pop(region).close()
        if self.home_region and self.home_region not in regions:
            log.info("home DERP region %s left the DERP map", self.home_region)
            self.home_region = 0
            self.netcheck.make_next_full()
        if len(regions) == 1 and self.home_region != regions[0]:
            # The only choice, whatever a report would say: no need to wait for one.
            self._set_home(regions[0], "the only region")
        elif self.home_region:
            self._ensure_derp(self.home_region, preferred=True)
        self.request_netcheck()

    def _region_ids(self) -> list[int]:
        if self.derp_map is None:
            return []
        return sorted(int(r) for r, reg in (self.derp_map.Regions or {}).items() if reg is not None)

    def set_node_key(self, node_private: bytes, node_public: bytes) -> None:
        """Our node key was renewed: DERP servers know us by it, so every link reconnects."""
        self.node_private = node_private
        self.node_public = node_public
        for conn in self.derps.values():
            conn.close()
        self.derps.clear()
        if self.home_region:
            self._ensure_derp(self.home_region, preferred=True)

    def upsert_peer(self, node_key: bytes, disco_key: bytes | None, home_derp: int,
                    endpoints: list[Addr]) -> None:
        if disco_key is not None and not any(disco_key):
            disco_key = None  # a peer that never reported its disco key: DERP only, no disco
        old = self.paths.peers.get(node_key)
        if old is not None and old.disco_key and old.disco_key != disco_key:
            # It restarted: what it sealed with the old key (late or replayed) no longer opens.
            self._forget_disco(old.disco_key, node_key)
        self.paths.upsert_peer(node_key, disco_key, home_derp, endpoints)
        if self.paths.wake:
            self._disco_wake.set()
        if disco_key:
            known = self._disco_peers.get(disco_key)
            if known is None or known[0] != node_key:
                try:
                    box = disco.DiscoBox(self.disco_private, disco_key)
                except Exception as exc:  # a low-order or garbage key from the netmap
                    self.rejects.reject("disco.bad_peer_key", f"peer {node_key.hex()[:8]}: {exc}")
                    return
                self._disco_peers[disco_key] = (node_key, box)

    def remove_peer(self, node_key: bytes) -> None:
        peer = self.paths.peers.get(node_key)
        if peer is not None and peer.disco_key:
            self._forget_disco(peer.disco_key, node_key)
        self.paths.remove_peer(node_key)

    def _forget_disco(self, disco_key: bytes, node_key: bytes) -> None:
        known = self._disco_peers.get(disco_key)
        if known is not None and known[0] == node_key:
            del self._disco_peers[disco_key]

    # --------------------------------------------------------------- sending
    def send_wireguard(self, node_key: bytes, data: bytes, reply_path: PathTag | None = None) -> None:
        """Send one WireGuard datagram to a peer; never blocks (drops and counts instead)."""
        self.send_wireguard_many(node_key, (data,), reply_path)

    def send_wireguard_many(self, node_key: bytes, datagrams: Sequence[bytes],
                            reply_path: PathTag | None = None) -> None:
        """`send_wireguard` for a burst to one peer: the path is chosen once."""
        now = trio.current_time()
        self._last_active = now
        if self._netcheck_idle:  # traffic again: periodic netchecks resume
            self._netcheck_idle = False
            self._netcheck_wake.set()
        addr, region = self.paths.paths_for_send(node_key, now)
        if self.paths.wake:
            self._disco_wake.set()
        sent_udp = sent_derp = False
        if reply_path is not None:
            kind, where = reply_path
            if kind == "udp":
                self.udp.send(datagrams, where)
                sent_udp = where == addr
            elif kind == "derp":
                for data in datagrams:
                    self._send_derp(where, node_key, data)
                sent_derp = where == region
        if addr is not None and not sent_udp:
            self.udp.send(datagrams, addr)
        if region and not sent_derp:
            for data in datagrams:
                self._send_derp(region, node_key, data)
        if addr is None and not region and reply_path is None:
            self.stats["send.no_path"] += len(datagrams)

    def _send_udp(self, data: bytes, addr: Addr) -> None:
        self.udp.send((data,), addr)

    def cork(self) -> None:
        """Hold UDP datagrams until `uncork`, to send same-sized runs to one address as
        one GSO write. For a burst produced synchronously, such as one netstack flush."""
        self.udp.cork()

    def uncork(self) -> None:
        self.udp.uncork()

    def _send_derp(self, region: int, node_key: bytes, data: bytes) -> None:
        conn = self._ensure_derp(region)
        self._derp_last_write[region] = trio.current_time()
        if conn is None:
            self.stats["send.derp_no_region"] += 1
            return
        if conn.send_packet_nowait(node_key, data):
            self.stats["send.derp"] += 1
        else:
            self.stats["send.derp_dropped"] += 1

    def _ensure_derp(self, region: int, preferred: bool = False) -> DerpConnection | None:
        conn = self.derps.get(region)
        if conn is not None:
            return conn
        if self.derp_map is None or self._nursery is None:
            return None
        node = self._derp_node(region)
        if node is None:
            return None
        url, ip = derp_url_for_node(node, self.login_server)
        conn = DerpConnection(url, self.node_private, ca_file=self.ca_file, connect_ip=ip,
                              cert_name=node.CertName,
                              preferred=preferred or region == self.home_region,
                              on_packet=partial(self._on_derp_packet, region), on_batch_end=self.end_batch,
                              on_event=partial(self._on_derp_event, region))
        self.derps[region] = conn
        self._derp_last_write[region] = trio.current_time()
        if region != self.home_region:
            self._non_home_links.set()
        self._nursery.start_soon(conn.run)
        return conn

    async def _derp_cleaner(self) -> None:
        """Links to regions that are not home (a peer's home, our old home) close after a
        minute without our writing to them, as tailscaled's cleanStaleDerp does: a region
        left for good is not redialled forever."""
        while True:
            await self._non_home_links.wait()
            await trio.sleep(DERP_CLEAN_INTERVAL)
            now = trio.current_time()
            for region, conn in list(self.derps.items()):
                if region == self.home_region:
                    continue
                if now - self._derp_last_write.get(region, now) > DERP_IDLE_CLOSE:
                    log.debug("DERP region %s: idle for %.0f s and not home; closing its link", region,
                              now - self._derp_last_write.get(region, now))
                    conn.close()
                    del self.derps[region]
                    self._derp_last_write.pop(region, None)
                    self.stats["derp.idle_closed"] += 1
            if all(region == self.home_region for region in self.derps):
                self._non_home_links = trio.Event()

    def _derp_node(self, region: int) -> Any:
        """The node of `region` a DERP link dials: its first that is not STUN-only."""
        if self.derp_map is None:
            return None
        reg = (self.derp_map.Regions or {}).get(region)
        return next((n for n in (reg.Nodes or ()) if not n.STUNOnly), None) if reg is not None else None

    def _set_home(self, region: int, why: str) -> None:
        """Make `region` home: the links learn which one is preferred, the new home is
        dialled, and control is told (through the endpoints-changed report)."""
        old = self.home_region
        if region == old:
            return
        self.home_region = region
        if old:
            self.home_changes += 1
        log.info("home DERP region %s -> %s (%s)", old or "none", region or "none", why)
        for r, conn in self.derps.items():
            conn.set_preferred(r == region)
        if old in self.derps:
            self._derp_last_write[old] = trio.current_time()  # idle from now: closed in a minute if unused
            self._non_home_links.set()
        if region:
            self._ensure_derp(region, preferred=True)
        if self.on_endpoints_changed is not None:
            self.on_endpoints_changed()

    # -------------------------------------------------------------- receiving
    def _on_derp_event(self, region: int, event: Any) -> None:
        log.debug("derp region %s: %s", region, event)
        if region == self.home_region and isinstance(event, derp_client.Disconnected):
            # The home link broke: maybe the network changed (tailscaled ReSTUNs on it).
            self.request_netcheck()

    def _on_derp_packet(self, region: int, src: bytes, data: bytes) -> None:
        """One packet a peer sent us through DERP; never raises (the DERP link must live on)."""
        self.stats["recv.derp"] += 1
        try:
            if disco.looks_like_disco(data):
                self._on_disco(data, ("derp", region), src)
                return
            self.paths.note_derp_region(src, region)
            self.on_wireguard((data,), src, ("derp", region))  # on_batch_end follows once per DERP read
        except Exception as exc:
            self.rejects.internal_error("derp_packet", exc)

    async def _udp_reader(self) -> None:
        udp = self.udp
        on_wireguard = self.on_wireguard
        on_datagram = self._on_udp_datagram
        while True:
            await udp.wait_readable()
            for datagrams, source in udp.drain():
                path = ("udp", source)
                try:
                    if len(datagrams) == 1:
                        data = datagrams[0]
                        if data[:1] == b"\x04":  # WireGuard transport: STUN starts 0x00/0x01, disco 'T'
                            on_wireguard(datagrams, None, path)
                        else:
                            on_datagram(data, path)
                    elif _all_transport(datagrams):  # a GRO read: WireGuard's go over together
                        on_wireguard(datagrams, None, path)
                    else:
                        for data in datagrams:
                            on_datagram(data, path)
                except Exception as exc:  # a bug met by this read's datagrams: drop them, read on
                    self.rejects.internal_error("udp_datagram", exc)
            self.end_batch()

    def end_batch(self) -> None:
        """The end of a drained read: work batched per read (the netstack's) runs now."""
        if self.on_batch_end is not None:
            try:
                self.on_batch_end()
            except Exception as exc:
                self.rejects.internal_error("batch_end", exc)

    def _on_udp_datagram(self, data: bytes | memoryview, path: PathTag) -> None:
        if data[:1] == b"\x04":
            self.on_wireguard((data,), None, path)
            return
        data = bytes(data)
        if stun.is_stun(data):
            self._on_stun(data)
        elif disco.looks_like_disco(data):
            self._on_disco(data, path, None)
        elif data[:1] in _WIREGUARD_HANDSHAKE_TYPES:
            self.on_wireguard((data,), None, path)
        else:
            self.rejects.reject("recv.udp_unknown", f"{len(data)} bytes from {path[1]}")

    # ------------------------------------------------------------------ disco
    def _on_disco(self, data: bytes, path: PathTag, derp_src: bytes | None) -> None:
        """A disco message over UDP or DERP. Anyone can send these bytes (or replay a
        peer's), so it must open with the box of a disco key in the current netmap;
        what it may then cause is bounded as tailscaled bounds it (magicsock.go
        handleDiscoMessage, handlePingLocked)."""
        now = trio.current_time()
        try:
            sender_disco = disco.sender_key(data)
        except RemoteProtocolError as exc:
            self.rejects.reject("disco.bad", exc)
            return
        known = self._disco_peers.get(sender_disco)
        if known is None:  # not a peer's current key: a stranger, or a peer from before its restart
            self.rejects.reject("disco.unknown_sender", f"from {path}")
            return
        node_key, box = known
        try:
            msg = box.open(data)
        except RemoteProtocolError as exc:
            self.rejects.reject("disco.bad", f"from {path}: {exc}")
            return
        if derp_src is not None and derp_src != node_key:
            # DERP names the sending node; it must be the node that owns this disco key.
            self.rejects.reject("disco.derp_sender_mismatch", f"from {derp_src.hex()[:8]} via {path}")
            return
        if isinstance(msg, disco.Ping):
            if path[0] == "udp":
                if self.paths.on_ping(node_key, path[1], msg.tx_id, now):
                    # The same ping from the same address again: a replay or a duplicate,
                    # answered once only (endpoint.go addCandidateEndpoint, duplicatePing).
                    self.rejects.reject("disco.duplicate_ping", f"from {path}")
                    return
                src_ip, src_port = path[1]
            else:
                src_ip, src_port = DERP_MAGIC_IP, int(path[1])
            self.stats["disco.ping_in"] += 1
            self._heard(node_key)
            pong = disco.Pong(tx_id=msg.tx_id, src=(src_ip, src_port))
            self._send_disco(node_key, sender_disco, pong, path)
        elif isinstance(msg, disco.Pong):
            self.stats["disco.pong_in"] += 1
            self._heard(node_key)
            src = path[1] if path[0] == "udp" else None
            waiter = self._user_pings.get(msg.tx_id)
            if waiter is not None:
                waiter[1][:] = [now, path]
                waiter[0].set()
            if self.paths.on_pong(node_key, msg.tx_id, src, now):
                log.debug("direct path to %s proven via %s", node_key.hex()[:8], src)
        elif isinstance(msg, disco.CallMeMaybe):
            if derp_src is None:  # tailscaled takes these only through DERP, from their sender
                self.rejects.reject("disco.callmemaybe_not_via_derp", f"from {path}")
                return
            self.stats["disco.callmemaybe_in"] += 1
            self._heard(node_key)
            endpoints = [plain_addr(e) for e in msg.endpoints[:MAX_CALL_ME_MAYBE_ENDPOINTS]]
            if len(msg.endpoints) > MAX_CALL_ME_MAYBE_ENDPOINTS:
                self.rejects.reject("disco.callmemaybe_endpoints_cut", len(msg.endpoints))
            for action in self.paths.on_call_me_maybe(node_key, endpoints, now):
                self._do(action)
        else:
            self.stats["disco.ignored"] += 1

    def _heard(self, node_key: bytes) -> None:
        """An authentic disco message from this peer: it knows our keys now."""
        if self.paths.on_heard(node_key):
            self._disco_wake.set()
        if self.on_peer_heard is not None:
            self.on_peer_heard(node_key)

    def _send_disco(self, node_key: bytes, disco_key: bytes | None, msg: Any, path: PathTag) -> None:
        if disco_key is None:
            return
        known = self._disco_peers.get(disco_key)
        if known is None:
            return
        wire = known[1].seal(self.disco_public, msg)
        kind, where = path
        if kind == "udp":
            self._send_udp(wire, where)
        else:
            self._send_derp(where, node_key, wire)

    def _do(self, action: PingAction | CallMeMaybeAction) -> None:
        peer = self.paths.peers.get(action.node_key)
        if peer is None:
            return
        if isinstance(action, PingAction):
            ping = disco.Ping(tx_id=action.txid, node_key=self.node_public)
            path: PathTag = ("udp", action.addr) if action.addr else ("derp", action.derp_region)
            self.stats["disco.ping_out"] += 1
            self._send_disco(action.node_key, peer.disco_key, ping, path)
        else:
            eps = [*self.stun_endpoints, *self.local_endpoints]
            if eps:
                self.stats["disco.callmemaybe_out"] += 1
                self._send_disco(action.node_key, peer.disco_key, disco.CallMeMaybe(endpoints=eps),
                                 ("derp", action.derp_region))

    async def disco_ping(self, node_key: bytes, timeout: float = 5.0) -> dict[str, Any]:
        """One disco ping on the path data would take now (UDP if proven, else DERP)."""
        peer = self.paths.peers.get(node_key)
        if peer is None or not peer.disco_key:
            return {"latency_ms": None, "path": None, "error": "peer has no disco key"}
        now = trio.current_time()
        addr, region = self.paths.paths_for_send(node_key, now)
        path: PathTag = ("udp", addr) if addr is not None and not region else ("derp", region)
        if path == ("derp", 0):
            return {"latency_ms": None, "path": None, "error": "no path to peer"}
        txid = os.urandom(12)
        event = trio.Event()
        result: list[Any] = []
        self._user_pings[txid] = (event, result)
        if path[0] == "udp":  # also let the path chooser learn from this pong
            self.paths.expect_pong(node_key, txid, path[1], now)
        try:
            ping = disco.Ping(tx_id=txid, node_key=self.node_public)
            self._send_disco(node_key, peer.disco_key, ping, path)
            with trio.move_on_after(timeout):
                await event.wait()
        finally:
            del self._user_pings[txid]
        if not result:
            return {"latency_ms": None, "path": _describe(path)}
        return {"latency_ms": (result[0] - now) * 1000, "path": _describe(result[1])}

    async def _disco_timer(self) -> None:
        """Disco's timers: sleeps to the next ping, heartbeat, probe or CallMeMaybe due,
        or until something makes one due at once (`PathChooser.wake`)."""
        while True:
            self._disco_wake = trio.Event()
            self.paths.wake = False
            now = trio.current_time()
            have_endpoints = bool(self.local_endpoints or self.stun_endpoints)
            for action in self.paths.poll(now, have_endpoints=have_endpoints):
                self._do(action)
            # (a millisecond at least: a deadline that float rounding puts a hair early
            # must not spin, and under a MockClock time must be able to move)
            deadline = max(self.paths.next_deadline(now, have_endpoints), now + 0.001)
            with trio.move_on_at(deadline):
                await self._disco_wake.wait()

    # ------------------------------------------------------- STUN and netcheck
    async def _resolve_ipv4(self, host: str) -> str | None:
        """A STUN host name's IPv4 address, looked up by Trio's resolver (in a worker
        thread: a slow DNS server must not stall the packets this task carries)."""
        try:
            with trio.move_on_after(STUN_RESOLVE_TIMEOUT):
                infos = await trio.socket.getaddrinfo(host, None, family=socket.AF_INET,
                                                      type=socket.SOCK_DGRAM)
                return str(infos[0][4][0]) if infos else None
        except OSError as exc:
            log.debug("stun: cannot resolve %s: %s", host, exc)
        return None

    async def _resolve_stun_hosts(self, derp_map: Any) -> dict[str, str]:
        """IPv4 addresses of the nodes that name no IPv4 address, by host name."""
        names = {n.HostName for reg in (derp_map.Regions or {}).values() if reg is not None
                 for n in reg.Nodes or () if not n.IPv4 and n.HostName and not is_ip(n.HostName)}
        out: dict[str, str] = {}
        for name in sorted(names):
            ip = await self._resolve_ipv4(name)
            if ip is None:
                self.stats["stun.resolve_failed"] += 1
            else:
                out[name] = ip
        return out

    def _on_stun(self, data: bytes) -> None:
        try:
            txid, addr = stun.parse_response(data)
        except RemoteProtocolError as exc:
            self.rejects.reject("stun.bad", exc)
            return
        run = self._run
        if run is None or not run.receive(txid, plain_addr(addr), trio.current_time()):
            self.rejects.reject("stun.unsolicited")  # no report asked, or it ended: late or forged
            return
        self.stats["stun.replies"] += 1
        self._stun_reply.set()

    def request_netcheck(self) -> None:
        """Measure again now (a new map, the home link lost)."""
        self._netcheck_wake.set()

    def _active(self, now: float) -> bool:
        return bool(self.paths.peers) and now - self._last_active < netcheck.SESSION_ACTIVE_TIMEOUT

    async def _netcheck_loop(self) -> None:
        """Reports: one at once, then every 20-26 s while peers are active (sooner, backing
        off, while no STUN reply came), and whenever `request_netcheck` is called."""
        retry = NETCHECK_RETRY
        while True:
            self._netcheck_wake = trio.Event()
            if not self._region_ids():
                await self._netcheck_wake.wait()
                continue
            report = await self._one_netcheck()
            now = trio.current_time()
            if report.udp or self.udp.sock is None:
                retry = NETCHECK_RETRY
                delay = netcheck.restun_delay(self.rng)
            else:
                delay, retry = retry, min(retry * 2, NETCHECK_RETRY_MAX)
            with trio.move_on_at(now + delay):
                await self._netcheck_wake.wait()
            if not self._netcheck_wake.is_set() and not self._active(trio.current_time()):
                # Idle: no periodic reports (tailscaled stops re-STUNning) until traffic,
                # a new map or a lost home link.
                self._netcheck_idle = True
                await self._netcheck_wake.wait()
                self._netcheck_idle = False

    async def _one_netcheck(self) -> netcheck.Report:
        derp_map = self.derp_map
        resolved = await self._resolve_stun_hosts(derp_map)
        run = self.netcheck.begin(derp_map, trio.current_time(), have_v4=self.udp.sock is not None,
                                  resolved=resolved)
        self._run = run
        try:
            now = trio.current_time()
            while not run.stun_done(now):
                for send in run.due(now):
                    self.stats["stun.requests"] += 1
                    self._send_udp(stun.binding_request(send.txid), send.addr)
                self._stun_reply = trio.Event()
                with trio.move_on_at(run.next_deadline()):
                    await self._stun_reply.wait()
                now = trio.current_time()
            regions = run.https_regions()
            if regions:
                log.debug("netcheck: no STUN reply; timing regions %s over HTTPS", regions)
                with trio.move_on_at(run.https_deadline):
                    async with trio.open_nursery() as nursery:
                        for region in regions:
                            nursery.start_soon(self._https_probe, run, region)
        finally:
            self._run = None
        now = trio.current_time()
        heard = {r: c.last_received for r, c in self.derps.items() if c.last_received is not None}
        report = self.netcheck.finish(run, now, heard, self._unusable_regions(now))
        self._apply_report(report)
        return report

    def _unusable_regions(self, now: float) -> list[int]:
        return [r for r, c in self.derps.items()
                if c.down_since is not None and now - c.down_since > netcheck.LINK_DOWN_GRACE]

    async def _https_probe(self, run: netcheck.ReportRun, region: int) -> None:
        node = self._derp_node(region)
        if node is None:
            return
        url, ip = derp_url_for_node(node, self.login_server)  # where and how the DERP link would go
        parts = urllib.parse.urlsplit(url)
        host, tls = parts.hostname or "", parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        ctx = derp_transport.tls_context(self.ca_file, host, node.CertName) if tls else None
        try:
            latency = await derp_transport.https_latency(host, port, connect_ip=ip, ssl_context=ctx,
                                                         cert_name=node.CertName)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, TrionetError) as exc:
            self.stats["netcheck.https_failed"] += 1
            log.debug("netcheck: HTTPS latency of region %s: %s", region, exc)
            return
        self.stats["netcheck.https_ok"] += 1
        run.add_https_latency(region, latency)

    def _apply_report(self, report: netcheck.Report) -> None:
        self.last_report = report
        self.last_netcheck_wall = wall()
        self.stats["netcheck.reports"] += 1
        if report.global_v4 is not None:
            # Our address as the first STUN reply of this report saw it (tailscaled's GlobalV4).
            ep = report.global_v4
            if self.stun_endpoints != [ep]:
                self.stun_endpoints = [ep]
                if self.on_endpoints_changed is not None:
                    self.on_endpoints_changed()
            self._endpoints_ready.set()
        home = netcheck.pick_home(report.preferred_derp, self.home_region, self.derp_map,
                                  control_connected=self.control_connected, rng=self.rng,
                                  unusable=self._unusable_regions(report.now))
        latencies = ", ".join(f"{r}: {d * 1000:.1f} ms" for r, d in sorted(report.region_latency.items()))
        log.debug("netcheck (%s): udp %s, latencies {%s}, preferred %s, home %s",
                  "full" if report.full else "incremental", report.udp, latencies, report.preferred_derp, home)
        if home != self.home_region:
            self._set_home(home, f"netcheck: {latencies or 'no latency'}")

    def net_info(self) -> dict[str, Any]:
        """Hostinfo.NetInfo as tailscaled reports it (magicsock updateNetInfo)."""
        info: dict[str, Any] = {"PreferredDERP": self.home_region}
        report = self.last_report
        if report is not None:
            latency = {f"{r}-v4": d for r, d in report.region_v4_latency.items()}
            latency.update({f"{r}-v6": d for r, d in report.region_v6_latency.items()})
            if latency:
                info["DERPLatency"] = latency
            info["WorkingUDP"] = report.udp
            if report.mapping_varies_by_dest_ip is not None:
                info["MappingVariesByDestIP"] = report.mapping_varies_by_dest_ip
        return info

    def derp_status(self) -> dict[str, Any]:
        """The home region, every region's last latency and link: for `status`."""
        report = self.last_report
        regions = []
        for region in self._region_ids():
            reg = (self.derp_map.Regions or {}).get(region)
            conn = self.derps.get(region)
            latency = report.region_latency.get(region) if report is not None else None
            regions.append({
                "id": region,
                "code": reg.RegionCode if reg is not None else "",
                "name": reg.RegionName if reg is not None else "",
                "latency_ms": round(latency * 1000, 3) if latency is not None else None,
                "measured_by": ("https" if report is not None and region in report.https_regions
                                else "stun") if latency is not None else None,
                "home": region == self.home_region,
                "link": "connected" if conn is not None and conn.connected else "down" if conn is not None else "none",
            })
        when = self.last_netcheck_wall
        return {
            "home": self.home_region,
            "home_changes": self.home_changes,
            "last_netcheck": (datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")
                              if when is not None else None),
            "udp": report.udp if report is not None else None,
            "regions": regions,
        }

    async def wait_endpoints(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._endpoints_ready.wait()

    # -------------------------------------------------------------------- run
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.udp.sock is not None:
                nursery.start_soon(self._udp_reader)
            nursery.start_soon(self._netcheck_loop)
            nursery.start_soon(self._derp_cleaner)
            nursery.start_soon(self._disco_timer)
            if self.derp_map is not None:
                self.set_derp_map(self.derp_map)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.udp.close()

    def statistics(self) -> dict[str, Any]:
        return {
            "counters": dict(self.stats),
            "home_derp": self.home_region,
            "netcheck_reports": self.netcheck.reports,
            "endpoints": self.endpoints(),
            "derp": {str(r): c.statistics() for r, c in self.derps.items()},
        }


def _all_transport(datagrams: Sequence[bytes | memoryview]) -> bool:
    """Whether every datagram of a GRO read is a WireGuard transport message (type 4)."""
    for data in datagrams:
        if data[0] != 4:
            return False
    return True


def _describe(path: PathTag) -> str:
    kind, where = path
    if kind == "udp":
        return f"udp {join_host_port(*where)}"
    return f"DERP({where})"
