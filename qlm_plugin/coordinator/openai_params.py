"""The values of an OpenAI request checked at the front door, as vLLM's OpenAI server checks them:
a bad value is a 400 naming its field here, not a request that fails on an engine later (or a
value that protobuf, the journal or the engine cannot take).

Each sampling field has one rule in :data:`SAMPLING_RULES`; the fields that ask for what the
coordinator cannot carry (several choices, the prompt's log probabilities...) are in :data:`UNSUPPORTED`,
with the values that ask for nothing and so are accepted. Structured output (``response_format``,
vLLM's ``structured_outputs``) is carried like a sampling field, but only engines that declare the
``structured_output`` capability can honour it
(:func:`~qlm_plugin.transport.openai_client.structured_output_field`); a chat's tools
(:func:`tool_params`) and the output's log probabilities (:func:`logprob_params`) the same way,
for engines that declare ``tools`` and ``logprobs``. A chat's messages are checked and rendered by
:func:`chat_prompt`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jsonschema

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Longest tenant, SLO class or idempotency key: they are journaled, indexed and shown in metrics.
MAX_NAME_CHARS = 256
#: Characters of a string value quoted in an error message (a prompt may be megabytes).
SHOWN_CHARS = 40
#: Most ``stop`` strings (OpenAI takes 4, vLLM any number): each is searched for in the output at
#: every step, and a 4 MiB body holds 800,000 of them.
MAX_STOP = 16
#: Most ``logit_bias`` entries (OpenAI takes 300): the engine applies each at every step.
MAX_LOGIT_BIAS = 1024
#: Most chat ``messages`` (vLLM: no limit): each is checked, rendered and journaled here.
MAX_MESSAGES = 10_000


class BadRequest(Exception):
    """A request refused before it is submitted; ``param`` names the field (``None``: the body)."""

    def __init__(
        self, param: str | None, message: str, status: int = 400, code: str = "invalid_value"
    ) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def show(value: Any) -> str:
    """``value`` for an error message: short, and without raw surrogates."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return repr(value[:SHOWN_CHARS]) + ("..." if len(value) > SHOWN_CHARS else "")
    if isinstance(value, int) and value.bit_length() > 100:  # str() refuses beyond 4300 digits
        return f"an integer of {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (int, float)):
        return repr(value)
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else "a value"


def printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


def key_name(key: str) -> str:
    """An object's key as a ``param`` names it: itself, or quoted where it is long or odd."""
    return key if key and printable_ascii(key) and len(key) <= SHOWN_CHARS else show(key)


def check_unicode(value: str, param: str) -> str:
    """``value`` if UTF-8 can encode it; JSON's ``\\ud800`` escapes give lone surrogates it cannot."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise BadRequest(
            param,
            f"must be valid Unicode text: it holds a lone surrogate ({value[exc.start]!r} at "
            f"character {exc.start}; JSON \\ud800-\\udfff escapes must come in pairs)",
        ) from None
    return value


def text(value: Any, param: str, *, max_chars: int | None = None) -> str:
    """A non-empty string that UTF-8 (protobuf, the journal) can carry."""
    if not isinstance(value, str) or not value:
        raise BadRequest(param, f"must be a non-empty string, got {show(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise BadRequest(param, f"must be at most {max_chars} characters, got {len(value)}")
    return check_unicode(value, param)


def _bound(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def number(
    value: Any,
    param: str,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    strings: bool = False,
    what: str | None = None,
) -> float:
    """A finite number in [lo, hi] (``lo_open``: above ``lo``); not a boolean. ``strings``: its text
    too, for values that may come from a header."""
    what = what or f"a number in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}]"
    num: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        num = float(value) if not isinstance(value, int) or value.bit_length() < 1000 else math.inf
    elif strings and isinstance(value, str) and _DECIMAL.fullmatch(value):
        num = float(value)
    if num is None or not math.isfinite(num) or num < lo or num > hi or (lo_open and num == lo):
        raise BadRequest(param, f"must be {what}, got {show(value)}")
    return num


#: A number as a header carries it: plain decimal (Python's own syntax took ``1_000``, `` 5 ``,
#: ``inf`` and ``nan`` too, which no HTTP client means).
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def integer(
    value: Any, param: str, lo: int, hi: int, *, strings: bool = False, what: str | None = None
) -> int:
    """An integer in [lo, hi]: a JSON integer or an integral number (as pydantic takes them for an
    ``int`` field), not a boolean. ``strings``: its text too, for values that may come from a header."""
    what = what or f"an integer in [{lo}, {hi}]"
    num: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        num = value
    elif isinstance(value, float) and value.is_integer():  # false for inf and nan
        num = int(value)
    elif strings and isinstance(value, str) and len(value) <= 100 and _DECIMAL.fullmatch(value):
        as_float = float(value)
        num = int(value) if value.lstrip("+-").isdigit() else int(as_float) if as_float.is_integer() else None
    if num is None or not lo <= num <= hi:
        raise BadRequest(param, f"must be {what}, got {show(value)}")
    return num


def token_ids(value: Any, param: str) -> list[int]:
    """A list of token ids: integers that fit protobuf's int32, none negative."""
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX for t in value
    ):
        raise BadRequest(
            param, f"must be a list of token ids (integers in [0, {INT32_MAX}]), got {show(value)}"
        )
    return list(value)


