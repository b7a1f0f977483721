"""The instance side of the control plane: an agent that connects one serving engine to the
coordinator (register, heartbeats with state reports, pulling work, carrying out serving
operations, reporting progress) and reconnects with backoff when the coordinator goes away.

The engine is reached through :class:`EngineLink`, which each adapter implements (the simulator's
in ``qlm_plugin.adapters.sim.process``). Progress events are kept until the coordinator has
acknowledged them (it does so once they are journaled), and resent after a reconnect, so a
coordinator restart loses nothing; the coordinator drops duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc
from qlm_plugin.transport import MAX_MESSAGE_BYTES

#: The events after which an engine holds the request no more.
ENDED = (pb.RequestEvent.FINISHED, pb.RequestEvent.FAILED, pb.RequestEvent.REFUSED)
log = logging.getLogger("qlm_plugin.transport.agent")

#: Deadline of each unary call to the coordinator, seconds.
CALL_TIMEOUT_S = 5.0
#: Reconnect backoff: first wait, cap (seconds); doubled per failure, with jitter.
BACKOFF_S = (0.1, 5.0)
#: A unary call that only ran out of time is sent again on the same session: the process (an
#: engine whose scheduler holds the GIL) or the coordinator was slow, the connection is fine. A
#: broken connection ends the streams, and the session with them; a forgotten one answers unknown.
RETRIED_CODES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})
#: What no retry mends: the coordinator refuses this instance's token (or lack of one).
REFUSED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
#: A lost connection is logged at INFO while the next retry comes sooner than this (about 6 s of
#: retries: a stop, or a restart).
QUIET_RETRIES_S = 5.0
#: How long a stopping agent tries to send its last reports (a hung coordinator held SIGTERM off).
FINAL_FLUSH_S = 10.0


class AgentRefused(RuntimeError):
    """The coordinator refuses this instance (its token): retrying cannot help."""


class EngineLink(Protocol):
    """What the agent needs of an engine. Called on the agent's event loop; implementations must
    not block it (an engine in another thread or process is reached through queues)."""

    instance_id: str
    backend: str
    gpu: str
    capabilities: Sequence[str]
    endpoint: str

    def state(self) -> pb.StateReport: ...

    def free_slots(self) -> int: ...

    def held(self) -> list[pb.HeldRequest]:
        """The requests the engine holds, unfinished (reclaimed after a reconnect)."""
        ...

    def start(self, assignment: pb.Assignment, emit: Callable[[pb.RequestEvent], None]) -> bool:
        """Begin serving an assignment; progress goes to ``emit``. False: refused (reported FAILED)."""
        ...

    def execute(self, command: pb.Command) -> pb.CommandAck | Awaitable[pb.CommandAck]:
        """Carry out a serving operation (evict, swap in, load or unload a model, abort). A quick one
        answers at once; a slow one (a model load, a call to a server) returns an awaitable, which
        the agent awaits beside its heartbeats and later commands."""
        ...

    def abort(self, request_id: str) -> None:
        """Drop a request without reporting it (the coordinator no longer counts it here)."""
        ...


@dataclass(frozen=True, slots=True)
class AgentSettings:
    target: str  # host:port of the coordinator's gRPC server
    token: str | None = None  # bearer token with the instance scope
    root_certificates: bytes | None = None  # TLS: the CA to trust (None: plaintext)
    client_cert: tuple[bytes, bytes] | None = None  # TLS client certificate (key, chain)


class InstanceAgent:
    def __init__(self, settings: AgentSettings, engine: EngineLink) -> None:
        self.settings = settings
        self.engine = engine
        self._events: list[pb.RequestEvent] = []
        self._unacked: deque[pb.EventBatch] = deque()
        self._seq = 0
        self._wake_report = asyncio.Event()
        self._wake_credit = asyncio.Event()
        self._wake_heartbeat = asyncio.Event()
        self._report_lock = asyncio.Lock()
        # The output of each request until its end is acknowledged: a restarted coordinator lost
        # what it had streamed, and gets it again from the start (it drops what it already has).
        self._outputs: dict[tuple[str, int], list[pb.RequestEvent]] = {}
        self.session = ""
        # Names this agent to the coordinator across its reconnects (see RegisterRequest.agent_id).
        self.agent_id = uuid.uuid4().hex
        self.connected = asyncio.Event()
        self.sessions_started = 0
        self._received = 0
        # Whether this session's coordinator takes the pull credit carried by a report batch (its
        # acknowledgements say so): then a finished request's room goes with its report alone.
        self._credit_on_reports = False
        # Operations still running (kept referenced); one that outlives its session acknowledges
        # into the dead stream, and the engine's state reports tell the coordinator how it ended.
        self._slow_commands: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ engine-facing
    def emit(self, event: pb.RequestEvent) -> None:
        if event.kind == pb.RequestEvent.TOKENS:
            self._outputs.setdefault((event.request_id, event.attempt), []).append(event)
        self._events.append(event)
        self._wake_report.set()
        if event.kind in ENDED:
            self.room()

    def room(self) -> None:
        """The engine may have room: send a pull credit soon, on the next report where one is
        about to go (with what just finished) and the coordinator takes it there."""
        if self._credit_on_reports and self._events:
            self._wake_report.set()
        else:
            self._wake_credit.set()

    def state_changed(self) -> None:
        """The engine's state changed in a way the coordinator must know at once (its server went
        down or came back): send a heartbeat now, not at the next interval."""
        self._wake_heartbeat.set()

    # ------------------------------------------------------------------ connection
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.settings.token}")] if self.settings.token else []

    def _channel(self) -> grpc.aio.Channel:
        s = self.settings
        options = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if s.root_certificates is None:
            return grpc.aio.insecure_channel(s.target, options=options)
        key, chain = s.client_cert or (None, None)
        creds = grpc.ssl_channel_credentials(s.root_certificates, key, chain)
        return grpc.aio.secure_channel(s.target, creds, options=options)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set: connect, and reconnect with backoff whenever the
        connection breaks. The engine keeps serving what it holds meanwhile."""
        delay = BACKOFF_S[0]
        while not stop.is_set():
            registered = self.sessions_started
            try:
                await self._session(stop)
                delay = BACKOFF_S[0]
            except (grpc.aio.AioRpcError, ConnectionError, OSError, SessionLost) as exc:
                self.connected.clear()
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in REFUSED_CODES:
                    # it was retried for ever, logged as a lost connection
                    raise AgentRefused(
                        f"{self.engine.instance_id}: the coordinator at {self.settings.target} refuses "
                        f"this instance ({_brief(exc)}): give it an instance token "
                        "(QLM_INSTANCE_TOKEN, or the variable --token-env names)"
                    ) from None
                if self.sessions_started > registered:
                    # a session that was up is a fresh loss: retry soon, not after the earlier
                    # failures' backoff (a restarted coordinator's instances came back 5 s late)
                    delay = BACKOFF_S[0]
                taken = isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.ALREADY_EXISTS
                # The coordinator ending its streams, or not answering for a moment, is its stop or
                # restart: a Ctrl-C of `qlm serve` printed WARNINGs per instance. Said at INFO while
                # the retries are quick, a WARNING once it lasts.
                passing = isinstance(exc, StreamClosed) or (
                    isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE
                )
                level = logging.INFO if passing and delay < QUIET_RETRIES_S else logging.WARNING
                log.log(
                    logging.ERROR if taken else level,
                    "%s: %s (%s); retrying in %.1f s",
                    self.engine.instance_id,
                    "registration refused" if taken else "coordinator connection lost",
                    _brief(exc),
                    delay,
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.2))
                delay = min(BACKOFF_S[1], delay * 2)

    async def _session(self, stop: asyncio.Event) -> None:
        async with self._channel() as channel:
            stub = pb_grpc.InstancesStub(channel)  # type: ignore[no-untyped-call]  # generated stub
            e = self.engine
            reply = await stub.Register(
                pb.RegisterRequest(
                    instance_id=e.instance_id,
                    backend=e.backend,
                    gpu=e.gpu,
                    capabilities=list(e.capabilities),
                    state=e.state(),
                    held=self._held(),
                    endpoint=e.endpoint,
                    agent_id=self.agent_id,
                ),
                timeout=CALL_TIMEOUT_S,
                metadata=self._metadata(),
            )
            for h in reply.abandon:
                e.abort(h.request_id)
            self._replay([(h.request_id, h.attempt) for h in reply.keep])
            self.session = reply.session
            self.sessions_started += 1
            self._received = 0
            self._credit_on_reports = False
            self.connected.set()
            tasks = [
                asyncio.create_task(self._heartbeats(stub, reply.heartbeat_interval_s)),
                asyncio.create_task(self._pull(stub, reply.heartbeat_interval_s)),
                asyncio.create_task(self._commands(stub)),
                asyncio.create_task(self._reports(stub)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if stop.is_set():  # a clean stop: report what finished before leaving, if it listens
                try:
                    await asyncio.wait_for(self._leave(stub), FINAL_FLUSH_S)
                except (asyncio.TimeoutError, grpc.aio.AioRpcError) as exc:
                    log.warning("%s: last reports not sent (%s)", self.engine.instance_id, _brief(exc))
                self.connected.clear()

    async def _leave(self, stub: pb_grpc.InstancesStub) -> None:
        """The last reports (what finished is not served again), then a heartbeat saying it
        leaves: the coordinator serves what it still held elsewhere at once (its engine stops with
        it; that waited out the heartbeat timeout), those on their way to it too."""
        await self._flush_reports(stub)
        report = self.engine.state()
        report.session, report.leaving = self.session, True
        await self._call(stub.Heartbeat, report)

    async def _heartbeats(self, stub: pb_grpc.InstancesStub, interval: float) -> None:
        while True:
            report = self.engine.state()
            report.session = self.session
            reply = await self._call(stub.Heartbeat, report)
            if not reply.known:
                raise SessionLost("the coordinator does not know this session")
            self.room()  # a periodic credit too: room may have appeared without an event
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_heartbeat.wait(), interval)
            self._wake_heartbeat.clear()

    async def _call(self, method: Callable[..., Any], message: Any) -> Any:
        while True:
            try:
                return await method(message, timeout=CALL_TIMEOUT_S, metadata=self._metadata())
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRIED_CODES:
                    raise
                log.warning("%s: %s; sending it again", self.engine.instance_id, _brief(exc))

    async def _pull(self, stub: pb_grpc.InstancesStub, interval: float) -> None:
        async def credits() -> AsyncIterator[pb.PullCredit]:
            yield self._credit()
            while True:
                await self._wake_credit.wait()
                self._wake_credit.clear()
                credit = self._credit()
                if credit.free_slots > 0:
                    yield credit

        # What is dispatched together comes in one message; by one message each from a coordinator
        # without the batched stream (an older one).
        call = stub.PullBatches(credits(), metadata=self._metadata())
        try:
            async for batch in call:
                for a in batch.assignments:
                    self._start(a)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("%s: the coordinator has no batched pull stream", self.engine.instance_id)
            single = stub.Pull(credits(), metadata=self._metadata())
            try:
                async for a in single:
                    self._start(a)
            finally:
                single.cancel()
        finally:
            call.cancel()  # and with it the task that reads our credits: nothing left pending
        raise StreamClosed("the coordinator closed the pull stream")

    def _credit(self) -> pb.PullCredit:
        free = self.engine.free_slots()
        return pb.PullCredit(session=self.session, free_slots=free, received=self._received)

    def _start(self, a: pb.Assignment) -> None:
        self._received += 1
        if not self.engine.start(a, self.emit):
            self.emit(
                pb.RequestEvent(
                    request_id=a.request.request_id,
                    attempt=a.attempt,
                    kind=pb.RequestEvent.FAILED,
                    error="the engine refused it",
                )
            )

    async def _commands(self, stub: pb_grpc.InstancesStub) -> None:
        acks: asyncio.Queue[pb.CommandAck] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[pb.CommandAck]:
            yield pb.CommandAck(session=self.session)
            while True:
                yield await acks.get()

        call = stub.Commands(outgoing(), metadata=self._metadata())
        try:
            async for cmd in call:
                self._execute(cmd, acks)
        finally:
            call.cancel()  # and with it the task that reads our acknowledgements
        raise StreamClosed("the coordinator closed the command stream")

    def _execute(self, cmd: pb.Command, acks: asyncio.Queue[pb.CommandAck]) -> None:
        """Carry out one command and acknowledge it: started in order, a slow one finishing in a
        task of its own, so that neither the heartbeats nor the commands after it wait for it. A
        failed operation is acknowledged as failed, never fatal to the session."""

        def send(ack: pb.CommandAck) -> None:
            ack.command_id, ack.session = cmd.command_id, self.session
            acks.put_nowait(ack)

        async def finish(pending: Awaitable[pb.CommandAck]) -> None:
            try:
                send(await pending)
            except Exception as exc:
                send(pb.CommandAck(ok=False, error=f"{type(exc).__name__}: {exc}"))

        try:
            result = self.engine.execute(cmd)
        except Exception as exc:
            send(pb.CommandAck(ok=False, error=f"{type(exc).__name__}: {exc}"))
            return
        if isinstance(result, pb.CommandAck):
            send(result)
            return
        task = asyncio.ensure_future(finish(result))
        self._slow_commands.add(task)
        task.add_done_callback(self._slow_commands.discard)

    def _batch(self) -> None:
        if self._events:
            self._seq += 1
            self._unacked.append(pb.EventBatch(seq=self._seq, events=self._events))
            self._events = []

    async def _send_unacked(self, stub: pb_grpc.InstancesStub) -> None:
        async with self._report_lock:  # the report loop and the final flush must not interleave
            while self._unacked:
                batch = self._stamped(self._unacked[0])
                ack = await self._call(stub.Report, batch)  # resent as is: the seq makes it idempotent
                self._acknowledged(batch, ack)

    def _stamped(self, batch: pb.EventBatch) -> pb.EventBatch:
        """The batch as sent now: this session's, with the pull credit as of now (a batch sent
        again carries the credit of its new sending, not its first)."""
        batch.session = self.session
        batch.credit.CopyFrom(self._credit())
        return batch

    def _acknowledged(self, batch: pb.EventBatch, ack: pb.ReportAck) -> None:
        if not ack.known:
            raise SessionLost("the coordinator does not know this session")
        self._credit_on_reports = ack.takes_credit
        self._unacked.popleft()
        for ev in batch.events:
            if ev.kind in ENDED:
                self._outputs.pop((ev.request_id, ev.attempt), None)

    async def _reports(self, stub: pb_grpc.InstancesStub) -> None:
        # No timer: a report goes out as soon as there is something to say, and what happens while
        # one is in flight goes out together in the next (batching only under load). On one stream
        # per session; by unary calls where the coordinator has no such stream (an older one).
        # Liveness is the heartbeats' (unary, with deadlines): a stream read waits as long as the
        # session lives, where a unary call would have been sent again after its deadline.
        call = stub.Reports(metadata=self._metadata())
        try:
            while True:
                self._batch()
                async with self._report_lock:  # the final flush (unary) must not interleave
                    while self._unacked:
                        batch = self._stamped(self._unacked[0])
                        with contextlib.suppress(asyncio.InvalidStateError):  # ended: read says why
                            await call.write(batch)
                        ack = await call.read()  # in order: one batch in flight on this stream
                        if ack is grpc.aio.EOF:
                            raise StreamClosed("the coordinator closed the report stream")
                        self._acknowledged(batch, ack)
                await self._wake_report.wait()
                self._wake_report.clear()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("%s: the coordinator has no report stream; reporting by calls", self.engine.instance_id)
        finally:
            call.cancel()
        while True:  # a coordinator without the stream
            self._batch()
            await self._send_unacked(stub)
            await self._wake_report.wait()
            self._wake_report.clear()

    async def _flush_reports(self, stub: pb_grpc.InstancesStub) -> None:
        self._batch()
        await self._send_unacked(stub)

    def _replay(self, kept: list[tuple[str, int]]) -> None:
        """After a (re)registration: for each request the coordinator kept here, its whole output
        so far, then what is still unreported of its end; reports for other requests are dropped
        (the coordinator abandoned them)."""
        keep = set(kept)
        pending = [ev for batch in self._unacked for ev in batch.events] + self._events
        replay: list[pb.RequestEvent] = []
        for key in kept:
            replay += self._outputs.get(key, [])
        replay += [
            ev for ev in pending if ev.kind != pb.RequestEvent.TOKENS and (ev.request_id, ev.attempt) in keep
        ]
        self._outputs = {k: v for k, v in self._outputs.items() if k in keep}  # the rest were abandoned
        self._unacked.clear()
        self._events = replay

    def _held(self) -> list[pb.HeldRequest]:
        """What the engine still runs, and what it finished while the coordinator was away (the
        finish is still to be reported): the coordinator keeps both here, not serving them twice."""
        held = {(h.request_id, h.attempt) for h in self.engine.held()}
        events = [ev for batch in self._unacked for ev in batch.events] + self._events
        held |= {(ev.request_id, ev.attempt) for ev in events if ev.kind == pb.RequestEvent.FINISHED}
        return [pb.HeldRequest(request_id=r, attempt=a) for r, a in sorted(held)]

    @property
    def pending_events(self) -> int:
        return len(self._events) + sum(len(b.events) for b in self._unacked)


class SessionLost(Exception):
    """The coordinator forgot this session (it restarted, or declared the instance lost)."""


class StreamClosed(SessionLost):
    """The coordinator ended one of the session's streams itself (it stops, or drained the
    session): the agent reconnects, as after any loss."""


def _brief(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
