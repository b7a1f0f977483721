"""Replay a workload through simulated instances under named policies (``qlm simulate``)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qlm_plugin import workloads as wl
from qlm_plugin.adapters.sim import SimBackend, SimFleet, SimInstance
from qlm_plugin.domain.instance import EvictMode
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.hooks.manager import POLICY_PREFIX
from qlm_plugin.policies.registry import PolicyContext, policy_registry
from qlm_plugin.tools.estimates import Told
from qlm_plugin.tools.estimates import accuracy as estimate_accuracy
from qlm_plugin.tools.metrics import Metrics, run_span, summarize
from qlm_plugin.workloads.scenario import Scenario

#: After the last arrival, how long the simulation may run before unfinished requests are reported.
DRAIN_LIMIT_S = 24 * 3600.0


@dataclass(slots=True)
class PolicyResult:
    policy: str
    reference: bool
    overall: Metrics
    classes: dict[str, Metrics]
    gpu_busy_fraction: float
    counters: dict[str, float]
    wall_s: float
    outcomes: list[RequestOutcome] = field(repr=False, default_factory=list)
    #: per class: how good the estimates told at admission were (:mod:`qlm_plugin.tools.estimates`)
    estimates: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        overall: dict[str, object] = {**self.overall.to_dict(), "gpu_busy_fraction": self.gpu_busy_fraction}
        return {
            "reference": self.reference,
            "overall": overall,
            "classes": {name: m.to_dict() for name, m in self.classes.items()},
            "lso": self.counters,
            "estimates": self.estimates,
            "wall_s": self.wall_s,
        }


def _records(scenario: Scenario, rng: random.Random) -> list[wl.TraceRecord]:
    w = scenario.workload
    if w.synthetic is not None:
        s = w.synthetic
        lengths = None
        if s.lengths_from:
            path = (
                wl.packaged_trace_path(s.lengths_from)
                if s.lengths_from in ("conv", "code")
                else s.lengths_from
            )
            lengths = wl.load_trace(path)
        records = wl.synthetic(
            rate_rps=s.rate_rps,
            duration_s=s.duration_s,
            rng=rng,
            arrival=s.arrival,
            cv=s.cv,
            lengths=lengths,
            prompt_mean=s.prompt_mean,
            output_mean=s.output_mean,
            sigma=s.length_sigma,
            on_s=s.on_s,
            off_s=s.off_s,
            off_rate_fraction=s.off_rate_fraction,
        )
    else:
        trace = w.trace or "conv"
        path = wl.packaged_trace_path(trace) if trace in ("conv", "code") else trace
        records = wl.load_trace(path)
    if w.start_s or w.duration_s is not None:
        records = wl.window(records, start_s=w.start_s, duration_s=w.duration_s)
    if w.sample_fraction is not None:
        records = wl.sample(records, fraction=w.sample_fraction, rng=rng)
    if w.max_requests is not None:
        records = records[: w.max_requests]
    if w.target_rps is not None:
        records = wl.scale_arrivals(records, target_rps=w.target_rps)
    elif w.rate_scale != 1.0:
        records = wl.scale_arrivals(records, rate_scale=w.rate_scale)
    return records


def empty_workload(rejected: Sequence[wl.Rejected]) -> str:
    """Why a workload has no request to replay: every record refused at validation, or none read."""
    if rejected:
        first = rejected[0].error
        return (
            f"the workload is empty: all {len(rejected)} records were rejected at validation "
            f"(the first, record {rejected[0].index}: {first.field}: {first.reason})"
        )
    return "the workload is empty (check the trace, window and sampling settings)"


def build_requests(scenario: Scenario) -> tuple[list[Request], list[wl.Rejected]]:
    """The scenario's workload as validated requests (deterministic for the scenario's seed)."""
    rng = random.Random(scenario.seed)
    records = _records(scenario, rng)
    return wl.assign(
        records,
        models=[wl.Share(m.name, m.share) for m in scenario.models],
        classes=[(c.slo_class(), c.share) for c in scenario.classes],
        tenants=[wl.Share(t.name, t.share) for t in scenario.tenants],
        rng=rng,
        model_specs=scenario.model_specs(),
        max_tokens=scenario.workload.max_tokens,
    )


def build_fleet(scenario: Scenario, *, macro_steps: bool = True) -> SimFleet:
    """The scenario's simulated instances. ``macro_steps=False`` simulates every engine step as its
    own event: the same results, an order of magnitude slower (the reference for tests and benchmarks)."""
    instances = []
    for group in scenario.instances:
        costs = scenario.cost_models_for(group.gpu)
        for i in range(group.count):
            inst = SimInstance(
                f"{group.name or group.gpu}-{i}",
                group.gpu,
                costs,
                initial_model=group.models[0],
                warm_models=tuple(group.models[1:]),
                host_mem_gb=group.host_mem_gb,
                preemption_mode=EvictMode(scenario.engine.preemption),
                max_model_residency_s=scenario.engine.max_model_residency_s,
                min_model_residency_s=scenario.engine.min_model_residency_s,
                max_num_seqs=group.max_num_seqs,
                max_num_batched_tokens=group.max_num_batched_tokens,
            )
            if not macro_steps:
                inst.max_macro_steps = 1  # one event per engine step (the reference for tests)
            instances.append(inst)
    return SimFleet(instances)


def run_policy(
    scenario: Scenario,
    policy: str,
    requests: Sequence[Request],
    rejected: Sequence[wl.Rejected] = (),
    *,
    on_progress: Callable[[int], None] | None = None,
    autoload: bool = True,
    macro_steps: bool = True,
) -> PolicyResult:
    """Simulate ``requests`` on the scenario's fleet with the named policy."""
    t0 = time.perf_counter()
    pm = get_plugin_manager(autoload=autoload)
    info = policy_registry(pm).get(policy)
    built = info.factory(PolicyContext(scenario.reference_cost_models(), scenario.slo_classes()))
    for n, plugin in enumerate(built if isinstance(built, list) else [built]):
        pm.register(plugin, name=f"{POLICY_PREFIX}{policy}:{n}")
    fleet = build_fleet(scenario, macro_steps=macro_steps)
    backend = SimBackend(fleet)
    pm.register(backend, name="sim-backend")
    hook = pm.hook
    hook.qlm_configure(pm=pm)
    backend.attach(pm)
    ids = list(fleet.instances)
    outcomes: list[RequestOutcome] = []
    queue_manager = bool(hook.qlm_submit.get_hookimpls())
    told: dict[str, Told] = {}  # what each request was told at admission

    def on_arrival(request: Request) -> None:
        now = fleet.now
        if queue_manager:
            admission = hook.qlm_submit(request=request, now=now)
            if admission is not None:
                told[request.id] = (admission.wait_mean_s, admission.p_meet)
            if admission is not None and not admission.accepted:
                outcome = RequestOutcome(request, Status.REJECTED, reason=admission.reason)
                outcomes.append(outcome)
                hook.qlm_request_finished(outcome=outcome, now=now)
            return
        states = [hook.qlm_instance_state(instance_id=i, detail=False) for i in ids]
        target = hook.qlm_choose_instance(
            request=request, instances=[s for s in states if s.healthy], now=now
        )
        if target is None or not hook.qlm_dispatch(instance_id=target, request=request):
            outcome = RequestOutcome(request, Status.REJECTED, reason="no instance accepted the request")
            outcomes.append(outcome)
            hook.qlm_request_finished(outcome=outcome, now=now)

    last_arrival = requests[-1].arrival_time if requests else 0.0

    def on_tick(now: float) -> bool:
        return any(hook.qlm_tick(now=now))

    fleet.run(
        requests,
        on_arrival,
        until=last_arrival + DRAIN_LIMIT_S,
        on_progress=on_progress,
        on_tick=on_tick if hook.qlm_tick.get_hookimpls() else None,  # as the coordinator's timer
    )
    outcomes.extend(backend.outcomes.values())
    # A request the policy never handed to an engine (still queued when the run ended) is missed,
    # not left out: leaving it out would credit a policy for never serving a model at all.
    seen = {o.request.id for o in outcomes}
    outcomes.extend(RequestOutcome(r, Status.UNFINISHED) for r in requests if r.id not in seen)
    span = run_span([o for o in outcomes if o.status is not Status.REJECTED])
    by_class: dict[str, list[RequestOutcome]] = {}
    for o in outcomes:
        by_class.setdefault(o.request.slo_class, []).append(o)
    # Records that failed validation never became requests (no class): they count, as misses, only
    # in the overall figures.
    invalid = [
        RequestOutcome(Request(f"invalid-{r.index}", "", 1, 1, 0.0), Status.REJECTED, reason=str(r.error))
        for r in rejected
    ]
    counters: dict[str, float] = {}
    busy = 0.0
    for inst in fleet.instances.values():
        busy += inst.busy_s
        for k, v in inst.counters.items():
            counters[k] = counters.get(k, 0) + v
    for stats in hook.qlm_stats():
        for k, v in (stats or {}).items():
            counters[k] = counters.get(k, 0) + v
    return PolicyResult(
        policy=policy,
        reference=info.reference,
        overall=summarize(outcomes + invalid, span),
        classes={c: summarize(v, span) for c, v in sorted(by_class.items())},
        gpu_busy_fraction=min(1.0, busy / (len(ids) * span)) if span > 0 and not math.isinf(span) else 0.0,
        counters=counters,
        wall_s=time.perf_counter() - t0,
        outcomes=outcomes,
        estimates=estimate_accuracy(outcomes, told),
    )
