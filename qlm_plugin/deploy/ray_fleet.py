"""Instances on a Ray cluster: ``qlm serve --ray [ADDRESS]`` and ``qlm scale MODEL N``.

Each engine is a Ray actor (:class:`InstanceActor`) placed by a placement group with what it needs:
simulated instances ask for a quarter of a CPU, vLLM engines (:class:`VLLMEngineActor`, a vLLM
server in a child process) their GPUs, or a CPU on a CPU build. Ray restarts
an actor that dies (``max_restarts=-1``); the restarted actor registers again under the same
instance id, so the coordinator gives its unfinished requests back to the queue at once, to finish
elsewhere. A named :class:`FleetManager` actor (``qlm-fleet`` in namespace ``qlm``), owned by the
serve that started it (it dies with it), holds the actors in their groups (model, GPU kind, warm
models), so ``qlm scale`` from any machine of the cluster adds or removes instances like the ones a
model has, at run time. The serve's :class:`Fleet` watches the manager and makes it again, with its
groups, should it die (its actors die with it).

The coordinator is a plain process, not an actor: it owns the journal (a SQLite file on its local
disk) and the public ports. An actor restarted by Ray on another node would find neither; as a
process it keeps the lifecycle and durability of ``qlm serve``, and the actors reach it over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

if TYPE_CHECKING:
    from qlm_plugin.workloads.scenario import Scenario

log = logging.getLogger("qlm_plugin.ray")


NAMESPACE = "qlm"
FLEET = "qlm-fleet"
#: CPUs a simulated instance asks for (it is light: a small share leaves room for many per node).
SIM_CPUS = 0.25
#: CPUs an engine of a CPU build of vLLM asks for (what it really uses is its own threads' business).
VLLM_CPU_CPUS = 1.0
#: How long the instances being removed have to stop before they are killed, seconds.
STOP_TIMEOUT_S = 30.0
#: How long an engine's placement may wait, seconds (the cluster had the room, but maybe not on one node).
PLACEMENT_TIMEOUT_S = 60.0
#: How long resources just freed may take to show as free before more instances are refused, seconds.
CAPACITY_WAIT_S = 5.0
#: How long the TCP check of a cluster's address waits, and joining it may take, seconds.
REACH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 30.0
#: How often ``qlm serve`` looks at its fleet manager, seconds.
WATCH_S = 5.0
#: How long a call of the fleet manager may take (a resize: placements, then stops), seconds.
CALL_TIMEOUT_S = PLACEMENT_TIMEOUT_S + 2 * STOP_TIMEOUT_S + 60


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
        scenario: Scenario | str | None,
        coordinator: str,
        speed: float,
        token: str | None,
        record: str | None,
    ) -> None:
        self.instance_id = instance_id
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: str | None = None  # why its engine stopped (ping raises it)
        args = (instance_id, gpu, models, scenario, coordinator, speed, token, record)
        self._thread = threading.Thread(target=self._run, args=args, name=f"qlm-{instance_id}", daemon=True)
        self._thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self._serve(*args)
        except BaseException as exc:  # the thread ended with the actor alive: say why on ping
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("instance %s stopped", self.instance_id)

    def _serve(
        self,
        instance_id: str,
        gpu: str,
        models: list[str],
        scenario: Scenario | str | None,
        coordinator: str,
        speed: float,
        token: str | None,
        record: str | None,
    ) -> None:
        from qlm_plugin.adapters.sim.engine import SimInstance
        from qlm_plugin.adapters.sim.process import run_instances
        from qlm_plugin.transport.agent import AgentSettings
        from qlm_plugin.workloads.scenario import load_scenario

        sc = scenario if scenario is not None and not isinstance(scenario, str) else load_scenario(scenario)
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
        if self.failed is not None:
            raise RuntimeError(f"instance {self.instance_id} stopped: {self.failed}")
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


@dataclass(frozen=True)
class Group:
    """Instances alike (a scenario's instance group): ``qlm scale`` adds to a model instances like
    those it has."""

    model: str  # served first
    gpu: str = "h100"  # the cost model's GPU kind (simulated instances)
    warm: tuple[str, ...] = ()  # the other models it holds, warm


class FleetError(RuntimeError):
    """What the fleet cannot do: no room on the cluster for more instances, no fleet to resize."""


def plan_scale(sizes: dict[int, list[int]], count: int) -> tuple[list[int], list[int]]:
    """How a model with instances in several groups (group index -> their serials) gets to ``count``:
    the groups to add one to, in order (the smallest first, ties: the first), or the serials that
    leave (the newest of the largest group first, ties: the last group), so its groups stay even."""
    sizes = {g: sorted(s) for g, s in sizes.items()}
    n = {g: len(s) for g, s in sizes.items()}
    adds: list[int] = []
    leaving: list[int] = []
    while sum(n.values()) < count:
        g = min(n, key=lambda g: (n[g], g))
        adds.append(g)
        n[g] += 1
    while sum(n.values()) > count:
        g = max(n, key=lambda g: (n[g], g))
        leaving.append(sizes[g][n[g] - 1])
        n[g] -= 1
    return adds, leaving


def _resources(r: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(r.items())) or "nothing"


@dataclass
class _Member:
    group: int
    serial: int
    actor: Any
    pg: Any


@ray.remote(num_cpus=0)
class FleetManager:
    """The instances of the deployment, in their groups. Named, so ``qlm scale`` finds it; owned by
    the ``qlm serve`` that made it (it dies with it, and its instances with it)."""

    def __init__(
        self,
        fleet_id: str,
        coordinator: str,
        scenario: Scenario | str | None,
        speed: float,
        token: str | None,
        record: str | None,
        vllm: dict[str, VLLMModel] | None = None,
    ) -> None:
        self.fleet_id = fleet_id  # its placement groups' names begin with it
        self.coordinator = coordinator
        self.scenario = scenario
        self.speed = speed
        self.token = token
        self.record = record
        self.vllm = vllm or {}  # models served by vLLM engines (the others: simulated instances)
        self.groups: list[Group] = []
        self.members: dict[str, _Member] = {}  # instance id -> its group, actor, placement group
        self._serial = 0

    def add(self, group: Group, count: int) -> list[str]:
        """``count`` more instances of ``group`` (which becomes one of the fleet's, even with none)."""
        self._could_fit(group.model, count)
        if group not in self.groups:
            self.groups.append(group)
        self._start([self.groups.index(group)] * count)
        return self._ids()

    def scale(self, model: str, count: int) -> list[str]:
        """Run ``count`` instances serving ``model`` (first) over its groups, adding or removing;
        returns their ids."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        mine = [g for g, group in enumerate(self.groups) if group.model == model]
        if not mine:
            served = ", ".join(sorted({g.model for g in self.groups})) or "none"
            raise ValueError(f"model {model!r} is not served here (served: {served})")
        sizes: dict[int, list[int]] = {g: [] for g in mine}
        for m in self.members.values():
            if m.group in sizes:
                sizes[m.group].append(m.serial)
        self._could_fit(model, count - sum(len(s) for s in sizes.values()))
        adds, leaving = plan_scale(sizes, count)
        self._start(adds)
        self._remove([iid for iid, m in self.members.items() if m.group in sizes and m.serial in leaving])
        return [iid for iid in self._ids() if self.members[iid].group in sizes]

    def counts(self) -> list[tuple[Group, int]]:
        """Each group and its instances now: what a new manager needs to make the fleet again."""
        return [(g, sum(m.group == i for m in self.members.values())) for i, g in enumerate(self.groups)]

    def instances(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {g.model: [] for g in self.groups}
        for iid in self._ids():
            out[self.groups[self.members[iid].group].model].append(iid)
        return out

    def failures(self) -> dict[str, str]:
        """Instance id -> why its engine stopped (a scenario it could not load...), for those that
        answer so: Ray keeps an actor alive whose engine's thread ended, and nothing else says so."""
        calls = {
            iid: m.actor.ping.remote()
            for iid, m in self.members.items()
            if self.groups[m.group].model not in self.vllm  # (a vLLM engine's actor exits instead)
        }
        out = {}
        for iid, call in calls.items():
            try:
                ray.get(call, timeout=5)
            except ray.exceptions.RayTaskError as exc:
                out[iid] = str(exc.cause)
            except ray.exceptions.RayError as exc:  # not answering: it may be starting still
                log.debug("instance %s did not answer: %s", iid, exc)
        return out

    def endpoints(self) -> dict[str, str]:
        """Instance id -> the OpenAI server of each vLLM engine (as its actor's last start made it)."""
        return {
            iid: ray.get(m.actor.endpoint.remote(), timeout=600)
            for iid, m in self.members.items()
            if self.groups[m.group].model in self.vllm
        }

    def reclaim(self) -> dict[int, int]:
        """Remove the placement groups that a dead manager of this fleet left: its actors died with
        it, but the groups live as long as the serve and hold their resources. Returns how many
        each of its groups (by index) had: what it ran when it died, which the serve's last look
        may not have seen yet (a ``qlm scale`` from another process just before)."""
        prefix = f"qlm-{self.fleet_id}-"
        ours = {self._pg_name(m.group, iid) for iid, m in self.members.items()}
        left = {
            info["name"]
            for info in ray.util.placement_group_table().values()
            if info["name"].startswith(prefix) and info["state"] != "REMOVED" and info["name"] not in ours
        }
        held: dict[int, int] = {}
        for name in left:
            with contextlib.suppress(ValueError):  # removed meanwhile
                remove_placement_group(ray.util.get_placement_group(name))
            group = name[len(prefix) :].split("-", 1)[0]
            if group[:1] == "g" and group[1:].isdigit():
                held[int(group[1:])] = held.get(int(group[1:]), 0) + 1
        return held

    def _pg_name(self, group: int, iid: str) -> str:
        """An instance's placement group: the fleet's, and the group it is in (:meth:`reclaim`)."""
        return f"qlm-{self.fleet_id}-g{group}-{iid}"

    def shutdown(self) -> None:
        self._remove(list(self.members))

    def _ids(self) -> list[str]:
        return sorted(self.members, key=lambda iid: self.members[iid].serial)

    def _bundle(self, model: str) -> dict[str, float]:
        """What an instance of ``model`` asks of a node: its GPUs, or (a CPU build of vLLM, a
        simulated instance) a share of a CPU."""
        spec = self.vllm.get(model)
        if spec is None:
            return {"CPU": SIM_CPUS}
        if spec.gpus:
            return {"CPU": 1, "GPU": spec.gpus}
        return {"CPU": VLLM_CPU_CPUS}

    def _could_fit(self, model: str, more: int) -> None:
        """Refuse, before planning them one by one (ten million took minutes), more instances than
        the whole cluster could hold."""
        if more <= 0:
            return
        need = {k: v * more for k, v in self._bundle(model).items()}
        total = ray.cluster_resources()
        if any(total.get(k, 0.0) < v - 1e-9 for k, v in need.items()):
            raise FleetError(
                f"{more} more instance{'s' * (more > 1)} of {model} need {_resources(need)}; the Ray "
                f"cluster has {_resources({k: total.get(k, 0.0) for k in need})} in all"
            )

    def _room(self, groups: list[int]) -> None:
        """Refuse at once what the cluster has no room for (a placement group would wait for it,
        pending, and be placed whenever room came, holding it)."""
        need: dict[str, float] = {}
        for g in groups:
            for k, v in self._bundle(self.groups[g].model).items():
                need[k] = need.get(k, 0.0) + v
        deadline = time.monotonic() + CAPACITY_WAIT_S  # what was just freed shows up late
        while True:
            free = ray.available_resources()
            if all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items()):
                return
            if time.monotonic() >= deadline:
                what = f"{len(groups)} more instance{'s' * (len(groups) > 1)} of " + ", ".join(
                    sorted({self.groups[g].model for g in groups})
                )
                raise FleetError(
                    f"{what} need {_resources(need)}; the Ray cluster has "
                    f"{_resources({k: free.get(k, 0.0) for k in need})} free"
                )
            time.sleep(0.25)

    def _start(self, groups: list[int]) -> None:
        """One more instance in each of ``groups``."""
        if groups:
            self._room(groups)
        for g in groups:
            group = self.groups[g]
            serial = self._serial + 1
            iid = f"{group.model}-{serial}"
            bundle = self._bundle(group.model)
            pg = placement_group([bundle], strategy="STRICT_PACK", name=self._pg_name(g, iid))
            try:
                ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)  # else placed later, holding what it got
                raise FleetError(
                    f"instance {iid} was not placed in {PLACEMENT_TIMEOUT_S:.0f} s: it needs "
                    f"{_resources(bundle)} on one node, and no node has that free (the cluster: "
                    f"{_resources(ray.available_resources())} free in all)"
                ) from None
            self._serial = serial
            options = {
                "name": actor_name(iid),
                "namespace": NAMESPACE,
                "num_cpus": bundle["CPU"],
                "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg),
            }
            spec = self.vllm.get(group.model)
            if spec is None:
                actor = InstanceActor.options(**options).remote(  # type: ignore[attr-defined]
                    iid,
                    group.gpu,
                    [group.model, *group.warm],
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
                    group.model,
                    list(spec.engine_args),
                    self.coordinator,
                    self.token,
                    spec.cpu,
                    spec.log_dir,
                )
            self.members[iid] = _Member(g, serial, actor, pg)

    def _remove(self, ids: list[str]) -> None:
        leaving = [self.members.pop(iid) for iid in ids]
        # stopped together (a vLLM server takes seconds to stop): their agents leave, their work
        # goes back to the queue
        stops = [m.actor.stop.remote() for m in leaving]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        for m in leaving:
            ray.kill(m.actor, no_restart=True)
            remove_placement_group(m.pg)


