"""The queue manager: QLM's global queue, virtual queues, estimates, plans and serving operations.

One global queue holds every request not yet on an engine, ordered by urgency (least laxity on the
predicted output length). The planner places requests (by group) in per-instance virtual queues and
orders model swaps; instances *pull* when they have room, which binds placement late: an instance
with room takes the most urgent request it can serve, from its own virtual queue or from the
virtual queue of an instance that cannot start that request now (load balancing). The queue
manager carries the plan out through the backend hooks: eviction (swap when the backend can, else
recompute) to make room for a request that would otherwise miss its SLO, model swaps (a model's
groups batched on one instance), warm starts (weights staged in host memory ahead of a swap), and
holding batch work back while interactive load needs the seats.

Waiting times come from a pooled, fluid multi-server model: the seats of every instance serving
the model, freeing as their running requests finish (predicted), working through the queued
seat-seconds ahead of the request (a Fenwick tree over laxity keeps that O(log n)); the variance is
the sum of the predicted variances ahead (central limit theorem) over the seats, widened by a
Student-t when few requests are ahead.

It is a plugin: ``qlm simulate --policies qlm`` registers it with a predictor and the planner; the
driver calls ``pm.hook.qlm_configure(pm=pm)`` first. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import pluggy

from qlm_plugin.brain.waiting_time import (
    ResidualCalibrator,
    StepCalibrator,
    heavy_tail_factor,
    p_meet,
    pooled_start_s,
)
from qlm_plugin.brain.work_index import WorkIndex
from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.distributions import LengthDistribution, WaitEstimate
from qlm_plugin.domain.groups import GroupKey, group_key
from qlm_plugin.domain.instance import EvictMode, InstanceInfo, InstanceState, RunningView
from qlm_plugin.domain.outcome import Admission, RequestOutcome
from qlm_plugin.domain.plan import Evict, LoadModel, Plan
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl, list_instances

#: A request whose probability of meeting its SLO falls below this is flagged at admission.
FLAG_BELOW_P = 0.05
#: Decode batch at which a request's seat time is priced before the instance is known.
REFERENCE_BATCH = 64
#: A TTFT-bound request binds early to an engine whose own queue is shorter than this.
EARLY_BIND_MAX_WAITING = 8  # TTFT-bound requests waiting there (batch waiting there does not count)
#: How long rates and step-time factors are reused before being recomputed, seconds.
RECENT_S = 0.1
#: One pull in this many serves the oldest late request first (no starvation under overload).
LATE_SHARE = 16
#: KV blocks a request is assumed to need when counting free slots (about 1.5k tokens).
KV_BLOCKS_PER_REQUEST = 96
#: A warm-start staging of the same weights on the same instance is not repeated within this time.
STAGE_AGAIN_AFTER_S = 300.0
#: Memory of the arrival-rate estimates, seconds.
RATE_MEMORY_S = 10.0
#: Seats held for TTFT-bound arrivals cover this quantile of those expected within a service time.
RESERVE_QUANTILE = 0.9
#: Laxity beyond which later TTFT-bound arrivals will overtake a request while it waits.
OVERTAKE_HORIZON_S = 5.0
#: Below this probability of meeting its TTFT an urgent request gets a seat by eviction.
EVICT_BELOW_P = 0.5
#: Queued TTFT-bound requests whose chance is looked at again on each tick (the most urgent).
RECHECK_URGENT = 4
#: A model whose load failed on an instance is not ordered there again for this long, seconds.
LOAD_RETRY_AFTER_S = 60.0


def poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(X <= k) >= q for X ~ Poisson(mean) (a short sum: means here are small;
    scipy's ``poisson.ppf`` costs ~100x more per call on this hot path)."""
    if mean <= 0:
        return 0
    if mean > 100:  # exp(-mean) underflows further on; the normal approximation is close here
        return math.ceil(mean + NormalDist().inv_cdf(q) * math.sqrt(mean))
    term = cdf = math.exp(-mean)
    k = 0
    while cdf < q:
        k += 1
        term *= mean / k
        cdf += term
    return k


@dataclass(slots=True)
class Entry:
    """A request the queue manager knows: queued (``dispatched_at`` None) or on an engine."""

    request: Request
    length: LengthDistribution  # predicted output tokens at submission
    service_s: float  # predicted seat-seconds (prefill + decode at the reference batch)
    service_var: float
    key: tuple[float, float, str]  # urgency: lower first
    planned: str | None = None  # the instance whose virtual queue holds it
    instance: str | None = None  # the instance serving it, once dispatched
    dispatched_at: float | None = None
    late: bool = False  # can no longer meet its SLO: runs after every request that still can
    group: GroupKey = ("", "", -1)  # its request group (model, class, deadline window)
    finish_at: float = math.inf  # predicted, once dispatched
    evicted_for: bool = False  # a seat was freed for it once: never a second eviction


@dataclass(slots=True)
class InstanceView:
    instance_id: str
    costs: dict[str, CostModel]
    calibrators: dict[str, StepCalibrator] = field(default_factory=dict)
    state: InstanceState | None = None
    running: dict[str, Entry] = field(default_factory=dict)
    switched_at: float = -math.inf
    running_batch: int = 0  # running requests without a TTFT SLO
    step_s: float | None = None  # measured time per engine step (decode and mixed-in prefill), EWMA
    failed_loads: dict[str, float] = field(default_factory=dict)  # model -> not loaded here again until
    _last_step_start: float = -math.inf

    def can_load(self, model: str, now: float) -> bool:
        return model in self.costs and now >= self.failed_loads.get(model, -math.inf)

    def observe_steps(self, state: InstanceState) -> None:
        for s in state.step_timings:
            if s.start <= self._last_step_start or s.decode_tokens == 0:
                continue
            self._last_step_start = s.start
            self.step_s = s.duration_s if self.step_s is None else 0.9 * self.step_s + 0.1 * s.duration_s

    def model(self) -> str | None:
        s = self.state
        if s is None:
            return None
        if s.loading_model is not None:
            return s.loading_model
        return s.models_loaded[0] if s.models_loaded else None

    def calibrator(self, model: str) -> StepCalibrator:
        cal = self.calibrators.get(model)
        if cal is None:
            cal = self.calibrators[model] = StepCalibrator(self.costs[model])
        return cal

    def free_slots(self) -> int:
        """Requests this instance could start now: free seats, bounded by free KV cache (a request
        it cannot start would wait in the engine's own queue, out of the planner's reach)."""
        s = self.state
        if s is None or not s.healthy or s.loading_model is not None or not s.models_loaded or s.num_waiting:
            return 0
        kv = (s.kv_blocks_total - s.kv_blocks_used) // KV_BLOCKS_PER_REQUEST
        return max(0, min(s.max_num_seqs - s.num_running, kv))


