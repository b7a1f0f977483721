"""The LSO executor: carries the queue manager's plans and decisions out through the backend hooks.

Its parts, one file each: request pulling and load balancing (:mod:`.dispatch`), eviction
(:mod:`.eviction`), model swaps and warm starts (:mod:`.model_swaps`). A plan's actions reach the
part registered for their type; a plugin adds an LSO by registering its action type and the function
that carries it out (:meth:`LSOExecutor.register`). Contract:
:class:`qlm_plugin.brain.contracts.LSOExecutorRole`. Thread safety: none; one event loop owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qlm_plugin.brain.dispatch import Dispatcher
from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.eviction import Evictor
from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import GlobalQueue
from qlm_plugin.brain.model_swaps import ModelSwapper
from qlm_plugin.domain.plan import Evict, LoadModel, Plan, PlanAction

log = logging.getLogger(__name__)

#: Carries one action out on the instance it names: ``run(view, action, now)``.
ActionRunner = Callable[[InstanceView, Any, float], None]


class LSOExecutor:
    def __init__(
        self,
        queue: GlobalQueue,
        fleet: FleetView,
        estimator: WaitEstimator,
        counters: dict[str, float],
        *,
        evict: bool = True,
        late_list: bool = True,
        step_budget: bool = True,
        step_deadline: bool = True,
        min_model_residency_s: float = 30.0,
    ) -> None:
        self.queue = queue
        self.fleet = fleet
        self.dispatcher = Dispatcher(
            queue,
            fleet,
            estimator,
            counters,
            late_list=late_list,
            step_budget=step_budget,
            step_deadline=step_deadline,
        )
        self.evictor = Evictor(queue, fleet, estimator, self.dispatcher, counters, enabled=evict)
        self.swapper = ModelSwapper(
            queue, fleet, estimator, self.dispatcher, counters, min_model_residency_s=min_model_residency_s
        )
        self._runners: dict[type, ActionRunner] = {}
        self._unknown: set[type] = set()
        self.register(LoadModel, self.swapper.load)
        self.register(Evict, lambda view, action, now: self.evictor.planned(action))

    def register(self, action_type: type, run: ActionRunner) -> None:
        """Plans may now carry ``action_type``; ``run(view, action, now)`` carries one out (through
        the backend hooks, after :meth:`bind`: ``self.dispatcher.hook``). One runner per type."""
        if action_type in self._runners:
            raise ValueError(f"an LSO runner for {action_type.__name__} is already registered")
        self._runners[action_type] = run

    def bind(self, hook: Any) -> None:
        self.dispatcher.hook = self.evictor.hook = self.swapper.hook = hook

    def apply(self, plan: Plan, now: float) -> None:
        """The plan's placement (its virtual queues) and its LSOs. A planner that places groups
        only (``Plan.groups``, no ids) has each group's requests queued in urgency order."""
        instances = self.fleet.instances
        queues = dict(plan.queues)
        entries = self.queue.entries
        for iid, keys in plan.groups.items():
            if iid not in queues:
                wanted = set(keys)
                queues[iid] = [
                    rid
                    for q in self.queue.queues.values()
                    for _, rid in q.order
                    if entries[rid].group in wanted
                ]
        self.dispatcher.follow(queues)
        for action in plan.actions:
            view = instances.get(action.instance_id)
            if view is not None:
                self._run(view, action, now)

    def _run(self, view: InstanceView, action: PlanAction, now: float) -> None:
        run = self._runners.get(type(action))
        if run is not None:
            run(view, action, now)
        elif type(action) not in self._unknown:  # a planner plugin without its executor part: say so once
            self._unknown.add(type(action))
            log.error(
                "plan action %s has no LSO runner (LSOExecutor.register); such actions are skipped",
                type(action).__name__,
            )
