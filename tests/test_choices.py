"""Several choices per request (OpenAI's ``n``) through the front door, driven by the official SDK
against a coordinator and simulated instances on loopback: each choice its own request, merged in
order whole and streamed (directly and through a front-door worker), the prompt counted once in
the usage, seeds that differ per choice, all-or-nothing at submission and at the end, an idempotent
retry that finds every choice, and a batch line asking for several."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator import choices
from qlm_plugin.coordinator.http_api import parse_openai
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, run_batch, run_with_stack

MODEL = "llama-3.1-8b"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


def test_choices_are_answered_whole_in_order_with_the_prompt_counted_once(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            chat = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, n=3, max_tokens=6
            )
            text = await c.completions.create(model=MODEL, prompt="hello", n=2, max_tokens=4)
            one = await c.completions.with_raw_response.create(model=MODEL, prompt="hello", max_tokens=4)
        answer = chat.parse()
        rids = chat.headers["x-qlm-request-ids"].split(",")
        assert len(rids) == 3 and len(set(rids)) == 3 and answer.id == f"chatcmpl-{rids[0]}"
        assert [c.index for c in answer.choices] == [0, 1, 2]
        for choice, rid in zip(answer.choices, rids, strict=True):
            assert choice.message.content == synthetic_text(rid, 0, 6)  # each its own request's output
            assert choice.message.role == "assistant" and choice.finish_reason == "length"
        assert answer.usage is not None
        prompt = stack.coordinator.lookup(rids[0]).request.prompt_tokens  # type: ignore[union-attr]
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, 18)
        assert answer.usage.total_tokens == prompt + 18
        facts = answer.model_extra["qlm"]["choices"]  # type: ignore[index]
        assert [f["request_id"] for f in facts] == rids and all(f["slo_met"] is not None for f in facts)
        # each choice was a request of its own, queued and served: every one is kept finished
        for rid in rids:
            job = stack.coordinator.lookup(rid)
            assert job is not None and job.state == "finished" and job.tokens == 6
        assert [c.index for c in text.choices] == [0, 1]
        assert text.choices[0].text != text.choices[1].text
        assert text.usage is not None and text.usage.completion_tokens == 8
        assert len(one.parse().choices) == 1 and "x-qlm-request-ids" not in one.headers
        assert "choices" not in (one.parse().model_extra or {})["qlm"]

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.parametrize("via_worker", [False, True])
def test_choices_stream_interleaved_each_with_its_index_and_its_end(tmp_path: Path, via_worker: bool) -> None:
    async def check(stack: LocalStack) -> None:
        if via_worker:
            assert stack.server.workers is not None and len(stack.server.workers.pids) == 1
        async with client(stack) as c:
            stream = await c.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                n=3,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            texts = [
                chunk
                async for chunk in await c.completions.create(
                    model=MODEL, prompt="hello", n=2, max_tokens=5, stream=True
                )
            ]
        content: dict[int, str] = {}
        roles: dict[int, int] = {}
        ends: dict[int, str | None] = {}
        for chunk in chunks[:-1]:
            (choice,) = chunk.choices  # one choice a chunk, as vLLM sends them
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            roles[choice.index] = roles.get(choice.index, 0) + (choice.delta.role == "assistant")
            if choice.finish_reason is not None:
                ends[choice.index] = choice.finish_reason
        assert sorted(content) == [0, 1, 2] and roles == {0: 1, 1: 1, 2: 1}
        assert ends == {0: "length", 1: "length", 2: "length"}
        assert len(set(content.values())) == 3  # three requests, three outputs
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 36
        # as OpenAI's: every chunk before it has "usage": null; asked for no usage, none has the key
        assert all("usage" in chunk.model_fields_set and chunk.usage is None for chunk in chunks[:-1])
        assert not any("usage" in piece.model_fields_set for piece in texts)
        by_index: dict[int, str] = {}
        for piece in texts:
            for part in piece.choices:
                by_index[part.index] = by_index.get(part.index, "") + part.text
        assert sorted(by_index) == [0, 1] and by_index[0] != by_index[1]

    config = {"http": {"port": 0, "workers": 1}} if via_worker else None
    run_with_stack(tmp_path, check, instances=2, config=config)


def test_each_choice_is_sampled_with_its_own_seed_and_kept_under_its_own_key() -> None:
    spec, _, _ = parse_openai(
        {"model": MODEL, "prompt": "x", "n": 3, "seed": 7}, {"idempotency-key": "k"}, False
    )
    specs = choices.choice_specs(spec, choices.choices_asked({"n": 3}))
    assert [json.loads(s.sampling["seed"]) for s in specs] == [7, 8, 9]
    assert [s.idempotency_key for s in specs] == ["k", "k#2", "k#3"]
    assert [(s.choices, s.choice) for s in specs] == [(3, 0), (3, 1), (3, 2)]
    assert all(s.prompt == "x" and s.model == MODEL for s in specs)
    top = pb.RequestSpec(model=MODEL, prompt="x", sampling={"seed": str(2**63 - 1)})
    assert [json.loads(s.sampling["seed"]) for s in choices.choice_specs(top, 2)] == [2**63 - 1, 2**63 - 2]
    unseeded = choices.choice_specs(pb.RequestSpec(model=MODEL, prompt="x"), 2)
    assert all("seed" not in s.sampling and not s.idempotency_key for s in unseeded)
    assert choices.choice_specs(spec, 1) == [spec]  # one choice: the request as it came


def test_choices_are_accepted_only_where_the_tenant_has_room_for_all(tmp_path: Path) -> None:
    """The first choice holds its tenant's room for every choice: with one slot of three taken, a
    request for three is refused at once (429) with none of them queued, and its retry with the
    same key is served once the room is there; more choices than the tenant may ever have
    unfinished is a 400 naming ``n``."""

    async def check(stack: LocalStack) -> None:
        long = {"model": MODEL, "prompt": "hold", "max_tokens": 2000, "ignore_eos": True}
        async with client(stack) as c, aiohttp.ClientSession() as http:
            holder = asyncio.ensure_future(http.post(f"{stack.http_url}/v1/completions", json=long))
            while not stack.coordinator.book.jobs:
                await asyncio.sleep(0.01)
            (held,) = stack.coordinator.book.jobs
            keyed = {"extra_headers": {"Idempotency-Key": "three"}}
            with pytest.raises(openai.RateLimitError) as refused:
                await c.completions.create(model=MODEL, prompt="hello", n=3, max_tokens=5, **keyed)  # type: ignore[arg-type]
            assert "3 more asked" in refused.value.message
            assert list(stack.coordinator.book.jobs) == [held]  # none of the three was queued
            stack.coordinator.cancel(held, "made room")
            (await holder).close()
            answer = await c.completions.create(model=MODEL, prompt="hello", n=3, max_tokens=5, **keyed)  # type: ignore[arg-type]
            assert [choice.index for choice in answer.choices] == [0, 1, 2]
            with pytest.raises(openai.BadRequestError) as never:
                await c.completions.create(model=MODEL, prompt="hello", n=4, max_tokens=5)
            assert never.value.body["param"] == "n"  # type: ignore[index]

    run_with_stack(tmp_path, check, instances=2, config={"tenant_limits": {"max_queued_requests": 3}})


def test_choices_accepted_before_another_was_refused_give_up_their_keys(tmp_path: Path) -> None:
    """Where the room went to others between the first choice and the rest, the choices accepted
    are cancelled and give up their keys, in memory and in the journal: the retry is new."""
    from qlm_plugin.coordinator.jobs import CHOICE_REFUSED

    async def check(stack: LocalStack) -> None:
        coord = stack.coordinator
        spec = pb.RequestSpec(model=MODEL, prompt="x", max_tokens=4, idempotency_key="k", choices=2)
        job, _ = await coord.submit(spec)
        coord.cancel(job.id, CHOICE_REFUSED)
        await coord.journal.flush()
        assert job.state == "cancelled" and coord.journal.find_idempotent("default", "k") is None
        again, duplicate = await coord.submit(
            pb.RequestSpec(model=MODEL, prompt="x", max_tokens=4, idempotency_key="k", choices=2)
        )
        assert not duplicate and again.id != job.id

    run_with_stack(tmp_path, check, instances=1)


def test_a_key_sent_again_with_another_n_is_a_conflict(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            keyed = {"extra_headers": {"Idempotency-Key": "K"}}
            await c.completions.create(model=MODEL, prompt="hello", n=2, max_tokens=3, **keyed)  # type: ignore[arg-type]
            for n in (1, 3):
                with pytest.raises(openai.UnprocessableEntityError) as conflict:
                    await c.completions.create(model=MODEL, prompt="hello", n=n, max_tokens=3, **keyed)  # type: ignore[arg-type]
                assert "another n" in conflict.value.message
            with pytest.raises(openai.UnprocessableEntityError):  # a key of one of its choices
                await c.completions.create(
                    model=MODEL, prompt="hello", max_tokens=3, extra_headers={"Idempotency-Key": "K#2"}
                )
        assert len(all_jobs(stack)) == 2

    run_with_stack(tmp_path, check, instances=2)


def test_a_batchs_share_of_its_tenant_counts_each_choice(tmp_path: Path) -> None:
    """A tenant's batches hold at most half its limit: in requests, so lines of two choices take
    two each and its interactive requests still get in."""

    async def check(stack: LocalStack) -> None:
        body = {"model": MODEL, "prompt": "hello", "n": 2, "max_tokens": 300, "ignore_eos": True}
        rows = [
            {"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(6)
        ]
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        async with client(stack) as c:
            f = await c.files.create(file=("in.jsonl", data), purpose="batch")
            batch = await c.batches.create(
                input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
            )
            while len(stack.coordinator.book.jobs) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert sum(not job.done.is_set() for job in stack.coordinator.book.jobs.values()) <= 2
            answer = await c.completions.create(model=MODEL, prompt="interactive", max_tokens=2)
            assert answer.choices[0].finish_reason == "length"
            await c.batches.cancel(batch.id)

    run_with_stack(tmp_path, check, instances=2, config={"tenant_limits": {"max_queued_requests": 4}})


@pytest.mark.parametrize("streams", [False, True])
def test_a_choice_that_fails_fails_the_answer_and_ends_the_others(tmp_path: Path, streams: bool) -> None:
    async def check(stack: LocalStack) -> None:
        async def cancel_one() -> None:
            while len(stack.coordinator.book.jobs) < 3 or not any(
                job.tokens for job in stack.coordinator.book.jobs.values()
            ):
                await asyncio.sleep(0.01)
            stack.coordinator.cancel(next(iter(stack.coordinator.book.jobs)), "cancelled by an operator")

        body = {"model": MODEL, "prompt": "hello", "n": 3, "max_tokens": 400, "ignore_eos": True}
        async with aiohttp.ClientSession() as http:
            canceller = asyncio.ensure_future(cancel_one())
            async with http.post(f"{stack.http_url}/v1/completions", json={**body, "stream": streams}) as r:
                raw = await r.text()
            await canceller
        if streams:
            events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
            assert "error" in events[-1] and "cancelled by an operator" in events[-1]["error"]["message"]
            assert raw.rstrip().endswith("data: [DONE]")
        else:
            assert r.status == 499 and "cancelled by an operator" in json.loads(raw)["error"]["message"]
        for _ in range(200):  # the other two are cancelled, not served to their end for no one
            if all(job.done.is_set() for job in stack.coordinator.book.jobs.values()):
                break
            await asyncio.sleep(0.01)
        states = sorted(job.state for job in all_jobs(stack))
        assert states == ["cancelled"] * 3, states
        assert all(job.tokens < 400 for job in all_jobs(stack))

    run_with_stack(tmp_path, check, instances=2)


def all_jobs(stack: LocalStack) -> list[Any]:
    """Every request the coordinator holds or has finished recently."""
    book = stack.coordinator.book
    ids = list(book.jobs) + [rid for rid in book.finished]
    return [job for rid in dict.fromkeys(ids) if (job := stack.coordinator.lookup(rid)) is not None]


def test_a_client_leaving_a_stream_of_choices_cancels_every_one(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        body = {"model": MODEL, "prompt": "hello", "n": 3, "max_tokens": 400, "ignore_eos": True}
        url = f"{stack.http_url}/v1/completions"
        async with aiohttp.ClientSession() as http, http.post(url, json={**body, "stream": True}) as r:
            await r.content.readline()  # the first chunk: the requests are running
        for _ in range(500):
            if len(all_jobs(stack)) == 3 and all(job.state == "cancelled" for job in all_jobs(stack)):
                break
            await asyncio.sleep(0.01)
        assert [job.state for job in all_jobs(stack)] == ["cancelled"] * 3

    run_with_stack(tmp_path, check, instances=2)


def test_a_retry_with_the_idempotency_key_gets_the_same_choices(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            create = c.chat.completions.with_raw_response.create

            async def ask(n: int, key: str) -> Any:
                return await create(
                    model=MODEL, messages=MESSAGES, n=n, max_tokens=5, extra_headers={"Idempotency-Key": key}
                )

            first, again, other = await ask(2, "order-17"), await ask(2, "order-17"), await ask(3, "order-18")
        assert first.headers["x-qlm-request-ids"] == again.headers["x-qlm-request-ids"]
        assert [ch.message.content for ch in first.parse().choices] == [
            ch.message.content for ch in again.parse().choices
        ]
        assert len(all_jobs(stack)) == 5  # served once each: 2, then 3 of another key
        assert len(other.parse().choices) == 3

    run_with_stack(tmp_path, check, instances=2)


def test_the_responses_api_and_bad_counts_are_refused_naming_n(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with aiohttp.ClientSession() as http:
            for path, body in (
                ("/v1/responses", {"model": MODEL, "input": "hi", "n": 2}),
                ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}),
                ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 129}),
                ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": "2"}),
            ):
                async with http.post(f"{stack.http_url}{path}", json=body) as r:
                    error = (await r.json())["error"]
                    assert (r.status, error["param"]) == (400, "n"), (path, body, error)
        assert not all_jobs(stack)

    run_with_stack(tmp_path, check, instances=1)


def test_a_batch_line_asking_for_several_choices_gets_them_in_its_answer(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        rows = [
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": MESSAGES, "n": i + 1, "max_tokens": 4, "seed": 3},
            }
            for i in range(3)
        ]
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        async with client(stack) as c:
            f = await c.files.create(file=("in.jsonl", data), purpose="batch")
            batch = await c.batches.create(
                input_file_id=f.id,
                endpoint="/v1/chat/completions",
                completion_window="1h",  # type: ignore[arg-type]  # the SDK's type knows only 24h
            )
            for _ in range(600):
                batch = await c.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert batch.status == "completed" and batch.output_file_id is not None
            out = [json.loads(x) for x in (await c.files.content(batch.output_file_id)).text.splitlines()]
        assert batch.request_counts is not None and batch.request_counts.completed == 3
        assert batch.usage is not None and batch.usage.output_tokens == 4 * (1 + 2 + 3)
        for i, line in enumerate(out):
            answer = line["response"]["body"]
            assert [ch["index"] for ch in answer["choices"]] == list(range(i + 1))
            assert answer["usage"]["completion_tokens"] == 4 * (i + 1)
            seeds = [
                json.loads(stack.coordinator.lookup(f["request_id"]).spec.sampling["seed"])  # type: ignore[union-attr]
                for f in answer["qlm"].get("choices", [answer["qlm"]])
            ]
            assert seeds == [3 + k for k in range(i + 1)]

    run_with_stack(tmp_path, check, instances=2)


def test_a_completion_of_several_prompts_answers_each_prompts_choices_in_order(tmp_path: Path) -> None:
    """A list of prompts is a request per prompt and choice, answered in vLLM's order (prompt 0's
    choices, then prompt 1's), each prompt counted once in the usage; streamed the same; a seed
    gives a prompt's choices the seeds it would get alone."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            whole = await c.completions.with_raw_response.create(
                model=MODEL, prompt=["first prompt", "second"], n=2, max_tokens=3, seed=5
            )
            alone = await c.completions.with_raw_response.create(model=MODEL, prompt="second", max_tokens=3)
            streamed = [
                chunk
                async for chunk in await c.completions.create(
                    model=MODEL,
                    prompt=[[1, 2, 3], [4]],
                    max_tokens=4,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            ]
        answer = whole.parse()
        rids = whole.headers["x-qlm-request-ids"].split(",")
        assert [ch.index for ch in answer.choices] == [0, 1, 2, 3] and len(rids) == 4
        jobs = [stack.coordinator.lookup(rid) for rid in rids]
        assert [job.spec.prompt for job in jobs if job is not None] == ["first prompt"] * 2 + ["second"] * 2
        seeds = [json.loads(job.spec.sampling["seed"]) for job in jobs if job is not None]
        assert seeds == [5, 6, 5, 6]  # each prompt's choices: seed + i
        for choice, rid in zip(answer.choices, rids, strict=True):
            assert choice.text == synthetic_text(rid, 0, 3)
        alone_tokens = alone.parse().usage.prompt_tokens  # type: ignore[union-attr]
        first_tokens = jobs[0].request.prompt_tokens  # type: ignore[union-attr]
        assert answer.usage is not None and answer.usage.prompt_tokens == first_tokens + alone_tokens
        assert answer.usage.completion_tokens == 12
        by_index: dict[int, str] = {}
        for piece in streamed:
            for part in piece.choices:
                by_index[part.index] = by_index.get(part.index, "") + part.text
        assert sorted(by_index) == [0, 1] and all(by_index.values())
        assert (
            streamed[-1].usage is not None and streamed[-1].usage.prompt_tokens == 3 + 1
        )  # token ids: exact

    run_with_stack(tmp_path, check, instances=2)


def test_a_batch_line_of_several_prompts_answers_each_prompts_choices(tmp_path: Path) -> None:
    """A line of several prompts is a request per prompt and choice, answered as one line in
    vLLM's order; a prompt too long for the model fails the batch's validation naming it."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            batch = await run_batch(c, [{"model": MODEL, "prompt": ["a b", "c"], "n": 2, "max_tokens": 3}])
            assert batch.status == "completed" and batch.output_file_id is not None
            (line,) = [json.loads(x) for x in (await c.files.content(batch.output_file_id)).text.splitlines()]
            too_long = await run_batch(
                c, [{"model": MODEL, "prompt": ["fine", "x" * 200_000], "max_tokens": 3}]
            )
            # each prompt counted as it is (the first's count was the others' too: a longer
            # one after a short one failed as "fewer tokens than any tokenizer makes")
            long = " ".join(f"word{i}" for i in range(300))
            bodies = [{"model": MODEL, "prompt": p, "max_tokens": 2} for p in (["hi", long], [long, "hi"])]
            online = [(await c.completions.create(**body)).usage for body in bodies]  # type: ignore[call-overload]
            uneven = await run_batch(c, bodies)
            assert uneven.output_file_id is not None
            uneven_lines = (await c.files.content(uneven.output_file_id)).text.splitlines()
        usages = [json.loads(x)["response"]["body"]["usage"]["prompt_tokens"] for x in uneven_lines]
        assert uneven.status == "completed" and uneven.request_counts.completed == 2
        assert [u.prompt_tokens for u in online] == usages and usages[0] == usages[1]
        assert uneven.usage is not None and uneven.usage.input_tokens == sum(usages)
        answer = line["response"]["body"]
        rids = [f["request_id"] for f in answer["qlm"]["choices"]]
        prompts = [stack.coordinator.lookup(rid).spec.prompt for rid in rids]  # type: ignore[union-attr]
        assert prompts == ["a b", "a b", "c", "c"] and [ch["index"] for ch in answer["choices"]] == [
            0,
            1,
            2,
            3,
        ]
        assert answer["usage"]["completion_tokens"] == 12 and batch.request_counts.completed == 1
        assert too_long.status == "failed" and too_long.errors is not None
        (error,) = too_long.errors.data
        assert error.param == "body.prompt[1]", error

    run_with_stack(tmp_path, check, instances=2)
