"""Policy benchmarks over versioned scenarios (``qlm bench``): base-load tables, load sweeps, plots.

Each scenario (``scenarios/bench/<NAME>.yaml``) runs under every policy at its base load (the
scenario's own ``rate_scale``, multiplier 1) and at each multiplier of the load sweep (the workload's
``rate_scale``, or ``target_rps``, times the multiplier). All policies of one scenario and load see
the same requests (one seed). From the sweep comes each policy's *highest load*: the largest
multiplier at which overall SLO attainment is still at least the target (0.9), interpolated linearly
between sweep points (:func:`highest_rate`).

**Bursts.** A scenario has one workload. A companion file ``<NAME>_burst.yaml`` beside
``<NAME>.yaml`` adds a second stream: its requests (built from its own workload and classes) are
merged into the scenario's (:func:`merge_requests`), their ids prefixed ``burst-`` and shifted so the
burst's first arrival lands ``burst_at`` (a fraction, default 0.3) into the main stream's span. The
fleet, engine and cost models are the main file's; the burst's models must be among its models. The
sweep multiplier applies to both streams.

**Missing traces.** A scenario whose trace (or ``lengths_from`` file), or whose burst's, does not
exist is skipped with a message, not an error: the versioned scenarios replay the traces in
``../shared/traces`` beside the checkout, which not every machine has.

**Report.** :func:`write_report` writes the tables and one PNG per scenario (SLO attainment against
the load multiplier, one line per policy; matplotlib, Agg canvas) into a Markdown file, between the
markers ``<!-- bench:start -->`` and ``<!-- bench:end -->``: text outside them survives re-generation.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from qlm_plugin import workloads as wl
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.registry import policy_registry
from qlm_plugin.tools.pool import process_pool
from qlm_plugin.tools.simulate import PolicyResult, build_requests, empty_workload, run_policy
from qlm_plugin.workloads.scenario import DEFAULT_SCENARIO, Scenario, load_scenario

DEFAULT_SWEEP: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
TARGET_ATTAINMENT = 0.9
DEFAULT_BURST_AT = 0.3
BURST_SUFFIX = "_burst"
BURST_ID_PREFIX = "burst-"
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"

Bound = Literal["<min", ">max"]


class BenchError(ValueError):
    """A bad bench request: an unknown scenario, a bad sweep, a burst that does not fit its scenario."""


# ------------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True, slots=True)
class BenchScenario:
    """A scenario file of the bench and its optional burst companion."""

    key: str  # the file's stem ("A"): names the scenario on the command line and its plot
    path: Path
    burst_path: Path | None = None


def default_folder() -> Path:
    """``scenarios/bench`` under the working folder if there is one, else the checkout's."""
    here = Path("scenarios") / "bench"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "scenarios" / "bench"


def _burst_of(path: Path) -> Path | None:
    burst = path.with_name(f"{path.stem}{BURST_SUFFIX}{path.suffix}")
    return burst if burst.is_file() else None


PACKAGED_DEFAULT = "default"


def packaged_default_path() -> Path:
    """The packaged default scenario's file (installed packages keep their data files on disk)."""
    return Path(str(importlib.resources.files("qlm_plugin.data").joinpath(DEFAULT_SCENARIO)))


