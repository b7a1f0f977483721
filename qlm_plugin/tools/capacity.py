"""Capacity planning (``qlm plan-capacity``): the fewest instances of each GPU kind that meet the SLOs.

The scenario file (``--slo-config``) gives the workload, the models, the SLO classes and the engine
settings; each of its instance groups is one *candidate kind* (a GPU kind with its models and batch
limits). For each kind, taken alone, :func:`find_min_count` searches the instance count: exponential
steps from the group's own ``count`` (the user's guess), then bisection, simulating each candidate
fleet once. A fleet *meets* the target when every SLO class reaches its required attainment.

The search assumes attainment does not fall when instances are added. The simulated policies come
close to that, not provably so; the report therefore carries the answer ``N`` and ``N - 1`` side by
side (the bisection has simulated both), so the claim "N meets, N - 1 does not" is checked, not assumed.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.registry import policy_registry
from qlm_plugin.tools.pool import process_pool
from qlm_plugin.tools.simulate import build_requests, empty_workload, run_policy
from qlm_plugin.workloads.scenario import MAX_GROUP_COUNT, InstanceGroup, Scenario

DEFAULT_TARGET = 0.99
DEFAULT_MAX_INSTANCES = 64
#: A fleet whose last request ends this share of the trace's span after the last arrival falls
#: behind its rate (a steady backlog, not the tail of one request).
BEHIND = 0.5
#: The most instances of a kind a search may try (a scenario's group holds at most that many).
MAX_INSTANCES = MAX_GROUP_COUNT
#: Attainment is a ratio of counts: allow for float rounding when comparing it with the target.
_EPS = 1e-12


# ------------------------------------------------------------------------------------------------
# The search


def find_min_count(meets: Callable[[int], bool], *, max_count: int, start: int = 1) -> int | None:
    """The smallest ``n`` in ``1..max_count`` with ``meets(n)``, or ``None`` when ``max_count`` fails.

    Exponential search from ``start`` (doubling up while it fails, halving down while it meets), then
    bisection between the largest failing and the smallest meeting count seen. Assumes ``meets`` is
    monotone (once true, true for every larger ``n``). Calls ``meets`` at most once per ``n`` and
    O(log n) times in all; when the answer ``n`` is above 1, ``meets(n - 1)`` has been called (false).
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    seen: dict[int, bool] = {}

    def ask(n: int) -> bool:
        if n not in seen:
            seen[n] = meets(n)
        return seen[n]

    n = min(max(start, 1), max_count)
    lo, hi = 0, 0  # invariant below: lo fails (0: no fleet at all), hi meets
    if ask(n):
        hi = n
        while hi > 1:
            n = hi // 2
            if not ask(n):
                lo = n
                break
            hi = n
    else:
        lo = n
        while True:
            if lo == max_count:
                return None
            n = min(2 * lo, max_count)
            if ask(n):
                hi = n
                break
            lo = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ask(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------------------------
# Parsing the command line's lists


def parse_targets(text: str | None, classes: Sequence[str]) -> dict[str, float]:
    """The required attainment of every class: ``0.99`` (all classes), ``interactive=0.99,batch=0.95``
    (classes not named get the default, 0.99) or both (``0.9,interactive=0.99``: a bare number is the
    default). Each value is a fraction in (0, 1]."""
    default = DEFAULT_TARGET
    bare = False  # a bare number given (the default): a second one silently replaced the first
    named: dict[str, float] = {}
    if text is not None and not text.replace(",", "").strip():
        raise ValueError(f"--target {text!r} names no target (give 0.99, or interactive=0.99,batch=0.95)")
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        name = name.strip()
        number = _fraction(value.strip(), f"--target {item!r}")
        if not sep:
            if bare:
                raise ValueError("--target gives the default (a bare number) twice")
            bare, default = True, number
        elif name not in classes:
            raise ValueError(f"--target names unknown class {name!r}; classes: {', '.join(classes)}")
        elif name in named:
            raise ValueError(f"--target names class {name!r} twice")
        else:
            named[name] = number
    return {c: named.get(c, default) for c in classes}


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        hint = f" (a fraction: {value / 100:g} for {value:g}%)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"{what}: the target must be in (0, 1], got {text}{hint}")
    return value


def parse_prices(text: str | None, kinds: Sequence[InstanceGroup]) -> dict[str, float]:
    """``h100=4.0,a100-80=2.5``: price per GPU-hour, keyed by GPU kind or instance-group name; returns
    the price of each kind (by :func:`kind_name`) that one applies to."""
    by_key: dict[str, float] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--price {item!r}: expected KIND=PRICE, e.g. h100=4.0")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"--price {item!r}: not a number") from None
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"--price {item!r}: a price must be > 0 and finite")
        if key in by_key:
            raise ValueError(f"--price names {key!r} twice")
        by_key[key] = price
    known = {kind_name(g) for g in kinds} | {g.gpu for g in kinds}
    unknown = sorted(set(by_key) - known)
    if unknown:
        # A typo would silently leave a kind unpriced.
        raise ValueError(
            f"--price names unknown kind {', '.join(map(repr, unknown))}; kinds: {', '.join(sorted(known))}"
        )
    out: dict[str, float] = {}
    for g in kinds:
        found = by_key.get(kind_name(g), by_key.get(g.gpu))
        if found is not None:
            out[kind_name(g)] = found
    return out