def flag(value: Any, param: str) -> bool:
    """A boolean; from a header (or a lenient body), its usual spellings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.strip().lower() in ("1", "true", "yes")
    raise BadRequest(param, f"must be true or false (or 1/0, yes/no), got {show(value)}")


# ------------------------------------------------------------------------------------ sampling

#: A sampling field's rule: its value checked, as forwarded to the engine, or :class:`BadRequest`.
Rule = Callable[[Any, str], Any]


def _number_in(lo: float, hi: float, *, lo_open: bool = False, what: str | None = None) -> Rule:
    return lambda value, param: number(value, param, lo=lo, hi=hi, lo_open=lo_open, what=what)


def _integer_in(lo: int, hi: int, *, what: str | None = None) -> Rule:
    return lambda value, param: integer(value, param, lo, hi, what=what)


def _boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(param, f"must be true or false, got {show(value)}")
    return value


def _stop(value: Any, param: str) -> str | list[str]:
    strings = [value] if isinstance(value, str) else value  # vLLM takes one string as a list of one
    if isinstance(strings, list) and len(strings) > MAX_STOP:  # before each is looked at
        raise BadRequest(param, f"must be at most {MAX_STOP} strings, got {len(strings)}")
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise BadRequest(
            param, f"must be a non-empty string or a list of non-empty strings, got {show(value)}"
        )
    if isinstance(value, str):
        return check_unicode(value, param)
    return [check_unicode(s, f"{param}[{i}]") for i, s in enumerate(strings)]


def _logit_bias(value: Any, param: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise BadRequest(param, f"must be an object of token id -> bias in [-100, 100], got {show(value)}")
    if len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(param, f"must have at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    checked: dict[str, float] = {}
    for key, bias in value.items():
        # at most 10 digits: int() of a long digit string is slow, or refused past 4300 digits
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= INT32_MAX):
            raise BadRequest(param, f"keys must be token ids (integers in [0, {INT32_MAX}]), got {show(key)}")
        checked[key] = number(bias, f"{param}.{key}", lo=-100, hi=100)
    return checked


# ---------------------------------------------------------------------------- structured output

#: ``response_format`` types: OpenAI's (vLLM's ``structural_tag`` is not carried).
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
#: vLLM's ``structured_outputs``: its constraints (exactly one) and its options, each with its check.
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


#: Most nodes (objects, lists and values) of a request's JSON Schema: its check runs on the event
#: loop, at about 10 us a node (OpenAI takes up to 5,000 object properties in all).
MAX_SCHEMA_NODES = 4000
#: Most characters of all of a schema's strings (keys and values), and of all its regular
#: expressions together (``pattern``, ``patternProperties`` keys), which its check compiles (a few
#: ms per 4,000 characters): the node count bounds neither, and one 3-MB pattern held the event
#: loop 8 s, every tenant waiting.
MAX_SCHEMA_CHARS = 128 * 1024
MAX_PATTERN_CHARS = 16 * 1024


def _nodes_over(value: Any, limit: int) -> bool:
    """Whether ``value`` holds more than ``limit`` JSON nodes (counted without recursion)."""
    todo, count = [value], 0
    while todo:
        node = todo.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return False


def _text_over(value: Any, param: str) -> None:
    """:class:`BadRequest` when a schema's strings hold more than :data:`MAX_SCHEMA_CHARS`, or its
    regular expressions more than :data:`MAX_PATTERN_CHARS` (walked without recursion)."""
    todo, chars, regex_chars = [value], 0, 0
    while todo:
        node = todo.pop()
        if isinstance(node, str):
            chars += len(node)
        elif isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            for key, item in node.items():
                chars += len(key)
                if key == "pattern" and isinstance(item, str):
                    regex_chars += len(item)
                elif key == "patternProperties" and isinstance(item, dict):
                    regex_chars += sum(len(k) for k in item)
                todo.append(item)
        if regex_chars > MAX_PATTERN_CHARS:
            raise BadRequest(
                param, f"holds regular expressions of over {MAX_PATTERN_CHARS} characters in all"
            )
        if chars > MAX_SCHEMA_CHARS:
            raise BadRequest(param, f"must be a JSON Schema of at most {MAX_SCHEMA_CHARS} characters of text")


def _json_schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON Schema (an object), checked against the draft 7 metaschema (the engines' grammar
    backends ignore ``$schema``; what they cannot compile they refuse): a malformed schema is a
    400 here, not a request every engine refuses."""
    if isinstance(value, str):  # vLLM's ``structured_outputs.json`` may be the schema's text
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequest(param, "must be a JSON Schema: the text is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest(param, f"must be a JSON Schema (an object), got {show(value)}")
    if _nodes_over(value, MAX_SCHEMA_NODES):
        raise BadRequest(param, f"must be a JSON Schema of at most {MAX_SCHEMA_NODES} nodes")
    _text_over(value, param)
    try:
        jsonschema.Draft7Validator.check_schema(value)  # (it compiles the patterns: bounded above)
    except RecursionError:
        raise BadRequest(param, "is nested too deeply to be checked") from None
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        at = f" at {where}" if where else ""
        raise BadRequest(param, f"is not a valid JSON Schema{at}: {exc.message}") from None
    except Exception as exc:  # a check that breaks on a value (a regex's count past C's int): refused
        raise BadRequest(param, f"is not a valid JSON Schema: {type(exc).__name__}: {exc}") from None
    return value


def _response_format(value: Any, param: str) -> dict[str, Any]:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in RESPONSE_FORMAT_TYPES:
        raise BadRequest(
            param,
            f"must be an object with a type among {', '.join(RESPONSE_FORMAT_TYPES)}, got "
            f"{show(kind) if isinstance(value, dict) else show(value)}",
        )
    if kind != "json_schema":
        return {"type": kind}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest(
            f"{param}.json_schema", f"must be an object with a name and a schema, got {show(spec)}"
        )
    name = text(spec.get("name"), f"{param}.json_schema.name", max_chars=MAX_NAME_CHARS)
    checked: dict[str, Any] = {"name": name}
    checked["schema"] = _json_schema(spec.get("schema"), f"{param}.json_schema.schema")
    for key in ("description", "strict"):
        if spec.get(key) is not None:
            checked[key] = (
                _boolean(spec[key], f"{param}.json_schema.strict")
                if key == "strict"
                else text(spec[key], f"{param}.json_schema.description")
            )
    return {"type": kind, "json_schema": checked}


def _structured_outputs(value: Any, param: str) -> dict[str, Any]:
    """vLLM's own field: exactly one constraint, and its options."""
    if not isinstance(value, dict):
        raise BadRequest(param, f"must be an object, got {show(value)}")
    unknown = set(value) - {*_CONSTRAINTS, *_OPTIONS}
    if unknown:
        raise BadRequest(f"{param}.{key_name(min(unknown))}", "unknown field of structured_outputs")
    given = [key for key in _CONSTRAINTS if value.get(key) is not None]
    if len(given) != 1:
        raise BadRequest(
            param,
            f"must hold exactly one of {', '.join(_CONSTRAINTS)}, got "
            f"{', '.join(given) if given else 'none'}",
        )
    key = given[0]
    checked: dict[str, Any] = {}
    where = f"{param}.{key}"
    if key == "json":
        checked[key] = _json_schema(value[key], where)
    elif key == "choice":
        choices = value[key]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise BadRequest(where, f"must be a non-empty list of strings, got {show(choices)}")
        checked[key] = [check_unicode(c, f"{where}[{i}]") for i, c in enumerate(choices)]
    elif key == "json_object":
        if value[key] is not True:
            raise BadRequest(where, f"must be true, got {show(value[key])}")
        checked[key] = True
    else:  # regex, grammar, structural_tag: text the engine's grammar backend compiles
        checked[key] = text(value[key], where)
    for option in _OPTIONS:
        if value.get(option) is not None:
            where = f"{param}.{option}"
            check = text if option == "whitespace_pattern" else _boolean
            checked[option] = check(value[option], where)
    return checked


# ------------------------------------------------------------------------------------ tools

#: Most tools a request offers (OpenAI's limit); their parameter schemas count together towards
#: :data:`MAX_SCHEMA_NODES`.
MAX_TOOLS = 128
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")
_TOOL_CHOICES = ("none", "auto", "required")


def tool_name(value: Any, param: str) -> str:
    """A function's name as OpenAI takes it: letters, digits, ``_`` and ``-``, at most 64."""
    name = text(value, param, max_chars=64)
    if not name.isascii() or not name.replace("_", "").replace("-", "").isalnum():
        raise BadRequest(param, f"must hold only letters, digits, '_' and '-', got {show(name)}")
    return name


def _tool(value: Any, param: str) -> dict[str, Any]:
    if (
        not isinstance(value, dict)
        or value.get("type") != "function"
        or not isinstance(value.get("function"), dict)
    ):
        raise BadRequest(
            param,
            'must be {"type": "function", "function": {"name": ...}} (only function tools are served), '
            f"got {show(value.get('type') if isinstance(value, dict) else value)}",
        )
    fn, where = value["function"], f"{param}.function"
    checked: dict[str, Any] = {"name": tool_name(fn.get("name"), f"{where}.name")}
    if fn.get("description") is not None:  # "" too: clients send it
        if not isinstance(fn["description"], str):
            raise BadRequest(f"{where}.description", f"must be a string, got {show(fn['description'])}")
        checked["description"] = check_unicode(fn["description"], f"{where}.description")
    if fn.get("parameters") is not None:
        checked["parameters"] = _json_schema(fn["parameters"], f"{where}.parameters")
    if fn.get("strict") is not None:
        checked["strict"] = _boolean(fn["strict"], f"{where}.strict")
    return {"type": "function", "function": checked}


def tool_params(body: Mapping[str, Any]) -> dict[str, str]:
    """A chat's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked and JSON-encoded
    for ``RequestSpec.sampling`` (empty when it offers no tools: a ``tool_choice`` of ``none`` or
    ``auto`` then asks for nothing and is dropped, as before tools were served)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice is not None and choice not in ("none", "auto"):
            raise BadRequest("tool_choice", "is only allowed when tools are given")
        return {}
    if not isinstance(tools, list):
        raise BadRequest("tools", f"must be a list of function tools, got {show(tools)}")
    if len(tools) > MAX_TOOLS:
        raise BadRequest("tools", f"must be at most {MAX_TOOLS} tools, got {len(tools)}")
    if _nodes_over(tools, MAX_SCHEMA_NODES + 8 * len(tools)):
        raise BadRequest(
            "tools", f"the tools' parameter schemas must hold at most {MAX_SCHEMA_NODES} nodes in all"
        )
    _text_over(tools, "tools")  # all of them together, as the nodes
    checked = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise BadRequest("tools", f"names each function once: {show(twice)} is given twice")
    out = {"tools": json.dumps(checked)}
    if choice is not None:
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict):
                raise BadRequest("tool_choice", 'must be {"type": "function", "function": {"name": ...}}')
            name = tool_name(fn.get("name"), "tool_choice.function.name")
            if name not in names:
                raise BadRequest("tool_choice.function.name", f"names no tool given: {show(name)}")
            choice = {"type": "function", "function": {"name": name}}
        elif choice not in _TOOL_CHOICES:
            raise BadRequest(
                "tool_choice",
                f"must be one of {', '.join(_TOOL_CHOICES)} or a named function, got {show(choice)}",
            )
        out["tool_choice"] = json.dumps(choice)
    if body.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = json.dumps(_boolean(body["parallel_tool_calls"], "parallel_tool_calls"))
    return out


# ------------------------------------------------------------------------------ log probabilities

#: Most alternatives per token (vLLM's default ``--max-logprobs``; OpenAI's chat takes 20).
MAX_TOP_LOGPROBS = 20


def logprob_params(body: Mapping[str, Any], chat: bool) -> dict[str, str]:
    """The output's log probabilities asked for, checked and JSON-encoded for
    ``RequestSpec.sampling``: a chat's ``logprobs`` (true or false) and ``top_logprobs`` (0-20,
    only with ``logprobs`` true), a completion's ``logprobs`` (how many alternatives, 0-20; 0: the
    sampled token's own); empty when none is asked for."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if not chat:
        if top is not None and top != 0:
            raise BadRequest(
                "top_logprobs", "is a chat field: a completion's logprobs says how many alternatives"
            )
        if logprobs is None or logprobs is False:
            return {}
        n = integer(logprobs, "logprobs", 0, MAX_TOP_LOGPROBS)
        return {"logprobs": json.dumps(n)}
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest("logprobs", f"must be true or false, got {show(logprobs)}")
    if top is not None:
        n = integer(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if not logprobs and n:
            raise BadRequest("top_logprobs", "needs logprobs true")
    if not logprobs:
        return {}
    out = {"logprobs": "true"}
    if top is not None:
        out["top_logprobs"] = json.dumps(integer(top, "top_logprobs", 0, MAX_TOP_LOGPROBS))
    return out


def echo_param(body: Mapping[str, Any], chat: bool) -> dict[str, str]:
    """A completion's ``echo`` (the answer's text, and its log probabilities, start with the
    prompt's), for ``RequestSpec.sampling``; empty when not asked for. The chat endpoint's (vLLM's,
    which echoes the last message) is refused."""
    echo = body.get("echo")
    if echo is None or echo is False:
        return {}
    if not isinstance(echo, bool):
        raise BadRequest("echo", f"must be true or false, got {show(echo)}")
    if chat:
        raise BadRequest("echo", "echoing the last message is not supported by the coordinator (only false)")
    return {"echo": "true"}


def metadata_param(value: Any, param: str = "metadata") -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) > 16:
        raise BadRequest(param, "must be an object of at most 16 string pairs")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise BadRequest(param, "keys must be strings up to 64 characters, values up to 512")
        check_unicode(k, param)
        check_unicode(v, f"{param}.{key_name(k)}")
    return dict(value)


