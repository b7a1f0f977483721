"""The agent's view of a black-box OpenAI-compatible server (see :mod:`qlm_plugin.adapters.openai`)."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from qlm_plugin.adapters.openai.limiter import ConcurrencyLimiter
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.openai_client import (
    PROTECTED_KEYS,
    REFUSED_STATUSES,
    TokenizeError,
    constraint,
    error_message,
    logprob_entries,
    sse_data,
    stream_error,
    tokenize,
    tool_call_deltas,
)

log = logging.getLogger("qlm_plugin.adapters.openai")
Event = pb.RequestEvent

#: Prometheus series read when the server exposes them (vLLM's names; others are ignored).
RUNNING_METRICS = ("vllm:num_requests_running",)
WAITING_METRICS = ("vllm:num_requests_waiting",)
KV_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
#: How often a server that is down is looked at, seconds.
DOWN_PROBE_S = 0.5
#: How long an eviction order for a request not yet here waits for it.
EARLY_EVICTION_WAIT_S = 10.0
#: A server silent this long in the middle of an answer (or before its first token) is stalled.
READ_TIMEOUT_S = 600.0
#: Answers of a server too loaded to take the request: it goes back to the queue, not failed, and
#: the server gets nothing more for BUSY_BACKOFF_S.
BUSY_STATUSES = (429, 503)
BUSY_BACKOFF_S = 1.0
#: Finish reasons of a stream that ended without finishing its request (a server shutting down).
DROPPED = ("abort", "error")
#: Other servers' names for OpenAI's finish reasons.
FINISH_AS_OPENAI = {"eos": "stop", "eos_token": "stop", "stop_sequence": "stop", "max_tokens": "length"}


def _json(value: list[dict[str, Any]] | None) -> str:
    """Tool-call deltas or log probabilities as an event carries them ("": none)."""
    return json.dumps(value) if value else ""


def _event(request_id: str, attempt: int, kind: pb.RequestEvent.Kind, **fields: Any) -> pb.RequestEvent:
    return Event(request_id=request_id, attempt=attempt, kind=kind, time=time.time(), **fields)


@dataclass
class OpenAISettings:
    instance_id: str
    base_url: str  # the server's root, e.g. http://127.0.0.1:8000
    model: str  # the model name the coordinator routes by
    served_model: str = ""  # the name the server knows it by (default: ``model``)
    gpu: str = "h100"
    initial_concurrency: int = 4
    max_concurrency: int = 256
    load_command: str = ""  # shell command or "POST <url>" run to load (wake) the model
    unload_command: str = ""
    metrics_interval_s: float = 1.0
    extra_body: dict[str, object] = field(default_factory=dict)  # added to every request (e.g. ignore_eos)


def _sum_series(text: str, names: Sequence[str]) -> float | None:
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(tuple(names)):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                continue
    return total if seen else None


class OpenAIEngineLink:
    """Runs on the agent's event loop; every request is its own task."""

    backend = "openai"

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id
        self.gpu = settings.gpu
        self.endpoint = ""  # requests come over the pull stream: this agent calls the server itself
        # structured output and tools: the server is sent the request's response_format and tools
        # as given (one that cannot honour them refuses them, and the request fails with its answer)
        caps = ["evict", "structured_output", "tools", "logprobs"]
        if settings.load_command or settings.unload_command:
            caps.append("load_model")
        self.capabilities: Sequence[str] = caps
        self.limiter = ConcurrencyLimiter(
            initial=settings.initial_concurrency, maximum=settings.max_concurrency
        )
        self.tasks: dict[str, tuple[int, asyncio.Task[None]]] = {}  # request id -> (attempt, task)
        self.metrics: dict[str, float | None] = {"running": None, "waiting": None, "kv": None}
        self.loaded = True
        self.max_in_flight_seen = 0
        self._http: aiohttp.ClientSession | None = None
        self._scraper: asyncio.Task[None] | None = None
        self.on_room: Callable[[], None] | None = None
        self.on_state: Callable[[], None] | None = None  # the state changed: report it now
        # When the server stopped answering (None: it answers). While it is down, the instance
        # reports so and takes no work: a request sent there would fail at once, again and again.
        self.down_since: float | None = None
        self.busy_until = 0.0  # monotonic: the server refused work as overloaded until about then
        self._evicted: set[str] = set()  # aborted because the coordinator ordered an eviction
        # Constrained outputs (structured output): an eviction here is an abort, after which the
        # request would be served again from its start or, if its client saw part of it, fail.
        self._constrained: set[str] = set()
        self._freed = asyncio.Event()  # a request left the server: one waiting for a slot may go
        # Evictions ordered before their request arrived (commands and assignments travel on
        # separate streams): request id -> when ordered (monotonic)
        self._early_evictions: dict[str, float] = {}

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            # No total limit (a long generation, or one queued on the server, may take longer than
            # any fixed bound), but a server silent for READ_TIMEOUT_S is stalled; and a connection
            # per request: a kept-alive one the server closed meanwhile would fail the next request.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S),
            )
            self._scraper = asyncio.get_running_loop().create_task(self._scrape())
        return self._http

    async def _scrape(self) -> None:
        """The server's own view (running, waiting, KV use) from its Prometheus metrics, if any;
        and whether it answers at all."""
        while True:
            try:
                async with self._session().get(
                    f"{self.settings.base_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)
                ) as r:
                    text = await r.text() if r.status == 200 else ""
                self.metrics = {
                    "running": _sum_series(text, RUNNING_METRICS),
                    "waiting": _sum_series(text, WAITING_METRICS),
                    "kv": _sum_series(text, KV_METRICS),
                }
                self._server_answers(True)
            except aiohttp.ClientConnectorError:
                self._server_answers(False)  # refused: nothing listens there
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # slow or odd (a keep-alive connection closed as it was reused), not gone
            # while it is down, looked at often: the instance serves again soon after it is back
            down = self.down_since is not None
            await asyncio.sleep(
                min(self.settings.metrics_interval_s, DOWN_PROBE_S)
                if down
                else self.settings.metrics_interval_s
            )

    def _server_answers(self, answers: bool) -> None:
        if answers == (self.down_since is None):
            return
        self.down_since = None if answers else time.monotonic()
        log.warning(
            "%s: %s %s", self.instance_id, self.settings.base_url, "answers again" if answers else "is down"
        )
        if self.on_state is not None:
            self.on_state()
        if answers and self.on_room is not None:
            self.on_room()

    # ------------------------------------------------------------------ EngineLink
    def state(self) -> pb.StateReport:
        self._session()  # starts the scraper: the server's health is known before any request
        running = self.metrics["running"]
        waiting = self.metrics["waiting"]
        kv = self.metrics["kv"]
        return pb.StateReport(
            instance_id=self.instance_id,
            models_loaded=[self.settings.model] if self.loaded else [],
            models_warm=[] if self.loaded else [self.settings.model],
            models_servable=[self.settings.model],
            num_running=int(running) if running is not None else self.limiter.in_flight,
            # the server's queue, and what waits here for room under the limit
            num_waiting=(int(waiting) if waiting is not None else 0) + self.waiting_here(),
            kv_blocks_used=int((kv or 0.0) * 1000),
            kv_blocks_total=1000,
            max_num_seqs=self.limiter.limit,
            notes=["black box: concurrency limit learned from latency; eviction aborts (KV and work lost)"],
            now=time.time(),
            down=self.down_since is not None,
        )

    def waiting_here(self) -> int:
        return max(0, len(self.tasks) - self.limiter.in_flight)

    def free_slots(self) -> int:
        if not self.loaded or self.down_since is not None or (self.metrics["waiting"] or 0) > 0:
            return 0  # the server queues already: hand it nothing more
        if time.monotonic() < self.busy_until:
            return 0  # it answered 429 or 503 a moment ago
        return max(0, self.limiter.free() - self.waiting_here())

    def held(self) -> list[pb.HeldRequest]:
        return [pb.HeldRequest(request_id=rid, attempt=att) for rid, (att, _) in self.tasks.items()]

    def start(self, a: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        rid = a.request.request_id
        ordered = self._early_evictions.pop(rid, None)
        if ordered is not None and time.monotonic() - ordered < EARLY_EVICTION_WAIT_S:
            emit(_event(rid, a.attempt, Event.REQUEUED, error="evicted as it arrived (the order came first)"))
            return True
        if rid in self.tasks:
            self.abort(rid)
        task = asyncio.get_running_loop().create_task(self._serve(a, emit))
        self.tasks[rid] = (a.attempt, task)
        if constraint(a.request.sampling):
            self._constrained.add(rid)
        task.add_done_callback(lambda t: self._ended(rid, a.attempt, t, emit))
        return True

    def _ended(
        self, rid: str, attempt: int, task: asyncio.Task[None], emit: Callable[[pb.RequestEvent], None]
    ) -> None:
        """What :meth:`_serve`'s own handlers do, for a task cancelled before it ran (an eviction
        in the same turn as its assignment): such a task never enters them."""
        if self.tasks.get(rid, (None, None))[1] is task:
            del self.tasks[rid]
            self._constrained.discard(rid)
        if task.cancelled() and rid in self._evicted:
            self._evicted.discard(rid)
            emit(_event(rid, attempt, Event.REQUEUED, error="evicted before it reached the server"))
            if self.on_room is not None:
                self.on_room()

    async def _slot(self) -> int:
        """Wait for room under the limit (the coordinator may hand over more than that, on an
        older view of it: the rest waits here, not on the server). Returns the limiter's token."""
        while self.limiter.free() <= 0:
            self._freed.clear()
            await self._freed.wait()
        token = self.limiter.started()
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.limiter.in_flight)
        return token

    def abort(self, request_id: str) -> None:
        entry = self.tasks.pop(request_id, None)
        if entry is not None:
            entry[1].cancel()  # closing the stream makes the server abort it

    def execute(self, cmd: pb.Command) -> pb.CommandAck | Awaitable[pb.CommandAck]:
        op = cmd.WhichOneof("op")
        if op == "evict":
            entry = self.tasks.get(cmd.evict.request_id)
            if entry is None:
                # Not here yet, or already gone: carried out if it arrives soon.
                now = time.monotonic()
                self._early_evictions = {
                    r: t for r, t in self._early_evictions.items() if now - t < EARLY_EVICTION_WAIT_S
                }
                self._early_evictions[cmd.evict.request_id] = now
                return pb.CommandAck(ok=True)
            if cmd.evict.request_id in self._constrained:
                error = "not evicted: its output is constrained and an eviction here is an abort"
                return pb.CommandAck(ok=False, error=error)
            self._evicted.add(cmd.evict.request_id)
            entry[1].cancel()
            return pb.CommandAck(ok=True)
        if op == "abort":
            entry = self.tasks.get(cmd.abort.request_id)
            if entry is not None and cmd.abort.attempt and entry[0] > cmd.abort.attempt:
                # a late abort of an earlier attempt: the one running now was sent since
                return pb.CommandAck(ok=False, error="a newer attempt runs here")
            self.abort(cmd.abort.request_id)
            return pb.CommandAck(ok=True)
        if op in ("load_model", "unload_model"):
            command = self.settings.load_command if op == "load_model" else self.settings.unload_command
            if not command:
                return pb.CommandAck(ok=False, error=f"no {op.replace('_', ' ')} command configured")
            return self._load_or_unload(command, load=op == "load_model")
        return pb.CommandAck(ok=False, error=f"{op} is not supported by the black-box adapter")

    async def _load_or_unload(self, command: str, *, load: bool) -> pb.CommandAck:
        error = await _run(command, self._session())
        if not error:
            self.loaded = load
        return pb.CommandAck(ok=not error, error=error)

    async def _serve(self, a: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> None:
        spec, rid, attempt = a.request, a.request.request_id, a.attempt
        index = a.resume_tokens
        model = self.settings.served_model or self.settings.model
        body: dict[str, object] = {
            "model": model,
            "prompt": spec.prompt + a.resume_text,  # a token-id prompt: set once the server is reached
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.settings.extra_body,
        }
        if spec.max_tokens:  # else a chat that named none: the server's own limit (its context)
            body["max_tokens"] = max(1, spec.max_tokens - a.resume_tokens)
        try:
            for key, value in spec.sampling.items():
                if key not in PROTECTED_KEYS:  # never over what the coordinator built and counted
                    body[key] = json.loads(value)
        except ValueError as exc:  # the request's own fault: refused, not left dispatched for ever
            emit(_event(rid, attempt, Event.REFUSED, error=f"sampling {key!r} is not JSON: {exc}"))
            return
        body.pop("echo", None)  # the coordinator echoes the prompt (its log probabilities: not here)
        if spec.true_output_tokens:
            body["ignore_eos"] = True
            body["max_tokens"] = max(
                1, min(spec.true_output_tokens, spec.max_tokens or spec.true_output_tokens) - a.resume_tokens
            )
        path = "/v1/completions"
        if spec.chat_messages:  # as a chat: the server applies its own chat template
            path = "/v1/chat/completions"
            messages = json.loads(spec.chat_messages)
            if a.resume_text:  # served again: the answer so far as the assistant's turn, continued
                messages.append({"role": "assistant", "content": a.resume_text})
                body.update(continue_final_message=True, add_generation_prompt=False)
            del body["prompt"]
            body["messages"] = messages
        finish: str | None = None
        usage, delivered = None, 0
        held_logprobs: list[dict[str, Any]] = []
        per_token: float | None = None
        first_at: float | None = None  # monotonic: its first token
        token: int | None = None
        try:
            # A server that answered 429 or 503 a moment ago is asked again only after its back-off:
            # the request waits here (the coordinator sent it straight back, 500 times a second)
            while (wait := self.busy_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            token = await self._slot()
            if spec.prompt_token_ids:
                ids = list(spec.prompt_token_ids)
                if a.resume_text:  # continues after the text delivered: as the server's own ids
                    ids += await tokenize(self._session(), self.settings.base_url, model, a.resume_text)
                body["prompt"] = ids
            # The server names the request after the coordinator's id (its logs, its /abort_requests).
            # ... and its spans join the client's trace, where the coordinator traces
            headers = {**a.trace_context, "X-Request-Id": f"{rid}.{attempt}"}
            url = f"{self.settings.base_url}{path}"
            async with self._session().post(url, json=body, headers=headers) as r:
                if r.status in BUSY_STATUSES:
                    # overloaded, not this request at fault: back to the queue (no failure counted),
                    # and nothing more comes here for a moment
                    self.busy_until = time.monotonic() + BUSY_BACKOFF_S
                    emit(_event(rid, attempt, Event.REQUEUED, error=f"server busy: HTTP {r.status}"))
                    return
                if r.status != 200:
                    kind = Event.REFUSED if r.status in REFUSED_STATUSES else Event.FAILED
                    emit(_event(rid, attempt, kind, error=error_message(r.status, await r.text())))
                    return
                async for raw in r.content:
                    data = sse_data(raw)
                    if data is None or data == b"[DONE]":
                        continue
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise ValueError(f"a stream chunk that is not an object: {data[:100]!r}")
                    failed = stream_error(chunk)
                    if failed is not None:  # the server failed (or refused) it once the stream began
                        status, error = failed
                        kind = Event.REFUSED if status in REFUSED_STATUSES else Event.FAILED
                        emit(_event(rid, attempt, kind, error=error))
                        return
                    if chunk.get("error"):  # an error that is not an object
                        raise ValueError(f"the server's error: {str(chunk['error'])[:300]}")
                    completion_tokens = (chunk.get("usage") or {}).get("completion_tokens")
                    if isinstance(completion_tokens, int):
                        usage = completion_tokens
                    for choice in chunk.get("choices") or ():
                        text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                        if not isinstance(text, str):
                            raise ValueError(f"a token that is not text: {text!r:.100}")
                        calls = tool_call_deltas(choice)
                        entries = logprob_entries(choice)
                        if entries:
                            held_logprobs.extend(entries)  # a token whose text comes in a later chunk
                        if text or calls:
                            n = max(1, len(held_logprobs))  # one token, unless its entries say how many
                            shown = {"tool_calls": _json(calls), "logprobs": _json(held_logprobs)}
                            held_logprobs = []
                            emit(
                                _event(rid, attempt, Event.TOKENS, index=index, tokens=n, text=text, **shown)
                            )
                            index += n
                            delivered += n
                            if first_at is None:
                                first_at = time.monotonic()
                        finish = choice.get("finish_reason") or finish
            if finish is None or finish in DROPPED:
                # the stream ended without finishing the request: served again, as a failed attempt
                raise ValueError(f"the server ended the stream with finish_reason {finish!r}")
            if usage is not None and usage > delivered:
                last = {"tokens": usage - delivered, "logprobs": _json(held_logprobs)}  # text that never came
                emit(_event(rid, attempt, Event.TOKENS, index=index, text="", **last))
            emit(_event(rid, attempt, Event.FINISHED, finish_reason=FINISH_AS_OPENAI.get(finish, finish)))
            # The pace of its tokens after the first: the time to the first one (its prefill, which
            # a short answer is all of) made every 1-token request look 5x slow, and the limit fell
            # to 1 on a server that had room for 16
            made = usage or delivered
            if first_at is not None and made >= 2:
                per_token = (time.monotonic() - first_at) / (made - 1)
        except asyncio.CancelledError:
            if rid in self._evicted:  # evicted by abort: the coordinator queues it again
                self._evicted.discard(rid)
                emit(_event(rid, attempt, Event.REQUEUED, error="evicted: aborted on the server"))
            raise
        except aiohttp.ClientConnectorError as exc:
            # The server is gone, not this request at fault: it goes back to the queue (no failure
            # counted) and the instance reports its server down, so nothing more comes here.
            self._server_answers(False)
            emit(_event(rid, attempt, Event.REQUEUED, error=f"{self.settings.base_url} is down: {exc}"))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TokenizeError) as exc:
            emit(_event(rid, attempt, Event.FAILED, error=f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # an answer no rule above foresaw: failed, never left hanging
            log.exception("%s: serving %s", self.settings.base_url, rid)
            emit(_event(rid, attempt, Event.FAILED, error=f"{type(exc).__name__}: {exc}"))
        finally:
            if self.tasks.get(rid, (None, None))[1] is asyncio.current_task():
                del self.tasks[rid]
            if token is not None:
                self.limiter.finished(per_token, token)
                self._freed.set()
            if self.on_room is not None:
                self.on_room()

    async def close(self) -> None:
        for rid in list(self.tasks):
            self.abort(rid)
        if self._scraper is not None:
            self._scraper.cancel()
        if self._http is not None:
            await self._http.close()


#: How long a load or unload command may run (a cold model load takes minutes).
COMMAND_TIMEOUT_S = 600.0


async def _run(command: str, http: aiohttp.ClientSession) -> str:
    """Run a load/unload command without blocking the agent's loop: ``POST <url>`` (or GET/PUT) is
    an HTTP call, anything else a program run with its arguments. Returns "" on success, else the
    error."""
    parts = command.split(maxsplit=1)
    if len(parts) == 2 and parts[0] in ("GET", "POST", "PUT"):
        try:
            async with http.request(
                parts[0], parts[1], timeout=aiohttp.ClientTimeout(total=COMMAND_TIMEOUT_S)
            ) as r:
                body = await r.text()
                return "" if r.status < 400 else f"{command}: HTTP {r.status}: {body[:300]}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"{command}: {type(exc).__name__}: {exc}"
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        return f"{command}: {exc}"
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return f"{command}: still running after {COMMAND_TIMEOUT_S:g} s: killed"
    if proc.returncode == 0:
        return ""
    return f"{command}: exit {proc.returncode}: {stderr.decode(errors='replace').strip()[:300]}"
