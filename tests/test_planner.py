"""The planner: the exact MILP against exhaustive search, the heuristic, and the model-swap rules."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest

from qlm_plugin.brain.planner import GroupStat, Machine, Planner, _ready_at
from qlm_plugin.domain.plan import LoadModel


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


def exhaustive(groups: list[GroupStat], machines: list[Machine], now: float) -> float:
    """Best weighted on-time count over every assignment and order (the MILP's model)."""
    best = 0.0
    serving_models = {m.serving for m in machines}
    for assign in itertools.product(range(len(machines)), repeat=len(groups)):
        ok = True
        for g, i in zip(groups, assign, strict=True):
            if g.model in serving_models and machines[i].serving != g.model:
                ok = False  # the MILP places groups only where their model serves
        if not ok:
            continue
        per: dict[int, list[int]] = {}
        for gi, i in enumerate(assign):
            per.setdefault(i, []).append(gi)
        total = 0.0
        for i, gis in per.items():
            m = machines[i]
            best_here = 0.0
            for order in itertools.permutations(gis):
                t, score = now, 0.0
                for gi in order:
                    g = groups[gi]
                    start = max(t, _ready_at(m, g.model, now))
                    end = start + g.seat_s / m.seats
                    if (start if g.ttft_bound else end) <= g.deadline:
                        score += g.weight
                    t = end
                best_here = max(best_here, score)
            total += best_here
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_milp_finds_the_optimum_of_small_problems(seed: int) -> None:
    rng = random.Random(seed)
    machines = [machine("i0", "a", busy=rng.uniform(0, 2)), machine("i1", "a", busy=rng.uniform(0, 2))]
    groups = [
        group(
            k,
            "a",
            rng.uniform(1, 12),
            rng.uniform(1, 6),
            ttft=rng.random() < 0.3,
            weight=rng.choice([1, 1, 3]),
        )
        for k in range(4)
    ]
    plan = Planner(None, None, milp_time_limit_s=5.0).milp(groups, machines, 0.0)  # type: ignore[arg-type]
    assert plan is not None and plan.solver == "milp"
    assert plan.objective == pytest.approx(exhaustive(groups, machines, 0.0))
    placed = sorted(rid for ids in plan.queues.values() for rid in ids)
    assert placed == sorted(r for g in groups for r in g.ids), "every request placed exactly once"


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


def test_no_swap_that_makes_more_work_late_than_it_saves() -> None:
    # Overload: model a's three groups each just make their deadlines where they are; a warm swap
    # to c and back (1 s each way, and c's 5 s) would make all three late to save c's one.
    machines = [machine("i0", "a", models=("a", "c"), warm=("a", "c"))]
    a_groups = [group(i, "a", 8.0, 2.0 * (i + 1) + 0.5) for i in range(3)]  # 4 seats: 2 s each
    # c's laxity is the least (it is the most urgent) and it meets its deadline if it goes first
    urgent_c = GroupStat(("c", "c", 9), "c", ["g9-r"], 20.0, 0.0, 6.5, False, 1.0)
    plan = Planner(None, None).heuristic([urgent_c, *a_groups], machines, 0.0)  # type: ignore[arg-type]
    assert plan.actions == [] and "i0" in plan.queues and "g9-r" not in plan.queues["i0"]
    assert plan.objective == 3.0
    # The same c group against one of a's: the swap saves as much as it costs, so c goes first.
    plan = Planner(None, None).heuristic([urgent_c, a_groups[0]], machines, 0.0)  # type: ignore[arg-type]
    assert plan.actions == [LoadModel("i0", "c", "gpu")]


def test_no_swap_when_every_model_is_served() -> None:
    machines = [machine("i0", "a"), machine("i1", "b")]
    groups = [group(0, "a", 5.0, 10.0), group(1, "b", 5.0, 10.0)]
    planner = Planner(None, None)  # type: ignore[arg-type]
    assert planner.heuristic(groups, machines, 0.0).actions == []
    exact = planner.milp(groups, machines, 0.0)
    assert exact is not None and exact.actions == [] and exact.objective == 2.0


def test_milp_answers_none_rather_than_a_wrong_plan_when_it_cannot_solve() -> None:
    machines = [machine("i0", "a", models=("a",))]
    groups = [group(0, "z", 1.0, 5.0)]  # no instance can serve model z at all
    result: Any = Planner(None, None).milp(groups, machines, 0.0)  # type: ignore[arg-type]
    assert result is None or math.isclose(result.objective, 0.0)
