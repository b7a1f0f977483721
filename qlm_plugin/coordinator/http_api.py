"""The OpenAI-compatible HTTP front door: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/responses`` (streaming and not; :mod:`.responses_api`), ``/v1/models``, plus ``/health`` and
Prometheus ``/metrics``.

SLOs ride in an extension object of the body (``"qlm": {"ttft_ms": 500, "class": "interactive",
...}``) or in headers (``x-slo-ttft-ms``, ``x-slo-e2e-ms``, ``x-qlm-class``, ``x-qlm-priority``,
``x-qlm-tenant``, ``x-qlm-reject-late``, ``idempotency-key``; the body wins). Every answer carries
the request id and the wait estimate (``x-qlm-request-id``, ``x-qlm-estimated-wait-ms``,
``x-qlm-p-meet`` and the ``qlm`` object of the body). Errors use OpenAI's shape, with ``param``
naming the field. A client that disconnects cancels its request everywhere.

No input gives a 5xx: every field read is checked here (the OpenAI fields by
:mod:`~qlm_plugin.coordinator.openai_params`, as vLLM's server checks them), header values must be
printable ASCII, body strings valid Unicode, integers must fit their protobuf fields. A completion's
prompt may be token ids (``spec.prompt_token_ids``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from opentelemetry import propagate

from qlm_plugin.coordinator import choices, responses_api
from qlm_plugin.coordinator.auth import Authenticator, AuthError, Principal
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.jobs import (
    CLIENT_GONE,
    DEFAULT_MAX_TOKENS,
    REFUSED,
    UNSERVED,
    UNSERVED_RETRY_AFTER_S,
    Chunk,
    Job,
    SubmitError,
)
from qlm_plugin.coordinator.journal import TERMINAL
from qlm_plugin.coordinator.json_codec import dumps
from qlm_plugin.coordinator.openai_params import (
    INT32_MAX,
    INT32_MIN,
    MAX_NAME_CHARS,
    BadRequest,
    UsageChunks,
    chat_prompt,
    check_supported,
    echo_param,
    flag,
    integer,
    key_name,
    logprob_params,
    number,
    printable_ascii,
    sampling,
    show,
    stream_options,
    text,
    token_ids,
    tool_params,
)
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.openai_client import completion_logprobs, message_tool_calls

log = logging.getLogger("qlm_plugin.coordinator.http")

#: Largest request body accepted, bytes (a prompt of about 1M tokens).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: A stream that has sent nothing for this long (its request waits in the queue) gets an SSE comment,
#: which clients skip: clients and proxies with a read timeout (nginx: 60 s) drop a silent stream,
#: and its request with it.
KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"
#: A stream's write that has not drained for this long (the client stopped reading) aborts the
#: connection: it, and its socket, would be held for ever.
WRITE_STALL_S = 60.0
#: A connection with no request under way is closed after this long: idle since its last answer, or,
#: since it opened, without a whole request head (slowloris). Above the 60 s for which nginx's
#: upstream keepalive and AWS's load balancers keep an idle connection, so that a proxy in front
#: does not reuse one the server is closing.
IDLE_TIMEOUT_S = 75.0
#: A request body that sends nothing for this long after its head is answered 408 and its
#: connection closed (aiohttp bounds the head, not the body: a client could hold a handler for ever).
BODY_STALL_S = 60.0
#: The longest a generation request's body may take to arrive in all, seconds (4 MiB at 14 KB/s).
BODY_TOTAL_S = 300.0

SUBMIT_HTTP = {
    "invalid": 400,
    "too_large": 400,
    "unknown_model": 404,
    "limit": 429,
    "unavailable": 503,
    "slo_unattainable": 503,
    "idempotency_conflict": 422,  # the IETF Idempotency-Key draft's answer to a key reused
    "internal": 500,
}
#: A refusal's code as OpenAI names it, where it has a name for it (clients act on these: a context
#: overflow is trimmed and retried, an unknown model falls back to another).
OPENAI_CODES = {
    "too_large": "context_length_exceeded",
    "unknown_model": "model_not_found",
    "limit": "rate_limit_exceeded",
}
#: The headers read, each standing for a field of the body's ``qlm`` object (which wins).
QLM_HEADERS = {
    "ttft_ms": "x-slo-ttft-ms",
    "e2e_ms": "x-slo-e2e-ms",
    "class": "x-qlm-class",
    "priority": "x-qlm-priority",
    "tenant": "x-qlm-tenant",
    "reject_if_late": "x-qlm-reject-late",
    "idempotency_key": "idempotency-key",
}
QLM_FIELDS = frozenset(QLM_HEADERS) | {"true_output_tokens"}


ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def error_object(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object, for an answer of ``status`` (or a stream's error event)."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"message": message, "type": kind, "param": param, "code": code}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": error_object(status, message, param, code)}
    if extra:
        body["qlm"] = dict(extra)
    if status == 409:  # a conflict is not transient, but OpenAI's SDKs retry a 409 unless told not to
        headers = {**(headers or {}), "x-should-retry": "false"}
    return json_response(body, status=status, headers=headers)


def auth_refusal(exc: AuthError) -> web.Response:
    """A 401 (no usable token; with ``WWW-Authenticate: Bearer``, as RFC 6750 asks) or a 403 (a
    token without the scope), its code the refusal's kind."""
    if exc.status == "unauthenticated":
        return error_response(
            401, str(exc), code=exc.status, headers={"WWW-Authenticate": 'Bearer realm="qlm"'}
        )
    return error_response(403, str(exc), code=exc.status)


