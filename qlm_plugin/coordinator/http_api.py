"""The OpenAI-compatible HTTP front door: ``/v1/completions``, ``/v1/chat/completions`` (streaming
and not), ``/v1/models``, plus ``/health`` and Prometheus ``/metrics``.

SLOs ride in an extension object of the body (``"qlm": {"ttft_ms": 500, "class": "interactive",
...}``) or in headers (``x-slo-ttft-ms``, ``x-slo-e2e-ms``, ``x-qlm-class``, ``x-qlm-priority``,
``x-qlm-tenant``, ``x-qlm-reject-late``; the body wins). Every answer carries the request id and
the wait estimate (``x-qlm-request-id``, ``x-qlm-estimated-wait-ms``, ``x-qlm-p-meet`` and the
``qlm`` object of the body). Errors use OpenAI's shape, with ``param`` naming the field. A client
that disconnects cancels its request everywhere.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from opentelemetry import propagate

from qlm_plugin.coordinator.auth import Authenticator, AuthError, Principal
from qlm_plugin.coordinator.coordinator import Coordinator, Job, SubmitError
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

#: Largest request body accepted, bytes (a prompt of about 1M tokens).
MAX_BODY_BYTES = 4 * 1024 * 1024

SUBMIT_HTTP = {
    "invalid": 400,
    "too_large": 400,
    "unknown_model": 404,
    "limit": 429,
    "unavailable": 503,
    "slo_unattainable": 503,
}
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "min_tokens",  # vLLM extensions, passed through
)


class BadRequest(Exception):
    def __init__(
        self, param: str | None, message: str, status: int = 400, code: str = "invalid_value"
    ) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    kind = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }
    body: dict[str, Any] = {
        "error": {
            "message": message,
            "type": kind.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }
    if extra:
        body["qlm"] = dict(extra)
    return web.json_response(body, status=status)


def _number(value: Any, param: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(param, f"must be a number, got {value!r}")
    try:
        num = float(value)
    except ValueError:
        raise BadRequest(param, f"must be a number, got {value!r}") from None
    if not math.isfinite(num) or (integer and num != int(num)):
        raise BadRequest(param, f"must be a finite {'integer' if integer else 'number'}, got {value!r}")
    return num


def _render_chat(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "must be a non-empty list of {role, content} objects")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]", "must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is served
            texts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise BadRequest(f"messages[{i}].content[{j}]", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content", "must be a string or a list of text parts")
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines) + "\nassistant:"


def parse_openai(body: Any, headers: Mapping[str, str], chat: bool) -> tuple[pb.RequestSpec, bool, bool]:
    """A front-door request as a :class:`pb.RequestSpec`; also (stream, include_usage)."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model", "must be a non-empty string")
    spec = pb.RequestSpec(model=model, operation="chat" if chat else "text_completion")
    if chat:
        spec.prompt = _render_chat(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list):
            raise BadRequest("prompt", "only one prompt per request is supported (a string)")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt", "must be a non-empty string")
        spec.prompt = prompt
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("n", "only n=1 is supported")
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if body.get(max_key) is not None:
        value = _number(body[max_key], max_key, integer=True)
        if value < 1:
            raise BadRequest(max_key, f"must be >= 1, got {body[max_key]!r}")
        spec.max_tokens = int(min(value, 2**31 - 1))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "must be true or false")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    for key in SAMPLING_KEYS:
        if body.get(key) is not None:
            spec.sampling[key] = json.dumps(body[key])
    ext = body.get("qlm", {})
    if not isinstance(ext, dict):
        raise BadRequest("qlm", "must be an object")
    unknown = set(ext) - {
        "ttft_ms",
        "e2e_ms",
        "class",
        "priority",
        "tenant",
        "reject_if_late",
        "idempotency_key",
        "true_output_tokens",
    }
    if unknown:
        raise BadRequest(f"qlm.{sorted(unknown)[0]}", "unknown field of the qlm extension")

    def pick(key: str, header: str) -> Any:
        return ext[key] if ext.get(key) is not None else headers.get(header)

    for key, header in (("ttft_ms", "x-slo-ttft-ms"), ("e2e_ms", "x-slo-e2e-ms")):
        value = pick(key, header)
        if value is not None:
            num = _number(value, f"qlm.{key}")
            if num <= 0:
                raise BadRequest(f"qlm.{key}", f"must be > 0 milliseconds, got {value!r}")
            setattr(spec.slo, key, num)
    cls = pick("class", "x-qlm-class")
    if cls is not None:
        if not isinstance(cls, str) or not cls:
            raise BadRequest("qlm.class", "must be a non-empty string")
        spec.slo.slo_class = cls
    priority = pick("priority", "x-qlm-priority")
    if priority is None and body.get("priority") is not None:  # vLLM's own field
        priority = body["priority"]
    if priority is not None:
        spec.slo.priority = int(_number(priority, "qlm.priority", integer=True))
    tenant = pick("tenant", "x-qlm-tenant")
    if tenant is not None:
        if not isinstance(tenant, str) or not tenant:
            raise BadRequest("qlm.tenant", "must be a non-empty string")
        spec.tenant = tenant
    reject = pick("reject_if_late", "x-qlm-reject-late")
    if isinstance(reject, str):
        reject = reject.strip().lower() in ("1", "true", "yes")
    spec.reject_if_late = bool(reject)
    key = pick("idempotency_key", "idempotency-key")
    if key is not None:
        spec.idempotency_key = str(key)
    if ext.get("true_output_tokens") is not None:
        spec.true_output_tokens = int(
            _number(ext["true_output_tokens"], "qlm.true_output_tokens", integer=True)
        )
    return spec, stream, include_usage


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
        )
    return info