def find_scenarios(names: Sequence[str] | None = None, folder: Path | None = None) -> list[BenchScenario]:
    """The scenarios to run. ``None``: every ``*.yaml`` of ``folder`` (default :func:`default_folder`)
    except burst companions, sorted. A name with a ``/`` or a ``.yaml``/``.yml`` suffix is a path;
    any other names ``<folder>/<name>.yaml``, and ``default`` (where the folder has no such file)
    the scenario ``qlm simulate`` runs when given none, from the installed package."""
    folder = default_folder() if folder is None else folder
    if names is None:
        paths = sorted(p for p in folder.glob("*.yaml") if p.is_file() and not p.stem.endswith(BURST_SUFFIX))
        if not paths:
            raise BenchError(f"no scenario files in {folder}")
    else:
        paths = []
        for name in names:
            if "/" in name or os.sep in name or name.endswith((".yaml", ".yml")):
                path = Path(name)
            else:
                path = folder / f"{name}.yaml"
                if name == PACKAGED_DEFAULT and not path.is_file():
                    path = packaged_default_path()
            if not path.is_file():
                known = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.endswith(BURST_SUFFIX))
                listed = f"in {folder}: {', '.join(known)}; " if known else ""
                raise BenchError(
                    f"unknown scenario {name!r}: no file {path} "
                    f"({listed}{PACKAGED_DEFAULT}: the packaged default scenario)"
                )
            paths.append(path)
    keys = [p.stem for p in paths]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise BenchError(f"scenario named twice: {', '.join(dupes)}")
    return [BenchScenario(p.stem, p, _burst_of(p)) for p in paths]


def missing_inputs(scenario: Scenario) -> list[str]:
    """Trace files the scenario's workload reads that do not exist (packaged samples always do)."""
    w = scenario.workload
    paths = [w.synthetic.lengths_from] if w.synthetic is not None else [w.trace]
    return [p for p in paths if p and p not in wl.PACKAGED_TRACES and not Path(p).is_file()]


def scale_load(scenario: Scenario, multiplier: float) -> Scenario:
    """The scenario with its arrival rate times ``multiplier`` (``target_rps`` if it sets one, else
    ``rate_scale``)."""
    if not (math.isfinite(multiplier) and multiplier > 0):
        raise BenchError(f"load multiplier must be a finite number > 0, got {multiplier!r}")
    w = scenario.workload
    update = (
        {"target_rps": w.target_rps * multiplier}
        if w.target_rps is not None
        else {"rate_scale": w.rate_scale * multiplier}
    )
    return scenario.model_copy(update={"workload": w.model_copy(update=update)})


def merge_requests(
    main: Sequence[Request], burst: Sequence[Request], *, at_s: float, prefix: str = BURST_ID_PREFIX
) -> list[Request]:
    """``main`` and ``burst`` as one stream sorted by arrival (stable: ``main`` first at a tie).

    The burst's requests are copied with ids ``prefix + id``, and arrivals and SLO deadlines shifted so
    that the burst's first arrival is at ``at_s``. Raises :class:`BenchError` on an id collision.
    """
    shifted: list[Request] = []
    if burst:
        shift = at_s - min(r.arrival_time for r in burst)

        def moved(t: float | None) -> float | None:
            return None if t is None else t + shift

        shifted = [
            replace(
                r,
                id=f"{prefix}{r.id}",
                arrival_time=r.arrival_time + shift,
                slo=SLO(moved(r.slo.ttft_deadline), moved(r.slo.e2e_deadline)),
            )
            for r in burst
        ]
    merged = sorted([*main, *shifted], key=lambda r: r.arrival_time)
    ids = {r.id for r in merged}
    if len(ids) != len(merged):
        raise BenchError(f"request ids collide when merging the burst (prefix {prefix!r})")
    return merged


def scenario_requests(
    scenario: Scenario, burst: Scenario | None = None, *, burst_at: float = DEFAULT_BURST_AT
) -> tuple[list[Request], list[wl.Rejected]]:
    """The scenario's requests, with the burst's merged in ``burst_at`` of the way into its span."""
    requests, rejected = build_requests(scenario)
    if burst is None:
        return requests, rejected
    unknown = sorted({m.name for m in burst.models} - {m.name for m in scenario.models})
    if unknown:
        raise BenchError(
            f"{burst.source}: burst models {', '.join(unknown)} are not models of {scenario.source}"
        )
    extra, extra_rejected = build_requests(burst)
    first = requests[0].arrival_time if requests else 0.0
    last = requests[-1].arrival_time if requests else 0.0
    merged = merge_requests(requests, extra, at_s=first + burst_at * (last - first))
    offset = len(requests) + len(rejected)  # keep record indexes (and so invalid-* ids) distinct
    return merged, [*rejected, *(wl.Rejected(r.index + offset, r.error) for r in extra_rejected)]