async def read_body(request: web.Request, limit: int, stall_s: float, total_s: float | None = None) -> bytes:
    """The request's whole body: :class:`web.HTTPRequestEntityTooLarge` past ``limit`` bytes,
    :class:`TimeoutError` once ``stall_s`` passes without a byte of it, or ``total_s`` since it
    began (a byte every minute kept a connection for ever: the stall bound restarts at each),
    :class:`web.RequestPayloadError` for one that does not decode, marked read to its end (aiohttp,
    reading the rest of it for a next request, logged the error as unhandled with 40 lines of
    traceback, for any client that sent a bad gzip body): close the connection with the answer."""
    content = request.content
    if content.is_eof():  # all of it came with the head (most requests): no timer
        data = content.read_nowait()
        if len(data) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
        return data
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    end = math.inf if total_s is None else loop.time() + total_s
    try:
        async with asyncio.timeout(min(stall_s, total_s or stall_s)) as bound:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                parts.append(chunk)
                bound.reschedule(min(loop.time() + stall_s, end))
    except web.RequestPayloadError:
        content.feed_eof()  # nothing more is read of it: the caller's answer closes the connection
        raise
    return b"".join(parts)


def body_unreadable(exc: Exception) -> web.Response:
    """A body that does not decode (a content-encoding that does not): 400, and the connection
    closed (what is left of the body cannot be read as a next request)."""
    response = error_response(400, f"the body could not be read: {exc}", code="invalid_body")
    response.force_close()
    return response


def body_stalled(stall_s: float, total_s: float | None = None) -> web.Response:
    """A body that stopped arriving (or took over ``total_s`` in all): 408, and the connection
    closed (what is left of the body would otherwise be read as the next request)."""
    also = f", or took over {total_s:g} s in all" if total_s is not None else ""
    response = error_response(408, f"the request body sent nothing for {stall_s:g} s{also}", code="timeout")
    response.force_close()
    return response


def json_response(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, headers=headers, content_type="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json takes NaN and Infinity


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A completion's prompts, as vLLM takes them: one text or token-id list (``"a"``, ``[1, 2]``),
    or a list of them (``["a", "b"]``, ``[[1, 2], [3]]``; each answered as its own choices)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [
            _completion_prompt(p, f"prompt[{i}]" if len(prompt) > 1 else "prompt")
            for i, p in enumerate(prompt)
        ]
    return [_completion_prompt(prompt, "prompt")]


def _completion_prompt(prompt: Any, param: str) -> str | list[int]:
    if isinstance(prompt, str):
        return text(prompt, param)
    if isinstance(prompt, list):
        if not prompt:
            raise BadRequest(param, "must not be empty")
        return token_ids(prompt, param)
    raise BadRequest(param, f"must be a non-empty string or a list of token ids, got {show(prompt)}")


def parse_openai(
    body: Any, headers: Mapping[str, str], chat: bool
) -> tuple[pb.RequestSpec, bool, UsageChunks]:
    """A front-door request as a :class:`pb.RequestSpec`; also whether it streams and where the
    stream carries the usage."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object")
    for key, header in QLM_HEADERS.items():
        value = headers.get(header)
        if value is not None and not printable_ascii(value):
            raise BadRequest(
                header,
                f"must be printable ASCII (send other text in the body, as qlm.{key}), got {show(value)}",
            )
    model = text(body.get("model"), "model", max_chars=MAX_NAME_CHARS)
    spec = pb.RequestSpec(model=model, operation="chat" if chat else "text_completion")
    ids_prompt = False  # a prompt of token ids, of any of the request's prompts
    if chat:
        spec.prompt, messages = chat_prompt(body.get("messages"))
        spec.chat_messages = dumps(messages).decode()
    else:
        prompts = completion_prompts(body.get("prompt"))
        ids_prompt = any(not isinstance(p, str) for p in prompts)
        prompt = prompts[0]  # the others: several_prompts
        if isinstance(prompt, str):
            spec.prompt = prompt
        else:
            spec.prompt_token_ids.extend(prompt)  # the coordinator counts them as the prompt's tokens
    check_supported(body, chat=chat)
    choices.choices_asked(body)  # checked here for every caller; the front door and a batch serve it
    if chat:
        spec.sampling.update(tool_params(body))
    spec.sampling.update(logprob_params(body, chat))
    spec.sampling.update(echo_param(body, chat))
    if "echo" in spec.sampling and ids_prompt and "logprobs" not in spec.sampling:
        raise BadRequest(
            "echo", "a prompt of token ids is echoed from its log probabilities: ask for logprobs too"
        )
    max_key = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    if body.get(max_key) is not None:
        if body[max_key] == 0 and body[max_key] is not False and "echo" in spec.sampling:  # scored alone
            spec.max_tokens, spec.prompt_only = 1, True  # one token made, left out of the answer
        else:
            spec.max_tokens = integer(body[max_key], max_key, 1, INT32_MAX)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream", f"must be true or false, got {show(stream)}")
    usage_chunks = stream_options(body.get("stream_options"), bool(stream))
    spec.sampling.update(sampling(body, spec.max_tokens or (INT32_MAX if chat else DEFAULT_MAX_TOKENS)))
    ext = body.get("qlm", {})
    if not isinstance(ext, dict):
        raise BadRequest("qlm", "must be an object")
    unknown = set(ext) - QLM_FIELDS
    if unknown:
        raise BadRequest(f"qlm.{key_name(min(unknown))}", "unknown field of the qlm extension")

    def pick(key: str) -> tuple[Any, str]:
        """The body's value of ``qlm.key``, else its header's; and the field that gave it."""
        if ext.get(key) is not None:
            return ext[key], f"qlm.{key}"
        return headers.get(QLM_HEADERS[key]), QLM_HEADERS[key]

    for key in ("ttft_ms", "e2e_ms"):
        value, param = pick(key)
        if value is not None:
            num = number(value, param, lo=0, lo_open=True, strings=True, what="a number of milliseconds > 0")
            setattr(spec.slo, key, num)
    value, param = pick("class")
    if value is not None:
        spec.slo.slo_class = text(value, param, max_chars=MAX_NAME_CHARS)
    if body.get("service_tier") is not None:  # OpenAI's; a class named above wins (JobBook)
        spec.service_tier = text(body["service_tier"], "service_tier", max_chars=MAX_NAME_CHARS)
    value, param = pick("priority")
    if value is None and body.get("priority") is not None:  # vLLM's own field
        value, param = body["priority"], "priority"
    if value is not None:  # int32 in the protocol (vLLM's is int64)
        spec.slo.priority = integer(value, param, INT32_MIN, INT32_MAX, strings=True)
    value, param = pick("tenant")
    if value is not None:
        spec.tenant = text(value, param, max_chars=MAX_NAME_CHARS)
    value, param = pick("reject_if_late")
    if value is not None:
        spec.reject_if_late = flag(value, param)
    value, param = pick("idempotency_key")
    if value is not None:
        spec.idempotency_key = text(value, param, max_chars=MAX_NAME_CHARS)
    if ext.get("true_output_tokens") is not None:
        spec.true_output_tokens = integer(
            ext["true_output_tokens"], "qlm.true_output_tokens", 0, INT32_MAX, strings=True
        )
    return spec, bool(stream), usage_chunks


def slo_param(field: str | None, body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """A refusal's SLO field (``slo.ttft_ms``, ``slo.e2e_ms``, ``slo.class``) as the client gave
    it: its ``qlm`` field or header, else what named the class that gave it."""
    if field is None or not field.startswith("slo."):
        return field
    given = body.get("qlm")
    ext: Mapping[str, Any] = given if isinstance(given, dict) else {}
    for key in (field.removeprefix("slo."), "class"):
        if ext.get(key) is not None:
            return f"qlm.{key}"
        header = QLM_HEADERS.get(key)
        if header is not None and headers.get(header) is not None:
            return header
    return "service_tier" if body.get("service_tier") is not None else "qlm.class"


def qlm_info(job: Job) -> dict[str, Any]:
    adm = job.admission
    info: dict[str, Any] = {
        "request_id": job.id,
        "estimated_wait_ms": round((adm.wait_mean_s or 0.0) * 1000, 3) if adm is not None else None,
        "p_meet": adm.p_meet if adm is not None else None,
        "can_meet_slo": adm.can_meet_slo if adm is not None else None,
        "slo_class": job.request.slo_class,
        "tenant": job.request.tenant,
    }
    if job.done.is_set():
        info.update(
            late=job.late,
            slo_met=job.outcome().met_slo(),
            ttft_ms=round((job.first_token_at - job.request.arrival_time) * 1000, 3)
            if job.first_token_at
            else None,
            instance_id=job.instance,
            attempts=job.attempt,
            finished_at=job.finished_at,
        )
    return info


def estimate_headers(job: Job) -> dict[str, str]:
    adm = job.admission
    headers = {"x-qlm-request-id": job.id}
    if adm is not None:
        headers["x-qlm-estimated-wait-ms"] = f"{(adm.wait_mean_s or 0.0) * 1000:.1f}"
        headers["x-qlm-p-meet"] = f"{adm.p_meet if adm.p_meet is not None else 1.0:.3f}"
    return headers


def usage(job: Job) -> dict[str, int]:
    return {
        "prompt_tokens": job.request.prompt_tokens,
        "completion_tokens": job.answered_tokens,
        "total_tokens": job.request.prompt_tokens + job.answered_tokens,
    }


def echoed(job: Job) -> str:
    """What a completion's answer starts with: its prompt where it asked for an echo, else nothing.
    A prompt of token ids is echoed as the engine's tokens of it (from their log probabilities)."""
    if "echo" not in job.spec.sampling:
        return ""
    return job.spec.prompt or "".join(str(e.get("token", "")) for e in job.prompt_logprobs or ())


def completion_body(job: Job, chat: bool) -> dict[str, Any]:
    """The OpenAI body of a finished job's answer (``chat.completion`` or ``text_completion``)."""
    reason = job.finish_reason or "length"
    asked = "logprobs" in job.spec.sampling
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": job.text}
        if job.tool_calls:  # OpenAI: no content where the answer is only its calls
            message.update(content=job.text or None, tool_calls=message_tool_calls(job.tool_calls))
        logprobs = {"content": job.logprobs} if asked else None
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": reason,
        }
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        output = [] if job.spec.prompt_only else job.logprobs
        entries = [*(job.prompt_logprobs or ()), *output] if "echo" in job.spec.sampling else output
        logprobs = completion_logprobs(entries) if asked else None
        text = echoed(job) + ("" if job.spec.prompt_only else job.text)
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}
        obj, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{job.id}",
        "object": obj,
        "created": int(job.request.arrival_time),
        "model": job.request.model,
        "choices": [choice],
        "usage": usage(job),
        "qlm": qlm_info(job),
    }


