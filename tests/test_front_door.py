"""Parsing of OpenAI-style bodies and QLM headers into requests (the front door's validation)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlm_plugin.coordinator.http_api import BadRequest, parse_openai
from qlm_plugin.transport.openai_client import structured_output_field


def parse(body: Any, headers: dict[str, str] | None = None, chat: bool = False) -> Any:
    return parse_openai(body, headers or {}, chat)


def test_completion_fields_and_the_qlm_extension() -> None:
    spec, stream, usage = parse(
        {
            "model": "m",
            "prompt": ["one prompt"],
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.5,
            "stop": ["\n"],
            "qlm": {
                "ttft_ms": 250,
                "e2e_ms": 9000,
                "class": "interactive",
                "priority": -1,
                "tenant": "t1",
                "reject_if_late": True,
                "idempotency_key": "abc",
            },
        }
    )
    assert (spec.model, spec.prompt, spec.max_tokens, spec.operation) == (
        "m",
        "one prompt",
        7,
        "text_completion",
    )
    assert (stream, usage) == (True, "last")
    assert (spec.slo.ttft_ms, spec.slo.e2e_ms, spec.slo.slo_class, spec.slo.priority) == (
        250,
        9000,
        "interactive",
        -1,
    )
    assert (spec.tenant, spec.reject_if_late, spec.idempotency_key) == ("t1", True, "abc")
    assert spec.sampling["temperature"] == "0.5" and spec.sampling["stop"] == '["\\n"]'


def test_headers_fill_in_and_the_body_wins() -> None:
    headers = {
        "x-slo-ttft-ms": "300",
        "x-slo-e2e-ms": "5000",
        "x-qlm-class": "batch",
        "x-qlm-priority": "2",
        "x-qlm-tenant": "hdr",
        "x-qlm-reject-late": "true",
        "idempotency-key": "k",
    }
    spec, _, _ = parse({"model": "m", "prompt": "p"}, headers)
    assert (spec.slo.ttft_ms, spec.slo.e2e_ms, spec.slo.slo_class, spec.slo.priority) == (
        300,
        5000,
        "batch",
        2,
    )
    assert (spec.tenant, spec.reject_if_late, spec.idempotency_key) == ("hdr", True, "k")
    spec, _, _ = parse({"model": "m", "prompt": "p", "qlm": {"ttft_ms": 100, "tenant": "body"}}, headers)
    assert (spec.slo.ttft_ms, spec.tenant) == (100, "body")


def test_vllm_priority_field_is_honoured() -> None:
    spec, _, _ = parse({"model": "m", "prompt": "p", "priority": 3})
    assert spec.slo.priority == 3


def test_chat_messages_are_rendered_with_text_parts() -> None:
    spec, _, _ = parse(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_completion_tokens": 3,
        },
        chat=True,
    )
    assert spec.prompt == "system: be brief\nuser: hi \nthere\nassistant:"  # parts joined as vLLM does
    assert spec.operation == "chat" and spec.max_tokens == 3


@pytest.mark.parametrize(
    ("body", "headers", "chat", "param"),
    [
        ([], {}, False, None),
        ({"prompt": "p"}, {}, False, "model"),
        ({"model": "", "prompt": "p"}, {}, False, "model"),
        ({"model": "m", "prompt": ""}, {}, False, "prompt"),
        ({"model": "m", "prompt": [1, "2"]}, {}, False, "prompt"),
        ({"model": "m", "prompt": ["a", ""]}, {}, False, "prompt[1]"),
        ({"model": "m", "prompt": [[1, 2], []]}, {}, False, "prompt[1]"),
        ({"model": "m", "prompt": "p", "max_tokens": 1.5}, {}, False, "max_tokens"),
        ({"model": "m", "prompt": "p", "max_tokens": True}, {}, False, "max_tokens"),
        ({"model": "m", "prompt": "p", "stream": "yes"}, {}, False, "stream"),
        ({"model": "m", "prompt": "p", "n": 0}, {}, False, "n"),
        ({"model": "m", "prompt": "p", "n": 129}, {}, False, "n"),
        ({"model": "m", "prompt": "p", "n": True}, {}, False, "n"),
        ({"model": "m", "prompt": "p", "n": 2.5}, {}, False, "n"),
        ({"model": "m", "prompt": "p", "qlm": []}, {}, False, "qlm"),
        ({"model": "m", "prompt": "p", "qlm": {"ttft_ms": 0}}, {}, False, "qlm.ttft_ms"),
        ({"model": "m", "prompt": "p", "qlm": {"e2e_ms": "soon"}}, {}, False, "qlm.e2e_ms"),
        ({"model": "m", "prompt": "p"}, {"x-slo-ttft-ms": "nan"}, False, "x-slo-ttft-ms"),
        # Python's number syntax is not a header's (found by review)
        ({"model": "m", "prompt": "p"}, {"x-slo-ttft-ms": "1_000"}, False, "x-slo-ttft-ms"),
        ({"model": "m", "prompt": "p"}, {"x-qlm-priority": " 5 "}, False, "x-qlm-priority"),
        ({"model": "m", "prompt": "p", "qlm": {"class": ""}}, {}, False, "qlm.class"),
        ({"model": "m", "prompt": "p", "qlm": {"priority": "high"}}, {}, False, "qlm.priority"),
        ({"model": "m", "prompt": "p", "qlm": {"speed": 1}}, {}, False, "qlm.speed"),
        ({"model": "m", "messages": "hi"}, {}, True, "messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, {}, True, "messages[0]"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            {},
            True,
            "messages[0].content[0]",
        ),
    ],
)
def test_invalid_input_names_the_field(
    body: Any, headers: dict[str, str], chat: bool, param: str | None
) -> None:
    with pytest.raises(BadRequest) as err:
        parse(body, headers, chat)
    assert err.value.param == param
    assert err.value.status == 400


# ------------------------------------------------------------- hardening: no 500 on bad input

BASE: dict[str, Any] = {"model": "m", "prompt": "p"}
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(body: Any, headers: dict[str, str] | None = None, chat: bool = False) -> BadRequest:
    """The refusal of a request, which must be a 400 whose message the handler prefixes with the param."""
    with pytest.raises(BadRequest) as err:
        parse(body, headers, chat)
    assert err.value.status == 400
    assert len(str(err.value)) < 300  # values are quoted short, whatever their size
    return err.value


@pytest.mark.parametrize(
    "header",
    [
        "x-slo-ttft-ms",
        "x-slo-e2e-ms",
        "x-qlm-class",
        "x-qlm-priority",
        "x-qlm-tenant",
        "x-qlm-reject-late",
        "idempotency-key",
    ],
)
@pytest.mark.parametrize(
    "value",
    [
        "\udcc3\udca9",  # aiohttp's surrogateescape of bytes that are not UTF-8
        "éé",  # valid UTF-8, not ASCII
        "a\x7fb",  # a control character
    ],
)
def test_header_values_must_be_printable_ascii(header: str, value: str) -> None:
    err = refused(BASE, {header: value})
    assert err.param == header
    assert "printable ASCII" in str(err) and "qlm." in str(err)  # says where such text belongs


@pytest.mark.parametrize(
    ("body", "chat", "param"),
    [
        ({"model": "m", "prompt": "a\ud800b"}, False, "prompt"),
        ({"model": "m", "prompt": ["\udfff"]}, False, "prompt"),
        ({"model": "m\ud800", "prompt": "p"}, False, "model"),
        ({**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, True, "messages[0].content"),
        ({**CHAT, "messages": [{"role": "\ud800", "content": "x"}]}, True, "messages[0].role"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
            True,
            "messages[0].content[0].text",
        ),
        ({**BASE, "stop": "\ud800"}, False, "stop"),
        ({**BASE, "stop": ["ok", "\ud800"]}, False, "stop[1]"),
        ({**BASE, "qlm": {"tenant": "\ud800"}}, False, "qlm.tenant"),
        ({**BASE, "qlm": {"class": "\ud800"}}, False, "qlm.class"),
        ({**BASE, "qlm": {"idempotency_key": "k\ud800"}}, False, "qlm.idempotency_key"),
    ],
)
def test_lone_surrogates_in_body_strings_name_the_field(body: Any, chat: bool, param: str) -> None:
    err = refused(body, chat=chat)
    assert err.param == param
    assert "surrogate" in str(err)


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({**BASE, "qlm": {"priority": 2**31}}, {}, "qlm.priority"),
        ({**BASE, "qlm": {"priority": -(2**31) - 1}}, {}, "qlm.priority"),
        ({**BASE, "priority": 2**40}, {}, "priority"),
        (BASE, {"x-qlm-priority": "99999999999"}, "x-qlm-priority"),
        ({**BASE, "qlm": {"true_output_tokens": 2**31}}, {}, "qlm.true_output_tokens"),
        ({**BASE, "qlm": {"true_output_tokens": -1}}, {}, "qlm.true_output_tokens"),
        ({**BASE, "max_tokens": 2**31}, {}, "max_tokens"),
        ({**BASE, "max_tokens": 10**400}, {}, "max_tokens"),  # float() of it overflowed: a 500
        ({**BASE, "qlm": {"ttft_ms": 10**400}}, {}, "qlm.ttft_ms"),
        ({"model": "m", "prompt": [1, 2**31]}, {}, "prompt"),
        ({"model": "m", "prompt": [-1]}, {}, "prompt"),
    ],
)
def test_integers_that_do_not_fit_their_protobuf_field_are_refused(
    body: Any, headers: dict[str, str], param: str
) -> None:
    assert refused(body, headers).param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**BASE, "qlm": {"tenant": "t" * 257}}, "qlm.tenant"),
        ({**BASE, "qlm": {"class": "c" * 257}}, "qlm.class"),
        ({**BASE, "qlm": {"idempotency_key": "k" * 257}}, "qlm.idempotency_key"),
        ({"model": "m" * 257, "prompt": "p"}, "model"),
    ],
)
def test_names_and_keys_are_bounded(body: Any, param: str) -> None:
    err = refused(body)
    assert err.param == param and "at most 256" in str(err)
    at_most = {**BASE, "model": "m" * 256} if param == "model" else {**BASE, "qlm": {param[4:]: "x" * 256}}
    parse(at_most)


@pytest.mark.parametrize(
    ("body", "chat", "param"),
    [
        ({**BASE, "stream_options": "yes"}, False, "stream_options"),
        ({**BASE, "stream_options": {"include_usage": "yes"}}, False, "stream_options.include_usage"),
        (
            {**BASE, "stream_options": {"continuous_usage_stats": 1}},
            False,
            "stream_options.continuous_usage_stats",
        ),
        ({**CHAT, "messages": {"role": "user"}}, True, "messages"),
        ({**CHAT, "messages": [["user", "hi"]]}, True, "messages[0]"),
        ({**CHAT, "messages": [{"role": 1, "content": "x"}]}, True, "messages[0]"),
        ({**CHAT, "messages": [{"role": "user", "content": None}]}, True, "messages[0].content"),
        ({**CHAT, "messages": [{"role": "user", "content": ["text"]}]}, True, "messages[0].content[0]"),
        ({**BASE, "qlm": {"priority": "1.5"}}, False, "qlm.priority"),
        ({**BASE, "qlm": {"ttft_ms": float("nan")}}, False, "qlm.ttft_ms"),
        ({**BASE, "qlm": {"e2e_ms": float("inf")}}, False, "qlm.e2e_ms"),
        ({**BASE, "qlm": {"ttft_ms": True}}, False, "qlm.ttft_ms"),
        ({**BASE, "qlm": {"reject_if_late": "maybe"}}, False, "qlm.reject_if_late"),
        ({**BASE, "qlm": {"idempotency_key": 42}}, False, "qlm.idempotency_key"),
        ({**BASE, "qlm": {"\ud800": 1}}, False, "qlm.'\\ud800'"),
        ({"model": ["m"], "prompt": "p"}, False, "model"),
        ({"model": "m", "prompt": {"text": "p"}}, False, "prompt"),
        ({"model": "m", "prompt": []}, False, "prompt"),
        ({"model": "m", "prompt": [[]]}, False, "prompt"),
        ({"model": "m", "prompt": [True, 2]}, False, "prompt"),
    ],
)
def test_odd_shapes_and_values_name_the_field(body: Any, chat: bool, param: str) -> None:
    assert refused(body, chat=chat).param == param


def test_reject_late_header_is_a_flag() -> None:
    assert parse(BASE, {"x-qlm-reject-late": "yes"})[0].reject_if_late is True
    assert parse(BASE, {"x-qlm-reject-late": "0"})[0].reject_if_late is False
    assert refused(BASE, {"x-qlm-reject-late": "maybe"}).param == "x-qlm-reject-late"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", "hot", "must be a number in [0, 2], got 'hot'"),
        ("temperature", 2.5, "in [0, 2]"),
        ("temperature", -0.1, "in [0, 2]"),
        ("temperature", True, "got true"),
        ("temperature", "0.5", "got '0.5'"),  # JSON numbers only, as OpenAI's API
        ("top_p", 0, "in (0, 1]"),
        ("top_p", 1.5, "in (0, 1]"),
        ("top_k", -2, "0 or -1 (disabled) or at least 1"),
        ("top_k", 1.5, "an integer"),
        ("top_k", 2**31, "an integer"),
        ("min_p", 1.1, "in [0, 1]"),
        ("presence_penalty", 3, "in [-2, 2]"),
        ("frequency_penalty", -2.5, "in [-2, 2]"),
        ("frequency_penalty", [1], "got a list"),
        ("repetition_penalty", 0, "> 0"),
        ("repetition_penalty", float("inf"), "> 0"),
        ("seed", 2**63, "integer in"),
        ("seed", -(2**63) - 1, "integer in"),
        ("seed", "42", "integer in"),
        ("stop", "", "non-empty"),
        ("stop", ["a", ""], "non-empty"),
        ("stop", [1], "non-empty string"),
        ("stop", {"a": 1}, "got an object"),
        ("stop_token_ids", [1, "2"], "token ids"),
        ("stop_token_ids", 5, "token ids"),
        ("ignore_eos", "yes", "true or false"),
        ("ignore_eos", 1, "true or false"),
        ("min_tokens", -1, "in [0,"),
        ("logit_bias", [1], "object of token id"),
        ("logit_bias", {"abc": 1}, "token ids"),
        ("logit_bias", {"9" * 5000: 1}, "token ids"),  # int() of it would fail past 4300 digits
        ("logit_bias", {"5": 101}, "in [-100, 100]"),
        ("logit_bias", {"5": "1"}, "in [-100, 100]"),
    ],
)
def test_sampling_parameters_are_checked_as_vllm_checks_them(field: str, value: Any, message: str) -> None:
    err = refused({**BASE, field: value})
    assert err.param is not None and err.param.startswith(field)
    assert message in str(err), str(err)


def test_min_tokens_is_at_most_max_tokens_or_the_default() -> None:
    assert refused({**BASE, "max_tokens": 4, "min_tokens": 5}).param == "min_tokens"
    assert refused({**BASE, "min_tokens": 17}).param == "min_tokens"  # the default max_tokens is 16
    spec, _, _ = parse({**BASE, "max_tokens": 5, "min_tokens": 5})
    assert spec.sampling["min_tokens"] == "5"


def test_valid_sampling_parameters_are_forwarded() -> None:
    body = {
        **BASE,
        "max_tokens": 32,
        "temperature": 0,
        "top_p": 1,
        "top_k": -1,
        "min_p": 0.05,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "repetition_penalty": 1.1,
        "seed": 2**63 - 1,
        "stop": "END",
        "stop_token_ids": [2, 7],
        "ignore_eos": False,
        "min_tokens": 3.0,  # an integral float is an integer, as pydantic takes it
        "logit_bias": {"50256": -100, "11": 2.5},
    }
    spec, _, _ = parse(body)
    assert {k: json.loads(v) for k, v in spec.sampling.items()} == {
        **{k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens")},
        "min_tokens": 3,
        "logit_bias": {"50256": -100.0, "11": 2.5},
    }
    assert json.loads(spec.sampling["min_tokens"]) == 3 and isinstance(
        json.loads(spec.sampling["min_tokens"]), int
    )


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2, 3]], [0, 2**31 - 1]])
def test_a_prompt_of_token_ids_is_accepted(prompt: Any) -> None:
    spec, _, _ = parse({"model": "m", "prompt": prompt, "max_tokens": 2})
    ids = prompt[0] if isinstance(prompt[0], list) else prompt
    assert list(spec.prompt_token_ids) == ids
    assert spec.prompt == ""


@pytest.mark.parametrize(
    ("body", "chat", "param"),
    [
        ({**BASE, "best_of": 3}, False, "best_of"),
        ({**BASE, "use_beam_search": True}, False, "use_beam_search"),
        ({**CHAT, "echo": True}, True, "echo"),
        ({**BASE, "prompt_logprobs": 1}, False, "prompt_logprobs"),
        ({**BASE, "suffix": "tail"}, False, "suffix"),
        ({**BASE, "tools": [{"type": "function", "function": {"name": "f"}}]}, False, "tools"),
        ({**BASE, "tool_choice": "required"}, False, "tool_choice"),
        ({**BASE, "stream_options": ["include_usage"]}, False, "stream_options"),
    ],
)
def test_what_the_coordinator_cannot_carry_is_refused_saying_so(body: Any, chat: bool, param: str) -> None:
    err = refused(body, chat=chat)
    assert err.param == param
    assert "not supported by the coordinator" in str(err)


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}


@pytest.mark.parametrize(
    ("field", "value", "carried"),
    [
        ("response_format", {"type": "json_object"}, {"type": "json_object"}),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True, "x": 1}},
            {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
        ),
        ("structured_outputs", {"choice": ["red", "blue"]}, {"choice": ["red", "blue"]}),
        ("structured_outputs", {"regex": "[0-9]+", "disable_any_whitespace": True}, None),
        ("structured_outputs", {"json": json.dumps(SCHEMA)}, {"json": SCHEMA}),
        ("structured_outputs", {"grammar": 'root ::= "a"'}, None),
        ("structured_outputs", {"json_object": True}, None),
    ],
)
def test_structured_output_is_carried_to_the_engine(field: str, value: Any, carried: Any) -> None:
    for chat, body in ((True, CHAT), (False, BASE)):
        spec, _, _ = parse({**body, field: value}, chat=chat)
        assert json.loads(spec.sampling[field]) == (carried or value)
        assert structured_output_field(spec.sampling) == field
    spec, _, _ = parse({**CHAT, "response_format": {"type": "text"}}, chat=True)
    assert structured_output_field(spec.sampling) is None  # asks for nothing: any instance serves it


@pytest.mark.parametrize(
    ("value", "param", "message"),
    [
        ({"response_format": "json"}, "response_format", "a type among text, json_object, json_schema"),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "a type among"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "a name and a schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
            "non-empty string",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 1}}}},
            "response_format.json_schema.schema",
            "not a valid JSON Schema at type",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
            "response_format.json_schema.schema",
            "a JSON Schema (an object)",
        ),
        (  # its check would hold the event loop for seconds (found by review)
            {"structured_outputs": {"json": {"properties": {f"p{i}": {} for i in range(4000)}}}},
            "structured_outputs.json",
            "at most 4000 nodes",
        ),
        (  # one 3-MB pattern held the event loop 8 s, every tenant waiting (found by review)
            {"structured_outputs": {"json": {"type": "string", "pattern": "(a)" * 6000}}},
            "structured_outputs.json",
            "holds regular expressions of over 16384 characters in all",
        ),
        (
            {"structured_outputs": {"json": {"enum": ["x" * 140_000]}}},
            "structured_outputs.json",
            "at most 131072 characters of text",
        ),
        (  # a regex past C's int: the metaschema's own check raised OverflowError (a 500)
            {"structured_outputs": {"json": {"type": "string", "pattern": "a{4294967296}"}}},
            "structured_outputs.json",
            "not a valid JSON Schema: OverflowError",
        ),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one of json, regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "got regex, choice"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list of strings"),
        ({"structured_outputs": {"json": "{no"}}, "structured_outputs.json", "the text is not JSON"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object", "must be true"),
        ({"structured_outputs": {"regx": "a"}}, "structured_outputs.regx", "unknown field"),
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": "yes"}},
            "structured_outputs.disable_any_whitespace",
            "true or false",
        ),
    ],
)
def test_a_malformed_structured_output_names_its_field(value: Any, param: str, message: str) -> None:
    err = refused({**CHAT, **value}, chat=True)
    assert err.param == param and message in str(err)


def test_harmless_openai_fields_are_accepted_and_unknown_ones_ignored() -> None:
    harmless = {
        "user": "u1",
        "n": 1,
        "best_of": 1,
        "echo": False,
        "logprobs": None,
        "top_logprobs": 0,
        "suffix": None,
        "stream": None,
        "stream_options": None,  # refused with stream false, as OpenAI and vLLM refuse it
        "metadata": {"k": "v"},
        "store": False,
        "parallel_tool_calls": True,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "service_tier": "auto",
        "some_future_field": {"\ud800": [1e308]},
    }
    spec, stream, usage = parse({**CHAT, **harmless, "logprobs": False}, chat=True)
    assert (spec.prompt, stream, usage) == ("user: hi\nassistant:", False, "none")
    parse({**BASE, **harmless})
    assert refused({**BASE, "qlm": {"speed": 1}}).param == "qlm.speed"  # not inside qlm


# Strings with lone surrogates (as JSON's \ud800 escapes and aiohttp's surrogateescape give them)
# and integers past protobuf's and float's ranges, which plain st.text() and st.integers() rarely make.
ODD_TEXT = st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=8)
ODD_INTS = st.integers() | st.sampled_from([2**31, -(2**31) - 1, 2**63, 10**400])
QLM = st.dictionaries(
    st.sampled_from(["ttft_ms", "priority", "tenant", "true_output_tokens"]), ODD_INTS | ODD_TEXT
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                *("model", "prompt", "max_tokens", "stream_options", "n", "stop", "seed", "top_k"),
                *("response_format", "structured_outputs"),
            ]
        ),
        st.recursive(
            st.none() | st.booleans() | ODD_INTS | st.floats() | ODD_TEXT,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
            max_leaves=6,
        ),
    )
    | st.fixed_dictionaries({"model": st.just("m"), "prompt": ODD_TEXT, "qlm": QLM}),
    st.dictionaries(st.sampled_from(["x-qlm-tenant", "x-qlm-priority", "x-slo-ttft-ms"]), ODD_TEXT),
)
def test_anything_is_parsed_or_refused_with_a_bad_request(
    body: dict[str, Any], headers: dict[str, str]
) -> None:
    try:
        spec, _, _ = parse(body, headers)
    except BadRequest as exc:
        assert exc.status == 400 and len(str(exc)) < 300
        return
    spec.SerializeToString()  # what protobuf took, it can send


def test_an_authorization_header_that_is_not_ascii_is_a_401_not_a_crash() -> None:
    from types import SimpleNamespace

    from qlm_plugin.coordinator.auth import Authenticator, AuthError, Principal
    from qlm_plugin.coordinator.http_api import FrontDoor

    auth = Authenticator({"s3cret": Principal("c", frozenset({"client"}))})
    front = FrontDoor(None, auth)  # type: ignore[arg-type]  # only the authenticator is used
    # as aiohttp hands over header bytes that are not UTF-8: surrogateescape'd
    request = SimpleNamespace(headers={"Authorization": "Bearer caf\udcc3"})
    with pytest.raises(AuthError) as err:
        front._principal(request, "client")  # type: ignore[arg-type]
    assert err.value.status == "unauthenticated" and "printable ASCII" in str(err.value)
    ok = SimpleNamespace(headers={"Authorization": "Bearer s3cret"})
    assert front._principal(ok, "client").name == "c"  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", [[[1, 2, 3]], ["hello there", [1, 2, 3]], [[1, 2], "hello there"]])
def test_an_echo_of_a_prompt_of_token_ids_needs_logprobs_whichever_prompt_it_is(prompt: Any) -> None:
    """Token ids are echoed from their log probabilities: without them the echo is refused, for
    any of a request's prompts (only the first was checked: a later one was answered unechoed)."""
    err = refused({"model": "m", "prompt": prompt, "max_tokens": 2, "echo": True})
    assert err.param == "echo" and "ask for logprobs too" in str(err)
    spec, _, _ = parse({"model": "m", "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 1})
    assert "echo" in spec.sampling


def test_the_tools_regular_expressions_are_bounded_together_not_each() -> None:
    """Each tool's schema under the bound, 128 of them over it: their check compiled them all."""
    pattern = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a)" * 1000}}}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": pattern}} for i in range(128)]
    err = refused({**CHAT, "tools": tools}, chat=True)
    assert err.param == "tools" and "regular expressions of over 16384 characters in all" in str(err)
