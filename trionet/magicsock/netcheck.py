"""netcheck: how fast each DERP region answers, and which one is home. Sans-IO.

tailscaled's net/netcheck (v1.102.5) in the parts a node needs, with time
passed in and nothing sent or awaited here; magicsock's driver sends the STUN
requests this hands out, feeds back the replies, runs the HTTPS probes it
asks for, and acts on the report.

* A **full** report (the first, then every 5 minutes) STUNs every region that
  may be measured: 3 tries at 0/100/200 ms, one node after another
  (makeProbePlanInitial). An **incremental** one STUNs the 3 regions fastest
  in the last report plus the home region: 4 tries for home, 2 for the two
  fastest, 1 for the rest, spaced by 1.2 x the region's last latency (200 ms
  when it has none: Go's cmp.Or, not a max), +50 ms a try from the third
  (makeProbePlan). ``NoMeasureNoHome`` regions are
  never probed; ``Avoid`` ones only while they are home (sortRegions).
* A region's set of tries stops at its first reply; its latency is the fastest
  reply. Once 3 regions answered, the rest get as long as the slowest of those
  took (twice that in a full report). STUN gives up after 3 s
  (addNodeLatency, GetReport).
* Only when **no STUN reply came at all** (UDP blocked) are regions measured
  over HTTPS instead: the time of one ``GET /derp/latency-check`` on a fresh
  TLS connection (measureHTTPSLatency), within the report's 5 s.
* The home choice (addReportHistoryAndSetPreferredDERP): the region of this
  report with the lowest latency seen over the last 5 min 5 s, scaled by the
  map's ``HomeParams.RegionScore``; but the old home stays while it is still
  reachable (answered this report, or a DERP frame came from it within 8 s or
  since the report began) and the move would gain less than 10 ms or less
  than a third. With no latency at all, the old home stays while its link was
  heard within 2 x the DERP keepalive.
* magicsock's part (maybeSetNearestDERP, pickDERPFallback): without a control
  connection the home does not move (peers could not learn of it) unless
  there is none; with no choice from the report, keep the current home, or
  pick one at random.

Beyond tailscaled: a region whose DERP link has been down for longer than
``LINK_DOWN_GRACE`` is not kept or chosen as home even while STUN to it
answers (tailscaled stays on a home whose TCP port is blocked and UDP is not).
With a single region to choose from, no HTTPS probe is made: it cannot change
the choice.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from trionet import proto

__all__ = [
    "ACTIVE_RETRANSMIT", "ENOUGH_REGIONS", "FULL_REPORT_INTERVAL", "HISTORY_MAX_AGE", "INITIAL_RETRANSMIT",
    "LINK_DOWN_GRACE", "NUM_INCREMENTAL_REGIONS", "PREFERRED_DERP_ABSOLUTE_DIFF", "PREFERRED_DERP_FRAME_TIME",
    "PREFERRED_DERP_KEEPALIVE_TIMEOUT", "REPORT_TIMEOUT", "RESTUN_MAX", "RESTUN_MIN", "SESSION_ACTIVE_TIMEOUT",
    "STUN_PROBE_TIMEOUT", "Netcheck", "Probe", "Report", "ReportRun", "StunSend", "https_candidates",
    "make_probe_plan", "make_probe_plan_initial", "pick_home", "region_has_derp_node", "restun_delay",
    "stun_address",
]

REPORT_TIMEOUT = 5.0  # the whole report (ReportTimeout)
STUN_PROBE_TIMEOUT = 3.0  # STUN with no reply before trying HTTPS (stunProbeTimeout)
INITIAL_RETRANSMIT = 0.100  # tries of a full report (defaultInitialRetransmitTime)
ACTIVE_RETRANSMIT = 0.200  # tries of an incremental one with no latency known (defaultActiveRetransmitTime)
NUM_INCREMENTAL_REGIONS = 3
ENOUGH_REGIONS = 3  # after this many regions answered, stop waiting for the rest soon
FULL_REPORT_INTERVAL = 300.0
HISTORY_MAX_AGE = FULL_REPORT_INTERVAL + REPORT_TIMEOUT  # at least one full report is kept
PREFERRED_DERP_ABSOLUTE_DIFF = 0.010
PREFERRED_DERP_FRAME_TIME = 8.0  # a DERP frame this recent: the region is there, without STUN
DERP_KEEPALIVE = 60.0  # derp.KeepAlive
PREFERRED_DERP_KEEPALIVE_TIMEOUT = 2 * DERP_KEEPALIVE
LINK_DOWN_GRACE = PREFERRED_DERP_KEEPALIVE_TIMEOUT
RESTUN_MIN, RESTUN_MAX = 20.0, 26.0  # periodic re-STUN while active: just under common 30 s NAT timeouts
SESSION_ACTIVE_TIMEOUT = 45.0  # idle this long: periodic re-STUN stops (sessionActiveTimeout)
DEFAULT_STUN_PORT = 3478

Addr = tuple[str, int]


@dataclass(frozen=True)
class Probe:
    """One planned STUN request: to `node` of `region` over IPv`family`, `delay` s into the report."""

    delay: float
    node: str
    region: int
    family: int


@dataclass(frozen=True)
class StunSend:
    """A STUN binding request to send now: `txid` to `addr`."""

    txid: bytes
    addr: Addr
    region: int
    node: str


@dataclass
class Report:
    """What one netcheck found. Latencies in seconds."""

    now: float
    full: bool
    udp: bool = False
    ipv4: bool = False
    ipv6: bool = False
    region_latency: dict[int, float] = field(default_factory=dict)
    region_v4_latency: dict[int, float] = field(default_factory=dict)
    region_v6_latency: dict[int, float] = field(default_factory=dict)
    https_regions: set[int] = field(default_factory=set)  # measured over HTTPS, not STUN
    global_v4: Addr | None = None  # our address as the first IPv4 STUN reply saw it
    global_v6: Addr | None = None
    mapping_varies_by_dest_ip: bool | None = None
    preferred_derp: int = 0


def _regions(derp_map: proto.DERPMap) -> list[proto.DERPRegion]:
    return [r for _, r in sorted((derp_map.Regions or {}).items()) if r is not None]


def _is_ip(text: str | None, family: int) -> bool:
    try:
        return ipaddress.ip_address(text or "").version == family
    except ValueError:
        return False


def _is_test_node(node: proto.DERPNode) -> bool:
    return bool(node.STUNTestIP) or node.IPv4 == "127.0.0.1"


def _node_might(node: proto.DERPNode, family: int) -> bool:
    """Whether the node may answer over IPv`family`, from its config alone (nodeMight4/6)."""
    value = node.IPv4 if family == 4 else node.IPv6
    return not value or _is_ip(value, family)


def region_has_derp_node(region: proto.DERPRegion) -> bool:
    return any(not n.STUNOnly for n in region.Nodes or ())


def stun_address(node: proto.DERPNode, family: int, resolved: Mapping[str, str] | None = None) -> Addr | None:
    """Where to send STUN for `node` over IPv`family` (nodeAddrPort); None when nowhere.
    A node without an address of that family is looked up by HostName in `resolved`."""
    port = node.STUNPort
    if port < 0 or port > 0xFFFF:
        return None
    port = port or DEFAULT_STUN_PORT
    if node.STUNTestIP:
        return (node.STUNTestIP, port) if _is_ip(node.STUNTestIP, family) else None
    value = node.IPv4 if family == 4 else node.IPv6
    if value:
        return (str(ipaddress.ip_address(value)), port) if _is_ip(value, family) else None
    ip = (resolved or {}).get(node.HostName)
    return (ip, port) if ip and _is_ip(ip, family) else None


def make_probe_plan_initial(derp_map: proto.DERPMap, have_v4: bool, have_v6: bool) -> dict[str, list[Probe]]:
    """A full report's plan: every measurable region, 3 tries at 0/100/200 ms."""
    plan: dict[str, list[Probe]] = {}
    for region in _regions(derp_map):
        nodes = region.Nodes or []
        if region.NoMeasureNoHome or not nodes:
            continue
        for family in (4, 6):
            probes = []
            have = have_v4 if family == 4 else have_v6
            for attempt in range(3):
                node = nodes[attempt % len(nodes)]
                disabled = (node.IPv4 if family == 4 else node.IPv6) == "none"
                if not disabled and ((have and _node_might(node, family)) or _is_test_node(node)):
                    probes.append(Probe(attempt * INITIAL_RETRANSMIT, node.Name, region.RegionID, family))
            if probes:
                plan[f"region-{region.RegionID}-v{family}"] = probes
    return plan