def estimate_headers(job: Job) -> dict[str, str]:
    adm = job.admission
    headers = {"x-qlm-request-id": job.id}
    if adm is not None:
        headers["x-qlm-estimated-wait-ms"] = f"{(adm.wait_mean_s or 0.0) * 1000:.1f}"
        headers["x-qlm-p-meet"] = f"{adm.p_meet if adm.p_meet is not None else 1.0:.3f}"
    return headers


class FrontDoor:
    """aiohttp handlers over a :class:`Coordinator`; one instance per server."""

    def __init__(self, coord: Coordinator, auth: Authenticator, *, metrics_public: bool = False) -> None:
        self.coord = coord
        self.auth = auth
        self.metrics_public = metrics_public

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    def _principal(self, request: web.Request, scope: str) -> Principal:
        return self.auth.authenticate(request.headers.get("Authorization"), scope)

    async def health(self, request: web.Request) -> web.Response:
        instances = len(self.coord.fleet.qlm_list_instances())
        ready = self.coord.accepting and instances > 0
        body = {
            "status": "ok" if ready else ("draining" if not self.coord.accepting else "no instances"),
            "instances": instances,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.metrics_public:
            try:
                self._principal(request, "admin")
            except AuthError as exc:
                return error_response(401 if exc.status == "unauthenticated" else 403, str(exc))
        body, content_type = self.coord.telemetry.prometheus_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._principal(request, "client")
        except AuthError as exc:
            return error_response(401 if exc.status == "unauthenticated" else 403, str(exc))
        created = int(self.coord.started_at)
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "qlm",
                "max_model_len": spec.context_len,
            }
            for name, spec in sorted(self.coord.models.items())
        ]
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            principal = self._principal(request, "client")
        except AuthError as exc:
            return error_response(401 if exc.status == "unauthenticated" else 403, str(exc), code=exc.status)
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"the body is not valid JSON: {exc}", code="invalid_json")
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the body exceeds {MAX_BODY_BYTES} bytes", code="too_large")
        try:
            spec, stream, include_usage = parse_openai(body, request.headers, chat)
        except BadRequest as exc:
            return error_response(
                exc.status, f"{exc.param}: {exc}" if exc.param else str(exc), param=exc.param, code=exc.code
            )
        parent = propagate.extract(request.headers)
        try:
            job, _ = await self.coord.submit(spec, tenant=principal.tenant, parent=parent)
        except SubmitError as exc:
            extra = None
            if exc.estimate is not None:
                extra = {
                    "estimated_wait_ms": round((exc.estimate.wait_mean_s or 0.0) * 1000, 1),
                    "p_meet": exc.estimate.p_meet,
                }
            status = SUBMIT_HTTP[exc.code]
            if exc.code == "slo_unattainable" and exc.field is not None:
                status = 400  # no instance could meet it even idle: retrying will not help
            param = {"prompt": "messages"}.get(exc.field or "", exc.field) if chat else exc.field
            return error_response(
                status, f"{param}: {exc}" if param else str(exc), param=param, code=exc.code, extra=extra
            )
        try:
            if stream:
                return await self._stream(request, job, chat, include_usage)
            await job.done.wait()
            return self._complete(job, chat)
        except (asyncio.CancelledError, ConnectionResetError):
            self.coord.cancel(job.id, "the client disconnected")
            raise

    def _usage(self, job: Job) -> dict[str, int]:
        return {
            "prompt_tokens": job.request.prompt_tokens,
            "completion_tokens": job.tokens,
            "total_tokens": job.request.prompt_tokens + job.tokens,
        }

    def _complete(self, job: Job, chat: bool) -> web.Response:
        if job.state != "finished":
            status = 499 if job.state == "cancelled" else 500
            return error_response(
                status, f"request {job.id} {job.state}: {job.error}", code=job.state, extra=qlm_info(job)
            )
        created = int(job.request.arrival_time)
        reason = job.finish_reason or "length"
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": job.text},
                "finish_reason": reason,
            }
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": job.text, "finish_reason": reason, "logprobs": None}
            obj, prefix = "text_completion", "cmpl"
        body = {
            "id": f"{prefix}-{job.id}",
            "object": obj,
            "created": created,
            "model": job.request.model,
            "choices": [choice],
            "usage": self._usage(job),
            "qlm": qlm_info(job),
        }
        return web.json_response(body, headers=estimate_headers(job))

    async def _stream(
        self, request: web.Request, job: Job, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **estimate_headers(job),
            }
        )
        await resp.prepare(request)
        obj, prefix = ("chat.completion.chunk", "chatcmpl") if chat else ("text_completion", "cmpl")
        base = {
            "id": f"{prefix}-{job.id}",
            "object": obj,
            "created": int(job.request.arrival_time),
            "model": job.request.model,
        }

        async def send(payload: Mapping[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        first = True
        async for chunk in self.coord.follow(job):
            if chunk.finished:
                break
            if chat:
                delta: dict[str, Any] = {"content": chunk.text}
                if first:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": chunk.text, "finish_reason": None, "logprobs": None}
            payload: dict[str, Any] = {**base, "choices": [choice]}
            if first:
                payload["qlm"] = qlm_info(job)
                first = False
            await send(payload)
        await job.done.wait()
        if job.state == "finished":
            last: dict[str, Any] = {"index": 0, "finish_reason": job.finish_reason or "length"}
            if chat:
                last["delta"] = {}
            else:
                last.update(text="", logprobs=None)
            await send({**base, "choices": [last], "qlm": qlm_info(job)})
            if include_usage:
                await send({**base, "choices": [], "usage": self._usage(job)})
        else:
            await send(
                {
                    "error": {"message": f"request {job.id} {job.state}: {job.error}", "code": job.state},
                    "qlm": qlm_info(job),
                }
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def make_runner(front: FrontDoor) -> web.AppRunner:
    # handler_cancellation: a client that goes away cancels its handler, and so its request.
    return web.AppRunner(front.app(), handler_cancellation=True, access_log=None)