def laxity_key(
    request: Request, length: LengthDistribution, cost: CostModel | None
) -> tuple[float, float, str]:
    """Least-laxity urgency with predicted work (90th percentile, to be safe): the TTFT deadline
    less the prefill, and the end-to-end deadline less the whole predicted service, whichever binds.
    Absolute, so it does not drift with time; requests without deadlines come last, by arrival."""
    if cost is None:
        prefill, decode = 0.0, 0.0
    else:
        prefill = cost.step_s(request.prompt_tokens, 0)
        decode = length.quantile(0.9) * cost.decode_tpot_s(32)
    lax = math.inf
    if request.slo.ttft_deadline is not None:
        lax = request.slo.ttft_deadline - prefill
    if request.slo.e2e_deadline is not None:
        lax = min(lax, request.slo.e2e_deadline - prefill - decode)
    return (lax, request.arrival_time, request.id)


@dataclass(slots=True)
class GroupAgg:
    """Running totals of one request group's queued requests (kept as requests come and go, so a
    replanning over 10,000 queued requests reads a few hundred groups, not the requests)."""

    ids: dict[str, Entry] = field(default_factory=dict)
    seat_s: float = 0.0
    weight: float = 0.0
    urgency: float = math.inf
    deadline: float = math.inf
    stale: bool = False  # the most urgent member left: recompute the minima before use

    def refresh(self) -> None:
        if self.stale:
            self.urgency = min((e.key[0] for e in self.ids.values()), default=math.inf)
            self.deadline = min((e.request.slo.first_deadline() for e in self.ids.values()), default=math.inf)
            self.stale = False


class ModelQueue:
    """The global queue of one model: urgency order, a late list, the work index, and the running
    totals of its request groups."""

    def __init__(self, groups: dict[GroupKey, GroupAgg]) -> None:
        self.order: list[tuple[tuple[float, float, str], str]] = []  # (key, id), sorted
        self.late: deque[str] = deque()
        self.index = WorkIndex()
        self.groups = groups

    def add(self, e: Entry) -> None:
        bisect.insort(self.order, (e.key, e.request.id))
        self.index.add(e.key[0], e.service_s, e.service_var, prompt=e.request.prompt_tokens)
        agg = self.groups.get(e.group)
        if agg is None:
            agg = self.groups[e.group] = GroupAgg()
        agg.ids[e.request.id] = e
        agg.seat_s += e.service_s
        agg.weight += e.request.weight
        agg.urgency = min(agg.urgency, e.key[0])
        agg.deadline = min(agg.deadline, e.request.slo.first_deadline())

    def _leave_group(self, e: Entry) -> None:
        agg = self.groups.get(e.group)
        if agg is None or agg.ids.pop(e.request.id, None) is None:
            return
        if not agg.ids:
            del self.groups[e.group]
            return
        agg.seat_s -= e.service_s
        agg.weight -= e.request.weight
        if e.key[0] <= agg.urgency or e.request.slo.first_deadline() <= agg.deadline:
            agg.stale = True

    def make_late(self, e: Entry) -> None:
        self.index.remove(e.key[0], e.service_s, e.service_var, prompt=e.request.prompt_tokens)
        self._leave_group(e)
        e.late = True
        self.late.append(e.request.id)

    def remove(self, e: Entry) -> None:
        if e.late:
            self.late.remove(e.request.id)
            return
        i = bisect.bisect_left(self.order, (e.key, e.request.id))
        if i < len(self.order) and self.order[i][1] == e.request.id:
            del self.order[i]
            self.index.remove(e.key[0], e.service_s, e.service_var, prompt=e.request.prompt_tokens)
            self._leave_group(e)

    def __len__(self) -> int:
        return len(self.order) + len(self.late)