def _sort_regions(derp_map: proto.DERPMap, last: Report, home: int) -> list[proto.DERPRegion]:
    """Measurable regions, fastest in `last` first, those it did not measure last."""
    regions = [r for r in _regions(derp_map)
               if not r.NoMeasureNoHome and not (r.Avoid and r.RegionID != home)]
    known = [r for r in regions if last.region_latency.get(r.RegionID)]
    unknown = [r for r in regions if not last.region_latency.get(r.RegionID)]
    known.sort(key=lambda r: last.region_latency[r.RegionID])
    return known + unknown


def make_probe_plan(derp_map: proto.DERPMap, have_v4: bool, have_v6: bool, last: Report | None,
                    home: int) -> dict[str, list[Probe]]:
    """An incremental report's plan: the 3 fastest regions of `last` and the home region."""
    if last is None or not last.region_latency:
        return make_probe_plan_initial(derp_map, have_v4, have_v6)
    plan: dict[str, list[Probe]] = {}
    had4 = bool(last.region_v4_latency)
    had6 = bool(last.region_v6_latency)
    had_both = have_v6 and had4 and had6
    plan_has_home = home == 0
    for index, region in enumerate(_sort_regions(derp_map, last, home)):
        is_home = region.RegionID == home
        if index >= NUM_INCREMENTAL_REGIONS:
            if plan_has_home:
                break
            if not is_home:
                continue
        do4, do6 = have_v4, have_v6
        fastest_two = index < 2
        tries = 1
        if fastest_two or is_home:
            tries = 2
        elif had_both:  # dual stack: the slower regions alternate families
            do4, do6 = index % 2 == 0, index % 2 == 1
        if not is_home and not fastest_two and not had6:
            do6 = False
        if is_home:  # try hard to keep a home that is still there
            tries = 4
            plan_has_home = True
        nodes = region.Nodes or []
        probes: dict[int, list[Probe]] = {4: [], 6: []}
        for attempt in range(tries):
            if not nodes:
                continue
            if attempt and not had6:
                do6 = False
            node = nodes[attempt % len(nodes)]
            previous = last.region_latency.get(region.RegionID, 0.0) * 1.2 or ACTIVE_RETRANSMIT
            delay = attempt * previous
            if attempt > 1:
                delay += attempt * 0.050
            if node.IPv4 != "none" and (do4 or _is_test_node(node)):
                probes[4].append(Probe(delay, node.Name, region.RegionID, 4))
            if node.IPv6 != "none" and (do6 or _is_test_node(node)):
                probes[6].append(Probe(delay, node.Name, region.RegionID, 6))
        for family, found in probes.items():
            if found:
                plan[f"region-{region.RegionID}-v{family}"] = found
    return plan


