"""A whole serving system in one event loop, for tests and examples: a coordinator on loopback
(real gRPC and HTTP servers, a real SQLite journal) and simulated instances connected to it
over gRPC by their agents, exactly as separate processes would be."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.process import SimEngineLink
from qlm_plugin.adapters.sim.realtime import RealtimeSim
from qlm_plugin.coordinator.config import CoordinatorConfig, Listen
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.engine_sleep import EngineControl
from qlm_plugin.coordinator.relay import RelayClient, RelayService
from qlm_plugin.coordinator.server import CoordinatorServer
from qlm_plugin.telemetry.instruments import Telemetry
from qlm_plugin.transport.agent import AgentSettings, InstanceAgent
from qlm_plugin.workloads.scenario import Scenario, load_scenario


@dataclass
class LocalInstance:
    link: SimEngineLink
    agent: InstanceAgent
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class LocalStack:
    server: CoordinatorServer
    sim: RealtimeSim
    settings: AgentSettings
    instances: dict[str, LocalInstance] = field(default_factory=dict)

    @property
    def coordinator(self) -> Coordinator:
        assert self.server.coordinator is not None
        return self.server.coordinator

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    async def wait_registered(self, count: int, timeout_s: float = 10.0) -> None:
        async def registered() -> None:
            while len(self.coordinator.fleet.qlm_list_instances()) < count:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(registered(), timeout_s)

    async def crash(self, instance_id: str) -> None:
        """The instance dies: its agent stops talking and its engine drops everything it held."""
        inst = self.instances.pop(instance_id)
        inst.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await inst.task
        for rid in list(inst.link.attempts):
            inst.link.abort(rid)
        inst.link.inst.healthy = False

    def restart(self, instance_id: str) -> None:
        """A crashed instance comes back: its engine, empty, with a new agent."""
        engine = self.sim.instance(instance_id)
        engine.healthy = True
        add_instance(self, engine)


@contextlib.asynccontextmanager
async def local_stack(
    tmp: Path,
    *,
    instances: int = 2,
    speed: float = 20.0,
    config: Mapping[str, Any] | None = None,
    scenario: Scenario | None = None,
    env: dict[str, str] | None = None,
    token: str | None = None,
    telemetry: Telemetry | None = None,
    agent_settings: AgentSettings | None = None,
    sims: list[SimInstance] | None = None,
    device_control: Callable[[LocalStack], EngineControl] | None = None,
) -> AsyncIterator[LocalStack]:
    """Start a coordinator on free loopback ports (journal in ``tmp``) and ``instances`` simulated
    H100s of the scenario's first model (or the simulated instances ``sims``, then ``instances``
    is how many the coordinator lists: a device's engines are one), ``speed`` times faster than
    real time; ``device_control`` makes the devices' control (:class:`SimEngineControl`). The agents use
    ``agent_settings`` when given (its target is replaced by the coordinator's, known only once
    bound: for TLS), else plaintext with ``token``."""
    scenario = scenario or load_scenario()
    base: dict[str, Any] = {
        "http": Listen(port=0),
        "grpc": Listen(port=0),
        "journal": {"path": str(tmp / "journal.db")},
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 2.0,
        "recovery_grace_s": 0.5,
        "drain_timeout_s": 5.0,
    }
    base.update(config or {})
    cfg = CoordinatorConfig.model_validate(base)
    server = CoordinatorServer(cfg, scenario, telemetry=telemetry, env=env or {}, warn=lambda _m: None)
    await server.start()
    group = scenario.instances[0]
    costs = scenario.cost_models_for(group.gpu)
    sims = sims or [
        SimInstance(
            f"sim-{i}", group.gpu, costs, initial_model=group.models[0], warm_models=tuple(group.models[1:])
        )
        for i in range(instances)
    ]
    sim = RealtimeSim(sims, speed=speed, stream_interval_s=0.02)
    sim.start()
    target = f"127.0.0.1:{server.grpc_port}"
    settings = (
        AgentSettings(target, token=token)
        if agent_settings is None
        else dataclasses.replace(agent_settings, target=target)
    )
    stack = LocalStack(server, sim, settings)
    if device_control is not None:
        stack.coordinator.fleet.devices.sleep.control = device_control(stack)
    for inst in sims:
        add_instance(stack, inst)
    try:
        await stack.wait_registered(instances)
        yield stack
    finally:
        for li in list(stack.instances.values()):
            await li.shutdown()
        await sim.stop()
        if not server.stopped.is_set():
            await server.stop(drain_timeout_s=0)


@contextlib.asynccontextmanager
async def front_door_worker(stack: LocalStack, folder: Path) -> AsyncIterator[RelayClient]:
    """A front-door worker's link to the stack's coordinator, over a relay socket in ``folder``
    (what ``qlm serve --http-workers N`` runs in each worker process)."""
    relay = RelayService(stack.coordinator, "secret")
    path = str(folder / "relay.sock")
    await relay.serve(path)
    worker = RelayClient(path, "secret")
    await worker.start()
    try:
        yield worker
    finally:
        await worker.close()
        await relay.close()


def run_with_stack(tmp: Path, body: Callable[[LocalStack], Awaitable[None]], **kw: Any) -> None:
    """``body(stack)`` on a fresh :func:`local_stack` (``kw`` its options), in a new event loop."""

    async def main() -> None:
        async with local_stack(tmp, **kw) as stack:
            await body(stack)

    asyncio.run(main())


async def run_batch(client: Any, bodies: list[dict[str, Any]], endpoint: str = "/v1/completions") -> Any:
    """A Batch API batch of ``bodies`` (lines ``l0``, ``l1``, ...) through an OpenAI SDK ``client``,
    once it has ended; the SDK's batch object."""
    rows = [
        {"custom_id": f"l{i}", "method": "POST", "url": endpoint, "body": b} for i, b in enumerate(bodies)
    ]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    upload = await client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
    while batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    return batch


