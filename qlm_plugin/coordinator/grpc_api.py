"""The gRPC services (``qlm.v1.Requests``, ``Instances``, ``Admin``) over a :class:`Coordinator`,
and the interceptor that checks each call's bearer token against the scope its service needs."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate

from qlm_plugin.coordinator import journal as journal_module
from qlm_plugin.coordinator.auth import Authenticator, AuthError, Principal
from qlm_plugin.coordinator.choices import MAX_CHOICES
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.instances import Session
from qlm_plugin.coordinator.jobs import (
    DEFAULT_MAX_TOKENS,
    Job,
    SubmitError,
    scoped_id,
    shown_id,
    status_message,
)
from qlm_plugin.coordinator.journal import JournalError
from qlm_plugin.coordinator.json_codec import dumps
from qlm_plugin.coordinator.openai_params import INT32_MAX, BadRequest, chat_prompt, sampling_map
from qlm_plugin.coordinator.registry import InstanceTaken
from qlm_plugin.domain.instance import EvictMode
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc

log = logging.getLogger("qlm_plugin.coordinator.grpc")

#: The scope each service needs; services not listed (health, reflection) need none.
SERVICE_SCOPE = {"qlm.v1.Requests": "client", "qlm.v1.Instances": "instance", "qlm.v1.Admin": "admin"}

#: The most assignments one message of the pull stream carries, serialized (one assignment alone
#: may be larger: it goes by itself).
MAX_BATCH_BYTES = 1024 * 1024

#: Admin ``GetQueue`` rows when the query names no limit.
DEFAULT_QUEUE_ROWS = 1000
#: Admin ``Evict`` modes ("": the engine's best, swap where it can).
EVICT_MODES = ("", *(m.value for m in EvictMode))

#: The most requests one ``SubmitBatch`` call may carry (300,000 held the event loop for 8 s).
MAX_BATCH_REQUESTS = 10_000
SUBMIT_STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_model": grpc.StatusCode.NOT_FOUND,
    "limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "slo_unattainable": grpc.StatusCode.FAILED_PRECONDITION,
    "idempotency_conflict": grpc.StatusCode.INVALID_ARGUMENT,
    "internal": grpc.StatusCode.INTERNAL,
}


def scope_of(method: str) -> str | None:
    service = method.lstrip("/").split("/", 1)[0]
    return SERVICE_SCOPE.get(service)


def _chat_as_the_door_takes_it(spec: pb.RequestSpec) -> None:
    """A chat's messages checked and its ``prompt`` rendered from them, as the HTTP front door
    does: a client's own ``prompt`` ("hi" beside 400 KB of messages, which the engine is sent)
    would be what is counted against the context and its tenant's limits."""
    if spec.operation != "chat":
        raise SubmitError("invalid", "chat messages are for operation 'chat'", "chat_messages")
    try:
        spec.prompt, messages = chat_prompt(json.loads(spec.chat_messages))
    except ValueError as exc:
        raise SubmitError("invalid", f"not a JSON list of messages: {exc}", "chat_messages") from None
    except BadRequest as exc:
        where = (exc.param or "messages").replace("messages", "chat_messages", 1)
        raise SubmitError("invalid", str(exc), where) from None
    spec.chat_messages = dumps(messages).decode()


