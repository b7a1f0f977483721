"""The Batch API's work: validate a batch's input file, feed its lines to the global queue as
requests whose end-to-end deadline is the batch's completion window, follow them, and write the
output and error files in input order.

A line becomes a request with the idempotency key ``qlm-batch/<batch id>/<line>``, so every step is
safe to repeat: after a crash of the coordinator the batch's task runs again from the top, each line
submitted again finds its request in the journal (queued, running or finished), and finalizing builds
the same files from the journal. A line that never became a request (refused, or the batch expired or
was cancelled first) is answered in the batch store once. Each line is answered exactly once.

Runs on the coordinator's event loop (not thread-safe), one task per unfinished batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qlm_plugin.coordinator import choices, responses_api
from qlm_plugin.coordinator.batch_store import FINAL, BatchRecord, BatchStore, FileRecord, FileWriter, new_id
from qlm_plugin.coordinator.batch_turns import BatchTurns
from qlm_plugin.coordinator.config import BatchSettings
from qlm_plugin.coordinator.coordinator import RESERVED_KEY_PREFIX, Coordinator
from qlm_plugin.coordinator.http_api import (
    SUBMIT_HTTP,
    choices_body,
    completion_body,
    parse_openai,
    qlm_info,
    several_prompts,
    unfinished,
)
from qlm_plugin.coordinator.jobs import Job, SubmitError
from qlm_plugin.coordinator.openai_params import BadRequest
from qlm_plugin.domain.distributions import WaitEstimate
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

log = logging.getLogger("qlm_plugin.coordinator.batches")

BATCH_KEY_PREFIX = RESERVED_KEY_PREFIX
#: endpoint -> the API of its bodies: text completions, chat completions, or responses (chats)
ENDPOINTS = {"/v1/completions": "text", "/v1/chat/completions": "chat", "/v1/responses": "responses"}
#: OpenAI's window is 24h; shorter ones (a number and s, m or h, down to the configured
#: ``batches.min_window_s``) are this product's extension.
MAX_WINDOW_S = 24 * 3600.0
#: How often expired files are removed, seconds (until then their owners no longer see them).
SWEEP_INTERVAL_S = 600.0
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
#: Requests cancelled between yields of the event loop when a batch stops (half a millisecond each).
CANCEL_SLICE = 200
#: Lines answered between yields of the event loop while a batch is finalized.
FINALIZE_STRIDE = 500
#: Validation errors listed per batch (the count says how many there were).
MAX_LISTED_ERRORS = 100
#: How often a running batch's request counts are written to the store, seconds: after a crash
#: they show what was done (less this much) while the batch's lines are followed again.
COUNTS_SAVE_S = 5.0
#: The fewest batch requests of a model let wait in the global queue (batch_turns): what one
#: engine at vLLM's default ``max_num_seqs`` starts at once (also where no engine serves it yet,
#: so that the planner sees work to load it for).
MIN_TURN_DEPTH = 256
#: How long the seats serving a model are taken as known, seconds.
SEATS_MEMORY_S = 1.0
#: Unfinished queued requests the estimator is asked about when a batch is read.
ESTIMATE_SAMPLE = 32


def parse_window(value: Any, min_s: float = 60.0) -> float:
    """Seconds of a ``completion_window`` such as ``24h``, ``1h``, ``10m`` or ``90s``."""
    match = _WINDOW.match(value) if isinstance(value, str) else None
    if match is None:
        raise BadRequest("completion_window", f"must be like '24h', '1h' or '10m', got {value!r}")
    seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
    if not min_s <= seconds <= MAX_WINDOW_S:
        raise BadRequest("completion_window", f"must be between {min_s:g}s and 24h, got {value!r}")
    return float(seconds)


@dataclass(slots=True)
class Line:
    """One valid line of an input file: its position (0-based), ``custom_id`` and request."""

    index: int
    custom_id: str
    spec: pb.RequestSpec
    choices: int = 1  # the body's n: that many requests of each prompt (coordinator.choices)
    prompts: list[str | list[int]] | None = None  # a completion's prompts where it has several

    @property
    def requests(self) -> int:
        """How many requests the line is: its choices of each of its prompts."""
        return self.choices * len(self.prompts or (None,))


@dataclass(slots=True)
class Parsed:
    lines: list[Line] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's batch errors, 1-based lines
    invalid: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> error, custom_id

    def fail(self, index: int, custom_id: str | None, message: str, param: str | None = None) -> None:
        error = {"code": "invalid_request", "message": message, "param": param, "line": index + 1}
        self.errors.append(error)
        self.invalid[index] = {**error, "custom_id": custom_id}


def parse_input(
    rows: Callable[[], Iterable[bytes]], endpoint: str, coord: Coordinator, *, max_requests: int, now: float
) -> Parsed:
    """Every line of a batch input file checked as the front door checks a request, and as the
    coordinator would refuse it (model, class, size, an SLO nobody meets); blank lines skipped.
    ``rows()`` reads the file's lines afresh (split at ``\\n``, as JSON Lines end: ``splitlines()``
    would also cut at U+2028, U+2029 and U+0085, which JSON allows raw inside strings; a ``\\r`` left
    at a line's end is whitespace to the JSON parser). Read twice, a line at a time, never whole:
    first to refuse a file that is not UTF-8 or holds too many requests before any line is parsed."""
    api = ENDPOINTS[endpoint]
    out = Parsed()
    book = coord.book
    default_class = "batch" if "batch" in book.classes else book.default_class
    seen: set[str] = set()
    count = 0
    for index, raw in enumerate(rows()):
        try:
            count += bool(_decode(raw, index).strip())
        except UnicodeDecodeError as exc:
            message = f"not UTF-8 (line {index + 1}): {exc}"
            out.errors.append({"code": "invalid_file", "message": message, "param": None, "line": index + 1})
            return out
    if count > max_requests:
        message = f"the file holds more than {max_requests} requests"
        out.errors.append({"code": "too_many_requests", "message": message, "param": None, "line": None})
        return out
    for index, raw in enumerate(rows()):
        row = _decode(raw, index)
        if not row.strip():
            continue
        try:
            obj = json.loads(row)
        except (ValueError, RecursionError) as exc:
            out.fail(index, None, f"not valid JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            out.fail(index, None, "each line must be a JSON object")
            continue
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            out.fail(
                index, None, "custom_id must be a non-empty string of at most 512 characters", "custom_id"
            )
            continue
        if custom_id in seen:
            out.fail(index, custom_id, f"custom_id {custom_id!r} is used by an earlier line", "custom_id")
            continue
        seen.add(custom_id)
        if obj.get("method") != "POST":
            out.fail(index, custom_id, f"method must be 'POST', got {obj.get('method')!r}", "method")
            continue
        if obj.get("url") != endpoint:
            out.fail(
                index,
                custom_id,
                f"url must be the batch's endpoint {endpoint!r}, got {obj.get('url')!r}",
                "url",
            )
            continue
        body = obj.get("body")
        if not isinstance(body, dict):
            out.fail(index, custom_id, "body must be a JSON object", "body")
            continue
        if body.get("stream"):
            out.fail(index, custom_id, "streaming is not supported in a batch", "body.stream")
            continue
        try:
            origins: responses_api.Origins = []
            chat_body = responses_api.chat_body(body, None, origins) if api == "responses" else body
            spec, _, _ = parse_openai(chat_body, {}, api != "text")
            if api == "responses":
                spec.response_echo = responses_api.echoed(body, origins)
            n = choices.choices_asked(chat_body)
            prompts = several_prompts(chat_body) if api == "text" else None
            each = choices.choice_specs(spec, 1, prompts)  # each prompt's request, checked below
        except BadRequest as exc:
            param = responses_api.error_param(exc, origins) if api == "responses" else exc.param
            out.fail(index, custom_id, f"{param}: {exc}" if param else str(exc), f"body.{param}")
            continue
        except Exception as exc:  # a bug of the checks: this line is refused, the batch goes on
            log.exception("batch input line %d: its check failed", index + 1)
            out.fail(index, custom_id, f"the body could not be checked: {type(exc).__name__}: {exc}", "body")
            continue
        if spec.idempotency_key:
            out.fail(
                index, custom_id, "the batch sets each line's idempotency key", "body.qlm.idempotency_key"
            )
            continue
        if not spec.slo.slo_class:
            spec.slo.slo_class = default_class
        try:
            for p, one in enumerate(each):
                probe = pb.RequestSpec()
                probe.CopyFrom(one)
                probe.slo.slo_class = spec.slo.slo_class
                probe.request_id = f"line-{index + 1}"  # the request's own id is given when it is submitted
                if not probe.prompt_token_ids and probe.model in book.models:  # (a thread: not the loop's)
                    probe.prompt_tokens = book.prompts.count_elsewhere(probe)
                try:
                    book.check_feasible(book.build_request(probe, now))
                except SubmitError as exc:
                    if prompts and exc.field == "prompt":
                        exc.field = f"prompt[{p}]"
                    raise
        except SubmitError as exc:
            out.fail(index, custom_id, str(exc), f"body.{exc.field}" if exc.field else "body")
            continue
        out.lines.append(Line(index, custom_id, spec, n, prompts))
    if not out.lines and not out.errors:
        out.errors.append(
            {"code": "empty_file", "message": "the file holds no requests", "param": None, "line": None}
        )
    return out


def _decode(raw: bytes, index: int) -> str:
    # a byte-order mark (Windows tools write one) starts the file, not its first line
    return raw.decode("utf-8-sig" if index == 0 else "utf-8")


def _error_line(
    custom_id: str | None, code: str, message: str, status: int | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """An answer of the error file. With ``status``, the request got an HTTP error response;
    without, it never ran (expired, cancelled)."""
    response = None
    if status is not None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        response = {"status_code": status, "request_id": request_id, "body": body}
    return {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": response,
        "error": None if status is not None else {"code": code, "message": message},
    }


def _job_answer(line: Line, jobs: list[Job], ending: str, api: str) -> tuple[bool, dict[str, Any]]:
    """(whether it goes to the output file, the answer) of a line's requests (one per choice),
    which have ended: one that did not finish answers for the line (not one cancelled for it)."""
    ended = [one for one in jobs if one.state != "finished"]
    siblings = (choices.SIBLING_FAILED, choices.SIBLING_REFUSED)
    job = next((one for one in ended if one.error not in siblings), ended[0] if ended else jobs[0])
    if job.state == "finished":
        if api == "responses":
            body = responses_api.response_object(job, responses_api.asked(job), qlm_info(job))
        else:
            body = (
                choices_body(jobs, api == "chat", line.choices)
                if len(jobs) > 1
                else completion_body(job, api == "chat")
            )
        answer = {"status_code": 200, "request_id": job.id, "body": body}
        return True, {
            "id": f"batch_req_{job.id}",
            "custom_id": line.custom_id,
            "response": answer,
            "error": None,
        }
    if job.state == "cancelled" and ending in ("expired", "cancelled"):
        code = "batch_expired" if ending == "expired" else "batch_cancelled"
        message = (
            "the request could not be executed before the completion window expired"
            if ending == "expired"
            else "the batch was cancelled before the request finished"
        )
        return False, {**_error_line(line.custom_id, code, message), "id": f"batch_req_{job.id}"}
    status, message = unfinished(job)
    answer = _error_line(line.custom_id, job.state, message, status, job.id)
    return False, {**answer, "id": f"batch_req_{job.id}"}


def p_rate_suffices(done: int, elapsed_s: float, left: int, time_left_s: float) -> float:
    """The probability that ``left`` more lines finish within ``time_left_s``, at the rate of
    ``done`` lines finished in ``elapsed_s``. Lines finish as a Poisson process of unknown rate,
    whose posterior (flat prior) is Gamma(``done``, ``elapsed_s``); the batch meets its window if
    the rate is at least ``left / time_left_s``. Skewed where few lines are done: one line in 0.5 s
    with 299 left makes 7 s nearly impossible (a normal approximation of the rate said 17%)."""
    if left <= 0:
        return 1.0
    if time_left_s <= 0:
        return 0.0
    # P(Gamma(done, 1) >= x) is the regularized upper incomplete gamma Q(done, x), which for a
    # whole ``done`` is P(Poisson(x) <= done - 1).
    return poisson_at_most(done - 1, left / time_left_s * elapsed_s)


def poisson_at_most(k: int, mean: float) -> float:
    """P(Poisson(``mean``) <= ``k``), summed in log space over the terms within 40 standard
    deviations of the mean (the others are below 1e-300). scipy.special's ``gammaincc`` gives the
    same to 1e-8 but its import took a third of a second of every coordinator's start."""
    if k < 0:
        return 0.0
    if mean <= 0.0:
        return 1.0
    spread = 40.0 * math.sqrt(mean) + 40.0
    low, high = max(0, math.floor(mean - spread)), min(k, math.ceil(mean + spread))
    if low > high:
        return 0.0
    i = np.arange(low, high + 1, dtype=np.float64)
    log_factorials = math.lgamma(low + 1) + np.concatenate(([0.0], np.cumsum(np.log(i[1:]))))
    return float(min(1.0, np.exp(i * math.log(mean) - mean - log_factorials).sum()))