# ------------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class FleetPoint:
    """One simulated fleet: ``instances`` engines of one kind."""

    instances: int
    meets: bool
    classes: dict[str, float]  # class -> SLO attainment (classes with requests)
    overall: float  # overall attainment (records rejected at validation count as misses)
    gpu_busy_fraction: float
    wall_s: float  # time the simulation took
    # seconds from the last arrival to the last request's end: a fleet that falls behind a steady
    # rate shows it here, and meets the SLO only because the trace ends first
    drain_s: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "instances": self.instances,
            "meets": self.meets,
            "classes": dict(self.classes),
            "overall": self.overall,
            "gpu_busy_fraction": self.gpu_busy_fraction,
            "wall_s": self.wall_s,
            "drain_s": self.drain_s,
        }


@dataclass(slots=True)
class KindPlan:
    """The answer for one candidate kind."""

    kind: str
    gpu: str
    models: list[str]
    gpus_per_instance: int
    requests: int
    rejected_at_validation: int
    instances: int | None  # the answer N; None: max_instances does not meet the target
    evaluations: list[FleetPoint] = field(default_factory=list)  # in the order simulated
    price_per_gpu_hour: float | None = None
    note: str = ""  # why it has no answer, where it is not max_instances

    def point(self, n: int) -> FleetPoint | None:
        return next((p for p in self.evaluations if p.instances == n), None)

    @property
    def at_n(self) -> FleetPoint | None:
        return None if self.instances is None else self.point(self.instances)

    @property
    def below(self) -> FleetPoint | None:
        """The fleet one instance smaller (``None`` when N is 1: no fleet at all serves nothing)."""
        return None if self.instances is None else self.point(self.instances - 1)

    @property
    def gpus(self) -> int | None:
        return None if self.instances is None else self.instances * self.gpus_per_instance

    @property
    def cost_per_hour(self) -> float | None:
        if self.gpus is None or self.price_per_gpu_hour is None:
            return None
        return self.gpus * self.price_per_gpu_hour

    @property
    def wall_s(self) -> float:
        return sum(p.wall_s for p in self.evaluations)

    def to_dict(self) -> dict[str, object]:
        at_n, below = self.at_n, self.below
        return {
            "kind": self.kind,
            "gpu": self.gpu,
            "models": list(self.models),
            "gpus_per_instance": self.gpus_per_instance,
            "requests": self.requests,
            "rejected_at_validation": self.rejected_at_validation,
            "instances": self.instances,
            "gpus": self.gpus,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "cost_per_hour": self.cost_per_hour,
            "at_n": None if at_n is None else at_n.to_dict(),
            "at_n_minus_1": None if below is None else below.to_dict(),
            "evaluations": [p.to_dict() for p in self.evaluations],
            "wall_s": self.wall_s,
            "note": self.note,
        }


