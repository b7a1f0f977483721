"""A simulated OpenAI-compatible server for tests of the black-box adapter (``qlm instance --backend
openai``): an aiohttp app that answers ``POST /v1/completions`` (streamed or not) with the same
deterministic text as the simulator (:func:`~qlm_plugin.adapters.sim.realtime.synthetic_text`), so
a request served partly here and partly by a simulated instance reads as one answer.

Run it as ``python -m qlm_plugin.testing.openai_stub --port N --record FILE --tokens-per-s R``.

- **The request** is named by the ``X-Request-Id`` header, ``<request id>.<attempt>`` as the black-box
  agent sends it (the part before the last ``.`` names the text, the part after is the attempt). A
  request without the header gets a fresh id of its own and attempt 0.
- **A resumed request** carries the text already delivered at the end of its prompt: the generation
  starts at the largest ``k`` such that the prompt ends with ``synthetic_text(request_id, 0, k)``
  (``k = 0`` when none), and generates tokens ``k, k+1, ...``.
- **Length**: ``max_tokens`` tokens (OpenAI's default of 16 when absent) with ``ignore_eos``;
  without it the generation also stops (``finish_reason: "stop"``) at a natural end that is a
  deterministic function of the request id (:func:`natural_length`).
- **Pace**: one token every ``1 / tokens_per_s`` seconds per sequence; at most ``max_num_seqs``
  sequences run at once and the others wait, first come first served.
- **Streaming** as OpenAI does: one ``data:`` chunk per token (``finish_reason`` on the last one), a
  usage chunk with ``choices: []`` when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``.
- **Client disconnect** aborts the generation (the handler is cancelled, or its next write fails):
  it leaves no record.
- ``GET /health`` (200), ``GET /v1/models``, and ``GET /metrics`` with vLLM's gauges
  ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``.
- **Record**: each generation it completes (every token and the end sent) appends
  ``request_id attempt server_name`` to the record file, flushed at once, like the simulator's
  ``QLM_SIM_RECORD`` (the engine's own account of what it generated, for fault tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any, TextIO

from aiohttp import web

from qlm_plugin.adapters.sim.realtime import synthetic_text

__all__ = ["StubServer", "main", "natural_length", "parse_request_id", "resume_point"]

#: OpenAI's default ``max_tokens`` of ``/v1/completions``.
DEFAULT_MAX_TOKENS = 16
_WORD = re.compile(r" [^ ]+")


def parse_request_id(header: str | None) -> tuple[str, int] | None:
    """``<request id>.<attempt>`` -> (request id, attempt); a value without a numeric attempt is the
    request id itself with attempt 0; None for no header."""
    if not header:
        return None
    rid, dot, attempt = header.rpartition(".")
    if dot and rid and attempt.isdigit():
        return rid, int(attempt)
    return header, 0


def resume_point(prompt: str, request_id: str) -> int:
    """The largest ``k`` such that ``prompt`` ends with ``synthetic_text(request_id, 0, k)``; 0 when
    none (the prompt carries no output of this request)."""
    if " " not in prompt:
        return 0
    # Each synthetic token is a word with a leading space: at least two characters.
    words = _WORD.findall(synthetic_text(request_id, 0, len(prompt) // 2 + 1))
    ends = [0]
    for w in words:
        ends.append(ends[-1] + len(w))
    text = "".join(words)
    for k in range(len(words), 0, -1):
        if ends[k] <= len(prompt) and prompt.endswith(text[: ends[k]]):
            return k
    return 0


def natural_length(request_id: str) -> int:
    """Where a generation of this request ends by itself (EOS) unless ``ignore_eos``: 8 to 64 tokens."""
    h = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest(), "little")
    return 8 + h % 57


class StubServer:
    """The app's state: the sequences running and waiting, and the record of generations."""

    def __init__(
        self,
        *,
        name: str = "stub",
        model: str = "llama-3.1-8b",
        tokens_per_s: float = 100.0,
        max_num_seqs: int = 16,
        record: TextIO | None = None,
    ) -> None:
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.name = name
        self.model = model
        self.tokens_per_s = tokens_per_s
        self.max_num_seqs = max_num_seqs
        self.record = record
        self.running = 0
        self.waiting = 0
        self.completed = 0
        self.aborted = 0
        self._seats = asyncio.Semaphore(max_num_seqs)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        return app

    # ------------------------------------------------------------------ plain endpoints
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "stub"}]
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        label = f'{{model_name="{self.model}"}}'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {float(self.waiting)}",
            "# HELP stub:generations_completed_total Generations completed.",
            "# TYPE stub:generations_completed_total counter",
            f"stub:generations_completed_total {float(self.completed)}",
            "# HELP stub:generations_aborted_total Generations aborted (client gone).",
            "# TYPE stub:generations_aborted_total counter",
            f"stub:generations_aborted_total {float(self.aborted)}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _error(status: int, message: str, param: str | None = None) -> web.Response:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        return web.json_response(body, status=status)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body: Any = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._error(400, f"the body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return self._error(400, "the body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return self._error(400, "prompt: must be a string", "prompt")
        if body.get("model") not in (None, self.model):
            return self._error(404, f"model {body.get('model')!r} does not exist", "model")
        max_tokens = body.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return self._error(400, f"max_tokens: must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        named = parse_request_id(request.headers.get("X-Request-Id"))
        rid, attempt = named if named is not None else (f"stub-{uuid.uuid4().hex}", 0)
        start = resume_point(prompt, rid)
        count, finish = max_tokens, "length"
        if not body.get("ignore_eos"):
            natural = max(0, natural_length(rid) - start)
            if natural < count:
                count, finish = max(1, natural), "stop"
        opts = body.get("stream_options")
        usage_wanted = isinstance(opts, Mapping) and bool(opts.get("include_usage"))
        usage = {
            "prompt_tokens": max(1, len(prompt.encode()) // 4),
            "completion_tokens": count,
            "total_tokens": max(1, len(prompt.encode()) // 4) + count,
        }
        base = {
            "id": f"cmpl-{rid}.{attempt}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }
        words = _WORD.findall(synthetic_text(rid, start, count))
        self.waiting += 1
        seated = False
        try:
            try:
                await self._seats.acquire()
                seated = True
            finally:
                self.waiting -= 1
            self.running += 1
            if body.get("stream"):
                resp = await self._stream(request, base, words, finish, usage if usage_wanted else None)
            else:
                await asyncio.sleep(len(words) / self.tokens_per_s)
                choice = {"index": 0, "text": "".join(words), "logprobs": None, "finish_reason": finish}
                resp = web.json_response({**base, "choices": [choice], "usage": usage})
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1  # the client went away: the generation is abandoned, not recorded
            print(f"openai_stub {self.name}: aborted {rid}.{attempt}: the client went away", file=sys.stderr)
            raise
        finally:
            if seated:
                self.running -= 1
                self._seats.release()
        self.completed += 1
        if self.record is not None:
            self.record.write(f"{rid} {attempt} {self.name}\n")
            self.record.flush()
        return resp

    async def _stream(
        self,
        request: web.Request,
        base: Mapping[str, Any],
        words: list[str],
        finish: str,
        usage: Mapping[str, int] | None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(payload: Mapping[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        step = 1.0 / self.tokens_per_s
        for i, word in enumerate(words):
            await asyncio.sleep(step)
            last = i == len(words) - 1
            choice = {"index": 0, "text": word, "logprobs": None, "finish_reason": finish if last else None}
            await send({**base, "choices": [choice]})
        if usage is not None:
            await send({**base, "choices": [], "usage": dict(usage)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def serve(server: StubServer, host: str, port: int, stop: asyncio.Event) -> None:
    # handler_cancellation: a client that goes away cancels its handler, and so its generation.
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"openai_stub {server.name}: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qlm_plugin.testing.openai_stub",
        description="A simulated OpenAI-compatible server with the simulator's deterministic text.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--record", metavar="FILE", help="append 'request_id attempt name' per completed generation"
    )
    p.add_argument("--tokens-per-s", type=float, default=100.0, help="tokens per second per sequence")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences generated at once; the rest wait")
    p.add_argument("--name", default="stub", help="the server's name in its records")
    p.add_argument("--model", default="llama-3.1-8b", help="the model name it serves")
    args = p.parse_args(argv)

    async def run() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with open(args.record, "a") if args.record else contextlib.nullcontext() as record:
            server = StubServer(
                name=args.name,
                model=args.model,
                tokens_per_s=args.tokens_per_s,
                max_num_seqs=args.max_num_seqs,
                record=record,
            )
            await serve(server, args.host, args.port, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