# ------------------------------------------------------------------------------------ sampling rules

#: The reasoning efforts the engines' chat takes (vLLM's ``reasoning_effort``, for reasoning models).
EFFORTS = ("low", "medium", "high")


def reasoning_effort(value: Any, param: str) -> str:
    if value not in EFFORTS:
        raise BadRequest(param, f"must be one of {', '.join(EFFORTS)}, got {show(value)}")
    return str(value)


#: The sampling fields forwarded to the engine, each with vLLM's check (``SamplingParams._verify_args``
#: and the OpenAI protocol models). Values are JSON only: a number given as a string is refused, as
#: OpenAI's API refuses it (vLLM's pydantic models would coerce it).
SAMPLING_RULES: dict[str, Rule] = {
    "temperature": _number_in(0, 2),
    "top_p": _number_in(0, 1, lo_open=True),
    "top_k": _integer_in(-1, INT32_MAX, what="an integer: 0 or -1 (disabled) or at least 1"),
    "min_p": _number_in(0, 1),
    "presence_penalty": _number_in(-2, 2),
    "frequency_penalty": _number_in(-2, 2),
    "repetition_penalty": _number_in(0, math.inf, lo_open=True, what="a finite number > 0"),
    "seed": _integer_in(INT64_MIN, INT64_MAX),
    "stop": _stop,
    "stop_token_ids": token_ids,
    "ignore_eos": _boolean,
    "min_tokens": _integer_in(0, INT32_MAX),  # and at most max_tokens: see sampling()
    "logit_bias": _logit_bias,
    "response_format": _response_format,
    "structured_outputs": _structured_outputs,
    "reasoning_effort": reasoning_effort,
}
SAMPLING_KEYS = tuple(SAMPLING_RULES)