@dataclass(slots=True)
class CapacityReport:
    scenario: str
    policy: str
    seed: int
    requests: int
    span_s: float  # first to last arrival of the workload
    targets: dict[str, float]
    max_instances: int
    kinds: list[KindPlan]

    @property
    def ranked_by(self) -> str:
        """``cost`` when every kind that meets the target has a price, else ``gpus``."""
        ok = [k for k in self.kinds if k.instances is not None]
        return "cost" if ok and all(k.price_per_gpu_hour is not None for k in ok) else "gpus"

    def ranking(self) -> list[KindPlan]:
        """Kinds that meet the target, cheapest first (ties: fewer instances, then file order)."""
        ok = [k for k in self.kinds if k.instances is not None]
        if self.ranked_by == "cost":
            return sorted(ok, key=lambda k: (k.cost_per_hour or 0.0, k.instances or 0))
        return sorted(ok, key=lambda k: (k.gpus or 0, k.instances or 0))

    @property
    def recommended(self) -> KindPlan | None:
        ranked = self.ranking()
        return ranked[0] if ranked else None

    def to_dict(self) -> dict[str, object]:
        best = self.recommended
        return {
            "scenario": self.scenario,
            "policy": self.policy,
            "seed": self.seed,
            "requests": self.requests,
            "span_s": self.span_s,
            "rate_rps": _rate(self.requests, self.span_s),
            "targets": dict(self.targets),
            "max_instances": self.max_instances,
            "assumes_monotonic": True,
            "kinds": [k.to_dict() for k in self.kinds],
            "ranked_by": self.ranked_by,
            "recommended": None if best is None else best.kind,
            "wall_s": sum(k.wall_s for k in self.kinds),
        }


def _rate(requests: int, span_s: float) -> float:
    return (requests - 1) / span_s if requests > 1 and span_s > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# Planning


def kind_name(group: InstanceGroup) -> str:
    return group.name or group.gpu


