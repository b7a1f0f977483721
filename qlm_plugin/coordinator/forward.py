"""Dispatch by HTTP: for an instance that serves an OpenAI API of its own (its registration names an
``endpoint``: a vLLM engine with the QLM scheduler), the coordinator forwards the request there,
with the QLM fields in ``vllm_xargs``, and turns the streamed answer into the same progress events
an agent reports, so the rest of the coordinator does not know the difference.

Closing the stream (a cancel, a lost client) makes vLLM abort the request. A broken stream (the
engine died) is a FAILED event: the request goes back to the queue and resumes elsewhere after the
tokens already delivered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from qlm_plugin.coordinator.instances import Session
from qlm_plugin.coordinator.jobs import Job
from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.openai_client import (
    PROTECTED_KEYS,
    REFUSED_STATUSES,
    TokenizeError,
    error_message,
    logprob_entries,
    sse_data,
    stream_error,
    tokenize,
    tool_call_deltas,
)

#: Where a forward reports: the events of its attempt (as an agent would), and an engine found gone.
Report = Callable[[Session, pb.EventBatch], None]
Lost = Callable[[Session, str], None]

Event = pb.RequestEvent
#: vLLM's finish reasons for a request it dropped rather than finished (``FinishReason.ABORT``,
#: ``ERROR``).
ENGINE_DROPPED = ("abort", "error")
#: Deadline of the connection to the engine (the stream itself runs as long as the request).
CONNECT_TIMEOUT_S = 10.0
#: How long a broken stream's engine has to answer its health check before it is drained.
HEALTH_TIMEOUT_S = 3.0
#: An engine that dropped a stream but answered its health check is asked again after this long,
#: seconds: a server shutting down aborts its streams (or drops them) a moment before it stops
#: answering, and a request served again at once went back to it and failed a second time.
SHUTDOWN_GRACE_S = 1.0
#: A connection or stream that ends early: the engine may be gone. A server killed mid-stream shows
#: as any of these, depending on where the response was.
BROKEN = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
)


def resumes_from_ids(job: Job) -> bool:
    """Whether a resumed attempt continues from the engine's own ids of what was delivered."""
    ids = job.output_ids
    return job.tokens > 0 and job.prompt_ids is not None and ids is not None and len(ids) == job.tokens


def request_body(
    job: Job,
    attempt: int,
    model: str,
    resume_ids: Sequence[int] = (),
    predicted: LengthDistribution | None = None,
) -> dict[str, Any]:
    """The OpenAI request an engine is sent for one attempt of ``job``, with the QLM fields in
    ``vllm_xargs``; ``predicted``: the queue manager's predicted length of what is left (its median
    and 90th percentile go along: the engine uses them until its own predictor knows the class)."""
    spec, r = job.spec, job.request
    xargs: dict[str, Any] = {
        "qlm_id": job.id,
        "qlm_attempt": attempt,
        "qlm_class": r.slo_class,
        "qlm_tenant": r.tenant,
    }
    # Budgets, not deadlines: the engine counts them from its own receipt of the request, on its
    # own clock. The client's priority goes in the QLM fields too: vLLM's own `priority` field is
    # refused by an engine whose scheduling policy is not `priority` (the QLM scheduler's default).
    ttft_budget, e2e_budget = r.slo.budgets(time.time(), started=job.tokens > 0)
    if ttft_budget:
        xargs["qlm_ttft_ms"] = ttft_budget * 1000
    if e2e_budget:
        xargs["qlm_e2e_ms"] = e2e_budget * 1000
    if spec.slo.priority:
        xargs["qlm_priority"] = spec.slo.priority
    if predicted is not None and predicted.mean > 0:
        xargs["qlm_predicted_tokens"] = round(predicted.quantile(0.5), 1)
        xargs["qlm_predicted_q90"] = round(predicted.quantile(0.9), 1)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max(1, r.max_tokens - job.tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "vllm_xargs": xargs,
    }
    for key, value in spec.sampling.items():
        if key not in PROTECTED_KEYS:  # never over what the coordinator built and counted
            body[key] = json.loads(value)
    if body.get("echo") and (job.tokens or body.get("logprobs") is None):
        # The engine echoes only for the prompt's log probabilities, on an attempt from scratch
        # (a resumed one's prompt holds output); the coordinator writes the prompt's text itself.
        del body["echo"]
    if spec.true_output_tokens:  # a benchmark's fixed output length: generate exactly that many
        body["ignore_eos"] = True
        body["max_tokens"] = max(1, min(spec.true_output_tokens, r.max_tokens) - job.tokens)
    # A resumed request continues after what was delivered: from the engine's own token ids where
    # they are known (a chat's too: its ids are the prompt the engine's template made), else from
    # the text (a chat: the answer so far as the assistant's message, continued; a token-id
    # prompt: ``resume_ids``, the text tokenized).
    if resumes_from_ids(job):
        body["prompt"] = [*(job.prompt_ids or ()), *(job.output_ids or ())]
        if spec.chat_messages and "logprobs" in body:  # a chat's fields, as a completion takes them
            body["logprobs"] = body.pop("top_logprobs", 0)
    elif spec.chat_messages:
        messages = json.loads(spec.chat_messages)
        if job.text:
            messages.append({"role": "assistant", "content": job.text})
            body.update(continue_final_message=True, add_generation_prompt=False)
        body["messages"] = messages
    elif spec.prompt_token_ids:
        body["prompt"] = list(spec.prompt_token_ids) + list(resume_ids)
    else:
        body["prompt"] = spec.prompt + job.text
    return body