def sampling(body: Mapping[str, Any], max_tokens: int) -> dict[str, str]:
    """The sampling fields of ``body``, checked and JSON-encoded for ``RequestSpec.sampling``.
    ``max_tokens``: the request's (the default where it gives none), which bounds ``min_tokens``."""
    values = {key: rule(body[key], key) for key, rule in SAMPLING_RULES.items() if body.get(key) is not None}
    if values.get("min_tokens", 0) > max_tokens:
        raise BadRequest(
            "min_tokens", f"must be at most max_tokens ({max_tokens}), got {show(values['min_tokens'])}"
        )
    return {key: json.dumps(value) for key, value in values.items()}


# ------------------------------------------------------------------------------ unsupported


def _is_one(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == 1


#: Fields that ask for what the coordinator cannot carry: field -> (whether a value asks for
#: nothing, and so is accepted; what the field asks for; the values accepted). Checked on both
#: endpoints: a field one of them lacks is harmless there.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "best_of": (lambda v: v is None or _is_one(v), "several candidates per request", "only 1"),
    "use_beam_search": (lambda v: v is None or v is False, "beam search", "only false"),
    # the output's log probabilities are served (logprob_params); the prompt's are not
    "prompt_logprobs": (lambda v: v is None, "log probabilities of the prompt", "only null"),
    "suffix": (lambda v: v is None or v == "", "a suffix", "only null or ''"),
    # served on the chat endpoint (tool_params); on completions, as OpenAI's has none
    "tools": (lambda v: v is None or v == [], "tool calls on /v1/completions", "only null or []"),
    "tool_choice": (
        lambda v: v is None or v in ("none", "auto"),
        "tool calls on /v1/completions",
        "only null, 'none' or 'auto'",
    ),
    # OpenAI's deprecated function calling, answered in its own shape (message.function_call):
    # dropped, the model would answer as if no function were given, and its client wait for a call
    "functions": (
        lambda v: v is None or v == [],
        "deprecated function calling (send tools)",
        "only null or []",
    ),
    "function_call": (
        lambda v: v is None or v in ("none", "auto"),
        "deprecated function calling (send tool_choice)",
        "only null, 'none' or 'auto'",
    ),
}


