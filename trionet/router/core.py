"""What a subnet router or exit node forwards, and the bookkeeping of its flows (sans-IO).

``RoutePolicy`` says whether a destination is forwarded at all: only addresses
inside the advertised (and approved) prefixes, and never the host's loopback,
link-local, multicast or tailnet ranges unless a prefix inside them is advertised
by name (a ``/0`` does not name them). ``ForwardTable`` holds every forwarded TCP
connection (dialing, then open) and UDP flow with its counters, enforces the limits
per peer and in total, keeps the ``forwarding`` statistics and a bounded list of the
live flows for ``status``. Time is passed in; nothing here awaits.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
from collections.abc import Iterable
from typing import Any

import attrs

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
ConnKey = tuple[bytes, int, bytes, int]  # (client address, client port, destination, destination port)

#: Never forwarded unless an advertised prefix lies inside them: the host's own
#: loopback and link-local nets (a peer must not reach the router's 127.0.0.1 or a
#: cloud's 169.254.169.254 through a /0), multicast and broadcast, "this network",
#: and the tailnet's own ranges (tailscaled's exit node removes the same from its
#: /0: protocol notes 17.3).
GUARDED = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32", "100.64.0.0/10",
    "::1/128", "::/128", "fe80::/10", "ff00::/8", "fd7a:115c:a1e0::/48"))

#: Forwarded TCP connections, dialing or open, in all (2/3 of it per peer): the netstack's
#: own connection bound (``netstack.stack.MAX_CONNECTIONS``), which they count against too.
#: (tailscaled's 8192, 2/3 per client, bounds SYNs in flight: ``StackCore.max_forward_pending``.)
MAX_TCP = 4096
MAX_UDP = 4096
#: tailscaled answers at most 20 forwarded echo requests at once (netstack.go userPing).
MAX_PINGS = 20
UDP_IDLE = 120.0  # tailscaled: 2 min, reset by any packet either way
UDP_IDLE_DNS = 30.0  # ... 30 s for flows to port 53
STATUS_FLOWS = 50  # flows listed in status; the counts are always whole
ALWAYS_REPORTED = ("tcp_attempts", "tcp_established", "tcp_completed", "tcp_refused", "tcp_unreachable",
                   "tcp_timeout", "tcp_host_error", "dropped_limit", "udp_flows", "icmp_echo_answered",
                   "icmp_echo_failed", "bytes_from_peer", "bytes_to_peer")


class RoutePolicy:
    """Which destinations are forwarded: inside ``prefixes``, and not ``GUARDED``
    unless a prefix inside the guarded range names it."""

    def __init__(self, prefixes: Iterable[IPNet | str] = ()) -> None:
        self.prefixes: tuple[IPNet, ...] = ()
        self._cache: dict[bytes, bool] = {}
        self.set_prefixes(prefixes)

    def set_prefixes(self, prefixes: Iterable[IPNet | str]) -> None:
        self.prefixes = tuple(sorted({ipaddress.ip_network(p, strict=False) for p in prefixes},
                                     key=lambda n: (n.version, n.prefixlen, n.network_address)))
        self._cache = {}

    def wants(self, dst: bytes) -> bool:
        """``dst`` packed (4 or 16 bytes). Answers are cached (bounded) until the
        prefixes change: this runs for each new flow and each unmatched packet."""
        hit = self._cache.get(dst)
        if hit is None:
            hit = self._decide(dst)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[dst] = hit
        return hit

    def _decide(self, dst: bytes) -> bool:
        if len(dst) not in (4, 16):
            return False
        addr = ipaddress.ip_address(dst)
        inside = [n for n in self.prefixes if n.version == addr.version and addr in n]
        if not inside:
            return False
        for guard in GUARDED:
            if guard.version == addr.version and addr in guard:
                return any(n.subnet_of(guard) for n in inside)  # type: ignore[arg-type]
        return True


@attrs.define
class Flow:
    """One forwarded TCP connection or UDP flow."""

    proto: str  # "tcp" or "udp"
    key: ConnKey
    started: float
    last: float  # the last packet either way (UDP's idle timer)
    idle_timeout: float = 0.0
    established: bool = False  # TCP: the host dial succeeded
    #: bytes [from the tailnet client to the host side, back to the client]: a list,
    #: so the relay (``trionet.proxy.server.relay``) counts into it as it copies
    counts: list[int] = attrs.Factory(lambda: [0, 0])

    @property
    def bytes_from_peer(self) -> int:
        return self.counts[0]

    @property
    def bytes_to_peer(self) -> int:
        return self.counts[1]

    def describe(self, now: float) -> dict[str, Any]:
        src, sport, dst, dport = self.key
        return {"proto": self.proto, "peer": f"{_ip(src)}:{sport}", "dst": f"{_ip(dst)}:{dport}",
                "age": round(now - self.started, 1),
                "state": ("open" if self.established else "dialing") if self.proto == "tcp" else "open",
                "bytes_from_peer": self.bytes_from_peer, "bytes_to_peer": self.bytes_to_peer}


def _ip(packed: bytes) -> str:
    a = ipaddress.ip_address(packed)
    return f"[{a}]" if a.version == 6 else str(a)


class ForwardTable:
    """Forwarded flows, their limits and counters."""

    def __init__(self, max_tcp: int = MAX_TCP, max_tcp_per_peer: int | None = None,
                 max_udp: int = MAX_UDP, max_udp_per_peer: int | None = None,
                 max_pings: int = MAX_PINGS) -> None:
        self.max_tcp = max_tcp
        self.max_tcp_per_peer = max_tcp * 2 // 3 if max_tcp_per_peer is None else max_tcp_per_peer
        self.max_udp = max_udp
        self.max_udp_per_peer = max_udp * 2 // 3 if max_udp_per_peer is None else max_udp_per_peer
        self.max_pings = max_pings
        self.tcp: dict[ConnKey, Flow] = {}
        self.udp: dict[ConnKey, Flow] = {}
        self._tcp_per_peer: collections.Counter[bytes] = collections.Counter()
        self._udp_per_peer: collections.Counter[bytes] = collections.Counter()
        self.pings = 0
        self.stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ TCP
    def open_tcp(self, key: ConnKey, now: float) -> Flow | None:
        """A new forwarded connection (its SYN held), or None over a limit (counted)."""
        self.stats["tcp_attempts"] += 1
        if len(self.tcp) >= self.max_tcp or self._tcp_per_peer[key[0]] >= self.max_tcp_per_peer:
            self.stats["dropped_limit"] += 1
            self.stats["tcp_dropped_limit"] += 1
            return None
        flow = Flow("tcp", key, now, now)
        self.tcp[key] = flow
        self._tcp_per_peer[key[0]] += 1
        return flow

    def tcp_established(self, flow: Flow) -> None:
        flow.established = True
        self.stats["tcp_established"] += 1

    def close_tcp(self, flow: Flow, outcome: str) -> None:
        """``outcome``: ``completed``, or why it failed (``refused``, ``unreachable``,
        ``timeout``, ``host_error``, ``client_gone``, ``peer_reset``, ``host_reset``, ``cancelled``)."""
        self._release(flow, self.tcp, self._tcp_per_peer, "tcp_" + outcome)

    # ------------------------------------------------------------------ UDP
    def open_udp(self, key: ConnKey, now: float) -> Flow | None:
        if len(self.udp) >= self.max_udp or self._udp_per_peer[key[0]] >= self.max_udp_per_peer:
            self.stats["dropped_limit"] += 1
            self.stats["udp_dropped_limit"] += 1
            return None
        flow = Flow("udp", key, now, now, idle_timeout=UDP_IDLE_DNS if key[3] == 53 else UDP_IDLE)
        self.udp[key] = flow
        self._udp_per_peer[key[0]] += 1
        self.stats["udp_flows"] += 1
        return flow

    @staticmethod
    def udp_from_peer(flow: Flow, size: int, now: float) -> None:
        flow.last = now
        flow.counts[0] += size

    @staticmethod
    def udp_to_peer(flow: Flow, size: int, now: float) -> None:
        flow.last = now
        flow.counts[1] += size

    @staticmethod
    def idle_deadline(flow: Flow) -> float:
        return flow.last + flow.idle_timeout

    def close_udp(self, flow: Flow, outcome: str) -> None:
        """``outcome``: ``idle`` (timed out) or a host error's kind."""
        self._release(flow, self.udp, self._udp_per_peer, "udp_closed_" + outcome)

    def _release(self, flow: Flow, flows: dict[ConnKey, Flow], per_peer: collections.Counter[bytes],
                 counter: str) -> None:
        """A closed flow leaves its table and its peer's count (once: a flow already
        replaced under its key is not the one there), and its bytes join the totals."""
        if flows.get(flow.key) is flow:
            del flows[flow.key]
            per_peer[flow.key[0]] -= 1
            if not per_peer[flow.key[0]]:
                del per_peer[flow.key[0]]
        self.stats[counter] += 1
        self.stats["bytes_from_peer"] += flow.bytes_from_peer
        self.stats["bytes_to_peer"] += flow.bytes_to_peer

    # ----------------------------------------------------------------- ICMP
    def start_ping(self) -> bool:
        if self.pings >= self.max_pings:
            self.stats["icmp_echo_dropped_limit"] += 1
            self.stats["dropped_limit"] += 1
            return False
        self.pings += 1
        return True

    def end_ping(self, answered: bool) -> None:
        self.pings -= 1
        self.stats["icmp_echo_answered" if answered else "icmp_echo_failed"] += 1

    # --------------------------------------------------------------- report
    def statistics(self) -> dict[str, int]:
        """Counters (bytes of ended flows), then gauges of what is live now. The main
        counters are always there, 0 until something happens."""
        out = dict.fromkeys(ALWAYS_REPORTED, 0)
        out.update(self.stats)
        out["tcp_dialing"] = sum(1 for f in self.tcp.values() if not f.established)
        out["tcp_open"] = len(self.tcp) - out["tcp_dialing"]
        out["udp_open"] = len(self.udp)
        out["pings_running"] = self.pings
        live = [*self.tcp.values(), *self.udp.values()]
        out["live_bytes_from_peer"] = sum(f.bytes_from_peer for f in live)
        out["live_bytes_to_peer"] = sum(f.bytes_to_peer for f in live)
        return out

    def status(self, now: float, limit: int = STATUS_FLOWS) -> dict[str, Any]:
        """Live flow counts and the ``limit`` oldest flows."""
        flows = heapq.nsmallest(limit, [*self.tcp.values(), *self.udp.values()], key=lambda f: f.started)
        return {"tcp": len(self.tcp), "udp": len(self.udp), "pings": self.pings,
                "flows": [f.describe(now) for f in flows]}


__all__ = ["GUARDED", "ConnKey", "Flow", "ForwardTable", "RoutePolicy"]
