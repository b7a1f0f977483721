"""Instances connected over gRPC, seen by the policy plugins as one backend.

Each registered instance has a :class:`Session`: its last state report, the work handed to it and
not finished, and the two outboxes its streams drain (assignments for the pull stream, serving
operations for the command stream). :class:`RemoteFleet` answers the backend hooks for those
instances, so the queue manager drives remote engines exactly as it drives simulated ones.
Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from qlm_plugin.brain.fleet_view import KV_BLOCKS_PER_REQUEST
from qlm_plugin.coordinator.devices import Devices
from qlm_plugin.domain.instance import (
    EvictMode,
    EvictResult,
    InstanceInfo,
    InstanceState,
    LoadResult,
    StepTiming,
)
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb


@dataclass(slots=True)
class PendingCommand:
    op: str
    request_id: str | None
    model: str | None
    sent_at: float


@dataclass(eq=False, slots=True)
class Session:
    """One registration of one instance (a reconnect makes a new session)."""

    instance_id: str
    backend: str
    gpu: str
    capabilities: frozenset[str]
    endpoint: str
    agent_id: str = ""  # the agent process's own id, the same across its reconnects ("" unknown)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    report: InstanceState | None = None
    last_seen: float = field(default_factory=time.monotonic)
    assigned: dict[str, int] = field(default_factory=dict)  # request id -> attempt, not finished
    assignments: asyncio.Queue[pb.Assignment | None] = field(default_factory=asyncio.Queue)
    commands: asyncio.Queue[pb.Command | None] = field(default_factory=asyncio.Queue)
    pending: dict[str, PendingCommand] = field(default_factory=dict)
    #: (request id, attempt) of the stale attempts it was told to drop, until it reports them ended
    pending_aborts: set[tuple[str, int]] = field(default_factory=set)
    sent: int = 0  # assignments handed over: on the pull stream, or forwarded over HTTP
    # of those, received: as the instance said in its last credit, or (HTTP) answered by its server
    received: int = 0
    reported_seq: int = 0  # the last event batch applied (a batch sent again is not applied twice)
    pull_open: bool = False
    alive: bool = True

    def info(self) -> InstanceInfo:
        return InstanceInfo(self.instance_id, self.backend, self.gpu, self.capabilities)

    def in_transit(self) -> int:
        return max(0, self.sent - self.received)

    def close(self) -> None:
        self.alive = False
        self.assignments.put_nowait(None)
        self.commands.put_nowait(None)


def state_from_report(
    msg: pb.StateReport, instance_id: str, backend: str, caps: frozenset[str]
) -> InstanceState:
    return InstanceState(
        instance_id=instance_id,
        backend=backend,
        now=msg.now or time.time(),
        models_loaded=tuple(msg.models_loaded),
        models_warm=tuple(msg.models_warm),
        models_servable=tuple(msg.models_servable),
        device=msg.device,
        loading_model=msg.loading_model or None,
        num_running=msg.num_running,
        num_waiting=msg.num_waiting,
        num_swapped=msg.num_swapped,
        queued_tokens=msg.queued_tokens,
        kv_blocks_used=msg.kv_blocks_used,
        kv_blocks_total=msg.kv_blocks_total,
        max_num_seqs=msg.max_num_seqs,
        capabilities=caps,
        step_timings=tuple(
            StepTiming(s.start, s.duration_s, s.prefill_tokens, s.decode_tokens, s.batch_size)
            for s in msg.step_timings
        ),
        running_ids=tuple(msg.running_ids),
        waiting_ids=tuple(msg.waiting_ids),
        swapped_ids=tuple(msg.swapped_ids),
        notes=tuple(msg.notes),
        num_waiting_urgent=msg.num_waiting_urgent,
        max_num_batched_tokens=msg.max_num_batched_tokens,
        prefill_tokens_pending=msg.prefill_tokens_pending,
        healthy=not msg.down,
    )


class RemoteFleet:
    """Backend hooks for the instances connected to this coordinator.

    ``dispatch(session, request)`` is the coordinator's: it journals the dispatch and puts the
    assignment on the session's pull stream (False when it cannot).
    """

    name = "remote"

    def __init__(self, dispatch: Callable[[Session, Request], bool]) -> None:
        self.sessions: dict[str, Session] = {}  # instance id -> its live session
        self._dispatch = dispatch
        self._command_ids = itertools.count(1)
        self.on_command: Callable[[Session, str, pb.Command, PendingCommand], None] | None = None
        # sends a serving operation: (session, op, model, keep_warm) -> its command id
        self.devices: Devices[Session] = Devices(
            self.sessions, lambda s, op, model, warm: self.command(s, op, model=model, keep_warm=warm)
        )

    def live(self, instance_id: str) -> Session | None:
        s = self.sessions.get(instance_id)
        return s if s is not None and s.alive else None

    # ------------------------------------------------------------------ backend hooks
    @hookimpl
    def qlm_list_instances(self) -> list[InstanceInfo]:
        alone = [s.info() for s in self.sessions.values() if s.alive and not Devices.device_of(s)]
        return alone + [i for slot in self.devices.slots() if (i := self.devices.info(slot)) is not None]

    @hookimpl
    def qlm_instance_state(self, instance_id: str, detail: bool) -> InstanceState | None:
        s = self.live(instance_id)
        if s is None:
            if self.devices.is_slot(instance_id):
                return self.devices.state(instance_id, lambda m: self.session_state(m, detail))
            return None
        return self.session_state(s, detail)

    def session_state(self, s: Session, detail: bool) -> InstanceState:
        """What one instance reported, with the work handed to it since."""
        rep = s.report
        if rep is None:
            return InstanceState(
                s.instance_id, s.backend, time.time(), (), (), None, 0, 0, 0, 0, 0, 0, 0, healthy=False
            )
        # Work handed over since the report was made is on its way: counted, so the planner does
        # not hand the same room out twice. It takes the free seats first, as the engine will admit
        # it, and only what does not fit waits there: counting it all as waiting closed the engine
        # to pulls until it reported the work, so a burst went over one request per round trip.
        held = rep.num_running + rep.num_waiting + rep.num_swapped
        extra = max(0, len(s.assigned) - held)
        if extra:
            seats = 0 if rep.num_waiting else max(0, rep.max_num_seqs - rep.num_running)
            seated = min(extra, seats)
            rep = replace(
                rep,
                num_running=rep.num_running + seated,
                num_waiting=rep.num_waiting + extra - seated,
                kv_blocks_used=min(rep.kv_blocks_total, rep.kv_blocks_used + extra * KV_BLOCKS_PER_REQUEST),
            )
        if not detail and (rep.step_timings or rep.running_ids):
            rep = replace(rep, step_timings=(), running_ids=(), waiting_ids=(), swapped_ids=())
        return rep

    @hookimpl
    def qlm_dispatch(self, instance_id: str, request: Request) -> bool | None:
        s = self.sessions.get(instance_id)
        if s is None:
            if not self.devices.is_slot(instance_id):
                return None
            s = self.devices.target(instance_id, request.model)  # its awake engine of that model
            if s is None:
                return False
        return s.alive and s.pull_open and self._dispatch(s, request)

    def command(
        self,
        s: Session,
        op: str,
        request_id: str | None = None,
        model: str | None = None,
        *,
        mode: str = "",
        target: str = "",
        keep_warm: bool = False,
        attempt: int = 0,
        for_request_id: str = "",
    ) -> str:
        """Queue a serving operation on the instance's command stream; returns its command id."""
        cid = f"c{next(self._command_ids)}"
        if op == "evict":
            evict = pb.Evict(request_id=request_id, mode=mode, for_request_id=for_request_id)
            cmd = pb.Command(command_id=cid, evict=evict)
        elif op == "load_model":
            cmd = pb.Command(command_id=cid, load_model=pb.LoadModel(model=model, target=target or "gpu"))
        elif op == "unload_model":
            cmd = pb.Command(command_id=cid, unload_model=pb.UnloadModel(model=model, keep_warm=keep_warm))
        elif op == "abort":
            cmd = pb.Command(command_id=cid, abort=pb.Abort(request_id=request_id, attempt=attempt))
        else:
            raise ValueError(f"unknown serving operation {op!r}")
        pending = s.pending[cid] = PendingCommand(op, request_id, model, time.time())
        s.commands.put_nowait(cmd)
        if self.on_command is not None:
            self.on_command(s, cid, cmd, pending)
        return cid

    @hookimpl
    def qlm_evict(
        self, instance_id: str, request_id: str, mode: EvictMode, for_request_id: str | None
    ) -> EvictResult | None:
        s = self.live(instance_id)
        if s is None and self.devices.is_slot(instance_id):
            s = self.devices.member_for(instance_id, request_id)
            if s is None:
                raise KeyError(f"request {request_id!r} is not on {instance_id}")
        if s is None:
            return None
        if request_id not in s.assigned:
            raise KeyError(f"request {request_id!r} is not on {instance_id}")
        mode = EvictMode(mode)
        if mode is EvictMode.SWAP and "swap" not in s.capabilities:
            mode = EvictMode.RECOMPUTE
        self.command(s, "evict", request_id, mode=mode.value, for_request_id=for_request_id or "")
        # The engine reports what was really lost with the acknowledgement (and the EVICTED event).
        return EvictResult(request_id, mode, 0)

    @hookimpl
    def qlm_load_model(self, instance_id: str, model: str, target: str) -> LoadResult | None:
        if target not in ("gpu", "host"):
            raise ValueError(f"target must be 'gpu' or 'host', got {target!r}")
        s = self.live(instance_id)
        if s is None and self.devices.is_slot(instance_id):
            # a device's sleeping engines are warm already: a warm start has nothing to do
            if target == "gpu" and not self.devices.load(instance_id, model):
                self.devices.on_failed(
                    instance_id, model, f"no engine of device {instance_id} serves {model}"
                )
            return LoadResult(instance_id, model, True, time.time())
        if s is None:
            return None
        self.command(s, "load_model", model=model, target=target)
        warm = s.report is not None and model in s.report.models_warm
        return LoadResult(instance_id, model, warm, time.time())
