"""Calls the product makes to an OpenAI-compatible server beyond the generation itself."""

from __future__ import annotations

import aiohttp

#: How long a tokenization may take.
TOKENIZE_TIMEOUT_S = 30.0


class TokenizeError(Exception):
    """The server could not tokenize (it has no ``/tokenize``, or refused the text)."""


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
