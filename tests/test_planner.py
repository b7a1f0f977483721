"""The planner: list scheduling of request groups, and the model-swap rules."""

from __future__ import annotations

import dataclasses

from qlm_plugin.brain.global_queue import ARRIVAL_MEMORY_S, GlobalQueue, LaneRate
from qlm_plugin.brain.planner import GroupStat, Machine, Planner
from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.plan import LoadModel
from qlm_plugin.domain.request import SLO, Request


def machine(
    iid: str,
    serving: str | None,
    busy: float = 0.0,
    seats: int = 4,
    models: tuple[str, ...] = ("a", "b"),
    warm: tuple[str, ...] = (),
) -> Machine:
    loads = {m: (1.0 if m in warm else 30.0) for m in models}
    return Machine(iid, seats, busy, serving, frozenset(warm), loads, frozenset(models))


def group(
    i: int, model: str, seat_s: float, deadline: float, ttft: bool = False, weight: float = 1.0
) -> GroupStat:
    return GroupStat((model, "c", i), model, [f"g{i}-r"], seat_s, deadline, deadline, ttft, weight)


def test_heuristic_balances_load_and_counts_what_it_meets() -> None:
    machines = [machine("i0", "a", busy=0.0), machine("i1", "a", busy=10.0)]
    groups = [group(0, "a", 4.0, 2.0), group(1, "a", 4.0, 12.0)]
    plan = Planner(None, None).heuristic(groups, machines, 0.0)  # type: ignore[arg-type]
    assert plan.solver == "heuristic"
    assert plan.queues == {"i0": ["g0-r", "g1-r"]}, "the busy instance would finish both later"
    assert plan.objective == 2.0
    busy = [machine("i0", "a", busy=0.0), machine("i1", "a", busy=0.0)]
    plan = Planner(None, None).heuristic([group(0, "a", 40.0, 10.0), group(1, "a", 40.0, 10.0)], busy, 0.0)  # type: ignore[arg-type]
    assert plan.queues == {"i0": ["g0-r"], "i1": ["g1-r"]}, "two big groups: one per instance"


def test_a_model_nobody_serves_is_swapped_onto_the_least_needed_instance() -> None:
    machines = [machine("i0", "a"), machine("i1", "b", warm=("c",), models=("a", "b", "c"))]
    machines[0] = machine("i0", "a", models=("a", "b", "c"))
    groups = [group(0, "a", 50.0, 100.0), group(1, "c", 5.0, 100.0)]  # nothing queued for b
    plan = Planner(None, None).heuristic(groups, machines, 0.0)  # type: ignore[arg-type]
    assert LoadModel("i1", "c", "gpu") in plan.actions, "b has no work: its instance takes c"
    assert plan.queues["i1"] == ["g1-r"]


def test_a_busier_model_keeps_its_instance_and_the_swap_is_staged_warm() -> None:
    machines = [machine("i0", "a", models=("a", "c"))]
    groups = [group(0, "a", 500.0, 400.0), group(1, "c", 5.0, 1000.0)]  # a drains in 125 s; c can wait
    plan = Planner(None, None).heuristic(groups, machines, 0.0)  # type: ignore[arg-type]
    assert plan.actions == [LoadModel("i0", "c", "host")], "weights staged for a later warm swap"


def test_a_waiting_model_that_would_miss_its_deadline_gets_the_instance_now() -> None:
    machines = [machine("i0", "a", models=("a", "c"))]
    groups = [group(0, "a", 500.0, 400.0), group(1, "c", 5.0, 60.0)]  # c cannot wait 125 s
    plan = Planner(None, None).heuristic(groups, machines, 0.0)  # type: ignore[arg-type]
    assert plan.actions == [LoadModel("i0", "c", "gpu")]


def test_no_swap_when_every_model_is_served() -> None:
    machines = [machine("i0", "a"), machine("i1", "b")]
    groups = [group(0, "a", 5.0, 10.0), group(1, "b", 5.0, 10.0)]
    plan = Planner(None, None).heuristic(groups, machines, 0.0)  # type: ignore[arg-type]
    assert plan.actions == [] and plan.objective == 2.0


