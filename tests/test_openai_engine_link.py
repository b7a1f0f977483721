"""The black-box adapter against servers that answer in ways vLLM does not: a real aiohttp server on
loopback plays each one, and the adapter's own link serves a request there. Whatever the server
does, the request ends in exactly one of finished, failed (served again, counted) or requeued (served
again, not counted), never in silence, and a stream that did not finish is never reported finished."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from qlm_plugin.adapters.openai import OpenAIEngineLink, OpenAISettings
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

Event = pb.RequestEvent
KIND = {
    Event.TOKENS: "tokens",
    Event.FINISHED: "finished",
    Event.FAILED: "failed",
    Event.REQUEUED: "requeued",
}


def _chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


#: server behaviour -> the lines of its event stream (bytes, each sent with a blank line after)
STREAMS: dict[str, list[bytes]] = {
    # axum's SSE encoder (TGI, other Rust servers): no space after "data:"
    "no space after data:": [b"data:" + json.dumps(_chunk(w)).encode() for w in (" a", " b")]
    + [b"data:" + json.dumps(_chunk("", "stop")).encode(), b"data:[DONE]"],
    "comments and CRLF": [
        b": ping",
        b"data: " + json.dumps(_chunk(" a", "stop")).encode() + b"\r",
        b"data: [DONE]",
    ],
    "other names for the finish reasons": [b"data: " + json.dumps(_chunk(" a", "eos_token")).encode()],
    "usage with a null count": [
        b"data: " + json.dumps(_chunk(" a", "length")).encode(),
        b'data: {"choices": [], "usage": {"completion_tokens": null}}',
        b"data: [DONE]",
    ],
    # a stream that ended without finishing its request
    "aborted by the server": [b"data: " + json.dumps(_chunk(" a", "abort")).encode(), b"data: [DONE]"],
    "an error mid-stream": [
        b"data: " + json.dumps(_chunk(" a")).encode(),
        b'data: {"error": {"message": "boom", "code": 500}}',
        b"data: [DONE]",
    ],
    "no finish reason": [b"data: " + json.dumps(_chunk(" a")).encode()],
    "llama.cpp's error line": [
        b"data: " + json.dumps(_chunk(" a")).encode(),
        b'error: {"message": "slot died"}',
    ],
    "a token that is not text": [b'data: {"choices": [{"index": 0, "delta": {"content": ["x"]}}]}'],
    "a chunk that is not an object": [b"data: [1, 2]"],
}
FINISHED = {
    "no space after data:": (" a b", "stop"),
    "comments and CRLF": (" a", "stop"),
    "other names for the finish reasons": (" a", "stop"),
    "usage with a null count": (" a", "length"),
}


async def _serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    drive: Callable[[OpenAIEngineLink], Awaitable[None]],
    **settings: Any,
) -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    app.router.add_post("/tokenize", _tokenize_like_llama_cpp)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    link = OpenAIEngineLink(
        OpenAISettings("i0", f"http://127.0.0.1:{runner.addresses[0][1]}", "m", **settings)
    )
    try:
        await drive(link)
    finally:
        await link.close()
        await runner.cleanup()


async def _tokenize_like_llama_cpp(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"tokens": [1, 2] if "content" in body else []})  # it reads "content"


def _stream(lines: list[bytes]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in lines:
            await response.write(line + b"\n\n")
        await response.write_eof()
        return response

    return handler


async def _one(
    link: OpenAIEngineLink, assignment: pb.Assignment, timeout_s: float = 5.0
) -> list[pb.RequestEvent]:
    events: list[pb.RequestEvent] = []
    assert link.start(assignment, events.append)
    for _ in range(int(timeout_s / 0.01)):
        if any(e.kind != Event.TOKENS for e in events):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # nothing after the end
    return events


def _assignment(**spec: Any) -> pb.Assignment:
    fields: dict[str, Any] = {"request_id": "r1", "model": "m", "prompt": "hi", "max_tokens": 10}
    return pb.Assignment(request=pb.RequestSpec(**{**fields, **spec}), attempt=1)


@pytest.mark.parametrize("behaviour", list(STREAMS))
def test_a_request_ends_once_and_only_a_finished_stream_is_reported_finished(behaviour: str) -> None:
    async def drive(link: OpenAIEngineLink) -> None:
        events = await _one(link, _assignment())
        ends = [KIND[e.kind] for e in events if e.kind != Event.TOKENS]
        text = "".join(e.text for e in events if e.kind == Event.TOKENS)
        if behaviour in FINISHED:
            assert ends == ["finished"], events
            assert (text, events[-1].finish_reason) == FINISHED[behaviour]
        else:
            assert ends == ["failed"], events
        assert link.tasks == {} and link.limiter.in_flight == 0

    asyncio.run(_serve(_stream(STREAMS[behaviour]), drive))


def test_an_overloaded_server_gets_the_request_back_to_the_queue_and_a_pause() -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "too many requests"}}, status=429)

    asked: list[float] = []

    async def counted(request: web.Request) -> web.Response:
        asked.append(asyncio.get_running_loop().time())
        return await busy(request)

    async def drive(link: OpenAIEngineLink) -> None:
        events = await _one(link, _assignment())
        assert [KIND[e.kind] for e in events] == ["requeued"]
        assert link.free_slots() == 0  # nothing more for a moment
        # ... and a request the coordinator sends straight back waits here for that moment: it
        # was sent again at once, 500 times a second while its client waited
        again = await _one(link, _assignment(), timeout_s=3.0)
        assert [KIND[e.kind] for e in again] == ["requeued"]
        assert len(asked) == 2 and asked[1] - asked[0] >= 0.9, asked

    asyncio.run(_serve(counted, drive))


def test_the_limit_learns_from_the_pace_after_the_first_token() -> None:
    """Total time over tokens counted the first token's wait (all of a 1-token answer's time): on
    a server with room to spare, short answers looked 5x slow and the limit fell to 1."""
    ttft_s, per_token_s = 0.05, 0.01

    async def paced(request: web.Request) -> web.StreamResponse:
        n = int((await request.json())["max_tokens"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(per_token_s)
            finish = "length" if i == n - 1 else None
            await response.write(b"data: " + json.dumps(_chunk(" a", finish)).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def drive(link: OpenAIEngineLink) -> None:
        for i, n in enumerate([1, 1, 20, 1, 1, 20]):
            await _one(link, _assignment(request_id=f"r{i}", max_tokens=n))
        assert link.limiter.best is not None and link.limiter.best < 2 * per_token_s, link.limiter.best
        assert link.limiter.limit >= 4  # never cut

    asyncio.run(_serve(paced, drive))


def test_an_eviction_in_the_same_turn_as_its_assignment_requeues_it() -> None:
    async def drive(link: OpenAIEngineLink) -> None:
        events: list[pb.RequestEvent] = []
        link.start(_assignment(), events.append)
        link.execute(pb.Command(evict=pb.Evict(request_id="r1")))  # before the task ran
        await asyncio.sleep(0.1)
        assert [KIND[e.kind] for e in events] == ["requeued"]
        assert link.tasks == {} and link.held() == [] and link.waiting_here() == 0

    asyncio.run(_serve(_stream([b"data: [DONE]"]), drive))


def test_a_constrained_request_is_not_evicted_by_abort() -> None:
    """Here an eviction is an abort: a structured output would then be made again from its start,
    or fail where its client saw part of it. The order is declined; the request runs on."""

    async def drive(link: OpenAIEngineLink) -> None:
        events: list[pb.RequestEvent] = []
        constrained = _assignment(sampling={"response_format": '{"type": "json_object"}'})
        link.start(constrained, events.append)
        ack = link.execute(pb.Command(evict=pb.Evict(request_id="r1")))
        assert isinstance(ack, pb.CommandAck) and not ack.ok and "constrained" in ack.error
        while "r1" in link.tasks:
            await asyncio.sleep(0.01)
        assert [KIND[e.kind] for e in events if e.kind != Event.TOKENS] == ["finished"]
        plain = _assignment(request_id="r2", sampling={"response_format": '{"type": "text"}'})
        link.start(plain, events.append)
        ack = link.execute(pb.Command(evict=pb.Evict(request_id="r2")))
        assert isinstance(ack, pb.CommandAck) and ack.ok  # asks for nothing: evicted as any

    asyncio.run(_serve(_stream([b"data: " + json.dumps(_chunk(" a", "stop")).encode()]), drive))


def test_a_resume_whose_text_the_server_tokenizes_to_nothing_fails_rather_than_restarting() -> None:
    async def drive(link: OpenAIEngineLink) -> None:
        a = _assignment(prompt="", prompt_token_ids=[5, 6, 7])
        a.attempt, a.resume_tokens, a.resume_text = 2, 2, " w x"
        events = await _one(link, a)
        assert [KIND[e.kind] for e in events] == ["failed"]
        assert "no token ids" in events[-1].error

    asyncio.run(_serve(_stream([b"data: " + json.dumps(_chunk(" z", "length")).encode()]), drive))


def test_a_chunk_of_several_tokens_counts_as_its_log_probabilities_say() -> None:
    """A server may send several tokens in one chunk: counted as one, the request's count fell
    short and its entries outnumbered its tokens. With log probabilities asked for, each token has
    an entry, held with a token whose text comes later."""

    def scored(text: str, tokens: list[str], finish: str | None = None) -> bytes:
        chunk = _chunk(text, finish)
        chunk["choices"][0]["logprobs"] = {"tokens": tokens, "token_logprobs": [-1.0] * len(tokens)}
        return b"data: " + json.dumps(chunk).encode()

    lines = [scored(" a b", [" a", " b"]), scored("", ["x"]), scored(" c", [" c"], "length"), b"data: [DONE]"]

    async def drive(link: OpenAIEngineLink) -> None:
        events = await _one(link, _assignment(sampling={"logprobs": "1"}))
        tokens = [e for e in events if e.kind == Event.TOKENS]
        assert [(e.index, e.tokens, e.text) for e in tokens] == [(0, 2, " a b"), (2, 2, " c")]
        assert [len(json.loads(e.logprobs)) for e in tokens] == [2, 2]
        assert events[-1].kind == Event.FINISHED

    asyncio.run(_serve(_stream(lines), drive))


def test_the_request_spans_trace_context_goes_to_the_server() -> None:
    """The coordinator's trace context for the request reaches the engine's server as headers (it
    had X-Request-Id only): a server that traces puts its spans in the client's trace."""
    seen: list[Any] = []
    ok = _stream([b"data: " + json.dumps(_chunk(" a", "stop")).encode(), b"data: [DONE]"])

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.copy())  # case-insensitive
        return await ok(request)

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async def drive(link: OpenAIEngineLink) -> None:
        a = _assignment()
        a.trace_context["traceparent"] = parent
        await _one(link, a)
        await _one(link, _assignment(request_id="r2"))  # none while the coordinator does not trace

    asyncio.run(_serve(handler, drive))
    assert seen[0]["traceparent"] == parent and seen[0]["x-request-id"] == "r1.1"
    assert "traceparent" not in seen[1]


def test_a_late_abort_of_an_earlier_attempt_leaves_the_newer_one_running() -> None:
    """The abort named an attempt, and the link ignored it: a stale abort for attempt 1 killed
    attempt 2 of the same request, sent to this instance since."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await release.wait()
        await response.write(b"data: " + json.dumps(_chunk(" a", "stop")).encode() + b"\n\n")
        return response

    async def drive(link: OpenAIEngineLink) -> None:
        events: list[pb.RequestEvent] = []
        second = _assignment()
        second.attempt = 2
        assert link.start(second, events.append)
        await asyncio.sleep(0.1)
        ack = link.execute(pb.Command(abort=pb.Abort(request_id="r1", attempt=1)))
        assert isinstance(ack, pb.CommandAck) and not ack.ok and "newer attempt" in ack.error
        release.set()
        for _ in range(200):
            if any(e.kind == Event.FINISHED for e in events):
                break
            await asyncio.sleep(0.01)
        assert [KIND[e.kind] for e in events][-1] == "finished"
        assert link.execute(pb.Command(abort=pb.Abort(request_id="r1", attempt=2))).ok  # type: ignore[union-attr]

    asyncio.run(_serve(slow, drive))
