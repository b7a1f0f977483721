"""How many tokens a request's prompt is: counted with its model's own tokenizer where the scenario
names one (``models[].tokenizer``; ``qlm serve --engine vllm`` names each model's folder), a chat
through the model's chat template as the engine will apply it; else estimated from its bytes.

The count sizes the request for admission, the queue manager and the context check, so an estimate
off by 2x misplaces long prompts. Tokenizers load from local files only (nothing is downloaded at
run time) through ``transformers`` (which vLLM installs); one that cannot load is reported once and
the model's prompts are estimated. Not thread-safe: the coordinator's event loop owns it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

log = logging.getLogger("qlm_plugin.coordinator")


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

    def count(self, spec: pb.RequestSpec) -> int:
        """The prompt's tokens as the engine will see them: a completion's text with the
        tokenizer's special tokens (vLLM adds them), a chat's messages through the chat template
        with the assistant's turn opened; the byte estimate where no tokenizer is known or the
        tokenizer fails on this prompt."""
        tok = self._tokenizer(spec.model)
        if tok is None:
            return estimate_prompt_tokens(spec.prompt)
        try:
            if spec.chat_messages:
                ids = tok.apply_chat_template(
                    json.loads(spec.chat_messages),
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            else:
                ids = tok(spec.prompt).input_ids
            return max(1, len(ids))
        except Exception as exc:  # a template that refuses these messages: the engine will say so
            log.debug("model %s: tokenizer failed (%s); prompt estimated", spec.model, exc)
            return estimate_prompt_tokens(spec.prompt)