def endpoint_path(body: dict[str, Any]) -> str:
    """Where an engine's OpenAI server takes ``body``: its chat endpoint applies its chat template."""
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


async def forward(
    s: Session,
    job: Job,
    attempt: int,
    http: aiohttp.ClientSession,
    report: Report,
    lost: Lost,
    predicted: LengthDistribution | None = None,
    read_timeout_s: float = 600.0,
    trace_context: Mapping[str, str] | None = None,
) -> None:
    """Serve one attempt of ``job`` on ``s`` over HTTP, reporting its events to ``report`` as an
    agent would, and an engine that no longer answers to ``lost``. A stream silent for
    ``read_timeout_s`` is stalled (config ``forward_read_timeout_s``): no fixed bound fits a whole
    request, but one on the silence does. ``trace_context``: the request span's, sent as headers
    (an engine that traces puts its spans in the client's trace)."""
    model = (
        s.report.models_loaded[0] if s.report is not None and s.report.models_loaded else job.request.model
    )
    start = index = job.tokens

    def emit(**kw: Any) -> None:
        report(s, pb.EventBatch(events=[Event(request_id=job.id, attempt=attempt, time=time.time(), **kw)]))

    finish_reason: str | None = None  # the engine's; a stream that ends without one is not finished
    usage_tokens = None
    prompt_ids: list[int] | None = None  # the engine's ids of the prompt, on an attempt from scratch
    held: list[int] = []  # ids streamed whose text has not come yet
    held_logprobs: list[dict[str, Any]] = []  # and their log probabilities
    echoed: list[dict[str, Any]] | None = None  # the prompt's, of an echo: sent with the first tokens
    echoes = False  # set once the request is sent
    in_transit = True  # until the engine's server answers (or the request fails on its way)

    def gone(reason: str) -> None:
        lost(s, reason)
        if job.state == "dispatched" and job.attempt == attempt and job.instance == s.instance_id:
            # Draining changed nothing (the agent registered again since the stream began, and the
            # session now is another engine's): this attempt fails, and the request is served again.
            emit(kind=Event.FAILED, error=reason)

    def arrived() -> None:
        nonlocal in_transit
        if in_transit:  # the session's credits count what is still on its way
            in_transit = False
            s.received += 1

    try:
        resume_ids: list[int] = []
        if job.spec.prompt_token_ids and job.tokens and not resumes_from_ids(job):
            resume_ids = await tokenize(http, s.endpoint, model, job.text)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=read_timeout_s)
        body = request_body(job, attempt, model, resume_ids, predicted)
        echoes = bool(body.get("echo"))
        async with http.post(
            f"{s.endpoint.rstrip('/')}{endpoint_path(body)}",
            json=body,
            headers={**(trace_context or {}), "X-Request-Id": f"{job.id}.{attempt}"},
            timeout=timeout,
        ) as resp:
            arrived()
            if resp.status != 200:
                error = f"{error_message(resp.status, await resp.text())} (from {s.endpoint})"
                if resp.status in REFUSED_STATUSES:
                    emit(kind=Event.REFUSED, error=error)
                elif resp.status >= 500 and not await _still_answers(http, s.endpoint):
                    gone(f"{error}, and it no longer answers")  # an engine shutting down
                else:
                    emit(kind=Event.FAILED, error=error)
                return
            async for raw in resp.content:
                data = sse_data(raw)
                if data is None:
                    continue
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                failed = stream_error(chunk)
                if failed is not None:  # checked once the stream began: the same as an answer of it
                    status, error = failed
                    error = f"{error} (from {s.endpoint})"
                    if status in REFUSED_STATUSES:
                        emit(kind=Event.REFUSED, error=error)
                    elif status >= 500 and not await _still_answers(http, s.endpoint):
                        gone(f"{error}, and it no longer answers")  # its engine core died: vLLM says so
                    else:
                        emit(kind=Event.FAILED, error=error)
                    return
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens", 0))
                if start == 0 and chunk.get("prompt_token_ids") is not None:  # a chat's: on the chunk
                    prompt_ids = list(chunk["prompt_token_ids"])
                for choice in chunk.get("choices") or ():
                    if start == 0 and choice.get("prompt_token_ids") is not None:
                        prompt_ids = list(choice["prompt_token_ids"])
                    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    calls = tool_call_deltas(choice)
                    ids = choice.get("token_ids")
                    if ids is not None:
                        held.extend(ids)  # the detokenizer may hold a token's text back a chunk
                    entries = logprob_entries(choice) or []
                    if echoes and echoed is None and choice.get("prompt_token_ids") is not None:
                        # vLLM's first chunk of an echo: the prompt's entries, then the output's
                        count = len(choice["prompt_token_ids"])
                        echoed, entries = entries[:count], entries[count:]
                    held_logprobs.extend(entries)
                    if text or calls:
                        n = max(1, len(held)) if ids is not None else 1
                        delivered = job.tokens
                        tool_calls = json.dumps(calls) if calls else ""
                        logprobs = json.dumps(held_logprobs) if held_logprobs else ""
                        held_logprobs = []
                        emit(
                            kind=Event.TOKENS,
                            index=index,
                            tokens=n,
                            text=text,
                            tool_calls=tool_calls,
                            logprobs=logprobs,
                            prompt_logprobs=json.dumps(echoed) if echoed is not None and index == 0 else "",
                        )
                        index += n
                        if job.tokens == delivered + n:
                            _keep_ids(job, prompt_ids, held if ids is not None else None, delivered, n)
                        held = []
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
    except asyncio.CancelledError:
        raise  # cancelled: the closed stream aborts the request in vLLM
    except BROKEN as exc:
        # A dropped stream alone proves little (the server may have dropped only this request):
        # drain the engine at once only if it no longer answers, else serve this request again.
        if isinstance(exc, aiohttp.ClientConnectorError) or not await _still_answers(http, s.endpoint):
            gone(f"{s.endpoint} unreachable: {type(exc).__name__}")
        else:
            emit(kind=Event.FAILED, error=f"{s.endpoint}: stream broken: {type(exc).__name__}: {exc}")
        return
    except aiohttp.ServerTimeoutError as exc:
        # A stalled engine (or one out of reach): served again after what it delivered; drained
        # first if its server no longer answers either.
        bound = CONNECT_TIMEOUT_S if isinstance(exc, aiohttp.ConnectionTimeoutError) else read_timeout_s
        silent = f"{s.endpoint}: no answer for {bound:g} s ({type(exc).__name__})"
        if not await _answers(http, s.endpoint):
            gone(f"{silent}, and it no longer answers")
        else:
            emit(kind=Event.FAILED, error=silent)
        return
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TokenizeError) as exc:
        emit(kind=Event.FAILED, error=f"{s.endpoint}: {type(exc).__name__}: {exc}")
        return
    finally:
        arrived()
    if finish_reason is None or finish_reason in ENGINE_DROPPED:
        # The engine ended the stream without finishing the request: a server shutting down aborts
        # what it runs, or ends the stream at once (a clean end, not a broken stream). Served again
        # after what was delivered, as a failed attempt: counted, so an engine that keeps doing it
        # cannot keep a request going round for ever. Tokens whose text was held back are not
        # counted: the next attempt makes them again, after the ids that were delivered (counted
        # without their ids, the attempt after would resume from the text, tokenized again, which
        # can be longer than the ids were and run into the context limit short of the request's end).
        # An engine that is gone (its server stopped, or was killed) is drained at once: otherwise
        # the request, served again at once, could go back to it and spend a second attempt there.
        ended = f"{s.endpoint} ended the stream with finish_reason {finish_reason!r}"
        if not await _still_answers(http, s.endpoint):
            gone(f"{ended} and no longer answers")
            return
        emit(kind=Event.FAILED, error=ended)
        return
    streamed = index - start
    if usage_tokens is not None and usage_tokens > streamed:
        # Chunks are not always one token each: the detokenizer holds back the text of a partial
        # character, which at the end of the output never comes (its log probabilities did).
        logprobs = json.dumps(held_logprobs) if held_logprobs else ""
        prompt_logprobs = json.dumps(echoed) if echoed is not None and index == 0 else ""
        emit(
            kind=Event.TOKENS,
            index=index,
            tokens=usage_tokens - streamed,
            text="",
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    emit(kind=Event.FINISHED, finish_reason=finish_reason)


def _keep_ids(job: Job, prompt_ids: list[int] | None, ids: list[int] | None, delivered: int, n: int) -> None:
    """Record the ids of the ``n`` tokens just delivered after ``delivered`` (``ids`` None or not
    ``n`` of them: unknown from here on, so a resume falls back to the text)."""
    if delivered == 0 and prompt_ids is not None:
        job.prompt_ids, job.output_ids = prompt_ids, []
    if ids is None or len(ids) != n or job.output_ids is None or len(job.output_ids) != delivered:
        job.output_ids = None
    else:
        job.output_ids.extend(ids)


async def _still_answers(http: aiohttp.ClientSession, endpoint: str) -> bool:
    """Whether the engine's server answers its health check now and :data:`SHUTDOWN_GRACE_S` later."""
    if not await _answers(http, endpoint):
        return False
    await asyncio.sleep(SHUTDOWN_GRACE_S)
    return await _answers(http, endpoint)


async def _answers(http: aiohttp.ClientSession, endpoint: str) -> bool:
    """Whether the engine's server still answers its health check (on a fresh connection)."""
    try:
        async with http.get(
            f"{endpoint.rstrip('/')}/health",
            timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S),
            headers={"Connection": "close"},
        ) as r:
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False