def check_supported(body: Mapping[str, Any], *, chat: bool = False) -> None:
    """Refuse a field of :data:`UNSUPPORTED` that asks for something; ``chat``: the tool fields are
    served (:func:`tool_params` checks them)."""
    if not UNSUPPORTED.keys() & body.keys():  # most bodies name none of them: one set operation
        return
    for key, (harmless, feature, accepted) in UNSUPPORTED.items():
        if chat and key in TOOL_KEYS:
            continue
        value = body.get(key)
        if not harmless(value):
            raise BadRequest(
                key, f"{feature} is not supported by the coordinator ({accepted}), got {show(value)}"
            )


#: Where a stream carries the usage (``stream_options``): nowhere, in a last chunk of its own
#: (``include_usage``), or also in every chunk so far (``continuous_usage_stats`` too, vLLM's).
UsageChunks = Literal["none", "last", "every"]


def stream_options(value: Any, stream: bool) -> UsageChunks:
    """Where a stream's usage goes, from ``stream_options`` (``stream``: whether the request
    streams). As vLLM, ``continuous_usage_stats`` counts only with ``include_usage``."""
    if value is None:
        return "none"
    if not isinstance(value, dict):
        raise BadRequest(
            "stream_options",
            'must be an object such as {"include_usage": true}: other stream options are not supported '
            f"by the coordinator, got {show(value)}",
        )
    for key in ("include_usage", "continuous_usage_stats"):
        flag_value = value.get(key)
        if flag_value is not None and not isinstance(flag_value, bool):
            raise BadRequest(f"stream_options.{key}", f"must be true or false, got {show(flag_value)}")
    if value and not stream:  # as OpenAI and vLLM refuse it (vLLM lets an empty object by)
        raise BadRequest("stream_options", "is only allowed when stream is true")
    if not value.get("include_usage"):
        return "none"
    return "every" if value.get("continuous_usage_stats") else "last"


