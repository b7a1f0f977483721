"""Instances on a Ray cluster: ``qlm serve --ray [ADDRESS]`` and ``qlm scale MODEL N``.

Each engine is a Ray actor (:class:`InstanceActor`) placed by a placement group with what it needs:
simulated instances ask for a quarter of a CPU, vLLM engines would ask for their GPUs. Ray restarts
an actor that dies (``max_restarts=-1``); the restarted actor registers again under the same
instance id, so the coordinator gives its unfinished requests back to the queue at once, to finish
elsewhere. A detached, named :class:`FleetManager` actor (``qlm-fleet`` in namespace ``qlm``) holds
the actors, so ``qlm scale`` from any machine of the cluster adds or removes instances at run time.

The coordinator is a plain process, not an actor: it owns the journal (a SQLite file on its local
disk) and the public ports. An actor restarted by Ray on another node would find neither; as a
process it keeps the lifecycle and durability of ``qlm serve``, and the actors reach it over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("qlm_plugin.ray")

NAMESPACE = "qlm"
FLEET = "qlm-fleet"
#: CPUs a simulated instance asks for (it is light: a small share leaves room for many per node).
SIM_CPUS = 0.25


def actor_name(instance_id: str) -> str:
    return f"qlm-instance-{instance_id}"


@ray.remote(max_restarts=-1, max_task_retries=0)
class InstanceActor:
    """One simulated engine and its agent, on a thread of their own inside the actor (so a restart
    by Ray, which re-runs ``__init__``, brings the engine back connected)."""

    def __init__(
        self,
        instance_id: str,
        gpu: str,
        models: list[str],
        scenario: str | None,
        coordinator: str,
        speed: float,
        token: str | None,
        record: str | None,
    ) -> None:
        self.instance_id = instance_id
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        args = (instance_id, gpu, models, scenario, coordinator, speed, token, record)
        self._thread = threading.Thread(target=self._run, args=args, name=f"qlm-{instance_id}", daemon=True)
        self._thread.start()

    def _run(
        self,
        instance_id: str,
        gpu: str,
        models: list[str],
        scenario: str | None,
        coordinator: str,
        speed: float,
        token: str | None,
        record: str | None,
    ) -> None:
        from qlm_plugin.adapters.sim.engine import SimInstance
        from qlm_plugin.adapters.sim.process import run_instances
        from qlm_plugin.transport.agent import AgentSettings
        from qlm_plugin.workloads.scenario import load_scenario

        sc = load_scenario(scenario)
        inst = SimInstance(
            instance_id, gpu, sc.cost_models_for(gpu), initial_model=models[0], warm_models=tuple(models[1:])
        )

        async def main() -> None:
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            f = open(record, "a") if record else None  # noqa: SIM115 - closed below
            try:
                await run_instances(
                    [inst], AgentSettings(coordinator, token=token), speed=speed, stop=self._stop, record=f
                )
            finally:
                if f is not None:
                    f.close()

        asyncio.run(main())

    def ping(self) -> str:
        return self.instance_id

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


@ray.remote(num_cpus=0)
class FleetManager:
    """The instances of the deployment, by model. Detached and named: it outlives the ``qlm serve``
    call that made it only until that call removes it, and ``qlm scale`` finds it by name."""

    def __init__(
        self, coordinator: str, scenario: str | None, speed: float, token: str | None, record: str | None
    ) -> None:
        self.coordinator = coordinator
        self.scenario = scenario
        self.speed = speed
        self.token = token
        self.record = record
        self.actors: dict[str, dict[str, tuple[Any, Any]]] = {}  # model -> instance id -> (actor, pg)
        self._serial = 0

    def scale(self, model: str, count: int, gpu: str = "h100", warm: list[str] | None = None) -> list[str]:
        """Run ``count`` instances serving ``model`` (first), adding or removing; returns their ids."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        group = self.actors.setdefault(model, {})
        while len(group) < count:
            self._serial += 1
            iid = f"{model}-{self._serial}"
            pg = placement_group([{"CPU": SIM_CPUS}], strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=120)
            actor = InstanceActor.options(  # type: ignore[attr-defined]
                name=actor_name(iid),
                namespace=NAMESPACE,
                num_cpus=SIM_CPUS,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg),
            ).remote(
                iid,
                gpu,
                [model, *(warm or [])],
                self.scenario,
                self.coordinator,
                self.speed,
                self.token,
                self.record,
            )
            group[iid] = (actor, pg)
        while len(group) > count:
            iid = sorted(group)[-1]
            actor, pg = group.pop(iid)
            with contextlib.suppress(Exception):  # its agent leaves; its work goes back to the queue
                ray.get(actor.stop.remote(), timeout=15)
            ray.kill(actor, no_restart=True)
            remove_placement_group(pg)
        return sorted(group)

    def instances(self) -> dict[str, list[str]]:
        return {m: sorted(g) for m, g in self.actors.items()}

    def shutdown(self) -> None:
        for model in list(self.actors):
            self.scale(model, 0)


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one this machine belongs to; None: start a
    local one)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    else:
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)


def start_fleet(
    coordinator: str,
    groups: list[tuple[str, str, list[str], int]],
    *,
    scenario: str | None,
    speed: float,
    token: str | None = None,
    record: str | None = None,
) -> Any:
    """The detached fleet manager, with ``groups`` of (model, gpu, warm models, count) started."""
    fleet = FleetManager.options(  # type: ignore[attr-defined]
        name=FLEET, namespace=NAMESPACE, lifetime="detached", get_if_exists=False
    ).remote(coordinator, scenario, speed, token, record)
    for model, gpu, warm, count in groups:
        ray.get(fleet.scale.remote(model, count, gpu, warm))
    return fleet


def scale(address: str | None, model: str, count: int) -> list[str]:
    connect(address or "auto")
    fleet = ray.get_actor(FLEET, namespace=NAMESPACE)
    return list(ray.get(fleet.scale.remote(model, count)))


def stop_fleet(fleet: Any) -> None:
    try:
        ray.get(fleet.shutdown.remote(), timeout=60)
    finally:
        ray.kill(fleet, no_restart=True)
