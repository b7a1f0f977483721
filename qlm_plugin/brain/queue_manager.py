"""The queue manager: QLM's brain as one plugin, composed of its roles.

A request's path: ``qlm_submit`` makes it an entry of the global queue (:mod:`.global_queue`) with
its predicted length (``qlm_predict_output_length``, the predictor role); the waiting-time estimator
(:mod:`.estimator`, ``qlm_estimate_wait``) says when it would start; admission (``qlm_admit``)
takes it, flags it or refuses it; an urgent request that would miss its TTFT gets a seat by
eviction; else it waits in the queue, placed in a virtual queue by the planner (``qlm_plan``), until
an instance with room pulls it (``qlm_instance_ready``). The LSO executor (:mod:`.lso`) carries every
decision out through the backend hooks. ``qlm_tick`` refreshes the instances, replans, pulls, and
looks again at urgent requests whose chance fell.

It is a plugin: ``qlm simulate --policies qlm`` registers it with a predictor and the planner; the
driver calls ``pm.hook.qlm_configure(pm=pm)`` first. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pluggy

from qlm_plugin.brain.admission import AdmissionControl
from qlm_plugin.brain.dispatch import EARLY_BIND_MAX_WAITING
from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.eviction import EVICT_BELOW_P
from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import Entry, GlobalQueue, laxity_key
from qlm_plugin.brain.local_policy import Rank, choose_victim, slack_after_recompute
from qlm_plugin.brain.lso import LSOExecutor
from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.distributions import LengthDistribution, WaitEstimate
from qlm_plugin.domain.instance import InstanceInfo, RunningView
from qlm_plugin.domain.outcome import Admission, RequestOutcome
from qlm_plugin.domain.plan import Plan
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl, list_instances

#: With nothing waiting, how often a tick still reads the busy instances' step timings.
IDLE_STEPS_REFRESH_S = 1.0


class QueueManager:
    """QLM's queue manager as a plugin (see the module docstring).

    ``clairvoyant``: use true output lengths instead of the predictor (the ``oracle`` reference).
    ``repredict_min_s``: on a wall clock, how soon an overdue request is predicted again.
    ``refuse_at_admission``: a request ``qlm_admit`` refuses is dropped here (the simulator); on the
    coordinator the front door asks ``qlm_admit`` before it journals a request, and this is off.
    ``length_prior``: the output length when no predictor answers: ``half`` of ``max_tokens`` (wide),
    or ``max_tokens`` itself. The other switches turn one part off (``qlm bench --ablation``).
    """

    def __init__(
        self,
        cost_models: dict[str, CostModel],
        *,
        replan_interval_s: float = 1.0,
        min_model_residency_s: float = 30.0,
        evict: bool = True,
        early_binding: bool = True,
        late_list: bool = True,
        step_budget: bool = True,
        step_deadline: bool = True,
        estimate_at_admission: bool = True,
        refuse_at_admission: bool = True,
        length_prior: str = "half",
        clairvoyant: bool = False,
        repredict_min_s: float = 0.0,
        plan_on_arrival: bool = True,
        bind_waiting: bool = True,
    ) -> None:
        if length_prior not in ("half", "max_tokens"):
            raise ValueError(f"length_prior must be 'half' or 'max_tokens', got {length_prior!r}")
        self.cost_models = cost_models
        self.early_binding = early_binding
        self.bind_waiting = bind_waiting  # an arrival binds early the request left waiting too
        self.estimate_at_admission = estimate_at_admission
        self.refuse_at_admission = refuse_at_admission
        self.length_prior = length_prior
        self.replan_interval_s = replan_interval_s
        # A request of a model no instance serves, while one that could load it is idle, is planned
        # for at once (a swap can start now, not at the next tick), once per model per interval.
        self.plan_on_arrival = plan_on_arrival
        self._planned_for: dict[str, float] = {}  # model -> when its arrival last asked for a plan
        self.evict_enabled = evict
        self.clairvoyant = clairvoyant
        self.pm: pluggy.PluginManager | None = None
        self._hook: Any = None
        self.counters: dict[str, float] = {
            "flagged": 0,
            "evictions": 0,
            "pulls": 0,
            "steals": 0,
            "swaps_ordered": 0,
            "replans": 0,
            "prefetches": 0,
            "lso_failed": 0,
            "stranded_pulls": 0,
            "refused": 0,
        }
        self.queue = GlobalQueue(cost_models)
        self.estimator: WaitEstimator
        self.fleet = FleetView(cost_models, lambda view, state: self.estimator.observe_steps(view, state))
        self.estimator = WaitEstimator(
            cost_models, self.queue, self.fleet, self._predict, repredict_min_s=repredict_min_s
        )
        self.admission = AdmissionControl()
        self.lso = LSOExecutor(
            self.queue,
            self.fleet,
            self.estimator,
            self.counters,
            evict=evict,
            late_list=late_list,
            step_budget=step_budget,
            step_deadline=step_deadline,
            min_model_residency_s=min_model_residency_s,
        )
        self.last_plan_at = -math.inf
        self.steps_read_at = -math.inf
        self.last_plan: Plan | None = None
        # (planning seconds, the plan or None, now): the coordinator's telemetry
        self.on_replan: Callable[[float, Plan | None, float], None] | None = None

    # ------------------------------------------------------------------ wiring
    @hookimpl
    def qlm_configure(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = self.fleet.hook = pm.hook
        self.lso.bind(pm.hook)
        for info in list_instances(pm):
            self.fleet.add(info.instance_id, info.gpu)
        for view in self.fleet.instances.values():
            self.fleet.refresh(view)

    @hookimpl
    def qlm_instance_joined(self, info: InstanceInfo, now: float) -> None:
        if info.instance_id in self.fleet.instances:
            return
        self.fleet.refresh(self.fleet.add(info.instance_id, info.gpu))
        self.estimator.fleet_changed()

    @hookimpl
    def qlm_instance_left(self, instance_id: str, now: float) -> None:
        view = self.fleet.remove(instance_id)
        if view is None:
            return
        self.estimator.forget(instance_id)
        for rid in list(view.running):
            self.requeue(rid, now)
        self.lso.dispatcher.forget_instance(instance_id)

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
        view = self.fleet.instances.get(instance_id)
        if view is None:
            return
        self.counters["lso_failed"] += 1
        if operation != "load_model" or model is None:
            return  # a failed eviction: the request it was for waits for a seat in the engine's queue
        self.lso.swapper.load_failed(view, model, now)
        self.replan(now)

    def refresh(self, instance_id: str) -> None:
        """Read an instance's state again now (its model or health changed between ticks)."""
        view = self.fleet.instances.get(instance_id)
        if view is not None:
            self.fleet.refresh(view)
            self.estimator.fleet_changed()

    def requeue(self, request_id: str, now: float) -> bool:
        """Put a dispatched request back in the global queue (its engine was lost or gave it back):
        same deadlines and urgency, dispatched again by the next pull. False if it is not dispatched."""
        e = self.queue.entries.get(request_id)
        if e is None or e.dispatched_at is None:
            return False
        self.lso.dispatcher.undispatch(e)
        self.estimator.left(e)
        e.instance = e.planned = None
        e.dispatched_at = None
        e.finish_at = math.inf
        e.late = False
        self.estimator.residuals_changed(e.request.model)
        self.queue.queue(e.request.model).add(e)
        return True

    # ------------------------------------------------------------------ prediction
    def _predict(self, request: Request, generated: int = 0) -> LengthDistribution:
        if self.clairvoyant:
            true = (
                request.true_output_tokens if request.true_output_tokens is not None else request.max_tokens
            )
            return LengthDistribution.point(max(0, true - generated))
        dist = self._hook.qlm_predict_output_length(request=request, generated_tokens=generated)
        if dist is None:  # no predictor installed
            room = max(0, request.max_tokens - generated)
            if self.length_prior == "max_tokens":
                return LengthDistribution.point(room)
            return LengthDistribution(room / 2, (room / 4) ** 2)  # half, with wide uncertainty
        return dist  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ admission
    @hookimpl
    def qlm_submit(self, request: Request, now: float) -> Admission:
        if not any(request.model in v.costs for v in self.fleet.instances.values()):
            return Admission(
                request.id, False, False, reason=f"no instance can serve model {request.model!r}"
            )
        self.estimator.clock = now
        entry = self.queue.entries[request.id] = self.queue.entry(request, self._predict(request))
        self.estimator.note_arrival(entry, now)
        self.queue.note_arrival(entry, now)
        # No state polling here: the cached instance states follow dispatches and completions, and
        # are refreshed when an instance reports room and on every tick.
        if not self.estimate_at_admission:
            self._queue(entry, now)
            return Admission(request.id, True, True, entry.planned)
        est: WaitEstimate = self._hook.qlm_estimate_wait(request=request, now=now)
        # What the client and admission control get: the P(meet) calibrated against outcomes. The
        # queue manager's own decisions below act on the model's.
        told = self.estimator.told(request, est, now)
        # (the queue manager's own admission when no plugin answers, as when it is wired alone)
        verdict = self._hook.qlm_admit(request=request, estimate=told, now=now) or self.admission.qlm_admit(
            request, told, now
        )
        flagged = not verdict.can_meet_slo
        # Eviction first: a request an eviction can serve in time is not refused.
        if (
            self.evict_enabled
            and request.slo.ttft_deadline is not None
            and est.p_meet < max(EVICT_BELOW_P, 0.0 if verdict.accepted else 1.0)
            and self.lso.evictor.evict_for(entry, now)
        ):
            # Handed to an engine with a seat made for it: it starts at the next step.
            after = self.estimator.estimate(entry, now)
            told = self.estimator.told(request, after, now)
            self.estimator.admitted(request.id, now, told, after.p_meet)
            return Admission(request.id, True, True, entry.instance, told.wait_mean_s, told.p_meet)
        if not verdict.accepted and self.refuse_at_admission:
            del self.queue.entries[request.id]
            self.counters["refused"] += 1
            return verdict
        if flagged:
            self.counters["flagged"] += 1
        self.estimator.admitted(request.id, now, told, est.p_meet)
        self._queue(entry, now)
        return Admission(
            request.id,
            True,
            not flagged,
            entry.planned,
            told.wait_mean_s,
            told.p_meet,
            reason=verdict.reason,
        )

    def _queue(self, entry: Entry, now: float) -> None:
        """Into the global queue; bound at once where its planned instance has room, or early."""
        dispatcher = self.lso.dispatcher
        dispatcher.enqueue(entry)
        request = entry.request
        planned = self.fleet.instances.get(entry.planned) if entry.planned is not None else None
        if planned is not None and planned.free_slots() > 0:
            dispatcher.pull(planned, planned.free_slots(), now)  # room now: it binds at once
        elif self.early_binding and request.slo.ttft_deadline is not None and now < request.slo.ttft_deadline:
            waiting = dispatcher.left_waiting(request.model, now) if self.bind_waiting else None
            dispatcher.bind_early(entry, now)
            if waiting is not None and waiting is not entry and waiting.dispatched_at is None:
                # one place more: where the arrival took the last one, the older request still goes
                dispatcher.bind_early(waiting, now, max_waiting=EARLY_BIND_MAX_WAITING + 1)
        if now - self.last_plan_at >= self.replan_interval_s or self._unserved(request.model, now):
            self.replan(now)

    def _unserved(self, model: str, now: float) -> bool:
        """Whether an arrival of ``model`` should be planned for now: no instance serves or loads
        it, an instance that could load it sits idle (waiting for the tick would waste it; a busy
        fleet's swaps wait for the tick's plan), and no arrival of it asked within the interval."""
        if not self.plan_on_arrival or self.fleet.serving(model):
            return False
        if now - self._planned_for.get(model, -math.inf) < self.replan_interval_s:
            return False
        if not any(self._idle(v) and v.can_load(model, now) for v in self.fleet.instances.values()):
            return False
        self._planned_for[model] = now
        return True

    def _idle(self, view: InstanceView) -> bool:
        s, current = view.state, view.model()
        return (
            s is not None
            and s.healthy
            and not view.running
            and s.num_running + s.num_waiting == 0
            and (current is None or not self.queue.queue(current))
        )

    # ------------------------------------------------------------------ pulling
    @hookimpl
    def qlm_instance_ready(self, instance_id: str, free_slots: int, now: float) -> None:
        view = self.fleet.instances.get(instance_id)
        if view is None:
            return
        self.estimator.clock = now
        self.fleet.refresh(view)
        self.lso.dispatcher.pull(view, free_slots, now)
        if now - self.last_plan_at >= self.replan_interval_s:
            self.replan(now)

    # ------------------------------------------------------------------ completion and reports
    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        self.estimator.observe(outcome)
        r = outcome.request
        e = self.queue.entries.pop(r.id, None)
        self.lso.dispatcher.bound_early.pop(r.id, None)
        if e is None:
            return
        if e.dispatched_at is None:
            self.queue.queue(r.model).remove(e)
        elif e.instance is not None and e.instance in self.fleet.instances:
            self.lso.dispatcher.undispatch(e)
            self.estimator.residuals_changed(r.model)
            self.estimator.left(e)

    @hookimpl
    def qlm_stats(self) -> dict[str, float]:
        return {**self.counters, **self.estimator.accuracy()}

    # ------------------------------------------------------------------ planning
    def pending(self) -> bool:
        """Whether work waits: in the global queue, or urgent in an engine's queue (watched)."""
        return bool(self.lso.dispatcher.bound_early) or self.queue.pending()

    @hookimpl
    def qlm_tick(self, now: float) -> bool:
        self.estimator.clock = now
        if not self.pending():
            # The step timings still feed the estimator, which admission answers and refuses by:
            # a queue that refusals keep empty must not freeze them at one stale (prefill) step.
            if now - self.steps_read_at >= IDLE_STEPS_REFRESH_S:
                self.steps_read_at = now
                for view in self.fleet.instances.values():
                    if view.running:
                        self.fleet.refresh(view, detail=True)
            return False
        self.steps_read_at = now
        for view in self.fleet.instances.values():
            self.fleet.refresh(view, detail=True)
        self.replan(now)
        for view in self.fleet.instances.values():
            if view.free_slots():
                self.lso.dispatcher.pull(view, view.free_slots(), now)
        self.lso.evictor.recheck(now)
        return self.pending()

    def replan(self, now: float) -> None:
        """Ask the planner (``qlm_plan``) for placement and LSOs, and carry them out."""
        self.last_plan_at = now
        self.counters["replans"] += 1
        t0 = time.perf_counter()
        states = [v.state for v in self.fleet.instances.values() if v.state is not None]
        plan = self._hook.qlm_plan(queue=self.queue.requests(), instances=states, now=now)
        if plan is not None:
            self.last_plan = plan
            self.lso.apply(plan, now)
        if self.on_replan is not None:
            self.on_replan(time.perf_counter() - t0, plan, now)

    # ------------------------------------------------------------------ policy hooks
    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        e = self.queue.entries.get(request.id)
        if e is not None:
            return e.key
        return laxity_key(request, self._predict(request), self.cost_models.get(request.model))

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        view = self.fleet.instances.get(instance_id)

        def slack(c: RunningView) -> float:
            cost = self.cost_models.get(c.request.model)
            if cost is None:
                return math.inf
            step = (
                self.estimator.tpot(view, c.request.model)
                if view is not None and c.request.model in view.costs
                else cost.decode_tpot_s(32)
            )
            redo = cost.step_s(c.request.prompt_tokens + c.generated_tokens, 0)
            remaining = self._predict(c.request, c.generated_tokens)
            return slack_after_recompute(c.request, c.generated_tokens, remaining, now, step, redo)

        def rank(c: RunningView) -> Rank:
            # the rank it waits under once preempted: the engine's queue orders by the hook's key
            return Rank(self._hook.qlm_rank_key(request=c.request, instance_id=instance_id, now=now))

        return choose_victim(candidates, slack, rank)

    @hookimpl
    def qlm_estimate_wait(self, request: Request, now: float) -> WaitEstimate | None:
        if request.model not in self.cost_models:
            return None
        e = self.queue.entries.get(request.id) or self.queue.entry(request, self._predict(request))
        return self.estimator.estimate(e, now)
