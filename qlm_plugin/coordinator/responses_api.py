"""OpenAI's Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``) over the chat path.

A Responses request is a chat with other names: ``input`` (a string, message items whose content
is text, and earlier function calls with their outputs), ``instructions`` (a system message
first), ``max_output_tokens``, ``text.format`` (structured output), function ``tools`` and
``tool_choice``. :func:`chat_body` turns it into the chat body the front door already checks and
serves; what it asks for that the coordinator cannot carry (built-in tools, other items, images,
conversation objects, background mode) is a 400 naming the field. The
answer is a ``response`` object (a message, and a ``function_call`` item per call), or in a stream
OpenAI's typed events (``response.created`` ... ``response.output_text.delta``,
``response.function_call_arguments.delta`` ... ``response.completed``). A response is kept as long as its
request is (``GET`` answers it from there), and a later request may continue it by
``previous_response_id`` (:func:`continued`: its conversation and its output, without its
instructions, before the new input) while it is kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from qlm_plugin.coordinator.jobs import REFUSED, STREAMED, Chunk, Job
from qlm_plugin.coordinator.openai_params import (
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_TOP_LOGPROBS,
    BadRequest,
    check_unicode,
    integer,
    key_name,
    metadata_param,
    reasoning_effort,
    show,
    text,
)
from qlm_plugin.transport.openai_client import message_tool_calls

#: The one ``include`` served: the output's log probabilities.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: What a request may ask ``include`` to add. Only the log probabilities apply here: the others
#: belong to items this server never produces (built-in tool calls, images, reasoning), so asking
#: for them adds nothing, as at OpenAI for a response without such items (a stateless client asks
#: for ``reasoning.encrypted_content`` with every request).
INCLUDABLE = frozenset(
    {
        LOGPROBS_INCLUDE,
        "reasoning.encrypted_content",
        "web_search_call.action.sources",
        "web_search_call.results",
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "file_search_call.results",
        "message.input_image.image_url",
    }
)
#: The prefix of a response's id before its request's id (``GET /v1/responses/resp_<request id>``).
ID_PREFIX = "resp_"
#: Fields of a Responses request that are not the chat's: turned into chat fields here, or echoed.
OWN_FIELDS = frozenset(
    {
        "input",
        "instructions",
        "max_output_tokens",
        "text",
        "store",
        "metadata",
        "include",
        "previous_response_id",
        "background",
        "truncation",
        "reasoning",
        "conversation",
        "prompt",
        "stream_options",
        "max_tool_calls",
        "logprobs",  # a chat's field: the Responses API asks with include
        "safety_identifier",
        "prompt_cache_key",
    }
)
#: A chat's fields a Responses request may not carry, each with the Responses field to use.
CHAT_ONLY = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}
#: A response's status while its request is not finished (failed: any other state).
STATUS = {"queued": "queued", "dispatched": "in_progress", "cancelled": "cancelled"}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")


class OwnFieldError(BadRequest):
    """A refusal that names the Responses request's own field as it is (a chat's field it carries
    where it may not), not one to name as the Responses API does (:func:`error_param`)."""


def _refuse(param: str, feature: str, value: Any) -> BadRequest:
    return BadRequest(param, f"{feature} is not supported by the coordinator, got {show(value)}")


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return check_unicode(content, param)
    if not isinstance(content, list) or not content:
        raise BadRequest(param, f"must be a string or a non-empty list of text parts, got {show(content)}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise _refuse(f"{param}[{j}]", f"content of type {kind!r} (only text)", part)
        texts.append(check_unicode(text(part.get("text"), f"{param}[{j}].text"), f"{param}[{j}].text"))
    return "\n".join(texts)


def _call(item: Mapping[str, Any]) -> dict[str, Any]:
    """An earlier ``function_call`` item as a chat tool call (checked by the chat's rules)."""
    return {
        "id": item.get("call_id"),
        "type": "function",
        "function": {"name": item.get("name"), "arguments": item.get("arguments")},
    }


def _call_output(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    """A ``function_call_output`` item as the chat's ``tool`` message."""
    output = item.get("output")
    content = output if isinstance(output, str) else _content(output, f"{param}.output")
    return {"role": "tool", "tool_call_id": item.get("call_id"), "content": content}


#: Where each chat message of a Responses request came from, as the request names it: the
#: message's field, and each of its tool calls' (an assistant turn gathers several call items).
Origins = list[tuple[str, list[str]]]


def _messages(
    body: Mapping[str, Any], history: list[dict[str, Any]], origins: Origins
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": text(body["instructions"], "instructions")})
        origins.append(("instructions", []))
    messages += history
    origins += [("previous_response_id", []) for _ in history]
    items = body.get("input")
    if isinstance(items, str):
        origins.append(("input", []))
        return [*messages, {"role": "user", "content": text(items, "input")}]
    if not isinstance(items, list) or not items:
        raise BadRequest(
            "input", f"must be a non-empty string or a non-empty list of messages, got {show(items)}"
        )
    if len(items) + len(history) > MAX_MESSAGES:
        raise BadRequest(
            "input", f"must be at most {MAX_MESSAGES} items with the previous response's, got more"
        )
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{i}]", f"must be a message object, got {show(item)}")
        kind = item.get("type", "message")
        if kind == "function_call":  # one assistant turn holds its text and its calls, as a chat's
            last = messages[-1] if messages else None
            # (an input's own turn: one from the continued response stays as it was)
            if last is not None and last["role"] == "assistant" and origins[-1][0].startswith("input["):
                last.setdefault("tool_calls", []).append(_call(item))
                origins[-1][1].append(f"input[{i}]")
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [_call(item)]})
                origins.append((f"input[{i}]", [f"input[{i}]"]))
            continue
        if kind == "function_call_output":
            messages.append(_call_output(item, f"input[{i}]"))
            origins.append((f"input[{i}]", []))
            continue
        if kind != "message":
            raise _refuse(
                f"input[{i}].type",
                f"an input item of type {kind!r} (only messages, function calls and their outputs)",
                kind,
            )
        role = item.get("role")
        role = ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise BadRequest(
                f"input[{i}].role", f"must be one of {', '.join(ROLES)}, got {show(item.get('role'))}"
            )
        messages.append({"role": role, "content": _content(item.get("content"), f"input[{i}].content")})
        origins.append((f"input[{i}]", []))
    return messages