# ------------------------------------------------------------------------------------------------
# Results


def highest_rate(points: Sequence[tuple[float, float]], target: float = TARGET_ATTAINMENT) -> float | Bound:
    """The highest load multiplier at which attainment is at least ``target``.

    ``points`` are (multiplier, attainment) pairs. Above the highest point that meets the target,
    attainment is taken to fall linearly to the next point. ``">max"`` when the highest multiplier still
    meets the target, ``"<min"`` when no point does.
    """
    pts = sorted(points)
    if not pts:
        raise ValueError("highest_rate needs at least one point")
    for i in range(len(pts) - 1, -1, -1):
        x0, y0 = pts[i]
        if y0 >= target:
            if i == len(pts) - 1:
                return ">max"
            x1, y1 = pts[i + 1]
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return "<min"


def seeds_note(result: BenchResult) -> str:
    """What a report says after its load sweep when each point is a mean over seeds ("" if not)."""
    if result.seeds <= 1 or not result.sweep:
        return ""
    return f", each point the mean over {result.seeds} seeds (the seed and the next {result.seeds - 1})"


@dataclass(frozen=True, slots=True)
class SweepPoint:
    multiplier: float
    slo_attainment: float  # the mean over the seeds
    classes: dict[str, float]
    wall_s: float
    by_seed: tuple[float, ...] = ()  # each seed's attainment, the scenario's own seed first

    def to_dict(self) -> dict[str, object]:
        return {
            "multiplier": self.multiplier,
            "slo_attainment": self.slo_attainment,
            "classes": dict(self.classes),
            "wall_s": self.wall_s,
            "slo_attainment_by_seed": list(self.by_seed),
        }


@dataclass(slots=True)
class PolicyBench:
    policy: str
    reference: bool
    base: PolicyResult  # at multiplier 1, without the per-request outcomes
    sweep: list[SweepPoint] = field(default_factory=list)  # ascending multipliers, the base included
    highest: float | Bound | None = None  # None without a sweep

    def to_dict(self) -> dict[str, object]:
        return {
            "base": self.base.to_dict(),
            "sweep": [p.to_dict() for p in self.sweep],
            "highest_multiplier": self.highest,
        }


@dataclass(slots=True)
class ScenarioBench:
    key: str
    name: str
    description: str
    path: str
    burst_path: str | None
    burst_at_s: float | None  # where the burst starts at base load
    requests: int  # at validation, rejected included
    rejected: int
    span_s: float  # first to last arrival at base load
    base_rps: float
    instances: int
    classes: list[str]
    policies: dict[str, PolicyBench] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "path": self.path,
            "burst_path": self.burst_path,
            "burst_at_s": self.burst_at_s,
            "requests": self.requests,
            "rejected_at_validation": self.rejected,
            "span_s": self.span_s,
            "base_rps": self.base_rps,
            "instances": self.instances,
            "classes": list(self.classes),
            "policies": {n: p.to_dict() for n, p in self.policies.items()},
        }


@dataclass(slots=True)
class BenchResult:
    command: str
    date: str
    seed: int | None  # None: each scenario's own
    sweep: list[float]
    target: float
    burst_at: float
    policies: list[str]
    scenarios: dict[str, ScenarioBench] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why
    wall_s: float = 0.0
    seeds: int = 1  # each sweep point is the mean over this many seeds

    def to_dict(self) -> dict[str, object]:
        return {
            "command": self.command,
            "date": self.date,
            "seed": self.seed,
            "seeds": self.seeds,
            "sweep": list(self.sweep),
            "target_attainment": self.target,
            "burst_at": self.burst_at,
            "policies": list(self.policies),
            "wall_s": self.wall_s,
            "skipped": dict(self.skipped),
            "scenarios": {k: s.to_dict() for k, s in self.scenarios.items()},
        }


# ------------------------------------------------------------------------------------------------
# Running


