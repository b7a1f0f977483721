"""Calls the product makes to an OpenAI-compatible server beyond the generation itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp

#: How long a tokenization may take.
TOKENIZE_TIMEOUT_S = 30.0
#: Answers of a server that refuses the request itself (a value it cannot take: a schema its grammar
#: backend cannot compile, a token id past its vocabulary): serving it elsewhere cannot help.
REFUSED_STATUSES = (400, 413, 422)
#: The capability of an engine that constrains its output to a JSON schema, regex, choice or grammar.
STRUCTURED_OUTPUT = "structured_output"
#: The capability of an engine that takes OpenAI's ``tools`` on its chat endpoint (function calling).
TOOLS = "tools"
#: The capability of an engine that returns its tokens' log probabilities (``logprobs``).
LOGPROBS = "logprobs"
#: The capability of an engine that gives a completion's prompt's log probabilities (``echo``).
PROMPT_LOGPROBS = "prompt_logprobs"
#: What a capability lets an engine do, as an error message names it.
FEATURES = {
    STRUCTURED_OUTPUT: "structured output",
    TOOLS: "tool calls",
    LOGPROBS: "log probabilities",
    PROMPT_LOGPROBS: "the prompt's log probabilities (echo with logprobs)",
}


class TokenizeError(Exception):
    """The server could not tokenize (it has no ``/tokenize``, or refused the text)."""


def structured_output_field(sampling: Mapping[str, str]) -> str | None:
    """The field of a request's sampling (as carried: JSON text) that constrains its output, which
    only an engine with :data:`STRUCTURED_OUTPUT` honours; None when it asks for none."""
    if "structured_outputs" in sampling:
        return "structured_outputs"
    fmt = sampling.get("response_format")
    if fmt is None:
        return None
    try:
        kind = json.loads(fmt).get("type")
    except (ValueError, AttributeError, RecursionError):  # a gRPC client's own text: the engine judges it
        kind = None
    return None if kind == "text" else "response_format"  # {"type": "text"} asks for nothing


def constraint(sampling: Mapping[str, str]) -> tuple[str, str] | None:
    """What a request asks that only engines with a capability do, and that no engine can continue
    after another's output: (that capability, the field that asks for it); None when it asks for
    neither. A grammar's state and a tool call (parsed from the whole output, or forced by a grammar)
    are one engine's, from the first token."""
    return next((need for need in needs(sampling) if need[0] not in (LOGPROBS, PROMPT_LOGPROBS)), None)


def needs(sampling: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every capability a request needs of its engine, each with the field that asks for it: its
    :func:`constraint`'s, and log probabilities, of the output and of an echoed prompt (which,
    unlike those, continue on another engine: the prompt's come with the first tokens)."""
    out = []
    field = structured_output_field(sampling)
    if field is not None:
        out.append((STRUCTURED_OUTPUT, field))
    if "tools" in sampling:
        out.append((TOOLS, "tools"))
    if "logprobs" in sampling:
        out.append((LOGPROBS, "logprobs"))
        if "echo" in sampling:
            out.append((PROMPT_LOGPROBS, "echo"))
    return out


def logprob_entries(choice: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A streamed choice's log probabilities as OpenAI chat's per-token entries (``token``,
    ``logprob``, ``bytes``, ``top_logprobs``), from either endpoint's form (a completion's are
    parallel lists); None if it holds none."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if isinstance(content, list):
        return [e for e in content if isinstance(e, dict)] or None
    tokens = lp.get("tokens")
    if not isinstance(tokens, list):
        return None
    values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(
            {
                "token": token,
                "logprob": values[i] if i < len(values) else None,
                "bytes": _bytes(token),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in top.items()],
            }
        )
    return out or None


def _bytes(token: Any) -> list[int] | None:
    return list(token.encode("utf-8", "surrogatepass")) if isinstance(token, str) else None


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """Chat-form entries as a completion's ``logprobs`` object; ``offset``: the characters of the
    output before the first of them (``text_offset`` counts from the output's start)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        token = e.get("token")
        offset += len(token) if isinstance(token, str) else 0
    return {
        "text_offset": offsets,
        "token_logprobs": [e.get("logprob") for e in entries],
        "tokens": [e.get("token") for e in entries],
        "top_logprobs": [_alternatives(e) for e in entries],
    }


def _alternatives(entry: Mapping[str, Any]) -> dict[Any, Any] | None:
    """An entry's alternatives as a completion's ``top_logprobs`` item: null for a prompt's first
    token, which has none (as vLLM and OpenAI answer)."""
    tops = entry.get("top_logprobs")
    if entry.get("logprob") is None and not tops:
        return None
    return {t.get("token"): t.get("logprob") for t in tops or () if isinstance(t, dict)}


def tool_call_deltas(choice: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A streamed chat choice's ``delta.tool_calls`` (OpenAI's form: each with its ``index``; the
    first of a call has its ``id``, ``type`` and name, the next more of its arguments); None if none."""
    delta = choice.get("delta")
    calls = delta.get("tool_calls") if isinstance(delta, dict) else None
    if not isinstance(calls, list) or not calls:
        return None
    return [c for c in calls if isinstance(c, dict)] or None