def _as_the_door_checks_it(spec: pb.RequestSpec) -> None:
    """What the HTTP front door checks, or sets itself, for a gRPC client's request: a prompt, token
    ids in range, the sampling map (forwarded to the engine: a key such as ``model`` or
    ``max_tokens`` went over what the coordinator built and counted; a value that is not JSON
    failed on the instance, the request dispatched for ever), and the fields only the door sets."""
    spec.from_http = False  # (a restart after a crash does not serve such a request again)
    if not spec.model:
        raise SubmitError("invalid", "must be a non-empty string", "model")
    if spec.chat_messages:
        if spec.prompt_token_ids:
            raise SubmitError(
                "invalid", "a chat's prompt is its messages (chat_messages)", "prompt_token_ids"
            )
        _chat_as_the_door_takes_it(spec)
    elif not spec.prompt and not spec.prompt_token_ids:
        raise SubmitError("invalid", "must be a non-empty string (or give prompt_token_ids)", "prompt")
    if any(t < 0 for t in spec.prompt_token_ids):
        raise SubmitError("invalid", f"must be integers in [0, {INT32_MAX}]", "prompt_token_ids")
    if spec.true_output_tokens < 0:
        raise SubmitError(
            "invalid", f"must be 0 (not given) or more, got {spec.true_output_tokens}", "true_output_tokens"
        )
    if spec.response_echo:
        try:
            echo = json.loads(spec.response_echo)
        except ValueError:
            echo = None
        if not isinstance(echo, dict):
            raise SubmitError("invalid", "must be a JSON object (a Responses API request's)", "response_echo")
    if (spec.choices or spec.choice) and not (
        1 <= spec.choices <= MAX_CHOICES and 0 <= spec.choice < spec.choices
    ):
        raise SubmitError(
            "invalid",
            f"choices must be in [1, {MAX_CHOICES}] and choice in [0, choices), got choices "
            f"{spec.choices}, choice {spec.choice}",
            "choices",
        )
    chat = spec.operation == "chat"
    try:
        if spec.sampling:
            checked = sampling_map(
                spec.sampling,
                chat=chat,
                max_tokens=spec.max_tokens or (INT32_MAX if chat else DEFAULT_MAX_TOKENS),
            )
            spec.sampling.clear()
            spec.sampling.update(checked)
    except BadRequest as exc:
        raise SubmitError("invalid", str(exc), exc.param) from None
    if spec.prompt_only:  # scoring a prompt: the engine makes one token, left out of the answer
        if chat or "echo" not in spec.sampling:
            raise SubmitError(
                "invalid", "scores a completion's prompt: needs sampling echo true", "prompt_only"
            )
        spec.max_tokens = 1


#: Seconds before a call's deadline that a wait for an instance gives up, to answer in time.
DEADLINE_MARGIN_S = 0.5


