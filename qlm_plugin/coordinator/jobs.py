"""Jobs and their durable record: every accepted request (a :class:`Job`), the journal, idempotency
keys and the tenants' limits.

Requests are journaled before they are acknowledged (:meth:`JobBook.accept`); a request whose model
no instance serves is refused and journaled as failed; a journal record survives a restart, and
:meth:`JobBook.recover` rebuilds the jobs from it. A job's output streams to any number of followers,
each with its own unbounded queue (a slow reader holds no one up). Not thread-safe: one event loop
owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf import json_format

from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.journal import TERMINAL, DuplicateRecord, JobRecord, Journal, JournalError
from qlm_plugin.coordinator.json_codec import dumps
from qlm_plugin.coordinator.openai_params import MAX_NAME_CHARS, chat_prompt, show
from qlm_plugin.coordinator.prompt_tokens import PromptCounter
from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.outcome import Admission, RequestOutcome, Status
from qlm_plugin.domain.request import (
    DEFAULT_CLASSES,
    ModelSpec,
    Request,
    RequestValidationError,
    SLOClass,
    make_request,
)
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.openai_client import message_tool_calls

log = logging.getLogger("qlm_plugin.coordinator")

#: OpenAI's default for /v1/completions when the request names no max_tokens (a chat's: the context left).
DEFAULT_MAX_TOKENS = 16
#: OpenAI's ``service_tier`` values, and the class each asks for when the request names none.
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
SERVICE_TIER_CLASSES = {"flex": "batch", "priority": "interactive"}
#: Finished requests stay in memory this long for status and streaming (then the journal answers).
RETAIN_FINISHED_S = 120.0

#: A finished job as it is kept for status: a tuple of atomic values (the spec serialized), which
#: the garbage collector stops tracking. A :class:`Job` is ten tracked objects: two minutes of them
#: at 1,000 requests/s made each full collection walk 10^6 objects, a 50-150 ms pause (measured).
Finished = tuple[Any, ...]


#: The ``Retry-After`` of a request refused while the coordinator starts or drains, seconds.
UNAVAILABLE_RETRY_AFTER_S = 1.0

#: The coordinator's own request ids start so; a client's may not.
GENERATED_ID_PREFIX = "req-"


def scoped_id(tenant: str | None, request_id: str) -> str:
    """The id the coordinator keeps for a request id a client chose, or asks about: under its
    tenant's name where its token is bound to one, so that tenants' ids neither collide nor tell
    one tenant which ids another uses. The coordinator's own ids are unique as they are."""
    if tenant is None or request_id.startswith(GENERATED_ID_PREFIX):
        return request_id
    return f"{tenant}/{request_id}"


def shown_id(tenant: str | None, request_id: str) -> str:
    """The id as the client of ``tenant`` chose it (the reverse of :func:`scoped_id`)."""
    return request_id.removeprefix(f"{tenant}/") if tenant is not None else request_id


#: Why a request is cancelled when its caller leaves: an HTTP client gone (no one to answer), or
#: the front-door worker serving it (its clients are gone with it).
CLIENT_GONE = "the client disconnected"
#: The key of a Responses request's echo (``RequestSpec.response_echo``) that says its client
#: streamed it, so was told its id (``response.created``) and can ``GET`` it after a restart.
STREAMED = "streamed"
#: Why a request the coordinator stopped with was not kept: only its HTTP client waited for it,
#: and it could not ask for it later.
NOT_KEPT = "the coordinator stopped before serving it, and kept nothing no one could ask for: send it again"
#: Why the choices of a request accepted before another of them was refused are cancelled; they
#: give up their idempotency keys (:meth:`JobBook.release_key`), as a refused request holds none.
CHOICE_REFUSED = "another choice of the same request was refused"
WORKER_GONE = "the front-door worker serving the client went away"
CALLER_GONE = frozenset({CLIENT_GONE, WORKER_GONE})
#: The finish reason of a failed request that an engine refused (a value it cannot take): a 400 to
#: its client, as the engine answered, not a failure of the service.
REFUSED = "refused"
#: The finish reason of a queued request failed because no live instance served its model for
#: ``instance_return_wait_s``: a 503 to its client (the fleet's, not the request's fault), to retry.
UNSERVED = "unserved"
#: The ``Retry-After`` of such a 503, seconds.
UNSERVED_RETRY_AFTER_S = 5


