"""netcheck's core under simulated time: probe plans, latency bookkeeping, the home
choice with tailscaled's stickiness, the HTTPS fallback decision, and moving home."""

from __future__ import annotations

import itertools
import random

import pytest

from trionet import proto
from trionet.magicsock import netcheck as nc


def region(rid: int, *, nodes: int = 1, avoid: bool = False, no_home: bool = False,
           stun_port: int = 0, ipv4: str | None = None, stun_only: bool = False) -> proto.DERPRegion:
    return proto.DERPRegion(
        RegionID=rid, RegionCode=f"r{rid}", Avoid=avoid, NoMeasureNoHome=no_home,
        Nodes=[proto.DERPNode(Name=f"{rid}{chr(97 + i)}", RegionID=rid, HostName=f"derp{rid}.test",
                              IPv4=ipv4 if ipv4 is not None else f"10.0.{rid % 256}.{i + 1}",
                              STUNPort=stun_port, STUNOnly=stun_only)
               for i in range(nodes)])


def dmap(*regions: proto.DERPRegion, scores: dict[int, float] | None = None) -> proto.DERPMap:
    return proto.DERPMap(Regions={r.RegionID: r for r in regions},
                         HomeParams=proto.DERPHomeParams(RegionScore=scores) if scores else None)


def counter_txid() -> nc.Netcheck:
    counter = itertools.count(1)
    return nc.Netcheck(new_txid=lambda: next(counter).to_bytes(12, "big"))


def run_report(check: nc.Netcheck, derp_map: proto.DERPMap, start: float, latency: dict[int, float],
               mapped: tuple[str, int] = ("198.51.100.7", 41641), *,
               heard: dict[int, float] | None = None, unusable: tuple[int, ...] = ()) -> nc.Report:
    """Drive one report as magicsock does: send what is due, answer the regions in
    `latency` after that long, stop when the run says STUN is over."""
    run = check.begin(derp_map, start)
    answers: list[tuple[float, bytes]] = []  # (due, txid)
    now = start
    while not run.stun_done(now):
        for send in run.due(now):
            if send.region in latency:
                answers.append((now + latency[send.region], send.txid))
        nxt = min([run.next_deadline(), *(at for at, _ in answers)])
        now = max(nxt, now)
        for at, txid in sorted(answers):
            if at <= now:
                run.receive(txid, mapped, at)
        answers = [(at, t) for at, t in answers if at > now]
    return check.finish(run, now, heard, unusable)


# ----------------------------------------------------------------------- plans


def test_full_plan_probes_every_measurable_region_three_times_100ms_apart() -> None:
    derp_map = dmap(region(1, nodes=2), region(2), region(3, no_home=True), region(4, avoid=True))
    plan = nc.make_probe_plan_initial(derp_map, have_v4=True, have_v6=False)
    assert set(plan) == {"region-1-v4", "region-2-v4", "region-4-v4"}  # Avoid is still measured in full
    assert [(p.delay, p.node) for p in plan["region-1-v4"]] == [(0.0, "1a"), (0.1, "1b"), (0.2, "1a")]
    assert [p.delay for p in plan["region-2-v4"]] == [0.0, 0.1, 0.2]


def test_full_plan_skips_disabled_families_and_unmeasurable_regions() -> None:
    derp_map = dmap(region(1, ipv4="none"), region(2), proto.DERPRegion(RegionID=5, Nodes=[]))
    plan = nc.make_probe_plan_initial(derp_map, have_v4=True, have_v6=False)
    assert set(plan) == {"region-2-v4"}
    assert nc.make_probe_plan_initial(derp_map, have_v4=False, have_v6=False) == {}