def _time_left(context: Any) -> float | None:
    """How long the call may still wait for a model's instance to come (its deadline, less the
    time to answer); None without a deadline. With the client's default deadline (10 s) and the
    wait's (60 s), a client got DEADLINE_EXCEEDED where UNAVAILABLE says what happened."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left - DEADLINE_MARGIN_S)


def _trace_parent(md: dict[str, str]) -> Any:
    """The caller's trace context (W3C ``traceparent`` in the call's metadata ``md``), as the HTTP
    front door takes it from the headers: the request's span joins the caller's trace."""
    return propagate.extract(md) if "traceparent" in md else None


def _or_zero(deadline: float) -> float:
    """A deadline as the protocol carries it: 0 for none."""
    return deadline if math.isfinite(deadline) else 0.0


def _metadata(context: Any) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call without a token for its service's scope: UNAUTHENTICATED for a missing or
    unknown token, PERMISSION_DENIED for a token of another scope."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        scope = scope_of(details.method)
        if scope is None or handler is None or not self.auth.enabled:
            return handler
        md = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:
            self.auth.authenticate(md.get("authorization"), scope)
        except AuthError as exc:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if exc.status == "unauthenticated"
                else grpc.StatusCode.PERMISSION_DENIED
            )
            return _refusal(handler, code, str(exc))
        return handler


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def unary(request: Any, context: Any) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class RequestsService(pb_grpc.RequestsServicer):
    def __init__(self, coord: Coordinator, auth: Authenticator) -> None:
        self.coord = coord
        self.auth = auth

    def _principal(self, context: Any, md: dict[str, str] | None = None) -> Principal:
        md = _metadata(context) if md is None else md
        return self.auth.authenticate(md.get("authorization"), "client")

    async def _job(self, request_id: str, context: Any) -> Job:
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
        tenant = self._principal(context).tenant
        # (by the id as it is too: one a client chose before ids were kept under their tenant's)
        job = self.coord.lookup(scoped_id(tenant, request_id)) or self.coord.lookup(request_id)
        if job is None or (tenant is not None and job.request.tenant != tenant):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request_id!r}")
        assert job is not None
        return job

    async def _submit(
        self, spec: pb.RequestSpec, tenant: str | None, parent: Any = None, wait_s: float | None = None
    ) -> pb.SubmitReply:
        """One request of a call: its reply (a refusal, or anything unexpected, is its reply alone:
        one spec of a SubmitBatch that raised failed the whole call, after the others were accepted)."""
        try:
            if spec.request_id:
                if "/" in spec.request_id:
                    raise SubmitError(
                        "invalid",
                        "must not contain '/' (a tenant's ids are kept under its name)",
                        "request_id",
                    )
                spec.request_id = scoped_id(tenant, spec.request_id)
            _as_the_door_checks_it(spec)
            job, duplicate = await self.coord.submit(spec, tenant=tenant, parent=parent, wait_s=wait_s)
        except SubmitError as exc:
            reply = pb.SubmitReply(
                accepted=False, can_meet_slo=False, reason=str(exc), code=exc.code, field=exc.field or ""
            )
            if exc.estimate is not None:
                reply.estimated_wait_ms = (exc.estimate.wait_mean_s or 0.0) * 1000
                reply.p_meet = exc.estimate.p_meet or 0.0
            if exc.retry_after_s is not None:
                reply.retry_after_s = exc.retry_after_s
            return reply
        except Exception as exc:  # a bug: this request's answer, not the call's (nor the others')
            log.exception("submit of %r failed", spec.request_id or spec.idempotency_key or "a request")
            return pb.SubmitReply(
                accepted=False,
                can_meet_slo=False,
                reason=f"internal error: {type(exc).__name__}",
                code="internal",
            )
        adm = job.admission
        reply = pb.SubmitReply(
            request_id=shown_id(tenant, job.id),
            accepted=True,
            can_meet_slo=True,
            p_meet=1.0,
            duplicate=duplicate,
        )
        if adm is not None:
            reply.can_meet_slo = adm.can_meet_slo
            reply.estimated_wait_ms = (adm.wait_mean_s or 0.0) * 1000
            reply.p_meet = adm.p_meet if adm.p_meet is not None else 1.0
            reply.instance_id = adm.instance_id or ""
            reply.reason = adm.reason
        return reply

    async def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitReply:
        md = _metadata(context)  # once: the hot path of a unary Submit
        reply = await self._submit(
            request.request, self._principal(context, md).tenant, _trace_parent(md), _time_left(context)
        )
        # A malformed or refused request is an error status; one the estimate says would be late
        # (reject_if_late) is an answer with the estimate. An SLO no instance could meet even idle
        # (it names its field) is the request's own fault, as the HTTP front door's 400.
        if not reply.accepted and (reply.code != "slo_unattainable" or reply.field):
            message = f"{reply.field}: {reply.reason}" if reply.field else reply.reason
            unmeetable = reply.code == "slo_unattainable"
            status = grpc.StatusCode.INVALID_ARGUMENT if unmeetable else SUBMIT_STATUS[reply.code]
            # the HTTP door's Retry-After, as trailing metadata (seconds, as that header)
            hint = (
                (("retry-after", str(max(1, math.ceil(reply.retry_after_s)))),) if reply.retry_after_s else ()
            )
            await context.abort(status, message, trailing_metadata=hint)
        return reply

    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Any) -> pb.SubmitBatchReply:
        md = _metadata(context)
        tenant = self._principal(context, md).tenant
        if len(request.requests) > MAX_BATCH_REQUESTS:  # one call must not hold the loop for seconds
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests: {len(request.requests)} in one call, at most {MAX_BATCH_REQUESTS}: split them",
            )
        # Concurrently, so the journal commits the whole batch at once.
        parent, left = _trace_parent(md), _time_left(context)
        replies = await asyncio.gather(
            *(self._submit(spec, tenant, parent, left) for spec in request.requests)
        )
        return pb.SubmitBatchReply(replies=replies)

    async def Status(self, request: pb.RequestRef, context: Any) -> pb.RequestStatus:
        status = status_message(await self._job(request.request_id, context))
        status.request_id = shown_id(self._principal(context).tenant, status.request_id)
        return status

    async def Cancel(self, request: pb.RequestRef, context: Any) -> pb.CancelReply:
        job = await self._job(request.request_id, context)
        before = job.state
        self.coord.cancel(job.id)
        try:
            await self.coord.journal.flush()  # told cancelled only once no restart can serve it
        except JournalError as exc:  # not known to stay cancelled: the client retries
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the cancellation was not recorded: {exc}")
        return pb.CancelReply(cancelled=before not in ("finished", "cancelled", "failed"), state=job.state)

    async def Stream(self, request: pb.RequestRef, context: Any) -> AsyncIterator[pb.OutputChunk]:
        job = await self._job(request.request_id, context)
        async for chunk in self.coord.follow(job):
            yield pb.OutputChunk(
                text=chunk.text,
                index=chunk.index,
                tokens=chunk.tokens,
                finished=chunk.finished,
                finish_reason=chunk.finish_reason,
                tool_calls=dumps(chunk.tool_calls).decode() if chunk.tool_calls else "",
                logprobs=dumps(chunk.logprobs).decode() if chunk.logprobs else "",
                prompt_logprobs=dumps(job.prompt_logprobs).decode()
                if chunk.index == 0 and job.prompt_logprobs is not None
                else "",
            )
        if job.halted:  # not its end: the coordinator stops with it kept for its next start
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{job.halted_because}; request {request.request_id} is kept and served after the "
                "coordinator restarts",
            )


class InstancesService(pb_grpc.InstancesServicer):
    """An instance token may be bound to instance ids: it registers only those, and every later
    call of a session must come with a token allowed for the session's instance (a session id that
    leaked does not let another instance's token report for it)."""

    def __init__(self, coord: Coordinator, auth: Authenticator) -> None:
        self.coord = coord
        self.auth = auth

    async def _check(self, context: Any, instance_id: str) -> None:
        principal = self.auth.authenticate(_metadata(context).get("authorization"), "instance")
        try:
            principal.check_instance(instance_id)
        except AuthError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    async def _session(self, context: Any, session_id: str) -> Session | None:
        s = self.coord.registry.session(session_id)
        if s is not None:
            await self._check(context, s.instance_id)
        return s

    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterReply:
        if not request.instance_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance_id: must be a non-empty string")
        await self._check(context, request.instance_id)
        if not self.coord.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is draining")
        try:
            s, keep, abandon = self.coord.registry.register(request)
        except InstanceTaken as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
            raise  # pragma: no cover - abort raises
        cfg = self.coord.cfg
        return pb.RegisterReply(
            session=s.id,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            keep=keep,
            abandon=abandon,
        )

    async def Heartbeat(self, request: pb.StateReport, context: Any) -> pb.HeartbeatReply:
        await self._session(context, request.session)
        return pb.HeartbeatReply(known=self.coord.registry.heartbeat(request))

    async def Pull(
        self, request_iterator: AsyncIterator[pb.PullCredit], context: Any
    ) -> AsyncIterator[pb.Assignment]:
        async for batch in self._assignments(request_iterator, context):
            for a in batch:
                yield a

    async def PullBatches(
        self, request_iterator: AsyncIterator[pb.PullCredit], context: Any
    ) -> AsyncIterator[pb.AssignmentBatch]:
        async for batch in self._assignments(request_iterator, context):
            yield pb.AssignmentBatch(assignments=batch)

    async def _assignments(
        self, request_iterator: AsyncIterator[pb.PullCredit], context: Any
    ) -> AsyncIterator[list[pb.Assignment]]:
        """A session's work as it is dispatched: what is ready together comes as one list."""
        first = await anext(request_iterator, None)
        s = await self._session(context, first.session) if first is not None else None
        if first is None or s is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session: register again")
        assert s is not None and first is not None
        self.coord.registry.pull_opened(s)
        self.coord.registry.credit(s, first.free_slots, first.received)

        async def credits() -> None:
            async for c in request_iterator:
                if s.alive:
                    self.coord.registry.credit(s, c.free_slots, c.received)

        reader = asyncio.get_running_loop().create_task(credits())
        queued = s.assignments
        carry: pb.Assignment | None = None  # taken from the queue, left for the next message
        try:
            while True:
                a = carry if carry is not None else await queued.get()
                carry = None
                if a is None:
                    return
                batch, size = [a], a.ByteSize()
                while not queued.empty():
                    a = queued.get_nowait()
                    if a is None:
                        yield batch
                        return
                    # Bounded: a receiver refuses a message over its limit (gRPC's default 4 MiB),
                    # and a refused batch would fail the session again at every reconnect.
                    n = a.ByteSize()
                    if size + n > MAX_BATCH_BYTES:
                        carry = a
                        break
                    batch.append(a)
                    size += n
                yield batch
        finally:
            reader.cancel()
            s.pull_open = False

    async def Commands(
        self, request_iterator: AsyncIterator[pb.CommandAck], context: Any
    ) -> AsyncIterator[pb.Command]:
        first = await anext(request_iterator, None)
        s = await self._session(context, first.session) if first is not None else None
        if first is None or s is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session: register again")
        assert s is not None

        async def acks() -> None:
            async for ack in request_iterator:
                if ack.command_id:
                    self.coord.registry.ack(s, ack)

        reader = asyncio.get_running_loop().create_task(acks())
        try:
            while True:
                cmd = await s.commands.get()
                if cmd is None:
                    return
                yield cmd
        finally:
            reader.cancel()

    async def Report(self, request: pb.EventBatch, context: Any) -> pb.ReportAck:
        s = await self._session(context, request.session)
        if s is None:
            return pb.ReportAck(seq=request.seq, known=False)
        if request.seq == 0 or request.seq > s.reported_seq:  # not a batch sent again after a timeout
            s.reported_seq = request.seq
            self.coord.dispatcher.apply_events(s, request)
            if request.HasField("credit") and s.alive:
                self.coord.registry.credit(s, request.credit.free_slots, request.credit.received)
        # Acknowledged only once durable: an instance resends what was not acknowledged (applied
        # once: by its seq; the journal keeps the writes it could not commit and commits them
        # first once it can, a full disk freed). Until then the ack waits: an abort made every
        # agent reconnect and re-register in a loop while the disk was full.
        while True:
            try:
                await self.coord.journal.flush()
                break
            except JournalError as exc:
                left = context.time_remaining()
                if not s.alive or (left is not None and left < 2 * journal_module.RETRY_S):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"not durable yet: {exc}")
                await asyncio.sleep(journal_module.RETRY_S)
        return pb.ReportAck(seq=request.seq, known=True, takes_credit=True)

    async def Reports(
        self, request_iterator: AsyncIterator[pb.EventBatch], context: Any
    ) -> AsyncIterator[pb.ReportAck]:
        # Report, on one stream per session: each batch acknowledged in order once durable.
        async for batch in request_iterator:
            yield await self.Report(batch, context)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    async def GetQueue(self, request: pb.QueueQuery, context: Any) -> pb.QueueSnapshot:
        if request.limit < 0:
            message = (
                f"limit: must be 0 (the default, {DEFAULT_QUEUE_ROWS} rows) or more, got {request.limit}"
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        now = time.time()
        jobs = [j for j in self.coord.book.jobs.values() if j.state in ("queued", "dispatched")]
        if request.model:
            jobs = [j for j in jobs if j.request.model == request.model]
        jobs.sort(key=lambda j: (j.state != "queued", j.request.slo.first_deadline(), j.request.arrival_time))
        limit = request.limit or DEFAULT_QUEUE_ROWS
        return pb.QueueSnapshot(
            queued=sum(j.state == "queued" for j in jobs),
            dispatched=sum(j.state == "dispatched" for j in jobs),
            requests=[
                pb.QueuedRequest(
                    request_id=j.id,
                    model=j.request.model,
                    slo_class=j.request.slo_class,
                    tenant=j.request.tenant,
                    state=j.state,
                    instance_id=j.instance or "",
                    age_s=now - j.request.arrival_time,
                    deadline=_or_zero(j.request.slo.first_deadline()),
                    late=j.late,
                )
                for j in jobs[:limit]
            ],
        )

    async def GetPlan(self, request: pb.PlanQuery, context: Any) -> pb.PlanSnapshot:
        qm = self.coord.queue_manager
        plan = qm.last_plan if qm is not None else None
        if qm is None or plan is None:
            return pb.PlanSnapshot()
        # The plan as made; its requests that have left the queue since (dispatched, finished,
        # cancelled) are not shown: the plan stays until the next one, which is made only while
        # work waits, and listed the requests of a drained queue for ever.
        queued = {job.id for job in self.coord.book.jobs.values() if job.state == "queued"}
        queues = {i: [r for r in ids if r in queued] for i, ids in plan.queues.items()}
        return pb.PlanSnapshot(
            made_at=qm.last_plan_at,
            solver=plan.solver,
            queues=[pb.PlannedQueue(instance_id=i, request_ids=r) for i, r in queues.items() if r],
            actions=[repr(a) for a in plan.actions],
        )

    async def ListInstances(self, request: pb.InstancesQuery, context: Any) -> pb.InstancesSnapshot:
        mono = time.monotonic()
        out = []
        for s, st in self.coord.registry.states():
            report = pb.StateReport(instance_id=s.instance_id, session=s.id)
            if st is not None:
                report.models_loaded.extend(st.models_loaded)
                report.models_warm.extend(st.models_warm)
                report.models_servable.extend(st.models_servable)
                report.device = st.device
                report.loading_model = st.loading_model or ""
                report.num_running, report.num_waiting = st.num_running, st.num_waiting
                report.num_swapped, report.queued_tokens = st.num_swapped, st.queued_tokens
                report.kv_blocks_used, report.kv_blocks_total = st.kv_blocks_used, st.kv_blocks_total
                report.max_num_seqs = st.max_num_seqs
                report.notes.extend(st.notes)
            out.append(
                pb.InstanceSnapshot(
                    instance_id=s.instance_id,
                    backend=s.backend,
                    gpu=s.gpu,
                    healthy=st is not None and st.healthy,
                    state=report,
                    dispatched=len(s.assigned),
                    last_heartbeat_age_s=mono - s.last_seen,
                    endpoint=s.endpoint,
                )
            )
        return pb.InstancesSnapshot(instances=out)

    async def Evict(self, request: pb.EvictOrder, context: Any) -> pb.EvictReply:
        if request.mode not in EVICT_MODES:
            modes = ", ".join(repr(m) for m in EVICT_MODES)
            message = f"mode: must be one of {modes} ('': the engine's best), got {request.mode!r}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
        job = self.coord.lookup(request.request_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no request {request.request_id!r}")
        assert job is not None
        if job.state != "dispatched" or job.instance is None:
            return pb.EvictReply(
                ordered=False, reason=f"request {request.request_id!r} is not running ({job.state})"
            )
        s = self.coord.fleet.live(job.instance)
        if s is None:
            return pb.EvictReply(ordered=False, reason=f"instance {job.instance} is not connected")
        rep = s.report
        if rep is not None and job.id in rep.waiting_ids:  # handed over, waiting in the engine's queue
            return pb.EvictReply(
                ordered=False,
                reason=f"request {request.request_id!r} waits in the queue of instance {s.instance_id}: "
                "not running, nothing to evict",
            )
        if request.mode == "swap" and "swap" not in s.capabilities:
            return pb.EvictReply(
                ordered=False,
                reason=f"instance {s.instance_id} cannot swap a request to host memory: evict it with "
                "mode 'recompute' (or '', the engine's best)",
            )
        mode = request.mode or ("swap" if "swap" in s.capabilities else "recompute")
        self.coord.fleet.command(s, "evict", job.id, mode=mode)
        return pb.EvictReply(ordered=True, instance_id=s.instance_id)