class _Room:
    """A tenant's room for its batches' unfinished requests, taken a line's choices at a time
    (a line larger than the whole room waits for all of it)."""

    def __init__(self, units: int) -> None:
        self.units = self.free = units
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, units: int, stop: asyncio.Event) -> AsyncIterator[None]:
        """Hold ``units`` of the room; once ``stop`` is set (the batch expired or is cancelled),
        go on without them (its lines are answered, not served: a batch waiting for room another
        batch held stayed cancelling, or in progress past its window, until that one ended)."""
        units = min(units, self.units)
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= units or stop.is_set())
            if stop.is_set():
                units = 0
            self.free -= units
        try:
            yield
        finally:
            async with self._changed:
                self.free += units
                self._changed.notify_all()

    async def wake(self) -> None:
        """Let the waiters look again (a batch of theirs stopped)."""
        async with self._changed:
            self._changed.notify_all()


@dataclass(slots=True)
class _Running:
    """A batch's task and what it follows."""

    batch: BatchRecord
    task: asyncio.Task[None] | None = None
    jobs: dict[int, list[Job]] = field(default_factory=dict)  # line -> its requests, one per choice
    unsent: int = 0  # valid lines not yet submitted
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # expired or cancelling
    saved_counts: tuple[int, int, int, int] | None = None  # as last written to the store


