"""The LSO executor: carries the queue manager's plans and decisions out through the backend hooks.

Its parts, one file each: request pulling and load balancing (:mod:`.dispatch`), eviction
(:mod:`.eviction`), model swaps and warm starts (:mod:`.model_swaps`). Contract:
:class:`qlm_plugin.brain.contracts.LSOExecutorRole`. Thread safety: none; one event loop owns it.
"""

from __future__ import annotations

from typing import Any

from qlm_plugin.brain.dispatch import Dispatcher
from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.eviction import Evictor
from qlm_plugin.brain.fleet_view import FleetView
from qlm_plugin.brain.global_queue import GlobalQueue
from qlm_plugin.brain.model_swaps import ModelSwapper
from qlm_plugin.domain.plan import Evict, LoadModel, Plan


class LSOExecutor:
    def __init__(
        self,
        queue: GlobalQueue,
        fleet: FleetView,
        estimator: WaitEstimator,
        counters: dict[str, float],
        *,
        evict: bool = True,
        hold_back_batch: bool = True,
        min_model_residency_s: float = 30.0,
    ) -> None:
        self.queue = queue
        self.fleet = fleet
        self.dispatcher = Dispatcher(queue, fleet, estimator, counters, hold_back_batch=hold_back_batch)
        self.evictor = Evictor(queue, fleet, estimator, self.dispatcher, counters, enabled=evict)
        self.swapper = ModelSwapper(
            queue, fleet, estimator, self.dispatcher, counters, min_model_residency_s=min_model_residency_s
        )

    def bind(self, hook: Any) -> None:
        self.dispatcher.hook = self.evictor.hook = self.swapper.hook = hook

    def apply(self, plan: Plan, now: float) -> None:
        """The plan's placement (its virtual queues, by group and by request) and its LSOs."""
        instances = self.fleet.instances
        for iid, keys in plan.groups.items():
            if iid in instances:
                for k in keys:
                    self.dispatcher.group_plan[k] = iid
        for iid, rids in plan.queues.items():
            if iid not in instances:
                continue
            for rid in rids:
                e = self.queue.entries.get(rid)
                if e is not None and e.dispatched_at is None:
                    e.planned = iid
        for action in plan.actions:
            view = instances.get(action.instance_id)
            if view is None:
                continue
            if isinstance(action, LoadModel):
                self.swapper.load(view, action, now)
            elif isinstance(action, Evict):
                self.evictor.planned(action)