# ------------------------------------------------------------------------------ a gRPC client's map

#: The keys of ``RequestSpec.sampling`` a client may give (what the HTTP front door puts there):
#: the sampling fields, and tools, log probabilities and echo, each checked as the door checks them.
#: Anything else (``model``, ``prompt``, ``max_tokens``, ``stream``...) would go to the engine over
#: the request the coordinator built, its limits and counts.
SPEC_SAMPLING_KEYS = frozenset(SAMPLING_KEYS) | set(TOOL_KEYS) | {"logprobs", "top_logprobs", "echo"}


def sampling_map(given: Mapping[str, str], *, chat: bool, max_tokens: int) -> dict[str, str]:
    """``RequestSpec.sampling`` as a gRPC client gives it (each value JSON), checked as the HTTP
    front door checks the same fields, re-encoded; :class:`BadRequest` names ``sampling.KEY``."""
    body: dict[str, Any] = {}
    for key, value in given.items():
        if key not in SPEC_SAMPLING_KEYS:
            raise BadRequest(
                f"sampling.{key_name(key)}",
                f"is not a sampling field the coordinator forwards ({', '.join(sorted(SPEC_SAMPLING_KEYS))})",
            )
        try:
            body[key] = json.loads(value)
        except ValueError:
            raise BadRequest(
                f"sampling.{key}", f"must be a JSON value (a string in quotes), got {show(value)}"
            ) from None
    out: dict[str, str] = {}
    try:
        if chat:
            out.update(tool_params(body))
        elif body.keys() & set(TOOL_KEYS):
            raise BadRequest("tools", "tool calls are served on chat requests (operation chat)")
        out.update(logprob_params(body, chat))
        out.update(echo_param(body, chat))
        out.update(sampling(body, max_tokens))
    except BadRequest as exc:
        raise BadRequest(f"sampling.{exc.param}" if exc.param else "sampling", str(exc)) from None
    return out


