"""The coordinator's control plane against agents that speak the real protocol on loopback: how
big the pull stream's messages get, what a re-registration keeps and gives back, one instance id
held by one agent at a time, forwarded requests whose engine dies or stalls, and malformed progress.
The promise each test holds the coordinator to: an accepted request is served exactly once, never
dropped, never waits for ever."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from qlm_plugin.coordinator import grpc_api
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc
from qlm_plugin.testing.stack import LocalStack, run_with_stack
from qlm_plugin.transport.agent import InstanceAgent
from qlm_plugin.transport.client import CoordinatorClient

MODEL = "llama-3.1-8b"
Event = pb.RequestEvent

run = run_with_stack


class FakeAgent:
    """An agent that does what a test tells it, over the real protocol: it registers, pulls (and
    keeps what it is sent), heartbeats and reports; it serves nothing by itself."""

    def __init__(self, target: str, instance_id: str = "fake-0", *, agent_id: str = "", endpoint: str = ""):
        self.instance_id, self.agent_id, self.endpoint = instance_id, agent_id, endpoint
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.InstancesStub(self.channel)  # type: ignore[no-untyped-call]  # generated stub
        self.session = ""
        self.assignments: list[pb.Assignment] = []
        self.batches: list[tuple[int, int]] = []  # (assignments, bytes) of each pull message
        self.commands: list[pb.Command] = []
        self.seq = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def register(self, held: Sequence[tuple[str, int]] = ()) -> pb.RegisterReply:
        state = pb.StateReport(models_loaded=[MODEL], max_num_seqs=64, kv_blocks_total=30_000)
        reply: pb.RegisterReply = await self.stub.Register(
            pb.RegisterRequest(
                instance_id=self.instance_id,
                backend="fake",
                gpu="h100",
                state=state,
                endpoint=self.endpoint,
                agent_id=self.agent_id,
                held=[pb.HeldRequest(request_id=r, attempt=a) for r, a in held],
            ),
            timeout=5,
        )
        self.session = reply.session
        return reply

    async def start(self, coord: Any) -> None:
        """Open the pull and command streams and heartbeat, until :meth:`stop`."""
        session = self.session

        async def credits() -> AsyncIterator[pb.PullCredit]:
            while True:  # periodic, as the real agent's (a queue manager dispatches on credits)
                yield pb.PullCredit(session=session, free_slots=64, received=len(self.assignments))
                await asyncio.sleep(0.2)

        async def acks() -> AsyncIterator[pb.CommandAck]:
            yield pb.CommandAck(session=session)
            await asyncio.Event().wait()

        async def pull() -> None:
            async for batch in self.stub.PullBatches(credits()):
                self.batches.append((len(batch.assignments), batch.ByteSize()))
                self.assignments.extend(batch.assignments)

        async def commands() -> None:
            async for cmd in self.stub.Commands(acks()):
                self.commands.append(cmd)

        async def heartbeats() -> None:
            while True:
                await self.stub.Heartbeat(
                    pb.StateReport(session=session, models_loaded=[MODEL], max_num_seqs=64), timeout=5
                )
                await asyncio.sleep(0.2)

        self._tasks = [asyncio.create_task(f()) for f in (pull, commands, heartbeats)]
        s = coord.registry.session(session)
        while s is not None and not s.pull_open:  # the coordinator sends work once it is open
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []

    async def report(self, *events: pb.RequestEvent) -> pb.ReportAck:
        self.seq += 1
        batch = pb.EventBatch(session=self.session, seq=self.seq, events=list(events))
        ack: pb.ReportAck = await self.stub.Report(batch, timeout=5)
        return ack

    async def close(self) -> None:
        await self.stop()
        await self.channel.close()


def tokens(rid: str, attempt: int, index: int, n: int, text: str) -> pb.RequestEvent:
    return Event(request_id=rid, attempt=attempt, kind=Event.TOKENS, index=index, tokens=n, text=text)


def finished(rid: str, attempt: int) -> pb.RequestEvent:
    return Event(request_id=rid, attempt=attempt, kind=Event.FINISHED, finish_reason="length")


async def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def submit(st: LocalStack, n: int = 1, **kw: Any) -> list[str]:
    kw.setdefault("max_tokens", 8)
    async with CoordinatorClient(st.grpc_target) as c:
        replies = await c.submit_batch([pb.RequestSpec(model=MODEL, prompt="x", **kw) for _ in range(n)])
    assert all(r.accepted for r in replies)
    return [r.request_id for r in replies]


# ------------------------------------------------------------------------------- the pull stream


def test_a_burst_of_long_prompts_reaches_the_instance_in_messages_it_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120 chat requests of ~45 KB dispatched together (fcfs) made one pull message of 10 MB, over
    the agent's 4 MiB limit: refused at every reconnect, every request failed. Now at most
    ``MAX_BATCH_BYTES`` a message, and served once each."""
    sizes: list[int] = []
    pull = grpc_api.InstancesService.PullBatches

    async def spy(self: Any, it: Any, ctx: Any) -> AsyncIterator[pb.AssignmentBatch]:
        async for b in pull(self, it, ctx):
            sizes.append(b.ByteSize())
            yield b

    async def body(st: LocalStack) -> None:
        content = "word " * 9000
        messages = json.dumps([{"role": "user", "content": content}])
        spec = pb.RequestSpec(
            model=MODEL, prompt=content, chat_messages=messages, operation="chat", max_tokens=4
        )
        async with CoordinatorClient(st.grpc_target, timeout_s=60) as c:
            replies = await c.submit_batch([spec] * 120)
            ids = [r.request_id for r in replies if r.accepted]
            assert len(ids) == 120
            jobs = st.coordinator.jobs
            await until(lambda: all(jobs[i].state == "finished" for i in ids), 60)
        assert all(jobs[i].attempt == 1 for i in ids)
        assert st.instances["sim-0"].agent.sessions_started == 1
        assert len(sizes) > 1 and max(sizes) <= grpc_api.MAX_BATCH_BYTES + 1024, sizes

    monkeypatch.setattr(grpc_api.InstancesService, "PullBatches", spy)
    run(tmp_path, body, instances=1, speed=50.0, config={"policy": "fcfs"})


