"""The instance registry: one session per registration of an instance, its state reports, pull
credits and serving-operation acknowledgements; lost instances; recovery after a restart; and new
requests waiting (a bounded time) for an instance to serve their model.

A (re)registration keeps the requests the instance still holds where the coordinator agrees they
are its, and abandons the rest; an instance that misses heartbeats for ``heartbeat_timeout_s`` is
drained (its requests go back to the queue). After a coordinator restart, recovered requests wait
for the instances that held them, at most ``recovery_grace_s``. Not thread-safe: one event loop
owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.dispatch import Dispatcher
from qlm_plugin.coordinator.instances import RemoteFleet, Session, state_from_report
from qlm_plugin.coordinator.jobs import UNAVAILABLE_RETRY_AFTER_S, UNSERVED, Job, JobBook, SubmitError
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.request import ModelSpec, Request
from qlm_plugin.hooks.hookspecs import TICK_S
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.telemetry.instruments import Telemetry

log = logging.getLogger("qlm_plugin.coordinator")

#: A gap this long between two of the timer's checks (seconds) means the coordinator itself stood
#: still (a paused process, a blocked event loop): no instance could be heard meanwhile. Only a gap
#: that could take a live instance for lost counts (longer than the heartbeat timeout less two
#: heartbeats): a loop merely busy still finds a dead instance in time.
STALL_S = 1.0


class InstanceTaken(Exception):
    """A registration of an instance id whose live session another agent holds."""


class InstanceRegistry:
    """``on_state_changed(instance_id)``: an instance's models or health changed between ticks (the
    queue manager reads its state again)."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        book: JobBook,
        fleet: RemoteFleet,
        dispatcher: Dispatcher,
        hook: Any,
        telemetry: Telemetry,
        models: Mapping[str, ModelSpec],
    ) -> None:
        self.cfg = cfg
        self.book = book
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.hook = hook
        self.telemetry = telemetry
        self.models = models
        self.on_state_changed: Callable[[str], None] = lambda instance_id: None
        self.recovery_until = 0.0
        self.awaiting: set[str] = set()  # instances that held recovered work, not back yet
        self.models_seen: set[str] = set()  # models some instance served since the start (or journal)
        self._fleet_waiters: list[asyncio.Future[None]] = []  # woken when instances come or change
        # session id -> its session, for the live sessions in fleet.sessions: every heartbeat and
        # report looks its session up (a scan cost 90 us at 5,000 instances)
        self._by_id: dict[str, Session] = {}
        self.unserved_since: dict[str, float] = {}  # model -> since when queued work has no instance
        self._checked_at = math.inf  # the timer's last check (expire); none before it runs

    # ------------------------------------------------------------------ sessions
    def session(self, session_id: str) -> Session | None:
        s = self._by_id.get(session_id)
        if s is None or not s.alive or self.fleet.sessions.get(s.instance_id) is not s:
            return None
        return s

    def register(self, msg: pb.RegisterRequest) -> tuple[Session, list[pb.HeldRequest], list[pb.HeldRequest]]:
        """A (re)registration: a new session; the requests it still holds are kept where the
        coordinator agrees they are its, and abandoned otherwise. Raises :class:`InstanceTaken`
        while another agent holds a live session of the instance."""
        now = time.time()
        iid = msg.instance_id
        jobs = self.book.jobs
        old = self.fleet.sessions.get(iid)
        if old is not None:
            self._check_takeover(old, msg)
        held = {h.request_id: h.attempt for h in msg.held}
        s = Session(iid, msg.backend, msg.gpu, frozenset(msg.capabilities), msg.endpoint, msg.agent_id)
        s.report = state_from_report(msg.state, iid, msg.backend, s.capabilities)
        keep: list[pb.HeldRequest] = []
        abandon: list[pb.HeldRequest] = []
        if old is not None:
            old.close()
            self._by_id.pop(old.id, None)
            for rid, attempt in old.assigned.items():
                if rid not in held and self.dispatcher.forwarding(rid):
                    held[rid] = attempt  # served over HTTP: the stream outlives the agent's session
        self.fleet.sessions[iid] = s
        self._by_id[s.id] = s
        for rid, attempt in held.items():
            job = jobs.get(rid)
            mine = (
                job is not None
                and job.state == "dispatched"
                and job.instance == iid
                and job.attempt == attempt
            )
            claim = job is not None and job.recovering and job.state == "queued" and attempt > job.attempt
            if job is not None and (mine or claim):
                if claim:  # its dispatch was acknowledged by the instance but not yet journaled
                    job.attempt, job.state, job.instance = attempt, "dispatched", iid
                    self.book.journal.dispatched(rid, attempt, iid)
                job.replayed = job.recovering  # its output comes again, stamped when it was made
                job.recovering = False
                s.assigned[rid] = attempt
                keep.append(pb.HeldRequest(request_id=rid, attempt=attempt))
            else:
                abandon.append(pb.HeldRequest(request_id=rid, attempt=attempt))
        # What the old session had and the new one did not keep (not held, or held with another
        # attempt, which the instance now drops) is served again.
        orphans = [jobs[r] for r in old.assigned if r in jobs and r not in s.assigned] if old else []
        self.fleet_changed()
        device = self.fleet.devices.device_of(s)
        if old is None:
            if not device:
                self.hook.qlm_instance_joined(info=s.info(), now=now)
            elif len(self.fleet.devices.members(device)) == 1:  # the device appears with its first engine
                for slot in self.fleet.devices.slots_of(device):
                    if (info := self.fleet.devices.info(slot)) is not None:
                        self.hook.qlm_instance_joined(info=info, now=now)
            self.telemetry.instance_event(iid, "registered")
        else:
            self.telemetry.instance_event(iid, "reconnected")
        if device:
            self.fleet.devices.joined(s)  # started again for a switch, or restarted: its report holds
        if iid in self.awaiting:
            self.awaiting.discard(iid)
            self.release_recovered(iid)  # its recovered requests it did not reclaim
            if not self.awaiting and self.recovery_until:
                self.recovery_until = 0.0
                self.release_recovered()  # every holder is back: the rest may go now
        for job in orphans:
            if job.state == "dispatched" and job.instance == iid:
                self.dispatcher.requeue(job, f"instance {iid} reconnected without it")
        log.info(
            "instance %s registered (%s, %s): kept %d, abandoned %d",
            iid,
            msg.backend,
            msg.gpu,
            len(keep),
            len(abandon),
        )
        rep = msg.state
        its = {*rep.models_loaded, *rep.models_warm, *rep.models_servable}
        if its and not its & set(self.models):  # it gets no work, and /health counts it as ready
            log.warning(
                "instance %s serves %s, none of this coordinator's models (%s): it will get no requests",
                iid,
                ", ".join(sorted(its)),
                ", ".join(sorted(self.models)),
            )
        return s, keep, abandon

    def _check_takeover(self, old: Session, msg: pb.RegisterRequest) -> None:
        """Two live agents with one instance id would take the session from each other at every
        reconnect, each dropping the other's requests: while the session is heard from and its pull
        stream open, only its own agent (the same ``agent_id``) may register the instance again."""
        age = time.monotonic() - old.last_seen
        same = bool(msg.agent_id) and msg.agent_id == old.agent_id
        if same or not old.alive or not old.pull_open or age > self.cfg.heartbeat_timeout_s:
            return
        log.warning(
            "instance %s: registration refused: its session is live (heard from %.1f s ago) and "
            "held by another agent (%s, this one %s)",
            old.instance_id,
            age,
            old.agent_id or "unnamed",
            msg.agent_id or "unnamed",
        )
        raise InstanceTaken(
            f"instance {old.instance_id!r} is connected already (another agent, heard from "
            f"{age:.1f} s ago): give each instance its own id, or stop the other agent; a session "
            f"silent for {self.cfg.heartbeat_timeout_s:g} s is taken over"
        )

    def heartbeat(self, msg: pb.StateReport) -> bool:
        s = self.session(msg.session)
        if s is None:
            return False
        s.last_seen = time.monotonic()
        if msg.leaving:
            self.lost(s, "its agent stopped", failure=False)
            return True
        before = s.report
        s.report = state_from_report(msg, s.instance_id, s.backend, s.capabilities)
        device = s.report.device
        if device:
            self.fleet.devices.reported(s)
            self.fleet.devices.step(device)  # a switch waiting for its engine to finish its requests
        if before is None or (before.models_loaded, before.models_warm, before.healthy) != (
            s.report.models_loaded,
            s.report.models_warm,
            s.report.healthy,
        ):
            self.fleet_changed()
            for iid in self.fleet.devices.slots_of(device) if device else [s.instance_id]:
                self.on_state_changed(iid)  # a swap, or its engine went down or came back
        return True

    def credit(self, s: Session, free_slots: int, received: int) -> None:
        s.last_seen = time.monotonic()
        if not s.endpoint:  # an engine served over HTTP gets its work there: forward counts it
            # max: a credit on a report batch may arrive after a later one on the pull stream
            s.received = max(s.received, received)
        free = free_slots - s.in_transit()
        if free > 0 and self.dispatcher.has_queue_manager:
            iid = self.fleet.devices.brain_id(s.instance_id)
            self.hook.qlm_instance_ready(instance_id=iid, free_slots=free, now=time.time())

    def pull_opened(self, s: Session) -> None:
        s.pull_open = True
        if self.dispatcher.parked:
            self.dispatcher.unpark()

    def ack(self, s: Session, ack: pb.CommandAck) -> None:
        pending = s.pending.pop(ack.command_id, None)
        if pending is None:
            return
        attrs: dict[str, Any] = {}
        if ack.wasted_tokens:
            attrs["qlm.wasted_tokens"] = ack.wasted_tokens
        if ack.transfer_s:
            attrs["qlm.transfer_s"] = ack.transfer_s
        self.telemetry.lso_finished(ack.command_id, ok=ack.ok, error=ack.error, attributes=attrs)
        if self.fleet.devices.on_ack(s, ack.command_id, pending.op, ack):
            return  # a step of a device's switch: the switch goes on, or reports its failure
        if not ack.ok and pending.op != "abort":
            # an eviction races the engine's own steps (its victim finished, or no batch request
            # runs there to make a seat): expected under load, not an operator's concern
            level = logging.INFO if pending.op == "evict" else logging.WARNING
            log.log(level, "instance %s: %s failed: %s", s.instance_id, pending.op, ack.error)
            self.hook.qlm_operation_failed(
                instance_id=s.instance_id,
                operation=pending.op,
                model=pending.model,
                request_id=pending.request_id,
                error=ack.error,
                now=time.time(),
            )

    def lost(self, s: Session, reason: str, *, failure: bool = True) -> None:
        """Drain an instance: its unfinished requests go back to the queue, to finish elsewhere
        (``failure``: counted against their attempts; not for an instance that left cleanly)."""
        if self.fleet.sessions.get(s.instance_id) is not s:
            return
        s.close()
        del self.fleet.sessions[s.instance_id]
        self._by_id.pop(s.id, None)
        device = self.fleet.devices.device_of(s)
        parked = self.fleet.devices.stopped_cold(s)  # its device stopped it to sleep it cold
        if device:
            self.fleet.devices.left(s)
        log.log(
            logging.INFO if parked or not failure else logging.WARNING,
            "instance %s %s (%s): %d requests back to the queue",
            s.instance_id,
            "lost" if failure else "left",
            "stopped cold by its device" if parked else reason,
            len(s.assigned),
        )
        jobs = [self.book.jobs[r] for r in list(s.assigned) if r in self.book.jobs]
        if not device:
            self.hook.qlm_instance_left(instance_id=s.instance_id, now=time.time())
        elif not parked and not self.fleet.devices.members(device):  # one stopped cold still counts
            for slot in self.fleet.devices.slots_of(device):
                self.hook.qlm_instance_left(instance_id=slot, now=time.time())
        else:
            for slot in self.fleet.devices.slots_of(device):
                self.on_state_changed(slot)
        self.telemetry.instance_event(s.instance_id, "parked" if parked else "lost" if failure else "left")
        for command_id in s.pending:  # never acknowledged now: its span ends, counted as failed
            self.telemetry.lso_finished(command_id, ok=False, error=f"{s.instance_id} went before its ack")
        s.pending.clear()
        for job in jobs:
            if job.state == "dispatched":
                job.instance = None  # the lost session no longer owns it
                self.dispatcher.requeue(job, f"instance {s.instance_id} lost: {reason}", failure=failure)

    def expire(self) -> None:
        """On the coordinator's timer: drain the instances that stopped heartbeating, and release
        the recovered requests whose grace is over."""
        mono = time.monotonic()
        stood_still, self._checked_at = mono - self._checked_at, mono
        if stood_still > max(STALL_S, self.cfg.heartbeat_timeout_s - 2 * self.cfg.heartbeat_interval_s):
            self._give_back(stood_still - TICK_S)  # beyond the timer's own interval
        for s in list(self.fleet.sessions.values()):
            if s.alive and mono - s.last_seen > self.cfg.heartbeat_timeout_s:
                self.lost(s, f"no heartbeat for {mono - s.last_seen:.1f} s")
        self.fleet.devices.expire()
        if self.recovery_until and mono >= self.recovery_until:
            self.recovery_until = 0.0
            self.release_recovered()
        if not self.recovery_until:
            self.fail_unserved(mono)

    def _give_back(self, seconds: float) -> None:
        """The coordinator stood still ``seconds``: what its instances had to do in that time
        (heartbeat, come back after a restart) is not held against them. Their reports that
        waited meanwhile are read next; without this every instance was lost at once (and its
        requests spent an attempt) after a pause of a few seconds of the coordinator alone."""
        log.warning(
            "the coordinator stood still for %.1f s (its process paused or its event loop blocked): "
            "its instances get that time back before any is taken for lost",
            seconds,
        )
        for s in self.fleet.sessions.values():
            s.last_seen += seconds
        if self.recovery_until:
            self.recovery_until += seconds

    def fail_unserved(self, mono: float) -> None:
        """No request waits for ever: a queued request whose model no live instance has served for
        ``instance_return_wait_s`` (what a new request for it waits before it is refused; a model
        whose engines all fail to wake counts as not served) fails once its own deadline has passed
        too (a batch keeps waiting within its window)."""
        why: dict[str, str] = {}
        for m in self.models:
            if not self.dispatcher.served(m):
                why[m] = "its instances left"
            elif (error := self.dispatcher.wake_failing(m)) is not None:
                why[m] = f"every engine that can serve it failed to wake, the last with: {error}"
        unserved = set(why)
        for model in list(self.unserved_since):
            if model not in unserved:
                del self.unserved_since[model]
        if not unserved:  # the usual case: no scan of the jobs
            return
        queued: dict[str, list[Job]] = {}
        for job in self.book.jobs.values():
            if job.state == "queued" and job.request.model in unserved:
                queued.setdefault(job.request.model, []).append(job)
        bound = self.cfg.instance_return_wait_s
        now = time.time()
        for model in unserved:
            jobs = queued.get(model)
            if not jobs:
                self.unserved_since.pop(model, None)
                continue
            since = self.unserved_since.setdefault(model, mono)
            if mono - since < bound:
                continue
            for job in jobs:
                slo = job.request.slo
                deadlines = (slo.e2e_deadline, slo.ttft_deadline, job.request.arrival_time)
                deadline = max(d for d in deadlines if d is not None)
                if now >= deadline:
                    self.dispatcher.parked.pop(job.id, None)
                    self.dispatcher.finish(
                        job,
                        "failed",
                        UNSERVED,
                        error=f"no live instance has served model {model!r} for {mono - since:.0f} s "
                        f"({why[model]}) and the request's deadline has passed",
                    )

    def states(self) -> list[tuple[Session, InstanceState | None]]:
        return [
            (s, self.fleet.qlm_instance_state(s.instance_id, True))
            for s in self.fleet.sessions.values()
            if s.alive
        ]

    # ------------------------------------------------------------------ recovery
    def recovered(self, jobs: Iterable[Job]) -> None:
        """Recovered work waits for the instances that held it to come back (they reconnect with
        backoff), at most the grace period: an instance reclaims what it still runs or finished."""
        any_ = False
        for job in jobs:
            any_ = True
            self.models_seen.add(job.request.model)  # accepted while an instance served it
            if job.state == "dispatched" and job.instance is not None:
                self.awaiting.add(job.instance)
        self.recovery_until = time.monotonic() + self.cfg.recovery_grace_s if any_ else 0.0

    def release_recovered(self, instance_id: str | None = None) -> None:
        """Recovered requests nobody reclaimed are queued again: those of one instance once it is
        back (``instance_id``), or all of them when the grace is over."""
        now = time.time()
        for job in list(self.book.jobs.values()):
            if not job.recovering:
                continue
            if instance_id is not None and job.instance != instance_id:
                continue
            job.recovering = False
            if job.state == "dispatched":  # its instance did not come back for it
                job.state, job.instance = "queued", None
                self.book.journal.requeued(job.id, job.failures)  # not a failure: the coordinator's restart
            if job.state == "queued":
                self.dispatcher.trace(job)  # a new span: the one of the crashed process is gone
                self.dispatcher.admit(job, now)

    # ------------------------------------------------------------------ instances to serve a model
    def fleet_changed(self) -> None:
        """An instance registered or reported: note the models it serves and wake the requests
        waiting for one."""
        for s in self.fleet.sessions.values():
            rep = s.report
            if not s.alive:
                continue
            if rep is None or (not rep.models_loaded and not rep.models_warm):
                self.models_seen.update(m for m in self.models if rep is None or rep.can_serve(m))
            else:
                self.models_seen.update(rep.models_loaded, rep.models_warm)
        waiters, self._fleet_waiters = self._fleet_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def wake_waiters(self) -> None:
        """Wake the requests waiting for an instance (the coordinator drains: they are refused)."""
        waiters, self._fleet_waiters = self._fleet_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def await_instance(self, request: Request, wait_s: float | None = None) -> None:
        """Wait until a live instance serves ``request.model``, at most the configured time (or
        ``wait_s``, the caller's deadline, when shorter); then raise :class:`SubmitError`
        (``unavailable``). Nothing is queued meanwhile."""
        seen = request.model in self.models_seen
        bound = self.cfg.instance_return_wait_s if seen else self.cfg.instance_wait_s
        if wait_s is not None:
            bound = max(0.0, min(bound, wait_s))
        deadline = time.monotonic() + bound
        while not self.dispatcher.served(request.model) and self.book.accepting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._fleet_waiters.append(waiter)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, left)
        if self.dispatcher.served(request.model):
            return
        if not self.book.accepting:  # the coordinator drains: a retry goes to its next start
            raise SubmitError(
                "unavailable",
                "the coordinator is draining (shutting down); send it again",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            )
        live = [s for s in self.fleet.sessions.values() if s.alive]
        raise SubmitError(
            "unavailable",
            f"no live instance serves model {request.model!r} (0 of {len(live)} connected instances "
            f"serve it{'; its instances left' if seen else ''}; waited {bound:.3g} s for one)",
            "model",
            retry_after_s=max(bound, 1.0),
        )