def test_incremental_plan_is_the_three_fastest_plus_home_with_tailscaleds_tries_and_spacing() -> None:
    derp_map = dmap(*(region(i) for i in range(1, 7)))
    last = nc.Report(now=0, full=True,
                     region_latency={1: 0.010, 2: 0.020, 3: 0.300, 4: 0.040, 5: 0.050, 6: 0.060},
                     region_v4_latency={1: 0.010})
    plan = nc.make_probe_plan(derp_map, True, False, last, home=6)
    assert set(plan) == {"region-1-v4", "region-2-v4", "region-4-v4", "region-6-v4"}
    assert len(plan["region-1-v4"]) == len(plan["region-2-v4"]) == 2  # the fastest two
    assert len(plan["region-4-v4"]) == 1
    home = plan["region-6-v4"]
    assert len(home) == 4  # try hard to keep a home that is still there
    # try x (1.2 x last latency, or 200 ms without one: Go's cmp.Or, not a max),
    # plus try x 50 ms from the third try
    assert [round(p.delay, 3) for p in home] == [0.0, 0.072, 0.244, 0.366]
    assert [round(p.delay, 3) for p in plan["region-1-v4"]] == [0.0, 0.012]
    unmeasured_home = nc.make_probe_plan(derp_map, True, False, last, home=7)  # not in the map
    assert "region-7-v4" not in unmeasured_home
    last.region_latency.pop(6)
    assert [round(p.delay, 3) for p in nc.make_probe_plan(derp_map, True, False, last, home=6)["region-6-v4"]] \
        == [0.0, 0.2, 0.5, 0.75]


def test_incremental_plan_spaces_tries_by_1_2_times_the_last_latency() -> None:
    derp_map = dmap(region(1), region(2))
    last = nc.Report(now=0, full=True, region_latency={1: 0.5, 2: 0.01}, region_v4_latency={1: 0.5})
    plan = nc.make_probe_plan(derp_map, True, False, last, home=1)
    assert [round(p.delay, 3) for p in plan["region-1-v4"]] == [0.0, 0.6, 1.3, 1.95]


def test_incremental_plan_probes_avoid_only_as_home_and_never_no_measure_no_home() -> None:
    derp_map = dmap(region(1, avoid=True), region(2), region(3, no_home=True))
    last = nc.Report(now=0, full=True, region_latency={1: 0.01, 2: 0.02}, region_v4_latency={2: 0.02})
    assert set(nc.make_probe_plan(derp_map, True, False, last, home=2)) == {"region-2-v4"}
    assert set(nc.make_probe_plan(derp_map, True, False, last, home=1)) == {"region-1-v4", "region-2-v4"}


def test_the_first_report_and_one_five_minutes_later_are_full() -> None:
    derp_map = dmap(*(region(i) for i in range(1, 6)))
    check = counter_txid()
    first = run_report(check, derp_map, 0.0, {i: 0.01 * i for i in range(1, 6)})
    assert first.full
    second = check.begin(derp_map, 25.0)
    assert not second.full and len(second.plan) == 3  # 3 fastest, home (1) among them
    check.finish(second, 28.0)
    assert check.begin(derp_map, 301.0).full
    check.make_next_full()
    assert check.begin(derp_map, 310.0).full


# ------------------------------------------------------------------ latencies


def test_a_region_stops_at_its_first_reply_and_its_latency_is_the_reply_time() -> None:
    check = counter_txid()
    run = check.begin(dmap(region(1), region(2)), 100.0)
    sends = run.due(100.0)
    assert {s.region for s in sends} == {1, 2} and run.sent == 2
    first = next(s for s in sends if s.region == 1)
    assert run.receive(first.txid, ("198.51.100.7", 41641), 100.030)
    assert not run.receive(first.txid, ("198.51.100.7", 41641), 100.031)  # a duplicate answers nothing
    assert not run.receive(b"x" * 12, ("198.51.100.7", 41641), 100.031)  # nor a stranger's
    # region 1's remaining tries are not sent; region 2's are (no reply yet)
    later = run.due(100.1) + run.due(100.2)
    assert {s.region for s in later} == {2}
    assert run.report.region_latency == {1: pytest.approx(0.030)}
    assert run.report.global_v4 == ("198.51.100.7", 41641)


def test_stun_gives_up_after_3_s_when_a_region_stays_silent() -> None:
    check = counter_txid()
    run = check.begin(dmap(region(1), region(2)), 0.0)
    for send in run.due(0.0):
        if send.region == 1:
            run.receive(send.txid, ("198.51.100.7", 1), 0.01)
    run.due(0.1)
    run.due(0.2)
    assert not run.stun_done(2.9)
    assert run.next_deadline() == pytest.approx(nc.STUN_PROBE_TIMEOUT)
    assert run.stun_done(3.0)


