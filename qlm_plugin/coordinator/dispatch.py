"""Dispatch: accepted jobs to the policy, the policy's dispatches to instances, and what instances
report back to the jobs.

A job is handed to the queue manager's global queue (``qlm_submit``), or with no queue manager
straight to the instance the router picks; it is parked while no live instance serves its model.
Each dispatch is an *attempt*, numbered and journaled: the assignment goes down the instance's pull
stream, or, for an instance that serves HTTP itself (a vLLM engine), the request is forwarded there
(:mod:`.forward`). An instance's report counts only for the attempt the coordinator handed it, so a
request re-served elsewhere is answered once. A job the instance fails, or gives back, is queued
again (failures count towards ``max_attempts``). Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import time
from collections.abc import Callable, Hashable
from typing import Any

import aiohttp

from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.forward import forward
from qlm_plugin.coordinator.instances import RemoteFleet, Session
from qlm_plugin.coordinator.jobs import REFUSED, Chunk, Job, JobBook
from qlm_plugin.coordinator.journal import TERMINAL
from qlm_plugin.domain.request import Request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.telemetry.instruments import Telemetry
from qlm_plugin.transport.openai_client import FEATURES, constraint, merge_tool_calls, needs

log = logging.getLogger("qlm_plugin.coordinator")

Event = pb.RequestEvent
#: Stale attempts one session is told to abort and has not yet reported ended: an agent reporting
#: work on requests the coordinator never gave it must not grow the coordinator without bound.
MAX_PENDING_ABORTS = 10_000


def _flat(key: Any) -> list[Any]:
    if isinstance(key, tuple):
        return [part for item in key for part in _flat(item)]
    return [key]


def serves(s: Session, model: str) -> bool:
    """Whether an instance serves ``model`` now: loaded or warm (an instance that reports no model
    loaded serves what it is sent, of the models it can serve), and its engine up."""
    rep = s.report
    if rep is not None and not rep.healthy:
        return False  # its engine is down: nothing goes there until it is back
    if rep is None:
        return True
    if not rep.models_loaded:  # a device's sleeping engine is woken by a switch, not sent work
        return not rep.device and rep.can_serve(model)
    return model in rep.models_loaded or model in rep.models_warm


class Dispatcher:
    """``on_lost(session, reason)``: an engine served over HTTP stopped answering (the instance
    registry drains it)."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        book: JobBook,
        fleet: RemoteFleet,
        hook: Any,
        telemetry: Telemetry,
        *,
        has_queue_manager: bool,
    ) -> None:
        self.cfg = cfg
        self.book = book
        self.fleet = fleet
        self.hook = hook
        self.telemetry = telemetry
        self.has_queue_manager = has_queue_manager
        self.on_lost: Callable[[Session, str], None] = lambda s, reason: None
        self.parked: dict[str, Job] = {}  # accepted, waiting for an instance that serves the model
        self._forwards: dict[str, asyncio.Task[None]] = {}
        self._http: aiohttp.ClientSession | None = None  # for instances served over HTTP

    # ------------------------------------------------------------------ to the policy
    def served(self, model: str) -> bool:
        """Whether a live instance serves ``model`` now, or a device's engine can once woken (one
        asleep, or stopped for a cold sleep)."""
        for s in self.fleet.sessions.values():  # twice per submit: a loop, not a generator
            if s.alive and serves(s, model):
                return True
        devices = self.fleet.devices
        return any(
            s.report is not None and s.report.can_serve(model)
            for device in devices.names()
            for s in devices.members(device)
        )

    def lacking(self, model: str, capability: str) -> list[Session]:
        """The instances serving ``model`` (live, or a device's engine asleep) without ``capability``."""
        sessions = [s for s in self.fleet.sessions.values() if s.alive and serves(s, model)]
        devices = self.fleet.devices
        sessions += [
            s
            for device in devices.names()
            for s in devices.members(device)
            if s.report is not None and s.report.can_serve(model) and s not in sessions
        ]
        return [s for s in sessions if capability not in s.capabilities]

    def wake_failing(self, model: str) -> str | None:
        """Why ``model`` is not served after all: it is served only by engines sharing devices, and
        every wake of one for it fails (the last error); None when it is served or may be."""
        if not self.fleet.devices.failing_wakes:
            return None
        for s in self.fleet.sessions.values():
            if s.alive and serves(s, model) and not self.fleet.devices.device_of(s):
                return None
        return self.fleet.devices.wake_error(model)

    def trace(self, job: Job, parent: Any = None) -> None:
        """Open the request's span, from its arrival."""
        r, slo = job.request, job.request.slo  # the deadlines: the client's SLO, else its class's
        self.telemetry.request_started(
            job.id,
            model=r.model,
            operation=job.spec.operation or "text_completion",
            slo_class=r.slo_class,
            tenant=r.tenant,
            max_tokens=r.max_tokens,
            input_tokens=r.prompt_tokens,
            ttft_slo_s=None if slo.ttft_deadline is None else slo.ttft_deadline - r.arrival_time,
            e2e_slo_s=None if slo.e2e_deadline is None else slo.e2e_deadline - r.arrival_time,
            start_time=r.arrival_time,
            parent=parent,
        )

    def admit(self, job: Job, now: float) -> None:
        """Hand a queued job to the policy: the queue manager's global queue, or (no queue manager)
        straight to the instance the router picks. Parked while no instance serves its model."""
        if not self.served(job.request.model):
            self.parked[job.id] = job
            return
        self.telemetry.request_event(job.id, "qlm.queued")
        if self.has_queue_manager:
            admission = self.hook.qlm_submit(request=job.request, now=now)
            if admission is not None and not admission.accepted:
                self.parked[job.id] = job
                return
            job.admission = admission
            if admission is not None:  # (after "qlm.dispatched" when it was handed over at once)
                self.telemetry.request_event(
                    job.id,
                    "qlm.planned",
                    {
                        "qlm.estimate.wait_s": admission.wait_mean_s or 0.0,
                        "qlm.estimate.p_meet": admission.p_meet if admission.p_meet is not None else 1.0,
                        "qlm.instance.planned": admission.instance_id or "",
                    },
                )
            return
        states = [
            st
            for s in self.fleet.sessions.values()
            if s.alive
            and s.pull_open
            and (st := self.fleet.qlm_instance_state(s.instance_id, False)) is not None
            and serves(s, job.request.model)
            and self.fleet.devices.takes_work(s)  # not one being swapped or put to sleep
        ]
        target = self.hook.qlm_choose_instance(request=job.request, instances=states, now=now)
        if target is None or not self.hook.qlm_dispatch(instance_id=target, request=job.request):
            self.parked[job.id] = job
            if not states:  # without a queue manager to plan swaps: wake a device's engine of the model
                devices = self.fleet.devices
                for device in devices.names():
                    if any(
                        s.report and s.report.can_serve(job.request.model) for s in devices.members(device)
                    ):
                        devices.wake_for(device, job.request.model)
                        break

    def unpark(self) -> None:
        now = time.time()
        jobs, self.parked = list(self.parked.values()), {}
        for job in jobs:
            if job.state == "queued":
                self.admit(job, now)

    # ------------------------------------------------------------------ to the instances
    def _rank(self, request: Request, instance_id: str, now: float) -> list[float]:
        """The rank key as the instance compares it: its leading numbers, nested tuples flattened
        (a key's strings, such as a request id breaking ties, cannot go: the instance breaks ties by
        arrival); the arrival time if it starts with none."""
        key: Hashable = self.hook.qlm_rank_key(request=request, instance_id=instance_id, now=now)
        leading: list[float] = []
        for part in _flat(key):
            if not isinstance(part, numbers.Real) or math.isnan(part):
                break
            leading.append(float(part))
        return leading or [request.arrival_time]

    def dispatch(self, s: Session, request: Request) -> bool:
        """A new attempt of the request's job on ``s`` (the instance fleet's ``qlm_dispatch``)."""
        job = self.book.jobs.get(request.id)
        if job is None or job.state != "queued":
            return False
        missing = [cap for cap, _ in needs(job.spec.sampling) if cap not in s.capabilities]
        if missing:
            # Refused at the door where an instance serving the model lacked it: this one came
            # later. It fails once the queue manager's pass is over, rather than being served
            # without what it asked for.
            asyncio.get_running_loop().call_soon(self._cannot_serve, job, s.instance_id, missing[0])
            return False
        now = time.time()
        # before any state changes: a policy hook that raises must not leave the job half-dispatched
        rank = self._rank(request, s.instance_id, now) if not s.endpoint else []
        job.attempt += 1
        job.state, job.instance = "dispatched", s.instance_id
        job.recovering = False
        s.assigned[job.id] = job.attempt
        s.sent += 1
        self.book.journal.dispatched(job.id, job.attempt, s.instance_id)
        if job.on_dispatch is not None:  # (a batch line's turn is over)
            job.on_dispatch(job)
        if s.endpoint:  # the instance serves HTTP itself (a vLLM engine): forward the request there
            self._forward(s, job)
        else:
            ttft_budget, e2e_budget = request.slo.budgets(now, started=job.tokens > 0)
            deadline = request.slo.first_deadline()
            s.assignments.put_nowait(
                pb.Assignment(
                    request=job.spec,
                    attempt=job.attempt,
                    urgency=rank[0],
                    rank=rank,
                    deadline=deadline if math.isfinite(deadline) else 0.0,
                    resume_tokens=job.tokens,
                    resume_text=job.text,
                    ttft_budget_s=ttft_budget,
                    e2e_budget_s=e2e_budget,
                    trace_context=self.telemetry.trace_context(job.id),
                )
            )
        self.telemetry.request_event(
            job.id, "qlm.dispatched", {"qlm.instance.id": s.instance_id, "qlm.attempt": job.attempt}
        )
        # as the simulator's and vLLM's backends do: it entered that instance's queue
        self.hook.qlm_request_queued(
            request=request, instance_id=self.fleet.devices.brain_id(s.instance_id), now=now
        )
        return True

    def _forward(self, s: Session, job: Job) -> None:
        if self._http is None:
            # A fresh connection per request: a pooled keep-alive connection the engine's server
            # closes as it is reused fails the request, which then counts against its attempts.
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        predicted = self.hook.qlm_predict_output_length(request=job.request, generated_tokens=job.tokens)
        task = asyncio.get_running_loop().create_task(
            forward(
                s,
                job,
                job.attempt,
                self._http,
                self.apply_events,
                self._engine_gone,
                predicted,
                self.cfg.forward_read_timeout_s,
                self.telemetry.trace_context(job.id),
            )
        )
        self._forwards[job.id] = task

        def forget(t: asyncio.Task[None], rid: str = job.id) -> None:
            if self._forwards.get(rid) is t:
                del self._forwards[rid]

        task.add_done_callback(forget)

    def _engine_gone(self, s: Session, reason: str) -> None:
        """An engine served over HTTP no longer answers: drain its instance's session as it is now
        (its agent may have registered again since the stream began, the engine the same)."""
        now = self.fleet.sessions.get(s.instance_id)
        if now is not None and now is not s and now.endpoint == s.endpoint:
            s = now
        self.on_lost(s, reason)

    def forwarding(self, request_id: str) -> bool:
        """Whether the request's stream from an engine served over HTTP is still open."""
        task = self._forwards.get(request_id)
        return task is not None and not task.done()

    # ------------------------------------------------------------------ the end of an attempt
    def finish(self, job: Job, state: str, finish_reason: str, error: str = "") -> None:
        now = time.time()
        self.book.close(job, state, finish_reason, error, now)
        if job.instance is not None:
            s = self.fleet.sessions.get(job.instance)
            if s is not None:
                s.assigned.pop(job.id, None)
        outcome = job.outcome()
        self.hook.qlm_request_finished(outcome=outcome, now=now)
        ttft = job.first_token_at - job.request.arrival_time if job.first_token_at is not None else None
        self.telemetry.request_finished(
            job.id,
            status=state,
            slo_met=outcome.met_slo(),
            model=job.request.model,
            slo_class=job.request.slo_class,
            ttft_s=ttft,
            e2e_s=now - job.request.arrival_time,
            output_tokens=job.tokens,
            finish_reason=finish_reason,
            operation=job.spec.operation or "text_completion",
            predicted_wait_s=job.admission.wait_mean_s if job.admission is not None else None,
            late=job.late,
            error=error,
            end_time=now,
            preemptions=job.preemptions,
            wasted_tokens=job.wasted_tokens,
        )
        self.book.announce(job, now)

    def _cannot_serve(self, job: Job, instance_id: str, capability: str) -> None:
        if job.state == "queued":
            self.finish(  # refused, as the door refuses it (a 400): the fleet cannot serve it
                job,
                "failed",
                REFUSED,
                error=f"{FEATURES[capability]}: instance {instance_id}, placed to serve it, cannot serve "
                f"them (no {capability} capability)",
            )

    def requeue(self, job: Job, reason: str, *, failure: bool = True) -> None:
        """A dispatched job goes back to the queue (its instance was lost, failed it, or gave it back
        after an eviction: only failures count towards ``max_attempts``)."""
        now = time.time()
        if failure:
            job.failures += 1
        if job.failures >= self.cfg.max_attempts:
            self.finish(job, "failed", "error", error=f"gave up after {job.attempt} attempts: {reason}")
            return
        kept_to_one = constraint(job.spec.sampling) if job.tokens else None
        if kept_to_one is not None:
            # A constrained output or a tool call cannot be continued: the next engine's grammar
            # would start again after the text so far, its tool parser would not see the call's
            # start. Served again from the start, unless some of it was already streamed to the client.
            if job.delivered:
                self.finish(
                    job,
                    "failed",
                    "error",
                    error=f"{reason}; its answer ({FEATURES[kept_to_one[0]]}) was streamed in part "
                    f"({job.tokens} tokens) and cannot be continued on another engine: send it again",
                )
                return
            job.wasted_tokens += job.tokens
            job.chunks.clear()
            job.tool_calls.clear()
            job.logprobs.clear()
            job.prompt_logprobs = None
            job.tokens, job.output_ids, job.first_token_at = 0, [], None
        if job.instance is not None:
            s = self.fleet.sessions.get(job.instance)
            if s is not None:
                s.assigned.pop(job.id, None)
        task = self._forwards.pop(job.id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        # The policy forgets the old dispatch and takes the request again (same deadlines).
        self.hook.qlm_request_finished(outcome=job.outcome(), now=now)
        job.state, job.instance = "queued", None
        self.book.journal.requeued(job.id, job.failures)
        self.telemetry.request_event(job.id, "qlm.requeued", {"qlm.reason": reason})
        self.admit(job, now)

    def cancel(self, request_id: str, reason: str = "cancelled by the client") -> Job | None:
        """Cancel a request wherever it is; the instance serving it is told to abort."""
        job = self.book.jobs.get(request_id)
        if job is None or job.state in TERMINAL:
            return job or self.book.lookup(request_id)  # finished already, or unknown
        if job.state == "dispatched" and job.instance is not None:
            s = self.fleet.live(job.instance)
            if s is not None:
                self.fleet.command(s, "abort", job.id, attempt=job.attempt)
            task = self._forwards.pop(job.id, None)
            if task is not None:
                task.cancel()  # closing the stream makes the engine abort it
        self.parked.pop(job.id, None)
        self.finish(job, "cancelled", "cancelled", error=reason)
        return job

    # ------------------------------------------------------------------ reports
    def apply_events(self, s: Session, batch: pb.EventBatch) -> None:
        """Apply an instance's report. Events for an attempt the coordinator no longer counts
        (the request was re-served or cancelled) are dropped and the instance told to abort it."""
        s.last_seen = time.monotonic()
        now = time.time()
        for ev in batch.events:
            job = self.book.jobs.get(ev.request_id)
            if (
                job is None
                or job.state != "dispatched"
                or job.instance != s.instance_id
                or job.attempt != ev.attempt
            ):
                stale = job is None or job.state in TERMINAL or job.attempt != ev.attempt
                attempt = (ev.request_id, ev.attempt)
                if ev.kind in (Event.FINISHED, Event.FAILED, Event.REFUSED, Event.REQUEUED):
                    s.pending_aborts.discard(attempt)  # the engine is done with that attempt
                elif stale and attempt not in s.pending_aborts and len(s.pending_aborts) < MAX_PENDING_ABORTS:
                    s.pending_aborts.add(attempt)  # the engine still works on it for nothing
                    self.fleet.command(s, "abort", ev.request_id, attempt=ev.attempt)
                continue
            if ev.kind == Event.TOKENS:
                if ev.tokens < 0 or (ev.tokens == 0 and (ev.text or ev.tool_calls or ev.logprobs)):
                    self._malformed(s, job, ev, f"{ev.tokens} tokens for {len(ev.text)} characters")
                    continue
                calls = _json_list(ev.tool_calls) if ev.tool_calls else None
                logprobs = _json_list(ev.logprobs) if ev.logprobs else None
                if (ev.tool_calls and calls is None) or (ev.logprobs and logprobs is None):
                    what = "tool calls" if ev.tool_calls and calls is None else "log probabilities"
                    self._malformed(s, job, ev, f"{what} that are not a JSON list of objects")
                    continue
                if ev.index + ev.tokens <= job.tokens:
                    continue  # resent
                if ev.index != job.tokens:
                    # Output missing (or overlapping): what follows cannot be trusted, and a FINISHED
                    # after it would close the request truncated. Served again after what was delivered.
                    self._malformed(s, job, ev, f"tokens at {ev.index}, expected {job.tokens}")
                    continue
                tokens = min(ev.tokens, job.request.max_tokens - job.tokens)  # an engine past the limit
                if tokens <= 0:
                    log.warning(
                        "request %s: tokens past max_tokens %d dropped", job.id, job.request.max_tokens
                    )
                    continue
                if ev.prompt_logprobs and ev.index == 0:  # an echoed prompt's, with the first tokens
                    job.prompt_logprobs = _json_list(ev.prompt_logprobs)
                    if job.prompt_logprobs is None:
                        self._malformed(
                            s, job, ev, "prompt log probabilities that are not a JSON list of objects"
                        )
                        continue
                job.chunks.append(ev.text)
                job.tokens += tokens
                if calls:
                    calls = merge_tool_calls(job.tool_calls, calls)
                if logprobs:
                    if tokens < ev.tokens:  # past max_tokens: their entries go with them
                        logprobs = logprobs[:tokens]
                    job.logprobs.extend(logprobs)
                if job.first_token_at is None:
                    # A request claimed after a crash (its first token's time was not journaled):
                    # the time its engine stamped it with, where it is plausible; else receipt.
                    made = ev.time if job.replayed and ev.index == 0 else 0.0
                    job.first_token_at = made if job.request.arrival_time <= made <= now else now
                    self.telemetry.request_event(job.id, "qlm.first_token", time=now)
                self.book.publish(job, Chunk(ev.text, ev.index, tokens, tool_calls=calls, logprobs=logprobs))
            elif ev.kind == Event.FINISHED:
                # an engine that reports evictions one by one (EVICTED) and one that totals them at
                # the end: both counted once
                job.preemptions = max(job.preemptions, ev.preemptions)
                job.wasted_tokens = max(job.wasted_tokens, ev.wasted_tokens)
                self.finish(job, "finished", ev.finish_reason or "length")
            elif ev.kind == Event.EVICTED:
                job.preemptions += 1
                job.wasted_tokens += ev.wasted_tokens
                self.telemetry.request_event(job.id, "qlm.evicted", {"qlm.wasted_tokens": ev.wasted_tokens})
            elif ev.kind == Event.SWAPPED_IN:
                self.telemetry.request_event(job.id, "qlm.swapped_in")
            elif ev.kind == Event.FAILED:
                self.requeue(job, f"instance {s.instance_id} failed it: {ev.error}")
            elif ev.kind == Event.REFUSED:  # the request's own fault: another engine would refuse it too
                self.finish(job, "failed", REFUSED, error=f"instance {s.instance_id} refused it: {ev.error}")
            elif ev.kind == Event.REQUEUED:
                job.preemptions += 1  # evicted by abort: its work there is lost
                self.requeue(job, f"instance {s.instance_id} gave it back: {ev.error}", failure=False)

    def _malformed(self, s: Session, job: Job, ev: pb.RequestEvent, what: str) -> None:
        """A progress report that cannot be applied: the attempt fails (the engine is told to drop
        it), and the request is served again after what was delivered."""
        log.warning(
            "request %s: instance %s reported %s: attempt %d failed", job.id, s.instance_id, what, ev.attempt
        )
        if s.alive:
            s.pending_aborts.add((job.id, ev.attempt))  # its later events are stale: no second abort
            self.fleet.command(s, "abort", job.id, attempt=ev.attempt)
        self.requeue(job, f"instance {s.instance_id} reported malformed progress: {what}")

    async def close(self) -> None:
        """Stop forwarding (the engines abort what they were streaming)."""
        for task in list(self._forwards.values()):
            task.cancel()
        if self._http is not None:
            await self._http.close()


def _json_list(raw: str) -> list[dict[str, Any]] | None:
    """An event's tool-call deltas or log probabilities (JSON text), or None where they are not a
    list of objects."""
    try:
        calls = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return None
    return calls