def _check_answered(history: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
    """A response continued after its function calls must answer each (a ``function_call_output``
    with its ``call_id``), as OpenAI requires: a chat template cannot render a call left open."""
    calls = history[-1].get("tool_calls") if history else None
    if not calls:
        return
    answered = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
    missing = [call["id"] for call in calls if call["id"] not in answered]
    if missing:
        raise BadRequest("input", f"no function_call_output for the previous response's call {missing[0]!r}")


def _check_outputs_answer_calls(messages: list[dict[str, Any]], origins: Origins) -> None:
    """Each ``function_call_output`` answers a call made before it (OpenAI's rule: a template
    cannot render an answer to no call)."""
    made: set[Any] = set()
    for message, (source, _) in zip(messages, origins, strict=True):
        made.update(call.get("id") for call in message.get("tool_calls") or ())
        answered = message.get("tool_call_id")
        if message["role"] == "tool" and isinstance(answered, str) and answered not in made:
            raise BadRequest(
                f"{source}.call_id",
                f"answers no function call made before it, got {show(answered)}",
            )


def _response_format(fmt: Any) -> dict[str, Any]:
    """``text.format`` as the chat's ``response_format`` (its schema is checked there)."""
    if not isinstance(fmt, dict):
        raise BadRequest("text.format", f"must be an object with a type, got {show(fmt)}")
    if fmt.get("type") != "json_schema":
        return dict(fmt)
    inner = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
    return {"type": "json_schema", "json_schema": inner}


def chat_body(
    body: Any, history: list[dict[str, Any]] | None = None, origins: Origins | None = None
) -> dict[str, Any]:
    """The chat-completions body a Responses request asks for (:class:`BadRequest` naming the
    Responses field where it cannot be served); ``history``: the conversation of the response it
    continues (:func:`continued`), where it names one; ``origins`` is filled with where each of
    the chat's messages came from (for :func:`param_name`)."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object")
    kept = "conversation state kept by the server (send the whole conversation in input)"
    if history is None and body.get("previous_response_id") is not None:  # a batch line
        raise _refuse("previous_response_id", "continuing a kept response here", body["previous_response_id"])
    for key, feature, harmless in (
        ("conversation", kept, None),
        ("prompt", "a stored prompt template", None),
        ("background", "background mode", False),
        ("n", "several choices (a chat completion's n)", 1),
    ):
        if body.get(key) not in (None, harmless):
            raise _refuse(key, feature, body[key])
    include = body.get("include")
    if include is not None and not isinstance(include, list):
        raise BadRequest("include", f"must be a list, got {show(include)}")
    for i, extra in enumerate(include or ()):
        if extra not in INCLUDABLE:
            allowed = ", ".join(sorted(INCLUDABLE))
            raise BadRequest(f"include[{i}]", f"must be one of {allowed}, got {show(extra)}")
    for key, instead in CHAT_ONLY.items():  # a chat's fields: taken silently, they outranked ours
        if key in body:
            raise OwnFieldError(key, f"is a chat completion's field: a response's is {instead}")
    if body.get("top_logprobs") is not None:  # echoed: checked even where no logprobs are asked
        integer(body["top_logprobs"], "top_logprobs", 0, MAX_TOP_LOGPROBS)
    effort = _reasoning(body.get("reasoning"))
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise BadRequest("truncation", f"must be 'auto' or 'disabled', got {show(truncation)}")
    metadata_param(body.get("metadata"))  # echoed in the answer: OpenAI's shape only
    if body.get("store") is not None and not isinstance(body["store"], bool):
        raise BadRequest("store", f"must be true or false, got {show(body['store'])}")
    chat = {key: value for key, value in body.items() if key not in OWN_FIELDS}
    origins = [] if origins is None else origins
    chat["messages"] = _messages(body, history or [], origins)
    _check_answered(history or [], chat["messages"])
    _check_outputs_answer_calls(chat["messages"], origins)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body["text"], dict):
        raise BadRequest("text", f"must be an object, got {show(body['text'])}")
    if fmt is not None:
        chat["response_format"] = _response_format(fmt)
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if effort is not None:
        chat["reasoning_effort"] = effort
    if LOGPROBS_INCLUDE in (include or ()):  # with top_logprobs alternatives (checked as the chat's)
        chat["logprobs"] = True
    elif body.get("top_logprobs") not in (None, 0):  # alternatives of nothing asked for: as OpenAI, none
        chat.pop("top_logprobs", None)
    return chat


def _reasoning(reasoning: Any) -> str | None:
    """The effort a request's ``reasoning`` asks for, sent to the engine as the chat's
    ``reasoning_effort`` (None: the model's own). Summaries are refused: this server never makes
    the reasoning items they would be in."""
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise BadRequest("reasoning", f"must be an object, got {show(reasoning)}")
    unknown = reasoning.keys() - {"effort", "summary", "generate_summary"}
    if unknown:
        raise BadRequest(f"reasoning.{key_name(min(unknown))}", "unknown field of reasoning")
    for key in ("summary", "generate_summary"):
        if reasoning.get(key) is not None:
            raise _refuse(f"reasoning.{key}", "reasoning summaries", reasoning[key])
    effort = reasoning.get("effort")
    return None if effort is None else reasoning_effort(effort, "reasoning.effort")


def _tools(tools: Any) -> Any:
    """Function tools in the chat's form (``{"type": "function", "function": {...}}``); checked
    there, but a built-in tool is refused here, by its Responses name."""
    if not isinstance(tools, list):
        return tools  # the chat's check names it
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _refuse(f"tools[{i}].type", f"a tool of type {kind!r} (only function tools)", kind)
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k in _FUNCTION_KEYS}})
    return out


_FUNCTION_KEYS = ("name", "description", "parameters", "strict")


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _refuse(
                "tool_choice", f"a tool choice of type {choice.get('type')!r} (only functions)", choice
            )
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


#: A chat field named in an error, as the Responses request named it.
_PARAMS = (
    ("tool_choice.function.", "tool_choice."),
    ("logprobs", "include"),
    ("response_format.json_schema.", "text.format."),
    ("response_format", "text.format"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
)


_MESSAGE = re.compile(r"messages\[(\d+)\](?:\.tool_calls\[(\d+)\](?:\.function)?)?")


def error_param(exc: BadRequest, origins: Origins) -> str | None:
    """The field a refusal of a Responses request names (:func:`param_name`)."""
    return exc.param if isinstance(exc, OwnFieldError) else param_name(exc.param, origins)


def param_name(param: str | None, origins: Origins | None = None) -> str | None:
    """A chat field's name in an error, as the Responses request names it (a message's by
    ``origins``, where :func:`chat_body` filled them)."""
    found = _MESSAGE.match(param) if param is not None and origins else None
    if found is not None and origins is not None and int(found[1]) < len(origins):
        assert param is not None
        source, calls = origins[int(found[1])]
        rest = param[found.end() :]
        if found[2] is None:
            return source + (".call_id" if rest == ".tool_call_id" else rest)
        if int(found[2]) < len(calls):  # a call item's fields are named as the chat's function's
            return calls[int(found[2])] + (".call_id" if rest == ".id" else rest)
        return source
    if param is not None and param.startswith("tools[") and ".function." in param:
        return param.replace(".function.", ".", 1)  # tools[0].function.name: tools[0].name
    for chat, own in _PARAMS:
        if param is not None and param.startswith(chat):
            return own + param[len(chat) :]
    return param


def _status(job: Job) -> str:
    if job.state == "finished":
        return "incomplete" if job.finish_reason == "length" else "completed"
    return STATUS.get(job.state, "failed")


def _error_code(job: Job) -> str:
    """OpenAI's code of a failed response: the request's own fault (an engine refused it) or not."""
    return "invalid_prompt" if job.finish_reason == REFUSED else "server_error"


def _logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat's log probability entries as the Responses API has them (``bytes`` always a list)."""

    def one(e: Mapping[str, Any]) -> dict[str, Any]:
        given = e.get("token")
        token = given if isinstance(given, str) else ""
        raw = e.get("bytes")
        return {
            "token": token,
            "logprob": e.get("logprob"),
            "bytes": raw if isinstance(raw, list) else list(token.encode("utf-8", "surrogatepass")),
        }

    return [
        one(e) | {"top_logprobs": [one(t) for t in e.get("top_logprobs") or () if isinstance(t, dict)]}
        for e in entries
    ]


def _message(job: Job, status: str) -> dict[str, Any]:
    content = [
        {"type": "output_text", "text": job.text, "annotations": [], "logprobs": _logprobs(job.logprobs)}
    ]
    return {
        "id": f"msg_{job.id}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content if status != "in_progress" else [],
    }


def _calls(job: Job, status: str) -> list[dict[str, Any]]:
    """The job's tool calls as ``function_call`` output items."""
    return [
        _call_item(job, c["index"], c["id"], c["function"]["name"], c["function"]["arguments"], status)
        for c in job.tool_calls
    ]


def _call_item(job: Job, index: Any, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": f"fc_{job.id}_{index}",
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _output(job: Job, status: str, order: list[Any] | None = None) -> list[dict[str, Any]]:
    """A response's output items: its message (unless the answer is only calls), then its calls;
    ``order``: as a stream showed them (:data:`MESSAGE` and the calls' indexes), the rest after.
    ``status``: the response's. Once it has ended short (cut at ``max_output_tokens``, cancelled,
    failed), the item being written when it stopped is ``incomplete`` (a call's arguments may be
    cut mid-JSON) and those before it are ``completed``."""
    running = status in ("queued", "in_progress")
    whole = status == "completed"
    each = "in_progress" if running else "completed"
    items: dict[Any, dict[str, Any]] = {}
    if (job.text or not job.tool_calls) and (whole or job.tokens):
        items[MESSAGE] = _message(job, each)
    for call, item in zip(job.tool_calls, _calls(job, each), strict=True):
        items[call["index"]] = item
    out = [items.pop(key) for key in order or () if key in items]
    out += items.values()
    if out and not running and not whole:
        out[-1]["status"] = "incomplete"
    return out


#: The message's place in a stream's order of output items (a call's is its index).
MESSAGE = "message"


#: What a response echoes of its request that the chat request does not hold (kept in
#: ``RequestSpec.response_echo``).
ECHOED = (
    "instructions",
    "metadata",
    "previous_response_id",
    "reasoning",
    "store",
    "top_logprobs",
)
#: Kept beside them: where the request's own input starts among its chat's messages...
INPUT_FROM = "input_from"
#: ... and which of its input's messages a developer wrote (the engine gets them as the system's).
DEVELOPER = "developer"


def echoed(body: Mapping[str, Any], origins: Origins, *, streamed: bool = False) -> str:
    """The part of a Responses request kept for its response's echo and its input items
    (``RequestSpec.response_echo``); ``origins``: as :func:`chat_body` filled them; ``streamed``:
    its client streams it (so is told its id at once: :func:`~qlm_plugin.coordinator.jobs.askable_later`)."""
    kept: dict[str, Any] = {key: body[key] for key in ECHOED if body.get(key) is not None}
    if streamed:
        kept[STREAMED] = True
    start = sum(1 for source, _ in origins if not source.startswith("input"))
    if start:
        kept[INPUT_FROM] = start
    items = body.get("input")
    developer = [
        k - start
        for k, (source, _) in enumerate(origins)
        if source.startswith("input[")
        and isinstance(items, list)
        and items[int(source[6:-1])].get("role") == "developer"
    ]
    if developer:
        kept[DEVELOPER] = developer
    return json.dumps(kept, separators=(",", ":"))  # never empty: it marks the job a response


def input_items(job: Job) -> list[dict[str, Any]]:
    """The request's own input (not its instructions, nor a continued response's conversation)
    as Responses items, in order: messages, function calls and their outputs."""
    kept = asked(job)
    messages = json.loads(job.spec.chat_messages or "[]")[kept.get(INPUT_FROM, 0) :]
    developer = set(kept.get(DEVELOPER, ()))
    items: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        item_id = f"{job.id}_{i}"
        if m["role"] == "tool":
            items.append(
                {
                    "id": f"fco_{item_id}",
                    "type": "function_call_output",
                    "call_id": m.get("tool_call_id"),
                    "output": m.get("content") or "",
                    "status": "completed",
                }
            )
            continue
        if m.get("content") or not m.get("tool_calls"):
            part: dict[str, Any] = {"type": "input_text", "text": m.get("content") or ""}
            if m["role"] == "assistant":
                part = {"type": "output_text", "text": part["text"], "annotations": []}
            items.append(
                {
                    "id": f"msg_{item_id}",
                    "type": "message",
                    "role": "developer" if i in developer else m["role"],
                    "content": [part],
                    "status": "completed",
                }
            )
        for k, call in enumerate(m.get("tool_calls") or ()):
            fn = call.get("function") or {}
            items.append(
                {
                    "id": f"fc_{item_id}_{k}",
                    "type": "function_call",
                    "call_id": call.get("id"),
                    "name": fn.get("name"),
                    "arguments": fn.get("arguments"),
                    "status": "completed",
                }
            )
    return items


def list_input_items(job: Job, query: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's list of a response's input items: ``limit`` (1-100, 20), ``order`` (``desc``, the
    default, or ``asc``), ``after`` (an item id: those after it in that order)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order", f"must be 'asc' or 'desc', got {show(order)}")
    raw_limit = query.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 100:
        raise BadRequest("limit", f"must be an integer in [1, 100], got {show(raw_limit)}")
    items = input_items(job)
    if order == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise BadRequest("after", f"names no input item of this response, got {show(after)}")
        items = items[ids.index(after) + 1 :]
    page = items[: int(raw_limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    }


def is_response(job: Job) -> bool:
    """Whether ``job`` was asked for through the Responses API (a chat completion is not a
    response: ``GET``, continuing and deleting it as one find nothing). Every response keeps its
    echo (:func:`echoed`), if only ``{}``."""
    return job.spec.operation == "chat" and bool(job.spec.response_echo)


def stored(job: Job) -> bool:
    """Whether the response is kept for ``GET`` and continuation (not asked with ``store: false``)."""
    return asked(job).get("store") is not False


def asked(job: Job) -> dict[str, Any]:
    """What a response echoes of its request, from the request as kept (``GET``, a batch's
    answers, a response continued): its limit, sampling, instructions and metadata."""
    sampling = job.spec.sampling
    echo: dict[str, Any] = {
        **(json.loads(job.spec.response_echo) if job.spec.response_echo else {}),
        "max_output_tokens": job.spec.max_tokens or None,
        **{
            key: json.loads(sampling[key])
            for key in ("temperature", "top_p", "parallel_tool_calls", "top_logprobs")
            if key in sampling
        },
    }
    if "tools" in sampling:  # back in the Responses form
        echo["tools"] = [{"type": "function", **t["function"]} for t in json.loads(sampling["tools"])]
    if "tool_choice" in sampling:
        choice = json.loads(sampling["tool_choice"])
        echo["tool_choice"] = (
            {"type": "function", **choice["function"]} if isinstance(choice, dict) else choice
        )
    return echo


def _text_format(job: Job) -> dict[str, Any]:
    """The response's ``text.format``, from the request's format as checked and kept."""
    kept = job.spec.sampling.get("response_format")
    if kept is None:
        return {"type": "text"}
    fmt = json.loads(kept)
    return {"type": fmt["type"], **fmt.get("json_schema", {})}


def response_object(
    job: Job,
    request: Mapping[str, Any],
    qlm: Mapping[str, Any],
    *,
    output: bool = True,
    order: list[Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object of ``job`` as it stands (its request's ``request`` body echoed where
    OpenAI echoes it); ``output``: with its output items (a stream's first events have none: its
    items are added by events after them); ``order``: as :func:`_output`."""
    status = _status(job)
    return {
        "id": f"{ID_PREFIX}{job.id}",
        "object": "response",
        "created_at": int(job.request.arrival_time),
        "status": status,
        "completed_at": int(job.finished_at) if status == "completed" and job.finished_at else None,
        "error": {"code": _error_code(job), "message": job.error} if status == "failed" else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": job.request.model,
        "output": _output(job, status, order) if output else [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "store": stored(job),  # as kept (an idempotent retry's body may say otherwise)
        "temperature": request.get("temperature"),
        "text": {"format": _text_format(job)},
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p"),
        "top_logprobs": request.get("top_logprobs"),
        "truncation": "disabled",  # "auto" is accepted, not honoured: an input too long is refused
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "usage": None  # as OpenAI's: counted once the response has ended
        if status in ("queued", "in_progress")
        else {
            "input_tokens": job.request.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": job.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": job.request.prompt_tokens + job.tokens,
        },
        "metadata": metadata_param(request.get("metadata")) or {},
        "qlm": dict(qlm),
    }


async def stream_events(
    job: Job,
    chunks: AsyncIterator[Chunk],
    request: Mapping[str, Any],
    qlm: Callable[[], Mapping[str, Any]],
    send: Callable[[str, dict[str, Any]], Awaitable[None]],
) -> None:
    """OpenAI's events of a streamed response, from the job's ``chunks``; ``send(type, event)``
    writes one. A request that fails ends with ``response.failed`` (its error in the response)."""
    item, seq = f"msg_{job.id}", 0

    async def event(kind: str, **fields: Any) -> None:
        nonlocal seq
        await send(kind, {"type": kind, "sequence_number": seq, **fields})
        seq += 1

    # As OpenAI's: in progress from the first event (a queued request's too; a retry's of a request
    # already done is told its end by the events that follow).
    opening = response_object(job, request, qlm(), output=False) | {
        "status": "in_progress",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "usage": None,
    }
    await event("response.created", response=opening)
    await event("response.in_progress", response=opening)
    # OpenAI's order: each item is added, streamed and done before the next is added. The message
    # holds all the text (text after the calls, rare, comes with the completed response only).
    where: dict[str, Any] = {}  # the message item, once opened: its item id, output and content index
    message_done = False
    calls: dict[Any, dict[str, Any]] = {}  # a call's stream index -> its item as opened
    open_call: dict[str, Any] | None = None
    items = 0  # output items opened so far
    order: list[Any] = []  # their keys, as opened: MESSAGE or a call's index

    async def open_message() -> None:
        nonlocal items
        where.update(item_id=item, output_index=items, content_index=0)
        items += 1
        order.append(MESSAGE)
        await event(
            "response.output_item.added",
            output_index=where["output_index"],
            item=_message(job, "in_progress"),
        )
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await event("response.content_part.added", **where, part=part)

    async def close_message(status: str = "completed") -> None:
        nonlocal message_done
        message_done = True
        message = _message(job, status)
        message["content"][0]["text"] = streamed_text
        await event(
            "response.output_text.done", **where, text=streamed_text, logprobs=_logprobs(job.logprobs)
        )
        await event("response.content_part.done", **where, part=message["content"][0])
        await event("response.output_item.done", output_index=where["output_index"], item=message)

    async def close_call(call: dict[str, Any], status: str = "completed") -> None:
        whole = {k: v for k, v in call.items() if k not in ("output_index",)} | {"status": status}
        index = call["output_index"]
        await event(
            "response.function_call_arguments.done",
            item_id=call["id"],
            output_index=index,
            arguments=call["arguments"],
        )
        await event("response.output_item.done", output_index=index, item=whole)

    streamed_text = ""
    async for chunk in chunks:
        if chunk.finished:
            break
        if (chunk.text or (chunk.logprobs and where)) and not message_done:
            if open_call is not None:
                await close_call(open_call)
                open_call = None
            if not where:
                await open_message()
            streamed_text += chunk.text
            await event(
                "response.output_text.delta", **where, delta=chunk.text, logprobs=chunk.logprobs or []
            )
        for delta in chunk.tool_calls or ():
            given = delta.get("function")
            fn: dict[str, Any] = given if isinstance(given, dict) else {}
            call = calls.get(delta.get("index"))
            if call is None:
                if open_call is not None:
                    await close_call(open_call)
                elif where and not message_done:
                    await close_message()
                order.append(delta.get("index"))
                call = _call_item(
                    job, delta.get("index"), delta.get("id") or "", fn.get("name") or "", "", "in_progress"
                )
                call["output_index"] = items
                items += 1
                calls[delta.get("index")] = open_call = call
                added = {k: v for k, v in call.items() if k != "output_index"}
                await event("response.output_item.added", output_index=call["output_index"], item=added)
            if isinstance(fn.get("arguments"), str) and fn["arguments"]:
                call["arguments"] += fn["arguments"]
                await event(
                    "response.function_call_arguments.delta",
                    item_id=call["id"],
                    output_index=call["output_index"],
                    delta=fn["arguments"],
                )
    await job.done.wait()
    if job.halted:  # the coordinator stops: OpenAI's stream error event, to retry
        message = (
            f"{ID_PREFIX}{job.id}: {job.error}"  # not kept (Coordinator.halt_unfinished)
            if job.state == "cancelled"
            else f"{job.halted_because}; {ID_PREFIX}{job.id} is kept and served after the coordinator "
            "restarts"
        )
        await event("error", code="unavailable", message=message, param=None)
        return
    final = response_object(job, request, qlm(), order=order)
    if final["status"] not in ("completed", "incomplete"):
        await event("response.failed", response=final)
        return
    if open_call is not None:
        await close_call(open_call, "incomplete" if final["status"] == "incomplete" else "completed")
    elif not where and not calls:  # no output at all: a message is opened and closed all the same
        await open_message()
    if where and not message_done:
        streamed_text = job.text
        await close_message("incomplete" if final["status"] == "incomplete" else "completed")
    await event(f"response.{final['status']}", response=final)


def previous_id(body: Mapping[str, Any]) -> str | None:
    """The request id of the response a Responses request continues (``previous_response_id``),
    None where it continues none (:class:`BadRequest` when the field is not such an id)."""
    value = body.get("previous_response_id")
    if value is None:
        return None
    name = text(value, "previous_response_id", max_chars=MAX_NAME_CHARS)
    if not name.startswith(ID_PREFIX):
        raise BadRequest("previous_response_id", f"must be a response id (resp_...), got {show(value)}")
    return name.removeprefix(ID_PREFIX)


def not_kept(request_id: str) -> BadRequest:
    """The refusal of a ``previous_response_id`` naming no response kept for its caller."""
    return BadRequest(
        "previous_response_id",
        f"no response '{ID_PREFIX}{request_id}' (or it is no longer kept)",
        code="previous_response_not_found",
    )


def continued(previous: Job | None, request_id: str) -> list[dict[str, Any]]:
    """The conversation a response continuing ``previous`` (the request ``request_id``) starts
    from: its messages (without its instructions, which OpenAI does not carry over), then its
    output as the assistant's turn. ``previous``: None where none is kept (a 400, as OpenAI's)."""
    response_id = f"{ID_PREFIX}{request_id}"
    if previous is None or not is_response(previous) or not stored(previous):
        raise not_kept(request_id)
    if previous.state != "finished":
        doing = "is still in progress" if previous.state in ("queued", "dispatched") else "did not complete"
        raise BadRequest("previous_response_id", f"the response {response_id!r} {doing} ({previous.state})")
    messages: list[dict[str, Any]] = json.loads(previous.spec.chat_messages)
    if asked(previous).get("instructions") is not None and messages and messages[0]["role"] == "system":
        messages = messages[1:]
    turn: dict[str, Any] = {"role": "assistant", "content": previous.text or None}
    if previous.tool_calls:
        turn["tool_calls"] = message_tool_calls(previous.tool_calls)
    elif turn["content"] is None:
        turn["content"] = ""
    return [*messages, turn]
