"""The engine-side agent: connects a vLLM engine to the coordinator from inside EngineCore.

It runs :class:`~qlm_plugin.transport.agent.InstanceAgent` on its own thread with its own event loop, so a
scheduling step never waits on the network; the scheduler and the agent share only a state
snapshot (replaced whole each step), a queue of step timings and a queue of eviction orders. If the
coordinator is unreachable the engine keeps serving with its local policy while the agent
reconnects with backoff.

Requests reach the engine through its own OpenAI server: the coordinator forwards each dispatch
there (``endpoint``), with the QLM fields in ``vllm_xargs``. Settings come from
``--additional-config '{"qlm": {...}}'`` or the environment:

==================  =====================  ==============================================
key                 environment            meaning
==================  =====================  ==============================================
``coordinator``     ``QLM_COORDINATOR``    host:port of the coordinator's gRPC server
``instance_id``     ``QLM_INSTANCE_ID``    this engine's name (default: hostname-port)
``endpoint``        ``QLM_ENDPOINT``       base URL of this engine's OpenAI server
``gpu``             ``QLM_GPU``            GPU kind of the cost model (default ``cpu``)
``device``          ``QLM_DEVICE``         the device this engine shares with others, one awake
                                           at a time (the coordinator swaps them); default none
``token_env``       --                     variable holding the instance token (``QLM_INSTANCE_TOKEN``)
==================  =====================  ==============================================
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from qlm_plugin.adapters.vllm.orders import EvictionOrder
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.agent import AgentSettings, InstanceAgent

log = logging.getLogger("qlm_plugin.adapters.vllm")
#: How long a sleep or wake of the engine may take (a cold wake reloads the weights).
SWAP_TIMEOUT_S = 600.0
#: How long the agent waits for its engine's OpenAI server to answer before registering anyway
#: (an endpoint this process cannot reach itself, behind a proxy without hairpin routing), seconds.
SERVER_WAIT_S = 120.0


#: What ``--additional-config '{"qlm": {...}}'`` may set.
AGENT_SETTINGS = ("coordinator", "endpoint", "instance_id", "gpu", "device", "token_env")


def settings_from(additional_config: Any, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The agent's settings, or None when no coordinator is configured (local policy only)."""
    env = dict(os.environ) if env is None else env
    cfg = additional_config.get("qlm", {}) if isinstance(additional_config, dict) else {}
    if not isinstance(cfg, dict):  # raised in the scheduler's constructor: the engine says why at start
        raise ValueError(
            f"--additional-config: 'qlm' must be an object of settings ({', '.join(AGENT_SETTINGS)}), "
            f"got {type(cfg).__name__}"
        )
    unknown = sorted(str(k) for k in cfg if k not in AGENT_SETTINGS)
    if unknown:
        log.warning(
            "--additional-config: qlm settings %s are not read (known: %s)",
            unknown,
            ", ".join(AGENT_SETTINGS),
        )
    coordinator = cfg.get("coordinator") or env.get("QLM_COORDINATOR")
    if not coordinator:
        return None
    endpoint = cfg.get("endpoint") or env.get("QLM_ENDPOINT", "")
    default_id = f"{socket.gethostname()}-{endpoint.rsplit(':', 1)[-1].strip('/') or os.getpid()}"
    return {
        "coordinator": str(coordinator),
        "instance_id": str(cfg.get("instance_id") or env.get("QLM_INSTANCE_ID") or default_id),
        "endpoint": str(endpoint),
        "gpu": str(cfg.get("gpu") or env.get("QLM_GPU", "cpu")),
        "device": str(cfg.get("device") or env.get("QLM_DEVICE", "")),
        "token": env.get(str(cfg.get("token_env", "QLM_INSTANCE_TOKEN")), ""),
    }