def tenant_asked(principal: Principal, body: Mapping[str, Any], headers: Mapping[str, str]) -> str:
    """The tenant a request will be submitted under, before it is parsed: its token's, else the
    one it names (``qlm.tenant``, ``x-qlm-tenant``), else the default one."""
    if principal.tenant is not None:
        return principal.tenant
    ext = body.get("qlm")
    named = ext.get("tenant") if isinstance(ext, dict) else None
    named = named if named is not None else headers.get(QLM_HEADERS["tenant"])
    return named if isinstance(named, str) and named else "default"


def several_prompts(body: Mapping[str, Any]) -> list[str | list[int]] | None:
    """A completion's prompts where it has several (checked by :func:`parse_openai`), else None."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list)):
        return completion_prompts(prompt)
    return None


def choices_body(jobs: Sequence[Job], chat: bool, n: int = 1) -> dict[str, Any]:
    """The answer of a request for several choices (``n`` of each prompt), all finished
    (:mod:`.choices`): the first's answer with every choice, the usage of all, and each choice's
    ``qlm`` facts under ``choices``."""
    answer = completion_body(jobs[0], chat)
    answer["choices"] = [
        {**completion_body(job, chat)["choices"][0], "index": i} for i, job in enumerate(jobs)
    ]
    answer["usage"] = choices.merged_usage(jobs, n)
    answer["qlm"]["choices"] = [qlm_info(job) for job in jobs]
    return answer


def choice_headers(jobs: Sequence[Job]) -> dict[str, str]:
    """The first choice's estimate headers, and every choice's request id where there are several."""
    headers = estimate_headers(jobs[0])
    if len(jobs) > 1:
        headers["x-qlm-request-ids"] = ",".join(job.id for job in jobs)
    return headers


class Core(Protocol):
    """What the completion handlers need of the coordinator: the :class:`Coordinator` itself, or in
    a front-door worker process its link to the core
    (:class:`~qlm_plugin.coordinator.relay.RelayClient`)."""

    async def submit(
        self,
        spec: pb.RequestSpec,
        *,
        tenant: str | None = None,
        parent: Any = None,
        cancel_if_caller_leaves: str | None = None,
        streams: bool = ...,
    ) -> tuple[Job, bool]: ...

    def cancel(self, request_id: str, reason: str = ...) -> Any: ...

    def follow(self, job: Job) -> AsyncIterator[Chunk]: ...


class FrontDoor:
    """aiohttp handlers over a :class:`Coordinator` (``coord``), or in a front-door worker over
    its link to the core (``core``, with ``coord`` None: the worker serves the completions and
    passes the rest to the core); one instance per server."""

    def __init__(
        self,
        coord: Coordinator | None,
        auth: Authenticator,
        *,
        core: Core | None = None,
        metrics_public: bool = False,
        extensions: Sequence[Callable[[web.Application], None]] = (),
        timeouts: Mapping[str, float] | None = None,
        pass_to_core: Callable[[web.Request, bytes], Awaitable[web.StreamResponse]] | None = None,
    ) -> None:
        self._coord = coord
        self._core: Core | None = core or coord
        self.auth = auth
        self.metrics_public = metrics_public
        self.extensions = extensions  # more routes (the Batch API's; a worker's pass-through)
        # a worker's: a request only the core can serve (continuing a kept response), body read
        self.pass_to_core = pass_to_core
        bounds = {**front_door_timeouts(), **(timeouts or {})}
        self.keepalive_s = bounds["keepalive_s"]
        self.write_stall_s = bounds["write_stall_s"]
        self.idle_timeout_s = bounds["idle_timeout_s"]
        self.body_stall_s = bounds["body_stall_s"]
        # Set when the server stops: the connections it closes then are not clients leaving, and
        # their requests stay journaled for the next start (a retry with the key finds them).
        self.closing = False

    @property
    def core(self) -> Core:
        assert self._core is not None, "a front door without a coordinator serves only errors"
        return self._core

    @property
    def coord(self) -> Coordinator:
        assert self._coord is not None, "a front-door worker serves only the completions"
        return self._coord

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        if self._coord is not None:
            app.router.add_get("/health", self.health)
            app.router.add_get("/livez", self.live)
            app.router.add_get("/metrics", self.metrics)
            app.router.add_get("/v1/models", self.list_models)
            app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_post("/v1/completions", self.completions, expect_handler=self._expect)
        app.router.add_post("/v1/chat/completions", self.chat_completions, expect_handler=self._expect)
        app.router.add_post("/v1/responses", self.responses, expect_handler=self._expect)
        if self._coord is not None:  # a worker passes it to the core, which keeps the requests
            app.router.add_get("/v1/responses/{response_id}", self.get_response)
            app.router.add_delete("/v1/responses/{response_id}", self.delete_response)
            app.router.add_post("/v1/responses/{response_id}/cancel", self.cancel_response)
            app.router.add_get("/v1/responses/{response_id}/input_items", self.response_input_items)
        for add_routes in self.extensions:
            add_routes(app)
        # last: matched only when no route above is (no cost to those); an OpenAI client reads an
        # error object where aiohttp's own answer is plain text
        app.router.add_route("*", "/{path:.*}", self.no_route)
        app.on_response_prepare.append(_request_id_header)
        return app

    async def no_route(self, request: web.Request) -> web.Response:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not request.match_info.route.resource:  # not this catch-all
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            response = error_response(405, f"{request.method} is not allowed on {request.path}")
            response.headers["Allow"] = ", ".join(sorted(allowed))
            return response
        return error_response(404, f"no such path: {request.method} {request.path}")

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: the final answer at once where the body would be refused (no
        token, one too large), else 100 (a client sent 10 MB to be told 413; aiohttp answered 100
        to everything)."""
        expect = request.headers.get("Expect", "").lower()
        if tuple(request.version) < (1, 1) or not expect:
            return None
        if expect != "100-continue":
            return error_response(417, f"unknown Expect: {expect}", code="invalid_value")
        refusal: web.Response | None = None
        try:
            self._principal(request, "client")
        except AuthError as exc:
            refusal = auth_refusal(exc)
        if refusal is None and (request.content_length or 0) > MAX_BODY_BYTES:
            refusal = error_response(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="too_large")
        if refusal is not None:
            refusal.force_close()  # the body, not sent, must not be read as a next request
            return refusal
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    def _principal(self, request: web.Request, scope: str) -> Principal:
        authorization = request.headers.get("Authorization")
        if authorization is not None and not printable_ascii(authorization) and self.auth.enabled:
            raise AuthError("unauthenticated", "the Authorization header must be printable ASCII")
        return self.auth.authenticate(authorization, scope)

    async def live(self, request: web.Request) -> web.Response:
        """Liveness, apart from readiness (``/health``): 200 while the core answers, draining or
        without instances too (a liveness probe on /health restarted a healthy coordinator
        whenever its engines restarted)."""
        return web.json_response({"status": "alive", "accepting": self.coord.accepting})

    async def health(self, request: web.Request) -> web.Response:
        instances = len(self.coord.fleet.qlm_list_instances())
        why = self.coord.unready_because()
        status, error = why or ("ok", "")
        body: dict[str, Any] = {"status": status, "instances": instances}
        if error:
            body["error"] = error
        return web.json_response(body, status=200 if why is None else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.metrics_public:
            try:
                self._principal(request, "admin")
            except AuthError as exc:
                return auth_refusal(exc)
        body, content_type = self.coord.telemetry.prometheus_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _models(self, request: web.Request) -> list[dict[str, Any]] | web.Response:
        """The served models as OpenAI's model objects, or the error answer for the caller."""
        try:
            self._principal(request, "client")
        except AuthError as exc:
            return auth_refusal(exc)
        created = int(self.coord.book.started_at)
        return [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "qlm",
                "max_model_len": spec.context_len,
            }
            for name, spec in sorted(self.coord.book.models.items())
        ]

    async def list_models(self, request: web.Request) -> web.Response:
        models = self._models(request)
        return (
            models
            if isinstance(models, web.Response)
            else web.json_response({"object": "list", "data": models})
        )

    async def get_model(self, request: web.Request) -> web.Response:
        models = self._models(request)
        if isinstance(models, web.Response):
            return models
        name = request.match_info["model"]
        found = next((m for m in models if m["id"] == name), None)
        if found is None:
            message = f"model: the model {name!r} does not exist"
            return error_response(404, message, param="model", code="model_not_found")
        return web.json_response(found)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True, responses=True)

    def _kept_response(self, request: web.Request) -> Job | web.Response:
        """The response the path names, kept for its caller's tenant; else the error to answer."""
        try:
            tenant, admin = caller(self.auth, request)
        except AuthError as exc:
            return auth_refusal(exc)
        except BadRequest as exc:
            return error_response(400, f"{exc.param}: {exc}", param=exc.param, code=exc.code)
        response_id = request.match_info["response_id"]
        rid = response_id.removeprefix(responses_api.ID_PREFIX)
        job = self.coord.lookup(rid) if rid != response_id else None
        if (
            job is None
            or (not admin and job.request.tenant != tenant)
            or not responses_api.is_response(job)
            or not responses_api.stored(job)
        ):
            message = f"no response {response_id!r} (or it is no longer kept)"
            return error_response(404, message, param="response_id", code="not_found")
        return job

    def _response_answer(self, job: Job) -> web.Response:
        return json_response(responses_api.response_object(job, responses_api.asked(job), qlm_info(job)))

    async def get_response(self, request: web.Request) -> web.Response:
        """A response by its id, as it stands (queued, in progress, or ended), for its tenant."""
        if request.query.get("stream") not in (None, "false"):  # the SDK's retrieve(stream=True)
            return error_response(
                400,
                "stream: a response is not streamed again (GET it whole, without stream)",
                param="stream",
                code="invalid_value",
            )
        job = self._kept_response(request)
        return job if isinstance(job, web.Response) else self._response_answer(job)

    async def cancel_response(self, request: web.Request) -> web.Response:
        """Cancel a response still queued or in progress (its stream, if any, ends with it); one
        that has ended is answered as it is."""
        job = self._kept_response(request)
        if isinstance(job, web.Response):
            return job
        if job.state not in TERMINAL:
            job = self.coord.cancel(job.id, "cancelled by the client (POST /v1/responses/{id}/cancel)") or job
        return self._response_answer(job)

    async def delete_response(self, request: web.Request) -> web.Response:
        """Forget an ended response, its request and its answer (no longer retrievable or
        continued; its idempotency key is free again). One still running must end (or be
        cancelled) first."""
        job = self._kept_response(request)
        if isinstance(job, web.Response):
            return job
        response_id = f"{responses_api.ID_PREFIX}{job.id}"
        if job.state not in TERMINAL:
            message = (
                f"the response {response_id!r} is {job.state}: cancel it, or wait until it ends, to delete it"
            )
            return error_response(400, message, param="response_id", code="response_in_progress")
        self.coord.book.delete(job)
        await self.coord.book.journal.flush()  # answered once a restart will not bring it back
        return json_response({"id": response_id, "object": "response", "deleted": True})

    async def response_input_items(self, request: web.Request) -> web.Response:
        """The response's own input as items (OpenAI's list: ``limit``, ``order``, ``after``)."""
        job = self._kept_response(request)
        if isinstance(job, web.Response):
            return job
        try:
            listed = responses_api.list_input_items(job, request.query)
        except BadRequest as exc:
            return error_response(400, f"{exc.param}: {exc}", param=exc.param, code=exc.code)
        return json_response(listed)

    async def _generate(
        self, request: web.Request, chat: bool, responses: bool = False
    ) -> web.StreamResponse:
        try:
            principal = self._principal(request, "client")
        except AuthError as exc:
            return auth_refusal(exc)
        try:
            raw = await read_body(request, MAX_BODY_BYTES, self.body_stall_s, BODY_TOTAL_S)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="too_large")
        except web.RequestPayloadError as exc:  # e.g. a content-encoding that does not decode
            return body_unreadable(exc)
        except TimeoutError:
            return body_stalled(self.body_stall_s, BODY_TOTAL_S)
        try:
            # From bytes, as vLLM's server reads it: UTF-8 (or -16/-32), whatever the charset says.
            body = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as exc:  # also bad UTF-8, and integers past Python's 4300 digits
            return error_response(400, f"the body is not valid JSON: {exc}", code="invalid_json")
        except RecursionError:
            return error_response(400, "the body is not valid JSON: nested too deeply", code="invalid_json")
        asked = body  # a Responses request: echoed in its answer
        origins: responses_api.Origins = []  # where its chat's messages came from, for errors
        try:
            if responses:
                previous = responses_api.previous_id(body) if isinstance(body, dict) else None
                if previous is not None and self._coord is None:  # the core keeps the responses
                    assert self.pass_to_core is not None, "a front-door worker passes these on"
                    return await self.pass_to_core(request, raw)
                history = None
                if previous is not None:
                    kept = self.coord.lookup(previous)
                    tenant = tenant_asked(principal, body, request.headers)
                    if kept is not None and kept.request.tenant != tenant:
                        kept = None  # another tenant's: as if none were kept, before anything is said of it
                    history = responses_api.continued(kept, previous)
                body = responses_api.chat_body(body, history, origins)
            spec, stream, usage_chunks = parse_openai(body, request.headers, chat)
            if responses:
                spec.response_echo = responses_api.echoed(asked, origins, streamed=stream)
            n = choices.choices_asked(body)
            prompts = None if chat else several_prompts(body)
            spec.from_http = True  # (its choices' too)
            specs = choices.choice_specs(spec, n, prompts)
        except BadRequest as exc:
            param = responses_api.error_param(exc, origins) if responses else exc.param
            return error_response(
                exc.status, f"{param}: {exc}" if param else str(exc), param=param, code=exc.code
            )
        # Trace context that is not ASCII is invalid, so ignored (W3C), not an error (or a crash).
        parent = propagate.extract(CIMultiDict((k, v) for k, v in request.headers.items() if v.isascii()))
        try:
            jobs = await self._submit_choices(specs, principal.tenant, parent, stream)
        except SubmitError as exc:
            extra = None
            if exc.estimate is not None:
                extra = {
                    "estimated_wait_ms": round((exc.estimate.wait_mean_s or 0.0) * 1000, 1),
                    "p_meet": exc.estimate.p_meet,
                }
            status = SUBMIT_HTTP.get(exc.code, 400)
            if exc.code == "slo_unattainable" and exc.field is not None:
                status = 400  # no instance could meet it even idle: retrying will not help
            param = slo_param(exc.field, body, request.headers)
            if chat and param == "prompt":
                param = "messages"
            elif chat and param == "max_tokens" and body.get("max_completion_tokens") is not None:
                param = "max_completion_tokens"
            if responses:
                param = responses_api.param_name(param, origins)
            response = error_response(
                status,
                f"{param}: {exc}" if param else str(exc),
                param=param,
                code=OPENAI_CODES.get(exc.code, exc.code),
                extra=extra,
            )
            if status in (429, 503) and exc.retry_after_s is not None:
                response.headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
            return response
        try:
            if stream:
                return await self._stream(request, jobs, chat, usage_chunks, n, asked if responses else None)
            failed = await choices.first_failed(jobs)
            if failed is not None and len(jobs) > 1 and not failed.halted:
                self._cancel(jobs, choices.SIBLING_FAILED)
            if failed is not None or len(jobs) == 1:
                answer = self._complete(failed or jobs[0], chat, asked if responses else None)
            else:
                answer = json_response(choices_body(jobs, chat, n), headers=choice_headers(jobs))
            return await self._send(request, answer)
        except asyncio.CancelledError:
            if not self.closing:
                self._cancel(jobs, CLIENT_GONE)
            raise
        except ConnectionResetError:  # the client left (or stalled and was cut off)
            if not self.closing:
                self._cancel(jobs, CLIENT_GONE)
            # an answer for aiohttp to drop quietly on the closed connection: raised, it logged a
            # client's ordinary leaving as an error, with a traceback
            return web.Response(status=499)

    async def _submit_choices(
        self, specs: list[pb.RequestSpec], tenant: str | None, parent: Any, stream: bool
    ) -> list[Job]:
        """Submit the requests of one answer's choices (:mod:`.choices`): the first (which holds
        its tenant's room for all), then the others together. All accepted, or none left: those
        accepted before a refusal are cancelled, and the refusal raised."""

        async def submit(spec: pb.RequestSpec) -> Job:
            job, _ = await self.core.submit(
                spec, tenant=tenant, parent=parent, cancel_if_caller_leaves=CLIENT_GONE, streams=stream
            )
            return job

        first = await submit(specs[0])
        if len(specs) == 1:
            return [first]
        for spec in specs[1:]:
            if spec.prompt == specs[0].prompt and not spec.prompt_token_ids:
                spec.prompt_tokens = first.request.prompt_tokens  # the same prompt: counted once
        tasks = [asyncio.ensure_future(submit(spec)) for spec in specs[1:]]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:  # the client left: as it would leave the accepted ones
            for task in tasks:
                task.cancel()  # one still being journaled is cancelled by the coordinator itself
            if not self.closing:
                accepted = [t.result() for t in tasks if t.done() and not t.cancelled() and not t.exception()]
                self._cancel([first, *accepted], CLIENT_GONE)
            raise
        refused = next((t.exception() for t in tasks if t.exception() is not None), None)
        if refused is not None:
            accepted = [t.result() for t in tasks if t.exception() is None]
            self._cancel([first, *accepted], choices.SIBLING_REFUSED)
            raise refused
        return [first, *(task.result() for task in tasks)]

    def _cancel(self, jobs: Sequence[Job], reason: str) -> None:
        for job in jobs:
            self.core.cancel(job.id, reason)

    def _complete(self, job: Job, chat: bool, response: Mapping[str, Any] | None = None) -> web.Response:
        """The answer of an ended job; ``response``: the Responses request it came from, if so."""
        if job.state != "finished":
            status, message = unfinished(job)
            headers = estimate_headers(job)
            if status == 503:
                headers["Retry-After"] = str(UNSERVED_RETRY_AFTER_S)
            return error_response(
                status, message, code=unfinished_code(job), extra=qlm_info(job), headers=headers
            )
        if response is not None:
            body = responses_api.response_object(job, response, qlm_info(job))
            return json_response(body, headers=estimate_headers(job))
        return json_response(completion_body(job, chat), headers=estimate_headers(job))

    async def _send(self, request: web.Request, response: web.Response) -> web.Response:
        """A whole answer, every byte with the client's kernel within ``write_stall_s``: a client
        that does not read a long answer held its handler and connection for ever (aiohttp sends
        a returned answer unbounded). Past the bound the connection is aborted."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError(CLIENT_GONE)
        try:
            with until_sent(transport):
                async with asyncio.timeout(self.write_stall_s):
                    await response.prepare(request)
                    await response.write_eof()
        except TimeoutError:
            transport.abort()  # a close would wait for the unsent bytes
            raise ConnectionResetError(CLIENT_GONE) from None
        return response

    async def _stream(
        self,
        request: web.Request,
        jobs: list[Job],
        chat: bool,
        usage_chunks: UsageChunks,
        n: int,
        response: Mapping[str, Any] | None = None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **choice_headers(jobs),
            }
        )
        await resp.prepare(request)
        if request.transport is None:  # gone already
            raise ConnectionResetError(CLIENT_GONE)
        out = _SseWriter(resp, request.transport, self.keepalive_s, self.write_stall_s)
        try:
            if response is None:
                await self._events(out, jobs, chat, usage_chunks, n)
            else:
                job = jobs[0]  # the Responses API has one output (responses_api.chat_body)

                async def send(kind: str, event: dict[str, Any]) -> None:
                    await out.write(b"event: " + kind.encode() + b"\ndata: " + dumps(event) + b"\n\n")

                follow = self.core.follow(job)
                await responses_api.stream_events(job, follow, response, lambda: qlm_info(job), send)
                await out.end()
        finally:
            out.close()
        return resp

    async def _events(
        self, out: _SseWriter, jobs: list[Job], chat: bool, usage_chunks: UsageChunks, n: int = 1
    ) -> None:
        """A completion's stream: each choice's chunks as its request makes them, its last chunk
        (finish reason) when it ends; an error event instead when one ends unfinished. With
        ``usage_chunks`` "every", each chunk also holds its choice's usage so far; with "last",
        ``usage: null`` until the usage chunk after the last one."""
        job = jobs[0]
        obj, prefix = ("chat.completion.chunk", "chatcmpl") if chat else ("text_completion", "cmpl")
        base = {
            "id": f"{prefix}-{job.id}",
            "object": obj,
            "created": int(job.request.arrival_time),
            "model": job.request.model,
        }

        async def send(payload: Mapping[str, Any]) -> None:
            await out.write(b"data: " + dumps(payload) + b"\n\n")

        first = [True] * len(jobs)
        chars = [0] * len(jobs)  # of each choice's output sent so far (a completion's text_offset)
        async with contextlib.aclosing(choices.merged([self.core.follow(one) for one in jobs])) as chunks:
            async for i, chunk in chunks:
                job = jobs[i]
                if chunk is None:  # this choice has no more: its end
                    await job.done.wait()
                    if job.state != "finished":
                        if len(jobs) > 1 and not job.halted:
                            self._cancel(jobs, choices.SIBLING_FAILED)
                        status, message = unfinished(job)
                        await send(
                            {
                                "error": error_object(status, message, code=unfinished_code(job)),
                                "qlm": qlm_info(job),
                            }
                        )
                        break
                    last: dict[str, Any] = {"index": i, "finish_reason": job.finish_reason or "length"}
                    if chat:
                        last["delta"] = {}
                    else:
                        last.update(text="", logprobs=None)
                    end: dict[str, Any] = {**base, "choices": [last], "qlm": qlm_info(job)}
                    if usage_chunks != "none":  # "last": null but in the usage chunk, as OpenAI's
                        end["usage"] = usage(job) if usage_chunks == "every" else None
                    await send(end)
                    continue
                if not (first[i] or chunk.text or chunk.tool_calls or chunk.logprobs):
                    continue  # tokens without text (a count made up at the end): nothing to show
                if chat:
                    delta: dict[str, Any] = {"content": chunk.text}
                    if chunk.tool_calls:
                        delta = {
                            "tool_calls": chunk.tool_calls,
                            **({"content": chunk.text} if chunk.text else {}),
                        }
                    if first[i]:
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": None}
                    if chunk.logprobs:
                        choice["logprobs"] = {"content": chunk.logprobs}
                else:
                    text, entries = chunk.text, chunk.logprobs
                    if job.spec.prompt_only:  # the prompt alone: its first chunk without the token
                        text, entries = "", None
                    if first[i] and "echo" in job.spec.sampling:  # the prompt first
                        text = echoed(job) + text
                        entries = [*(job.prompt_logprobs or ()), *(entries or ())]
                    logprobs = completion_logprobs(entries, chars[i]) if entries else None
                    choice = {"index": i, "text": text, "finish_reason": None, "logprobs": logprobs}
                    # offsets count the tokens' text, as vLLM's (a token held back, or shown as
                    # U+FFFD until its character is whole, makes the two differ)
                    chars[i] += sum(len(str(e.get("token") or "")) for e in entries) if entries else len(text)
                payload: dict[str, Any] = {**base, "choices": [choice]}
                if usage_chunks == "every":
                    made = 0 if job.spec.prompt_only else chunk.index + chunk.tokens
                    prompt = job.request.prompt_tokens
                    payload["usage"] = {
                        "prompt_tokens": prompt,
                        "completion_tokens": made,
                        "total_tokens": prompt + made,
                    }
                elif usage_chunks == "last":
                    payload["usage"] = None
                if first[i]:
                    payload["qlm"] = qlm_info(job)
                    first[i] = False
                await send(payload)
            else:
                if usage_chunks != "none":
                    await send({**base, "choices": [], "usage": choices.merged_usage(jobs, n)})
        await out.write(b"data: [DONE]\n\n")
        await out.end()


def caller(auth: Authenticator, request: web.Request) -> tuple[str, bool]:
    """(tenant, admin) of a request's caller: its token's tenant, else ``x-qlm-tenant``, else
    ``default``; admin: a token with the admin scope (with it alone too), which sees every
    tenant's. With authentication off a caller is the tenant it names, as any client (no token
    says more). Raises :class:`AuthError`, or :class:`BadRequest` for a tenant header that is
    not a name."""
    authorization = request.headers.get("Authorization")
    if authorization is not None and not printable_ascii(authorization) and auth.enabled:
        raise AuthError("unauthenticated", "the Authorization header must be printable ASCII")
    try:
        principal: Principal = auth.authenticate(authorization, "client")
    except AuthError as exc:
        if exc.status != "forbidden":
            raise
        try:
            principal = auth.authenticate(authorization, "admin")
        except AuthError:
            raise exc from None
    tenant = principal.tenant
    if tenant is None:
        header = request.headers.get("x-qlm-tenant")
        if header is not None and not printable_ascii(header):
            raise BadRequest("x-qlm-tenant", "must be printable ASCII")
        tenant = text(header, "x-qlm-tenant", max_chars=MAX_NAME_CHARS) if header else "default"
    return tenant, auth.enabled and "admin" in principal.scopes


def unfinished(job: Job) -> tuple[int, str]:
    """A request that did not finish: its status (499, as nginx logs a client that left, for a
    cancelled one; 400 for one its engine refused; 503 for one no instance was there to serve, or
    one the coordinator stopped with, kept for its next start) and its message."""
    if job.halted and job.state == "cancelled":  # not kept (Coordinator.halt_unfinished)
        return 503, f"request {job.id}: {job.error}"
    if job.halted:
        again = (
            "send it again with the same idempotency key for its answer"
            if job.spec.idempotency_key
            else f"its id is {responses_api.ID_PREFIX if responses_api.is_response(job) else ''}{job.id}"
        )
        return 503, (
            f"request {job.id}: {job.halted_because}; the request is kept and served after the "
            f"coordinator restarts ({again})"
        )
    status = 499 if job.state == "cancelled" else UNFINISHED_STATUS.get(job.finish_reason, 500)
    return status, f"request {job.id} {job.state}: {job.error}"


def unfinished_code(job: Job) -> str:
    """The error code of a request that did not finish: its state, or ``unavailable`` for one the
    coordinator stopped with."""
    return "unavailable" if job.halted else job.state


#: The status of a failed request by its finish reason (else 500).
UNFINISHED_STATUS = {REFUSED: 400, UNSERVED: 503}


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``x-request-id`` on every answer, as OpenAI's API sends it (its SDKs show it as
    ``_request_id``): the client's own where it sent a usable one, else the request's id."""
    if "x-request-id" in response.headers:  # a worker passing on the core's answer
        return
    sent = request.headers.get("x-request-id")
    if sent is None or len(sent) > MAX_NAME_CHARS or not printable_ascii(sent):
        sent = response.headers.get("x-qlm-request-id") or uuid.uuid4().hex  # no request: an error
    response.headers["x-request-id"] = sent