def test_after_three_regions_answer_the_rest_get_as_long_as_the_slowest_took_doubled_in_full() -> None:
    check = counter_txid()
    run = check.begin(dmap(*(region(i) for i in range(1, 6))), 0.0)
    sends = {s.region: s for s in run.due(0.0)}
    for rid, at in ((1, 0.01), (2, 0.02), (3, 0.05)):
        run.receive(sends[rid].txid, ("198.51.100.7", 1), at)
    assert run.next_deadline() == pytest.approx(0.1)  # the next tries of 4 and 5 come first
    run.due(0.1)
    run.due(0.2)
    assert run.next_deadline() == pytest.approx(0.05 + 2 * 0.05)
    assert not run.stun_done(0.14) and run.stun_done(0.16)


def test_a_second_ipv4_reply_tells_whether_the_mapping_varies_by_destination() -> None:
    check = counter_txid()
    run = check.begin(dmap(region(1), region(2), region(3)), 0.0)
    sends = {s.region: s for s in run.due(0.0)}
    run.receive(sends[1].txid, ("198.51.100.7", 1000), 0.01)
    run.receive(sends[2].txid, ("198.51.100.7", 2000), 0.02)
    assert run.report.mapping_varies_by_dest_ip is True
    assert run.report.global_v4 == ("198.51.100.7", 1000)  # the first reply's


def test_a_node_without_a_stun_address_is_not_probed() -> None:
    check = counter_txid()
    derp_map = dmap(region(1, stun_port=-1), region(2, ipv4=""))
    run = check.begin(derp_map, 0.0)
    assert run.due(0.0) == []
    assert set(run.no_address) == {"1a", "2a"}
    resolved = check.begin(derp_map, 0.0, resolved={"derp2.test": "192.0.2.2"}).due(0.0)
    assert [(s.region, s.addr) for s in resolved] == [(2, ("192.0.2.2", 3478))]


# ---------------------------------------------------------------- HTTPS fallback


def test_https_is_tried_only_when_no_stun_reply_came_at_all() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2), region(3, avoid=True), region(4, no_home=True),
                    region(5, stun_only=True))
    silent = check.begin(derp_map, 0.0)
    assert silent.https_regions() == [1, 2]  # DERP nodes only, not Avoid, not NoMeasureNoHome
    assert silent.https_deadline == nc.REPORT_TIMEOUT
    answered = check.begin(derp_map, 10.0)
    send = answered.due(10.0)[0]
    answered.receive(send.txid, ("198.51.100.7", 1), 10.01)
    assert answered.https_regions() == []


def test_https_latency_feeds_the_home_choice() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    run = check.begin(derp_map, 0.0)
    run.add_https_latency(2, 0.040)
    run.add_https_latency(1, 0.080)
    report = check.finish(run, 5.0)
    assert report.preferred_derp == 2 and report.https_regions == {1, 2} and not report.udp


def test_no_https_probe_when_there_is_only_one_region_to_choose() -> None:
    run = counter_txid().begin(dmap(region(1), region(2, no_home=True)), 0.0)
    assert run.https_regions() == []


# ---------------------------------------------------------------- home choice


def test_the_fastest_region_becomes_preferred() -> None:
    check = counter_txid()
    report = run_report(check, dmap(region(1), region(2), region(3)), 0.0, {1: 0.050, 2: 0.020, 3: 0.030})
    assert report.preferred_derp == 2
    assert report.region_latency == {1: pytest.approx(0.05), 2: pytest.approx(0.02), 3: pytest.approx(0.03)}


@pytest.mark.parametrize(("old_ms", "new_ms", "moves"), [
    (50, 41, False),  # 9 ms better: under the 10 ms threshold
    (50, 34, False),  # 16 ms better but still more than 2/3 of the old (33.3)
    (50, 33, True),  # 17 ms and under 2/3: move
    (200, 150, False),  # 50 ms better, but 150 > 133
    (200, 130, True),
])
def test_stickiness_keeps_a_reachable_home_unless_the_gain_is_big(old_ms: int, new_ms: int, moves: bool) -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    assert run_report(check, derp_map, 0.0, {1: old_ms / 1000, 2: 0.5}).preferred_derp == 1
    # Past the history window: only the new latencies count.
    report = run_report(check, derp_map, 400.0, {1: old_ms / 1000, 2: new_ms / 1000})
    assert report.preferred_derp == (2 if moves else 1)