def test_a_pull_message_is_capped_in_bytes_and_an_assignment_over_the_cap_goes_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_api, "MAX_BATCH_BYTES", 3000)

    async def body(st: LocalStack) -> None:
        a = FakeAgent(st.grpc_target)
        await a.register()
        await a.start(st.coordinator)
        async with CoordinatorClient(st.grpc_target) as c:
            specs = [pb.RequestSpec(model=MODEL, prompt="p" * 1000, max_tokens=4) for _ in range(10)]
            specs.append(pb.RequestSpec(model=MODEL, prompt="q" * 5000, max_tokens=4))
            ids = [r.request_id for r in await c.submit_batch(specs)]
        await until(lambda: len(a.assignments) == 11)
        await a.close()
        assert sorted(x.request.request_id for x in a.assignments) == sorted(ids)  # each once
        assert all(size <= 3000 or n == 1 for n, size in a.batches), a.batches
        assert any(n > 1 for n, _ in a.batches), a.batches  # still together, up to the cap
        big = next(x.request.request_id for x in a.assignments if x.request.prompt.startswith("q"))
        assert big == ids[-1]

    run(tmp_path, body, instances=0)


# ------------------------------------------------------------------------------- registrations


def test_an_agent_whose_session_was_up_retries_at_once_after_a_coordinator_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reconnect backoff starts over once a session was up: after one long outage an agent
    kept the outage's backoff (5 s) for every later one, so a restarted coordinator's instances
    came back seconds late."""
    from qlm_plugin.coordinator.config import Listen
    from qlm_plugin.coordinator.server import CoordinatorServer
    from qlm_plugin.deploy.child_process import free_port

    port = free_port()

    async def body(st: LocalStack) -> None:
        agent = st.instances["sim-0"].agent
        server = st.server
        for outage_s in (2.0, 0.0):  # a long outage (the backoff grows to 1.6 s), then a blip
            sessions = agent.sessions_started
            caplog.clear()
            await server.stop(drain_timeout_s=0)
            await asyncio.sleep(outage_s)
            server = CoordinatorServer(st.server.cfg, st.server.scenario, env={}, warn=lambda _m: None)
            await server.start()
            await until(lambda: agent.sessions_started > sessions, timeout_s=15)  # noqa: B023 - awaited here
        # the blip's first retry (it was 5 s: the long outage's backoff, doubled)
        retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
        assert retries and retries[0].endswith("retrying in 0.1 s"), retries
        await server.stop(drain_timeout_s=0)

    with caplog.at_level(logging.INFO, logger="qlm_plugin.transport.agent"):  # quick retries: INFO
        run(tmp_path, body, instances=1, config={"grpc": Listen(port=port)})


def test_a_request_held_with_another_attempt_on_reconnect_is_served_again(tmp_path: Path) -> None:
    """A re-registration that names an assigned request with another attempt: the instance is told
    to drop it, so the coordinator serves it again (it stayed dispatched for ever, on nobody)."""

    async def body(st: LocalStack) -> None:
        a = FakeAgent(st.grpc_target, agent_id="a")
        await a.register()
        await a.start(st.coordinator)
        [rid] = await submit(st)
        await until(lambda: len(a.assignments) == 1)
        assert a.assignments[0].attempt == 1
        await a.stop()  # a connection blip
        reply = await a.register(held=[(rid, 7)])
        assert not reply.keep and [(h.request_id, h.attempt) for h in reply.abandon] == [(rid, 7)]
        await a.start(st.coordinator)
        await until(lambda: len(a.assignments) == 2)
        job = st.coordinator.jobs[rid]
        assert a.assignments[1].attempt == 2 and job.attempt == 2 and job.instance == "fake-0"
        await a.report(tokens(rid, 2, 0, 8, "12345678"), finished(rid, 2))
        assert job.state == "finished" and job.text == "12345678"
        await a.close()

    run(tmp_path, body, instances=0)


def test_an_instance_keeps_its_session_against_a_second_live_agent_with_its_id(tmp_path: Path) -> None:
    """Two live agents with one instance id took the session from each other at every reconnect (39
    times in 10 s), each dropping the other's requests, which failed as "reconnected without it".
    The second is refused (ALREADY_EXISTS, saying why) while the first is live; the first agent
    reconnecting is not; once the first is gone, the second takes the id."""

    async def body(st: LocalStack) -> None:
        a = FakeAgent(st.grpc_target, "gpu-7", agent_id="a")
        b = FakeAgent(st.grpc_target, "gpu-7", agent_id="b")
        legacy = FakeAgent(st.grpc_target, "gpu-7")  # an older agent, which names itself not
        await a.register()
        await a.start(st.coordinator)
        ids = await submit(st, 3)
        await until(lambda: len(a.assignments) == 3)
        session = a.session
        for other in (b, legacy):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await other.register(held=[(ids[0], 1)])
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "'gpu-7' is connected already" in (refused.value.details() or "")
        live = st.coordinator.fleet.sessions["gpu-7"]
        assert live.id == session and live.alive and set(live.assigned) == set(ids)
        # the same agent reconnecting (its old streams not yet closed) keeps its requests
        reply = await a.register(held=[(r, 1) for r in ids])
        assert sorted(h.request_id for h in reply.keep) == sorted(ids) and not reply.abandon
        await a.start(st.coordinator)
        for r in ids:
            await a.report(tokens(r, 1, 0, 2, "ok"), finished(r, 1))
        assert all(st.coordinator.jobs[r].state == "finished" for r in ids)
        assert all(st.coordinator.jobs[r].attempt == 1 for r in ids)
        # the first agent's process ends: its streams close, and another may take the id at once
        await a.close()
        await until(lambda: not st.coordinator.fleet.sessions["gpu-7"].pull_open)
        await b.register()
        assert st.coordinator.fleet.sessions["gpu-7"].agent_id == "b"
        await b.close()
        await legacy.close()

    run(tmp_path, body, instances=0)


def test_a_second_agent_with_a_live_instances_id_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two real agents with one id (a copy-pasted config): the second keeps being refused, with an
    error that names the cause; the first serves every request once, without a reconnect."""
    caplog.set_level(logging.WARNING)

    async def body(st: LocalStack) -> None:
        first = st.instances["sim-0"]
        twin = InstanceAgent(st.settings, first.link)
        stop = asyncio.Event()
        task = asyncio.create_task(twin.run(stop))
        try:
            ids = await submit(st, 10, max_tokens=20)
            await until(lambda: all(st.coordinator.jobs[i].state == "finished" for i in ids), 30)
        finally:
            stop.set()
            await task
        assert twin.sessions_started == 0 and first.agent.sessions_started == 1
        assert all(st.coordinator.jobs[i].attempt == 1 for i in ids)

    run(tmp_path, body, instances=1, speed=20.0)
    refused = [r for r in caplog.records if "registration refused" in r.getMessage()]
    assert refused and any(r.name == "qlm_plugin.coordinator" for r in refused)
    assert any(r.levelno == logging.ERROR and "ALREADY_EXISTS" in r.getMessage() for r in refused)