def ray_address(address: str) -> tuple[str, int]:
    """The host and port that ``ray.init(address)`` dials: ``HOST:PORT`` (as Ray resolves it),
    ``ray://HOST[:PORT]`` (Ray Client), or ``auto`` (``RAY_ADDRESS``, else the cluster that
    ``ray start`` made on this machine)."""
    if address.startswith("ray://"):
        url = urlsplit(address)
        try:
            port = url.port or 10001  # Ray Client's default port
        except ValueError:
            port = None
        if not url.hostname or port is None:
            raise ValueError(f"--ray {address!r}: not a Ray Client address (ray://HOST:PORT)")
        return url.hostname, port
    from ray._private.services import canonicalize_bootstrap_address

    try:
        # Ray's own resolution (private, but the one ray.init applies: "auto", localhost)
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError:
        raise ConnectionError(
            "no Ray cluster found for --ray auto (none started with `ray start` on this machine, "
            "no RAY_ADDRESS): give its address, --ray HOST:PORT"
        ) from None
    except ValueError:
        resolved = None
    host, _, port_text = (resolved or "").rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"--ray {address!r}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto)")
    return host.strip("[]"), int(port_text)


def connect(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one this machine belongs to; None: start a
    local one, which must happen on the main thread: Ray's processes die with the thread that
    started them). Raises ConnectionError when the cluster does not answer in ``timeout_s``."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not address:
        # "local": a Ray of its own (without it ray.init joined RAY_ADDRESS's cluster, with no bound
        # when that one was down)
        ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
        return
    host, port = ray_address(address)
    try:  # ray.init would retry a port where nothing listens for ever, without a word
        socket.create_connection((host, port), timeout=min(REACH_TIMEOUT_S, timeout_s)).close()
    except OSError as exc:
        raise ConnectionError(f"Ray not reachable at {address} ({host}:{port}: {exc})") from None
    failed: list[BaseException] = []
    # Ray's INFO lines ("Connected to Ray cluster") say nothing here (Ray Client refuses the option)
    quiet = {} if address.startswith("ray://") else {"logging_level": logging.WARNING}

    def join() -> None:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, **quiet)
        except BaseException as exc:
            failed.append(exc)

    # on a thread of its own, bounded: a port that answers but is no Ray's holds ray.init for ever
    # (joining a cluster starts no process here, so the thread may end)
    logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler" not in r.getMessage())
    joining = threading.Thread(target=join, name="qlm-ray-init", daemon=True)
    joining.start()
    joining.join(timeout_s)
    if joining.is_alive():
        raise ConnectionError(
            f"Ray at {address} ({host}:{port}) did not answer in {timeout_s:.0f} s (is it a Ray "
            "cluster's address? `ray status` shows it)"
        )
    if failed:
        raise failed[0]
    if address == "auto":  # Ray resolves "auto" again, and may pick another cluster of this machine
        joined = ray.get_runtime_context().gcs_address
        if joined and joined.rpartition(":")[2] != str(port):
            ray.shutdown()
            raise ConnectionError(
                f"--ray auto: this machine runs more than one Ray cluster ({host}:{port}, {joined}): "
                "name the one to use, --ray HOST:PORT (a cluster with token authentication also "
                "wants RAY_AUTH_MODE=token)"
            )


