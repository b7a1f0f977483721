"""The example adapter's plugin: the backend hooks over a set of EchoInstances, and their clock."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pluggy

from qlm_example_adapter.engine import CAPABILITIES, MODELS, STEP_S, EchoInstance
from qlm_plugin.domain.instance import EvictMode, EvictResult, InstanceInfo, InstanceState, LoadResult
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl

#: How many instances the entry-point plugin serves (``echo-0``, ``echo-1``, ...).
INSTANCES_ENV = "QLM_EXAMPLE_INSTANCES"


class EchoBackend:
    """Backend hooks for the instances in ``instances``. Every hook first looks the instance up and
    returns None when it is not one of ours: the hooks are firstresult, so the owner answers."""

    def __init__(self, instances: Iterable[EchoInstance] = ()) -> None:
        self.instances = {i.instance_id: i for i in instances}
        self.steps = 0  # the discrete clock: now = steps * STEP_S
        self._until = 0.0
        self._hook: Any = None

    @property
    def now(self) -> float:
        return self.steps * STEP_S

    def advance(self, seconds: float) -> None:
        """Run every instance for ``seconds`` of its clock (whole steps; the rest carries over)."""
        self._until += seconds
        while (self.steps + 1) * STEP_S <= self._until + 1e-9:
            for inst in self.instances.values():
                inst.step(self.now)
            self.steps += 1

    def attach(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook
        for inst in self.instances.values():
            inst.hook = pm.hook

    @hookimpl
    def qlm_configure(self, pm: pluggy.PluginManager) -> None:
        self.attach(pm)  # a driver calls this once every plugin is registered

    @hookimpl
    def qlm_list_instances(self) -> list[InstanceInfo]:
        return [InstanceInfo(iid, "echo", "toy", CAPABILITIES) for iid in self.instances]

    @hookimpl
    def qlm_instance_state(self, instance_id: str, detail: bool) -> InstanceState | None:
        inst = self.instances.get(instance_id)
        return None if inst is None else inst.state(self.now, detail)

    @hookimpl
    def qlm_dispatch(self, instance_id: str, request: Request) -> bool | None:
        inst = self.instances.get(instance_id)
        if inst is None:
            return None
        if not inst.dispatch(request, self.now):
            return False
        if self._hook is not None:
            self._hook.qlm_request_queued(request=request, instance_id=instance_id, now=self.now)
        return True

    @hookimpl
    def qlm_evict(self, instance_id: str, request_id: str, mode: EvictMode) -> EvictResult | None:
        inst = self.instances.get(instance_id)
        # EvictMode(...): callers may pass the plain string value ("swap", "recompute").
        return None if inst is None else inst.evict(request_id, EvictMode(mode), self.now)

    @hookimpl
    def qlm_load_model(self, instance_id: str, model: str, target: str) -> LoadResult | None:
        inst = self.instances.get(instance_id)
        return None if inst is None else inst.load_model(model, target, self.now)


def _from_env() -> EchoBackend:
    # Entry points are autoloaded into every plugin manager (qlm simulate, the coordinator): by
    # default this one owns no instance, so nobody routes work to engines that no loop drives.
    count = int(os.environ.get(INSTANCES_ENV) or 0)
    return EchoBackend(EchoInstance(f"echo-{i}", MODELS) for i in range(count))


#: The object the ``qlm`` entry point names (``qlm_example_adapter.plugin:plugin``).
plugin = _from_env()
