"""A finished job is kept for status without its chat's prompt text (its messages rendered, a copy
of them): rendered again when it is read, the spec is the one accepted, field by field."""

from __future__ import annotations

from typing import Any

import pytest

from qlm_plugin.coordinator.jobs import pack_spec, unpack_spec
from qlm_plugin.coordinator.json_codec import dumps
from qlm_plugin.coordinator.openai_params import chat_prompt
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "héllo ✓ " * 500}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "user", "content": "\n\nand then?\u2028"},
    ],
]


@pytest.mark.parametrize("messages", CHATS)
def test_a_chat_kept_without_its_prompt_reads_back_as_accepted(messages: list[dict[str, Any]]) -> None:
    spec = pb.RequestSpec(model="m", max_tokens=8, idempotency_key="k")
    spec.prompt, normal = chat_prompt(messages)  # as the front door and gRPC make it
    spec.chat_messages = dumps(normal).decode()
    packed = pack_spec(spec)
    assert len(packed) < len(spec.SerializeToString()) - len(spec.prompt.encode())  # the text is not kept
    assert unpack_spec(packed) == spec


def test_a_completion_is_kept_whole() -> None:
    spec = pb.RequestSpec(model="m", prompt="once upon a time", max_tokens=8)
    assert pack_spec(spec) == spec.SerializeToString() and unpack_spec(pack_spec(spec)) == spec