def test_late_groups_are_planned_after_every_on_time_one_and_swap_nothing_in() -> None:
    # c's group is already 5 s late: by laxity the most urgent, but its SLO is lost. Placed first,
    # it had the instance swap to c at once and a's on-time group wait behind it.
    machines = [machine("i0", "a", models=("a", "c"), warm=("a", "c"))]
    late_c = GroupStat(("c", "c", 0), "c", ["late-r"], 8.0, -10.0, -5.0, False, 1.0)
    on_time_a = group(1, "a", 8.0, 20.0)
    plan = Planner(None, None).heuristic([late_c, on_time_a], machines, 0.0)  # type: ignore[arg-type]
    assert plan.queues == {"i0": ["g1-r", "late-r"]}, "a's on-time group first, the late one after"
    assert plan.actions == [], "no swap to c now: its weights are warm for when its turn comes"
    assert plan.objective == 1.0


def test_a_group_stays_where_its_model_is_served_when_it_meets_its_deadline_there() -> None:
    # i1 would finish it sooner after a warm swap, but i0 (busy 50 s) still meets its deadline: a
    # swap costs what the plan's timeline does not show (the other model's TTFTs, its KV cache).
    machines = [
        machine("i0", "a", busy=50.0, models=("a", "b"), warm=("a", "b")),
        machine("i1", "b", models=("a", "b"), warm=("a", "b")),
    ]
    plan = Planner(None, None).heuristic([group(0, "a", 8.0, 100.0)], machines, 0.0)  # type: ignore[arg-type]
    assert plan.queues == {"i0": ["g0-r"]} and plan.actions == []
    late = Planner(None, None).heuristic([group(0, "a", 8.0, 40.0)], machines, 0.0)  # type: ignore[arg-type]
    assert late.queues == {"i1": ["g0-r"]} and late.actions == [LoadModel("i1", "a", "gpu")]


def test_end_to_end_work_is_timed_at_the_pace_of_a_full_engine() -> None:
    # Seat-seconds are priced at a reference batch; this engine, full, gets through 1 per second,
    # not 4 (its seats): the group cannot meet its deadline and is given up (planned, not counted).
    slow = Machine("i0", 4, 0.0, "a", frozenset(), {"a": 1.0}, frozenset({"a"}), 0.0, {"a": 1.0})
    plan = Planner(None, None).heuristic([group(0, "a", 8.0, 5.0)], [slow], 0.0)  # type: ignore[arg-type]
    assert plan.queues == {"i0": ["g0-r"]} and plan.objective == 0.0
    fast = Machine("i0", 4, 0.0, "a", frozenset(), {"a": 1.0}, frozenset({"a"}), 0.0, {"a": 4.0})
    assert Planner(None, None).heuristic([group(0, "a", 8.0, 5.0)], [fast], 0.0).objective == 1.0  # type: ignore[arg-type]