def merge_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add a chunk's ``delta.tool_calls`` to ``calls``, the calls so far (each with its ``index``,
    ``id``, ``type`` and ``function``: ``name`` and the ``arguments`` text so far). Returns the
    deltas as clients are to see them: each with the index of the call it went to (an engine that
    leaves the index out is not followed by OpenAI's clients)."""
    shown = []
    for d in deltas:
        index = d.get("index")
        given = d.get("function")
        fn: dict[str, Any] = given if isinstance(given, dict) else {}
        if (index is None or isinstance(index, bool)) and calls and not d.get("id") and not fn.get("name"):
            index = calls[-1]["index"]  # no index (an engine that leaves it out): more of the last call
        call = next((c for c in calls if c["index"] == index), None)
        if call is None:
            if not isinstance(index, int) or isinstance(index, bool):
                index = len(calls)
            call = {"index": index, "id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            calls.append(call)
            if not (isinstance(d.get("id"), str) and d["id"]):
                # an engine that gives no id: the client's next turn must name the call it answers
                d = {**d, "id": f"call_{uuid.uuid4().hex[:24]}", "type": d.get("type") or "function"}
        if isinstance(d.get("id"), str) and d["id"]:
            call["id"] = d["id"]
        if isinstance(d.get("type"), str) and d["type"]:
            call["type"] = d["type"]
        if isinstance(fn.get("name"), str) and fn["name"]:
            call["function"]["name"] = fn["name"]
        if isinstance(fn.get("arguments"), str):
            call["function"]["arguments"] += fn["arguments"]
        shown.append(d if d.get("index") == call["index"] else {**d, "index": call["index"]})
    return shown


def message_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls as a whole answer's ``message.tool_calls`` (no stream ``index``)."""
    return [{"id": c["id"], "type": c["type"], "function": dict(c["function"])} for c in calls]


def error_message(status: int, body: str) -> str:
    """An error answer as one line: the server's own message where its body is OpenAI's error
    object (``{"error": {"message": ...}}``, or vLLM's older ``{"message": ...}``), else the body."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    inner = doc.get("error") if isinstance(doc, dict) else None
    message = (inner if isinstance(inner, dict) else doc if isinstance(doc, dict) else {}).get("message")
    return f"HTTP {status}: {message if isinstance(message, str) and message else body[:500]}"


def stream_error(chunk: dict[str, Any]) -> tuple[int, str] | None:
    """An error sent inside a stream (vLLM checks a request after its stream has begun, and sends
    ``{"error": {"message", "code"}}`` then ``[DONE]``): its status and message; None otherwise."""
    inner = chunk.get("error")
    if not isinstance(inner, dict):
        return None
    code, message = inner.get("code"), inner.get("message")
    status = code if isinstance(code, int) and not isinstance(code, bool) else 500
    said = message if isinstance(message, str) and message else json.dumps(inner)[:500]
    return status, f"HTTP {status}: {said}"


def sse_data(raw: bytes) -> bytes | None:
    """The payload of one line of a server-sent event stream, or None for any other line (a
    comment such as ``: ping``, an event name, a blank line). ``data:`` may be followed by one space
    or none: axum's encoder (TGI's and other Rust servers') writes none."""
    line = raw.strip()
    if not line.startswith(b"data:"):
        return None
    return line[5:].lstrip()


async def tokenize(http: aiohttp.ClientSession, base_url: str, model: str, text: str) -> list[int]:
    """``text`` as the server's token ids, without special tokens (vLLM's ``/tokenize``): how a
    request given as token ids resumes after the text an earlier attempt delivered."""
    body = {"model": model, "prompt": text, "add_special_tokens": False}
    try:
        async with http.post(
            f"{base_url.rstrip('/')}/tokenize",
            json=body,
            timeout=aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_S),
        ) as r:
            if r.status != 200:
                raise TokenizeError(f"{base_url}/tokenize: HTTP {r.status}: {(await r.text())[:300]}")
            tokens = (await r.json()).get("tokens")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise TokenizeError(f"{base_url}/tokenize: {type(exc).__name__}: {exc}") from None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise TokenizeError(f"{base_url}/tokenize answered no token ids")
    if text and not tokens:  # a server that reads another field (llama.cpp's "content") answers []
        raise TokenizeError(f"{base_url}/tokenize answered no token ids for {len(text)} characters")
    return tokens


#: What an engine's request is built from by its sender, never from ``RequestSpec.sampling`` (a
#: coordinator that did not check a client's map passed ``model`` or ``max_tokens`` over them).
PROTECTED_KEYS = frozenset(
    {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options"}
    | {"vllm_xargs", "return_token_ids", "n", "continue_final_message", "add_generation_prompt"}
)