def parse_multipliers(text: str) -> list[float]:
    """``"0.5,1,1.5"`` -> ``[0.5, 1.0, 1.5]``; every value finite and > 0; sorted, duplicates dropped."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise BenchError(f"--sweep: {part!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise BenchError(f"--sweep: multipliers must be finite numbers > 0, got {part!r}")
        values.append(value)
    if not values:
        raise BenchError("--sweep: give at least one multiplier, e.g. 0.5,1,2 (or --no-sweep)")
    return sorted(set(values))


RunCallback = Callable[[str, str, float, PolicyResult], None]


def run_bench(
    scenarios: Sequence[str | Path] | None = None,
    policies: Sequence[str] | None = None,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    seed: int | None = None,
    *,
    burst_at: float = DEFAULT_BURST_AT,
    target: float = TARGET_ATTAINMENT,
    folder: Path | None = None,
    command: str = "qlm bench",
    date: str | None = None,
    jobs: int = 1,
    on_run: RunCallback | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    seeds: int = 1,
) -> BenchResult:
    """Run every scenario under every policy at base load and at each multiplier of ``sweep``.

    ``scenarios``: names or paths (:func:`find_scenarios`; ``None``: the whole folder). ``policies``:
    ``None`` for every registered one. ``sweep``: load multipliers (empty: base load only; the base,
    1, is always run and joins the sweep's points). ``seed`` replaces every scenario's (and burst's)
    seed. ``seeds``: each sweep point is the mean attainment over the scenario's seed and the next
    ``seeds - 1`` (overloaded, one seed's point is one draw: B at 4x spans 17 points over five); the
    tables at base load are the first seed's. ``jobs``: simulations run at once, each in its own
    process (1: here, one after another).
    ``on_run(scenario, policy, multiplier, result)`` after each simulation; ``on_skip(scenario,
    why)`` for a scenario whose trace is missing.
    """
    t0 = time.perf_counter()
    if not 0.0 <= burst_at <= 1.0:
        raise BenchError(f"burst_at must be in [0, 1], got {burst_at!r}")
    if jobs < 1:
        raise BenchError(f"jobs must be at least 1, got {jobs!r}")
    if seeds < 1:
        raise BenchError(f"seeds must be at least 1, got {seeds!r}")
    multipliers = sorted({float(m) for m in sweep})
    for m in multipliers:
        if not (math.isfinite(m) and m > 0):
            raise BenchError(f"sweep multipliers must be finite numbers > 0, got {m!r}")
    registry = policy_registry(get_plugin_manager())
    names = registry.names() if policies is None else list(dict.fromkeys(policies))
    if not names:
        raise BenchError("no policies to run")
    for name in names:
        registry.get(name)  # fail before any work on an unknown name
    found = find_scenarios(None if scenarios is None else [str(s) for s in scenarios], folder)
    result = BenchResult(
        command=command,
        date=date or datetime.now(timezone.utc).date().isoformat(),
        seed=seed,
        # the loads run: the base load always is (a bound read off the sweep without it was wrong)
        sweep=sorted({1.0, *multipliers}) if multipliers else [],
        target=target,
        burst_at=burst_at,
        policies=names,
        seeds=seeds,
    )
    loads = sorted({1.0, *multipliers})
    runs: list[_Run] = []
    for bs in found:
        scenario = load_scenario(bs.path)
        burst = load_scenario(bs.burst_path) if bs.burst_path is not None else None
        if seed is not None:
            scenario = scenario.model_copy(update={"seed": seed})
            burst = burst.model_copy(update={"seed": seed}) if burst is not None else None
        missing = missing_inputs(scenario) + (missing_inputs(burst) if burst is not None else [])
        if missing:
            why = f"trace not found: {', '.join(missing)}"
            result.skipped[bs.key] = why
            if on_skip is not None:
                on_skip(bs.key, why)
            continue
        result.scenarios[bs.key] = _describe(bs, scenario, burst, burst_at)
        for k in range(seeds):
            sc, br = scenario, burst
            if k:  # the next seeds, for the sweep's points only
                if not multipliers:
                    break
                sc = scenario.model_copy(update={"seed": scenario.seed + k})
                br = burst.model_copy(update={"seed": burst.seed + k}) if burst is not None else None
            runs += [_Run(bs.key, sc, br, m, burst_at, p, k) for m in loads for p in names]
    results = _simulate_all(runs, jobs)
    drawn: dict[tuple[str, str, float], list[PolicyResult]] = {}
    for run, res in zip(runs, results, strict=True):
        if on_run is not None:
            on_run(run.key, run.policy, run.multiplier, res)
        out = result.scenarios[run.key]
        if run.multiplier == 1.0 and run.seed_offset == 0:
            out.policies[run.policy] = PolicyBench(run.policy, res.reference, res)
        if multipliers:
            drawn.setdefault((run.key, run.policy, run.multiplier), []).append(res)
    points: dict[tuple[str, str], list[SweepPoint]] = {}
    for (key, policy, multiplier), draws in drawn.items():
        classes = {
            c: statistics.fmean(d.classes[c].slo_attainment for d in draws if c in d.classes)
            for c in draws[0].classes
        }
        by_seed = tuple(d.overall.slo_attainment for d in draws)
        point = SweepPoint(
            multiplier, statistics.fmean(by_seed), classes, sum(d.wall_s for d in draws), by_seed
        )
        points.setdefault((key, policy), []).append(point)
    for (key, policy), pts in points.items():
        pb = result.scenarios[key].policies[policy]
        pb.sweep = pts
        pb.highest = highest_rate([(p.multiplier, p.slo_attainment) for p in pts], target)
    result.wall_s = time.perf_counter() - t0
    return result


@dataclass(frozen=True, slots=True)
class _Run:
    """One simulation of the bench: a scenario at one load under one policy."""

    key: str
    scenario: Scenario
    burst: Scenario | None
    multiplier: float
    burst_at: float
    policy: str
    seed_offset: int = 0  # which of the bench's seeds (0: the scenario's own)


def _describe(
    bs: BenchScenario, scenario: Scenario, burst: Scenario | None, burst_at: float
) -> ScenarioBench:
    requests, rejected = scenario_requests(scenario, burst, burst_at=burst_at)
    if not requests:
        raise BenchError(f"{bs.path}: {empty_workload(rejected)}")
    span = requests[-1].arrival_time - requests[0].arrival_time
    starts = [r.arrival_time for r in requests if r.id.startswith(BURST_ID_PREFIX)]
    return ScenarioBench(
        key=bs.key,
        name=scenario.name,
        description=" ".join(scenario.description.split()),
        path=_show_path(bs.path),
        burst_path=_show_path(bs.burst_path) if bs.burst_path is not None else None,
        burst_at_s=min(starts) if starts else None,
        requests=len(requests) + len(rejected),
        rejected=len(rejected),
        span_s=span,
        base_rps=(len(requests) - 1) / span if span > 0 else 0.0,
        instances=len(scenario.instance_ids()),
        classes=sorted({r.slo_class for r in requests}),
    )


def _simulate_all(runs: Sequence[_Run], jobs: int) -> Iterator[PolicyResult]:
    """Every run's result, in order, as each comes; ``jobs`` processes at once (each builds its
    own requests)."""
    if jobs == 1 or len(runs) <= 1:
        yield from map(_simulate, runs)
        return
    with process_pool(jobs) as pool:  # the plugin manager is built per run
        yield from pool.map(_simulate, runs)


def _simulate(run: _Run) -> PolicyResult:
    sc = scale_load(run.scenario, run.multiplier)
    br = scale_load(run.burst, run.multiplier) if run.burst is not None else None
    requests, rejected = scenario_requests(sc, br, burst_at=run.burst_at)
    res = run_policy(sc, run.policy, requests, rejected)
    return replace(res, outcomes=[])  # the metrics are all we keep; outcomes are large


def _show_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------
# Report


def format_rate(value: float | Bound | None, multipliers: Sequence[float]) -> str:
    """A highest-load multiplier as the report shows it: ``1.73x``, ``> 3x``, ``< 0.5x``, ``-``."""
    if value is None:
        return "-"
    if value == ">max":
        return f"> {max(multipliers):g}x"
    if value == "<min":
        return f"< {min(multipliers):g}x"
    assert isinstance(value, float)
    return f"{value:.2f}x"


def summary_lines(result: BenchResult) -> list[str]:
    """A short plain-text summary: per scenario and policy, base-load attainment and the highest load."""
    lines = []
    for s in result.scenarios.values():
        lines.append(f"{s.key} ({s.name}): {s.requests} requests, {s.base_rps:.1f} req/s at 1x")
        for name, pb in s.policies.items():
            classes = ", ".join(f"{c} {_pct(m.slo_attainment)}" for c, m in pb.base.classes.items())
            label = f"{name}*" if pb.reference else name
            lines.append(
                f"  {label:<10} SLO met {_pct(pb.base.overall.slo_attainment):>6} ({classes}); "
                f"highest load {format_rate(pb.highest, result.sweep)}"
            )
    for key, why in result.skipped.items():
        lines.append(f"{key}: skipped ({why})")
    return lines


def _count(x: float) -> str:
    return f"{x:,.0f}"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _image_name(key: str) -> str:
    return f"bench_{key}.png"


def render_section(result: BenchResult, images: dict[str, str] | None = None) -> str:
    """The generated Markdown section, markers included. ``images`` maps scenario keys to image links
    (relative to the Markdown file)."""
    images = images or {}
    lines = [
        MARK_START,
        "<!-- Generated by `qlm bench`: everything between the bench markers is replaced on each run. -->",
        "",
        f"Generated on {result.date} by:",
        "",
        "```",
        result.command,
        "```",
        "",
        f"Seed: {'each scenario’s own' if result.seed is None else result.seed}; load sweep: "
        + (", ".join(f"{m:g}x" for m in result.sweep) if result.sweep else "none (base load only)")
        + seeds_note(result)
        + f"; bench wall time {result.wall_s:.0f} s. Policies marked `*` are references (they know true "
        "output lengths), not deployable.",
        "",
    ]
    marks = {}
    for s in result.scenarios.values():
        for name, pb in s.policies.items():
            marks[name] = f"{name}*" if pb.reference else name
    policies = [p for p in result.policies if p in marks]
    if result.sweep and result.scenarios:
        lines += [
            f"### Highest load meeting {result.target * 100:.0f}% SLO attainment",
            "",
            "The largest multiplier of each scenario's base load at which overall SLO attainment is at least "
            f"{result.target * 100:.0f}%, interpolated linearly between sweep points (in brackets: the "
            "arrival rate it is).",
            "",
            "| scenario | base load | " + " | ".join(marks[p] for p in policies) + " |",
            "| --- | --- | " + " | ".join("---" for _ in policies) + " |",
        ]
        for s in result.scenarios.values():
            cells = []
            for p in policies:
                h = s.policies[p].highest
                text = format_rate(h, result.sweep)
                if isinstance(h, float):
                    text += f" ({h * s.base_rps:.1f} req/s)"
                cells.append(text)
            lines.append(f"| {s.key} ({s.name}) | {s.base_rps:.1f} req/s | " + " | ".join(cells) + " |")
        lines.append("")
    for s in result.scenarios.values():
        lines += [f"### {s.key}: {s.name}", ""]
        if s.description:
            lines += [s.description, ""]
        burst = (
            f" Burst from `{s.burst_path}` merged in at {s.burst_at_s:.0f} s "
            f"({result.burst_at:.0%} of the span)."
            if s.burst_path is not None and s.burst_at_s is not None
            else ""
        )
        lines += [
            f"`{s.path}`: {s.requests:,} requests ({s.rejected:,} rejected at validation) over "
            f"{s.span_s:.0f} s, {s.base_rps:.1f} req/s at base load (1x), {s.instances} "
            f"instance{'s' if s.instances != 1 else ''}.{burst}",
            "",
            "| policy | SLO met | "
            + " | ".join(s.classes)
            + " | goodput (req/s) | throughput (req/s) | TTFT p99 (s) | GPU busy | preemptions | "
            "swaps out/in | wasted tokens | loads cold/warm | wall (s) | highest load |",
            "| --- | ---: | "
            + " | ".join("---:" for _ in s.classes)
            + " | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in policies:
            pb = s.policies[p]
            r = pb.base
            c = r.counters
            per_class = [_pct(r.classes[k].slo_attainment) if k in r.classes else "-" for k in s.classes]
            lines.append(
                f"| {marks[p]} | {_pct(r.overall.slo_attainment)} | "
                + " | ".join(per_class)
                + f" | {r.overall.goodput_rps:.2f} | {r.overall.throughput_rps:.2f} | "
                f"{_num(r.overall.ttft_p99_s)} | {r.gpu_busy_fraction * 100:.0f}% | "
                f"{_count(c.get('preemptions', 0))} | "
                f"{_count(c.get('swaps_out', 0))}/{_count(c.get('swaps_in', 0))} | "
                f"{_count(c.get('wasted_tokens', 0))} | {_count(c.get('model_loads_cold', 0))}/"
                f"{_count(c.get('model_loads_warm', 0))} | {r.wall_s:.1f} | "
                f"{format_rate(pb.highest, result.sweep)} |"
            )
        lines.append("")
        lines += queue_manager_table(s.to_dict(), policies, marks)
        lines += estimator_table(s.to_dict(), policies, marks)
        if s.key in images:
            lines += [f"![{s.key}: SLO attainment against load]({images[s.key]})", ""]
    if result.skipped:
        lines += ["Skipped:", ""]
        lines += [f"- {k}: {why}" for k, why in result.skipped.items()]
        lines.append("")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


#: (counter, column title) of what a queue manager reports through qlm_stats, at base load.
QM_COLUMNS = (
    ("evictions", "evictions"),
    ("steals", "moved (load balancing)"),
    ("swaps_ordered", "model swaps ordered"),
    ("prefetches", "weights staged (warm start)"),
    ("flagged", "flagged at admission"),
    ("replans", "replans"),
)


def queue_manager_table(
    scenario: dict[str, Any], policies: Sequence[str], marks: dict[str, str]
) -> list[str]:
    """LSOs a queue manager issued, and its estimator's and predictor's accuracy, for the policies
    that have one (works on the JSON form of a scenario's results)."""
    rows = []
    for p in policies:
        lso = scenario["policies"][p]["base"].get("lso", {})
        if "pulls" not in lso:
            continue
        cells = [_count(lso.get(k, 0)) for k, _ in QM_COLUMNS]
        mape = lso.get("est_mape_over_1s")
        p09 = lso.get("est_p09_observed")
        cells.append(
            "-" if mape is None else f"{mape * 100:.0f}% ({_count(lso.get('est_samples_over_1s', 0))})"
        )
        cells.append("-" if p09 is None else f"{p09 * 100:.0f}% ({_count(lso.get('est_p09_samples', 0))})")
        mae = lso.get("pred_mae_tokens")
        cov = lso.get("pred_coverage_q90")
        cells.append("-" if mae is None else f"{mae:.0f} / {cov * 100:.0f}%")
        rows.append(f"| {marks.get(p, p)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    titles = [t for _, t in QM_COLUMNS] + [
        "wait MAPE, waits > 1 s (n)",
        "met, of P(meet) 0.85-0.95 (n)",
        "length MAE tokens / q90 coverage",
    ]
    return [
        "Queue manager at base load: the LSOs it ordered, and how good its estimates were.",
        "",
        "| policy | " + " | ".join(titles) + " |",
        "| --- | " + " | ".join("---:" for _ in titles) + " |",
        *rows,
        "",
    ]


def estimator_table(scenario: dict[str, Any], policies: Sequence[str], marks: dict[str, str]) -> list[str]:
    """Per policy and SLO class, how good the waiting-time estimates told at admission were, at
    base load (:mod:`qlm_plugin.tools.estimates`), for the policies that tell one."""
    rows = []
    for p in policies:
        for cls, e in scenario["policies"][p]["base"].get("estimates", {}).items():
            if cls == "all":
                continue
            mape, bias = e.get("mape"), e.get("bias")
            full = int(e.get("deciles", 0))
            cells = [
                _count(e.get("n", 0)),
                _count(e.get("n_long", 0)),
                "-" if mape is None else f"{mape * 100:.0f}%",
                "-" if bias is None else f"{bias * 100:+.0f}%",
                "-" if not full else f"{e.get('calibration_gap', 0.0) * 100:.1f} pt ({full})",
            ]
            rows.append(f"| {marks.get(p, p)} | {cls} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "Waiting-time estimates told at admission, at base load: error on the waits over 1 s (MAPE; bias",
        "is the median relative error, + says longer than it turned out), and calibration: the largest",
        "gap between the P(meet) told and the rate met, over the deciles of P(meet) with at least 50",
        "requests (how many in brackets).",
        "",
        "| policy | class | told | waits > 1 s | MAPE | bias | calibration gap |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]


def update_markdown(
    text: str | None, section: str, mark_start: str = MARK_START, mark_end: str = MARK_END
) -> str:
    """``text`` with the part between the markers (inclusive) replaced by ``section``; without
    markers the section is appended; ``None`` (no file yet) gives a page with a title and the section."""
    if text is None:
        return "# Benchmarks\n\nGenerated by `qlm bench` (see `qlm bench --help`).\n\n" + section
    start, end = text.find(mark_start), text.find(mark_end)
    if start < 0 and end < 0:
        return text.rstrip("\n") + "\n\n" + section if text.strip() else section
    if start < 0 or end < start or text.count(mark_start) > 1 or text.count(mark_end) > 1:
        raise BenchError(f"the markers {mark_start} ... {mark_end} are unbalanced; fix them by hand")
    tail = text[end + len(mark_end) :]
    if tail.startswith("\n"):
        tail = tail[1:]
    return text[:start] + section + tail


def require_matplotlib() -> None:
    """Raise :class:`BenchError` (before a long run, not after it) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("the plots need matplotlib: pip install 'qlm-plugin[bench]'") from None


def plot_scenario(s: ScenarioBench, path: Path, target: float = TARGET_ATTAINMENT) -> Path:
    """A PNG of SLO attainment against the load multiplier: overall and each class, one line per policy
    (drawn on an Agg canvas: no display, no global pyplot state)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ["overall", *s.classes]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    markers = "osD^vP*X"
    for ax, panel in zip(axes, panels, strict=True):
        for n, (name, pb) in enumerate(s.policies.items()):
            xs = [p.multiplier for p in pb.sweep]
            ys = [
                (p.slo_attainment if panel == "overall" else p.classes.get(panel, math.nan)) * 100
                for p in pb.sweep
            ]
            label = f"{name}*" if pb.reference else name
            ax.plot(
                xs,
                ys,
                marker=markers[n % len(markers)],
                markersize=max(3.0, 7.0 - n),  # later lines smaller: coinciding curves stay visible
                linestyle="--" if pb.reference else "-",
                label=label,
            )
        ax.axhline(target * 100, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(panel)
        ax.set_xlabel(f"load multiplier (1x = {s.base_rps:.1f} req/s)")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("SLO attainment (%)")
    axes[0].legend(loc="lower left", fontsize="small")
    fig.suptitle(f"{s.key}: {s.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(result: BenchResult, out: Path) -> list[Path]:
    """Write the plots (``<out's folder>/img/bench_<scenario>.png``, for scenarios with at least two
    sweep points) and the generated section of ``out``; return the files written."""
    written: list[Path] = []
    images: dict[str, str] = {}
    for s in result.scenarios.values():
        if len({p.multiplier for pb in s.policies.values() for p in pb.sweep}) < 2:
            continue
        png = out.parent / "img" / _image_name(s.key)
        written.append(plot_scenario(s, png, result.target))
        images[s.key] = f"img/{png.name}"
    text = out.read_text() if out.exists() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(update_markdown(text, render_section(result, images)))
    written.append(out)
    return written
