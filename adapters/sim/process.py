"""Simulated instances as real processes: ``qlm instance --backend sim``.

Each simulated engine runs in (optionally scaled) real time (:class:`RealtimeSim`) and connects to
the coordinator through an :class:`~qlm_plugin.transport.agent.InstanceAgent`, exactly as a real engine's
adapter does: it registers, reports state and step timings, pulls work, streams synthetic tokens
and carries out serving operations. Simulated seconds run ``speed`` times faster than wall
seconds; everything the coordinator sees (step timings, token times) is in wall seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.realtime import Progress, RealtimeSim, natural_length, synthetic_text
from qlm_plugin.domain.instance import EvictMode
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.agent import AgentSettings, InstanceAgent

log = logging.getLogger("qlm_plugin.adapters.sim")

Event = pb.RequestEvent
CAPABILITIES = ("evict", "swap", "load_model", "warm_start")


class SimEngineLink:
    """The agent's view of one simulated engine (see :class:`qlm_plugin.transport.agent.EngineLink`)."""

    backend = "sim"
    endpoint = ""
    capabilities: Sequence[str] = CAPABILITIES

    def __init__(self, sim: RealtimeSim, inst: SimInstance, record: TextIO | None = None) -> None:
        self.sim = sim
        self.inst = inst
        self.record = record  # "request_id attempt instance_id" per generation completed (fault tests)
        self.instance_id = inst.instance_id
        self.gpu = inst.gpu
        self.attempts: dict[str, int] = {}
        self.urgency: dict[str, tuple[float, ...]] = {}
        self._reported_steps = 0
        self.agent: InstanceAgent | None = None
        # The coordinator's rank key orders the engine's own queue (lower first).
        inst.rank_key = lambda r, _i, _n: (self.urgency.get(r.id, (math.inf,)), r.arrival_time, r.id)
        inst.on_room = lambda _i, _slots, _now: self.agent.room() if self.agent is not None else None
        # The victim under KV pressure: the installed plugins' choice, else the default (the last
        # admitted), as inside a vLLM engine running the QLM scheduler.
        hook = get_plugin_manager().hook
        inst.select_victim = lambda c, i, n: hook.qlm_select_victim(candidates=c, instance_id=i, now=n)

    # ------------------------------------------------------------------ state
    def state(self) -> pb.StateReport:
        st = self.inst.state(self.sim.now, True)
        speed = self.sim.speed
        steps = self.inst.step_timings
        new = list(steps)[self._reported_steps :] if len(steps) >= self._reported_steps else list(steps)
        self._reported_steps = len(steps)
        return pb.StateReport(
            instance_id=self.instance_id,
            models_loaded=list(st.models_loaded),
            models_warm=list(st.models_warm),
            models_servable=list(st.models_servable),
            device=st.device,
            loading_model=st.loading_model or "",
            num_running=st.num_running,
            num_waiting=st.num_waiting,
            num_swapped=st.num_swapped,
            queued_tokens=st.queued_tokens,
            kv_blocks_used=st.kv_blocks_used,
            kv_blocks_total=st.kv_blocks_total,
            max_num_seqs=st.max_num_seqs,
            num_waiting_urgent=st.num_waiting_urgent,
            max_num_batched_tokens=st.max_num_batched_tokens,
            prefill_tokens_pending=st.prefill_tokens_pending,
            running_ids=list(st.running_ids),
            waiting_ids=list(st.waiting_ids),
            swapped_ids=list(st.swapped_ids),
            notes=list(st.notes),
            now=time.time(),
            step_timings=[
                pb.StepTiming(
                    start=self.sim.wall_time(s.start),
                    duration_s=s.duration_s / speed,
                    prefill_tokens=s.prefill_tokens,
                    decode_tokens=s.decode_tokens,
                    batch_size=s.batch_size,
                )
                for s in new[-256:]
            ],
        )

    def free_slots(self) -> int:
        return self.inst.free_slots()

    def held(self) -> list[pb.HeldRequest]:
        return [pb.HeldRequest(request_id=r, attempt=a) for r, a in self.attempts.items()]

    # ------------------------------------------------------------------ work
    def _limit_of(self, spec: pb.RequestSpec) -> int:
        """Its ``max_tokens``; for a chat that names none (0), the context left after its prompt."""
        if spec.max_tokens:
            return spec.max_tokens
        cost = self.inst.cost_models.get(spec.model)
        return max(1, (cost.model.context_len if cost else 32768) - max(1, spec.prompt_tokens))

    def start(self, a: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        spec = a.request
        rid, resume = spec.request_id, a.resume_tokens
        if rid in self.attempts:
            self.abort(rid)  # a newer attempt replaces the old one
        limit = self._limit_of(spec)
        remaining = limit - resume
        if remaining <= 0:  # everything was delivered before the earlier attempt was lost
            emit(
                Event(
                    request_id=rid,
                    attempt=a.attempt,
                    kind=Event.FINISHED,
                    index=resume,
                    time=time.time(),
                    finish_reason="length",
                )
            )
            return True
        # no end of sequence here: it generates up to its limit, but a chat that names none stops
        # where a chat model would (a length of its own, drawn from its id: the same everywhere)
        true_total = spec.true_output_tokens or (limit if spec.max_tokens else natural_length(rid))
        now = self.sim.now
        # The budget counts from receipt, on this engine's clock (the coordinator's may differ).
        # A plugin choosing victims here sees them (its times are this engine's, as ``now`` is).
        ttft = now + a.ttft_budget_s * self.sim.speed if a.ttft_budget_s and not resume else None
        e2e = now + a.e2e_budget_s * self.sim.speed if a.e2e_budget_s else None
        request = Request(
            id=rid,
            model=spec.model,
            prompt_tokens=max(1, spec.prompt_tokens) + resume,  # the delivered text is recomputed
            max_tokens=remaining,
            arrival_time=now,
            slo=SLO(ttft_deadline=ttft if ttft is not None and ttft > now else None, e2e_deadline=e2e),
            slo_class=spec.slo.slo_class or "interactive",
            priority=spec.slo.priority,
            tenant=spec.tenant or "default",
            true_output_tokens=max(1, min(true_total, limit) - resume),
        )
        attempt = a.attempt

        def on_progress(p: Progress) -> None:
            if self.attempts.get(rid) != attempt:
                return
            if p.kind == "tokens":
                pos = resume + p.index
                emit(
                    Event(
                        request_id=rid,
                        attempt=attempt,
                        kind=Event.TOKENS,
                        index=pos,
                        tokens=p.count,
                        text=synthetic_text(rid, pos, p.count),
                        time=p.time,
                    )
                )
            elif p.kind == "finished":
                if self.record is not None:
                    self.record.write(f"{rid} {attempt} {self.instance_id}\n")
                    self.record.flush()
                del self.attempts[rid]
                self.urgency.pop(rid, None)
                total = resume + p.index
                emit(
                    Event(
                        request_id=rid,
                        attempt=attempt,
                        kind=Event.FINISHED,
                        index=total,
                        time=p.time,
                        finish_reason="length" if total >= limit else "stop",
                        preemptions=p.outcome.preemptions,
                        wasted_tokens=p.outcome.wasted_tokens,
                    )
                )

        self.attempts[rid] = attempt
        self.urgency[rid] = tuple(a.rank) or (a.urgency,)
        if not self.sim.submit(self.instance_id, request, on_progress):
            del self.attempts[rid]
            self.urgency.pop(rid, None)
            return False
        return True

    def abort(self, request_id: str) -> None:
        self.attempts.pop(request_id, None)
        self.urgency.pop(request_id, None)
        self.sim.abort(self.instance_id, request_id)

    def execute(self, cmd: pb.Command) -> pb.CommandAck:
        op = cmd.WhichOneof("op")
        inst = self.inst
        if op == "evict":
            mode = EvictMode(cmd.evict.mode or "recompute")
            rid = cmd.evict.request_id
            running = inst._views(self.sim.now)
            if rid not in {v.request.id for v in running}:
                if not cmd.evict.for_request_id:  # an operator's order, or a plan's: that request
                    return pb.CommandAck(ok=False, error=f"request {rid!r} is not running here")
                # Handed over but not admitted yet (the coordinator's view runs ahead of the
                # engine's): the order means "make a seat", so the engine preempts its own victim.
                batch = [v for v in running if v.request.slo.ttft_deadline is None]
                if not batch:
                    return pb.CommandAck(
                        ok=False, error=f"request {rid!r} is not running here, nor any batch request"
                    )
                rid = inst.select_victim(batch, self.instance_id, self.sim.now).request.id
            res = inst.evict(rid, mode)
            return pb.CommandAck(
                ok=True, wasted_tokens=res.wasted_tokens, transfer_s=res.transfer_s / self.sim.speed
            )
        if op == "swap_in":
            ok = inst.swap_in(cmd.swap_in.request_id)
            return pb.CommandAck(ok=ok, error="" if ok else "not swapped out here")
        if op == "load_model":
            load = inst.load_model(cmd.load_model.model, cmd.load_model.target)
            return pb.CommandAck(ok=True, ready_at=self.sim.wall_time(load.ready_at), warm=load.warm)
        if op == "unload_model":
            ok = inst.unload_model(cmd.unload_model.model, cmd.unload_model.keep_warm)
            return pb.CommandAck(ok=ok, error="" if ok else "model not loaded")
        if op == "abort":
            known = self.attempts.get(cmd.abort.request_id)
            if known is not None and cmd.abort.attempt and known > cmd.abort.attempt:
                return pb.CommandAck(ok=False, error="a newer attempt runs here")
            self.abort(cmd.abort.request_id)
            return pb.CommandAck(ok=True)
        return pb.CommandAck(ok=False, error=f"unknown operation {op!r}")


async def run_instances(
    instances: Sequence[SimInstance],
    settings: AgentSettings,
    *,
    speed: float = 1.0,
    stop: asyncio.Event | None = None,
    record: TextIO | None = None,
) -> None:
    """Run simulated instances, each with its own agent, until ``stop`` is set."""
    stop = stop or asyncio.Event()
    sim = RealtimeSim(instances, speed=speed)
    sim.start()
    agents = []
    for inst in instances:
        link = SimEngineLink(sim, inst, record)
        link.agent = InstanceAgent(settings, link)
        agents.append(link.agent)
    try:
        await asyncio.gather(*(a.run(stop) for a in agents))
    finally:
        await sim.stop()