def test_the_best_latency_over_five_minutes_counts_not_only_this_reports() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    run_report(check, derp_map, 0.0, {1: 0.010, 2: 0.100})
    # A spike on the home region: its best recent (10 ms) still wins.
    assert run_report(check, derp_map, 25.0, {1: 0.300, 2: 0.100}).preferred_derp == 1
    # Six minutes on, the 10 ms has left the history.
    assert run_report(check, derp_map, 400.0, {1: 0.300, 2: 0.100}).preferred_derp == 2


def test_region_scores_scale_latencies() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2), scores={1: 4.0})
    assert run_report(check, derp_map, 0.0, {1: 0.010, 2: 0.030}).preferred_derp == 2


def test_a_silent_home_is_left_for_the_best_region_that_answers() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    assert run_report(check, derp_map, 0.0, {1: 0.010, 2: 0.050}).preferred_derp == 1
    # Home no longer answers STUN and sent no DERP frame lately: move.
    assert run_report(check, derp_map, 25.0, {2: 0.050}, heard={1: 10.0}).preferred_derp == 2


def test_a_home_heard_over_derp_within_8_s_counts_as_reachable() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    run_report(check, derp_map, 0.0, {1: 0.050, 2: 0.060})
    # No STUN reply from home (the report ends at 28 s), but a frame 4 s before that: the
    # old home stays (tailscaled compares its missing latency as 0: 0 - best < 10 ms).
    assert run_report(check, derp_map, 25.0, {2: 0.040}, heard={1: 24.0}).preferred_derp == 1
    assert run_report(check, derp_map, 50.0, {2: 0.040}, heard={1: 24.0}).preferred_derp == 2


def test_with_no_latency_at_all_the_home_stays_while_its_link_was_heard_within_two_keepalives() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    run_report(check, derp_map, 0.0, {1: 0.010, 2: 0.020})
    assert run_report(check, derp_map, 25.0, {}, heard={1: 20.0}).preferred_derp == 1
    assert run_report(check, derp_map, 200.0, {}, heard={1: 20.0}).preferred_derp == 0


def test_a_region_whose_link_stayed_down_is_not_kept_even_if_stun_answers() -> None:
    check = counter_txid()
    derp_map = dmap(region(1), region(2))
    run_report(check, derp_map, 0.0, {1: 0.010, 2: 0.015})
    assert run_report(check, derp_map, 25.0, {1: 0.010, 2: 0.015}, unusable=(1,)).preferred_derp == 2


# ------------------------------------------------------------- magicsock's pick


def test_pick_home_takes_the_report_then_the_current_home_then_any_region() -> None:
    derp_map = dmap(region(1), region(2), region(3))
    rng = random.Random(7)
    assert nc.pick_home(2, 1, derp_map, control_connected=True, rng=rng) == 2
    assert nc.pick_home(0, 3, derp_map, control_connected=True, rng=rng) == 3  # no data: keep it
    assert nc.pick_home(0, 0, derp_map, control_connected=True, rng=rng) in {1, 2, 3}
    assert nc.pick_home(0, 3, derp_map, control_connected=True, rng=rng, unusable=[3]) in {1, 2}


def test_without_control_the_home_does_not_move_but_a_first_one_is_chosen() -> None:
    derp_map = dmap(region(1), region(2))
    rng = random.Random(1)
    assert nc.pick_home(2, 1, derp_map, control_connected=False, rng=rng) == 1
    assert nc.pick_home(2, 0, derp_map, control_connected=False, rng=rng) == 2


def test_restun_delay_is_between_20_and_26_s() -> None:
    rng = random.Random(3)
    delays = [nc.restun_delay(rng) for _ in range(200)]
    assert min(delays) >= 20.0 and max(delays) <= 26.0 and max(delays) - min(delays) > 4