class VLLMEngineLink:
    """The agent's view of the engine (see :class:`qlm_plugin.transport.agent.EngineLink`). Its methods run on
    the agent's thread and read only what the scheduler publishes."""

    backend = "vllm"

    def __init__(self, sched: Any, settings: dict[str, str]) -> None:
        self.sched = sched
        self.instance_id = settings["instance_id"]
        self.endpoint = settings["endpoint"]
        self.gpu = settings["gpu"]
        self.device = settings.get("device", "")
        model_cfg = sched.vllm_config.model_config
        self.model = str(getattr(model_cfg, "served_model_name", None) or model_cfg.model)
        if isinstance(getattr(model_cfg, "served_model_name", None), (list, tuple)):
            self.model = str(model_cfg.served_model_name[0])
        self.on_gpu = self.gpu != "cpu"
        # response_format and structured_outputs: its grammar backend; tools: its OpenAI server (a
        # named or required tool_choice by that grammar; "auto" needs the server's --tool-call-parser)
        caps = ["evict", "structured_output", "tools", "logprobs", "prompt_logprobs"]
        if self.on_gpu:
            caps += ["load_model", "warm_start"]
        if sched.vllm_config.kv_transfer_config is not None:
            caps.append("swap")
        self.capabilities: Sequence[str] = caps
        self.notes = [] if self.on_gpu else ["no sleep mode on CPU: load and unload are pause and resume"]
        self.num_blocks = int(sched.cache_config.num_gpu_blocks or 0)
        self.paused = False
        self.cold = False  # asleep at level 2: its weights dropped

    def state(self) -> pb.StateReport:
        running, waiting, usage, at, pending = self.sched.qlm_snapshot
        steps = []
        while self.sched.qlm_steps:
            s = self.sched.qlm_steps.popleft()
            steps.append(
                pb.StepTiming(
                    start=s.start,
                    duration_s=s.duration_s,
                    prefill_tokens=s.prefill_tokens,
                    decode_tokens=s.decode_tokens,
                    batch_size=s.batch_size,
                )
            )
        return pb.StateReport(
            instance_id=self.instance_id,
            models_loaded=[] if self.paused else [self.model],
            models_warm=[self.model] if self.paused and not self.cold else [],
            models_servable=[self.model],  # one engine per model: it wakes its own, loads no other
            device=self.device,
            num_running=running,
            num_waiting=waiting,
            kv_blocks_used=int(usage * self.num_blocks),
            kv_blocks_total=self.num_blocks,
            max_num_seqs=self.seats(),
            # the step's token budget and the prefill still to do: a pull hands over only what the
            # next step can start (vLLM's chunked prefill shares this budget with the decodes)
            max_num_batched_tokens=int(getattr(self.sched, "max_num_scheduled_tokens", 0) or 0),
            prefill_tokens_pending=pending,
            step_timings=steps[-256:],
            notes=self.notes,
            now=at,
        )

    def seats(self) -> int:
        """The requests the engine runs at once: ``--max-num-active-seqs`` where vLLM has it, which
        admits fewer than ``max_num_seqs``."""
        return int(getattr(self.sched, "max_num_active_reqs", None) or self.sched.max_num_running_reqs)

    def free_slots(self) -> int:
        running, waiting, usage, _, _ = self.sched.qlm_snapshot
        if self.paused:
            return 0
        return max(0, self.seats() - running - waiting) if usage < 0.95 else 0

    def held(self) -> list[pb.HeldRequest]:
        return []  # requests arrive over HTTP from the coordinator: a lost connection aborts them

    def start(self, assignment: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        return False  # dispatch goes through the OpenAI server (endpoint), not the pull stream

    def abort(self, request_id: str) -> None:
        pass  # the coordinator closes the HTTP stream: vLLM aborts the request itself

    def execute(self, cmd: pb.Command) -> pb.CommandAck | Awaitable[pb.CommandAck]:
        op = cmd.WhichOneof("op")
        if op == "evict":
            # carried out at the next step where the request runs
            ev = cmd.evict
            self.sched.qlm_orders.append(EvictionOrder(ev.request_id, ev.for_request_id, time.monotonic()))
            return pb.CommandAck(ok=True)
        if op == "abort":
            return pb.CommandAck(ok=True)
        if op in ("load_model", "unload_model"):
            target = cmd.load_model.model if op == "load_model" else cmd.unload_model.model
            if target != self.model:
                return pb.CommandAck(
                    ok=False, error=f"this engine serves {self.model!r} only (one engine per model)"
                )
            return self._sleep_or_wake(wake=op == "load_model", keep_warm=cmd.unload_model.keep_warm)
        return pb.CommandAck(ok=False, error=f"{op} is not supported by the vLLM adapter")

    async def _sleep_or_wake(self, *, wake: bool, keep_warm: bool) -> pb.CommandAck:
        """GPU: sleep level 1 (weights to host memory) or 2, ``/wake_up``; CPU: pause and resume.
        Awaited on the agent's loop, beside its heartbeats (a wake can take a minute)."""
        if not self.endpoint:
            return pb.CommandAck(ok=False, error="no endpoint configured for this engine")
        if self.on_gpu:
            path = "/wake_up" if wake else f"/sleep?level={1 if keep_warm else 2}"
        else:
            path = "/resume" if wake else "/pause?mode=keep"
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    self.endpoint.rstrip("/") + path, timeout=aiohttp.ClientTimeout(total=SWAP_TIMEOUT_S)
                ) as r,
            ):
                body = await r.text()
                if r.status != 200:
                    return pb.CommandAck(ok=False, error=f"{path}: HTTP {r.status}: {body[:300]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return pb.CommandAck(ok=False, error=f"{path}: {type(exc).__name__}: {exc}")
        self.paused = not wake
        self.cold = not wake and self.on_gpu and not keep_warm
        return pb.CommandAck(ok=True, warm=keep_warm or wake)


class Link:
    """The agent thread and its loop."""

    def __init__(self, sched: Any, settings: dict[str, str]) -> None:
        self.engine = VLLMEngineLink(sched, settings)
        self.agent = InstanceAgent(
            AgentSettings(settings["coordinator"], token=settings["token"] or None), self.engine
        )
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._room = 0  # free slots at the last step (to notice when room appears)
        self.thread = threading.Thread(target=self._run, name="qlm-agent", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            await self._server_answers()
            await self.agent.run(self._stop)

        try:
            self.loop.run_until_complete(main())
        except Exception:
            log.exception("the QLM agent stopped; the engine keeps serving with its local policy")

    async def _server_answers(self) -> None:
        """Register only once the engine's OpenAI server answers: the engine core starts this agent
        before the server binds, and requests sent to an instance that registered but refused
        connections failed their attempts (three at once after an engine restart)."""
        endpoint = self.engine.endpoint.rstrip("/")
        if not endpoint:
            return
        deadline = time.monotonic() + SERVER_WAIT_S
        async with aiohttp.ClientSession() as http:
            while self._stop is not None and not self._stop.is_set():
                try:
                    async with http.get(f"{endpoint}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    log.warning("QLM: %s/health silent %.0f s: registering anyway", endpoint, SERVER_WAIT_S)
                    return
                await asyncio.sleep(0.2)

    def step_done(self) -> None:
        """Called by the scheduler after each step: wake the agent when room appeared, and report
        the evictions of coordinator requests."""
        evicted = self.engine.sched.qlm_evicted
        while evicted:
            qid, attempt, wasted = evicted.popleft()
            try:
                event = pb.RequestEvent(
                    request_id=qid,
                    attempt=attempt,
                    kind=pb.RequestEvent.EVICTED,
                    wasted_tokens=wasted,
                    time=time.time(),
                )
            except (TypeError, ValueError):  # out of the message's range: the scheduler's thread goes on
                log.warning("QLM: cannot report the eviction of %r (attempt %r)", qid, attempt)
                continue
            self.loop.call_soon_threadsafe(self.agent.emit, event)
        room = self.engine.free_slots()
        if room > self._room:
            self.loop.call_soon_threadsafe(self.agent.room)
        self._room = room

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=5)


def start_link(sched: Any) -> Link | None:
    settings = settings_from(getattr(sched.vllm_config, "additional_config", None))
    if settings is None:
        log.info("QLM scheduler without a coordinator: local policy only")
        return None
    log.info("QLM agent: instance %s -> coordinator %s", settings["instance_id"], settings["coordinator"])
    return Link(sched, settings)
