"""Model swapping and warm start (LSOs), as a plan orders them.

A swap (``qlm_load_model`` to the GPU) is carried out unless the model just swapped in there
(``min_model_residency_s``, while it still has work): no thrashing. A warm start stages a model's
weights in host memory ahead of a swap, once (``STAGE_AGAIN_AFTER_S``). A load that failed on an
instance is not ordered there again for ``LOAD_RETRY_AFTER_S``, and the model's groups planned
there are placed elsewhere. Thread safety: none.
"""

from __future__ import annotations

import math
from typing import Any

from qlm_plugin.brain.dispatch import Dispatcher
from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import GlobalQueue
from qlm_plugin.domain.plan import LoadModel

#: A warm-start staging of the same weights on the same instance is not repeated within this time.
STAGE_AGAIN_AFTER_S = 300.0
#: A model whose load failed on an instance is not ordered there again for this long, seconds,
#: doubled for each failure in a row up to the most (a crash at start is often not transient).
LOAD_RETRY_FIRST_S = 5.0
LOAD_RETRY_AFTER_S = 60.0


class ModelSwapper:
    def __init__(
        self,
        queue: GlobalQueue,
        fleet: FleetView,
        estimator: WaitEstimator,
        dispatcher: Dispatcher,
        counters: dict[str, float],
        *,
        min_model_residency_s: float = 30.0,
    ) -> None:
        self.queue = queue
        self.fleet = fleet
        self.estimator = estimator
        self.dispatcher = dispatcher
        self.counters = counters
        self.min_model_residency_s = min_model_residency_s
        self.hook: Any = None
        self._staged: dict[tuple[str, str], float] = {}  # (instance, model) -> when weights were staged

    def load(self, view: InstanceView, action: LoadModel, now: float) -> None:
        """Carry out a plan's load: a swap (``gpu``) or a warm start (``host``)."""
        if not view.can_load(action.model, now):
            return  # it failed there lately: placed elsewhere
        if action.target == "gpu":
            current = view.model()
            if current == action.model:
                return
            own_queued = current is not None and len(self.queue.queue(current)) > 0
            if now - view.switched_at < self.min_model_residency_s and (view.running or own_queued):
                return  # no thrashing: a model keeps its instance a while once swapped in
            self.hook.qlm_load_model(instance_id=action.instance_id, model=action.model, target="gpu")
            view.switched_at = now
            self.counters["swaps_ordered"] += 1
        else:
            staged = self._staged.get((action.instance_id, action.model), -math.inf)
            if now - staged < STAGE_AGAIN_AFTER_S:
                return  # already staged (or staging): its weights stay in host memory
            self._staged[(action.instance_id, action.model)] = now
            self.hook.qlm_load_model(instance_id=action.instance_id, model=action.model, target="host")
            self.counters["prefetches"] += 1
        self.fleet.refresh(view)
        self.estimator.fleet_changed()

    def load_failed(self, view: InstanceView, model: str, now: float) -> None:
        """The model is not coming there: its groups are placed elsewhere, the load is not ordered
        there again for a while (longer after each failure in a row), and the instance keeps its
        model as if just swapped in."""
        failures = view.load_failures.get(model, 0)
        view.load_failures[model] = failures + 1
        view.failed_loads[model] = now + min(LOAD_RETRY_FIRST_S * 2**failures, LOAD_RETRY_AFTER_S)
        self._staged.pop((view.instance_id, model), None)
        for e in self.queue.entries.values():
            if e.planned == view.instance_id and e.dispatched_at is None and e.request.model == model:
                e.planned = None
        self.fleet.refresh(view)
        self.estimator.fleet_changed()