def add_instance(stack: LocalStack, inst: SimInstance) -> LocalInstance:
    link = SimEngineLink(stack.sim, inst)
    agent = link.agent = InstanceAgent(stack.settings, link)
    stop = asyncio.Event()
    li = LocalInstance(link, agent, stop, asyncio.get_running_loop().create_task(agent.run(stop)))
    stack.instances[inst.instance_id] = li
    return li


class SimEngineControl:
    """Stops and starts the stack's simulated engines as ``qlm serve`` stops and starts vLLM servers
    for a cold sleep on CPU (:class:`~qlm_plugin.coordinator.engine_sleep.EngineControl`): a stop ends
    the engine's agent and drops its model's weights; a start loads them from scratch (the cold
    load time of its cost model) under a new agent, which registers as after a restart. The first
    ``fail_starts`` starts fail (the server exits before it serves)."""

    def __init__(self, stack: LocalStack, fail_starts: int = 0) -> None:
        self.stack = stack
        self.stops = 0
        self.starts = 0
        self.fail_starts = fail_starts
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop_engine(self, instance_id: str, done: Callable[[str | None], None]) -> bool:
        li = self.stack.instances.get(instance_id)
        if li is None:
            return False
        self.stops += 1

        async def stop() -> None:
            del self.stack.instances[instance_id]
            await li.shutdown()
            engine = li.link.inst
            if engine.model is not None:
                engine.unload_model(engine.model, keep_warm=False)
            while engine.model is not None:
                await asyncio.sleep(0.01)
            done(None)

        self._spawn(stop())
        return True

    def start_engine(self, instance_id: str, done: Callable[[str | None], None]) -> bool:
        engine = self.stack.sim.instance(instance_id)
        if instance_id in self.stack.instances:
            return False
        self.starts += 1

        async def start() -> None:
            if self.fail_starts > 0:
                self.fail_starts -= 1
                await asyncio.sleep(0.05)
                done("the server exited with 1 before it served")
                return
            engine.load_model(next(iter(engine.cost_models)), "gpu")
            add_instance(self.stack, engine)
            done(None)

        self._spawn(start())
        return True