#: No tokenizer makes fewer tokens of a prompt than one per this many bytes (the longest tokens
#: of real vocabularies are runs of a few dozen spaces or dashes): a client's own count below that
#: is refused, else a long prompt would pass the context and token limits as a short one.
MAX_BYTES_PER_TOKEN = 64
#: The names a request carries, each at most MAX_NAME_CHARS printable characters (they are keys
#: of the journal, labels of telemetry and echoed in errors): the HTTP front door's limits, for
#: every way in.
NAMED_FIELDS = ("request_id", "idempotency_key", "tenant", "model", "service_tier")


def check_names(spec: pb.RequestSpec) -> None:
    """Raise :class:`SubmitError` naming the first of the request's names that is too long or not
    printable."""
    for name, value in (*((f, getattr(spec, f)) for f in NAMED_FIELDS), ("slo.class", spec.slo.slo_class)):
        if name == "request_id" and spec.tenant:  # kept under its tenant's name (scoped_id)
            value = value.removeprefix(f"{spec.tenant}/")
        if len(value) > MAX_NAME_CHARS or not value.isprintable():
            raise SubmitError(
                "invalid", f"must be at most {MAX_NAME_CHARS} printable characters, got {show(value)}", name
            )


class SubmitError(Exception):
    """A refused submission. ``code``: invalid, unknown_model, too_large, limit, unavailable,
    slo_unattainable, idempotency_conflict (a key reused for another request), internal (a failure
    of the coordinator's own); ``field`` names the offending request field where there is one."""

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