def https_candidates(derp_map: proto.DERPMap, measured: Iterable[int]) -> list[int]:
    """Regions to time over HTTPS when no STUN reply came (GetReport): those not measured
    that have a DERP node and are neither Avoid nor NoMeasureNoHome."""
    done = set(measured)
    return [r.RegionID for r in _regions(derp_map)
            if r.RegionID not in done and region_has_derp_node(r) and not r.Avoid and not r.NoMeasureNoHome]


def restun_delay(rng: random.Random) -> float:
    return rng.uniform(RESTUN_MIN, RESTUN_MAX)


class ReportRun:
    """One report being gathered: hands out STUN requests when due, takes replies."""

    def __init__(self, derp_map: proto.DERPMap, start: float, full: bool, plan: dict[str, list[Probe]],
                 resolved: Mapping[str, str] | None = None,
                 new_txid: Callable[[], bytes] | None = None) -> None:
        self.derp_map = derp_map
        self.start = start
        self.full = full
        self.plan = plan
        self.report = Report(now=start, full=full)
        self._nodes = {n.Name: n for r in _regions(derp_map) for n in r.Nodes or ()}
        self._resolved = dict(resolved or {})
        self._new_txid = new_txid or (lambda: os.urandom(12))
        self._pending: list[tuple[float, str, Probe]] = sorted(
            ((start + p.delay, key, p) for key, probes in plan.items() for p in probes),
            key=lambda item: item[0])
        self._done_sets: set[str] = set()
        self._in_flight: dict[bytes, tuple[str, Probe, float]] = {}
        self._stop_at: float | None = None  # enough regions answered: wait no longer than this
        self.sent = 0
        self.no_address: list[str] = []  # nodes a probe could not be sent to

    # ---------------------------------------------------------------- STUN
    def _would_help(self, probe: Probe) -> bool:
        """probeWouldHelp: a region not yet measured, a first IPv6 result, or (IPv4) a
        second result that tells whether our mapping varies by destination."""
        r = self.report
        if probe.region not in r.region_latency:
            return True
        if probe.family == 6 and not r.region_v6_latency:
            return True
        return probe.family == 4 and r.mapping_varies_by_dest_ip is None

    def due(self, now: float) -> list[StunSend]:
        """The STUN requests to send at `now` (each counted as sent now)."""
        out: list[StunSend] = []
        while self._pending and self._pending[0][0] <= now:
            _, key, probe = self._pending.pop(0)
            if key in self._done_sets:
                continue
            if not self._would_help(probe):
                self._done_sets.add(key)
                continue
            node = self._nodes.get(probe.node)
            addr = stun_address(node, probe.family, self._resolved) if node is not None else None
            if addr is None:
                self.no_address.append(probe.node)
                continue
            txid = self._new_txid()
            self._in_flight[txid] = (key, probe, now)
            self.sent += 1
            out.append(StunSend(txid, addr, probe.region, probe.node))
        return out

    def receive(self, txid: bytes, mapped: Addr, now: float) -> bool:
        """A STUN reply: False when it answers nothing of this report."""
        flight = self._in_flight.pop(txid, None)
        if flight is None:
            return False
        key, probe, sent_at = flight
        self._done_sets.add(key)  # the rest of this region's tries are not needed
        self._add_latency(probe.region, mapped, max(now - sent_at, 0.0), now)
        return True

    def _add_latency(self, region: int, mapped: Addr | None, latency: float, now: float) -> None:
        r = self.report
        r.udp = True
        _update(r.region_latency, region, latency)
        if len(r.region_latency) == ENOUGH_REGIONS and self._stop_at is None:
            wait = max(r.region_latency.values())
            self._stop_at = now + (wait if not self.full else 2 * wait)
        if mapped is None:
            return
        try:
            version = ipaddress.ip_address(mapped[0]).version
        except ValueError:
            return
        if version == 6:
            _update(r.region_v6_latency, region, latency)
            r.ipv6 = True
            r.global_v6 = mapped
        else:
            _update(r.region_v4_latency, region, latency)
            r.ipv4 = True
            if r.global_v4 is None:
                r.global_v4 = mapped
            elif r.global_v4 != mapped:
                r.mapping_varies_by_dest_ip = True
            elif r.mapping_varies_by_dest_ip is None:
                r.mapping_varies_by_dest_ip = False

    def stun_done(self, now: float) -> bool:
        if now >= self.start + STUN_PROBE_TIMEOUT:
            return True
        if self._stop_at is not None and now >= self._stop_at:
            return True
        return all(key in self._done_sets for key in self.plan)

    def next_deadline(self) -> float:
        """When the STUN phase next has something to do (a try due, or its end)."""
        deadline = self.start + STUN_PROBE_TIMEOUT
        if self._stop_at is not None:
            deadline = min(deadline, self._stop_at)
        for due_at, key, _ in self._pending:
            if key not in self._done_sets:
                deadline = min(deadline, due_at)
                break
        return deadline

    # --------------------------------------------------------------- HTTPS
    def https_regions(self) -> list[int]:
        """After STUN: the regions to time over HTTPS (none when any STUN reply came, or when
        there is only one region to choose from)."""
        if self.report.udp:
            return []
        regions = https_candidates(self.derp_map, self.report.region_latency)
        return regions if len(https_candidates(self.derp_map, ())) > 1 else []

    @property
    def https_deadline(self) -> float:
        return self.start + REPORT_TIMEOUT

    def add_https_latency(self, region: int, latency: float) -> None:
        _update(self.report.region_latency, region, max(latency, 0.0))
        self.report.https_regions.add(region)


