"""The coordinator: the policy plugins and the parts of the central service, on one asyncio event
loop.

Its parts, each importing only those below it: the jobs and their journal (:mod:`.jobs`), the
instances' sessions and the backend hooks over them (:mod:`.instances`), forwarding to engines that
serve HTTP (:mod:`.forward`), dispatch (:mod:`.dispatch`), the instance registry
(:mod:`.registry`); the front ends (:mod:`.http_api`, :mod:`.grpc_api`) sit on top of this module.
The front ends call :meth:`Coordinator.submit`, :meth:`~Coordinator.cancel` and
:meth:`~Coordinator.follow`; the instance service calls the registry and the dispatcher. Not
thread-safe: one event loop owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pluggy

from qlm_plugin.brain.queue_manager import QueueManager
from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.dispatch import Dispatcher
from qlm_plugin.coordinator.instances import PendingCommand, RemoteFleet, Session
from qlm_plugin.coordinator.jobs import (
    CALLER_GONE,
    CHOICE_REFUSED,
    NOT_KEPT,
    STREAMED,
    UNAVAILABLE_RETRY_AFTER_S,
    Chunk,
    Job,
    JobBook,
    JobsView,
    SubmitError,
    askable_later,
    check_names,
    halt,
)
from qlm_plugin.coordinator.journal import TERMINAL, Journal, JournalError
from qlm_plugin.coordinator.openai_params import show
from qlm_plugin.coordinator.prompt_tokens import PromptCounter
from qlm_plugin.coordinator.registry import InstanceRegistry
from qlm_plugin.domain.distributions import WaitEstimate
from qlm_plugin.domain.instance import InstanceInfo
from qlm_plugin.domain.outcome import Admission, RequestOutcome, Status
from qlm_plugin.domain.plan import Plan
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl
from qlm_plugin.hooks.hookspecs import TICK_S
from qlm_plugin.hooks.manager import POLICY_PREFIX
from qlm_plugin.policies.registry import PolicyContext, policy_registry
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.telemetry.instruments import Telemetry
from qlm_plugin.transport.openai_client import FEATURES, needs
from qlm_plugin.workloads.scenario import Scenario

log = logging.getLogger("qlm_plugin.coordinator")

#: A request with an idempotency key whose caller left is cancelled only if no retry with the key
#: came for it this long (seconds): the client that timed out is usually about to retry.
ABANDON_GRACE_S = 30.0
#: Idempotency keys the coordinator gives its own requests (batch lines); refused from clients.
RESERVED_KEY_PREFIX = "qlm-batch/"
#: The model (and class) label of a refusal naming one the deployment lacks: clients cannot
#: create metric series.
UNKNOWN_LABEL = "unknown"


#: What a request asks the engine for (``RequestSpec.operation``; empty: a text completion).
OPERATIONS = ("text_completion", "chat")


def _differs(earlier: pb.RequestSpec, spec: pb.RequestSpec) -> str | None:
    """What makes ``spec`` another request than ``earlier``, submitted under the same idempotency
    key (None: the same request, sent again): what the engine is asked to do. (Not the SLO or the
    tenant's own bookkeeping; ``max_tokens`` only where both name one: it is filled in on accept.)"""
    if spec.model != earlier.model:
        return "model"
    if (spec.operation or "text_completion") != (earlier.operation or "text_completion"):
        return "endpoint"
    if spec.prompt != earlier.prompt or spec.chat_messages != earlier.chat_messages:
        return "prompt" if spec.operation != "chat" else "messages"
    if list(spec.prompt_token_ids) != list(earlier.prompt_token_ids):
        return "prompt"
    if dict(spec.sampling) != dict(earlier.sampling):
        return "sampling"
    if spec.max_tokens and earlier.max_tokens and spec.max_tokens != earlier.max_tokens:
        return "max_tokens"
    if spec.prompt_only != earlier.prompt_only:
        return "max_tokens"
    if max(1, spec.choices) != max(1, earlier.choices):
        return "n"
    if bool(spec.response_echo) != bool(earlier.response_echo):  # only a response keeps one
        return "endpoint (a response and a chat completion)"
    if spec.response_echo != earlier.response_echo:  # a response's own fields: store, metadata...
        mine, kept = (json.loads(echo) for echo in (spec.response_echo, earlier.response_echo))
        # streamed or not: how the answer is sent, as for a chat (a stream retried whole is fine)
        keys = [k for k in mine.keys() | kept.keys() if mine.get(k) != kept.get(k) and k != STREAMED]
        if keys:
            key = min(keys)
            return "input" if key == "input_from" else key
    return None


class _Watch:
    """The coordinator's own hooks: readiness follows the fleet, failed requests are logged."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    @hookimpl
    def qlm_instance_joined(self, info: InstanceInfo, now: float) -> None:
        self.coord.check_ready()

    @hookimpl
    def qlm_instance_left(self, instance_id: str, now: float) -> None:
        self.coord.check_ready()

    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        if outcome.status is Status.REJECTED:  # a failed request (not its prompt: it is the client's)
            log.warning("request %s failed: %s", outcome.request.id, outcome.reason)


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
        costs = scenario.reference_cost_models()
        classes = scenario.slo_classes()
        self.book = JobBook(cfg, journal, scenario.model_specs(), classes, costs)
        self.book.prompts = PromptCounter({m.name: m.tokenizer for m in scenario.models if m.tokenizer})
        self.pm = pm or get_plugin_manager()
        info = policy_registry(self.pm).get(cfg.policy)
        built = info.factory(PolicyContext(costs, classes, wall_clock=True))
        self.plugins = built if isinstance(built, list) else [built]
        for n, plugin in enumerate(self.plugins):
            self.pm.register(plugin, name=f"{POLICY_PREFIX}{cfg.policy}:{n}")
        self.fleet = RemoteFleet(lambda s, request: self.dispatcher.dispatch(s, request))
        self.fleet.on_command = self._on_command
        self.pm.register(self.fleet, name="remote-fleet")
        self.hook: Any = self.pm.hook
        # A plugin other than the run's policy implements admission (an installed one): the front
        # door asks it where there is an estimate (none: no estimate is made for it). The policy's
        # own admission is the class's refusal threshold, which the front door applies itself.
        self._plugin_admits = any(
            not impl.plugin_name.startswith(POLICY_PREFIX) for impl in self.hook.qlm_admit.get_hookimpls()
        )
        self.hook.qlm_configure(pm=self.pm)
        self.queue_manager = next((p for p in self.plugins if isinstance(p, QueueManager)), None)
        self.telemetry = telemetry or Telemetry()
        self.dispatcher = Dispatcher(
            cfg,
            self.book,
            self.fleet,
            self.hook,
            self.telemetry,
            has_queue_manager=bool(self.hook.qlm_submit.get_hookimpls()),
        )
        self.registry = InstanceRegistry(
            cfg, self.book, self.fleet, self.dispatcher, self.hook, self.telemetry, self.book.models
        )
        self.dispatcher.on_lost = self.registry.lost
        self.telemetry.set_queue_depth(self.book.queue_depth)
        if self.queue_manager is not None:
            self.queue_manager.on_replan = self._on_replan
            self.registry.on_state_changed = self._refresh_policy
        self.fleet.devices.sleep.keep_warm = cfg.device_sleep_level == 1
        self.fleet.devices.max_awake = cfg.device_max_awake
        self.fleet.devices.on_failed = self._device_switch_failed
        self.fleet.devices.on_changed = self._device_changed
        #: called with the new value of :attr:`ready` when it changes (the gRPC health of Requests)
        self.on_ready: Callable[[bool], None] = lambda ready: None
        self._ready = False
        self.pm.register(_Watch(self), name="coordinator-watch")
        self._tasks: list[asyncio.Task[None]] = []
        # a keyed submission in flight: its validation, then its journal write (see _submit)
        self._submitting: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.stop_waiting = False  # a second signal: the drain stops waiting for dispatched requests

    @property
    def jobs(self) -> JobsView:
        """Every job by request id (a finished one: a read-only copy, rebuilt on each access)."""
        return JobsView(self.book)

    @property
    def accepting(self) -> bool:
        return self.book.accepting

    @property
    def ready(self) -> bool:
        """Whether clients are served: work is accepted, an instance is connected and the journal
        keeps what it is given (``/health``)."""
        return self.unready_because() is None

    def unready_because(self) -> tuple[str, str] | None:
        """Why clients are not served now, as ``/health`` says it (its status, and the journal's
        error where it fails), or None."""
        if not self.book.accepting:
            return "draining", ""
        if not self.fleet.qlm_list_instances():
            return "no instances", ""
        failure = self.journal.failure
        return None if failure is None else ("journal failing", failure)

    def check_ready(self) -> None:
        """Tell :attr:`on_ready` when :attr:`ready` changed."""
        ready = self.ready
        if ready != self._ready:
            self._ready = ready
            self.on_ready(ready)

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Rebuild the queue from the journal, then accept work."""
        await asyncio.to_thread(self.book.prompts.load)
        recovered = self.book.recover()
        self.registry.recovered(recovered)
        if recovered:
            log.info("recovered %d unfinished requests from the journal", len(recovered))
        self.book.accepting = True
        self.check_ready()
        self._tasks.append(asyncio.get_running_loop().create_task(self._timer()))

    async def drain(self, timeout_s: float | None = None) -> dict[str, int]:
        """Graceful stop: refuse new work, let dispatched requests finish (up to the timeout), keep
        the rest in the journal for the next start, and flush it."""
        self.book.accepting = False
        self.check_ready()
        self.registry.wake_waiters()  # requests waiting for an instance: a 503 to retry, not a cut
        jobs = self.book.jobs
        deadline = time.monotonic() + (self.cfg.drain_timeout_s if timeout_s is None else timeout_s)
        while (
            time.monotonic() < deadline
            and not self.stop_waiting
            and any(j.state == "dispatched" for j in jobs.values())
        ):
            await asyncio.sleep(0.05)
        # what was streamed of the requests left (a TTFT is journaled only at the end otherwise)
        self.book.keep_progress([j for j in jobs.values() if j.state not in TERMINAL])
        left = {
            "dispatched": sum(j.state == "dispatched" for j in jobs.values()),
            "queued": sum(j.state == "queued" for j in jobs.values()),
        }
        for task in self._tasks:
            task.cancel()
        for s in list(self.fleet.sessions.values()):
            s.close()
        await self.dispatcher.close()
        try:
            await self.journal.flush()
        except JournalError as exc:  # a full disk: what it kept gets its last tries at the close
            log.error("the drain's flush failed: %s", exc)
        self.telemetry.close()
        return left

    def halt_unfinished(self, left: dict[str, int] | None = None) -> int:
        """After a drain: end every unfinished request's followers, each told the coordinator stops
        with it kept (:func:`~qlm_plugin.coordinator.jobs.halt`); how many. A request only an HTTP
        client waits for, which it cannot ask for later (:func:`~qlm_plugin.coordinator.jobs.askable_later`),
        is not kept but cancelled: its client is told to send it again, and the OpenAI SDKs do so at
        once; kept, it was generated twice, once for nobody. ``left`` (the drain's counts) is told
        of those: ``not_kept``."""
        unfinished = [job for job in self.book.jobs.values() if job.state not in TERMINAL]
        now = time.time()
        for job in unfinished:
            if job.waiters and not askable_later(job.spec):
                if left is not None:
                    left[job.state] = left.get(job.state, 0) - 1
                    left["not_kept"] = left.get("not_kept", 0) + 1
                self.book.close(job, "cancelled", "cancelled", NOT_KEPT, now)
            halt(job)
        return len(unfinished)

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # the timer must survive a bad plugin
                log.exception("coordinator tick failed")

    def tick(self) -> None:
        now = time.time()
        self.registry.expire()
        if self.dispatcher.parked and self.fleet.qlm_list_instances():
            self.dispatcher.unpark()
        self.hook.qlm_tick(now=now)
        self.book.forget_finished(now)
        self.check_ready()  # the hooks tell at once; this catches a device's engines coming and going

    # ------------------------------------------------------------------ clients
    async def submit(
        self,
        spec: pb.RequestSpec,
        *,
        tenant: str | None = None,
        parent: Any = None,
        internal: bool = False,
        cancel_if_caller_leaves: str | None = None,
        streams: bool = False,
        wait_s: float | None = None,
    ) -> tuple[Job, bool]:
        """Validate, journal and queue a request. Returns the job and whether it was a duplicate
        (an earlier request with the same idempotency key). Raises :class:`SubmitError`.
        ``internal``: submitted by the coordinator itself (a batch line), which may use the
        reserved idempotency keys. ``cancel_if_caller_leaves``: a caller cancelled while its
        request is being journaled leaves it accepted (the record commits); with a reason here
        it is then cancelled with it (an HTTP client gone: no one to answer), else it is served
        (a gRPC retry with its idempotency key finds it). Every refusal a client gets is counted.
        ``streams`` (a front-door worker's, through its relay): here the followers of a job say
        whether they show its output as it comes (:func:`~.jobs.publish`). ``wait_s``: the most a
        request of a model no live instance serves waits for one (a gRPC call's deadline; None: the
        configured wait), before it is refused ``unavailable``."""
        del streams
        started = time.time()
        try:
            job, duplicate = await self._submit_keyed(
                spec, tenant, parent, internal, cancel_if_caller_leaves, wait_s
            )
        except SubmitError as exc:
            if not internal:  # a batch line is offered again while it waits for room: not counted
                model, slo_class = self._labels(spec)
                self.telemetry.request_rejected(
                    model=model,
                    slo_class=slo_class,
                    reason=exc.code,
                    operation=spec.operation if spec.operation in OPERATIONS else "text_completion",
                    message=f"{exc.field}: {exc}" if exc.field else str(exc),
                    parent=parent,
                    start_time=started,
                )
            raise
        if cancel_if_caller_leaves is not None and job.state not in TERMINAL:
            job.waiters += 1  # it cancels the request if it leaves (see cancel)
            job.abandoned_at = None
        return job, duplicate

    def _labels(self, spec: pb.RequestSpec) -> tuple[str, str]:
        """The (model, class) labels of a refused request: only names the deployment has."""
        book = self.book
        model = spec.model if spec.model in book.models else UNKNOWN_LABEL
        try:
            name = spec.slo.slo_class or book.tier_class(spec.service_tier) or book.default_class
        except SubmitError:  # an unknown service tier
            name = book.default_class
        return model, name if name in book.classes else UNKNOWN_LABEL

    async def _submit_keyed(
        self,
        spec: pb.RequestSpec,
        tenant: str | None,
        parent: Any,
        internal: bool,
        cancel_if_caller_leaves: str | None,
        wait_s: float | None = None,
    ) -> tuple[Job, bool]:
        book = self.book
        if tenant is not None:
            spec.tenant = tenant
        check_names(spec)  # (with the tenant it is kept under: a request id is, scoped_id)
        if spec.operation and spec.operation not in OPERATIONS:  # a span's name and a metric's label
            raise SubmitError(
                "invalid", f"must be one of {', '.join(OPERATIONS)}, got {show(spec.operation)}", "operation"
            )
        if spec.idempotency_key.startswith(RESERVED_KEY_PREFIX) and not internal:
            reserved = f"idempotency keys starting {RESERVED_KEY_PREFIX!r} are reserved"
            raise SubmitError("invalid", reserved, "idempotency_key")
        spec.tenant = spec.tenant or "default"
        if not book.accepting:
            # a retry of a request already accepted gets its answer (a client retrying the 503 of
            # a drain found its request finished, and got another 503)
            earlier = book.duplicate(spec)
            if earlier is not None and not _differs(earlier.spec, spec):
                return earlier, True
            raise SubmitError(  # a retry goes to the next start, or to another coordinator
                "unavailable",
                "the coordinator is not accepting requests (starting or draining)",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            )
        if not spec.idempotency_key:
            return await self._submit(spec, parent, cancel_if_caller_leaves, wait_s)
        # Submissions with one key run one after the other: a second arriving while the first is
        # being journaled finds it (a duplicate), instead of failing on the journal's unique key.
        key = (spec.tenant, spec.idempotency_key)
        while (earlier_submission := self._submitting.get(key)) is not None and not earlier_submission.done():
            await asyncio.shield(earlier_submission)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submitting[key] = done
        try:
            return await self._submit(spec, parent, cancel_if_caller_leaves, wait_s)
        finally:
            if self._submitting.get(key) is done:  # else its journal write holds the key (_submit)
                del self._submitting[key]
            done.set_result(None)

    async def _submit(
        self,
        spec: pb.RequestSpec,
        parent: Any,
        cancel_if_caller_leaves: str | None,
        wait_s: float | None = None,
    ) -> tuple[Job, bool]:
        book = self.book
        earlier = book.duplicate(spec)
        if earlier is not None:
            differs = _differs(earlier.spec, spec)
            if differs:
                raise SubmitError(
                    "idempotency_conflict",
                    f"this idempotency key was used for a request with another {differs}: its answer "
                    "is that request's; use a new key for a new request",
                    "idempotency_key",
                )
            return earlier, True
        book.claim_id(spec)
        if not spec.operation:
            spec.operation = "text_completion"
        if not spec.prompt_tokens and not spec.prompt_token_ids and book.prompts.long(spec):
            spec.prompt_tokens = await book.prompts.count_off_loop(spec)  # seconds: not on the loop
        now = time.time()
        request = book.build_request(spec, now)
        spec.prompt_tokens = request.prompt_tokens
        if spec.max_tokens or spec.operation != "chat":  # a chat naming none keeps 0: the engine's own limit
            spec.max_tokens = request.max_tokens
        book.check_feasible(request)
        book.check_limits(  # room for the rest of its choices
            request, max(1, spec.choices - spec.choice), defaulted=not spec.max_tokens
        )
        if not self.dispatcher.served(request.model):
            book.count(request, +1)  # held while it waits: concurrent ones must not pass
            try:
                await self.registry.await_instance(request, wait_s)
            except SubmitError as exc:
                await book.record_refusal(spec, request, now, str(exc))
                raise
            finally:
                book.count(request, -1)
            now = time.time()
        for capability, param in needs(spec.sampling):
            lacking = self.dispatcher.lacking(request.model, capability)
            if lacking:
                names = ", ".join(sorted(s.instance_id for s in lacking))
                backends = ", ".join(sorted({s.backend for s in lacking}))
                raise SubmitError(
                    "invalid",
                    f"the instances serving {request.model!r} ({names}; backend {backends}) cannot serve "
                    f"{FEATURES[capability]}: only engines that declare {capability!r} (vLLM) can",
                    param,
                )
        # Refused here, before the journal, when the client asked (reject_if_late) or its class
        # refuses below a probability of meeting the SLO: once accepted, a request is served.
        cls = self.book.classes.get(request.slo_class)  # the classes the request was resolved in
        threshold = max(
            self.cfg.reject_below_p_meet if spec.reject_if_late else 0.0,
            cls.refuse_below_p_meet if cls is not None else 0.0,
        )
        told = self._told(request, now) if threshold > 0 or self._plugin_admits else None
        estimate = None
        if told is not None:
            estimate = Admission(
                request.id,
                True,
                told.p_meet >= self.cfg.reject_below_p_meet,
                None,
                told.wait_mean_s,
                told.p_meet,
            )
            # an installed plugin's admission decides here, before the journal (the queue manager
            # asks it too, but only to flag: once accepted, a request is served)
            verdict = (
                self.hook.qlm_admit(request=request, estimate=told, now=now) if self._plugin_admits else None
            )
            if verdict is not None and not verdict.accepted:
                raise SubmitError(
                    "slo_unattainable",
                    f"refused at admission: {verdict.reason or 'no reason given'}",
                    estimate=estimate,
                    retry_after_s=max(1.0, told.wait_mean_s),
                )
        if estimate is not None and (estimate.p_meet or 0.0) < threshold:
            wait = estimate.wait_mean_s if estimate.wait_mean_s is not None else math.inf
            raise SubmitError(
                "slo_unattainable",
                f"the SLO cannot be met at the current load: estimated wait "
                f"{wait:.2f} s, probability of meeting it {estimate.p_meet or 0:.2f} "
                f"(refused below {threshold:.2f})",
                estimate=estimate,
                retry_after_s=60.0 if not math.isfinite(wait) else max(1.0, wait),
            )
        job = Job(request, spec)
        # Journaled with its arrival: a restart rebuilds its deadlines from it, so a wait for an
        # instance before it was accepted must not move them.
        committed = book.journal_new(job, request.arrival_time)
        try:
            await asyncio.shield(committed)  # a future, not a task: nothing more per request
        except asyncio.CancelledError:
            if committed.cancelled():  # the journal closed first: hold() refuses it below
                self._accepted(job, parent, committed)
            # The caller went away (a client gone, a deadline) during the write: a record that
            # commits is an accepted request, so it is held and admitted all the same, once, and a
            # retry with its key waits for that and finds it.
            held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if spec.idempotency_key:
                key = (spec.tenant, spec.idempotency_key)
                self._submitting[key] = held
                held.add_done_callback(lambda _: self._release(key, held))
            committed.add_done_callback(
                lambda _: self._accepted_late(job, parent, committed, held, cancel_if_caller_leaves)
            )
            raise
        except Exception:  # the journal refused the record: hold() below uncounts it and says why
            pass
        self._accepted(job, parent, committed)
        return job, False

    def _accepted(self, job: Job, parent: Any, committed: asyncio.Future[None]) -> None:
        self.book.hold(job, committed)  # raises SubmitError if the journal refused the record
        self.dispatcher.trace(job, parent)
        self.dispatcher.admit(job, time.time())

    def _accepted_late(
        self,
        job: Job,
        parent: Any,
        committed: asyncio.Future[None],
        held: asyncio.Future[None],
        cancel_reason: str | None,
    ) -> None:
        with contextlib.suppress(SubmitError):  # refused: nobody to tell, nothing held
            self._accepted(job, parent, committed)
            if cancel_reason is not None and self.book.accepting:  # draining: kept for the next start
                self._caller_left(job, cancel_reason)  # it never had the answer: no waiter to count
        held.set_result(None)

    def _release(self, key: tuple[str, str], holder: Awaitable[Any]) -> None:
        if self._submitting.get(key) is holder:
            del self._submitting[key]

    def _told(self, request: Request, now: float) -> WaitEstimate | None:
        """The waiting-time estimate a client is told (calibrated against outcomes under a queue
        manager); None with no instance state to estimate on."""
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
        est: WaitEstimate | None = self.hook.qlm_estimate_wait(request=request, now=now)
        if est is not None and self.queue_manager is not None:
            est = self.queue_manager.estimator.told(request, est, now)
        return est

    def lookup(self, request_id: str) -> Job | None:
        return self.book.lookup(request_id)

    def cancel(self, request_id: str, reason: str = "cancelled by the client") -> Job | None:
        """Cancel a request. A caller that left (``reason`` in :data:`CALLER_GONE`) cancels it only
        if no other caller waits for it, and one with an idempotency key only once none has come
        back for it within :data:`ABANDON_GRACE_S`: its retry finds it and gets the whole answer."""
        if reason in CALLER_GONE:
            job = self.book.jobs.get(request_id)
            if job is not None and job.state not in TERMINAL:
                job.waiters = max(0, job.waiters - 1)
                self._caller_left(job, reason)
                return job
        if reason == CHOICE_REFUSED and (job := self.book.jobs.get(request_id)) is not None:
            self.book.release_key(job)  # first: its record must not keep the key when it ends
        return self.dispatcher.cancel(request_id, reason)

    def _caller_left(self, job: Job, reason: str) -> None:
        if job.waiters > 0:
            return  # another client waits for it (its idempotency key's retry, or a second client)
        if not job.spec.idempotency_key:
            self.dispatcher.cancel(job.id, reason)
            return
        job.abandoned_at = left = time.monotonic()

        def unless_claimed() -> None:
            unclaimed = job.waiters == 0 and job.abandoned_at == left and job.state not in TERMINAL
            if unclaimed and self.book.accepting:  # draining: kept for the next start
                self.dispatcher.cancel(job.id, f"{reason}, and no retry came in {ABANDON_GRACE_S:g} s")

        asyncio.get_running_loop().call_later(ABANDON_GRACE_S, unless_claimed)

    def follow(self, job: Job) -> AsyncIterator[Chunk]:
        return self.book.follow(job)

    # ------------------------------------------------------------------ policy and telemetry
    def _refresh_policy(self, instance_id: str) -> None:
        qm = self.queue_manager
        if qm is not None and instance_id in qm.fleet.instances:
            qm.refresh(instance_id)

    def _device_switch_failed(self, device: str, model: str, error: str) -> None:
        self.hook.qlm_operation_failed(
            instance_id=device,
            operation="load_model",
            model=model,
            request_id=None,
            error=error,
            now=time.time(),
        )

    def _device_changed(self, slot: str) -> None:
        self.registry.fleet_changed()
        self.registry.on_state_changed(slot)
        # not from inside the switch's own steps: a parked request may start the next switch
        loop = asyncio.get_running_loop()
        loop.call_soon(self.dispatcher.unpark)
        loop.call_soon(self._pull_slot, slot)

    def _pull_slot(self, slot: str) -> None:
        """A device slot serves a model now: the queue manager hands it work at once (its woken
        engine's first credit, or the next tick, would come a round trip or a tick later)."""
        if not self.dispatcher.has_queue_manager:
            return
        st = self.fleet.qlm_instance_state(slot, False)
        if st is None or not st.models_loaded or st.loading_model is not None or not st.healthy:
            return
        free = st.max_num_seqs - st.num_running - st.num_waiting
        if free > 0:
            self.hook.qlm_instance_ready(instance_id=slot, free_slots=free, now=time.time())

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
