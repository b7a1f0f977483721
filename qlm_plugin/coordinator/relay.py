"""The link between the HTTP front-door worker processes and the core (``qlm serve --http-workers``).

The core listens on a private Unix socket; each worker holds one connection to it. A worker sends
submissions and cancellations (``qlm.v1.RelayCalls``); the core answers each submission (accepted,
with the request as queued and its output so far, or refused, with the error the in-process front
door would have raised) and then sends the request's output and its end (``qlm.v1.RelayEvents``).
Each message carries everything that queued while the previous one was being written.

The messages are the protobuf messages of ``qlm.proto``, each framed by its length (4 bytes, little
endian), not a gRPC stream: measured on this link's messages (one process each side, uvloop), a
gRPC stream message costs the receiving server about 140 us of CPU, a framed one 40 us, and the
link carries one or two messages per request. The first frame of a worker is the core's secret
(the socket's folder is private too).

:class:`RelayService` is the core's end; :class:`RelayClient` the worker's, with the
``submit``/``cancel``/``follow`` calls of :class:`~qlm_plugin.coordinator.coordinator.Coordinator`
that the front door's handlers use, so the handlers run unchanged in a worker. Both are used on one
event loop (not thread-safe).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry import propagate

from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.jobs import (
    CALLER_GONE,
    NOT_KEPT,
    WORKER_GONE,
    Chunk,
    Job,
    SubmitError,
    askable_later,
    follow,
    halt,
    publish,
    tell_end,
)
from qlm_plugin.coordinator.journal import TERMINAL
from qlm_plugin.coordinator.json_codec import dumps
from qlm_plugin.domain.outcome import Admission
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.transport.openai_client import merge_tool_calls

log = logging.getLogger("qlm_plugin.coordinator.relay")

Item = TypeVar("Item")
#: The largest frame read (a batch of submissions of 4 MiB prompts, or the output of long requests).
MAX_FRAME = 1 << 30
#: Why the requests of a worker that went away are cancelled.


# ---------------------------------------------------------------------------------- conversion
def relay_job(job: Job, *, duplicate: bool = False, text: bool = False) -> pb.RelayJob:
    """A job as the worker needs it for the answer: the request, the estimate and the progress."""
    r = job.request
    out = pb.RelayJob(
        request_id=r.id,
        model=r.model,
        prompt_tokens=r.prompt_tokens,
        max_tokens=r.max_tokens,
        arrival_time=r.arrival_time,
        slo_class=r.slo_class,
        priority=r.priority,
        weight=r.weight,
        tenant=r.tenant,
        duplicate=duplicate,
        state=job.state,
        tokens=job.tokens,
        finish_reason=job.finish_reason,
        error=job.error,
        instance_id=job.instance or "",
        attempt=job.attempt,
        halted=job.halted,
    )
    if r.slo.ttft_deadline is not None:
        out.ttft_deadline = r.slo.ttft_deadline
    if r.slo.e2e_deadline is not None:
        out.e2e_deadline = r.slo.e2e_deadline
    adm = job.admission
    if adm is not None:
        out.has_admission = True
        out.can_meet_slo = adm.can_meet_slo
        out.planned_instance = adm.instance_id or ""
        if adm.wait_mean_s is not None:
            out.wait_mean_s = adm.wait_mean_s
        if adm.p_meet is not None:
            out.p_meet = adm.p_meet
    if job.first_token_at is not None:
        out.first_token_at = job.first_token_at
    if job.finished_at is not None:
        out.finished_at = job.finished_at
    if text:
        out.text = job.text
        if job.tool_calls:
            out.tool_calls = dumps(job.tool_calls).decode()
        if job.logprobs:
            out.logprobs = dumps(job.logprobs).decode()
        if job.prompt_logprobs is not None:
            out.prompt_logprobs = dumps(job.prompt_logprobs).decode()
    return out


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def job_from_relay(m: pb.RelayJob, spec: pb.RequestSpec) -> Job:
    """The worker's copy of a job, from the core's answer."""
    request = Request(
        id=m.request_id,
        model=m.model,
        prompt_tokens=m.prompt_tokens,
        max_tokens=m.max_tokens,
        arrival_time=m.arrival_time,
        slo=SLO(_opt(m, "ttft_deadline"), _opt(m, "e2e_deadline")),
        slo_class=m.slo_class,
        priority=m.priority,
        weight=m.weight,
        tenant=m.tenant,
    )
    job = Job(request, spec)
    if m.has_admission:
        job.admission = Admission(
            m.request_id,
            True,
            m.can_meet_slo,
            m.planned_instance or None,
            _opt(m, "wait_mean_s"),
            _opt(m, "p_meet"),
        )
    if m.text:
        job.chunks.append(m.text)
    if m.tool_calls:
        job.tool_calls = json.loads(m.tool_calls)
    if m.logprobs:
        job.logprobs = json.loads(m.logprobs)
    if m.prompt_logprobs:
        job.prompt_logprobs = json.loads(m.prompt_logprobs)
    update_job(job, m)
    return job


def update_job(job: Job, m: pb.RelayJob) -> None:
    job.state, job.tokens, job.attempt = m.state, m.tokens, m.attempt
    job.instance = m.instance_id or None
    job.first_token_at = _opt(m, "first_token_at")
    job.finished_at = _opt(m, "finished_at")
    job.finish_reason, job.error = m.finish_reason, m.error
    job.halted = m.halted


def refusal(exc: SubmitError) -> pb.RelayRefusal:
    out = pb.RelayRefusal(
        code=exc.code,
        field=exc.field or "",
        message=str(exc),
        retry_after_s=exc.retry_after_s if exc.retry_after_s is not None else -1.0,
    )
    if exc.estimate is not None:
        out.has_estimate = True
        out.wait_mean_s = exc.estimate.wait_mean_s or 0.0
        out.p_meet = exc.estimate.p_meet or 0.0
    return out


def submit_error(m: pb.RelayRefusal) -> SubmitError:
    estimate = Admission("", False, False, None, m.wait_mean_s, m.p_meet) if m.has_estimate else None
    return SubmitError(
        m.code,
        m.message,
        m.field or None,
        estimate=estimate,
        retry_after_s=m.retry_after_s if m.retry_after_s >= 0 else None,
    )


# ---------------------------------------------------------------------------------- framing
class LinkClosed(Exception):
    pass


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    try:
        size = int.from_bytes(await reader.readexactly(4), "little")
        if size > MAX_FRAME:
            raise LinkClosed(f"a frame of {size} bytes")
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise LinkClosed(str(exc) or type(exc).__name__) from None


def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(4, "little") + data)


# ---------------------------------------------------------------------------------- the core's end
class _Outbox(Generic[Item]):
    """What one end has for the other: everything added while the last frame was being written
    goes out as the next frame (``wrap`` makes the message of a list of items)."""

    def __init__(self, wrap: Callable[[list[Item]], Message]) -> None:
        self.wrap = wrap
        self.items: list[Item] = []
        self.ready = asyncio.Event()
        self.closed = False

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def pump(self, writer: asyncio.StreamWriter) -> None:
        """Write frames until closed (what was added before the close goes out first)."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.items:
                items, self.items = self.items, []
                write_frame(writer, self.wrap(items).SerializeToString())
                await writer.drain()
            if self.closed:
                return


