"""The coordinator's state: every accepted request (a :class:`Job`), the journal, the policy plugins
and the connected instances, on one asyncio event loop.

The front ends (gRPC, HTTP) call :meth:`Coordinator.submit`, :meth:`~Coordinator.cancel` and
:meth:`~Coordinator.follow`; the instance service calls the ``instance_*`` methods. Requests are
journaled before they are acknowledged; each dispatch is an *attempt*, numbered, and an instance's
report counts only for the attempt the coordinator handed it, so a request re-served elsewhere
(its instance was lost, or the coordinator restarted) is answered once. Not thread-safe: one event
loop owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from google.protobuf import json_format

from qlm_plugin.brain.queue_manager import QueueManager
from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.instances import PendingCommand, RemoteFleet, Session, state_from_report
from qlm_plugin.coordinator.journal import TERMINAL, JobRecord, Journal, JournalError
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.outcome import Admission, RequestOutcome, Status
from qlm_plugin.domain.plan import Plan
from qlm_plugin.domain.request import (
    DEFAULT_CLASSES,
    ModelSpec,
    Request,
    RequestValidationError,
    SLOClass,
    make_request,
)
from qlm_plugin.policies.registry import PolicyContext, policy_registry
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.telemetry.instruments import Telemetry
from qlm_plugin.workloads.scenario import Scenario

log = logging.getLogger("qlm_plugin.coordinator")

#: OpenAI's default for /v1/completions when the request names no max_tokens.
DEFAULT_MAX_TOKENS = 16
#: Finished requests stay in memory this long for status and streaming (then the journal answers).
RETAIN_FINISHED_S = 120.0
#: Period of the coordinator's own timer: heartbeats, replanning, recovery.
TICK_S = 0.25

Event = pb.RequestEvent


class SubmitError(Exception):
    """A refused submission. ``code``: invalid, unknown_model, too_large, limit, unavailable,
    slo_unattainable; ``field`` names the offending request field where there is one."""

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        estimate: Admission | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.field = field
        self.estimate = estimate
        self.retry_after_s = retry_after_s  # when a retry may succeed (limits, load, no instance)


def estimate_prompt_tokens(text: str) -> int:
    """Tokens of a prompt when the client did not say: about 4 bytes of UTF-8 per token (the engine
    reports the exact count with the answer; the estimate only feeds scheduling)."""
    return max(1, math.ceil(len(text.encode()) / 4))


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    index: int
    tokens: int
    finished: bool = False
    finish_reason: str = ""


@dataclass(eq=False, slots=True)
class Job:
    """One accepted request and everything that happened to it."""

    request: Request
    spec: pb.RequestSpec
    state: str = "queued"
    attempt: int = 0
    instance: str | None = None
    chunks: list[str] = field(default_factory=list)
    tokens: int = 0
    # The engine's own token ids of the prompt and of the delivered output (an engine served over
    # HTTP returns them), so that a resumed attempt continues from exactly those tokens: the
    # delivered text, tokenized again, can come to more tokens and no longer fit the context.
    # None (or a count that does not match ``tokens``): unknown, and a resume sends the text.
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = field(default_factory=list)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str = ""
    error: str = ""
    preemptions: int = 0
    wasted_tokens: int = 0
    failures: int = 0  # attempts that ended with the instance lost or failing (not evictions)
    admission: Admission | None = None
    recovering: bool = False  # rebuilt from the journal; its instance may still claim it
    listeners: list[asyncio.Queue[Chunk | None]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def late(self) -> bool:
        slo = self.request.slo
        if slo.ttft_deadline is not None and (self.first_token_at or math.inf) > slo.ttft_deadline:
            return True
        return slo.e2e_deadline is not None and (self.finished_at or math.inf) > slo.e2e_deadline

    def outcome(self) -> RequestOutcome:
        status = {"finished": Status.FINISHED, "cancelled": Status.CANCELLED, "failed": Status.REJECTED}
        return RequestOutcome(
            self.request,
            status.get(self.state, Status.UNFINISHED),
            instance_id=self.instance,
            first_token_time=self.first_token_at,
            finish_time=self.finished_at,
            output_tokens=self.tokens,
            preemptions=self.preemptions,
            wasted_tokens=self.wasted_tokens,
            reason=self.error,
        )


def spec_to_dict(spec: pb.RequestSpec) -> dict[str, Any]:
    """The journal's copy of a request: the fields that are set (``json_format`` is 10x slower)."""
    slo = spec.slo
    out: dict[str, Any] = {
        "request_id": spec.request_id,
        "model": spec.model,
        "prompt": spec.prompt,
        "prompt_tokens": spec.prompt_tokens,
        "max_tokens": spec.max_tokens,
        "slo": {
            "ttft_ms": slo.ttft_ms,
            "e2e_ms": slo.e2e_ms,
            "slo_class": slo.slo_class,
            "priority": slo.priority,
        },
        "tenant": spec.tenant,
        "operation": spec.operation,
    }
    if spec.reject_if_late:
        out["reject_if_late"] = True
    if spec.sampling:
        out["sampling"] = dict(spec.sampling)
    if spec.idempotency_key:
        out["idempotency_key"] = spec.idempotency_key
    if spec.true_output_tokens:
        out["true_output_tokens"] = spec.true_output_tokens
    if spec.prompt_token_ids:
        out["prompt_token_ids"] = list(spec.prompt_token_ids)
    return out


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        scenario: Scenario,
        journal: Journal,
        telemetry: Telemetry | None = None,
        *,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        from qlm_plugin.hooks import get_plugin_manager

        self.cfg = cfg
        self.scenario = scenario
        self.journal = journal
        self.models: dict[str, ModelSpec] = scenario.model_specs()
        self.classes: dict[str, SLOClass] = scenario.slo_classes() or dict(DEFAULT_CLASSES)
        self.default_class = "interactive" if "interactive" in self.classes else next(iter(self.classes))
        self._costs = scenario.reference_cost_models()
        self.pm = pm or get_plugin_manager()
        info = policy_registry(self.pm).get(cfg.policy)
        built = info.factory(PolicyContext(self._costs, wall_clock=True))
        self.plugins = built if isinstance(built, list) else [built]
        for n, plugin in enumerate(self.plugins):
            self.pm.register(plugin, name=f"policy:{cfg.policy}:{n}")
        self.fleet = RemoteFleet(self._dispatch)
        self.fleet.on_command = self._on_command
        self.pm.register(self.fleet, name="remote-fleet")
        self.hook: Any = self.pm.hook
        self.hook.qlm_configure(pm=self.pm)
        self.queue_manager = next((p for p in self.plugins if isinstance(p, QueueManager)), None)
        self.has_queue_manager = bool(self.hook.qlm_submit.get_hookimpls())
        self.telemetry = telemetry or Telemetry()
        self.telemetry.set_queue_depth(self.queue_depth)
        if self.queue_manager is not None:
            self.queue_manager.on_replan = self._on_replan
        self.jobs: dict[str, Job] = {}
        self.parked: dict[str, Job] = {}  # accepted, waiting for an instance that serves the model
        self.by_key: dict[tuple[str, str], str] = {}  # (tenant, idempotency key) -> request id
        self.tenant_load: dict[str, list[int]] = {}  # tenant -> [unfinished requests, their tokens]
        self.accepting = False
        self.started_at = time.time()
        self.recovery_until = 0.0
        self.awaiting: set[str] = set()  # instances that held recovered work, not back yet
        self.models_seen: set[str] = set()  # models some instance served since the start (or journal)
        self._fleet_waiters: list[asyncio.Future[None]] = []  # woken when instances come or change
        self._ids = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._finished_order: list[tuple[float, str]] = []
        self._http: Any = None  # aiohttp session for instances served over HTTP (forward.py)
        self._forwards: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Rebuild the queue from the journal, then accept work."""
        recovered = self.journal.recover()
        for rec in recovered:
            job = self._job_from_record(rec)
            if job is None:
                continue
            job.recovering = True
            self.jobs[job.id] = job
            self._count_tenant(job, +1)
            self.models_seen.add(job.request.model)  # accepted while an instance served it
            if job.state == "dispatched" and job.instance is not None:
                self.awaiting.add(job.instance)
        # Recovered work waits for the instances that held it to come back (they reconnect with
        # backoff), at most the grace period: an instance reclaims what it still runs or finished.
        self.recovery_until = time.monotonic() + self.cfg.recovery_grace_s if recovered else 0.0
        if recovered:
            log.info("recovered %d unfinished requests from the journal", len(recovered))
        self.accepting = True
        self._tasks.append(asyncio.get_running_loop().create_task(self._timer()))

    def _job_from_record(self, rec: JobRecord) -> Job | None:
        try:
            spec = json_format.ParseDict(rec.spec, pb.RequestSpec())
            request = self._build_request(spec, rec.accepted_at)
        except (json_format.ParseError, RequestValidationError, SubmitError) as exc:
            log.error("journal record %s cannot be rebuilt (%s): marked failed", rec.request_id, exc)
            self.journal.finished(
                rec.request_id,
                state="failed",
                output="",
                output_tokens=0,
                first_token_at=None,
                finished_at=time.time(),
                error=f"cannot be rebuilt after restart: {exc}",
            )
            return None
        job = Job(request, spec, state=rec.state, attempt=rec.attempt, instance=rec.instance_id)
        if rec.idempotency_key:
            self.by_key[(rec.tenant, rec.idempotency_key)] = rec.request_id
        return job

    async def drain(self, timeout_s: float | None = None) -> dict[str, int]:
        """Graceful stop: refuse new work, let dispatched requests finish (up to the timeout), keep
        the rest in the journal for the next start, and flush it."""
        self.accepting = False
        deadline = time.monotonic() + (self.cfg.drain_timeout_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline and any(j.state == "dispatched" for j in self.jobs.values()):
            await asyncio.sleep(0.05)
        left = {
            "dispatched": sum(j.state == "dispatched" for j in self.jobs.values()),
            "queued": sum(j.state == "queued" for j in self.jobs.values()),
        }
        for task in self._tasks:
            task.cancel()
        for s in list(self.fleet.sessions.values()):
            s.close()
        for task in list(self._forwards.values()):
            task.cancel()
        if self._http is not None:
            await self._http.close()
        await self.journal.flush()
        return left

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # the timer must survive a bad plugin
                log.exception("coordinator tick failed")

    def tick(self) -> None:
        now = time.time()
        mono = time.monotonic()
        for s in list(self.fleet.sessions.values()):
            if s.alive and mono - s.last_seen > self.cfg.heartbeat_timeout_s:
                self.instance_lost(s, f"no heartbeat for {mono - s.last_seen:.1f} s")
        if self.recovery_until and mono >= self.recovery_until:
            self.recovery_until = 0.0
            self._release_recovered()
        if self.parked and self.fleet.qlm_list_instances():
            self._unpark()
        self.hook.qlm_tick(now=now)
        while self._finished_order and now - self._finished_order[0][0] > RETAIN_FINISHED_S:
            _, rid = self._finished_order.pop(0)
            job = self.jobs.get(rid)
            if job is not None and job.state in TERMINAL:
                del self.jobs[rid]

    # ------------------------------------------------------------------ clients
    def new_id(self) -> str:
        self._ids += 1
        return f"req-{int(self.started_at * 1000):x}-{self._ids}"

    def _build_request(self, spec: pb.RequestSpec, arrival: float) -> Request:
        if spec.model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise SubmitError("unknown_model", f"unknown model {spec.model!r} (served: {known})", "model")
        cls_name = spec.slo.slo_class or self.default_class
        cls = self.classes.get(cls_name)
        if cls is None:
            known = ", ".join(sorted(self.classes))
            raise SubmitError("invalid", f"unknown SLO class {cls_name!r} (classes: {known})", "slo.class")
        for name, value in (("slo.ttft_ms", spec.slo.ttft_ms), ("slo.e2e_ms", spec.slo.e2e_ms)):
            if value < 0 or not math.isfinite(value):
                raise SubmitError("invalid", f"must be a positive number of milliseconds, got {value}", name)
        if spec.prompt and spec.prompt_token_ids:
            raise SubmitError("invalid", "give the prompt as text or as token ids, not both", "prompt")
        prompt_tokens = (
            spec.prompt_tokens or len(spec.prompt_token_ids) or estimate_prompt_tokens(spec.prompt)
        )
        try:
            return make_request(
                spec.request_id,
                spec.model,
                prompt_tokens,
                spec.max_tokens or DEFAULT_MAX_TOKENS,
                arrival,
                slo_class=cls,
                ttft_s=spec.slo.ttft_ms / 1000 if spec.slo.ttft_ms else None,
                e2e_s=spec.slo.e2e_ms / 1000 if spec.slo.e2e_ms else None,
                priority=spec.slo.priority if spec.slo.priority else None,
                tenant=spec.tenant or "default",
                true_output_tokens=spec.true_output_tokens or None,
                models=self.models,
            )
        except RequestValidationError as exc:
            code = "too_large" if exc.field in ("prompt_tokens", "max_tokens") else "invalid"
            fld = {"prompt_tokens": "prompt", "slo.ttft_s": "slo.ttft_ms", "slo.e2e_s": "slo.e2e_ms"}.get(
                exc.field, exc.field
            )
            raise SubmitError(code, exc.reason, fld) from None

    def _check_feasible(self, request: Request) -> None:
        """An SLO no instance could meet even idle is refused at once, whatever the client asked."""
        cost = self._costs.get(request.model)
        if cost is None or request.slo.ttft_deadline is None:
            return
        budget = request.slo.ttft_deadline - request.arrival_time
        floor = cost.step_s(request.prompt_tokens, 0)
        if budget < floor:
            raise SubmitError(
                "slo_unattainable",
                f"a TTFT SLO of {budget * 1000:.0f} ms cannot be met: a {request.prompt_tokens}-token prompt "
                f"takes at least {floor * 1000:.0f} ms to prefill on an idle instance",
                "slo.ttft_ms",
            )

    def _count_tenant(self, job: Job | Request, sign: int) -> None:
        request = job.request if isinstance(job, Job) else job
        load = self.tenant_load.setdefault(request.tenant, [0, 0])
        load[0] += sign
        load[1] += sign * (request.prompt_tokens + request.max_tokens)

    # ------------------------------------------------------------------ instances to serve a model
    def _served(self, model: str) -> bool:
        return any(self._serves(s, model) for s in self.fleet.sessions.values() if s.alive)

    def _fleet_changed(self) -> None:
        """An instance registered or reported: note the models it serves and wake the requests
        waiting for one."""
        for s in self.fleet.sessions.values():
            rep = s.report
            if not s.alive:
                continue
            if rep is None or not rep.models_loaded:
                self.models_seen.update(self.models)  # serves whatever it is sent
            else:
                self.models_seen.update(rep.models_loaded, rep.models_warm)
        waiters, self._fleet_waiters = self._fleet_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _await_instance(self, request: Request) -> None:
        """Wait until a live instance serves ``request.model``, at most the configured time; then
        raise :class:`SubmitError` (``unavailable``). Nothing is queued meanwhile."""
        seen = request.model in self.models_seen
        bound = self.cfg.instance_return_wait_s if seen else self.cfg.instance_wait_s
        deadline = time.monotonic() + bound
        while not self._served(request.model) and self.accepting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._fleet_waiters.append(waiter)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, left)
        if self._served(request.model):
            return
        live = [s for s in self.fleet.sessions.values() if s.alive]
        raise SubmitError(
            "unavailable",
            f"no live instance serves model {request.model!r} (0 of {len(live)} connected instances "
            f"serve it{'; its instances left' if seen else ''}; waited {bound:g} s for one)",
            "model",
            retry_after_s=max(bound, 1.0),
        )

    async def submit(
        self, spec: pb.RequestSpec, *, tenant: str | None = None, parent: Any = None
    ) -> tuple[Job, bool]:
        """Validate, journal and queue a request. Returns the job and whether it was a duplicate
        (an earlier request with the same idempotency key). Raises :class:`SubmitError`."""
        if not self.accepting:
            raise SubmitError(
                "unavailable", "the coordinator is not accepting requests (starting or draining)"
            )
        if tenant is not None:
            spec.tenant = tenant
        spec.tenant = spec.tenant or "default"
        if spec.idempotency_key:
            rid = self.by_key.get((spec.tenant, spec.idempotency_key)) or self.journal.find_idempotent(
                spec.tenant, spec.idempotency_key
            )
            if rid is not None:
                job = self.jobs.get(rid)
                if job is not None:
                    return job, True
                rec = self.journal.get(rid)
                if rec is not None:
                    return self._finished_job(rec), True
        if spec.request_id:
            if spec.request_id in self.jobs or self.journal.get(spec.request_id) is not None:
                raise SubmitError("invalid", f"request id {spec.request_id!r} is already taken", "request_id")
        else:
            spec.request_id = self.new_id()
        if not spec.operation:
            spec.operation = "text_completion"
        now = time.time()
        request = self._build_request(spec, now)
        spec.prompt_tokens = request.prompt_tokens
        spec.max_tokens = request.max_tokens
        self._check_feasible(request)
        limits = self.cfg.limits_for(request.tenant)
        load = self.tenant_load.get(request.tenant, [0, 0])
        tokens = request.prompt_tokens + request.max_tokens
        if load[0] + 1 > limits.max_queued_requests:
            raise SubmitError(
                "limit",
                f"tenant {request.tenant!r} has {load[0]} unfinished requests "
                f"(limit {limits.max_queued_requests})",
                retry_after_s=1.0,
            )
        if load[1] + tokens > limits.max_queued_tokens:
            raise SubmitError(
                "limit",
                f"tenant {request.tenant!r} has {load[1]} tokens queued; {tokens} more exceed the limit "
                f"of {limits.max_queued_tokens}",
                retry_after_s=1.0,
            )
        if not self._served(request.model):
            self._count_tenant(request, +1)  # held while it waits: concurrent ones must not pass
            try:
                await self._await_instance(request)
            except SubmitError as exc:
                await self._record_refusal(spec, request, now, str(exc))
                raise
            finally:
                self._count_tenant(request, -1)
            now = time.time()
        estimate = self._estimate(request, now) if spec.reject_if_late else None
        if estimate is not None and (estimate.p_meet or 0.0) < self.cfg.reject_below_p_meet:
            self.telemetry.request_rejected(
                model=request.model, slo_class=request.slo_class, reason="slo_unattainable"
            )
            raise SubmitError(
                "slo_unattainable",
                f"the SLO cannot be met at the current load: estimated wait "
                f"{estimate.wait_mean_s or 0:.2f} s, probability of meeting it {estimate.p_meet or 0:.2f}",
                estimate=estimate,
                retry_after_s=max(1.0, estimate.wait_mean_s or 0.0),
            )
        job = Job(request, spec)
        record = JobRecord(
            request.id,
            request.tenant,
            spec_to_dict(spec),
            now,
            idempotency_key=spec.idempotency_key or None,
        )
        # Counted before the await: requests arriving together must not all pass the tenant's limit.
        self._count_tenant(job, +1)
        try:
            await self.journal.accept(record)
        except JournalError as exc:
            self._count_tenant(job, -1)
            raise SubmitError("invalid", f"cannot accept: {exc}", "request_id") from None
        self.jobs[job.id] = job
        if spec.idempotency_key:
            self.by_key[(spec.tenant, spec.idempotency_key)] = job.id
        self._trace(job, parent)
        self._admit(job, time.time())
        return job, False

    async def _record_refusal(
        self, spec: pb.RequestSpec, request: Request, accepted_at: float, error: str
    ) -> None:
        """A request refused after it waited (for an instance) is journaled as failed, never as queued,
        so no restart serves it. Without its idempotency key: the client may submit it again."""
        self.telemetry.request_rejected(
            model=request.model, slo_class=request.slo_class, reason="unavailable"
        )
        record = JobRecord(
            request.id,
            request.tenant,
            spec_to_dict(spec),
            accepted_at,
            state="failed",
            finished_at=time.time(),
            finish_reason="error",
            error=error,
        )
        with contextlib.suppress(JournalError):  # a duplicate id: nothing to record
            await self.journal.accept(record)

    def _trace(self, job: Job, parent: Any = None) -> None:
        """Open the request's span, from its arrival."""
        r, slo = job.request, job.spec.slo
        self.telemetry.request_started(
            job.id,
            model=r.model,
            operation=job.spec.operation or "text_completion",
            slo_class=r.slo_class,
            tenant=r.tenant,
            max_tokens=r.max_tokens,
            input_tokens=r.prompt_tokens,
            ttft_slo_s=slo.ttft_ms / 1000 or None,
            e2e_slo_s=slo.e2e_ms / 1000 or None,
            start_time=r.arrival_time,
            parent=parent,
        )

    def _finished_job(self, rec: JobRecord) -> Job:
        """A read-only job for a request that left memory (status of an old request)."""
        spec = json_format.ParseDict(rec.spec, pb.RequestSpec())
        req = Request(
            rec.request_id, spec.model, max(1, spec.prompt_tokens), max(1, spec.max_tokens), rec.accepted_at
        )
        job = Job(req, spec, state=rec.state, attempt=rec.attempt, instance=rec.instance_id)
        job.chunks = [rec.output]
        job.tokens = rec.output_tokens
        job.first_token_at, job.finished_at = rec.first_token_at, rec.finished_at
        job.finish_reason, job.error = rec.finish_reason, rec.error
        if rec.state in TERMINAL:
            job.done.set()
        return job

    def lookup(self, request_id: str) -> Job | None:
        job = self.jobs.get(request_id)
        if job is not None:
            return job
        rec = self.journal.get(request_id)
        return None if rec is None else self._finished_job(rec)

    def _estimate(self, request: Request, now: float) -> Admission | None:
        states = [
            s
            for s in (
                self.hook.qlm_instance_state(instance_id=i.instance_id, detail=False)
                for i in self.fleet.qlm_list_instances()
            )
            if s is not None
        ]
        if not states:
            return None
        est = self.hook.qlm_estimate_wait(request=request, now=now)
        if est is None:
            return None
        return Admission(
            request.id, True, est.p_meet >= self.cfg.reject_below_p_meet, None, est.wait_mean_s, est.p_meet
        )

    def _admit(self, job: Job, now: float) -> None:
        """Hand a queued job to the policy: the queue manager's global queue, or (no queue manager)
        straight to the instance the router picks. Parked while no instance serves its model."""
        if not any(self._serves(s, job.request.model) for s in self.fleet.sessions.values() if s.alive):
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
            and self._serves(s, job.request.model)
        ]
        target = self.hook.qlm_choose_instance(request=job.request, instances=states, now=now)
        if target is None or not self.hook.qlm_dispatch(instance_id=target, request=job.request):
            self.parked[job.id] = job

    @staticmethod
    def _serves(s: Session, model: str) -> bool:
        rep = s.report
        if rep is not None and not rep.healthy:
            return False  # its engine is down: nothing goes there until it is back
        return rep is None or not rep.models_loaded or model in rep.models_loaded or model in rep.models_warm

    def _unpark(self) -> None:
        now = time.time()
        jobs, self.parked = list(self.parked.values()), {}
        for job in jobs:
            if job.state == "queued":
                self._admit(job, now)

    def _release_recovered(self, instance_id: str | None = None) -> None:
        """Recovered requests nobody reclaimed are queued again: those of one instance once it is
        back (``instance_id``), or all of them when the grace is over."""
        now = time.time()
        for job in list(self.jobs.values()):
            if not job.recovering:
                continue
            if instance_id is not None and job.instance != instance_id:
                continue
            job.recovering = False
            if job.state == "dispatched":  # its instance did not come back for it
                job.state, job.instance = "queued", None
                self.journal.requeued(job.id)
            if job.state == "queued":
                self._trace(job)  # a new span: the one of the crashed process is gone
                self._admit(job, now)

    def cancel(self, request_id: str, reason: str = "cancelled by the client") -> Job | None:
        """Cancel a request wherever it is; the instance serving it is told to abort."""
        job = self.jobs.get(request_id)
        if job is None or job.state in TERMINAL:
            return job
        if job.state == "dispatched" and job.instance is not None:
            s = self.fleet.live(job.instance)
            if s is not None:
                self.fleet.command(s, "abort", job.id, attempt=job.attempt)
            task = self._forwards.pop(job.id, None)
            if task is not None:
                task.cancel()  # closing the stream makes the engine abort it
        self.parked.pop(job.id, None)
        self._finish(job, "cancelled", "cancelled", error=reason)
        return job

    async def follow(self, job: Job) -> AsyncIterator[Chunk]:
        """The job's output from the start: what exists now, then each chunk as it arrives. An
        unbounded queue per follower: a slow reader never holds the coordinator up."""
        # The snapshot and the listener are taken together, before the first yield: a chunk
        # published while the caller holds the snapshot goes to the queue, not nowhere.
        text, tokens, finished = job.text, job.tokens, job.state in TERMINAL
        q: asyncio.Queue[Chunk | None] = asyncio.Queue()
        if not finished:
            job.listeners.append(q)
        try:
            if text:
                yield Chunk(text, 0, tokens)
            if finished:
                yield Chunk("", tokens, 0, True, job.finish_reason)
                return
            while True:
                chunk = await q.get()
                if chunk is None:
                    return
                yield chunk
                if chunk.finished:
                    return
        finally:
            if q in job.listeners:
                job.listeners.remove(q)

    def _publish(self, job: Job, chunk: Chunk) -> None:
        for q in job.listeners:
            q.put_nowait(chunk)

    def queue_depth(self) -> dict[tuple[str, str], int]:
        # Every configured (model, class) appears, at 0 when empty: dashboards see a series drop to
        # zero instead of vanishing.
        depth: dict[tuple[str, str], int] = dict.fromkeys(
            ((m, c) for m in self.models for c in self.classes), 0
        )
        for job in list(self.jobs.values()):  # list() is atomic: scrapes run on other threads
            if job.state == "queued":
                key = (job.request.model, job.request.slo_class)
                depth[key] = depth.get(key, 0) + 1
        return depth

    # ------------------------------------------------------------------ dispatch and completion
    def _rank(self, request: Request, instance_id: str, now: float) -> float:
        key: Hashable = self.hook.qlm_rank_key(request=request, instance_id=instance_id, now=now)
        head = key[0] if isinstance(key, tuple) and key else key
        return float(head) if isinstance(head, (int, float)) else request.arrival_time

    def _dispatch(self, s: Session, request: Request) -> bool:
        job = self.jobs.get(request.id)
        if job is None or job.state != "queued":
            return False
        now = time.time()
        job.attempt += 1
        job.state, job.instance = "dispatched", s.instance_id
        job.recovering = False
        s.assigned[job.id] = job.attempt
        s.sent += 1
        self.journal.dispatched(job.id, job.attempt, s.instance_id)
        if s.endpoint:  # the instance serves HTTP itself (a vLLM engine): forward the request there
            self._forward(s, job)
            self.telemetry.request_event(
                job.id, "qlm.dispatched", {"qlm.instance.id": s.instance_id, "qlm.attempt": job.attempt}
            )
            return True
        ttft_budget, e2e_budget = request.slo.budgets(now, started=job.tokens > 0)
        s.assignments.put_nowait(
            pb.Assignment(
                request=job.spec,
                attempt=job.attempt,
                urgency=self._rank(request, s.instance_id, now),
                deadline=request.slo.first_deadline() if math.isfinite(request.slo.first_deadline()) else 0.0,
                resume_tokens=job.tokens,
                resume_text=job.text,
                ttft_budget_s=ttft_budget,
                e2e_budget_s=e2e_budget,
            )
        )
        self.telemetry.request_event(
            job.id, "qlm.dispatched", {"qlm.instance.id": s.instance_id, "qlm.attempt": job.attempt}
        )
        return True

    def _forward(self, s: Session, job: Job) -> None:
        import aiohttp

        from qlm_plugin.coordinator.forward import forward

        if self._http is None:
            # A fresh connection per request: a pooled keep-alive connection the engine's server
            # closes as it is reused fails the request, which then counts against its attempts.
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        task = asyncio.get_running_loop().create_task(forward(self, s, job, job.attempt, self._http))
        self._forwards[job.id] = task

        def forget(t: asyncio.Task[None], rid: str = job.id) -> None:
            if self._forwards.get(rid) is t:
                del self._forwards[rid]

        task.add_done_callback(forget)

    def _finish(self, job: Job, state: str, finish_reason: str, error: str = "") -> None:
        now = time.time()
        job.state, job.finish_reason, job.error = state, finish_reason, error
        job.finished_at = now
        job.recovering = False
        if job.instance is not None:
            s = self.fleet.sessions.get(job.instance)
            if s is not None:
                s.assigned.pop(job.id, None)
        self._count_tenant(job, -1)
        self.journal.finished(
            job.id,
            state=state,
            output=job.text,
            output_tokens=job.tokens,
            first_token_at=job.first_token_at,
            finished_at=now,
            finish_reason=finish_reason,
            error=error,
        )
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
            predicted_wait_s=job.admission.wait_mean_s if job.admission is not None else None,
            late=job.late,
            error=error,
            end_time=now,
        )
        self._publish(job, Chunk("", job.tokens, 0, True, finish_reason))
        for q in job.listeners:
            q.put_nowait(None)
        job.done.set()
        self._finished_order.append((now, job.id))

    def _requeue(self, job: Job, reason: str, *, failure: bool = True) -> None:
        """A dispatched job goes back to the queue (its instance was lost, failed it, or gave it back
        after an eviction: only failures count towards ``max_attempts``)."""
        now = time.time()
        if failure:
            job.failures += 1
        if job.failures >= self.cfg.max_attempts:
            self._finish(job, "failed", "error", error=f"gave up after {job.attempt} attempts: {reason}")
            return
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
        self.journal.requeued(job.id)
        self.telemetry.request_event(job.id, "qlm.requeued", {"qlm.reason": reason})
        self._admit(job, now)

    # ------------------------------------------------------------------ instances
    def instance_register(
        self, msg: pb.RegisterRequest
    ) -> tuple[Session, list[pb.HeldRequest], list[pb.HeldRequest]]:
        """A (re)registration: a new session; the requests it still holds are kept where the
        coordinator agrees they are its, and abandoned otherwise."""
        now = time.time()
        iid = msg.instance_id
        old = self.fleet.sessions.get(iid)
        held = {h.request_id: h.attempt for h in msg.held}
        s = Session(iid, msg.backend, msg.gpu, frozenset(msg.capabilities), msg.endpoint)
        s.report = state_from_report(msg.state, iid, msg.backend, s.capabilities)
        keep: list[pb.HeldRequest] = []
        abandon: list[pb.HeldRequest] = []
        orphans: list[Job] = []
        if old is not None:
            old.close()
            for rid, attempt in old.assigned.items():
                task = self._forwards.get(rid)
                if rid not in held and task is not None and not task.done():
                    held[rid] = attempt  # served over HTTP: the stream outlives the agent's session
            orphans = [self.jobs[r] for r in old.assigned if r in self.jobs and r not in held]
        self.fleet.sessions[iid] = s
        for rid, attempt in held.items():
            job = self.jobs.get(rid)
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
                    self.journal.dispatched(rid, attempt, iid)
                job.recovering = False
                s.assigned[rid] = attempt
                keep.append(pb.HeldRequest(request_id=rid, attempt=attempt))
            else:
                abandon.append(pb.HeldRequest(request_id=rid, attempt=attempt))
        self._fleet_changed()
        if old is None:
            self.hook.qlm_instance_joined(info=s.info(), now=now)
            self.telemetry.instance_event(iid, "registered")
        else:
            self.telemetry.instance_event(iid, "reconnected")
        if iid in self.awaiting:
            self.awaiting.discard(iid)
            self._release_recovered(iid)  # its recovered requests it did not reclaim
            if not self.awaiting and self.recovery_until:
                self.recovery_until = 0.0
                self._release_recovered()  # every holder is back: the rest may go now
        for job in orphans:
            if job.state == "dispatched":
                self._requeue(job, f"instance {iid} reconnected without it")
        log.info(
            "instance %s registered (%s, %s): kept %d, abandoned %d",
            iid,
            msg.backend,
            msg.gpu,
            len(keep),
            len(abandon),
        )
        return s, keep, abandon

    def session(self, session_id: str) -> Session | None:
        for s in self.fleet.sessions.values():
            if s.id == session_id and s.alive:
                return s
        return None

    def instance_heartbeat(self, msg: pb.StateReport) -> bool:
        s = self.session(msg.session)
        if s is None:
            return False
        s.last_seen = time.monotonic()
        before = s.report
        s.report = state_from_report(msg, s.instance_id, s.backend, s.capabilities)
        if before is None or (before.models_loaded, before.models_warm, before.healthy) != (
            s.report.models_loaded,
            s.report.models_warm,
            s.report.healthy,
        ):
            self._fleet_changed()
            if self.queue_manager is not None and s.instance_id in self.queue_manager.fleet.instances:
                self.queue_manager.refresh(s.instance_id)  # a swap, or its engine went down or came back
        return True

    def instance_credit(self, s: Session, free_slots: int, received: int) -> None:
        s.last_seen = time.monotonic()
        if not s.endpoint:  # an engine served over HTTP gets its work there: forward counts it
            s.received = received
        free = free_slots - s.in_transit()
        if free > 0 and self.has_queue_manager:
            self.hook.qlm_instance_ready(instance_id=s.instance_id, free_slots=free, now=time.time())

    def instance_pull_opened(self, s: Session) -> None:
        s.pull_open = True
        if self.parked:
            self._unpark()

    def instance_lost(self, s: Session, reason: str) -> None:
        """Drain an instance: its unfinished requests go back to the queue, to finish elsewhere."""
        if self.fleet.sessions.get(s.instance_id) is not s:
            return
        s.close()
        del self.fleet.sessions[s.instance_id]
        log.warning(
            "instance %s lost (%s): %d requests back to the queue", s.instance_id, reason, len(s.assigned)
        )
        jobs = [self.jobs[r] for r in list(s.assigned) if r in self.jobs]
        self.hook.qlm_instance_left(instance_id=s.instance_id, now=time.time())
        self.telemetry.instance_event(s.instance_id, "lost")
        for job in jobs:
            if job.state == "dispatched":
                job.instance = None  # the lost session no longer owns it
                self._requeue(job, f"instance {s.instance_id} lost: {reason}")

    def instance_events(self, s: Session, batch: pb.EventBatch) -> None:
        """Apply an instance's report. Events for an attempt the coordinator no longer counts
        (the request was re-served or cancelled) are dropped and the instance told to abort it."""
        s.last_seen = time.monotonic()
        now = time.time()
        for ev in batch.events:
            job = self.jobs.get(ev.request_id)
            if (
                job is None
                or job.state != "dispatched"
                or job.instance != s.instance_id
                or job.attempt != ev.attempt
            ):
                stale = job is None or job.state in TERMINAL or job.attempt != ev.attempt
                if (
                    stale
                    and ev.kind not in (Event.FINISHED, Event.FAILED)
                    and ev.request_id not in s.pending_aborts
                ):
                    s.pending_aborts.add(ev.request_id)  # the engine still works on it for nothing
                    self.fleet.command(s, "abort", ev.request_id, attempt=ev.attempt)
                continue
            if ev.kind == Event.TOKENS:
                if ev.index + ev.tokens <= job.tokens:
                    continue  # resent
                if ev.index != job.tokens:
                    log.warning(
                        "request %s: tokens at %d, expected %d; chunk dropped", job.id, ev.index, job.tokens
                    )
                    continue
                job.chunks.append(ev.text)
                job.tokens += ev.tokens
                if job.first_token_at is None:
                    job.first_token_at = now
                    self.telemetry.request_event(job.id, "qlm.first_token", time=now)
                self._publish(job, Chunk(ev.text, ev.index, ev.tokens))
            elif ev.kind == Event.FINISHED:
                # an engine that reports evictions one by one (EVICTED) and one that totals them at
                # the end: both counted once
                job.preemptions = max(job.preemptions, ev.preemptions)
                job.wasted_tokens = max(job.wasted_tokens, ev.wasted_tokens)
                self._finish(job, "finished", ev.finish_reason or "length")
            elif ev.kind == Event.EVICTED:
                job.preemptions += 1
                job.wasted_tokens += ev.wasted_tokens
                self.telemetry.request_event(job.id, "qlm.evicted", {"qlm.wasted_tokens": ev.wasted_tokens})
            elif ev.kind == Event.SWAPPED_IN:
                self.telemetry.request_event(job.id, "qlm.swapped_in")
            elif ev.kind == Event.FAILED:
                self._requeue(job, f"instance {s.instance_id} failed it: {ev.error}")
            elif ev.kind == Event.REQUEUED:
                job.preemptions += 1  # evicted by abort: its work there is lost
                self._requeue(job, f"instance {s.instance_id} gave it back: {ev.error}", failure=False)

    def instance_ack(self, s: Session, ack: pb.CommandAck) -> None:
        pending = s.pending.pop(ack.command_id, None)
        if pending is None:
            return
        attrs: dict[str, Any] = {}
        if ack.wasted_tokens:
            attrs["qlm.wasted_tokens"] = ack.wasted_tokens
        if ack.transfer_s:
            attrs["qlm.transfer_s"] = ack.transfer_s
        self.telemetry.lso_finished(ack.command_id, ok=ack.ok, error=ack.error, attributes=attrs)
        if not ack.ok and pending.op != "abort":
            log.warning("instance %s: %s failed: %s", s.instance_id, pending.op, ack.error)
            self.hook.qlm_operation_failed(
                instance_id=s.instance_id,
                operation=pending.op,
                model=pending.model,
                request_id=pending.request_id,
                error=ack.error,
                now=time.time(),
            )

    def _on_command(self, s: Session, cid: str, cmd: pb.Command, pending: PendingCommand) -> None:
        self.telemetry.lso_started(
            cid, op=pending.op, instance_id=s.instance_id, request_id=pending.request_id, model=pending.model
        )

    def _on_replan(self, duration_s: float, plan: Plan | None, now: float) -> None:
        if plan is None:
            return
        self.telemetry.replan(
            duration_s=duration_s,
            solver=plan.solver,
            groups=sum(len(g) for g in plan.groups.values()),
            actions=len(plan.actions),
            start_time=now - duration_s,
        )

    # ------------------------------------------------------------------ admin
    def instance_states(self) -> list[tuple[Session, InstanceState | None]]:
        return [
            (s, self.fleet.qlm_instance_state(s.instance_id, True))
            for s in self.fleet.sessions.values()
            if s.alive
        ]


def status_message(job: Job) -> pb.RequestStatus:
    ttft = (job.first_token_at - job.request.arrival_time) * 1000 if job.first_token_at is not None else 0.0
    e2e = (job.finished_at - job.request.arrival_time) * 1000 if job.finished_at is not None else 0.0
    return pb.RequestStatus(
        request_id=job.id,
        state=job.state,
        instance_id=job.instance or "",
        attempt=job.attempt,
        output_tokens=job.tokens,
        output=job.text,
        ttft_ms=ttft,
        e2e_ms=e2e,
        slo_met=job.outcome().met_slo(),
        late=job.late,
        finish_reason=job.finish_reason,
        error=job.error,
    )
