"""Parsing of OpenAI-style bodies and QLM headers into requests (the front door's validation)."""

from __future__ import annotations

from typing import Any

import pytest

from qlm_plugin.coordinator.http_api import BadRequest, parse_openai


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
    assert (stream, usage) == (True, True)
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
    assert spec.prompt == "system: be brief\nuser: hi there\nassistant:"
    assert spec.operation == "chat" and spec.max_tokens == 3


@pytest.mark.parametrize(
    ("body", "headers", "chat", "param"),
    [
        ([], {}, False, None),
        ({"prompt": "p"}, {}, False, "model"),
        ({"model": "", "prompt": "p"}, {}, False, "model"),
        ({"model": "m", "prompt": ""}, {}, False, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, {}, False, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, {}, False, "prompt"),
        ({"model": "m", "prompt": "p", "max_tokens": 1.5}, {}, False, "max_tokens"),
        ({"model": "m", "prompt": "p", "max_tokens": True}, {}, False, "max_tokens"),
        ({"model": "m", "prompt": "p", "stream": "yes"}, {}, False, "stream"),
        ({"model": "m", "prompt": "p", "n": 3}, {}, False, "n"),
        ({"model": "m", "prompt": "p", "qlm": []}, {}, False, "qlm"),
        ({"model": "m", "prompt": "p", "qlm": {"ttft_ms": 0}}, {}, False, "qlm.ttft_ms"),
        ({"model": "m", "prompt": "p", "qlm": {"e2e_ms": "soon"}}, {}, False, "qlm.e2e_ms"),
        ({"model": "m", "prompt": "p"}, {"x-slo-ttft-ms": "nan"}, False, "qlm.ttft_ms"),
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