@contextlib.contextmanager
def until_sent(transport: asyncio.Transport) -> Iterator[None]:
    """Within it, a write's drain waits for an empty buffer: every byte with the client's kernel
    (unsent bytes left in the transport would hold the connection, and its socket, after the
    handler, as a close waits for them)."""
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0)
    try:
        yield
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high, low)


class _SseWriter:
    """A stream's writes, one at a time. While the stream has sent nothing for ``keepalive_s`` it
    sends a keep-alive comment; a write (or the end) that has not drained for ``stall_s`` aborts
    the connection, and the handler ends as for a client that left. One timer per stream, looked
    at when it fires: nothing per write but a clock read."""

    __slots__ = (
        "keepalive_s",
        "last",
        "loop",
        "pinging",
        "resp",
        "stall_s",
        "timer",
        "transport",
        "writing_since",
    )

    def __init__(
        self, resp: web.StreamResponse, transport: asyncio.Transport, keepalive_s: float, stall_s: float
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.resp, self.transport = resp, transport
        self.keepalive_s, self.stall_s = keepalive_s, stall_s
        self.last = self.loop.time()  # when the last write started
        self.writing_since: float | None = None
        self.pinging: asyncio.Task[None] | None = None
        self.timer = self.loop.call_at(self.last + min(keepalive_s, stall_s), self._check)

    async def write(self, data: bytes) -> None:
        if self.pinging is not None:  # a keep-alive goes out first, whole
            await self.pinging
        self.writing_since = self.last = self.loop.time()
        try:
            await self.resp.write(data)
        finally:
            self.writing_since = None

    async def end(self) -> None:
        """The end of the stream, once every byte is with the client's kernel: unsent bytes left in
        the transport would hold the connection (and its socket) after the handler, as a close
        waits for them."""
        if self.pinging is not None:
            await self.pinging
        transport = self.transport
        if transport.is_closing():
            raise ConnectionResetError(CLIENT_GONE)
        self.writing_since = self.loop.time()
        try:
            with until_sent(transport):
                await self.resp.write_eof()
        finally:
            self.writing_since = None

    def close(self) -> None:
        self.timer.cancel()
        if self.pinging is not None:
            self.pinging.cancel()

    def _check(self) -> None:
        now = self.loop.time()
        since = self.writing_since
        if since is not None:
            if now - since >= self.stall_s:
                self.transport.abort()  # a close would wait for the unsent bytes
                return
            due = since + self.stall_s
        elif now >= self.last + self.keepalive_s:
            self.pinging = self.loop.create_task(self._ping())
            due = now + min(self.keepalive_s, self.stall_s)
        else:  # a write that starts before then is looked at then
            due = min(self.last + self.keepalive_s, now + self.stall_s)
        self.timer = self.loop.call_at(due, self._check)

    async def _ping(self) -> None:
        self.writing_since = self.last = self.loop.time()
        try:
            with contextlib.suppress(ConnectionError):  # the handler's next write says so
                await self.resp.write(KEEPALIVE)
        finally:
            self.writing_since = None
            self.pinging = None


#: On stop, after the drain, how long handlers still open may go on (an answer being written;
#: nothing they wait for finishes any more). aiohttp waits this long twice: before it cancels the
#: request, and after, for the handler to end.
SHUTDOWN_GRACE_S = 1.0


def front_door_timeouts() -> dict[str, float]:
    """The bounds on silent and slow connections, as a front-door worker is given them."""
    return {
        "keepalive_s": KEEPALIVE_S,
        "write_stall_s": WRITE_STALL_S,
        "idle_timeout_s": IDLE_TIMEOUT_S,
        "body_stall_s": BODY_STALL_S,
    }


class _ClientsBadHttp(logging.Filter):
    """aiohttp logs what a client sends that it cannot parse (a bad chunk size, an unknown
    content-coding, a head without Host) as an ERROR with its traceback, a dozen lines each: any
    client, unauthenticated, could fill the log. The client got its 400: one line at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("a request aiohttp could not parse: %s", exc)
            return False
        return True


_CLIENTS_BAD_HTTP = _ClientsBadHttp()


def make_runner(front: FrontDoor) -> web.AppRunner:
    logging.getLogger("aiohttp.server").addFilter(_CLIENTS_BAD_HTTP)  # (once: a set of filters)
    # handler_cancellation: a client that goes away cancels its handler, and so its request.
    # keepalive_timeout: aiohttp's idle bound, from the connection's start too (3630 s by default).
    return web.AppRunner(
        front.app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        keepalive_timeout=front.idle_timeout_s,
    )
