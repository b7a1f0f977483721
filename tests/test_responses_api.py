"""OpenAI's Responses API at the front door, driven by the official SDK against a coordinator and
simulated instances on loopback: a response, its stream of typed events, its retrieval, a batch of
responses, and a clear 400 for what the coordinator cannot carry."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import Response

from qlm_plugin.coordinator import responses_api
from qlm_plugin.coordinator.jobs import REFUSED, Job
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, run_with_stack

MODEL = "llama-3.1-8b"


def client(stack: LocalStack, token: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=token, max_retries=0)


def test_a_response_is_served_as_a_chat_and_kept(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            answer = await c.responses.create(
                model=MODEL,
                instructions="Answer briefly.",
                input=[
                    {"role": "developer", "content": "No lists."},
                    {"role": "user", "content": [{"type": "input_text", "text": "Hello?"}]},
                ],
                max_output_tokens=6,
                metadata={"ticket": "42"},
                extra_body={"qlm": {"class": "batch"}},
            )
            kept = await c.responses.retrieve(answer.id)
            items = await c.responses.input_items.list(answer.id, order="asc")
            with pytest.raises(openai.NotFoundError):
                await c.responses.retrieve("resp_nothing")
        assert answer.object == "response" and answer.status == "incomplete"  # its max_output_tokens
        assert answer.incomplete_details is not None
        assert answer.incomplete_details.reason == "max_output_tokens"
        assert answer.output_text and answer.usage is not None and answer.usage.output_tokens == 6
        assert answer.metadata == {"ticket": "42"} and answer.max_output_tokens == 6
        job = stack.coordinator.lookup(answer.id.removeprefix("resp_"))
        assert job is not None and job.request.slo_class == "batch"
        roles = [m["role"] for m in json.loads(job.spec.chat_messages)]
        assert roles == ["system", "system", "user"]  # instructions first; a developer's is a system's
        # ... for the engine only: its input items are the request's own, roles as it gave them
        assert [(i.type, getattr(i, "role", None)) for i in items.data] == [
            ("message", "developer"),
            ("message", "user"),
        ]
        assert (kept.status, kept.output_text) == ("incomplete", answer.output_text)
        assert answer.completed_at is None and answer.output[0].status == "incomplete"  # as OpenAI's
        assert answer.tool_choice == "auto"
        # the SDK's own model of a response takes it as it is, strictly
        Response.model_validate(answer.model_dump(exclude_unset=True))

    run_with_stack(tmp_path, check, instances=2)


def test_a_response_is_retrieved_by_its_own_tenant_only(tmp_path: Path) -> None:
    tokens = [
        {"token_env": "ACME", "scopes": ["client"], "tenant": "acme"},
        {"token_env": "OTHER", "scopes": ["client"], "tenant": "other"},
        {"token_env": "INSTANCES", "scopes": ["instance"]},
    ]
    env = {"ACME": "acme-token", "OTHER": "other-token", "INSTANCES": "instance-token"}

    async def check(stack: LocalStack) -> None:
        async with client(stack, "acme-token") as acme, client(stack, "other-token") as other:
            answer = await acme.responses.create(model=MODEL, input="hi", max_output_tokens=2)
            assert (await acme.responses.retrieve(answer.id)).id == answer.id
            with pytest.raises(openai.NotFoundError):  # another tenant's: as if it did not exist
                await other.responses.retrieve(answer.id)
            with pytest.raises(openai.BadRequestError) as continued:  # nor can it be continued
                await other.responses.create(model=MODEL, previous_response_id=answer.id, input="more")
            assert continued.value.code == "previous_response_not_found"
            more = await acme.responses.create(model=MODEL, previous_response_id=answer.id, input="more")
            assert more.previous_response_id == answer.id
            running = await acme.responses.create(
                model=MODEL, input="long", max_output_tokens=400, stream=True, extra_body={"ignore_eos": True}
            )
            running_id = ""
            async for event in running:
                if event.type == "response.created":
                    running_id = event.response.id
                    break
            for tries in ({"input": "x"}, {"input": "x", "temperature": 5}):  # nothing said of another's
                with pytest.raises(openai.BadRequestError) as hidden:
                    await other.responses.create(model=MODEL, previous_response_id=running_id, **tries)  # type: ignore[arg-type]
                assert hidden.value.code == "previous_response_not_found"
            await running.close()
        async with client(stack, "nobody") as nobody:
            with pytest.raises(openai.AuthenticationError):
                await nobody.responses.retrieve(answer.id)

    config = {"tokens": tokens}
    run_with_stack(tmp_path, check, instances=1, config=config, env=env, token="instance-token")


@pytest.mark.parametrize("via_worker", [False, True])
def test_a_response_continues_a_kept_one_named_by_its_id(tmp_path: Path, via_worker: bool) -> None:
    """``previous_response_id``: the new request's conversation is the kept response's (its input
    without its instructions, then its output), then the new input; chained, each goes on from
    the last. Its instructions and metadata are echoed, also when retrieved."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            first = await c.responses.create(
                model=MODEL,
                instructions="Be brief.",
                input="Hello?",
                max_output_tokens=4,
                metadata={"k": "v"},
            )
            second = await c.responses.create(
                model=MODEL,
                previous_response_id=first.id,
                instructions="Be kind.",
                input="And?",
                max_output_tokens=4,
            )
            third = await c.responses.create(
                model=MODEL,
                previous_response_id=second.id,
                input=[{"role": "user", "content": "Last."}],
                max_output_tokens=3,
            )
            kept_first, kept_second = (
                await c.responses.retrieve(first.id),
                await c.responses.retrieve(second.id),
            )
            # compressed: a worker passes on the body it read (decoded), not the client's encoding
            raw = json.dumps({"model": MODEL, "previous_response_id": first.id, "input": "Zip?"}).encode()
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{stack.http_url}/v1/responses",
                    data=gzip.compress(raw),
                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
                ) as zipped,
            ):
                assert zipped.status == 200, await zipped.text()
            running = await c.responses.create(
                model=MODEL,
                input="Long.",
                max_output_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            running_id = ""
            async for event in running:
                if event.type == "response.created":
                    running_id = event.response.id
                if event.type == "response.output_text.delta":
                    break
            with pytest.raises(openai.BadRequestError) as early:
                await c.responses.create(model=MODEL, previous_response_id=running_id, input="x")
            await running.close()

        def conversation(answer: Any) -> list[tuple[str, str]]:
            job = stack.coordinator.lookup(answer.id.removeprefix("resp_"))
            assert job is not None
            return [(m["role"], m["content"]) for m in json.loads(job.spec.chat_messages)]

        said = [first.output_text, second.output_text]
        assert conversation(second) == [
            ("system", "Be kind."),
            ("user", "Hello?"),
            ("assistant", said[0]),
            ("user", "And?"),
        ]
        assert conversation(third) == [
            ("user", "Hello?"),
            ("assistant", said[0]),
            ("user", "And?"),
            ("assistant", said[1]),
            ("user", "Last."),
        ]
        assert (second.previous_response_id, third.previous_response_id) == (first.id, second.id)
        assert (kept_first.instructions, kept_first.metadata) == ("Be brief.", {"k": "v"})
        assert (kept_second.instructions, kept_second.previous_response_id) == ("Be kind.", first.id)
        assert early.value.body["param"] == "previous_response_id"  # type: ignore[index]
        assert "still in progress" in early.value.body["message"]  # type: ignore[index]

    config = {"http": {"port": 0, "workers": 1}} if via_worker else None
    run_with_stack(tmp_path, check, instances=2, config=config)


@pytest.mark.parametrize("via_worker", [False, True])
def test_a_kept_response_is_listed_cancelled_deleted_or_not_kept_at_all(
    tmp_path: Path, via_worker: bool
) -> None:
    """What the SDK does with a kept response besides ``retrieve``: its input items (its own
    input only, paged as OpenAI's), ``cancel`` (one running ends cancelled), ``delete`` (gone for
    good: not retrieved, not continued, not back after a restart of the lookup); and a response
    asked with ``store: false`` is not kept for either."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            first = await c.responses.create(
                model=MODEL, instructions="Be brief.", input="Hello?", max_output_tokens=3
            )
            second = await c.responses.create(
                model=MODEL,
                previous_response_id=first.id,
                instructions="Be kind.",
                input=[  # a call first: its own turn, not the continued response's
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "42"},
                    {"role": "user", "content": "Thanks."},
                ],
                max_output_tokens=3,
            )
            newest_first = await c.responses.input_items.list(second.id)
            oldest_first = await c.responses.input_items.list(second.id, order="asc", limit=2)
            rest = await c.responses.input_items.list(second.id, order="asc", after=oldest_first.data[-1].id)
            with pytest.raises(openai.BadRequestError) as bad_limit:
                await c.responses.input_items.list(second.id, limit=101)
            with pytest.raises(openai.BadRequestError) as no_call:  # answers no call made before it
                await c.responses.create(
                    model=MODEL, input=[{"type": "function_call_output", "call_id": "c9", "output": "1"}]
                )

            running = await c.responses.create(
                model=MODEL,
                input="Long.",
                max_output_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            running_id, ended = "", ""
            async for event in running:
                if event.type == "response.created":
                    assert event.response.usage is None  # as OpenAI's: counted once ended
                    running_id = event.response.id
                if event.type == "response.output_text.delta" and not ended:
                    with pytest.raises(openai.BadRequestError) as running_deleted:
                        await c.responses.delete(running_id)
                    cancelled = await c.responses.cancel(running_id)
                    ended = cancelled.status
            assert ended == "cancelled"
            assert (await c.responses.cancel(running_id)).status == "cancelled"  # again: as it is

            await c.responses.delete(first.id)
            with pytest.raises(openai.NotFoundError):
                await c.responses.retrieve(first.id)
            with pytest.raises(openai.NotFoundError):
                await c.responses.delete(first.id)
            with pytest.raises(openai.BadRequestError) as deleted_continued:
                await c.responses.create(model=MODEL, previous_response_id=first.id, input="x")

            unkept = await c.responses.create(
                model=MODEL,
                input="Private.",
                store=False,
                max_output_tokens=2,
                extra_headers={"Idempotency-Key": "unkept"},
            )
            retried = await c.responses.create(  # sent again: the same response, not kept
                model=MODEL,
                input="Private.",
                store=False,
                max_output_tokens=2,
                extra_headers={"Idempotency-Key": "unkept"},
            )
            with pytest.raises(openai.UnprocessableEntityError) as other:  # the key, another request
                await c.responses.create(
                    model=MODEL,
                    input="Private.",
                    store=True,
                    max_output_tokens=2,
                    extra_headers={"Idempotency-Key": "unkept"},
                )
            with pytest.raises(openai.NotFoundError):
                await c.responses.retrieve(unkept.id)
            with pytest.raises(openai.BadRequestError) as unkept_continued:
                await c.responses.create(model=MODEL, previous_response_id=unkept.id, input="x")

        kinds = [(i.type, getattr(i, "role", None)) for i in reversed(newest_first.data)]
        assert kinds == [("function_call", None), ("function_call_output", None), ("message", "user")]
        assert [i.id for i in oldest_first.data + rest.data] == [i.id for i in reversed(newest_first.data)]
        assert oldest_first.has_more and not rest.has_more and not newest_first.has_more
        assert newest_first.first_id == newest_first.data[0].id
        assert bad_limit.value.body["param"] == "limit"  # type: ignore[index]
        assert no_call.value.body["param"] == "input[0].call_id"  # type: ignore[index]
        assert running_deleted.value.code == "response_in_progress"
        assert deleted_continued.value.code == "previous_response_not_found"
        assert unkept_continued.value.code == "previous_response_not_found"
        assert unkept.store is False and first.store is True
        assert retried.id == unkept.id and retried.store is False
        assert "store" in other.value.message  # what differs, named
        assert stack.coordinator.book.journal.get(first.id.removeprefix("resp_")) is None  # forgotten
        assert stack.coordinator.lookup(second.id.removeprefix("resp_")) is not None

    config = {"http": {"port": 0, "workers": 1}} if via_worker else None
    run_with_stack(tmp_path, check, instances=1, config=config)


def test_a_streamed_response_sends_openais_events_in_order(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c, c.responses.stream(model=MODEL, input="Tell me a story.") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        kinds = [e.type for e in events]
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        # in progress from the first event, as OpenAI's (the request was queued: it said "queued")
        assert [e.response.status for e in events[:2]] == ["in_progress", "in_progress"]  # type: ignore[union-attr]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",  # it ended by itself (no max_output_tokens)
        ]
        assert deltas and "".join(deltas) == final.output_text
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert final.status == "completed" and final.usage is not None
        Response.model_validate(final.model_dump(exclude_unset=True))
        assert final.usage.output_tokens >= len(deltas)

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"previous_response_id": "resp_x"}, "previous_response_id", "no response 'resp_x'"),
        ({"previous_response_id": "x"}, "previous_response_id", "must be a response id"),
        # valid, but the simulated instances cannot call tools
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
            "tools",
            "cannot serve tool calls",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "only function tools"),
        ({"tools": [{"type": "function", "name": "a b"}]}, "tools[0].name", "letters, digits"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice.name",
            "names no tool given",
        ),
        (
            {"input": [{"type": "reasoning", "summary": []}]},
            "input[0].type",
            "only messages, function calls and their outputs",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ]
            },
            "input[0].content[0]",
            "only text",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "must be one of user, assistant"),
        # an item's field, where instructions and a gathered assistant turn shift the chat's messages
        (
            {
                "instructions": "be brief",
                "input": [
                    {"role": "user", "content": "hi"},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                    {"type": "function_call", "call_id": "c2", "name": "g", "arguments": {"x": 1}},
                ],
            },
            "input[2].arguments",
            "must be a string",
        ),
        (
            {
                "instructions": "be brief",
                "input": [
                    {"role": "user", "content": "hi"},
                    {"type": "function_call_output", "output": "42"},
                ],
            },
            "input[1].call_id",
            "must be a",
        ),
        ({"input": []}, "input", "non-empty"),
        ({"background": True}, "background", "background mode"),
        ({"store": "false"}, "store", "must be true or false"),
        ({"metadata": {"k": {"deep": ["x"]}}}, "metadata", "values up to 512"),  # it is echoed
        # valid, but the simulated instances cannot give log probabilities
        ({"include": ["message.output_text.logprobs"]}, "include", "cannot serve log probabilities"),
        ({"include": ["file_search_call.result"]}, "include[0]", "must be one of code_interpreter_call"),
        ({"truncation": "on"}, "truncation", "must be 'auto' or 'disabled'"),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ({"top_logprobs": 50}, "top_logprobs", "[0, 20]"),  # echoed: checked though nothing is asked
        # a chat's fields: taken silently, they outranked the response's own
        (
            {"max_output_tokens": 100, "max_completion_tokens": 5},
            "max_completion_tokens",
            "max_output_tokens",
        ),
        ({"max_tokens": 5}, "max_tokens", "a response's is max_output_tokens"),
        ({"response_format": {"type": "json_object"}}, "response_format", "text.format"),
        ({"reasoning": "high"}, "reasoning", "must be an object"),
        ({"reasoning": {"effort": "max"}}, "reasoning.effort", "must be one of low, medium, high"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary", "reasoning summaries"),
        ({"max_output_tokens": 0}, "max_output_tokens", "integer in [1,"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": 1}}}},
            "text.format.schema",
            "not a valid JSON Schema",
        ),
        # valid, but the simulated instances cannot constrain their output
        (
            {"text": {"format": {"type": "json_object"}}},
            "text.format",
            "cannot serve structured output",
        ),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_responses_field(
    tmp_path: Path, extra: dict[str, Any], param: str, message: str
) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            with pytest.raises(openai.BadRequestError) as refused:  # as sent (the SDK knows no chat fields)
                await c.responses.create(model=MODEL, input="hi", extra_body=extra)
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == param and message in error["message"]

    run_with_stack(tmp_path, check, instances=1)


def test_a_batch_of_responses(tmp_path: Path) -> None:
    """Lines of ``/v1/responses`` are checked as the endpoint checks them (a bad one fails the
    batch before it runs, naming its line and field) and answered with ``response`` objects."""

    async def run_batch(c: openai.AsyncOpenAI, bodies: list[dict[str, Any]]) -> Any:
        lines = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses", "body": body}
            for i, body in enumerate(bodies)
        ]
        data = "\n".join(json.dumps(line) for line in lines).encode()
        upload = await c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await c.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.1)
            batch = await c.batches.retrieve(batch.id)
        return batch

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            batch = await run_batch(
                c,
                [
                    {
                        "model": MODEL,
                        "input": f"line {i}",
                        "max_output_tokens": 3,
                        "instructions": f"I{i}",
                        "metadata": {"i": str(i)},
                    }
                    for i in range(3)
                ],
            )
            assert batch.status == "completed" and batch.output_file_id, batch.errors
            out = [json.loads(x) for x in (await c.files.content(batch.output_file_id)).text.splitlines()]
            assert [line["custom_id"] for line in out] == ["r0", "r1", "r2"]
            for line in out:
                body = line["response"]["body"]
                assert line["response"]["status_code"] == 200 and body["object"] == "response"
                assert body["output"][0]["content"][0]["text"] and body["usage"]["output_tokens"] == 3
                i = line["custom_id"][1:]
                assert (body["instructions"], body["metadata"]) == (f"I{i}", {"i": i})  # echoed as online
            reasoning = {"model": MODEL, "input": [{"type": "reasoning", "summary": []}]}
            continuing = {"model": MODEL, "input": "more", "previous_response_id": body["id"]}
            batch = await run_batch(c, [{"model": MODEL, "input": "fine"}, reasoning, continuing])
            assert batch.status == "failed" and batch.errors is not None
            assert [(e.line, e.param) for e in batch.errors.data] == [
                (2, "body.input[0].type"),
                (3, "body.previous_response_id"),  # a line is not continued from a kept response
            ]

    run_with_stack(tmp_path, check, instances=2)


def test_a_failed_response_says_whose_fault_it_was() -> None:
    """An engine that refused the request (a value it cannot take) is the prompt's fault, as
    OpenAI codes it; anything else is the server's."""
    request = Request("r1", MODEL, 4, 8, 1.0, SLO(None, None))
    for reason, code in ((REFUSED, "invalid_prompt"), ("error", "server_error")):
        job = Job(request, pb.RequestSpec(request_id="r1", model=MODEL, operation="chat"))
        job.state, job.finish_reason, job.error = (
            "failed",
            reason,
            "instance e refused it: HTTP 400: bad regex",
        )
        answer = responses_api.response_object(job, {}, {})
        assert answer["status"] == "failed" and answer["error"] == {"code": code, "message": job.error}
        Response.model_validate(answer)


def test_a_response_that_ended_short_shows_its_items_as_they_stand() -> None:
    """Cancelled or failed after some text: the text so far, in an incomplete message (it was
    dropped, the message shown as still in progress). Cut at max_output_tokens in a call's
    arguments: that call is incomplete (its arguments may be cut mid-JSON), what came before it
    completed."""
    request = Request("r1", MODEL, 4, 8, 1.0, SLO(None, None))

    def job(state: str, reason: str = "") -> Job:
        j = Job(request, pb.RequestSpec(request_id="r1", model=MODEL, operation="chat", response_echo="{}"))
        j.state, j.finish_reason, j.chunks, j.tokens = state, reason, ["ab", "c"], 3
        return j

    for state in ("cancelled", "failed"):
        answer = responses_api.response_object(job(state), {}, {})
        [message] = answer["output"]
        assert message["status"] == "incomplete" and message["content"][0]["text"] == "abc"
        Response.model_validate(answer)
    cut = job("finished", "length")
    cut.tool_calls = [
        {"index": 0, "id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"index": 1, "id": "c1", "type": "function", "function": {"name": "g", "arguments": '{"x":'}},
    ]
    answer = responses_api.response_object(cut, {}, {})
    assert answer["status"] == "incomplete"
    assert [(item["type"], item["status"]) for item in answer["output"]] == [
        ("message", "completed"),
        ("function_call", "completed"),
        ("function_call", "incomplete"),
    ]
    Response.model_validate(answer)
    whole = responses_api.response_object(job("finished", "stop"), {}, {})
    assert [item["status"] for item in whole["output"]] == ["completed"]


def test_a_chat_completion_is_not_a_response(tmp_path: Path) -> None:
    """Its id under resp_ finds nothing: not retrieved, listed, continued or deleted as a response."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            chat = await c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                extra_headers={"Idempotency-Key": "k1"},
            )
            as_response = "resp_" + chat.id.removeprefix("chatcmpl-")
            with pytest.raises(openai.UnprocessableEntityError) as reused:  # its key, as a response
                await c.responses.create(
                    model=MODEL, input="hi", max_output_tokens=2, extra_headers={"Idempotency-Key": "k1"}
                )
            assert "another endpoint" in reused.value.message
            with pytest.raises(openai.NotFoundError):
                await c.responses.retrieve(as_response)
            with pytest.raises(openai.NotFoundError):
                await c.responses.input_items.list(as_response)
            with pytest.raises(openai.NotFoundError):
                await c.responses.delete(as_response)
            with pytest.raises(openai.BadRequestError) as refused:
                await c.responses.create(model=MODEL, input="more", previous_response_id=as_response)
            assert isinstance(refused.value.body, dict)
            assert refused.value.body["code"] == "previous_response_not_found"
            # a response with nothing of its own to echo is one all the same
            plain = await c.responses.create(model=MODEL, input="hi", max_output_tokens=2)
            assert (await c.responses.retrieve(plain.id)).id == plain.id

    run_with_stack(tmp_path, check, instances=1)


def test_includes_for_items_never_produced_are_accepted(tmp_path: Path) -> None:
    """A stateless client asks for encrypted reasoning with every request; no reasoning item is
    ever produced here, so there is nothing to add, and no reason to refuse it."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            answer = await c.responses.create(
                model=MODEL,
                input="hi",
                store=False,
                include=["reasoning.encrypted_content", "web_search_call.action.sources"],
                truncation="auto",
                max_output_tokens=2,
            )
        assert answer.status == "incomplete" and answer.output_text
        assert answer.truncation == "disabled"  # as served: an input too long is refused, not cut

    run_with_stack(tmp_path, check, instances=1)


def test_a_kept_response_echoes_what_its_request_asked(tmp_path: Path) -> None:
    """``top_logprobs`` without log probabilities asks for nothing (as OpenAI's), and is echoed all
    the same, by ``GET`` too (the chat request kept does not hold it)."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            answer = await c.responses.create(
                model=MODEL,
                input="hi",
                top_logprobs=3,
                max_output_tokens=2,
                reasoning={"effort": "low"},
            )
            kept = await c.responses.retrieve(answer.id)
            with pytest.raises(openai.BadRequestError, match="not streamed again"):
                await c.responses.retrieve(answer.id, stream=True)
        assert answer.top_logprobs == kept.top_logprobs == 3
        assert answer.reasoning is not None and answer.reasoning.effort == "low"  # sent as the chat's
        job = stack.coordinator.lookup(answer.id.removeprefix("resp_"))
        assert job is not None and job.spec.sampling["reasoning_effort"] == '"low"'
        mine, theirs = answer.model_dump(), kept.model_dump()
        assert {k for k in mine if mine[k] != theirs[k]} <= {"qlm"}

    run_with_stack(tmp_path, check, instances=1)