def _content(content: Any, param: str, *, optional: bool = False) -> str | None:
    """A message's content as one text (its text parts joined, as vLLM joins them); None where it
    may be absent (``optional``: an assistant's message that holds tool calls)."""
    if content is None and optional:
        return None
    if isinstance(content, list):  # content parts: only text is served
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(f"{param}[{j}]", "only text content parts are supported")
            texts.append(check_unicode(part["text"], f"{param}[{j}].text"))
        return "\n".join(texts)
    if isinstance(content, str):
        return check_unicode(content, param)
    raise BadRequest(param, "must be a string or a list of text parts")


def _earlier_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` (the calls it made earlier in the conversation)."""
    if not isinstance(calls, list) or not calls:
        raise BadRequest(param, "must be a non-empty list of tool calls")
    checked = []
    for k, call in enumerate(calls):
        where = f"{param}[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise BadRequest(where, 'must be {"id", "type": "function", "function": {"name", "arguments"}}')
        args = fn.get("arguments")
        if not isinstance(args, str):
            raise BadRequest(f"{where}.function.arguments", f"must be a string (JSON text), got {show(args)}")
        checked.append(
            {
                "id": text(call.get("id"), f"{where}.id", max_chars=MAX_NAME_CHARS),
                "type": "function",
                "function": {  # the model's own words: any name it made, even one no tool has
                    "name": text(fn.get("name"), f"{where}.function.name", max_chars=MAX_NAME_CHARS),
                    "arguments": check_unicode(args, f"{where}.function.arguments"),
                },
            }
        )
    return checked


def chat_prompt(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    """A chat's messages rendered as plain text (for the backends without a chat template), and
    as the engine's chat endpoint takes them (each content as one text; an assistant's earlier
    tool calls and a tool's answers with their ids)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest("messages", f"must be at most {MAX_MESSAGES} messages, got {len(messages)}")
    lines = []
    normal = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]", "must be an object with a string 'role'")
        role = check_unicode(m["role"], f"messages[{i}].role")
        calls = m.get("tool_calls")
        has_calls = role == "assistant" and calls is not None and calls != []
        content = _content(m.get("content"), f"messages[{i}].content", optional=has_calls)
        message: dict[str, Any] = {"role": role, "content": content}
        line = content or ""
        if has_calls:
            message["tool_calls"] = _earlier_calls(calls, f"messages[{i}].tool_calls")
            said = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})" for c in message["tool_calls"]
            )
            line = f"{line} [calls {said}]".lstrip()
        if role == "tool":
            message["tool_call_id"] = text(
                m.get("tool_call_id"), f"messages[{i}].tool_call_id", max_chars=MAX_NAME_CHARS
            )
        lines.append(f"{role}: {line}")
        normal.append(message)
    return "\n".join(lines) + "\nassistant:", normal
