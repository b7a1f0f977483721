"""Prompt tokens counted with the model's own tokenizer (a chat through its chat template), and the
byte estimate where there is none."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from qlm_plugin.coordinator.prompt_tokens import PromptCounter, estimate_prompt_tokens
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

TEMPLATE = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer with a distinctive chat template, saved as a model folder holds it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "hello", "world", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "be", "brief"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<\|[a-z]+\|>"), behavior="isolated")]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = TEMPLATE
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def chat(*messages: tuple[str, str]) -> pb.RequestSpec:
    body = [{"role": r, "content": c} for r, c in messages]
    rendered = "\n".join(f"{r}: {c}" for r, c in messages) + "\nassistant:"
    return pb.RequestSpec(model="m", prompt=rendered, chat_messages=json.dumps(body))


def test_a_chat_is_counted_through_the_models_chat_template(tokenizer_folder: Path) -> None:
    counter = PromptCounter({"m": str(tokenizer_folder)})
    counter.load()
    # <|system|> be brief <|end|> <|user|> hello world <|end|> <|assistant|>
    assert counter.count(chat(("system", "be brief"), ("user", "hello world"))) == 9
    assert counter.count(pb.RequestSpec(model="m", prompt="hello world hello")) == 3


def test_the_tools_a_chat_offers_count_as_its_template_writes_them(tokenizer_folder: Path) -> None:
    """The engine's template writes the tools into the prompt (a long tool list is thousands of
    tokens): they are counted, through the template, or in the estimate without one."""
    tools = json.dumps([{"type": "function", "function": {"name": "hello"}}])
    counter = PromptCounter({"m": str(tokenizer_folder)})
    counter.load()
    spec = chat(("user", "hello world"))
    spec.sampling["tools"] = tools
    assert counter.count(spec) == 5 + 3  # <|system|> hello <|end|>
    blind = PromptCounter({})
    spec.model = "other"
    assert (
        blind.count(spec) == estimate_prompt_tokens(spec.prompt + tools) > estimate_prompt_tokens(spec.prompt)
    )


def test_without_a_tokenizer_the_prompt_is_estimated_from_its_bytes(
    tokenizer_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counter = PromptCounter({"gone": "/no/such/folder"})
    spec = pb.RequestSpec(model="gone", prompt="x" * 40)
    assert counter.count(spec) == estimate_prompt_tokens(spec.prompt) == 10
    assert "cannot load the tokenizer of /no/such/folder (OSError: no folder" in caplog.text
    other = pb.RequestSpec(model="other", prompt="y" * 8)
    assert counter.count(other) == 2  # a model without a tokenizer named


def test_a_template_that_refuses_the_messages_falls_back_to_the_estimate(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")))
    fast.chat_template = "{{ raise_exception('system messages are not supported') }}"
    fast.save_pretrained(tmp_path)
    counter = PromptCounter({"m": str(tmp_path)})
    spec = chat(("system", "abcdefgh"))
    assert counter.count(spec) == estimate_prompt_tokens(spec.prompt)


def test_a_long_prompt_is_counted_away_from_the_event_loop(tokenizer_folder: Path, tmp_path: Path) -> None:
    """A 4 MiB prompt took the coordinator's event loop 4 s to count: every other request, and the
    instances' heartbeats, waited (they were declared lost). A long prompt is now counted in a
    thread of its own, with the same result, while the loop serves on."""
    import asyncio

    from qlm_plugin.testing.stack import local_stack
    from qlm_plugin.transport.client import CoordinatorClient
    from qlm_plugin.workloads.scenario import parse_scenario

    scenario = parse_scenario(
        f"""
name: with-a-tokenizer
models:
  - {{name: m, profile: llama-3.1-8b, tokenizer: {tokenizer_folder}}}
instances:
  - {{count: 1, gpu: h100, models: [m]}}
classes:
  - {{name: batch, share: 1.0, e2e_s: 600}}
"""
    )
    prompt = "hello world " * 300_000  # 600,000 tokens of this tokenizer: refused as too long

    async def main() -> tuple[int, str]:
        async with (
            local_stack(tmp_path, instances=1, scenario=scenario) as st,
            CoordinatorClient(st.grpc_target) as c,
        ):
            ticks = 0

            async def heartbeat() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            beating = asyncio.create_task(heartbeat())
            await asyncio.sleep(0.05)
            before = ticks
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await c.submit(pb.RequestSpec(model="m", prompt=prompt, max_tokens=4), timeout_s=60)
            during = ticks - before
            beating.cancel()
            return during, refused.value.details() or ""

    ticks, error = asyncio.run(main())
    assert "prompt of 600000 tokens does not fit" in error, error  # counted by the tokenizer
    assert ticks > 3, "the event loop stood still while the prompt was counted"