def _events(items: list[pb.RelayEvent]) -> Message:
    return pb.RelayEvents(events=items)


def _calls(items: list[pb.RelayCall]) -> Message:
    return pb.RelayCalls(calls=items)


class _Follower:
    """A job's output, for one worker's link: a :class:`~qlm_plugin.coordinator.jobs.ChunkSink`
    that turns each chunk into an event, without a task per request."""

    __slots__ = ("followed", "job", "outbox", "streams")

    def __init__(
        self, job: Job, outbox: _Outbox[pb.RelayEvent], followed: dict[str, _Follower], streams: bool
    ) -> None:
        self.job, self.outbox, self.followed = job, outbox, followed
        self.streams = streams  # a client of the worker reads the output as it comes (jobs.publish)

    def put_nowait(self, item: Chunk | None) -> None:
        job = self.job
        if item is not None and not item.finished:
            chunk = pb.OutputChunk(text=item.text, index=item.index, tokens=item.tokens)
            if item.tool_calls:
                chunk.tool_calls = dumps(item.tool_calls).decode()
            if item.logprobs:
                chunk.logprobs = dumps(item.logprobs).decode()
            if item.index == 0 and job.prompt_logprobs is not None:
                chunk.prompt_logprobs = dumps(job.prompt_logprobs).decode()
            self.outbox.add(pb.RelayEvent(chunk=pb.RelayChunk(request_id=job.id, chunk=chunk)))
            return
        # The end: once, whichever of the two comes first. It stays a listener (removing it here
        # would upset the loop that calls it); the job is dropped soon after anyway.
        if self.followed.pop(job.id, None) is self:
            self.outbox.add(pb.RelayEvent(finished=relay_job(job)))