def apply_workload_overrides(
    scenario: Scenario,
    *,
    trace: str | None = None,
    rate_scale: float | None = None,
    target_rps: float | None = None,
    seed: int | None = None,
) -> Scenario:
    """The scenario with the command line's workload options, as ``qlm simulate`` applies them."""
    if rate_scale is not None and target_rps is not None:
        raise ValueError("give --rate-scale or --target-rps, not both")
    for flag, value in (("--rate-scale", rate_scale), ("--target-rps", target_rps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be > 0 and finite, got {value}")
    if trace is not None and not trace.strip():  # it replayed the packaged conversation sample
        raise ValueError("--trace is empty: name a trace file or 'conv'/'code'")
    updates: dict[str, object] = {}
    if trace is not None:
        # The scenario's reshaping was chosen for its own trace: a trace named here replays as recorded.
        updates.update(
            trace=trace,
            synthetic=None,
            rate_scale=1.0,
            target_rps=None,
            start_s=0.0,
            duration_s=None,
            sample_fraction=None,
            max_requests=None,
        )
    if rate_scale is not None:
        kept_rps = updates.get("target_rps", scenario.workload.target_rps)
        if isinstance(kept_rps, float | int) and kept_rps:
            # the scenario's own load, scaled (it was dropped: 1.2x of a 72 req/s scenario planned
            # for 0.8 req/s, and more load came back as fewer GPUs)
            updates.update(target_rps=kept_rps * rate_scale, rate_scale=1.0)
        else:  # the scenario's own compression, scaled (as qlm simulate and qlm bench take it)
            own = 1.0 if "rate_scale" in updates else scenario.workload.rate_scale  # (reset by --trace)
            updates.update(rate_scale=own * rate_scale, target_rps=None)
    if target_rps is not None:
        updates.update(target_rps=target_rps, rate_scale=1.0)
    if updates:
        scenario = scenario.model_copy(update={"workload": scenario.workload.model_copy(update=updates)})
    if seed is not None:
        scenario = scenario.model_copy(update={"seed": seed})
    return scenario


def kind_scenario(scenario: Scenario, group: InstanceGroup, count: int) -> Scenario:
    """The scenario with ``count`` engines of ``group`` as its whole fleet."""
    return scenario.model_copy(update={"instances": [group.model_copy(update={"count": count})]})


def check_kinds(scenario: Scenario) -> None:
    """Each group must serve the whole workload on its own: it is compared as a fleet by itself."""
    every = [m.name for m in scenario.models]
    for g in scenario.instances:
        missing = [m for m in every if m not in g.models]
        if missing:
            raise ValueError(
                f"{scenario.source}: instance group {kind_name(g)!r} does not list model(s) "
                f"{', '.join(missing)}; each group is a candidate fleet on its own and must list every model"
            )


def _gpus_per_instance(scenario: Scenario, group: InstanceGroup) -> int:
    # An engine needs the GPUs of the largest model it may hold.
    costs = scenario.cost_models_for(group.gpu)
    return max((costs[m].tp for m in group.models if m in costs), default=1)


def meets_targets(classes: Mapping[str, float], targets: Mapping[str, float]) -> bool:
    """Every class with requests reaches its target (a class without requests has nothing to miss)."""
    return all(att >= targets.get(c, DEFAULT_TARGET) - _EPS for c, att in classes.items())


def plan_kind(
    scenario: Scenario,
    group_index: int,
    *,
    policy: str,
    targets: Mapping[str, float],
    max_instances: int,
    on_point: Callable[[str, FleetPoint], None] | None = None,
) -> KindPlan:
    """Search the smallest count of ``scenario.instances[group_index]`` that meets ``targets``."""
    group = scenario.instances[group_index]
    base = kind_scenario(scenario, group, 1)
    # Requests can depend on the fleet (context windows come from the kind's cost models): build
    # them per kind, once, and replay the same ones on every count.
    requests, rejected = build_requests(base)
    plan = KindPlan(
        kind=kind_name(group),
        gpu=group.gpu,
        models=list(group.models),
        gpus_per_instance=_gpus_per_instance(scenario, group),
        requests=len(requests),
        rejected_at_validation=len(rejected),
        instances=None,
    )
    if not requests:  # its engines' context fits none of them: no count of it serves the workload
        plan.note = f"serves none of the workload: {empty_workload(rejected)}"
        return plan
    last_arrival = requests[-1].arrival_time

    def evaluate(n: int) -> bool:
        res = run_policy(kind_scenario(scenario, group, n), policy, requests, rejected)
        classes = {c: m.slo_attainment for c, m in res.classes.items()}
        ends = [o.finish_time for o in res.outcomes if o.finish_time is not None]
        point = FleetPoint(
            instances=n,
            meets=meets_targets(classes, targets),
            classes=classes,
            overall=res.overall.slo_attainment,
            gpu_busy_fraction=res.gpu_busy_fraction,
            wall_s=res.wall_s,
            drain_s=max(0.0, max(ends, default=last_arrival) - last_arrival),
        )
        half = plan.point(n // 2)
        plan.evaluations.append(point)
        if on_point is not None:
            on_point(plan.kind, point)
        if not point.meets and half is not None and not half.meets and _same(half.classes, classes):
            raise _NoGain(n // 2, n)  # twice the instances, not one request more on time
        return point.meets

    try:
        plan.instances = find_min_count(evaluate, max_count=max_instances, start=group.count)
    except _NoGain as no_gain:
        plan.note = (
            f"{no_gain.more} instances meet no more SLOs than {no_gain.fewer}: more will not help (an SLO "
            "no request could meet even on an idle engine?)"
        )
    return plan


class _NoGain(Exception):
    def __init__(self, fewer: int, more: int) -> None:
        super().__init__(f"{fewer} -> {more}")
        self.fewer, self.more = fewer, more


def _same(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[c] - b[c]) < 1e-9 for c in a)


def _plan_kind_job(
    scenario: Scenario,
    group_index: int,
    policy: str,
    targets: dict[str, float],
    max_instances: int,
    progress: bool,
) -> KindPlan:
    # Runs in a worker process: callbacks do not cross processes, so the worker prints its own progress.
    return plan_kind(
        scenario,
        group_index,
        policy=policy,
        targets=targets,
        max_instances=max_instances,
        on_point=functools.partial(print_point, targets=targets) if progress else None,
    )


def print_point(kind: str, point: FleetPoint, targets: Mapping[str, float] | None = None) -> None:
    shares = ", ".join(f"{c} {_pct(a, (targets or {}).get(c))}" for c, a in point.classes.items())
    verdict = "meets" if point.meets else "misses"
    print(
        f"qlm plan-capacity: {kind} x{point.instances}: {shares} ({verdict}; {point.wall_s:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def plan_capacity(
    scenario: Scenario,
    *,
    policy: str = "qlm",
    targets: str | None = None,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    prices: str | None = None,
    jobs: int = 1,
    progress: bool = False,
) -> CapacityReport:
    """Plan every candidate kind of ``scenario``. Checks every input before simulating anything."""
    if not 1 <= max_instances <= MAX_INSTANCES:
        raise ValueError(
            f"--max-instances must be in 1..{MAX_INSTANCES} (a scenario's most), got {max_instances}"
        )
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    policy_registry(get_plugin_manager()).get(policy)  # an unknown name fails before any work
    class_targets = parse_targets(targets, [c.name for c in scenario.classes])
    price_of = parse_prices(prices, scenario.instances)
    check_kinds(scenario)
    requests, rejected = build_requests(scenario)  # reads the trace: a bad one fails here, once
    if not requests:
        raise ValueError(empty_workload(rejected))
    span = requests[-1].arrival_time - requests[0].arrival_time
    indexes = range(len(scenario.instances))
    args = [(scenario, i, policy, class_targets, max_instances, progress) for i in indexes]
    if jobs > 1 and len(args) > 1:
        # Kinds are independent; the search within one kind is sequential.
        with process_pool(min(jobs, len(args))) as pool:
            kinds = list(pool.map(_plan_kind_job, *zip(*args, strict=True)))
    else:
        kinds = [_plan_kind_job(*a) for a in args]
    fewest = min(k.rejected_at_validation for k in kinds)
    for k in kinds:
        k.price_per_gpu_hour = price_of.get(k.kind)
        if k.rejected_at_validation > fewest and k.instances is not None:
            # requests it cannot take at all (a smaller context) are lost, whatever its count: it
            # was recommended with 1,422 of 2,421 requests refused
            k.note = (
                f"meets the target on what it takes, but refuses {k.rejected_at_validation} requests "
                f"another kind serves ({k.rejected_at_validation - fewest} more): not an answer"
            )
            k.instances = None
    return CapacityReport(
        scenario=scenario.name,
        policy=policy,
        seed=scenario.seed,
        requests=len(requests),
        span_s=span,
        targets=class_targets,
        max_instances=max_instances,
        kinds=kinds,
    )


# ------------------------------------------------------------------------------------------------
# Table


def _pct(x: float | None, target: float | None = None) -> str:
    """A percentage to one decimal, or more where one would hide which side of ``target`` it is
    (98.99% against 99% shown as 99.0%)."""
    if x is None:
        return "-"
    for digits in (1, 2, 3):
        shown = f"{x * 100:.{digits}f}"
        if target is None or x == target or (float(shown) < target * 100) == (x < target):
            break
    return f"{shown}%"


def format_report(report: CapacityReport) -> list[str]:
    """The report as lines of text: one row per kind, the answer N and the fleet one smaller."""
    classes = list(report.targets)
    priced = any(k.price_per_gpu_hour is not None for k in report.kinds)
    rate = _rate(report.requests, report.span_s)
    targets = ", ".join(f"{c} {t * 100:g}%" for c, t in report.targets.items())
    over = (
        f"over {report.span_s:.0f} s ({rate:.2f} req/s)" if report.span_s > 0 else "all at once"
    )  # (it said "over 0 s (0.00 req/s)")
    lines = [
        f"scenario {report.scenario!r}: {report.requests} requests {over}, policy {report.policy}, "
        f"seed {report.seed}",
        f"target SLO attainment: {targets} (every class); up to {report.max_instances} instances per kind",
    ]
    cols: list[tuple[str, int]] = [("kind", 10), ("N", 4), ("GPUs", 5)]
    if priced:
        cols.append(("$/h", 8))
    cols += [(f"{c} @N", max(8, len(c) + 3)) for c in classes]
    cols += [(f"{c} @N-1", max(8, len(c) + 5)) for c in classes]
    cols += [("sims", 4), ("wall", 6)]
    header = " ".join(name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w) in enumerate(cols))
    lines += [header, "-" * len(header)]
    for k in report.kinds:
        at_n, below = k.at_n, k.below
        cells = [k.kind, "-" if k.instances is None else str(k.instances), str(k.gpus or "-")]
        if priced:
            cells.append("-" if k.cost_per_hour is None else f"{k.cost_per_hour:.2f}")
        if at_n is None and not k.evaluations:  # it takes none of the workload
            cells += ["-" for _ in classes] + ["" for _ in classes]
        elif at_n is None:
            # No answer: show the largest fleet tried, which misses (or refuses requests: its note)
            top = max(k.evaluations, key=lambda p: p.instances)
            cells[1] = "-" if k.note else f">{top.instances}"
            cells += [_pct(top.classes.get(c), report.targets[c]) for c in classes]
            cells += ["" for _ in classes]
        else:
            cells += [_pct(at_n.classes.get(c), report.targets[c]) for c in classes]
            cells += [
                _pct(None if below is None else below.classes.get(c), report.targets[c]) for c in classes
            ]
        cells += [str(len(k.evaluations)), f"{k.wall_s:.0f}s"]
        lines.append(
            " ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, (_, w)) in enumerate(zip(cells, cols, strict=True))
            )
        )
    lines.append("")
    for k in report.kinds:
        steps = ", ".join(f"{p.instances} {'meets' if p.meets else 'misses'}" for p in k.evaluations)
        lines.append(f"{k.kind} ({k.gpu}, {k.gpus_per_instance} GPU/instance): searched {steps or 'nothing'}")
        if k.note:
            lines.append(f"  {k.kind}: {k.note}")
    best = report.recommended
    if best is not None:
        if report.ranked_by == "cost":
            basis = f"${best.cost_per_hour or 0.0:.2f}/h, the cheapest"
        elif priced:
            basis = "fewest GPUs: not every kind has a --price"
        else:
            basis = "fewest GPUs: no --price given"
        gpus = f"{best.gpus} GPU{'' if best.gpus == 1 else 's'}"
        lines.append(f"recommended: {best.instances} x {best.kind} ({gpus}; {basis})")
        at_n = best.at_n
        if at_n is not None and report.span_s > 0 and at_n.drain_s > BEHIND * report.span_s:
            # the fleet falls behind the trace's rate: sustained, that rate would miss
            lines.append(
                f"warning: {best.instances} x {best.kind} ends the trace's requests {at_n.drain_s:.0f} s "
                f"after the last arrival, on a trace of {report.span_s:.0f} s: it falls behind "
                f"{rate:.2f} req/s and meets the SLO only because the trace ends first; plan on a "
                "trace longer than the SLO budgets for a steady rate"
            )
    ones = any(k.instances == 1 for k in report.kinds)
    lines.append(
        "N meets the target, N-1 misses it" + (" (N-1 = 0 serves nothing)" if ones else "") + "; the "
        "search assumes more instances never lower attainment"
    )
    return lines
