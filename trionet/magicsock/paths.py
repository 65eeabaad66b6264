"""Which path reaches a peer: direct UDP, DERP, or both until UDP is proven.

Sans-IO: the driver tells this core what it saw (pongs, pings, CallMeMaybe,
netmap updates) with the time, and asks it where to send and what disco
messages to emit. Behaviour follows tailscaled's magicsock endpoint
(wgengine/magicsock/endpoint.go):

* a UDP address is *trusted* for `TRUST_UDP_ADDR` after a pong from it; while
  trusted, packets go only there;
* otherwise packets go to the best UDP address (if any) *and* over DERP to the
  peer's home region, so the receiver's replay window dedupes;
* candidates are pinged at most every `DISCO_PING_INTERVAL`; while the path is
  not trusted we also send CallMeMaybe over DERP so the peer pings us back
  (hole punching);
* while the peer is active, the best address is re-pinged every
  `HEARTBEAT_INTERVAL` so trust does not lapse.

Ours, not tailscaled's: until a peer has sent us one authentic disco message
(`on_heard`), it may not know our keys yet (its netmap lags ours), and it
silently drops what we send. While such a peer is active we ping it over DERP
every `FIRST_CONTACT_PROBE` for up to `FIRST_CONTACT_WINDOW`; the first reply
re-arms the UDP pings at once, and the node resends its WireGuard initiation
instead of waiting out REKEY_TIMEOUT. A first connection takes a fraction of
a second instead of five.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterable

import attrs

Addr = tuple[str, int]

PING_TIMEOUT = 5.0  # tsconst pingTimeoutDuration
TRUST_UDP_ADDR = 6.5  # trustUDPAddrDuration
HEARTBEAT_INTERVAL = 3.0  # heartbeatInterval
SESSION_ACTIVE_TIMEOUT = 45.0  # sessionActiveTimeout
DISCO_PING_INTERVAL = 5.0  # discoPingInterval
CALL_ME_MAYBE_INTERVAL = 5.0
FIRST_CONTACT_PROBE = 0.5
FIRST_CONTACT_WINDOW = 10.0
# Addresses learned from pings and CallMeMaybe, per peer. tailscaled prunes its
# candidate set past 100 (endpoint.go addCandidateEndpoint); a ping replayed from
# many forged sources must not grow it further, so past the cap the oldest goes.
MAX_LEARNED = 64


@attrs.frozen
class PingAction:
    """Send a disco Ping to `addr` over UDP (or over DERP when addr is None)."""

    node_key: bytes
    txid: bytes
    addr: Addr | None
    derp_region: int = 0


@attrs.frozen
class CallMeMaybeAction:
    node_key: bytes
    derp_region: int


Action = PingAction | CallMeMaybeAction


@attrs.define
class _PendingPing:
    addr: Addr | None
    sent_at: float


@attrs.define
class PeerPath:
    node_key: bytes
    disco_key: bytes | None = None
    home_derp: int = 0
    endpoints: set[Addr] = attrs.field(factory=set)  # from the netmap
    learned: dict[Addr, float] = attrs.field(factory=dict)  # from pings/CallMeMaybe, with time
    last_ping_rx: dict[Addr, bytes] = attrs.field(factory=dict)  # the TxID last pinged from each address
    best_addr: Addr | None = None
    best_latency: float = 0.0
    trust_until: float = 0.0
    last_ping: dict[Addr, float] = attrs.field(factory=dict)
    pending: dict[bytes, _PendingPing] = attrs.field(factory=dict)
    last_active: float = -1e9
    last_call_me_maybe: float = -1e9
    last_derp_region: int = 0  # the region the peer last reached us through
    pongs: int = 0
    heard: bool = False  # an authentic disco message came from it: it knows our keys
    first_active: float | None = None  # when we first had traffic for it, while not heard
    last_probe: float = -1e9

    def candidates(self) -> set[Addr]:
        return self.endpoints | set(self.learned)

    def direct(self, now: float) -> bool:
        return self.best_addr is not None and now <= self.trust_until


def _addr_score(addr: Addr) -> int:
    """Prefer loopback, then private, then public (endpoint.go betterAddr)."""
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return 0
    if ip.is_loopback:
        return 50
    if ip.is_private:
        return 20
    return 0


@attrs.define
class PathChooser:
    peers: dict[bytes, PeerPath] = attrs.field(factory=dict)
    txid_source: object = None  # tests may inject a deterministic callable
    wake: bool = False  # poll() is due now, not at the next deadline (the driver clears it)

    def _txid(self) -> bytes:
        if callable(self.txid_source):
            return bytes(self.txid_source())
        return os.urandom(12)

    # -- netmap
    def upsert_peer(self, node_key: bytes, disco_key: bytes | None, home_derp: int,
                    endpoints: Iterable[Addr]) -> PeerPath:
        peer = self.peers.get(node_key)
        if peer is None:
            peer = self.peers[node_key] = PeerPath(node_key)
        if disco_key != peer.disco_key:
            # A new disco key means the peer restarted: what we proved is stale.
            peer.best_addr, peer.trust_until, peer.pending = None, 0.0, {}
            peer.disco_key = disco_key
            peer.heard, peer.first_active = False, None
            self.wake = True
        peer.home_derp = home_derp
        endpoints = set(endpoints)
        if endpoints != peer.endpoints:
            peer.endpoints = endpoints
            self.wake = True  # new candidates: ping them now if the peer is active
        return peer

    def remove_peer(self, node_key: bytes) -> None:
        self.peers.pop(node_key, None)

    # -- sending
    def paths_for_send(self, node_key: bytes, now: float) -> tuple[Addr | None, int]:
        """Where a packet to this peer goes: (udp address or None, DERP region or 0)."""
        peer = self.peers.get(node_key)
        if peer is None:
            return None, 0
        if now - peer.last_active > SESSION_ACTIVE_TIMEOUT:
            self.wake = True  # traffic to an idle peer: its pings are due again
        peer.last_active = now
        if not peer.heard and peer.first_active is None:
            peer.first_active = now
            self.wake = True  # the driver polls at once: first-contact probes start now
        if peer.direct(now):
            return peer.best_addr, 0
        region = peer.home_derp or peer.last_derp_region
        return peer.best_addr, region

    # -- what we saw
    def note_derp_region(self, node_key: bytes, region: int) -> None:
        peer = self.peers.get(node_key)
        if peer is not None:
            peer.last_derp_region = region

    def on_heard(self, node_key: bytes) -> bool:
        """An authentic disco message from the peer. True the first time: it knows us now,
        so candidates are pinged and CallMeMaybe sent at the next poll, not in 5 s."""
        peer = self.peers.get(node_key)
        if peer is None or peer.heard:
            return False
        peer.heard, peer.first_active = True, None
        peer.last_ping.clear()
        peer.last_call_me_maybe = -1e9
        return True

    def on_ping(self, node_key: bytes, src: Addr, txid: bytes, now: float) -> bool:
        """A disco Ping from the peer over UDP: its source becomes a candidate.
        True when this address sent this TxID last time too (a duplicate or a replay,
        which the driver does not answer again)."""
        peer = self.peers.get(node_key)
        if peer is None:
            return False
        if peer.last_ping_rx.get(src) == txid:
            return True
        peer.last_ping_rx[src] = txid
        peer.learned[src] = now
        if len(peer.learned) > MAX_LEARNED:
            oldest = min(peer.learned, key=peer.learned.__getitem__)
            del peer.learned[oldest]
        if len(peer.last_ping_rx) > MAX_LEARNED:
            for addr in [a for a in peer.last_ping_rx if a not in peer.learned]:
                del peer.last_ping_rx[addr]
        return False

    def on_call_me_maybe(self, node_key: bytes, endpoints: Iterable[Addr], now: float) -> list[Action]:
        """CallMeMaybe replaces older learned addresses and is answered with pings."""
        peer = self.peers.get(node_key)
        if peer is None:
            return []
        peer.learned = {addr: now for addr in endpoints}
        actions: list[Action] = []
        for addr in peer.learned:
            actions.append(self._ping(peer, addr, now))
        return actions

    def expect_pong(self, node_key: bytes, txid: bytes, addr: Addr, now: float) -> None:
        """The driver sent a ping of its own (a user's `ping`) to `addr`: its pong may
        prove the path like one of ours. Forgotten after PING_TIMEOUT, as ours are."""
        peer = self.peers.get(node_key)
        if peer is not None:
            peer.pending[txid] = _PendingPing(addr, now)

    def on_pong(self, node_key: bytes, txid: bytes, src: Addr | None, now: float) -> bool:
        """A Pong to one of our pings. Returns True when it proved a UDP path."""
        peer = self.peers.get(node_key)
        if peer is None:
            return False
        pending = peer.pending.pop(txid, None)
        if pending is None or pending.addr is None:
            return False
        latency = now - pending.sent_at
        if latency > PING_TIMEOUT:
            return False
        peer.pongs += 1
        addr = pending.addr
        better = (
            peer.best_addr is None
            or not peer.direct(now)
            or addr == peer.best_addr
            or (_addr_score(addr), -latency) > (_addr_score(peer.best_addr), -peer.best_latency)
        )
        if better:
            peer.best_addr, peer.best_latency = addr, latency
        if addr == peer.best_addr:
            peer.trust_until = now + TRUST_UDP_ADDR
        return True

    # -- timers
    def _ping(self, peer: PeerPath, addr: Addr, now: float) -> PingAction:
        txid = self._txid()
        peer.pending[txid] = _PendingPing(addr, now)
        peer.last_ping[addr] = now
        return PingAction(peer.node_key, txid, addr)

    def poll(self, now: float, have_endpoints: bool = True) -> list[Action]:
        """Disco work due at `now`: pings to candidates and CallMeMaybe over DERP."""
        actions: list[Action] = []
        for peer in self.peers.values():
            if peer.disco_key is None:
                continue
            for txid, pending in list(peer.pending.items()):
                if now - pending.sent_at > PING_TIMEOUT:
                    del peer.pending[txid]
            for addr, seen in list(peer.learned.items()):
                if now - seen > 2 * SESSION_ACTIVE_TIMEOUT:
                    del peer.learned[addr]
                    peer.last_ping_rx.pop(addr, None)
            active = now - peer.last_active <= SESSION_ACTIVE_TIMEOUT
            if not active:
                continue
            region = peer.home_derp or peer.last_derp_region
            if self._probing(peer, now) and region and now - peer.last_probe >= FIRST_CONTACT_PROBE:
                peer.last_probe = now
                txid = self._txid()
                peer.pending[txid] = _PendingPing(None, now)
                actions.append(PingAction(peer.node_key, txid, None, region))
            if peer.direct(now):
                assert peer.best_addr is not None
                if now - peer.last_ping.get(peer.best_addr, -1e9) >= HEARTBEAT_INTERVAL:
                    actions.append(self._ping(peer, peer.best_addr, now))
                continue
            for addr in sorted(peer.candidates()):
                if now - peer.last_ping.get(addr, -1e9) >= DISCO_PING_INTERVAL:
                    actions.append(self._ping(peer, addr, now))
            if (have_endpoints and region
                    and now - peer.last_call_me_maybe >= CALL_ME_MAYBE_INTERVAL):
                peer.last_call_me_maybe = now
                actions.append(CallMeMaybeAction(peer.node_key, region))
        return actions

    @staticmethod
    def _probing(peer: PeerPath, now: float) -> bool:
        return (not peer.heard and peer.disco_key is not None and peer.first_active is not None
                and now - peer.first_active <= FIRST_CONTACT_WINDOW)

    def next_deadline(self, now: float, have_endpoints: bool = True) -> float:
        """When `poll` next has work: the earliest probe, heartbeat, ping or CallMeMaybe
        due to a peer while it is still active (math.inf when none is). Whatever makes
        work due sooner (traffic to an idle peer, new endpoints or disco key from the
        netmap, a first authentic disco message) sets `wake`, and the driver polls at once.
        (The expiry of pending pings and learned addresses is housekeeping: it waits
        for the next poll.)"""
        best = math.inf
        for peer in self.peers.values():
            if peer.disco_key is None:
                continue
            idle_at = peer.last_active + SESSION_ACTIVE_TIMEOUT
            if now > idle_at:
                continue
            region = peer.home_derp or peer.last_derp_region
            due: list[float] = []
            if region and self._probing(peer, now):
                due.append(peer.last_probe + FIRST_CONTACT_PROBE)
            if peer.direct(now):
                assert peer.best_addr is not None
                due.append(peer.last_ping.get(peer.best_addr, -1e9) + HEARTBEAT_INTERVAL)
                due.append(math.nextafter(peer.trust_until, math.inf))  # then candidates again
            else:
                due += [peer.last_ping.get(addr, -1e9) + DISCO_PING_INTERVAL for addr in peer.candidates()]
                if have_endpoints and region:
                    due.append(peer.last_call_me_maybe + CALL_ME_MAYBE_INTERVAL)
            for t in due:
                if t <= idle_at and t < best:
                    best = t
        return best