class ChunkSink(Protocol):
    """Where a job's output goes as it arrives (a follower's queue, a front-door worker's link):
    each chunk, then None once the job has ended. Called on the event loop; must not block. One
    with a ``streams`` attribute that is false only collects the output (it is shown to nobody
    until the end), which lets a request whose output cannot be continued start again."""

    def put_nowait(self, item: Chunk | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    index: int
    tokens: int
    finished: bool = False
    finish_reason: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's delta.tool_calls of these tokens
    logprobs: list[dict[str, Any]] | None = None  # their log probabilities (OpenAI chat's entries)


#: Why a request was halted at a graceful stop.
SHUTTING_DOWN = "the coordinator is shutting down"


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
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # so far (merge_tool_calls)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # per token, as OpenAI chat's entries
    prompt_logprobs: list[dict[str, Any]] | None = None  # the prompt's, of a completion echoing it
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
    delivered: bool = False  # some of its output went to a follower (a stream, a worker's client)
    halted: bool = False  # unfinished when the coordinator stopped: kept for its next start (halt)
    halted_because: str = SHUTTING_DOWN  # why, as its client is told (a worker's core may crash)
    admission: Admission | None = None
    # called once when an engine first takes it (a batch line's turn is then over: batch_turns)
    on_dispatch: Callable[[Job], None] | None = None
    recovering: bool = False  # rebuilt from the journal; its instance may still claim it
    replayed: bool = False  # claimed after a restart: its instance reports its output again
    listeners: list[ChunkSink] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # callers waiting for its answer that cancel it if they leave (HTTP clients; a retry with its
    # idempotency key is one more), and since when none has (monotonic; None while some wait)
    waiters: int = 0
    abandoned_at: float | None = None

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def answered_tokens(self) -> int:
        """The output tokens its answer holds (none for a prompt scored alone: ``prompt_only``)."""
        return 0 if self.spec.prompt_only else self.tokens

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def late(self) -> bool:
        """Past a deadline: its first token came after the TTFT deadline, or has not come and the
        deadline is gone; it ended after the end-to-end deadline, or has not ended and it is gone
        (an unfinished request was always late: its times counted as infinite)."""
        slo = self.request.slo
        end = self.finished_at if self.finished_at is not None else time.time()
        first = self.first_token_at if self.first_token_at is not None else end
        if slo.ttft_deadline is not None and first > slo.ttft_deadline:
            return True
        return slo.e2e_deadline is not None and end > slo.e2e_deadline

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


def askable_later(spec: pb.RequestSpec) -> bool:
    """Whether an HTTP client can ask for the request after a coordinator restart: it gave an
    idempotency key, or it is a stored response whose client streamed it (and so has its id). Any
    other, cut off, is sent again by its client (the OpenAI SDKs retry at once): kept, it was
    generated twice, once for nobody."""
    if spec.idempotency_key:
        return True
    if not spec.response_echo:
        return False
    echo = json.loads(spec.response_echo)
    return bool(echo.get(STREAMED)) and echo.get("store") is not False


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
    if spec.chat_messages:  # a recovered chat request still goes to the engine's chat template
        out["chat_messages"] = spec.chat_messages
    if spec.service_tier:
        out["service_tier"] = spec.service_tier
    if spec.response_echo:
        out["response_echo"] = spec.response_echo
    if spec.choices:
        out["choices"], out["choice"] = spec.choices, spec.choice
    if spec.prompt_only:
        out["prompt_only"] = True
    if spec.from_http:
        out["from_http"] = True
    return out


class JobsView(Mapping[str, Job]):
    """Every job by request id, unfinished or finished (a finished one is rebuilt: a read-only copy
    each time); iterates over those held in memory."""

    def __init__(self, book: JobBook) -> None:
        self._book = book

    def __getitem__(self, request_id: str) -> Job:
        job = self._book.lookup(request_id)
        if job is None:
            raise KeyError(request_id)
        return job

    def __iter__(self) -> Iterator[str]:
        yield from list(self._book.jobs)
        yield from list(self._book.finished)

    def __len__(self) -> int:
        return len(self._book.jobs) + len(self._book.finished)


class JobBook:
    """The unfinished jobs (``jobs``), those finished within ``RETAIN_FINISHED_S`` (``finished``,
    packed), and the journal behind them."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        journal: Journal,
        models: Mapping[str, ModelSpec],
        classes: Mapping[str, SLOClass],
        costs: Mapping[str, CostModel],
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.models = dict(models)
        self.classes = dict(classes) or dict(DEFAULT_CLASSES)
        self.default_class = "interactive" if "interactive" in self.classes else next(iter(self.classes))
        self._costs = costs
        self.prompts = PromptCounter({})  # the coordinator's, with the scenario's tokenizers
        self.jobs: dict[str, Job] = {}
        self.by_key: dict[tuple[str, str], str] = {}  # (tenant, idempotency key) -> request id
        self.tenant_load: dict[str, list[int]] = {}  # tenant -> [unfinished requests, their tokens]
        self.accepting = False  # new requests are taken (started, not draining)
        self.started_at = time.time()
        self._ids = 0
        self.finished: dict[str, Finished] = {}  # request id -> the finished job, packed (see Finished)
        # (finished at, request id, its idempotency key or None): popped from the left, 1,000s a second
        self._finished_order: deque[tuple[float, str, tuple[str, str] | None]] = deque()

    # ------------------------------------------------------------------ new requests
    def new_id(self) -> str:
        self._ids += 1
        return f"{GENERATED_ID_PREFIX}{int(self.started_at * 1000):x}-{self._ids}"

    def tier_class(self, tier: str) -> str:
        """The class OpenAI's ``service_tier`` asks for, where this deployment has it ("" for the
        default class): flex processing is what the batch class is for, priority the interactive one."""
        if tier and tier not in SERVICE_TIERS:
            known = ", ".join(SERVICE_TIERS)
            raise SubmitError("invalid", f"unknown service tier {tier!r} (known: {known})", "service_tier")
        name = SERVICE_TIER_CLASSES.get(tier, "")
        return name if name in self.classes else ""

    def build_request(self, spec: pb.RequestSpec, arrival: float) -> Request:
        if spec.model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise SubmitError("unknown_model", f"unknown model {spec.model!r} (served: {known})", "model")
        cls_name = spec.slo.slo_class or self.tier_class(spec.service_tier) or self.default_class
        cls = self.classes.get(cls_name)
        if cls is None:
            known = ", ".join(sorted(self.classes))
            raise SubmitError("invalid", f"unknown SLO class {cls_name!r} (classes: {known})", "slo.class")
        for name, value in (("slo.ttft_ms", spec.slo.ttft_ms), ("slo.e2e_ms", spec.slo.e2e_ms)):
            if value < 0 or not math.isfinite(value):
                raise SubmitError("invalid", f"must be a positive number of milliseconds, got {value}", name)
        if spec.prompt and spec.prompt_token_ids:
            raise SubmitError("invalid", "give the prompt as text or as token ids, not both", "prompt")
        if spec.prompt_tokens and (spec.prompt or spec.prompt_token_ids):
            # (the ids themselves, where it gave them: 50,000 ids passed as 1 token, past the limits)
            floor = len(spec.prompt_token_ids) or math.ceil(
                len(spec.prompt.encode(errors="replace")) / MAX_BYTES_PER_TOKEN
            )
            if spec.prompt_tokens < floor:
                raise SubmitError(
                    "invalid",
                    f"{spec.prompt_tokens} is fewer tokens than any tokenizer makes of this prompt (at least "
                    f"{floor}); leave it 0 to have the prompt counted",
                    "prompt_tokens",
                )
        prompt_tokens = spec.prompt_tokens or len(spec.prompt_token_ids) or self.prompts.count(spec)
        max_tokens = spec.max_tokens
        if not max_tokens:
            # OpenAI's and vLLM's defaults: a chat may run to the end of the context (the model
            # stops it first), a text completion makes 16 tokens
            context = self.models[spec.model].context_len
            max_tokens = max(1, context - prompt_tokens) if spec.operation == "chat" else DEFAULT_MAX_TOKENS
        try:
            return make_request(
                spec.request_id,
                spec.model,
                prompt_tokens,
                max_tokens,
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
            value = {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens}.get(exc.field, 0)
            code = "too_large" if value >= 1 else "invalid"  # past the context, or below 1
            # a prompt too long is the prompt's fault; a count below 1 is the client's own count
            prompt = "prompt" if value >= 1 or not spec.prompt_tokens else "prompt_tokens"
            fld = {"prompt_tokens": prompt, "slo.ttft_s": "slo.ttft_ms", "slo.e2e_s": "slo.e2e_ms"}.get(
                exc.field, exc.field
            )
            raise SubmitError(code, exc.reason, fld) from None

    def check_feasible(self, request: Request) -> None:
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

    def count(self, job: Job | Request, sign: int) -> None:
        """Count a job in (or out of) its tenant's unfinished requests and tokens."""
        request = job.request if isinstance(job, Job) else job
        load = self.tenant_load.setdefault(request.tenant, [0, 0])
        load[0] += sign
        load[1] += sign * (request.prompt_tokens + request.max_tokens)

    def check_limits(self, request: Request, choices: int = 1, *, defaulted: bool = False) -> None:
        """Refuse (:class:`SubmitError`, ``limit``) a request beyond its tenant's limits;
        ``choices``: room is needed for that many like it (the rest of a request's choices);
        ``defaulted``: its ``max_tokens`` was not asked for (the refusal says so)."""
        limits = self.cfg.limits_for(request.tenant)
        load = self.tenant_load.get(request.tenant, [0, 0])
        tokens = request.prompt_tokens + request.max_tokens
        if tokens * choices > limits.max_queued_tokens:  # never fits, even alone: a retry cannot help
            each = f" for each of {choices} choices" if choices > 1 else ""
            unasked = (
                " (none was given: a chat's max_tokens is the context left after its prompt)"
                if defaulted
                else ""
            )
            raise SubmitError(
                "invalid",
                f"the request's {tokens} tokens (prompt and max_tokens{unasked}){each} exceed tenant "
                f"{request.tenant!r}'s limit of {limits.max_queued_tokens} queued tokens; ask for fewer "
                "with max_tokens",
                "max_tokens",
            )
        if choices > limits.max_queued_requests:
            raise SubmitError(
                "invalid",
                f"{choices} choices are more than tenant {request.tenant!r}'s limit of "
                f"{limits.max_queued_requests} unfinished requests; ask for fewer",
                "n",
            )
        tokens *= choices
        if load[0] + choices > limits.max_queued_requests:
            raise SubmitError(
                "limit",
                f"tenant {request.tenant!r} has {load[0]} unfinished requests "
                f"(limit {limits.max_queued_requests})" + (f"; {choices} more asked" if choices > 1 else ""),
                retry_after_s=1.0,
            )
        if load[1] + tokens > limits.max_queued_tokens:
            raise SubmitError(
                "limit",
                f"tenant {request.tenant!r} has {load[1]} tokens queued; {tokens} more exceed the limit "
                f"of {limits.max_queued_tokens}",
                retry_after_s=1.0,
            )

    def duplicate(self, spec: pb.RequestSpec) -> Job | None:
        """The earlier request with the same idempotency key (of the same tenant), if any."""
        if not spec.idempotency_key:
            return None
        rid = self.by_key.get((spec.tenant, spec.idempotency_key)) or self.journal.find_idempotent(
            spec.tenant, spec.idempotency_key
        )
        if rid is None:
            return None
        return self.lookup(rid)

    def delete(self, job: Job) -> None:
        """Forget an ended ``job`` (its client deleted its response): its answer kept for status,
        its idempotency key (a retry with it is a new request) and its journal row."""
        assert job.state in TERMINAL and job.id not in self.jobs, "only an ended request is deleted"
        self.finished.pop(job.id, None)
        key = (job.spec.tenant, job.spec.idempotency_key)
        if key[1] and self.by_key.get(key) == job.id:
            del self.by_key[key]
        self.journal.delete(job.id)

    def release_key(self, job: Job) -> None:
        """``job`` no longer holds its idempotency key: a new request with the key is a new one
        (the choices accepted before another of their request was refused)."""
        key = (job.spec.tenant, job.spec.idempotency_key)
        if not key[1]:
            return
        if self.by_key.get(key) == job.id:
            del self.by_key[key]
        job.spec.idempotency_key = ""
        self.journal.forget_key(job.id)

    def claim_id(self, spec: pb.RequestSpec) -> None:
        """The request's id: the client's, if not taken (:class:`SubmitError`), else a new one."""
        if spec.request_id:
            rid = spec.request_id
            if rid.startswith(GENERATED_ID_PREFIX):  # else one of its ids could be taken by a client's
                raise SubmitError(
                    "invalid",
                    f"request ids starting {GENERATED_ID_PREFIX!r} are the coordinator's own; "
                    "choose another or leave it empty",
                    "request_id",
                )
            if rid in self.jobs or rid in self.finished or self.journal.get(rid) is not None:
                mine = shown_id(spec.tenant, rid)
                raise SubmitError("invalid", f"request id {mine!r} is already taken", "request_id")
        else:
            spec.request_id = self.new_id()

    def journal_new(self, job: Job, accepted_at: float) -> asyncio.Future[None]:
        """Start journaling a new job, counted against its tenant at once (requests arriving
        together must not all pass its limit); the future is done when the record is committed
        (or refused): then :meth:`hold` the job."""
        spec = job.spec
        record = JobRecord(
            job.id,
            job.request.tenant,
            spec_to_dict(spec),
            accepted_at,
            idempotency_key=spec.idempotency_key or None,
        )
        try:
            committed = self.journal.accept_nowait(record)
        except JournalError as exc:  # closed, or its file gone: refused as a failed commit is
            committed = asyncio.get_running_loop().create_future()
            committed.set_exception(exc)
        self.count(job, +1)  # hold() gives it back if the record is refused
        return committed

    def hold(self, job: Job, committed: asyncio.Future[None]) -> None:
        """Hold a job whose record ``committed``; one the journal refused is not counted any more,
        and raises :class:`SubmitError`."""
        error = JournalError("the journal closed first") if committed.cancelled() else committed.exception()
        if error is not None:
            self.count(job, -1)
            if isinstance(error, DuplicateRecord):
                said = str(error)
                if error.field == "request_id":  # the id as its client chose it
                    said = f"duplicate request id {shown_id(job.request.tenant, job.id)!r}"
                raise SubmitError("invalid", f"cannot accept: {said}", error.field) from None
            if isinstance(error, JournalError):  # a full disk, a closed journal: not the client's doing
                raise SubmitError("unavailable", f"cannot accept: {error}", retry_after_s=1.0) from None
            raise error
        self.jobs[job.id] = job
        if job.spec.idempotency_key:
            self.by_key[(job.spec.tenant, job.spec.idempotency_key)] = job.id

    async def record_refusal(
        self, spec: pb.RequestSpec, request: Request, accepted_at: float, error: str
    ) -> None:
        """A request refused after it waited (for an instance) is journaled as failed, never as queued,
        so no restart serves it. Without its idempotency key: the client may submit it again."""
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

    # ------------------------------------------------------------------ after a restart
    def recover(self) -> list[Job]:
        """The unfinished jobs of the journal, held again and marked ``recovering`` (their instance
        may still claim them)."""
        jobs = []
        for rec in self.journal.recover():
            job = self._from_record(rec)
            if job is None:
                continue
            spec = job.spec
            if spec.from_http and not askable_later(spec):
                # no one can ask for it, and its client, cut off by the crash, sends it again
                self.journal.finished(
                    job.id,
                    state="cancelled",
                    output="",
                    output_tokens=0,
                    first_token_at=rec.first_token_at,
                    finished_at=time.time(),
                    finish_reason="cancelled",
                    error=f"{NOT_KEPT} (the coordinator restarted after a crash)",
                )
                continue
            job.recovering = True
            self.jobs[job.id] = job
            self.count(job, +1)
            jobs.append(job)
        return jobs

    def _from_record(self, rec: JobRecord) -> Job | None:
        try:
            spec = json_format.ParseDict(rec.spec, pb.RequestSpec())
            request = self.build_request(spec, rec.accepted_at)
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
        job = Job(
            request,
            spec,
            state=rec.state,
            attempt=rec.attempt,
            instance=rec.instance_id,
            failures=rec.failures,
        )
        job.first_token_at = rec.first_token_at  # its client saw it before the stop
        if rec.idempotency_key:
            self.by_key[(rec.tenant, rec.idempotency_key)] = rec.request_id
        return job

    def _past_request(self, spec: pb.RequestSpec, arrival: float) -> Request:
        """The request of a job that left memory, with its SLO as it was accepted (a model or class
        no longer configured: without its SLO)."""
        try:
            return self.build_request(spec, arrival)
        except SubmitError:
            return Request(  # still its tenant's, for status and cancel
                spec.request_id,
                spec.model,
                max(1, spec.prompt_tokens),
                max(1, spec.max_tokens),
                arrival,
                slo_class=spec.slo.slo_class or "interactive",
                tenant=spec.tenant or "default",
            )

    def _finished_job(self, rec: JobRecord) -> Job:
        """A read-only job for a request that left memory (status of an old request)."""
        spec = json_format.ParseDict(rec.spec, pb.RequestSpec())
        # pack()'s layout after the spec; the journal keeps no prompt count and no counters
        fields = (rec.accepted_at, 0, rec.state, rec.attempt, rec.instance_id, rec.output, rec.output_tokens)
        return self._read_only(
            spec,
            (
                *fields,
                rec.first_token_at,
                rec.finished_at,
                rec.finish_reason,
                rec.error,
                0,
                0,
                0,
                rec.tool_calls,
                rec.logprobs,
            ),
        )

    def _read_only(self, spec: pb.RequestSpec, fields: Finished) -> Job:
        """A read-only job from ``spec`` and the rest of a packed job (:func:`pack`)."""
        arrival, prompt_tokens, state, attempt, instance = fields[:5]
        text, tokens, first, last, reason, error, preemptions, wasted, failures, calls, logprobs = fields[5:]
        spec.prompt_tokens = spec.prompt_tokens or prompt_tokens  # counted once, not on each status read
        job = Job(self._past_request(spec, arrival), spec, state=state, attempt=attempt, instance=instance)
        job.chunks, job.tokens = [text], tokens
        job.tool_calls = json.loads(calls) if calls else []
        job.prompt_logprobs, job.logprobs = unpack_logprobs(logprobs)
        job.first_token_at, job.finished_at, job.finish_reason, job.error = first, last, reason, error
        job.preemptions, job.wasted_tokens, job.failures = preemptions, wasted, failures
        job.output_ids = None
        if state in TERMINAL:
            job.done.set()
        return job

    def lookup(self, request_id: str) -> Job | None:
        """The request's job: in memory (unfinished, or finished within ``RETAIN_FINISHED_S``, then
        rebuilt: a copy), else from the journal; None if it was never accepted."""
        job = self.jobs.get(request_id)
        if job is not None:
            return job
        packed = self.finished.get(request_id)
        if packed is not None:
            return self._read_only(unpack_spec(packed[0]), packed[1:])
        rec = self.journal.get(request_id)
        return None if rec is None else self._finished_job(rec)

    # ------------------------------------------------------------------ the end of a job
    def close(self, job: Job, state: str, finish_reason: str, error: str, now: float) -> None:
        """Record a job's end (journal, tenant counts); its followers hear of it by :meth:`announce`."""
        job.state, job.finish_reason, job.error = state, finish_reason, error
        job.finished_at = now
        job.recovering = False
        self.count(job, -1)
        self.journal.finished(
            job.id,
            state=state,
            output=job.text,
            output_tokens=job.tokens,
            first_token_at=job.first_token_at,
            finished_at=now,
            finish_reason=finish_reason,
            error=error,
            tool_calls=dumps(job.tool_calls).decode() if job.tool_calls else "",
            logprobs=pack_logprobs(job),
        )

    def keep_progress(self, jobs: Iterable[Job]) -> None:
        """The coordinator stops with ``jobs`` unfinished: journal the first tokens they had (a
        TTFT is otherwise journaled at the end, and a restart took the first token of the request
        served again for it: an SLO met looked missed)."""
        for job in jobs:
            if job.first_token_at is not None:
                self.journal.first_token(job.id, job.first_token_at)

    def announce(self, job: Job, now: float) -> None:
        """Tell a closed job's followers, and keep it a while for status, packed."""
        tell_end(job)
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            self.finished[job.id] = pack(job)
            key = (job.spec.tenant, job.spec.idempotency_key) if job.spec.idempotency_key else None
            self._finished_order.append((now, job.id, key))

    def forget_finished(self, now: float) -> None:
        """Drop finished jobs kept longer than ``RETAIN_FINISHED_S``, and their idempotency keys (the
        journal answers for both)."""
        while self._finished_order and now - self._finished_order[0][0] > RETAIN_FINISHED_S:
            _, rid, key = self._finished_order.popleft()
            self.finished.pop(rid, None)
            if key is not None and self.by_key.get(key) == rid:
                del self.by_key[key]

    # ------------------------------------------------------------------ output
    def follow(self, job: Job) -> AsyncIterator[Chunk]:
        return follow(job)

    def publish(self, job: Job, chunk: Chunk) -> None:
        publish(job, chunk)

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