def test_in_sustained_overload_the_model_with_the_fewest_slos_per_engine_second_is_given_up() -> None:
    # One engine, serving c (2 s to load again), a warm (5 s to load). What arrives of a alone fills
    # the engine (4 seat-seconds/s at a pace of 4), at 1 SLO a second; c brings as much work for 0.1
    # SLO a second. The queue as it stands misses (serving c's group first, then swapping, leaves
    # a's groups late); with the minute ahead, and for the queue itself, serving c's work only after
    # a's on-time work meets more SLOs.
    queue = GlobalQueue({})
    engine = Machine(
        "i0",
        4,
        0.0,
        "c",
        frozenset({"a", "c"}),
        {"a": 5.0, "c": 2.0},
        frozenset({"a", "c"}),
        0.0,
        {"a": 4.0, "c": 4.0},
    )
    queued = [
        group(3, "a", 40.0, 20.0, weight=5.0),
        group(0, "c", 16.0, 10.0),
        group(1, "a", 8.0, 15.0, weight=5.0),
        group(2, "a", 16.0, 30.0, weight=5.0),
    ]
    planner = Planner(queue, None)  # type: ignore[arg-type]
    queue.arrivals[("a", "short")] = LaneRate(4.0, 1.0, 20.0, False, 0.0)
    queue.arrivals[("c", "short")] = LaneRate(4.0, 0.1, 20.0, False, 0.0)
    plan, misses = planner.schedule(queued, [engine], 0.0)
    assert plan.objective == 1.0 and misses, "the queue alone: end-to-end-bound groups miss"
    assert planner.given_up(queued, [engine], 0.0) == frozenset({"c"})
    plan = planner.heuristic(queued, [engine], 0.0, frozenset({"c"}))
    assert plan.objective == 15.0
    assert plan.queues["i0"][-1] == "g0-r", "c's group after every group of a"
    assert plan.actions == [LoadModel("i0", "a", "gpu")]
    assert Planner(queue, None, give_up=False).given_up(queued, [engine], 0.0) == frozenset()  # type: ignore[arg-type]
    # What arrives fits the engine (a peak of the queue, not overload): nothing is given up.
    queue.arrivals[("a", "short")] = LaneRate(2.0, 1.0, 20.0, False, 0.0)
    queue.arrivals[("c", "short")] = LaneRate(1.0, 0.1, 20.0, False, 0.0)
    assert planner.given_up(queued, [engine], 0.0) == frozenset()
    # Only the forecast gains from it, not the queue as it stands (engine swaps cost 1 s; the queue
    # meets as much either way): the arrivals of the last minute may not last, nothing is given up.
    queue.arrivals[("a", "short")] = LaneRate(4.0, 1.0, 20.0, False, 0.0)
    queue.arrivals[("c", "short")] = LaneRate(4.0, 0.1, 20.0, False, 0.0)
    cheap = dataclasses.replace(engine, load_s={"a": 1.0, "c": 1.0})
    peak = [
        group(0, "a", 4.0, 10.0, weight=5.0),
        group(1, "c", 8.0, 10.0, weight=5.0),
        group(2, "a", 40.0, 15.0, weight=5.0),
    ]
    assert planner.schedule(peak, [cheap], 0.0)[1]
    with_forecast = sorted([*peak, *(planner.expected([cheap], 0.0) or [])], key=lambda g: (g.urgency, g.key))
    assert (
        planner.heuristic(with_forecast, [cheap], 0.0, frozenset({"c"})).objective
        > planner.heuristic(with_forecast, [cheap], 0.0).objective
    ), "the forecast alone would give c up"
    assert planner.given_up(peak, [cheap], 0.0) == frozenset()
    # A TTFT-bound group that misses is not what giving a model up is for (it is never given up).
    assert not planner.schedule([group(5, "a", 400.0, 1.0, ttft=True)], [engine], 0.0)[1]
    # Nor is the only model queued.
    queue.arrivals[("a", "short")] = LaneRate(8.0, 1.0, 20.0, False, 0.0)
    assert planner.given_up([queued[0], queued[2]], [engine], 0.0) == frozenset()


def test_arrival_rates_decay_with_time() -> None:
    queue = GlobalQueue({})
    for t in range(60):
        request = Request(f"r{t}", "a", 10, 100, float(t), SLO(e2e_deadline=t + 120.0), slo_class="batch")
        e = queue.entry(request, LengthDistribution.point(50))
        e.service_s = 2.0
        queue.note_arrival(e, float(t))
    lane = queue.arrivals[("a", "batch")]
    assert lane.budget_s == 120.0 and not lane.ttft_bound
    # one arrival a second, 2 seat-seconds each, over the 60-s memory: about 63% of the rate
    assert 1.1 < lane.seat_s * lane.decayed(60.0) < 1.4
    assert lane.seat_s * lane.decayed(60.0 + ARRIVAL_MEMORY_S) < 0.5 * lane.seat_s * lane.decayed(60.0)