def _unwrapped(call: Any, timeout_s: float) -> Any:
    """``ray.get`` that raises what the actor raised, without Ray's wrapping (colours, actor id)."""
    try:
        return ray.get(call, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from None


class Fleet:
    """The serve's side of the fleet: the manager it owns, and the groups it runs, to make it again
    should it die (its instances die with it, and nothing else would notice)."""

    def __init__(
        self,
        coordinator: str,
        groups: Sequence[tuple[Group, int]],
        *,
        scenario: Scenario | str | None = None,
        speed: float = 1.0,
        token: str | None = None,
        record: str | None = None,
        vllm: dict[str, VLLMModel] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.scenario = scenario
        self.speed = speed
        self.token = token
        self.record = record
        self.vllm = vllm
        merged: dict[Group, int] = {}  # two scenario groups alike are one, of both counts
        for group, count in groups:
            merged[group] = merged.get(group, 0) + count
        self.counts = list(merged.items())  # as the manager last said
        self.fleet_id = uuid.uuid4().hex[:8]
        self.manager: Any = None
        self.closing = False

    @property
    def size(self) -> int:
        return sum(n for _, n in self.counts)

    def start(self) -> None:
        """Make the manager and start the groups (blocks: run it off the event loop)."""
        self.manager = self._make()
        for group, count in self.counts:
            self.call("add", group, count)

    def call(self, method: str, *args: Any) -> Any:
        return _unwrapped(getattr(self.manager, method).remote(*args), CALL_TIMEOUT_S)

    def check(self) -> str | None:
        """One look at the manager; if it died, a new one with the groups and counts it had (and
        the placement groups it left removed). Returns what happened then, else None."""
        if self.closing:
            return None
        try:
            self.counts = list(ray.get(self.manager.counts.remote(), timeout=WATCH_S))
            return None
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return None  # busy resizing, or unreachable a moment: alive
        except ray.exceptions.ActorDiedError as exc:
            cause = str(exc).splitlines()[0][:200]
        self.manager = None  # a handle to the dead manager holds its name
        self.manager = self._make(wait_s=10)
        held: dict[int, int] = self.call("reclaim")
        if held:  # what it ran when it died (a group's index is its place in these counts)
            self.counts = [(group, held.get(i, 0)) for i, (group, _) in enumerate(self.counts)]
        for group, count in self.counts:
            self.call("add", group, count)
        return (
            f"the Ray fleet manager died ({cause}), and its instances with it: made them again "
            f"({self.size} instances; {sum(held.values())} placement groups left behind removed)"
        )

    async def watch(self, said: Callable[[str], None]) -> None:
        """:meth:`check` every :data:`WATCH_S` seconds, for ever; ``said`` gets what it did."""
        while True:
            await asyncio.sleep(WATCH_S)
            note = await asyncio.to_thread(self.check)
            if note:
                said(note)

    def stop(self) -> None:
        """Stop every instance, then the manager (the actors it made die with it, should any be left)."""
        self.closing = True
        if self.manager is None:
            return
        try:
            ray.get(self.manager.shutdown.remote(), timeout=2 * STOP_TIMEOUT_S)
        except Exception as exc:  # a stuck actor, or a dead manager: killing it takes its actors
            log.warning("the fleet did not stop in time (%s): killing it", exc)
        finally:
            ray.kill(self.manager, no_restart=True)

    def _make(self, wait_s: float = 0) -> Any:
        """The manager; ``wait_s``: how long its name may stay taken (a dead one's, released late)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return FleetManager.options(  # type: ignore[attr-defined]
                    # owned by the serve (not detached): it and its actors die with it, even after a
                    # SIGKILL (a detached one outlived it, and the next serve's could not take its name)
                    name=FLEET,
                    namespace=NAMESPACE,
                    get_if_exists=False,
                ).remote(
                    self.fleet_id,
                    self.coordinator,
                    self.scenario,
                    self.speed,
                    self.token,
                    self.record,
                    self.vllm,
                )
            except ValueError:  # the name is taken: by another serve, or a dead manager for a moment
                if time.monotonic() > deadline:
                    raise FleetError(
                        f"another `qlm serve --ray` runs on this Ray cluster (its fleet manager, "
                        f"{FLEET!r}, is there): one per cluster; stop it, or use another cluster"
                    ) from None
                time.sleep(0.5)


def scale(address: str | None, model: str, count: int) -> list[str]:
    """``qlm scale``: resize ``model`` of the fleet on the cluster at ``address`` to ``count``."""
    if count < 0:
        raise ValueError(f"count must be >= 0 (0 stops the model's instances), got {count}")
    connect(address or "auto")
    try:
        fleet = ray.get_actor(FLEET, namespace=NAMESPACE)
    except ValueError:
        raise FleetError(f"no `qlm serve --ray` runs on the Ray cluster at {address or 'auto'}") from None
    return list(_unwrapped(fleet.scale.remote(model, count), CALL_TIMEOUT_S))