class QueueManager:
    """QLM's queue manager as a plugin (see the module docstring).

    ``clairvoyant``: use true output lengths instead of the predictor (the ``oracle`` reference).
    """

    def __init__(
        self,
        cost_models: dict[str, CostModel],
        *,
        replan_interval_s: float = 1.0,
        min_model_residency_s: float = 30.0,
        evict: bool = True,
        hold_back_batch: bool = True,
        clairvoyant: bool = False,
        repredict_min_s: float = 0.0,
    ) -> None:
        self._ref_cost = cost_models
        # An overdue request is predicted again no sooner than this (on a wall clock, every call
        # comes at a new time: without it the same requests would be re-predicted on every call).
        self.repredict_min_s = repredict_min_s
        self.replan_interval_s = replan_interval_s
        self.min_model_residency_s = min_model_residency_s
        self.evict_enabled = evict
        self.hold_back_batch = hold_back_batch
        self.clairvoyant = clairvoyant
        self.pm: pluggy.PluginManager | None = None
        self._hook: Any = None
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.groups: dict[GroupKey, GroupAgg] = {}  # queued request groups, kept incrementally
        self.group_plan: dict[GroupKey, str] = {}  # the last plan: group -> instance
        self.instances: dict[str, InstanceView] = {}
        self.last_plan_at = -math.inf
        self.last_plan: Plan | None = None
        # (planning seconds, the plan or None, now): the coordinator's telemetry
        self.on_replan: Callable[[float, Plan | None, float], None] | None = None
        self.counters: dict[str, float] = {
            "flagged": 0,
            "evictions": 0,
            "pulls": 0,
            "steals": 0,
            "swaps_ordered": 0,
            "replans": 0,
            "milp_plans": 0,
            "prefetches": 0,
            "held_back": 0,
            "lso_failed": 0,
        }
        self._arrivals: dict[str, tuple[float, float, float, float]] = {}  # (req/s, seat-s/s, tokens/s, at)
        # (request id, admitted at, predicted wait, p_meet): scored when the request finishes
        self.wait_log: deque[tuple[str, float, float, float]] = deque(maxlen=200_000)
        self._raw: dict[str, tuple[float, float]] = {}  # id -> raw model (wait, completion) predictions
        self._calib: dict[tuple[str, str, int], ResidualCalibrator] = {}
        self._ttft: dict[str, float] = {}
        self._met: dict[str, bool] = {}
        self._residuals: dict[str, tuple[float, np.ndarray]] = {}
        self._memo: dict[tuple[str, str], tuple[int, Any]] = {}
        self._recent_memo: dict[tuple[str, str], tuple[float, float]] = {}
        self._clock = 0.0  # the latest time the queue manager was called with
        self._version = 0  # bumped whenever a cached instance state changes
        self._models_version = 0  # bumped when states are refreshed (models may have changed)
        self._pull_count = 0
        self._staged: dict[tuple[str, str], float] = {}  # (instance, model) -> when weights were staged
        # model -> (predicted finish, request id) of its running requests, sorted
        self._finishing: dict[str, list[tuple[float, str]]] = {}
        # TTFT-bound requests handed to an engine's own queue before a seat was free there
        self._bound_early: dict[str, Entry] = {}

    # ------------------------------------------------------------------ wiring
    @hookimpl
    def qlm_configure(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook
        for info in list_instances(pm):
            self.instances[info.instance_id] = InstanceView(info.instance_id, dict(self._ref_cost))
        for view in self.instances.values():
            self._refresh(view)

    @hookimpl
    def qlm_instance_joined(self, info: InstanceInfo, now: float) -> None:
        if info.instance_id in self.instances:
            return
        view = self.instances[info.instance_id] = InstanceView(info.instance_id, dict(self._ref_cost))
        self._refresh(view)
        self._residuals.clear()

    @hookimpl
    def qlm_instance_left(self, instance_id: str, now: float) -> None:
        view = self.instances.pop(instance_id, None)
        if view is None:
            return
        self._version += 1
        self._models_version += 1
        self._residuals.clear()
        for rid in list(view.running):
            self.requeue(rid, now)
        for key in [k for k, iid in self.group_plan.items() if iid == instance_id]:
            del self.group_plan[key]

    @hookimpl
    def qlm_operation_failed(
        self,
        instance_id: str,
        operation: str,
        model: str | None,
        request_id: str | None,
        error: str,
        now: float,
    ) -> None:
        view = self.instances.get(instance_id)
        if view is None:
            return
        self.counters["lso_failed"] += 1
        if operation != "load_model" or model is None:
            return  # a failed eviction: the request it was for waits for a seat in the engine's queue
        # The model is not coming there: its groups are placed elsewhere, the load is not ordered
        # there again for a while, and the instance keeps its model as if just swapped in.
        view.failed_loads[model] = now + LOAD_RETRY_AFTER_S
        self._staged.pop((instance_id, model), None)
        for key in [k for k, iid in self.group_plan.items() if iid == instance_id and k[0] == model]:
            del self.group_plan[key]
        for e in self.entries.values():
            if e.planned == instance_id and e.dispatched_at is None and e.request.model == model:
                e.planned = None
        self._refresh(view)
        self._residuals.clear()
        self.replan(now)

    def requeue(self, request_id: str, now: float) -> bool:
        """Put a dispatched request back in the global queue (its engine was lost or gave it back):
        same deadlines and urgency, dispatched again by the next pull. False if it is not dispatched."""
        e = self.entries.get(request_id)
        if e is None or e.dispatched_at is None:
            return False
        self._bound_early.pop(request_id, None)
        view = self.instances.get(e.instance) if e.instance is not None else None
        if view is not None and view.running.pop(request_id, None) is not None:
            view.running_batch -= e.request.slo.ttft_deadline is None
            self._count_running(view, -1)
        fin = self._finishing.get(e.request.model)
        if fin:
            i = bisect.bisect_left(fin, (e.finish_at, request_id))
            if i < len(fin) and fin[i] == (e.finish_at, request_id):
                del fin[i]
        e.instance = e.planned = None
        e.dispatched_at = None
        e.finish_at = math.inf
        e.late = False
        self._residuals_changed(e.request.model)
        self.queue(e.request.model).add(e)
        return True

    def refresh(self, instance_id: str) -> None:
        """Read an instance's state again now (its model or health changed between ticks)."""
        view = self.instances.get(instance_id)
        if view is not None:
            self._refresh(view)
            self._residuals.clear()

    def _refresh(self, view: InstanceView, detail: bool = False) -> InstanceState:
        state: InstanceState = self._hook.qlm_instance_state(instance_id=view.instance_id, detail=detail)
        view.state = state
        self._version += 1
        self._models_version += 1
        model = view.model()
        if detail and state.step_timings and model is not None and model in view.costs:
            view.calibrator(model).observe(state.step_timings)
            view.observe_steps(state)
        return state

    def queue(self, model: str) -> ModelQueue:
        q = self.queues.get(model)
        if q is None:
            q = self.queues[model] = ModelQueue(self.groups)
        return q

    # ------------------------------------------------------------------ prediction
    def _predict(self, request: Request, generated: int = 0) -> LengthDistribution:
        if self.clairvoyant:
            true = (
                request.true_output_tokens if request.true_output_tokens is not None else request.max_tokens
            )
            return LengthDistribution.point(max(0, true - generated))
        dist = self._hook.qlm_predict_output_length(request=request, generated_tokens=generated)
        if dist is None:  # no predictor installed: half of max_tokens, with wide uncertainty
            return LengthDistribution(request.max_tokens / 2, (request.max_tokens / 4) ** 2)
        return dist  # type: ignore[no-any-return]

    def _entry(self, request: Request) -> Entry:
        length = self._predict(request)
        cost = self._ref_cost.get(request.model)
        if cost is None:
            service, var = 0.0, 0.0
        else:
            tpot = cost.decode_tpot_s(REFERENCE_BATCH)
            service = cost.step_s(request.prompt_tokens, 0) + length.mean * tpot
            var = length.var * tpot * tpot
        return Entry(
            request, length, service, var, laxity_key(request, length, cost), group=group_key(request)
        )

    # ------------------------------------------------------------------ estimation
    def _cached(self, what: str, model: str, compute: Callable[[], Any], version: int | None = None) -> Any:
        """Per-model figures that only change when instance states do: computed once per state
        version (bumped by every refresh, dispatch, completion and swap), or per ``version``."""
        key = (what, model)
        v = self._version if version is None else version
        hit = self._memo.get(key)
        if hit is not None and hit[0] == v:
            return hit[1]
        value = compute()
        self._memo[key] = (v, value)
        return value

    def _recent(self, what: str, model: str, now: float, compute: Callable[[], float]) -> float:
        """Slowly drifting figures (rates, step-time factors): recomputed at most every
        ``RECENT_S`` of clock time, whatever changed meanwhile."""
        key = (what, model)
        hit = self._recent_memo.get(key)
        if hit is not None and now - hit[0] < RECENT_S:
            return hit[1]
        value = compute()
        self._recent_memo[key] = (now, value)
        return value

    def _serving(self, model: str) -> list[InstanceView]:
        # Which instances serve a model changes only with refreshed states (swaps), not dispatches.
        return self._cached(  # type: ignore[no-any-return]
            "serving",
            model,
            lambda: [
                v
                for v in self.instances.values()
                if v.model() == model and v.state is not None and v.state.healthy
            ],
            version=self._models_version,
        )

    def _residuals_changed(self, model: str) -> None:
        """A dispatch or a completion changed the model's seats. On a wall clock the cached seats
        expire with time instead (a few ms), or a busy queue would rebuild them on every call."""
        if self.repredict_min_s == 0:
            self._residuals.pop(model, None)

    def _seat_residuals(self, model: str, now: float) -> np.ndarray:
        """Seconds from now until each seat of the model's serving instances frees (sorted): free
        seats at 0, busy ones at their request's predicted finish (kept sorted as requests are
        dispatched and finish), seats of an instance still loading the model at its ready time."""
        cached = self._residuals.get(model)
        if cached is not None:
            age = now - cached[0]
            if age == 0:
                return cached[1]
            if 0 < age < self.repredict_min_s / 4:
                # Wall clock: reused for a few ms (seats free as time passes), not rebuilt per call.
                return np.asarray(np.maximum(cached[1] - age, 0.0))
        busy = self._finishing.setdefault(model, [])
        self._repredict_overdue(busy, now)
        seats = 0
        loading: list[float] = []
        for view in self._serving(model):
            s = view.state
            assert s is not None
            n = min(s.max_num_seqs, view.costs[model].max_num_seqs)
            if s.loading_model == model:
                loading.extend([view.costs[model].load_s(warm=model in s.models_warm)] * n)
            else:
                seats += n
        r = np.maximum(np.array([f for f, _ in busy[:seats]], dtype=float) - now, 0.0)
        out: np.ndarray = np.concatenate(
            [np.zeros(max(0, seats - len(r))), r[: max(0, seats)], np.array(loading)]
        )
        out.sort()
        self._residuals[model] = (now, out)
        return out

    def _repredict_overdue(self, busy: list[tuple[float, str]], now: float, limit: int = 64) -> None:
        """Running requests that outlived their prediction: predict again from their progress
        (the remaining length given the tokens generated so far), so their seat is not taken for
        free while they keep running."""
        while busy and busy[0][0] <= now and limit > 0:
            _, rid = busy.pop(0)
            limit -= 1
            e = self.entries.get(rid)
            if e is None or e.instance is None:
                continue
            view = self.instances[e.instance]
            tpot = self._tpot(view, e.request.model)
            generated = int((now - (e.dispatched_at or now)) / max(tpot, 1e-6))
            remaining = self._predict(e.request, min(generated, e.request.max_tokens - 1))
            e.finish_at = now + max(max(remaining.mean, 1.0) * tpot, self.repredict_min_s)
            bisect.insort(busy, (e.finish_at, rid))

    def _tpot(self, view: InstanceView, model: str) -> float:
        """Time per output token on ``view`` now: the measured step time when there is one (it
        includes the prefill mixed into decode steps under load), else the calibrated cost model."""
        if view.step_s is not None and view.running:
            return view.step_s
        return view.calibrator(model).step_s(0, max(1, len(view.running)))

    def _load_factor(self, model: str) -> float:
        """Measured step time over the reference step time the queued seat-seconds were priced at."""
        return self._recent("load", model, self._clock, lambda: self._compute_load_factor(model))

    def _compute_load_factor(self, model: str) -> float:
        cost = self._ref_cost.get(model)
        serving = self._serving(model)
        if cost is None or not serving:
            return 1.0
        tpot = sum(self._tpot(v, model) for v in serving) / len(serving)
        return max(0.5, tpot / cost.decode_tpot_s(REFERENCE_BATCH))

    def estimate(self, entry: Entry, now: float, *, record: bool = True) -> WaitEstimate:
        """Wait until first token and completion, pooled over the instances serving the model.
        ``record``: keep the raw prediction, to calibrate against the outcome (an admission's; a
        later look at a queued request predicts from another time)."""
        r = entry.request
        if entry.dispatched_at is not None and entry.instance is not None:
            # on an engine with a seat: its prefill at the next step, then its decode
            view = self.instances[entry.instance]
            tpot = self._tpot(view, r.model)
            wait = view.calibrator(r.model).step_s(r.prompt_tokens, len(view.running)) + tpot
            done = wait + entry.length.mean * tpot
            sd = math.sqrt(entry.length.var) * tpot
            return WaitEstimate(entry.instance, wait, 0.0, done, sd, p_meet(r, now, wait, 0.0, done, sd))
        q = self.queue(r.model)
        count, work, var = q.index.ahead(entry.key[0])
        residuals = self._seat_residuals(r.model, now)
        serving = self._serving(r.model)
        if not serving:
            # nobody serves it: the cheapest swap, then it runs first
            cands = [v for v in self.instances.values() if r.model in v.costs and v.state is not None]
            if not cands:
                return WaitEstimate("", math.inf, 0.0, math.inf, 0.0, 0.0)
            load = min(v.costs[r.model].load_s(warm=r.model in v.state.models_warm) for v in cands)  # type: ignore[union-attr]
            seats = cands[0].costs[r.model].max_num_seqs
            residuals = np.full(seats, load)
        seats = max(1, len(residuals))
        scale = self._load_factor(r.model)
        inflow = 0.0
        if entry.key[0] - now > OVERTAKE_HORIZON_S:
            # capped: a transient burst must not make the wait infinite
            inflow = min(self._urgent_rates(r.model, now)[1] * scale, 0.9 * seats)
        start = pooled_start_s(residuals, work * scale, inflow)
        # The other bottleneck: the per-step prefill token budget (prompt tokens ahead, plus urgent
        # prompts arriving meanwhile, at the fleet's prefill rate).
        capacity = self._prefill_rate(r.model)
        if capacity > 0:
            urgent_tokens = self._urgent_rates(r.model, now)[2] if inflow > 0 else 0.0
            spare = max(capacity - urgent_tokens, 0.1 * capacity)
            start = max(start, q.index.prompt_ahead(entry.key[0]) / spare)
        cost = self._ref_cost.get(r.model)
        prefill = cost.step_s(r.prompt_tokens, 0) if cost else 0.0
        tpot = cost.decode_tpot_s(REFERENCE_BATCH) * scale if cost else 0.0
        wait_std = math.sqrt(var) * scale / seats * heavy_tail_factor(count)
        wait_mean = start + prefill
        done_mean = wait_mean + entry.length.mean * tpot
        done_std = math.sqrt(wait_std * wait_std + entry.length.var * tpot * tpot)
        pm = p_meet(r, now, wait_mean, wait_std, done_mean, done_std)
        # Online calibration against outcomes (per class): corrected means, empirical P(meet).
        raw_wait, raw_done = wait_mean, done_mean
        cw = self._calibrator(r.slo_class, "wait", raw_wait)
        cd = self._calibrator(r.slo_class, "done", raw_done)
        wait_mean, done_mean = cw.corrected(raw_wait), cd.corrected(raw_done)
        probs = []
        if r.slo.ttft_deadline is not None:
            probs.append(cw.p_within(raw_wait, r.slo.ttft_deadline - now))
        if r.slo.e2e_deadline is not None:
            probs.append(cd.p_within(raw_done, r.slo.e2e_deadline - now))
        if probs and all(p is not None for p in probs):
            pm = min(p for p in probs if p is not None)
        if record:
            self._raw[r.id] = (raw_wait, raw_done)
        iid = serving[0].instance_id if serving else ""
        return WaitEstimate(iid, wait_mean, wait_std, done_mean, done_std, pm)

    def _calibrator(self, slo_class: str, what: str, raw_s: float) -> ResidualCalibrator:
        """The calibrator of a class, quantity and magnitude band of the raw prediction (errors of a
        0.1 s wait and of a 30 s wait have different causes, so they are corrected apart)."""
        band = -1 if not math.isfinite(raw_s) else max(-3, min(8, math.floor(math.log2(max(raw_s, 0.05)))))
        key = (slo_class, what, band)
        c = self._calib.get(key)
        if c is None:
            c = self._calib[key] = ResidualCalibrator(min_samples=30)
        return c

    # ------------------------------------------------------------------ admission
    @hookimpl
    def qlm_submit(self, request: Request, now: float) -> Admission:
        if not any(request.model in v.costs for v in self.instances.values()):
            return Admission(
                request.id, False, False, reason=f"no instance can serve model {request.model!r}"
            )
        self._clock = now
        entry = self._entry(request)
        self.entries[request.id] = entry
        self._note_arrival(entry, now)
        # No state polling here: the cached instance states follow dispatches and completions, and
        # are refreshed when an instance reports room and on every tick.
        est = self.estimate(entry, now)
        flagged = est.p_meet < FLAG_BELOW_P
        if flagged:
            self.counters["flagged"] += 1
        if (
            self.evict_enabled
            and request.slo.ttft_deadline is not None
            and est.p_meet < EVICT_BELOW_P
            and self._evict_for(entry, now)
        ):
            # Handed to an engine with a seat made for it: it starts at the next step.
            after = self.estimate(entry, now)
            self.wait_log.append((request.id, now, after.wait_mean_s, after.p_meet))
            return Admission(request.id, True, True, entry.instance, after.wait_mean_s, after.p_meet)
        self.wait_log.append((request.id, now, est.wait_mean_s, est.p_meet))
        self._enqueue(entry)
        planned = self.instances.get(entry.planned) if entry.planned is not None else None
        if planned is not None and planned.free_slots() > 0:
            self._pull(planned, planned.free_slots(), now)  # room now: it binds at once
        elif request.slo.ttft_deadline is not None and now < request.slo.ttft_deadline:
            self._bind_early(entry, now)
        if now - self.last_plan_at >= self.replan_interval_s:
            self.replan(now)
        return Admission(
            request.id,
            True,
            not flagged,
            entry.planned,
            est.wait_mean_s,
            est.p_meet,
            reason="SLO cannot be met at the current load" if flagged else "",
        )

    def _bind_early(self, entry: Entry, now: float) -> None:
        """A TTFT-bound request with no room anywhere joins the shortest engine queue at once: the
        engine ranks it by urgency, so it passes the batch work waiting there the moment KV frees
        (waiting for a pull would leave it behind work the engine already holds). Only while engine
        queues are short: under overload the global queue, with its late list, keeps control."""
        serving = [v for v in self._serving(entry.request.model) if v.state is not None]
        if not serving:
            return

        def urgent_waiting(v: InstanceView) -> int:
            # The engine's own queue, as it reports it now: the TTFT-bound requests waiting there.
            if v.state is None or v.state.num_waiting == 0:
                return 0
            state = self._hook.qlm_instance_state(instance_id=v.instance_id, detail=False)
            return int(state.num_waiting_urgent)

        # Ask at most two engines (the least loaded first): the answer costs a copy of their queue.
        def load(v: InstanceView) -> tuple[int, int, str]:
            s = v.state
            return (
                (s.num_waiting, s.num_running, v.instance_id)
                if s is not None
                else (1 << 30, 0, v.instance_id)
            )

        for view in sorted(serving, key=load)[:2]:
            if urgent_waiting(view) < EARLY_BIND_MAX_WAITING:
                if self._dispatch(view, entry, now):
                    self._bound_early[entry.request.id] = entry  # watched until it starts
                return

    def _note_arrival(self, entry: Entry, now: float) -> None:
        """Exponentially decayed rates (10 s memory) of TTFT-bound arrivals per model: requests/s
        and seat-seconds/s (the urgent inflow that overtakes batch work while it waits)."""
        if entry.request.slo.ttft_deadline is None:
            return
        m = entry.request.model
        rate, work, prompt, last = self._arrivals.get(m, (0.0, 0.0, 0.0, now))
        decay = math.exp(-(now - last) / RATE_MEMORY_S)
        self._arrivals[m] = (
            rate * decay + 1.0 / RATE_MEMORY_S,
            work * decay + entry.service_s / RATE_MEMORY_S,
            prompt * decay + entry.request.prompt_tokens / RATE_MEMORY_S,
            now,
        )

    def _urgent_rates(self, model: str, now: float) -> tuple[float, float, float]:
        """(requests/s, seat-seconds/s, prompt tokens/s) of recent TTFT-bound arrivals."""
        rate, work, prompt, last = self._arrivals.get(model, (0.0, 0.0, 0.0, now))
        decay = math.exp(-(now - last) / RATE_MEMORY_S)
        return rate * decay, work * decay, prompt * decay

    def _prefill_rate(self, model: str) -> float:
        """Prompt tokens per second the model's serving instances can prefill at most: one over
        the calibrated per-token prefill cost, less the share of each step the decodes take."""
        return self._recent("prefill", model, self._clock, lambda: self._compute_prefill_rate(model))

    def _compute_prefill_rate(self, model: str) -> float:
        total = 0.0
        for view in self._serving(model):
            b0, b1, b2 = view.calibrator(model).coef
            if b1 <= 0:
                continue
            step = self._tpot(view, model)
            decode_share = min(0.9, (b0 + b2 * len(view.running)) / max(step, 1e-6))
            total += (1.0 - decode_share) / b1
        return total

    def _enqueue(self, entry: Entry) -> None:
        self.queue(entry.request.model).add(entry)
        if entry.planned is None:
            entry.planned = self._cached(
                "roomiest", entry.request.model, lambda: self._roomiest(entry.request.model)
            )

    def _roomiest(self, model: str) -> str | None:
        serving = self._serving(model)
        if not serving:
            return None
        return min(serving, key=lambda v: (-v.free_slots(), v.instance_id)).instance_id

    # ------------------------------------------------------------------ pulling
    @hookimpl
    def qlm_instance_ready(self, instance_id: str, free_slots: int, now: float) -> None:
        view = self.instances.get(instance_id)
        if view is None:
            return
        self._clock = now
        self._refresh(view)
        self._pull(view, free_slots, now)
        if now - self.last_plan_at >= self.replan_interval_s:
            self.replan(now)

    def _interactive_reserve(self, view: InstanceView, model: str, now: float) -> int:
        """Seats kept free for TTFT-bound arrivals expected on this instance (batch is held back)."""
        rate = self._urgent_rates(model, now)[0]
        cost = view.costs.get(model)
        if cost is None or rate <= 0:
            return 0
        serving = len(self._serving(model)) or 1
        mean_service = cost.step_s(1024, 0) + 150 * cost.decode_tpot_s(REFERENCE_BATCH)
        # Urgent arrivals within a service time are Poisson: hold the seats that take them at once
        # nine times in ten. One arrival long ago (a decayed rate) holds none: eviction covers it.
        return poisson_quantile(1.5 * rate / serving * mean_service, RESERVE_QUANTILE)

    def _pull(self, view: InstanceView, slots: int, now: float) -> None:
        """Request pulling: hand ``view`` the most urgent requests it can serve (its own virtual
        queue first in urgency order; another instance's only if that one cannot start it now)."""
        model = view.model()
        if model is None or slots <= 0 or model not in self.queues:
            return
        q = self.queues[model]
        s = view.state
        seats = s.max_num_seqs if s is not None else slots
        running_batch = view.running_batch
        reserve = self._interactive_reserve(view, model, now) if self.hold_back_batch else 0
        # Requests past their deadline go to the late list: they still run, after all that can meet.
        while q.order and self._doomed(self.entries[q.order[0][1]], now):
            _, rid = q.order.pop(0)
            q.make_late(self.entries[rid])
        taken: list[Entry] = []
        # No starvation: late requests run after every request that can still meet its SLO, but
        # one pull in LATE_SHARE serves the oldest late request first, whatever the load.
        self._pull_count += 1
        if q.late and self._pull_count % LATE_SHARE == 0:
            taken.append(self.entries[q.late[0]])
        busy_elsewhere = {v.instance_id: v.free_slots() == 0 for v in self.instances.values()}
        # KV budget: hand over only what the engine can hold (prompt and predicted output), so no
        # request waits in the engine's own queue, where a more urgent later arrival cannot pass it.
        kv_free = (s.kv_blocks_total - s.kv_blocks_used) if s is not None else math.inf
        for _, rid in q.order:
            if len(taken) >= slots:
                break
            e = self.entries[rid]
            planned = self.group_plan.get(e.group, e.planned)
            if planned not in (None, view.instance_id) and not busy_elsewhere.get(planned, True):
                continue  # its own instance can start it now: leave it there
            blocks = (e.request.prompt_tokens + e.length.mean) / 16.0
            if taken and blocks > kv_free:
                break
            kv_free -= blocks
            if e.request.slo.ttft_deadline is None and reserve:
                urgent = e.key[0] - now < 3 * e.service_s
                # The reserve never takes the last seat: an engine with few seats (a black box
                # whose concurrency is being learned) must still run batch work.
                if not urgent and running_batch + 1 > max(1, seats - reserve):
                    self.counters["held_back"] += 1
                    break  # the rest is batch too (interactive keys sort first)
                running_batch += 1
            taken.append(e)
        for rid in list(q.late):
            if len(taken) >= slots:
                break
            if not taken or taken[0].request.id != rid:
                taken.append(self.entries[rid])
        for e in taken:
            self._dispatch(view, e, now)

    def _doomed(self, e: Entry, now: float) -> bool:
        d = e.request.slo.ttft_deadline
        if d is not None:
            return now > d
        d = e.request.slo.e2e_deadline
        return d is not None and now + e.service_s > d

    def _dispatch(self, view: InstanceView, e: Entry, now: float) -> bool:
        if e.dispatched_at is None:
            self.queue(e.request.model).remove(e)
        ok = bool(self._hook.qlm_dispatch(instance_id=view.instance_id, request=e.request))
        if not ok:
            if e.dispatched_at is None:
                e.late = False
                self.queue(e.request.model).add(e)
            return False
        if self.group_plan.get(e.group, e.planned) not in (None, view.instance_id):
            self.counters["steals"] += 1
        e.instance = e.planned = view.instance_id
        e.dispatched_at = now
        view.running[e.request.id] = e
        view.running_batch += e.request.slo.ttft_deadline is None
        model = e.request.model
        e.finish_at = now + e.service_s * self._load_factor(model)
        bisect.insort(self._finishing.setdefault(model, []), (e.finish_at, e.request.id))
        self.counters["pulls"] += 1
        self._residuals_changed(e.request.model)
        self._count_running(view, +1)
        return True

    def _count_running(self, view: InstanceView, delta: int) -> None:
        """Keep an instance's cached counts honest between refreshes (a dispatch or a completion)."""
        if view.state is None:
            return
        self._version += 1
        view.state = replace(
            view.state,
            num_running=max(0, view.state.num_running + delta),
            kv_blocks_used=max(0, view.state.kv_blocks_used + delta * KV_BLOCKS_PER_REQUEST),
        )

    # ------------------------------------------------------------------ eviction
    def _victim(self, views: Sequence[InstanceView], now: float) -> tuple[InstanceView, Entry] | None:
        """The running batch request with the most spare time, among ``views``, that can afford a
        recompute (it costs the whole service again) and still meet its own SLO."""
        best: tuple[float, InstanceView, Entry] | None = None
        for view in views:
            if view.state is None or view.state.loading_model:
                continue
            for e in view.running.values():
                d = e.request.slo.e2e_deadline
                if e.request.slo.ttft_deadline is not None or d is None:
                    continue
                spare = d - now - 2.0 * e.service_s
                if spare > 0 and (best is None or spare > best[0]):
                    best = (spare, view, e)
        return None if best is None else (best[1], best[2])

    def _order_eviction(self, view: InstanceView, victim: Entry, entry: Entry) -> bool:
        """Preempt ``victim`` on ``view`` for the urgent ``entry``, once per urgent request: the
        order names it, so an engine whose own policy already seated it skips the order."""
        entry.evicted_for = True
        caps = view.state.capabilities if view.state is not None else frozenset()
        mode = EvictMode.SWAP if "swap" in caps else EvictMode.RECOMPUTE
        try:
            self._hook.qlm_evict(
                instance_id=view.instance_id,
                request_id=victim.request.id,
                mode=mode,
                for_request_id=entry.request.id,
            )
        except KeyError:
            return False  # it finished meanwhile
        self.counters["evictions"] += 1
        return True

    def _evict_for(self, entry: Entry, now: float) -> bool:
        """Make a seat for a queued urgent request that would otherwise miss its TTFT: preempt the
        running request with the most slack on an instance serving its model, and hand it the seat."""
        deadline = entry.request.slo.ttft_deadline
        if deadline is None or now >= deadline or entry.evicted_for:
            return False
        found = self._victim(self._serving(entry.request.model), now)
        if found is None or not self._order_eviction(*found, entry):
            return False
        # The victim waits in the engine's own queue, behind the urgent request handed over now.
        return self._dispatch(found[0], entry, now)

    def _evict_for_waiting(self, now: float) -> None:
        """An urgent request whose chance has fallen since its admission (the load rose, a seat it
        counted on did not free) gets a seat by eviction, as at admission, once: in the global
        queue (the most urgent few, by their estimate), or bound early to an engine's own queue (when
        no seat there frees before its deadline)."""
        due: list[Entry] = []
        for q in self.queues.values() if self.evict_enabled else ():
            found = 0
            for _, rid in q.order[: 4 * RECHECK_URGENT]:  # urgency order: TTFT-bound ones lead
                e = self.entries[rid]
                if e.request.slo.ttft_deadline is not None and not e.evicted_for:
                    due.append(e)
                    found += 1
                    if found == RECHECK_URGENT:
                        break
        for e in due:
            if e.dispatched_at is None and self.estimate(e, now, record=False).p_meet < EVICT_BELOW_P:
                self._evict_for(e, now)
        for rid, e in list(self._bound_early.items()):
            view = self.instances.get(e.instance or "")
            deadline = e.request.slo.ttft_deadline
            if (
                view is None
                or e.evicted_for
                or deadline is None
                or now >= deadline
                or self.entries.get(rid) is not e
                or not self._waits_in_engine(view, e)
            ):
                del self._bound_early[rid]
                continue
            if self.evict_enabled and self._seat_free_at(view, e, now) + self._prefill_s(e) > deadline:
                victim = self._victim([view], now)
                if victim is not None:
                    self._order_eviction(view, victim[1], e)
                    del self._bound_early[rid]

    @staticmethod
    def _waits_in_engine(view: InstanceView, e: Entry) -> bool:
        """Whether ``e`` may still wait in the engine's own queue (its report names the waiting
        requests, or at least counts the urgent ones)."""
        s = view.state
        if s is None:
            return False
        if s.waiting_ids:
            return e.request.id in s.waiting_ids
        return s.num_waiting_urgent > 0 or s.num_waiting > 0

    def _seat_free_at(self, view: InstanceView, e: Entry, now: float) -> float:
        """When the first of ``view``'s busy seats frees, as predicted (overdue requests predicted
        again from their progress)."""
        self._seat_residuals(e.request.model, now)  # re-predicts the overdue
        early = self._bound_early
        return min(
            (r.finish_at for rid, r in view.running.items() if rid not in early and rid != e.request.id),
            default=now,
        )

    def _prefill_s(self, e: Entry) -> float:
        cost = self._ref_cost.get(e.request.model)
        return cost.step_s(e.request.prompt_tokens, 0) if cost is not None else 0.0

    # ------------------------------------------------------------------ completion and reports
    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        rid = outcome.request.id
        if outcome.first_token_time is not None:
            self._ttft[rid] = outcome.first_token_time - outcome.request.arrival_time
        r = outcome.request
        self._met[rid] = outcome.met_ttft() if r.slo.ttft_deadline is not None else outcome.met_slo()
        raw = self._raw.pop(rid, None)
        if raw is not None and outcome.first_token_time is not None:
            ttft = outcome.first_token_time - r.arrival_time
            self._calibrator(r.slo_class, "wait", raw[0]).observe(raw[0], ttft)
            if outcome.finish_time is not None:
                self._calibrator(r.slo_class, "done", raw[1]).observe(
                    raw[1], outcome.finish_time - r.arrival_time
                )
        e = self.entries.pop(rid, None)
        self._bound_early.pop(rid, None)
        if e is None:
            return
        if e.dispatched_at is None:
            self.queue(r.model).remove(e)
        elif e.instance is not None and e.instance in self.instances:
            view = self.instances[e.instance]
            if view.running.pop(rid, None) is not None:
                view.running_batch -= r.slo.ttft_deadline is None
                self._count_running(view, -1)
            self._residuals_changed(r.model)
            fin = self._finishing.get(r.model)
            if fin:
                i = bisect.bisect_left(fin, (e.finish_at, rid))
                if i < len(fin) and fin[i] == (e.finish_at, rid):
                    del fin[i]

    @hookimpl
    def qlm_stats(self) -> dict[str, float]:
        return {**self.counters, **self.estimator_accuracy()}

    def estimator_accuracy(self) -> dict[str, float]:
        """Predicted (at admission) against measured time to first token: MAPE over waits above
        1 s, and calibration: of requests given P(meet) near 0.9, the fraction that met."""
        pairs = [(p, self._ttft[rid]) for rid, _t, p, _pm in self.wait_log if rid in self._ttft]
        big = [(p, a) for p, a in pairs if a > 1.0]
        out: dict[str, float] = {"est_samples": float(len(pairs))}
        if big:
            out["est_mape_over_1s"] = sum(abs(p - a) / a for p, a in big) / len(big)
            out["est_samples_over_1s"] = float(len(big))
        near = [
            self._met[rid] for rid, _t, _p, pm in self.wait_log if rid in self._met and 0.85 <= pm <= 0.95
        ]
        if near:
            out["est_p09_observed"] = sum(near) / len(near)
            out["est_p09_samples"] = float(len(near))
        return out

    # ------------------------------------------------------------------ planning
    def pending(self) -> bool:
        """Whether work waits: in the global queue, or urgent in an engine's queue (watched)."""
        return bool(self._bound_early) or any(len(q) for q in self.queues.values())

    @hookimpl
    def qlm_tick(self, now: float) -> bool:
        self._clock = now
        if not self.pending():
            return False
        for view in self.instances.values():
            self._refresh(view, detail=True)
        self.replan(now)
        for view in self.instances.values():
            if view.free_slots():
                self._pull(view, view.free_slots(), now)
        self._evict_for_waiting(now)
        return self.pending()

    def replan(self, now: float) -> None:
        """Ask the planner (``qlm_plan``) for placement and LSOs, and carry them out."""
        self.last_plan_at = now
        self.counters["replans"] += 1
        t0 = time.perf_counter()
        states = [v.state for v in self.instances.values() if v.state is not None]
        plan = self._hook.qlm_plan(queue=QueuedView(self), instances=states, now=now)
        if plan is not None:
            self.last_plan = plan
            if plan.solver == "milp":
                self.counters["milp_plans"] += 1
            self.apply(plan, now)
        if self.on_replan is not None:
            self.on_replan(time.perf_counter() - t0, plan, now)

    def apply(self, plan: Plan, now: float) -> None:
        for iid, keys in plan.groups.items():
            if iid in self.instances:
                for k in keys:
                    self.group_plan[k] = iid
        for iid, rids in plan.queues.items():
            if iid not in self.instances:
                continue
            for rid in rids:
                e = self.entries.get(rid)
                if e is not None and e.dispatched_at is None:
                    e.planned = iid
        for action in plan.actions:
            view = self.instances.get(action.instance_id)
            if view is None:
                continue
            if isinstance(action, LoadModel):
                if not view.can_load(action.model, now):
                    continue  # it failed there lately: placed elsewhere
                if action.target == "gpu":
                    current = view.model()
                    if current == action.model:
                        continue
                    own_queued = current is not None and len(self.queue(current)) > 0
                    if now - view.switched_at < self.min_model_residency_s and (view.running or own_queued):
                        continue  # no thrashing: a model keeps its instance a while once swapped in
                    self._hook.qlm_load_model(
                        instance_id=action.instance_id, model=action.model, target="gpu"
                    )
                    view.switched_at = now
                    self.counters["swaps_ordered"] += 1
                else:
                    staged = self._staged.get((action.instance_id, action.model), -math.inf)
                    if now - staged < STAGE_AGAIN_AFTER_S:
                        continue  # already staged (or staging): its weights stay in host memory
                    self._staged[(action.instance_id, action.model)] = now
                    self._hook.qlm_load_model(
                        instance_id=action.instance_id, model=action.model, target="host"
                    )
                    self.counters["prefetches"] += 1
                self._refresh(view)
                self._residuals.clear()
            elif isinstance(action, Evict):
                try:
                    self._hook.qlm_evict(
                        instance_id=action.instance_id,
                        request_id=action.request_id,
                        mode=action.mode,
                        for_request_id=None,
                    )
                    self.counters["evictions"] += 1
                except KeyError:
                    pass

    # ------------------------------------------------------------------ engine-local policy
    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        e = self.entries.get(request.id)
        if e is not None:
            return e.key
        return laxity_key(request, self._predict(request), self._ref_cost.get(request.model))

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        def lax(c: RunningView) -> tuple[float, float, str]:
            return laxity_key(
                c.request, self._predict(c.request, c.generated_tokens), self._ref_cost.get(c.request.model)
            )

        return max(candidates, key=lax)

    @hookimpl
    def qlm_estimate_wait(
        self, request: Request, instance: InstanceState, ahead: Sequence[Request], now: float
    ) -> WaitEstimate | None:
        if request.model not in self._ref_cost:
            return None
        e = self.entries.get(request.id) or self._entry(request)
        return self.estimate(e, now)


class QueuedView(Sequence[Request]):
    """The queued requests, for ``qlm_plan``, without copying them (a planner bound to the queue
    manager reads its group totals instead)."""

    def __init__(self, qm: QueueManager) -> None:
        self._qm = qm

    def __len__(self) -> int:
        return sum(len(q) for q in self._qm.queues.values())

    def __iter__(self) -> Iterator[Request]:
        entries = self._qm.entries
        for q in self._qm.queues.values():
            for _, rid in q.order:
                yield entries[rid].request
            for rid in q.late:
                yield entries[rid].request

    def __getitem__(self, i: int) -> Request:  # type: ignore[override]
        for n, r in enumerate(self):
            if n == i:
                return r
        raise IndexError(i)