class BatchService:
    """Creates, runs, cancels and reports batches over one :class:`Coordinator` and its store."""

    def __init__(self, coord: Coordinator, store: BatchStore, settings: BatchSettings) -> None:
        self.coord = coord
        self.store = store
        self.settings = settings
        self._running: dict[str, _Running] = {}
        # per tenant: the unfinished requests all of its batches may have together
        self._tenant_room: dict[str, _Room] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()  # room wake-ups, cancellations (held)
        self._sweeper: asyncio.Task[None] | None = None
        self._counts_saver: asyncio.Task[None] | None = None
        self.turns = BatchTurns(self._turn_depth)
        self._seats: dict[str, tuple[float, int]] = {}  # model -> (when counted, seats serving it)

    async def start(self) -> None:
        """Take up every unfinished batch of the store (after a restart: from the top), sweep
        expired files and save the running batches' counts from then on."""
        for batch in self.store.unfinished_batches():
            self._spawn(batch)
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep(), name="expired files")
        self._counts_saver = loop.create_task(self._save_counts_every(COUNTS_SAVE_S), name="batch counts")

    def _turn_depth(self, model: str) -> int:
        """How many of the model's batch requests may wait in the global queue: the seats of the
        instances serving it, so that every seat that frees finds one."""
        now = time.monotonic()
        at, seats = self._seats.get(model, (-math.inf, 0))
        if now - at > SEATS_MEMORY_S:
            fleet = self.coord.fleet
            seats = sum(
                st.max_num_seqs
                for info in fleet.qlm_list_instances()
                if (st := fleet.qlm_instance_state(info.instance_id, False)) is not None
                and model in st.models_loaded
            )
            self._seats[model] = (now, seats)
        return max(MIN_TURN_DEPTH, seats)

    async def _save_counts_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._save_counts()
            except sqlite3.Error:
                log.exception("saving the batches' counts failed; trying again in %g s", interval_s)

    def _save_counts(self) -> None:
        """Write the counts of each running batch whose counts changed since they were written
        (on the event loop, as every other write of a batch record: a write from a thread could
        put back a state the batch has left)."""
        for running in self._running.values():
            batch = running.batch
            counts = (batch.completed, batch.failed, batch.input_tokens, batch.output_tokens)
            if batch.status in ("in_progress", "cancelling") and counts != running.saved_counts:
                self.store.put_batch(batch)
                running.saved_counts = counts

    async def _sweep(self) -> None:
        while True:
            keep = {r.batch.input_file_id for r in self._running.values()}  # read again after a restart
            try:
                swept = await asyncio.to_thread(self.store.sweep_expired, keep)
            except sqlite3.Error:
                log.exception("sweeping expired files failed; trying again in %g s", SWEEP_INTERVAL_S)
            else:
                if swept:
                    log.info("removed %d expired files", len(swept))
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def close(self) -> None:
        """Stop following batches; their state is in the store and the journal for the next start."""
        for side in (self._sweeper, self._counts_saver):
            if side is not None:
                side.cancel()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self._save_counts()  # the next start shows them while it follows the lines again
        except sqlite3.Error:
            log.exception("saving the batches' counts at the stop failed")
        self._running.clear()

    # ------------------------------------------------------------------ API
    async def create(
        self,
        tenant: str,
        input_file_id: str,
        endpoint: str,
        window: Any,
        metadata: dict[str, str] | None,
        output_expires_after_s: int | None = None,
    ) -> BatchRecord:
        """A new batch (status ``validating``); raises :class:`BadRequest` for what is wrong.
        ``output_expires_after_s``: its output files' life (None: the settings' default)."""
        if endpoint not in ENDPOINTS:
            raise BadRequest("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        window_s = parse_window(window, self.settings.min_window_s)
        info = self.store.get_file(input_file_id)
        if info is None or info.tenant != tenant or info.expired(time.time()):
            raise BadRequest("input_file_id", f"no file {input_file_id!r}", status=404, code="not_found")
        if info.purpose != "batch":
            raise BadRequest(
                "input_file_id", f"file {input_file_id!r} has purpose {info.purpose!r}, not 'batch'"
            )
        if not self.coord.accepting:
            raise BadRequest(None, "the coordinator is not accepting work (starting or draining)", status=503)
        open_bytes = self._open_bytes(tenant)
        if open_bytes + info.bytes > self.settings.max_open_bytes:
            raise BadRequest(
                "input_file_id",
                f"the tenant's unfinished batches read {open_bytes} bytes of input, and this file "
                f"{info.bytes} more: at most {self.settings.max_open_bytes} (batches.max_open_bytes) at "
                "a time; create it once one has ended",
                status=429,
                code="limit",
            )
        batch = BatchRecord(new_id("batch_"), tenant, input_file_id, endpoint, window, window_s, time.time())
        batch.metadata = metadata
        batch.output_expires_after_s = output_expires_after_s or self.settings.file_expiry_s
        self.store.put_batch(batch)
        self._spawn(batch)
        return batch

    def _open_bytes(self, tenant: str) -> int:
        """The input bytes of the tenant's batches not ended yet (each counted, one file or not)."""
        total = 0
        for running in self._running.values():
            if running.batch.tenant == tenant:
                info = self.store.get_file(running.batch.input_file_id)
                total += info.bytes if info is not None else 0
        return total

    def get(self, batch_id: str) -> BatchRecord | None:
        running = self._running.get(batch_id)
        return running.batch if running is not None else self.store.get_batch(batch_id)

    def list_batches(self, tenant: str | None, *, limit: int, after: str | None) -> list[BatchRecord]:
        return [
            self._running[b.id].batch if b.id in self._running else b
            for b in self.store.list_batches(tenant, limit=limit, after=after)
        ]

    def cancel(self, batch_id: str) -> BatchRecord | None:
        """Stop the batch's queued and running requests; the finished ones are kept. A batch that
        has ended is returned as it is."""
        running = self._running.get(batch_id)
        if running is None:
            return self.store.get_batch(batch_id)
        batch = running.batch
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at, batch.ending = "cancelling", time.time(), "cancelled"
            self.store.put_batch(batch)
            self._stop(running, "the batch was cancelled")
        return batch

    def input_in_use(self, file_id: str) -> bool:
        return any(r.batch.input_file_id == file_id for r in self._running.values())

    def estimate(self, batch_id: str) -> dict[str, Any] | None:
        """The estimator's view of a batch in progress: when its last unfinished request completes
        (the latest of a sample of them, queued and running) and the probability that the batch
        meets its window (the least of theirs)."""
        running = self._running.get(batch_id)
        if running is None or running.batch.status != "in_progress":
            return None
        now = time.time()
        open_jobs = [j for jobs in running.jobs.values() for j in jobs if not j.done.is_set()]
        step = max(1, len(open_jobs) // ESTIMATE_SAMPLE)
        sample = open_jobs[::step][:ESTIMATE_SAMPLE] + open_jobs[-1:]
        completion: float | None = None
        p_meet: float | None = None
        for job in sample:
            est = self._estimate(job, now)
            if est is None:
                continue
            completion = max(completion or now, now + est.completion_mean_s)
            p_meet = est.p_meet if p_meet is None else min(p_meet, est.p_meet)
        if running.unsent:
            # Lines not yet submitted are in no queue: they follow at the rate the batch has
            # finished lines so far (unknown before the first: no estimate).
            completion, p_meet = self._extrapolate(running, len(open_jobs), now, completion, p_meet)
        return {
            "estimated_completion_at": None if completion is None else round(completion, 3),
            "p_meet": None if p_meet is None else round(p_meet, 4),
            "deadline": round(running.batch.deadline, 3),
            "queued": sum(j.state == "queued" for j in open_jobs),
            "running": sum(j.state == "dispatched" for j in open_jobs),
            "not_yet_submitted": running.unsent,
        }

    @staticmethod
    def _extrapolate(
        running: _Running, open_jobs: int, now: float, completion: float | None, p_meet: float | None
    ) -> tuple[float | None, float | None]:
        """The batch's completion with its unsent lines, at the rate it has finished lines so far,
        and the probability that the rest finishes by the deadline (:func:`p_rate_suffices`)."""
        batch = running.batch
        ended = batch.completed + batch.failed
        elapsed = now - (batch.in_progress_at or now)
        if ended == 0 or elapsed <= 0:
            return None, None
        left = open_jobs + running.unsent
        end = max(completion or now, now + left * elapsed / ended)
        p_rate = p_rate_suffices(ended, elapsed, left, batch.deadline - now)
        return end, min(p_rate, 1.0 if p_meet is None else p_meet)

    def _estimate(self, job: Job, now: float) -> WaitEstimate | None:
        qm = self.coord.queue_manager
        entry = qm.queue.entries.get(job.id) if qm is not None else None
        if qm is not None and entry is not None:  # not recorded: the admission's estimate is calibrated
            return qm.estimator.estimate(entry, now, record=False)
        est: WaitEstimate | None = self.coord.hook.qlm_estimate_wait(request=job.request, now=now)
        return est

    # ------------------------------------------------------------------ the batch's task
    def _spawn(self, batch: BatchRecord) -> None:
        running = _Running(batch)
        self._running[batch.id] = running
        running.task = asyncio.get_running_loop().create_task(self._follow(running), name=f"batch {batch.id}")

    async def _follow(self, running: _Running) -> None:
        """Run the batch; an unexpected error is logged and the batch run again from the top (each
        step is idempotent), not left stuck."""
        while True:
            try:
                await self._run(running)
                return
            except Exception:
                log.exception(
                    "batch %s failed in %s: running it again", running.batch.id, running.batch.status
                )
                await asyncio.sleep(5.0)

    def _stop(self, running: _Running, reason: str) -> None:
        running.stop.set()
        self.turns.wake_stopped()
        room = self._tenant_room.get(running.batch.tenant)
        if room is not None:  # its lines waiting for room go on, to be answered
            self._side_task(room.wake())
        self._side_task(self._cancel([job for group in running.jobs.values() for job in group], reason))

    def _side_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _cancel(self, jobs: list[Job], reason: str) -> None:
        """Cancel a stopped batch's open requests, :data:`CANCEL_SLICE` per turn of the event loop:
        the 4,096 of a large batch at once held it 2.4 s, every other client waiting."""
        for i, job in enumerate(jobs):
            if i and i % CANCEL_SLICE == 0:
                await asyncio.sleep(0)
            if not job.done.is_set():
                self.coord.cancel(job.id, reason)

    async def _run(self, running: _Running) -> None:
        batch = running.batch
        try:
            if await asyncio.to_thread(self.store.get_file, batch.input_file_id) is None:
                self._fail(
                    batch,
                    [
                        {
                            "code": "file_not_found",
                            "message": "the input file was deleted",
                            "param": None,
                            "line": None,
                        }
                    ],
                )
                return
            limit = self.coord.cfg.limits_for(batch.tenant)
            resumed = batch.in_progress_at is not None  # lines submitted before may be in the journal
            parsed = await asyncio.to_thread(
                parse_input,
                functools.partial(self.store.file_lines, batch.input_file_id),  # a line at a time
                batch.endpoint,
                self.coord,
                max_requests=self.settings.max_requests,
                now=time.time(),
            )
            if batch.in_progress_at is None:  # validated for the first time (cancelled meanwhile, maybe)
                if parsed.errors and batch.status == "validating":
                    self._fail(batch, parsed.errors)
                    return
                if batch.status == "validating":
                    batch.status, batch.in_progress_at = "in_progress", time.time()
                # (cancelled while it validated: its valid lines are answered cancelled, as they
                # were; its invalid ones were lines of a batch that never ran)
                batch.total = len(parsed.lines)
                models = {line.spec.model for line in parsed.lines}
                batch.model = models.pop() if len(models) == 1 else None  # several: our extension
                self.store.put_batch(batch)
            else:  # after a restart: what no longer validates (a model gone) is answered, not dropped
                batch.total = len(parsed.lines) + len(parsed.invalid)
                for index, err in parsed.invalid.items():
                    self.store.answer_line(
                        batch.id, index, _error_line(err["custom_id"], "invalid_request", err["message"], 400)
                    )
            # a batch already finalizing (before the restart) ends as it was recorded, even past its window
            if batch.status not in ("cancelling", "finalizing") and time.time() >= batch.deadline:
                batch.ending = "expired"
            if batch.ending != "completed":
                running.stop.set()
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, batch.deadline - time.time()), self._expire, running
            )
            try:
                await self._serve(running, parsed.lines, limit.max_queued_requests, resumed=resumed)
            finally:
                expiry.cancel()
            await self._finalize(running, parsed.lines)
        finally:
            if running.batch.status in FINAL:  # _finalize replaced the record
                self._running.pop(batch.id, None)

    def _fail(self, batch: BatchRecord, errors: list[dict[str, Any]]) -> None:
        listed = errors[:MAX_LISTED_ERRORS]
        if len(errors) > len(listed):
            listed.append(
                {
                    "code": "more_errors",
                    "message": f"{len(errors) - len(listed)} more errors",
                    "param": None,
                    "line": None,
                }
            )
        batch.status, batch.failed_at, batch.errors = "failed", time.time(), listed
        self.store.put_batch(batch)

    def _expire(self, running: _Running) -> None:
        if running.batch.status == "in_progress":
            running.batch.ending = "expired"
            self._stop(running, "the batch's completion window expired")

    async def _serve(
        self, running: _Running, lines: list[Line], tenant_limit: int, *, resumed: bool = False
    ) -> None:
        """Submit the lines in input order, at most ``max_in_flight`` unfinished at a time, all
        the tenant's batches together at most half its request limit (so its other traffic still
        gets in), each new line in its tenant's turn (:mod:`batch_turns`), and wait for them all.
        ``resumed``: after a restart, where a line submitted before goes on without a turn."""
        batch = running.batch
        answered = self.store.line_answers(batch.id)
        # Counted again from the top as every line is followed (those done before a restart at
        # once); what the record showed stays the floor meanwhile, so no count goes down.
        floor = (batch.completed, batch.failed, batch.input_tokens, batch.output_tokens)
        live = [0, len(answered), 0, 0]

        def count(completed: int, failed: int, input_tokens: int = 0, output_tokens: int = 0) -> None:
            for i, n in enumerate((completed, failed, input_tokens, output_tokens)):
                live[i] += n
            batch.completed, batch.failed, batch.input_tokens, batch.output_tokens = (
                max(f, n) for f, n in zip(floor, live, strict=True)
            )

        count(0, 0)
        todo = [line for line in lines if line.index not in answered]
        running.unsent = len(todo)
        width = max(1, min(self.settings.max_in_flight, len(todo) or 1))
        room = self._tenant_room.setdefault(batch.tenant, _Room(max(1, tenant_limit // 2)))
        feed = iter(todo)

        async def worker() -> None:
            for line in feed:
                # a stopped batch answers its unsent lines without waiting for room
                held = room.take(line.requests, running.stop)
                async with contextlib.nullcontext() if running.stop.is_set() else held:
                    running.unsent -= 1
                    specs = self._keyed(batch, line)
                    model = line.spec.model
                    turn = not running.stop.is_set() and not (
                        resumed and self.coord.book.duplicate(specs[0]) is not None
                    )
                    if turn:
                        turn = await self.turns.enter(model, batch.tenant, line.requests, running.stop)
                    try:
                        jobs = await self._submit_line(running, line, specs)
                    except BaseException:
                        if turn:
                            self.turns.release(model, line.requests)
                        raise
                    if turn:
                        if jobs is None:
                            self.turns.release(model, line.requests)
                        else:
                            self.turns.hold(model, jobs, line.requests)
                    if jobs is None:
                        count(0, 1)
                        continue
                    running.jobs[line.index] = jobs
                    for job in jobs:
                        if running.stop.is_set() and not job.done.is_set():  # accepted as the batch stopped
                            self.coord.cancel(job.id, "the batch stopped")
                    if await choices.first_failed(jobs) is not None:
                        for job in jobs:
                            self.coord.cancel(job.id, choices.SIBLING_FAILED)
                    for job in jobs:
                        await job.done.wait()
                    self.turns.forget(model, jobs)
                if all(job.state == "finished" for job in jobs):
                    count(
                        1,
                        0,
                        sum(job.request.prompt_tokens for job in jobs[:: line.choices]),
                        sum(job.answered_tokens for job in jobs),
                    )
                else:
                    count(0, 1)

        await asyncio.gather(*(worker() for _ in range(width)))
        batch.completed, batch.failed, batch.input_tokens, batch.output_tokens = live  # every line counted

    async def _submit_line(
        self, running: _Running, line: Line, specs: list[pb.RequestSpec]
    ) -> list[Job] | None:
        """The line's requests (``specs``, one per choice: new, or those an earlier run
        submitted); None when the line was answered without them (those accepted before are
        cancelled)."""
        jobs: list[Job] = []
        for spec in specs:
            if jobs and spec.prompt == specs[0].prompt and not spec.prompt_token_ids:
                spec.prompt_tokens = jobs[0].request.prompt_tokens  # the same prompt: counted once
            job = await self._submit(running, line, spec)
            if job is None:
                for earlier in jobs:
                    self.coord.cancel(earlier.id, choices.SIBLING_REFUSED)
                return None
            jobs.append(job)
        return jobs

    async def _submit(self, running: _Running, line: Line, spec: pb.RequestSpec) -> Job | None:
        """One of the line's requests (a new one, or the one an earlier run submitted); None when
        the line was answered without it."""
        batch = running.batch
        while True:
            now = time.time()
            spec.request_id = ""  # a refused try had one given: the next is a new submission
            if running.stop.is_set():
                earlier = self.coord.book.duplicate(spec)
                if earlier is not None:
                    return earlier
                code = "batch_expired" if batch.ending == "expired" else "batch_cancelled"
                message = (
                    "the request could not be executed before the completion window expired"
                    if batch.ending == "expired"
                    else "the batch was cancelled before the request was sent"
                )
                self.store.answer_line(batch.id, line.index, _error_line(line.custom_id, code, message))
                return None
            left_ms = (batch.deadline - now) * 1000
            spec.slo.e2e_ms = min(line.spec.slo.e2e_ms or math.inf, left_ms)
            try:
                job, _ = await self.coord.submit(spec, tenant=batch.tenant, internal=True)
                return job
            except SubmitError as exc:
                if exc.code in ("limit", "unavailable", "slo_unattainable") and left_ms > 0:
                    # the window is the deadline: wait for room (or an instance) while it lasts
                    pause = min(exc.retry_after_s or 1.0, 5.0, max(0.05, left_ms / 1000))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(running.stop.wait(), pause)
                    continue
                status = SUBMIT_HTTP.get(exc.code, 400)
                answer = _error_line(line.custom_id, exc.code, str(exc), status)
                self.store.answer_line(batch.id, line.index, answer)
                return None

    @staticmethod
    def _keyed(batch: BatchRecord, line: Line) -> list[pb.RequestSpec]:
        """The line's requests, one per choice, with the idempotency keys that find them again."""
        spec = pb.RequestSpec()
        spec.CopyFrom(line.spec)
        spec.tenant, spec.idempotency_key = batch.tenant, f"{BATCH_KEY_PREFIX}{batch.id}/{line.index}"
        return choices.choice_specs(spec, line.choices, line.prompts)

    async def _finalize(self, running: _Running, lines: list[Line]) -> None:
        """Write the output and error files in input order, a stride of lines at a time (their
        chunks stored from a thread, the file hidden until the end), then show them with the
        batch's final state in one transaction."""
        batch = running.batch
        if batch.ending != "cancelled":  # OpenAI's cancel: cancelling, then cancelled (no finalizing)
            batch.status, batch.finalizing_at = "finalizing", batch.finalizing_at or time.time()
        await self.coord.journal.flush()  # the finished requests' records are committed first
        self.store.put_batch(batch)
        answered = self.store.line_answers(batch.id)
        api = ENDPOINTS[batch.endpoint]
        by_index = {line.index: line for line in lines}
        files = _OutputFiles(self.store, batch)
        completed = failed = 0
        try:
            outputs: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            for n, index in enumerate(sorted(by_index.keys() | answered.keys())):
                if n % FINALIZE_STRIDE == FINALIZE_STRIDE - 1:  # others' requests go on meanwhile
                    await asyncio.to_thread(files.write, outputs, errors)
                    outputs, errors = [], []
                if index in answered:
                    errors.append(answered[index])
                    failed += 1
                    continue
                line = by_index[index]
                lookup = self.coord.book.duplicate
                found = running.jobs.get(index) or [
                    job for spec in self._keyed(batch, line) if (job := lookup(spec)) is not None
                ]
                if len(found) < line.requests:  # cannot happen: every unanswered line was submitted
                    ok, answer = False, _error_line(line.custom_id, "lost", "the request was not found", 500)
                else:
                    ok, answer = _job_answer(line, found, batch.ending, api)
                (outputs if ok else errors).append(answer)
                completed += ok
                failed += not ok
            await asyncio.to_thread(files.write, outputs, errors, True)
            # the final state is built on a copy and shown only once committed: a client polling
            # the batch must not see its output file before the file can be read
            final = dataclasses.replace(batch)
            for name, writer in files.writers.items():
                setattr(final, f"{name}_file_id", writer.record.id)
            final.completed, final.failed = completed, failed
            final.status = batch.ending
            setattr(final, f"{batch.ending}_at", time.time())
            await asyncio.to_thread(self.store.finalize, final, list(files.writers.values()))
        except BaseException:
            files.discard()
            raise
        running.batch = batch = final
        log.info(
            "batch %s %s: %d completed, %d failed", batch.id, batch.status, batch.completed, batch.failed
        )


class _OutputFiles:
    """A batch's output and error files on their way into the store, each created with its first
    line (a batch with no error has no error file)."""

    def __init__(self, store: BatchStore, batch: BatchRecord) -> None:
        self.store = store
        self.batch = batch
        self.writers: dict[str, FileWriter] = {}

    def write(self, outputs: list[dict[str, Any]], errors: list[dict[str, Any]], last: bool = False) -> None:
        for name, answers in (("output", outputs), ("error", errors)):
            writer = self.writers.get(name)
            if answers and writer is None:
                filename = f"{self.batch.id}_{name}.jsonl"
                writer = self.writers[name] = self.store.new_file(
                    self.batch.tenant,
                    filename,
                    "batch_output",
                    expires_after_s=self.batch.output_expires_after_s,
                )
            if writer is not None:
                if answers:
                    writer.write("".join(json.dumps(a) + "\n" for a in answers).encode())
                if last:
                    writer.flush()

    def discard(self) -> None:
        for writer in list(self.writers.values()):  # a write may still run in its thread
            self.store.discard(writer)


def visible(batch_or_file: BatchRecord | FileRecord, tenant: str, admin: bool) -> bool:
    return admin or batch_or_file.tenant == tenant
