"""The brain's view of the fleet: each instance's last state (read through ``qlm_instance_state``),
the requests the queue manager has on it, and caches of per-model figures that only change when a
state does.

Between refreshes the cached states are kept honest by the queue manager's own dispatches and
completions (:meth:`FleetView.count_running`). Thread safety: none; one event loop owns it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlm_plugin.domain.costmodel import CostModel, gpu_speed
from qlm_plugin.domain.instance import InstanceState

if TYPE_CHECKING:
    from qlm_plugin.brain.global_queue import Entry

#: KV blocks a request is assumed to need when counting free slots (about 1.5k tokens).
KV_BLOCKS_PER_REQUEST = 96
#: How long slowly drifting figures (rates, step-time factors) are reused, seconds of the clock.
RECENT_S = 0.1


@dataclass(slots=True)
class InstanceView:
    instance_id: str
    costs: dict[str, CostModel]
    state: InstanceState | None = None
    running: dict[str, Entry] = field(default_factory=dict)  # dispatched here, not finished
    switched_at: float = -math.inf
    failed_loads: dict[str, float] = field(default_factory=dict)  # model -> not loaded here again until
    load_failures: dict[str, int] = field(default_factory=dict)  # model -> its failed loads in a row
    speed: float = 1.0  # its GPU against the reference cost models' (a slower GPU < 1)

    def can_load(self, model: str, now: float) -> bool:
        """Whether a load of ``model`` may be ordered here: the instance can serve it (its own
        report says so) and its last load here did not fail lately."""
        servable = self.state is None or self.state.can_serve(model)
        return servable and model in self.costs and now >= self.failed_loads.get(model, -math.inf)

    def load_s(self, model: str) -> float:
        """Seconds from ordering ``model`` here until it serves: the swap time the instance
        measured, where it reports one, else its cost model's (warm if the weights are in host
        memory)."""
        s = self.state
        if s is not None and s.swap_s > 0:
            return s.swap_s
        return self.costs[model].load_s(warm=s is not None and model in s.models_warm)

    def model(self) -> str | None:
        s = self.state
        if s is None:
            return None
        if s.loading_model is not None:
            return s.loading_model
        return s.models_loaded[0] if s.models_loaded else None

    def free_slots(self) -> int:
        """Requests this instance could start now: free seats, bounded by free KV cache (a request
        it cannot start would wait in the engine's own queue, out of the planner's reach)."""
        s = self.state
        if s is None or not s.healthy or s.loading_model is not None or not s.models_loaded or s.num_waiting:
            return 0
        kv = (s.kv_blocks_total - s.kv_blocks_used) // KV_BLOCKS_PER_REQUEST
        return max(0, min(s.max_num_seqs - s.num_running, kv))


class FleetView:
    """The instances the queue manager plans for. ``on_steps(view, state)`` receives the step
    timings of each detailed refresh (the estimator calibrates on them)."""

    def __init__(
        self,
        cost_models: Mapping[str, CostModel],
        on_steps: Callable[[InstanceView, InstanceState], None],
    ) -> None:
        self.cost_models = cost_models
        self.on_steps = on_steps
        self.hook: Any = None
        self.instances: dict[str, InstanceView] = {}
        self.version = 0  # bumped whenever a cached instance state changes
        self.models_version = 0  # bumped when states are refreshed (models may have changed)
        self._memo: dict[tuple[str, str], tuple[int, Any]] = {}
        self._recent_memo: dict[tuple[str, str], tuple[float, float]] = {}

    def add(self, instance_id: str, gpu: str | None = None) -> InstanceView:
        view = self.instances[instance_id] = InstanceView(instance_id, dict(self.cost_models))
        if gpu:
            view.speed = gpu_speed(self.cost_models, gpu)
        return view

    def remove(self, instance_id: str) -> InstanceView | None:
        view = self.instances.pop(instance_id, None)
        if view is not None:
            self.version += 1
            self.models_version += 1
        return view

    def refresh(self, view: InstanceView, detail: bool = False) -> InstanceState:
        state: InstanceState = self.hook.qlm_instance_state(instance_id=view.instance_id, detail=detail)
        view.state = state
        self.version += 1
        self.models_version += 1
        if view.load_failures and state.models_loaded:
            view.load_failures.pop(state.models_loaded[0], None)  # it loaded: the next failure is a first
        model = view.model()
        if detail and state.step_timings and model is not None and model in view.costs:
            self.on_steps(view, state)
        return state

    def cached(self, what: str, model: str, compute: Callable[[], Any], version: int | None = None) -> Any:
        """Per-model figures that only change when instance states do: computed once per state
        version (bumped by every refresh, dispatch, completion and swap), or per ``version``."""
        key = (what, model)
        v = self.version if version is None else version
        hit = self._memo.get(key)
        if hit is not None and hit[0] == v:
            return hit[1]
        value = compute()
        self._memo[key] = (v, value)
        return value

    def recent(self, what: str, model: str, now: float, compute: Callable[[], float]) -> float:
        """Slowly drifting figures (rates, step-time factors): recomputed at most every
        ``RECENT_S`` of clock time, whatever changed meanwhile."""
        key = (what, model)
        hit = self._recent_memo.get(key)
        if hit is not None and now - hit[0] < RECENT_S:
            return hit[1]
        value = compute()
        self._recent_memo[key] = (now, value)
        return value

    def serving(self, model: str) -> list[InstanceView]:
        """The healthy instances serving ``model`` (or loading it)."""
        # Which instances serve a model changes only with refreshed states (swaps), not dispatches.
        return self.cached(  # type: ignore[no-any-return]
            "serving",
            model,
            lambda: [
                v
                for v in self.instances.values()
                if v.model() == model and v.state is not None and v.state.healthy
            ],
            version=self.models_version,
        )

    def count_running(self, view: InstanceView, delta: int, prompt_tokens: int = 0) -> None:
        """Keep an instance's cached counts honest between refreshes (a dispatch or a completion;
        a dispatched prompt is prefill the engine has still to do)."""
        if view.state is None:
            return
        self.version += 1
        s = view.state
        view.state = s.with_counts(
            num_running=max(0, s.num_running + delta),
            kv_blocks_used=max(0, s.kv_blocks_used + delta * KV_BLOCKS_PER_REQUEST),
            prefill_tokens_pending=s.prefill_tokens_pending + max(0, delta) * prompt_tokens,
        )
