"""The simulator's backend hooks: the same calls a real engine's adapter answers."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from types import ModuleType
from typing import Any

import pluggy

from qlm_plugin.adapters.sim.fleet import SimFleet
from qlm_plugin.brain.local_policy import Rank
from qlm_plugin.domain.instance import (
    EvictMode,
    EvictResult,
    InstanceInfo,
    InstanceState,
    LoadResult,
    RunningView,
)
from qlm_plugin.domain.outcome import RequestOutcome
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl


class SimBackend:
    """Adapter for simulated instances. ``attach`` wires the instances to a plugin manager's policy
    hooks (ranking, victim choice, finished notifications)."""

    name = "sim"

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self.outcomes: dict[str, RequestOutcome] = {}
        self._hook: Any = None

    def attach(self, pm: pluggy.PluginManager) -> None:
        hook = self._hook = pm.hook

        def rank_key(request: Request, instance_id: str, now: float) -> Hashable:
            key: Hashable = hook.qlm_rank_key(request=request, instance_id=instance_id, now=now)
            return key

        def any_rank_key(request: Request, instance_id: str, now: float) -> Rank:
            # Compared in the engine's heap: a third-party key that answers for some requests only
            # (a number beside the queue manager's tuple) must order, not raise, as inside vLLM's
            # scheduler. The built-in policies' keys are of one type each: compared bare (faster).
            return Rank(hook.qlm_rank_key(request=request, instance_id=instance_id, now=now))

        third_party = any(not _builtin(impl.plugin) for impl in hook.qlm_rank_key.get_hookimpls())

        def select_victim(candidates: Sequence[RunningView], instance_id: str, now: float) -> RunningView:
            return hook.qlm_select_victim(candidates=candidates, instance_id=instance_id, now=now)  # type: ignore[no-any-return]

        def on_finished(outcome: RequestOutcome) -> None:
            hook.qlm_request_finished(outcome=outcome, now=self.fleet.now)

        def on_room(instance_id: str, free_slots: int, now: float) -> None:
            hook.qlm_instance_ready(instance_id=instance_id, free_slots=free_slots, now=now)

        pulls = bool(hook.qlm_instance_ready.get_hookimpls())  # no queue manager: nobody pulls
        for inst in self.fleet.instances.values():
            inst.rank_key = any_rank_key if third_party else rank_key
            inst.select_victim = select_victim
            inst.on_finished = on_finished
            inst.on_room = on_room if pulls else None

    @hookimpl
    def qlm_list_instances(self) -> list[InstanceInfo]:
        return [
            InstanceInfo(
                i.instance_id, "sim", i.gpu, frozenset({"evict", "swap", "load_model", "warm_start"})
            )
            for i in self.fleet.instances.values()
        ]

    @hookimpl
    def qlm_instance_state(self, instance_id: str, detail: bool) -> InstanceState | None:
        inst = self.fleet.instances.get(instance_id)
        return None if inst is None else inst.state(self.fleet.now, detail)

    @hookimpl
    def qlm_dispatch(self, instance_id: str, request: Request) -> bool | None:
        inst = self.fleet.instances.get(instance_id)
        if inst is None:
            return None
        outcome = self.outcomes.get(request.id)
        if outcome is None:
            outcome = self.outcomes[request.id] = RequestOutcome(request)
        accepted = inst.dispatch(request, outcome)
        if accepted and self._hook is not None:
            self._hook.qlm_request_queued(request=request, instance_id=instance_id, now=self.fleet.now)
        return accepted

    @hookimpl
    def qlm_evict(self, instance_id: str, request_id: str, mode: EvictMode) -> EvictResult | None:
        inst = self.fleet.instances.get(instance_id)
        return None if inst is None else inst.evict(request_id, EvictMode(mode))

    @hookimpl
    def qlm_load_model(self, instance_id: str, model: str, target: str) -> LoadResult | None:
        inst = self.fleet.instances.get(instance_id)
        return None if inst is None else inst.load_model(model, target)


def _builtin(plugin: object) -> bool:
    """Whether ``plugin`` (an object or a module) is one of this package's own."""
    module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
    return module == "qlm_plugin" or module.startswith("qlm_plugin.")
