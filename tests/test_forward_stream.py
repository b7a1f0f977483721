"""The coordinator's forward to an engine's OpenAI server, against a scripted server on loopback:
how the end of a stream becomes the request's end (finished, or served again)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from qlm_plugin.coordinator import forward as forward_module
from qlm_plugin.coordinator.forward import forward, request_body, resumes_from_ids
from qlm_plugin.coordinator.instances import Session
from qlm_plugin.coordinator.jobs import Job
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

Event = pb.RequestEvent


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward_module, "SHUTDOWN_GRACE_S", 0.05)


def job() -> Job:
    now = time.time()
    request = Request("r1", "m", 4, 8, now, SLO(None, None))
    return Job(request, pb.RequestSpec(request_id="r1", model="m", prompt="hi", max_tokens=8))


async def engine_on_loopback(completions: Any, health: Any) -> tuple[web.AppRunner, int]:
    """A fake engine's /v1/completions and /health on a free loopback port."""
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def run(
    finish_reason: str | None,
    tokens: int = 3,
    *,
    held_back: int = 0,
    served: Job | None = None,
    healthy: bool | int = True,
    lost: list[str] | None = None,
    status: int = 200,
    error_chunk: dict[str, Any] | None = None,
    logprobs: bool = False,
) -> list[pb.RequestEvent]:
    """The events of one attempt of ``served`` (default: a fresh job) on an engine that streams
    ``tokens`` tokens, the text of the last ``held_back`` of them never coming (a partial character),
    and ends with ``finish_reason``; the events are applied to the job as the dispatcher does.
    ``healthy``: whether the engine's health check answers after (a number: how many times);
    ``lost`` gets the reasons the engine was reported lost; ``status``: the engine's answer (not
    200: an error, no stream);
    ``error_chunk``: an error the engine sends instead, once the stream has begun; ``logprobs``:
    each token comes with its log probability."""

    checks = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal checks
        checks += 1  # healthy as a number: how many checks it answers before it goes down
        up = healthy if isinstance(healthy, bool) else checks <= healthy
        return web.Response(status=200 if up else 503)

    async def completions(request: web.Request) -> web.StreamResponse:
        if status != 200:
            return web.Response(status=status, text="cannot schedule new futures after shutdown")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if error_chunk is not None:
            await resp.write(b"data: " + json.dumps(error_chunk).encode() + b"\n\ndata: [DONE]\n\n")
            return resp
        for i, text in enumerate((" a", " b", " c")[:tokens]):
            last = i == tokens - 1
            choice = {
                "index": 0,
                "text": "" if i >= tokens - held_back else text,
                "token_ids": [10 + i],
                "finish_reason": finish_reason if last else None,
            }
            if i == 0:
                choice["prompt_token_ids"] = [1, 2, 3, 4]
            if logprobs:  # a completion's form, for this token (its text or not)
                choice["logprobs"] = {"tokens": [text], "token_logprobs": [-0.5 * i], "top_logprobs": [{}]}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    runner, port = await engine_on_loopback(completions, health)
    events: list[pb.RequestEvent] = []
    j = served or job()

    def report(s: Session, batch: pb.EventBatch) -> None:
        for e in batch.events:
            events.append(e)
            if e.kind == Event.TOKENS and e.index == j.tokens:
                j.chunks.append(e.text)
                j.tokens += e.tokens

    session = Session("engine", "vllm", "cpu", frozenset(), f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as http:
            await forward(
                session, j, 1, http, report, lambda s, why: (lost if lost is not None else []).append(why)
            )
    finally:
        await runner.cleanup()
    return events


@pytest.mark.parametrize(
    ("finish_reason", "end"),
    [
        ("length", Event.FINISHED),
        ("stop", Event.FINISHED),
        ("abort", Event.FAILED),
        ("error", Event.FAILED),
    ],
)
def test_a_stream_the_engine_ended_without_finishing_is_served_again(finish_reason: str, end: int) -> None:
    """A server shutting down aborts what it runs and ends the streams cleanly: that request is not
    finished (it was reported finished, short, before), it goes back to the queue."""
    events = asyncio.run(run(finish_reason))
    assert sum(e.tokens for e in events if e.kind == Event.TOKENS) == 3
    assert events[-1].kind == end
    if end == Event.FINISHED:
        assert events[-1].finish_reason == finish_reason
    else:
        assert finish_reason in events[-1].error


def test_a_stream_that_ends_without_a_finish_reason_is_served_again() -> None:
    """A server on its way down may answer 200 and end the stream at once: not a finished request
    with no output (it was: a client got an empty answer)."""
    events = asyncio.run(run(None, tokens=0))
    assert [e.kind for e in events] == [Event.FAILED]
    events = asyncio.run(run(None))
    assert events[-1].kind == Event.FAILED and "None" in events[-1].error


def test_an_attempt_the_engine_dropped_resumes_from_the_ids_it_delivered() -> None:
    """Tokens whose text the engine held back when it dropped the request are not counted as
    delivered: the next attempt resumes from the engine's ids of what was (counted without their
    ids, it resumed from the text tokenized again, ran into the context limit and finished short)."""
    served = job()
    events = asyncio.run(run("abort", held_back=1, served=served))
    assert events[-1].kind == Event.FAILED
    assert served.tokens == 2 and resumes_from_ids(served)
    assert request_body(served, 2, "m")["prompt"] == [1, 2, 3, 4, 10, 11]
    # a finished stream counts them (the engine's usage says they were made)
    served = job()
    events = asyncio.run(run("length", held_back=1, served=served))
    assert served.tokens == 3 and events[-1].kind == Event.FINISHED


@pytest.mark.parametrize("finish_reason", ["abort", None])
def test_an_engine_that_dropped_the_stream_and_no_longer_answers_is_drained(
    finish_reason: str | None,
) -> None:
    """A killed engine's server can end its streams cleanly before it goes: that engine is drained
    at once (its requests go elsewhere), not left to take the request again for a second attempt."""
    lost: list[str] = []
    events = asyncio.run(run(finish_reason, healthy=False, lost=lost))
    assert len(lost) == 1 and "no longer answers" in lost[0]
    assert Event.FAILED not in [e.kind for e in events]  # drained: one attempt spent, not two
    lost.clear()
    events = asyncio.run(run(finish_reason, healthy=True, lost=lost))
    assert not lost and events[-1].kind == Event.FAILED  # it answers: served again, anywhere


def test_an_engine_that_answers_an_error_and_no_longer_answers_is_drained() -> None:
    """An engine on its way down answers 500 (vLLM: "cannot schedule new futures after shutdown"):
    drained at once if its health check fails too, else the request is served again."""
    lost: list[str] = []
    events = asyncio.run(run("length", healthy=False, lost=lost, status=500))
    assert not events and len(lost) == 1 and "HTTP 500" in lost[0]
    lost.clear()
    events = asyncio.run(run("length", healthy=True, lost=lost, status=500))
    assert not lost and [e.kind for e in events] == [Event.FAILED]


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_request_the_engine_refuses_is_refused_not_served_again(status: int) -> None:
    """A 4xx is the request's own fault (a schema its grammar backend cannot compile, a token id
    past its vocabulary): another engine would refuse it too, so the request fails at once with the
    engine's answer (it was served again, and failed after three attempts with a 500)."""
    lost: list[str] = []
    events = asyncio.run(run("length", healthy=False, lost=lost, status=status))
    assert not lost and [e.kind for e in events] == [Event.REFUSED]
    assert f"HTTP {status}: cannot schedule" in events[0].error


@pytest.mark.parametrize(("code", "kind"), [(400, Event.REFUSED), (500, Event.FAILED), (None, Event.FAILED)])
def test_an_error_sent_inside_the_stream_ends_the_attempt(code: int | None, kind: int) -> None:
    """vLLM checks a structured-output request after its stream has begun: the error comes as a
    chunk (it was read as a stream that ended without a finish reason, and served again)."""
    error = {"error": {"message": "Grammar error: invalid regex", "type": "BadRequestError", "code": code}}
    events = asyncio.run(run("length", error_chunk=error))
    assert [e.kind for e in events] == [kind]
    assert events[0].error.startswith(f"HTTP {code or 500}: Grammar error: invalid regex (from http://")


def test_a_stalled_stream_fails_the_attempt_after_the_read_timeout() -> None:
    """An engine whose stream goes silent (a hung engine core, its server still up) is not waited on
    for ever: after ``forward_read_timeout_s`` without a byte the attempt fails, to resume after what
    it delivered; the engine, which still answers its health check, is not drained."""

    async def main() -> tuple[list[pb.RequestEvent], list[str], Job, float]:
        stalled = asyncio.Event()

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=200)

        async def completions(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"choices": [{"index": 0, "text": " a", "token_ids": [10]}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await stalled.wait()  # a hung engine: nothing more, the connection open
            return resp

        runner, port = await engine_on_loopback(completions, health)
        events: list[pb.RequestEvent] = []
        lost: list[str] = []
        j = job()

        def report(s: Session, batch: pb.EventBatch) -> None:
            for e in batch.events:
                events.append(e)
                if e.kind == Event.TOKENS and e.index == j.tokens:
                    j.chunks.append(e.text)
                    j.tokens += e.tokens

        session = Session("engine", "vllm", "cpu", frozenset(), f"http://127.0.0.1:{port}")
        t0 = time.monotonic()
        try:
            async with aiohttp.ClientSession() as http:
                await asyncio.wait_for(
                    forward(session, j, 1, http, report, lambda s, why: lost.append(why), read_timeout_s=0.5),
                    10,
                )
            took = time.monotonic() - t0
        finally:
            stalled.set()
            await runner.cleanup()
        return events, lost, j, took

    events, lost, served, took = asyncio.run(main())
    assert took < 5, took
    assert [e.kind for e in events] == [Event.TOKENS, Event.FAILED] and not lost
    assert "no answer for 0.5 s" in events[-1].error
    assert served.tokens == 1 and served.text == " a"  # the next attempt resumes after it


@pytest.mark.parametrize("held_back", [0, 1, 2])
def test_each_tokens_log_probability_comes_with_its_tokens_even_one_whose_text_never_came(
    held_back: int,
) -> None:
    """An entry per token, in order: a held-back token's waits for the text that follows, and at
    the end of the output, where that text never comes, goes with the tokens counted from usage."""
    events = asyncio.run(run("length", held_back=held_back, logprobs=True))
    tokens = [e for e in events if e.kind == Event.TOKENS]
    entries = [entry for e in tokens for entry in json.loads(e.logprobs or "[]")]
    assert [entry["logprob"] for entry in entries] == [0.0, -0.5, -1.0]
    assert all(len(json.loads(e.logprobs or "[]")) == e.tokens for e in tokens)


@pytest.mark.parametrize("finish_reason", ["abort", None])
def test_an_engine_that_ends_its_streams_as_it_shuts_down_is_drained_not_offered_them_again(
    finish_reason: str | None,
) -> None:
    """A server shutting down ends its streams a moment before it stops answering its health
    check: asked again after ``SHUTDOWN_GRACE_S``, it is found gone and drained (a request served
    again at once went back to it and failed a second time: integration/test_ray.py saw a third
    attempt)."""
    lost: list[str] = []
    events = asyncio.run(run(finish_reason, healthy=1, lost=lost))
    assert lost and "no longer answers" in lost[0]
    assert all(e.kind != Event.FAILED for e in events)  # lost, not failed: no attempt counted here


def test_an_engine_whose_core_died_says_so_in_its_streams_and_is_drained() -> None:
    """vLLM sends "EngineCore encountered an issue" as a 500 inside every open stream when its
    engine core dies, and its health check fails after: the engine is drained, not offered the
    requests again (they failed there a second time)."""
    error = {"error": {"message": "EngineCore encountered an issue.", "code": 500}}
    lost: list[str] = []
    events = asyncio.run(run("length", error_chunk=error, healthy=False, lost=lost))
    assert lost and "EngineCore encountered an issue" in lost[0] and not events
