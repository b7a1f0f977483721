"""Instances on a Ray cluster: ``qlm serve --ray [ADDRESS]`` and ``qlm scale MODEL N``.

Each engine is a Ray actor (:class:`InstanceActor`) placed by a placement group with what it needs:
simulated instances ask for a quarter of a CPU, vLLM engines (:class:`VLLMEngineActor`, a vLLM
server in a child process) their GPUs, or a CPU on a CPU build. Ray restarts
an actor that dies (``max_restarts=-1``); the restarted actor registers again under the same
instance id, so the coordinator gives its unfinished requests back to the queue at once, to finish
elsewhere. A named :class:`FleetManager` actor (``qlm-fleet`` in namespace ``qlm``), owned by the
serve that started it (it dies with it), holds the actors, so ``qlm scale`` from any machine of the
cluster adds or removes instances at run time.

The coordinator is a plain process, not an actor: it owns the journal (a SQLite file on its local
disk) and the public ports. An actor restarted by Ray on another node would find neither; as a
process it keeps the lifecycle and durability of ``qlm serve``, and the actors reach it over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("qlm_plugin.ray")

NAMESPACE = "qlm"
FLEET = "qlm-fleet"
#: CPUs a simulated instance asks for (it is light: a small share leaves room for many per node).
SIM_CPUS = 0.25
#: CPUs an engine of a CPU build of vLLM asks for (what it really uses is its own threads' business).
VLLM_CPU_CPUS = 1.0
#: How long the instances being removed have to stop before they are killed, seconds.
STOP_TIMEOUT_S = 30.0
#: How long an engine's placement may wait for the cluster's resources, seconds.
PLACEMENT_TIMEOUT_S = 120.0


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


@ray.remote(max_restarts=-1, max_task_retries=0)
class VLLMEngineActor:
    """One vLLM OpenAI server with the QLM scheduler, a child process of the actor on the actor's
    node (its agent registers with the coordinator on its own). The server dies with the actor;
    an actor whose server ends exits, so Ray restarts it, and the restarted actor starts a new
    server under the same instance id (on a new port: the coordinator takes the endpoint of the
    new registration)."""

    def __init__(
        self,
        instance_id: str,
        source: str,
        served_name: str,
        engine_args: list[str],
        coordinator: str,
        token: str | None,
        cpu: bool,
        log_dir: str,
    ) -> None:
        from pathlib import Path

        from qlm_plugin.adapters.vllm import launch
        from qlm_plugin.deploy.child_process import free_port

        host = ray.util.get_node_ip_address()
        port = free_port(host)
        self.url = f"http://{host}:{port}"
        env = {
            **os.environ,
            "QLM_COORDINATOR": coordinator,
            "QLM_INSTANCE_ID": instance_id,
            "QLM_ENDPOINT": self.url,
            "VLLM_SERVER_DEV_MODE": "1",
        }
        if token:
            env["QLM_INSTANCE_TOKEN"] = token
        if cpu:
            env = launch.cpu_env(env)
            env.setdefault("QLM_GPU", "cpu")
        self.stopping = False
        self.server = launch.start_engine(
            source,
            port,
            Path(log_dir) / f"{instance_id}.log",
            served_name=served_name,
            args=engine_args,
            env=env,
            host=host,
            tied=True,
        )
        threading.Thread(target=self._watch, name=f"qlm-watch-{instance_id}", daemon=True).start()

    def _watch(self) -> None:
        self.server.process.wait()
        if not self.stopping:
            log.warning("the vLLM server of this actor exited with %s", self.server.process.returncode)
            os._exit(1)  # Ray restarts the actor, and with it the server

    def endpoint(self) -> str:
        return self.url

    def stop(self) -> None:
        self.stopping = True
        self.server.stop(timeout_s=STOP_TIMEOUT_S - 5)


@dataclass(frozen=True)
class VLLMModel:
    """How a model's engines start: its source, vLLM's arguments, and what each asks of Ray."""

    source: str
    engine_args: tuple[str, ...]
    cpu: bool
    gpus: int  # GPUs per engine (its tensor parallelism); 0 on a CPU build of vLLM
    log_dir: str


@ray.remote(num_cpus=0)
class FleetManager:
    """The instances of the deployment, by model. Detached and named: it outlives the ``qlm serve``
    call that made it only until that call removes it, and ``qlm scale`` finds it by name."""

    def __init__(
        self,
        coordinator: str,
        scenario: str | None,
        speed: float,
        token: str | None,
        record: str | None,
        vllm: dict[str, VLLMModel] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.scenario = scenario
        self.speed = speed
        self.token = token
        self.record = record
        self.vllm = vllm or {}  # models served by vLLM engines (the others: simulated instances)
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
            spec = self.vllm.get(model)
            # an engine's bundle: its GPUs, or (CPU build, simulated instance) a share of a CPU
            if spec is None:
                bundle: dict[str, float] = {"CPU": SIM_CPUS}
            elif spec.gpus:
                bundle = {"CPU": 1, "GPU": spec.gpus}
            else:
                bundle = {"CPU": VLLM_CPU_CPUS}
            pg = placement_group([bundle], strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            options = {
                "name": actor_name(iid),
                "namespace": NAMESPACE,
                "num_cpus": bundle["CPU"],
                "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg),
            }
            if spec is None:
                actor = InstanceActor.options(**options).remote(  # type: ignore[attr-defined]
                    iid,
                    gpu,
                    [model, *(warm or [])],
                    self.scenario,
                    self.coordinator,
                    self.speed,
                    self.token,
                    self.record,
                )
            else:
                actor = VLLMEngineActor.options(**options).remote(  # type: ignore[attr-defined]
                    iid,
                    spec.source,
                    model,
                    list(spec.engine_args),
                    self.coordinator,
                    self.token,
                    spec.cpu,
                    spec.log_dir,
                )
            group[iid] = (actor, pg)
        leaving = [group.pop(iid) for iid in sorted(group)[count:]]
        # stopped together (a vLLM server takes seconds to stop): their agents leave, their work
        # goes back to the queue
        stops = [actor.stop.remote() for actor, _ in leaving]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        for actor, pg in leaving:
            ray.kill(actor, no_restart=True)
            remove_placement_group(pg)
        return sorted(group)

    def instances(self) -> dict[str, list[str]]:
        return {m: sorted(g) for m, g in self.actors.items()}

    def endpoints(self) -> dict[str, str]:
        """Instance id -> the OpenAI server of each vLLM engine (as its actor's last start made it)."""
        return {
            iid: ray.get(actor.endpoint.remote(), timeout=600)
            for model, group in self.actors.items()
            if model in self.vllm
            for iid, (actor, _) in group.items()
        }

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
    speed: float = 1.0,
    token: str | None = None,
    record: str | None = None,
    vllm: dict[str, VLLMModel] | None = None,
) -> Any:
    """The fleet manager (owned by this driver), with ``groups`` of (model, gpu, warm models, count) started:
    vLLM engines for the models in ``vllm``, simulated instances for the others."""
    fleet = FleetManager.options(  # type: ignore[attr-defined]
        # owned by the serve (not detached): it and its actors die with it, even after a SIGKILL
        # (a detached one outlived it, and the next serve's fleet could not take its name)
        name=FLEET,
        namespace=NAMESPACE,
        get_if_exists=False,
    ).remote(coordinator, scenario, speed, token, record, vllm)
    for model, gpu, warm, count in groups:
        ray.get(fleet.scale.remote(model, count, gpu, warm))
    return fleet


def scale(address: str | None, model: str, count: int) -> list[str]:
    connect(address or "auto")
    fleet = ray.get_actor(FLEET, namespace=NAMESPACE)
    return list(ray.get(fleet.scale.remote(model, count)))


def stop_fleet(fleet: Any) -> None:
    """Stop every instance, then the manager (the actors it made die with it, should any be left)."""
    try:
        ray.get(fleet.shutdown.remote(), timeout=2 * STOP_TIMEOUT_S)
    except Exception as exc:  # a stuck actor: killing the manager takes its actors with it
        log.warning("the fleet did not stop in time (%s): killing it", exc)
    finally:
        ray.kill(fleet, no_restart=True)