def test_sessions_are_found_by_id_without_a_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every heartbeat and report looks its session up: by a dict, not a walk over the fleet (92 us
    a lookup at 5,000 instances); a replaced or lost session is not found."""

    async def body(st: LocalStack) -> None:
        reg, fleet = st.coordinator.registry, st.coordinator.fleet
        a = FakeAgent(st.grpc_target, agent_id="a")
        old = (await a.register()).session
        new = (await a.register()).session
        assert reg.session(old) is None

        class NoScan(dict[str, Any]):
            def values(self) -> Any:
                raise AssertionError("a scan of the sessions")

            def items(self) -> Any:
                raise AssertionError("a scan of the sessions")

            def __iter__(self) -> Any:
                raise AssertionError("a scan of the sessions")

        with monkeypatch.context() as m:
            m.setattr(fleet, "sessions", NoScan(fleet.sessions))
            s = reg.session(new)
            assert s is not None and s.instance_id == "fake-0"
            assert reg.heartbeat(pb.StateReport(session=new, models_loaded=[MODEL]))
        reg.lost(s, "test")
        assert reg.session(new) is None
        await a.close()

    run(tmp_path, body, instances=0)


def test_a_request_held_with_another_attempt_by_an_instance_that_then_dies_is_served_elsewhere(
    tmp_path: Path,
) -> None:
    async def body(st: LocalStack) -> None:
        a = FakeAgent(st.grpc_target, agent_id="a")
        await a.register()
        await a.start(st.coordinator)
        [rid] = await submit(st)
        await until(lambda: len(a.assignments) == 1)
        await a.stop()
        await a.register(held=[(rid, 0)])
        await a.close()  # and it dies for good
        b = FakeAgent(st.grpc_target, "fake-1", agent_id="b")
        await b.register()
        await b.start(st.coordinator)
        await until(lambda: len(b.assignments) == 1)
        job = st.coordinator.jobs[rid]
        assert job.instance == "fake-1" and job.attempt == b.assignments[0].attempt
        await b.report(tokens(rid, job.attempt, 0, 8, "12345678"), finished(rid, job.attempt))
        assert job.state == "finished"
        await b.close()

    run(tmp_path, body, instances=0)


# ------------------------------------------------------------------------------- malformed progress


def test_malformed_progress_fails_the_attempt_or_is_capped_never_closes_a_request_short(
    tmp_path: Path,
) -> None:
    """A gap in the output (a FINISHED after it closed the request truncated, as finished) and a
    count of tokens <= 0 with text fail the attempt: the engine is told to drop it, and the request
    resumes after what was delivered. Tokens past max_tokens are capped."""

    async def body(st: LocalStack) -> None:
        a = FakeAgent(st.grpc_target, agent_id="a")
        await a.register()
        await a.start(st.coordinator)
        gap, negative, zero, huge = ids = await submit(st, 4)
        await until(lambda: len(a.assignments) == 4)
        jobs = st.coordinator.jobs
        await a.report(tokens(gap, 1, 0, 2, "ab"), tokens(gap, 1, 5, 3, "fgh"), finished(gap, 1))
        await a.report(tokens(negative, 1, 0, -3, "neg"), finished(negative, 1))
        await a.report(tokens(zero, 1, 0, 0, "zero"), finished(zero, 1))
        await a.report(tokens(huge, 1, 0, 10**6, "huge"), finished(huge, 1))
        assert jobs[huge].state == "finished" and jobs[huge].tokens == 8
        # the others: served again (here, on the only instance), after what was delivered
        await until(lambda: len(a.assignments) == 7)
        again = {x.request.request_id: x for x in a.assignments[4:]}
        assert set(again) == {gap, negative, zero}
        assert again[gap].attempt == 2 and again[gap].resume_tokens == 2 and again[gap].resume_text == "ab"
        for r in (negative, zero):
            assert again[r].resume_tokens == 0 and jobs[r].text == ""
        await until(lambda: len(a.commands) >= 3)
        aborted = {(c.abort.request_id, c.abort.attempt) for c in a.commands if c.HasField("abort")}
        assert aborted == {(gap, 1), (negative, 1), (zero, 1)}
        await a.report(tokens(gap, 2, 2, 6, "cdefgh"), finished(gap, 2))
        assert jobs[gap].state == "finished" and jobs[gap].text == "abcdefgh" and jobs[gap].tokens == 8
        assert [jobs[r].state for r in ids] == ["finished", "dispatched", "dispatched", "finished"]
        await a.close()

    run(tmp_path, body, instances=0)


# ------------------------------------------------------------------------------- forwarded requests


@contextlib.asynccontextmanager
async def engine_server(stream: Callable[[web.StreamResponse, web.Request], Any]) -> AsyncIterator[Any]:
    """An engine's OpenAI server on loopback: ``stream(resp, request)`` writes each completion's
    stream; yields (its URL, a dict whose "healthy" its health check answers)."""
    health = {"healthy": True}

    async def check(request: web.Request) -> web.Response:
        return web.Response(status=200 if health["healthy"] else 503)

    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await stream(resp, request)
        return resp

    app = web.Application()
    app.router.add_get("/health", check)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", health
    finally:
        await runner.cleanup()


def sse(choice: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, **choice}]}).encode() + b"\n\n"


def test_a_forwarded_request_whose_agent_registered_again_is_served_again_when_its_engine_dies(
    tmp_path: Path,
) -> None:
    """An engine served over HTTP: its agent re-registers mid-stream (a blip), then the engine's
    server dies. The forward reported the old session lost, which the registry ignored as stale:
    the request stayed dispatched for ever. Now the engine is drained and the request resumes on
    another engine after what was delivered."""

    async def body(st: LocalStack) -> None:
        die = asyncio.Event()
        prompts: list[str] = []

        async def dying(resp: web.StreamResponse, request: web.Request) -> None:
            await resp.write(sse({"text": "hi", "token_ids": [5]}))
            await die.wait()
            health["healthy"] = False
            assert request.transport is not None
            request.transport.close()  # the server process dies mid-stream

        async def finishing(resp: web.StreamResponse, request: web.Request) -> None:
            prompts.append((await request.json())["prompt"])
            await resp.write(sse({"text": " there", "token_ids": [6], "finish_reason": "length"}))
            await resp.write(b"data: [DONE]\n\n")

        async with engine_server(dying) as (url, health), engine_server(finishing) as (url2, _):
            a = FakeAgent(st.grpc_target, "vllm-0", agent_id="a", endpoint=url)
            await a.register()
            await a.start(st.coordinator)
            [rid] = await submit(st, max_tokens=2)
            job = st.coordinator.jobs[rid]
            await until(lambda: job.tokens == 1)
            await a.stop()
            reply = await a.register()  # requests come over HTTP: the agent holds none
            assert [h.request_id for h in reply.keep] == [rid]  # the stream outlives the session
            await a.start(st.coordinator)
            die.set()
            await until(lambda: job.state == "queued")
            assert "vllm-0" not in st.coordinator.fleet.sessions  # drained: its engine is gone
            b = FakeAgent(st.grpc_target, "vllm-1", agent_id="b", endpoint=url2)
            await b.register()
            await b.start(st.coordinator)
            await until(lambda: job.state == "finished")
            assert job.text == "hi there" and job.attempt == 2 and job.instance == "vllm-1"
            assert prompts == ["xhi"]
            await a.close()
            await b.close()

    run(tmp_path, body, instances=0)


def test_each_stale_attempt_is_aborted_once_and_forgotten_once_it_ends(tmp_path: Path) -> None:
    """Stale progress of a request got the instance one abort, per request id for the session's
    life: a later stale attempt of the same request was never aborted (the engine kept working on
    it for nothing), and the set only grew. Each stale attempt is now aborted once, and forgotten
    when the instance reports it ended."""

    async def body(st: LocalStack) -> None:
        async with CoordinatorClient(st.grpc_target) as c:
            rid = (await c.submit(pb.RequestSpec(model=MODEL, prompt="x", max_tokens=2000))).request_id
            job = st.coordinator.jobs[rid]
            while job.state != "dispatched":
                await asyncio.sleep(0.01)
            s = st.coordinator.fleet.sessions[job.instance or ""]
            aborts: list[tuple[str | None, int]] = []
            command = st.coordinator.fleet.command

            def spy(session: Any, op: str, request_id: str | None = None, *a: Any, **kw: Any) -> str:
                if op == "abort":
                    aborts.append((request_id, kw.get("attempt", 0)))
                return command(session, op, request_id, *a, **kw)

            st.coordinator.fleet.command = spy  # type: ignore[method-assign]
            dispatcher = st.coordinator.dispatcher

            def progress(attempt: int, kind: int = pb.RequestEvent.TOKENS) -> None:
                ev = pb.RequestEvent(request_id=rid, attempt=attempt, kind=kind, index=0, text="a", tokens=1)
                dispatcher.apply_events(s, pb.EventBatch(events=[ev]))

            stale = job.attempt + 7
            progress(stale)
            progress(stale)
            assert aborts == [(rid, stale)]
            progress(stale + 1)  # another stale attempt of the same request
            assert aborts == [(rid, stale), (rid, stale + 1)]
            progress(stale, pb.RequestEvent.FINISHED)
            progress(stale + 1, pb.RequestEvent.REQUEUED)
            assert s.pending_aborts == set()
            await c.cancel(rid)

    run_with_stack(tmp_path, body, instances=1)