def pack(job: Job) -> Finished:
    """A finished job as kept for status (:data:`Finished`)."""
    return (
        pack_spec(job.spec),
        job.request.arrival_time,
        job.request.prompt_tokens,
        job.state,
        job.attempt,
        job.instance,
        job.text,
        job.tokens,
        job.first_token_at,
        job.finished_at,
        job.finish_reason,
        job.error,
        job.preemptions,
        job.wasted_tokens,
        job.failures,
        dumps(job.tool_calls).decode() if job.tool_calls else "",
        pack_logprobs(job),
    )


def pack_spec(spec: pb.RequestSpec) -> bytes:
    """A finished job's spec as kept: a chat's without its prompt text, which is its messages
    rendered (:func:`unpack_spec` renders it again). A chat held both, twice its messages: the
    finished requests of a 195 MiB batch held 425 MiB for ``RETAIN_FINISHED_S``."""
    if not (spec.chat_messages and spec.prompt):
        return spec.SerializeToString()
    kept = pb.RequestSpec()
    kept.CopyFrom(spec)
    kept.ClearField("prompt")
    return kept.SerializeToString()


def unpack_spec(packed: bytes) -> pb.RequestSpec:
    """The spec :func:`pack_spec` kept, its chat's prompt rendered again."""
    spec = pb.RequestSpec.FromString(packed)
    if spec.chat_messages and not spec.prompt:
        spec.prompt = chat_prompt(json.loads(spec.chat_messages))[0]
    return spec


