"""A tiny random-weight Llama and a tokenizer trained on the spot: a real model for a real vLLM
engine, built locally in seconds (nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "hello",
    "world",
    "vllm",
    "queue",
    "scheduler",
    "request",
    "token",
    "cache",
    "model",
    "serve",
    "plugin",
    "latency",
    "slo",
]


#: Positions the tiny model has: the test engines serve it at this context, so the requests that
#: must outlast an order on their way (evictions) can run for seconds.
CONTEXT_LEN = 2048


def build_tiny_llama(out: str | Path, *, layers: int = 2, hidden: int = 128, seed: int = 0) -> Path:
    """Write the model (bf16 safetensors) and its tokenizer to ``out``; returns ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(500)]
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(out)
    # CPU attention supports head sizes of 32, 64, 80, ... (16 fails at the first forward).
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LEN,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    for name in ("torchvision", "torchaudio", "torchcodec"):  # see adapters/vllm/cpu_compat
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    print(build_tiny_llama(sys.argv[1]))