def _update(latencies: dict[int, float], region: int, latency: float) -> None:
    if region not in latencies or latency < latencies[region]:
        latencies[region] = latency


class Netcheck:
    """Reports over time: when the next one is full, their history, the preferred region."""

    def __init__(self, new_txid: Callable[[], bytes] | None = None) -> None:
        self.last: Report | None = None
        self.last_full: float | None = None
        self.next_full = False
        self.history: list[Report] = []
        self._new_txid = new_txid
        self.reports = 0

    def make_next_full(self) -> None:
        self.next_full = True

    def begin(self, derp_map: proto.DERPMap, now: float, *, have_v4: bool = True, have_v6: bool = False,
              resolved: Mapping[str, str] | None = None) -> ReportRun:
        last = self.last
        home = last.preferred_derp if last is not None else 0
        full = self.next_full or self.last_full is None or now - self.last_full > FULL_REPORT_INTERVAL
        if full:
            last = None
            self.next_full = False
            self.last_full = now
        plan = make_probe_plan(derp_map, have_v4, have_v6, last, home)
        return ReportRun(derp_map, now, full, plan, resolved, self._new_txid)

    def best_recent_latency(self) -> dict[int, float]:
        best: dict[int, float] = {}
        for report in self.history:
            for region, latency in report.region_latency.items():
                _update(best, region, latency)
        return best

    def finish(self, run: ReportRun, now: float, last_heard: Mapping[int, float] | None = None,
               unusable: Iterable[int] = ()) -> Report:
        """The report, with its preferred region chosen against the history.

        `last_heard`: when a DERP frame last came from each region; `unusable`: regions whose
        DERP link has been down past LINK_DOWN_GRACE (never kept or chosen)."""
        r = run.report
        r.now = now
        heard = last_heard or {}
        banned = set(unusable)
        previous = self.last.preferred_derp if self.last is not None else 0
        self.history.append(r)
        self.history = [h for h in self.history if now - h.now <= HISTORY_MAX_AGE]
        self.last = r
        self.reports += 1
        scores = (run.derp_map.HomeParams.RegionScore or {}) if run.derp_map.HomeParams else {}

        def scaled(region: int, latency: float) -> float:
            score = scores.get(region, 0.0)
            return latency * score if score > 0 else latency

        best_recent = {region: scaled(region, d) for region, d in self.best_recent_latency().items()}
        best_any = 0.0
        old_latency = 0.0
        for region, latency in sorted(r.region_latency.items()):
            if region in banned:
                continue
            if region == previous:
                old_latency = scaled(region, latency)
            best = best_recent[region]
            if r.preferred_derp == 0 or best < best_any:
                best_any = best
                r.preferred_derp = region
        changing = previous != 0 and r.preferred_derp != previous
        prev_heard = heard.get(previous)
        heard_recently = False
        if changing and prev_heard is not None:
            heard_recently = prev_heard > run.start or prev_heard > now - PREFERRED_DERP_FRAME_TIME
        accessible = (old_latency != 0 or heard_recently) and previous not in banned
        if changing and accessible and (old_latency - best_any < PREFERRED_DERP_ABSOLUTE_DIFF
                                        or best_any > old_latency / 3 * 2):
            r.preferred_derp = previous
        if (r.preferred_derp == 0 and previous and previous not in banned and prev_heard is not None
                and prev_heard > now - PREFERRED_DERP_KEEPALIVE_TIMEOUT):
            r.preferred_derp = previous
        return r


def pick_home(preferred: int, current: int, derp_map: proto.DERPMap, *, control_connected: bool,
              rng: random.Random, unusable: Iterable[int] = ()) -> int:
    """magicsock's home (maybeSetNearestDERP + pickDERPFallback): the report's choice; with
    none, the current home, else any region at random. Without control the home stays."""
    if not control_connected and current:
        return current
    regions = [r.RegionID for r in _regions(derp_map)]
    if preferred and preferred in regions:
        return preferred
    banned = set(unusable)
    if current and current in regions and current not in banned:
        return current
    usable = [r for r in regions if r not in banned] or regions
    return rng.choice(usable) if usable else 0