def pack_logprobs(job: Job) -> str:
    """A job's log probabilities as kept (the journal's ``logprobs``, a packed job): its output's
    entries (JSON), or with an echoed prompt's ``{"prompt": [...], "output": [...]}``."""
    if job.prompt_logprobs is not None:
        return dumps({"prompt": job.prompt_logprobs, "output": job.logprobs}).decode()
    return dumps(job.logprobs).decode() if job.logprobs else ""


def unpack_logprobs(kept: str) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(the prompt's entries, the output's) of :func:`pack_logprobs`'s text."""
    value = json.loads(kept) if kept else []
    if isinstance(value, dict):
        return value["prompt"], value["output"]
    return None, value


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
        tool_calls=dumps(message_tool_calls(job.tool_calls)).decode() if job.tool_calls else "",
    )


async def follow(job: Job) -> AsyncIterator[Chunk]:
    """The job's output from the start: what exists now, then each chunk as it arrives. An
    unbounded queue per follower: a slow reader never holds the coordinator up."""
    # The snapshot and the listener are taken together, before the first yield: a chunk
    # published while the caller holds the snapshot goes to the queue, not nowhere.
    text, tokens, finished = job.text, job.tokens, job.state in TERMINAL
    calls = [dict(c, function=dict(c["function"])) for c in job.tool_calls] or None  # a copy: merged into
    logprobs = list(job.logprobs) or None
    q: asyncio.Queue[Chunk | None] = asyncio.Queue()
    if not finished:
        job.listeners.append(q)
    try:
        if text or calls:
            job.delivered = True
            yield Chunk(text, 0, tokens, tool_calls=calls, logprobs=logprobs)
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


def publish(job: Job, chunk: Chunk) -> None:
    for q in job.listeners:
        # shown to a client, unless the follower says it only collects it (a worker's answer)
        job.delivered = job.delivered or getattr(q, "streams", True)
        q.put_nowait(chunk)


def halt(job: Job, because: str = SHUTTING_DOWN) -> None:
    """The coordinator stops with ``job`` unfinished (kept in the journal, served after its next
    start): its followers end now and ``done`` is set, so each waiting client is told so (a 503),
    and ``because``, instead of losing its connection with no word."""
    job.halted, job.halted_because = True, because
    for q in job.listeners:
        q.put_nowait(None)
    job.done.set()


def tell_end(job: Job) -> None:
    """A job has ended: its followers get the last chunk, then None, and ``done`` is set."""
    publish(job, Chunk("", job.tokens, 0, True, job.finish_reason))
    for q in job.listeners:
        q.put_nowait(None)
    job.done.set()