class RelayService:
    """The core's end of the workers' links: :meth:`serve` them on a Unix socket."""

    def __init__(self, coord: Coordinator, secret: str) -> None:
        self.coord = coord
        self.secret = secret.encode()
        # Set when the server stops: a worker's link then ends because it was told to stop, not
        # because its clients left, and their requests stay journaled for the next start.
        self.closing = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def serve(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._link, path, limit=1 << 20)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            hello = await asyncio.wait_for(read_frame(reader), 10.0)
            if not hmac.compare_digest(hello, self.secret):
                log.warning("a front-door link without the secret: closed")
                return
            await self._relay(reader, writer)
        except (LinkClosed, TimeoutError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outbox: _Outbox[pb.RelayEvent] = _Outbox(_events)
        followed: dict[str, _Follower] = {}
        # request id -> this link's clients still waiting for it (each counted by the coordinator
        # as a caller who cancels it by leaving): a dead worker's leave as many, not one per
        # request (two of its clients sharing a key: the request ran on for nobody; one already
        # gone: another worker's client lost its answer)
        waiting: dict[str, int] = {}
        tasks: set[asyncio.Task[None]] = set()
        calls = asyncio.get_running_loop().create_task(self._read(reader, outbox, followed, waiting, tasks))
        try:
            await outbox.pump(writer)
        finally:
            calls.cancel()
            for task in tasks:
                task.cancel()
            for f in list(followed.values()):  # its HTTP clients are gone with it
                if f in f.job.listeners:
                    f.job.listeners.remove(f)
            followed.clear()
            if not self.closing and self.coord.book.accepting:  # draining: kept for the next start
                for request_id, n in waiting.items():
                    for _ in range(n):
                        self.coord.cancel(request_id, WORKER_GONE)
            waiting.clear()

    async def _read(
        self,
        reader: asyncio.StreamReader,
        outbox: _Outbox[pb.RelayEvent],
        followed: dict[str, _Follower],
        waiting: dict[str, int],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = pb.RelayCalls.FromString(await read_frame(reader))
                for call in batch.calls:
                    if call.HasField("submit"):
                        task = loop.create_task(self._submit(call, outbox, followed, waiting))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif call.cancel:
                        reason = call.cancel_reason or "cancelled by the client"
                        if reason in CALLER_GONE:
                            if not waiting.get(call.cancel):
                                continue  # (none of this link's clients waits for it any more)
                            waiting[call.cancel] -= 1
                        self.coord.cancel(call.cancel, reason)
        except (LinkClosed, DecodeError, asyncio.CancelledError):
            pass
        finally:
            outbox.close()

    async def _submit(
        self,
        call: pb.RelayCall,
        outbox: _Outbox[pb.RelayEvent],
        followed: dict[str, _Follower],
        waiting: dict[str, int],
    ) -> None:
        parent = propagate.extract(dict(call.trace)) if call.trace else None
        try:
            # the worker's link may end while the request is journaled: its client is gone with it
            job, duplicate = await self.coord.submit(
                call.submit, parent=parent, cancel_if_caller_leaves=WORKER_GONE
            )
        except SubmitError as exc:
            outbox.add(pb.RelayEvent(seq=call.seq, refused=refusal(exc)))
            return
        except Exception as exc:  # a bug: the worker's client is answered all the same, not left waiting
            log.exception("relay: submit failed")
            failure = SubmitError("internal", f"the coordinator failed on this request: {exc!r}")
            outbox.add(pb.RelayEvent(seq=call.seq, refused=refusal(failure)))
            return
        if job.state not in TERMINAL:  # (the coordinator counted its caller: see Coordinator.submit)
            waiting[job.id] = waiting.get(job.id, 0) + 1
        # The answer, with the output so far, and the follower are set up in one step: no chunk
        # published in between is lost or sent twice.
        outbox.add(pb.RelayEvent(seq=call.seq, accepted=relay_job(job, duplicate=duplicate, text=True)))
        if call.streams and job.tokens:  # the output so far went with the answer, to a stream
            job.delivered = True
        if job.id in followed:  # a duplicate on the same link: the follower there serves both
            followed[job.id].streams |= call.streams
            return
        follower = _Follower(job, outbox, followed, call.streams)
        followed[job.id] = follower
        if job.state in TERMINAL:
            follower.put_nowait(None)
        else:
            job.listeners.append(follower)


# ---------------------------------------------------------------------------------- the worker's end
class CoreUnavailable(SubmitError):
    def __init__(self, why: str) -> None:
        super().__init__("unavailable", f"the coordinator core is unreachable: {why}", retry_after_s=1.0)


class RelayClient:
    """The worker's end: the core's ``submit``, ``cancel`` and ``follow`` over one stream.

    ``closed`` is set when the link ends (the core stopped or died); every request still open on
    this worker then ends failed, and new submissions are refused as unavailable."""

    def __init__(self, path: str, secret: str) -> None:
        self.path = path
        self.secret = secret
        self.closed = asyncio.Event()
        self._why = "not connected"
        self._seq = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[tuple[Job, bool]], pb.RequestSpec, str]] = {}
        self._jobs: dict[str, list[Job]] = {}
        self._outbox: _Outbox[pb.RelayCall] = _Outbox(_calls)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout_s: float = 30.0) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.path, limit=1 << 20), timeout_s
        )
        write_frame(writer, self.secret.encode())
        self._why = ""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._incoming(reader)), loop.create_task(self._outgoing(writer))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._end("the front-door worker stopped")

    # ------------------------------------------------------------------ the front door's calls
    async def submit(
        self,
        spec: pb.RequestSpec,
        *,
        tenant: str | None = None,
        parent: Any = None,
        cancel_if_caller_leaves: str | None = None,
        streams: bool = False,
    ) -> tuple[Job, bool]:
        """The core's answer. A caller that leaves first has the request cancelled once the core
        accepts it (a worker's callers are HTTP clients: no one is left to answer), with
        ``cancel_if_caller_leaves`` as the reason; ``streams``: the caller reads the output as it
        comes (the core then knows that what it sent was shown)."""
        if self._why:
            raise CoreUnavailable(self._why)
        if tenant is not None:
            spec.tenant = tenant
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=parent)
        seq = next(self._seq)
        answer: asyncio.Future[tuple[Job, bool]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = (answer, spec, cancel_if_caller_leaves or "the client disconnected")
        self._send(pb.RelayCall(seq=seq, submit=spec, trace=carrier, streams=streams))
        # A client that leaves before the answer cancels the future; a request the core accepted
        # meanwhile is then cancelled when its answer arrives (see _answer).
        return await answer

    def cancel(self, request_id: str, reason: str = "cancelled by the client") -> None:
        if not self._why:
            self._send(pb.RelayCall(cancel=request_id, cancel_reason=reason))

    def follow(self, job: Job) -> AsyncIterator[Chunk]:
        return follow(job)

    # ------------------------------------------------------------------ the stream
    def _send(self, call: pb.RelayCall) -> None:
        self._outbox.add(call)

    async def _outgoing(self, writer: asyncio.StreamWriter) -> None:
        try:
            await self._outbox.pump(writer)
        except ConnectionError as exc:
            self._end(f"the link broke: {exc}")
        finally:
            writer.close()

    async def _incoming(self, reader: asyncio.StreamReader) -> None:
        why = "the core closed the link"
        try:
            while True:
                batch = pb.RelayEvents.FromString(await read_frame(reader))
                for event in batch.events:
                    kind = event.WhichOneof("event")
                    if kind == "chunk":
                        self._chunk(event.chunk)
                    elif kind == "finished":
                        self._finished(event.finished)
                    else:
                        self._answer(event)
        except (LinkClosed, DecodeError) as exc:
            why = f"{why} ({exc})"
        except asyncio.CancelledError:
            why = "the front-door worker stopped"
        finally:
            self._end(why)

    def _answer(self, event: pb.RelayEvent) -> None:
        answer, spec, gone_reason = self._pending.pop(event.seq, (None, None, ""))
        if answer is None or spec is None:
            return
        if event.HasField("refused"):
            if not answer.done():
                answer.set_exception(submit_error(event.refused))
            return
        accepted = event.accepted
        if answer.done():  # the client left: so does its request
            if accepted.state not in TERMINAL:
                self.cancel(accepted.request_id, gone_reason)
            return
        # The job is set up here, not when the submitter resumes: the request's output and end
        # may be in the same message, right behind this answer.
        job = job_from_relay(accepted, spec)
        if job.state in TERMINAL:
            tell_end(job)
        else:
            self._jobs.setdefault(job.id, []).append(job)
        answer.set_result((job, accepted.duplicate))

    def _chunk(self, m: pb.RelayChunk) -> None:
        c = m.chunk
        calls = json.loads(c.tool_calls) if c.tool_calls else None
        logprobs = json.loads(c.logprobs) if c.logprobs else None
        chunk = Chunk(c.text, c.index, c.tokens, tool_calls=calls, logprobs=logprobs)
        for job in self._jobs.get(m.request_id, ()):
            if c.index == 0 and job.tokens:  # made again from its start (a constrained output)
                job.chunks.clear()
                job.tool_calls.clear()
                job.logprobs.clear()
            if c.prompt_logprobs:
                job.prompt_logprobs = json.loads(c.prompt_logprobs)
            job.chunks.append(c.text)
            if calls:
                merge_tool_calls(job.tool_calls, calls)
            if logprobs:
                job.logprobs.extend(logprobs)
            job.tokens = c.index + c.tokens
            publish(job, chunk)

    def _finished(self, m: pb.RelayJob) -> None:
        for job in self._jobs.pop(m.request_id, ()):
            update_job(job, m)
            tell_end(job)

    def _end(self, why: str) -> None:
        """The link is gone: refuse what waits for an answer, fail what is open."""
        if self._why and self.closed.is_set():
            return
        self._why = why or "the link ended"
        self._outbox.close()
        for answer, _, _ in self._pending.values():
            if not answer.done():
                answer.set_exception(CoreUnavailable(self._why))
        self._pending.clear()
        jobs, self._jobs = self._jobs, {}
        for group in jobs.values():
            for job in group:
                # accepted, it is in the core's journal and served after its restart: its client is
                # told so, as at a graceful stop (it was told "failed", and the retry with its key
                # found the whole answer), with what happened; unless no one can ask for it then,
                # which the restart cancels (JobBook.recover): its client is told to send it again
                went = f"the coordinator core went away ({self._why})"
                if not askable_later(job.spec):
                    job.state, job.error = "cancelled", f"{NOT_KEPT} ({went})"
                halt(job, went)
        self.closed.set()
