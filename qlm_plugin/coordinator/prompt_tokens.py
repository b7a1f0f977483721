"""How many tokens a request's prompt is: counted with its model's own tokenizer where the scenario
names one (``models[].tokenizer``; ``qlm serve --engine vllm`` names each model's folder), a chat
through the model's chat template as the engine will apply it; else estimated from its bytes.

The count sizes the request for admission, the queue manager and the context check, so an estimate
off by 2x misplaces long prompts. Tokenizers load from local files only (nothing is downloaded at
run time) through ``transformers`` (which vLLM installs); one that cannot load is reported once and
the model's prompts are estimated.

Threads: :meth:`PromptCounter.count` is the event loop's (a tokenizer object must not be used by
two threads at once: it keeps per-call settings). A long prompt costs seconds to count (4 MiB: 4 s),
time every other request on the loop would wait, so the loop counts only prompts under
:data:`OFF_LOOP_BYTES`; :meth:`PromptCounter.count_elsewhere` counts the others with a second copy
of the tokenizer, one at a time, in a thread (the tokenizer releases the GIL while it counts), as
it does for the lines of a batch file, which are parsed in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

log = logging.getLogger("qlm_plugin.coordinator")


#: A prompt (or chat) at least this long is counted away from the event loop, bytes.
OFF_LOOP_BYTES = 32 * 1024


def estimate_prompt_tokens(text: str) -> int:
    """About four bytes of English per token (the byte estimate where no tokenizer is known)."""
    return max(1, math.ceil(len(text.encode()) / 4))


def _load(source: str) -> Any:
    """The fast tokenizer (``tokenizer.json``) where there is one: it loads without torch, which
    the coordinator does not import (and which a CPU build of vLLM cannot import without its
    shims); else whatever ``AutoTokenizer`` finds."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().is_dir():
        raise OSError(f"no folder {source}")
    try:
        return PreTrainedTokenizerFast.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return AutoTokenizer.from_pretrained(source, local_files_only=True)


class PromptCounter:
    """``sources``: model name -> a tokenizer's folder or Hugging Face id (in the local cache)."""

    def __init__(self, sources: Mapping[str, str]) -> None:
        self.sources = dict(sources)
        self.tokenizers: dict[str, Any] = {}
        self._elsewhere: PromptCounter | None = None  # the copy that counts in threads
        self._elsewhere_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def load(self) -> None:
        """Load every tokenizer now (a first request should not wait for ``transformers``)."""
        for model in self.sources:
            self._tokenizer(model)

    def _tokenizer(self, model: str) -> Any:
        if model in self.tokenizers:
            return self.tokenizers[model]
        source = self.sources.get(model)
        tok = None
        if source:
            try:
                tok = _load(source)
            except Exception as exc:  # any failure of a third-party loader: estimate instead
                log.warning(
                    "model %s: cannot load the tokenizer of %s (%s: %s); its prompts are estimated "
                    "from their size",
                    model,
                    source,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
        self.tokenizers[model] = tok
        return tok

    def long(self, spec: pb.RequestSpec) -> bool:
        """Whether ``spec``'s prompt is to be counted away from the event loop (a tokenizer counts
        it, and it is :data:`OFF_LOOP_BYTES` or longer)."""
        tools = spec.sampling.get("tools", "")
        size = max(len(spec.prompt), len(spec.chat_messages)) + len(tools)  # characters: at most the bytes
        return (
            size >= OFF_LOOP_BYTES // 4
            and self.sources.get(spec.model) is not None
            and (
                max(len(spec.prompt.encode()), len(spec.chat_messages.encode())) + len(tools.encode())
                >= OFF_LOOP_BYTES
            )
        )

    def count_elsewhere(self, spec: pb.RequestSpec) -> int:
        """:meth:`count`, from any thread but the event loop's: with a copy of the tokenizers of
        its own, one count at a time."""
        with self._elsewhere_lock:
            if self._elsewhere is None:
                self._elsewhere = PromptCounter(self.sources)
            return self._elsewhere.count(spec)

    async def count_off_loop(self, spec: pb.RequestSpec) -> int:
        """:meth:`count_elsewhere` in this counter's own thread: the event loop goes on meanwhile."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="qlm-prompt-tokens")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.count_elsewhere, spec)

    def count(self, spec: pb.RequestSpec) -> int:
        """The prompt's tokens as the engine will see them: a completion's text with the
        tokenizer's special tokens (vLLM adds them), a chat's messages (and the tools it offers,
        which the template writes into the prompt) through the chat template with the assistant's
        turn opened; the byte estimate where no tokenizer is known or the tokenizer fails on this
        prompt."""
        tok = self._tokenizer(spec.model)
        tools = spec.sampling.get("tools", "")
        if tok is None:
            return estimate_prompt_tokens(spec.prompt + tools)
        try:
            if spec.chat_messages:
                ids = tok.apply_chat_template(
                    _as_templates_take(json.loads(spec.chat_messages)),
                    tools=json.loads(tools) if tools else None,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            else:
                ids = tok(spec.prompt).input_ids
            return max(1, len(ids))
        except Exception as exc:  # a template that refuses these messages: the engine will say so
            log.debug("model %s: tokenizer failed (%s); prompt estimated", spec.model, exc)
            return estimate_prompt_tokens(spec.prompt + tools)


def _as_templates_take(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier tool calls' arguments as objects, as vLLM gives them to a chat template (the JSON text
    as it came, where it is not an object)."""
    for m in messages:
        for call in m.get("tool_calls") or ():
            try:
                args = json.loads(call["function"]["arguments"])
            except (ValueError, RecursionError):
                continue
            if isinstance(args, dict):
                call["function"]["arguments"] = args
    return messages
