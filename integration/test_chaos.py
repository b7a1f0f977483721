"""The standing chaos test: a replay of a few thousand requests through a coordinator process to
engines running as processes, while a seeded schedule kills (SIGKILL) the coordinator, simulated
instance processes, black-box agents and the OpenAI-compatible servers behind them, several times
each, and starts them again after a short random delay.

The parts, every one a process of its own started with this interpreter, on loopback:

- the coordinator (``qlm coordinator``), restarted on the same journal and ports;
- two simulated instances (``qlm instance --backend sim``, engine and agent in one process), with
  ``QLM_SIM_RECORD``: each completed generation is a line ``request_id attempt instance_id``;
- two OpenAI-compatible servers (``qlm_plugin.testing.openai_stub``, the simulator's text, with a
  record of the same form) each behind a black-box agent (``qlm instance --backend openai``): the
  agent is killed on its own (the server keeps running; the streams of the dead agent close, which
  aborts them), and so is the server.

Clients: the replay's requests (interactive with a generous TTFT SLO, and batch; 5 to 40 output
tokens, exactly, through ``true_output_tokens``) arrive over the run through gRPC ``SubmitBatch``
and through HTTP streaming completions, every one with an idempotency key: a client that does not
know whether its submission was accepted (the coordinator died meanwhile) sends it again with the
same key, and learns the one request id. Accepted means the client holds a request id.

**Answered exactly once to its client.** The HTTP clients, and a sample of the gRPC ones that follow
their output with ``Stream``, record every chunk of every connection. A connection reads the output
from its start (position 0); one that breaks (the coordinator died: the connection is lost, or, with
front-door workers, ``QLM_HTTP_WORKERS``, the worker answers ``unavailable``, the request kept) is
followed by a new one (the HTTP client sends its request again with the same key, which answers the
same request from its start; the gRPC client calls ``Stream`` again). The client received its answer
exactly once when, on every connection, each chunk starts where the one before ended and carries
exactly the expected tokens there (no position twice, none skipped, nothing else: two connections
agree on every position), exactly one connection, the last, delivers the end of the answer at its
full length (with the usage it reports), and every earlier connection broke off at a kill of the
coordinator (:func:`qlm_plugin.testing.chaos.judge_answer`).

At the end every accepted request is ``finished`` with ``output == synthetic_text(id, 0, n)`` and
``output_tokens == n``; the journal holds one row per accepted request and no other; and the
engines' records show no request generated twice unless a kill explains it
(:func:`qlm_plugin.testing.chaos.explain_generations`: the generating process, its agent, its
server or the coordinator was killed between the first generation and the time its report could
have been journaled). Printed per seed: accepted, completed, lost, duplicated to clients, duplicate
generations and what explained them, kills by kind, wall time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.chaos import (
    Child,
    Clock,
    Connection,
    Explanation,
    Generation,
    Kill,
    PlannedKill,
    RecordTailer,
    Verdict,
    explain_generations,
    judge_answer,
    plan_kills,
    words,
)
from qlm_plugin.transport.client import CoordinatorClient

MODEL = "llama-3.1-8b"
# QLM_CHAOS_SEEDS=4,5,6 and QLM_CHAOS_REQUESTS=N run other seeds, or more requests (a longer soak).
SEEDS = tuple(int(s) for s in os.environ.get("QLM_CHAOS_SEEDS", "1").split(","))
REQUESTS = int(os.environ.get("QLM_CHAOS_REQUESTS", "2500"))  # per seed
REPLAY_S = 24.0  # arrivals spread over this long
KILL_WINDOW = (1.0, REPLAY_S - 1.0)  # from the start of the replay
# per seed; QLM_CHAOS_KILLS=coordinator=3,sim=3,agent=3,stub=0 narrows a failure down to kinds
KILLS = {
    kind: int(count)
    for kind, count in (
        part.split("=")
        for part in os.environ.get("QLM_CHAOS_KILLS", "coordinator=3,sim=3,agent=3,stub=2").split(",")
    )
}
RESTART_AFTER = (0.2, 1.5)
SETTLE_S = 120.0  # after the replay: every request must be done by then (a slow machine)
HTTP_SHARE, FOLLOW_SHARE = 0.25, 0.25  # HTTP streaming clients; gRPC clients that follow with Stream
INTERACTIVE_SHARE, INTERACTIVE_TTFT_MS = 0.4, 60_000.0
RETRY_S = 0.25  # a client's pause before it tries again

# The default max_attempts (3): a dispatch to an engine whose server is down is given back without
# counting, so only kills of the engine serving a request count.
# heartbeat_timeout_s: long, since every killed process starts again within seconds and registers
# anew, which sends back what its old session held at once; a short timeout would only drain
# instances that a busy machine starves (their work then generated twice, and no kill explains it).
CONFIG = """
heartbeat_interval_s: 0.25
heartbeat_timeout_s: 10.0
recovery_grace_s: 8.0
drain_timeout_s: 5.0
"""
SIMS = {"sim-a": "sim-a-0", "sim-b": "sim-b-0"}  # process name -> instance id (--name NAME: NAME-0)
STUBS = {"stub-0": "bb-0", "stub-1": "bb-1"}  # server -> the black-box agent in front of it


# ------------------------------------------------------------------------------------- the replay
@dataclass(frozen=True, slots=True)
class Item:
    key: str  # idempotency key
    at: float  # arrival, seconds from the start of the replay
    channel: str  # "grpc" | "grpc+stream" | "http"
    slo_class: str
    prompt: str
    max_tokens: int
    n: int  # the tokens it generates (true_output_tokens)

    def spec(self) -> pb.RequestSpec:
        spec = pb.RequestSpec(
            model=MODEL,
            prompt=self.prompt,
            max_tokens=self.max_tokens,
            true_output_tokens=self.n,
            idempotency_key=self.key,
            slo=pb.SLO(slo_class=self.slo_class),
        )
        if self.slo_class == "interactive":
            spec.slo.ttft_ms = INTERACTIVE_TTFT_MS
        return spec

    def http_body(self) -> dict[str, Any]:
        ext: dict[str, Any] = {
            "class": self.slo_class,
            "idempotency_key": self.key,
            "true_output_tokens": self.n,
        }
        if self.slo_class == "interactive":
            ext["ttft_ms"] = INTERACTIVE_TTFT_MS
        return {
            "model": MODEL,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "qlm": ext,
        }


def make_replay(seed: int) -> list[Item]:
    rng = random.Random(f"replay-{seed}")
    items = []
    for i in range(REQUESTS):
        u = rng.random()
        channel = "http" if u < HTTP_SHARE else "grpc+stream" if u < HTTP_SHARE + FOLLOW_SHARE else "grpc"
        n = rng.randint(5, 40)
        items.append(
            Item(
                key=f"chaos-{seed}-{i}",
                at=rng.uniform(0, REPLAY_S),
                channel=channel,
                slo_class="interactive" if rng.random() < INTERACTIVE_SHARE else "batch",
                # ends in "q": never mistaken for delivered output by the stub's resume rule
                prompt=f"chaos {seed} request {i}: " + "q" * rng.randint(10, 300),
                max_tokens=n + rng.choice((0, 0, rng.randint(1, 8))),
                n=n,
            )
        )
    return sorted(items, key=lambda it: it.at)


# ---------------------------------------------------------------------------------------- the run
@dataclass
class View:
    """What one client saw of its request."""

    item: Item
    connections: list[Connection] = field(default_factory=list)


@dataclass
class Run:
    seed: int
    tmp: Path
    clock: Clock
    http_port: int
    grpc_port: int
    stub_ports: dict[str, int]
    children: dict[str, Child] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    replay_t0: float = 0.0
    deadline: float = float("inf")  # clients give up after this (run clock)
    rid_of: dict[str, str] = field(default_factory=dict)  # idempotency key -> request id
    conflicts: list[str] = field(default_factory=list)  # a key answered with two request ids
    refused: dict[str, str] = field(default_factory=dict)  # key -> why it was never accepted
    views: dict[str, View] = field(default_factory=dict)  # key -> what its client saw
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    clients: list[CoordinatorClient] = field(default_factory=list)
    snapshot: list[str] = field(default_factory=list)  # the admin views, when requests were stuck
    tailer: RecordTailer | None = None
    crashes: list[str] = field(default_factory=list)  # clients that failed on something unexpected

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def accept(self, key: str, rid: str) -> bool:
        """Note that ``key`` was accepted as ``rid``; True the first time."""
        known = self.rid_of.get(key)
        if known is None:
            self.rid_of[key] = rid
            return True
        if known != rid:
            self.conflicts.append(f"idempotency key {key}: request {known}, then {rid}")
        return False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a client that breaks is a finding too, not a lost task
                self.crashes.append(f"{type(exc).__name__}: {exc}")

        self.tasks.append(asyncio.get_running_loop().create_task(guarded()))

    def client(self) -> CoordinatorClient:
        """The current gRPC client (a fresh channel after a failure: no reconnect backoff)."""
        if not self.clients:
            self.clients.append(CoordinatorClient(self.target, timeout_s=10))
        return self.clients[-1]

    def client_failed(self, c: CoordinatorClient) -> None:
        if self.clients and self.clients[-1] is c:
            self.clients.append(CoordinatorClient(self.target, timeout_s=10))

    def coordinator_outage(self, t: float, slack_s: float = 2.0) -> bool:
        """Whether ``t`` falls in an outage of the coordinator (killed .. serving again + slack)."""
        for k in self.kills:
            if k.kind != "coordinator":
                continue
            up = k.ready_at or k.restarted_at
            if k.killed_at - 0.5 <= t <= (up if up is not None else float("inf")) + slack_s:
                return True
        return False


def _children(run: Run) -> dict[str, Child]:
    tmp, py = run.tmp, sys.executable
    out = {
        "coordinator": Child(
            "coordinator",
            "coordinator",
            [
                py, "-m", "qlm_plugin.cli", "coordinator",
                "--config", str(tmp / "config.yaml"),
                "--http-port", str(run.http_port),
                "--grpc-port", str(run.grpc_port),
                "--journal", str(tmp / "journal.db"),
            ],
            tmp / "coordinator.log",
        )
    }  # fmt: skip
    for name in SIMS:
        out[name] = Child(
            name,
            "sim",
            [
                py,
                "-m",
                "qlm_plugin.cli",
                "instance",
                "--coordinator",
                run.target,
                "--name",
                name,
                "--speed",
                "1",
            ],
            tmp / f"{name}.log",
            env={**os.environ, "QLM_SIM_RECORD": str(tmp / f"{name}.done")},
        )
    for stub, agent in STUBS.items():
        port = run.stub_ports[stub]
        out[stub] = Child(
            stub,
            "stub",
            [
                py, "-m", "qlm_plugin.testing.openai_stub",
                "--port", str(port),
                "--record", str(tmp / f"{stub}.done"),
                "--tokens-per-s", "100",
                "--max-num-seqs", "16",
                "--name", stub,
                "--model", MODEL,
            ],
            tmp / f"{stub}.log",
        )  # fmt: skip
        out[agent] = Child(
            agent,
            "agent",
            [
                py, "-m", "qlm_plugin.cli", "instance",
                "--backend", "openai",
                "--endpoint", f"http://127.0.0.1:{port}",
                "--model", MODEL,
                "--name", agent,
                "--coordinator", run.target,
            ],
            tmp / f"{agent}.log",
        )  # fmt: skip
    return out


#: How long after its agent died a server may still finish a generation that agent sent it: the
#: server notices the closed stream at its next write, on a slow machine late.
AGENT_LEAD_S = 3.0


def _lead(kill: Kill, g: Generation) -> float | None:
    """Whether a kill can have made generation ``g`` count for nothing (None: it cannot), and by
    how long it may precede the record of ``g`` (see :func:`explain_generations`)."""
    if kill.kind == "coordinator":
        return 0.0  # it died after the generation, before its report was journaled
    if kill.kind == "sim":
        return 0.0 if g.generator == SIMS[kill.target] else None
    if kill.kind == "stub":
        return 0.0 if g.generator == kill.target else None
    return AGENT_LEAD_S if kill.kind == "agent" and STUBS.get(g.generator) == kill.target else None


def _now_kill(run: Run, child: Child) -> float:
    t = run.clock.now()
    child.kill()
    return t


async def _instances(target: str) -> list[str] | None:
    try:
        async with CoordinatorClient(target, timeout_s=2) as c:
            return sorted(i.instance_id for i in (await c.instances()).instances)
    except grpc.aio.AioRpcError:
        return None


async def _wait(cond: Callable[[], Coroutine[Any, Any, bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.1)


async def _stub_healthy(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/health") as r:
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


# ---------------------------------------------------------------------------------------- clients
async def submit_grpc(run: Run, items: list[Item]) -> None:
    """One SubmitBatch of the items, sent again (same keys) until each is accepted or refused."""
    pending = items
    while pending:
        if run.clock.now() > run.deadline:
            for it in pending:
                run.refused[it.key] = "the client gave up: never accepted"
            return
        c = run.client()
        try:
            replies = await c.submit_batch([it.spec() for it in pending], timeout_s=10)
        except grpc.aio.AioRpcError:
            run.client_failed(c)
            await asyncio.sleep(RETRY_S)
            continue
        retry = []
        for it, r in zip(pending, replies, strict=True):
            if r.accepted:
                if run.accept(it.key, r.request_id) and it.channel == "grpc+stream":
                    run.spawn(follow_grpc(run, it, r.request_id))
            elif r.code == "unavailable":
                retry.append(it)
            else:
                run.refused[it.key] = f"refused: {r.code}: {r.reason}"
        pending = retry
        if pending:
            await asyncio.sleep(RETRY_S)


async def follow_grpc(run: Run, item: Item, rid: str) -> None:
    """Follow the output with Stream; after a break, Stream again (from the start)."""
    view = run.views[item.key] = View(item)
    while run.clock.now() < run.deadline:
        conn = Connection(opened_at=run.clock.now())
        view.connections.append(conn)
        c = run.client()
        try:
            async for chunk in c.stream(rid, timeout_s=max(1.0, run.deadline - run.clock.now())):
                if chunk.finished:
                    conn.finished, conn.finish_reason, conn.end_index = True, chunk.finish_reason, chunk.index
                    break
                conn.chunks.append((chunk.index, chunk.tokens, chunk.text))
        except grpc.aio.AioRpcError as exc:
            conn.error = f"transport: {exc.code().name}: {exc.details()}"
            run.client_failed(c)
        conn.closed_at = run.clock.now()
        if conn.finished:
            return
        await asyncio.sleep(RETRY_S)


async def http_client(run: Run, session: aiohttp.ClientSession, item: Item) -> None:
    """A streaming completion; after a break (or a refused connection), the same request again
    with the same idempotency key, which answers the same request from its start."""
    view = run.views[item.key] = View(item)
    url = f"http://127.0.0.1:{run.http_port}/v1/completions"
    body = item.http_body()
    while run.clock.now() < run.deadline:
        conn = Connection(opened_at=run.clock.now())
        try:
            async with session.post(url, json=body) as r:
                if r.status != 200:
                    text = await r.text()
                    if r.status == 503 and "unavailable" in text:  # starting: not accepting yet
                        await asyncio.sleep(RETRY_S)
                        continue
                    run.refused[item.key] = f"HTTP {r.status}: {text[:300]}"
                    return
                run.accept(item.key, r.headers["x-qlm-request-id"])
                view.connections.append(conn)
                done = False
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        # A front-door worker whose core died tells its clients that the request is
                        # kept and to send it again with its key: a break, as a lost connection is.
                        kept = payload["error"].get("code") == "unavailable"
                        conn.error = f"{'unavailable' if kept else 'answer'}: {payload['error']}"
                    if payload.get("usage"):
                        conn.usage_tokens = int(payload["usage"]["completion_tokens"])
                    for choice in payload.get("choices") or ():
                        text = choice.get("text") or ""
                        if text:
                            conn.chunks.append((None, len(words(text)), text))
                        if choice.get("finish_reason"):
                            conn.finish_reason = choice["finish_reason"]
                conn.finished = done and bool(conn.finish_reason) and not conn.error
                if not done and not conn.error:
                    conn.error = "transport: the stream ended without [DONE]"
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            if conn in view.connections:
                conn.error = f"transport: {type(exc).__name__}: {exc}"
        conn.closed_at = run.clock.now()
        if conn.finished or conn.error.startswith("answer:"):
            return
        await asyncio.sleep(RETRY_S)


async def replay(run: Run, items: list[Item], session: aiohttp.ClientSession) -> None:
    i = 0
    while i < len(items):
        now = run.clock.now() - run.replay_t0
        due = []
        while i < len(items) and items[i].at <= now:
            due.append(items[i])
            i += 1
        batch = [it for it in due if it.channel != "http"]
        if batch:
            run.spawn(submit_grpc(run, batch))
        for it in due:
            if it.channel == "http":
                run.spawn(http_client(run, session, it))
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------------------ kills
async def execute_kills(run: Run, plan: list[PlannedKill], session: aiohttp.ClientSession) -> None:
    locks = {name: asyncio.Lock() for name in run.children}

    async def ready(k: Kill) -> None:
        """Hold the target until it serves again (a second kill of it waits for that)."""
        if k.kind == "coordinator":

            async def up() -> bool:
                return await _instances(run.target) is not None

            await _wait(up, 90, "the restarted coordinator")
            k.ready_at = run.clock.now()
        elif k.kind == "stub":
            port = run.stub_ports[k.target]

            async def healthy() -> bool:
                return await _stub_healthy(session, port)

            await _wait(healthy, 90, f"the restarted {k.target}")
            k.ready_at = run.clock.now()
        else:
            await asyncio.sleep(1.0)  # it registers once the coordinator is up; nothing to hold

    async def one(pk: PlannedKill) -> None:
        await asyncio.sleep(max(0.0, run.replay_t0 + pk.at - run.clock.now()))
        async with locks[pk.target]:
            child = run.children[pk.target]
            pid = child.pid
            # Records written before the kill are dated no later than it, those after it later.
            at = run.tailer.around(child.kill) if run.tailer is not None else _now_kill(run, child)
            k = Kill(pk.kind, pk.target, pk.at, at, pid)
            run.kills.append(k)
            await asyncio.sleep(pk.restart_after)
            child.start(run.clock)
            k.restarted_at = run.clock.now()
            await ready(k)

    await asyncio.gather(*(one(pk) for pk in plan))


# --------------------------------------------------------------------------------------- the checks
async def statuses(run: Run, rids: list[str]) -> dict[str, pb.RequestStatus | None]:
    """Each request's status; None where the call failed (NOT_FOUND: state "unknown")."""
    out: dict[str, pb.RequestStatus | None] = {}
    sem = asyncio.Semaphore(64)
    async with CoordinatorClient(run.target, timeout_s=10) as c:

        async def one(rid: str) -> None:
            async with sem:
                try:
                    out[rid] = await c.status(rid)
                except grpc.aio.AioRpcError as exc:
                    lost = exc.code() == grpc.StatusCode.NOT_FOUND
                    out[rid] = (
                        pb.RequestStatus(request_id=rid, state="unknown", error=str(exc.details()))
                        if lost
                        else None
                    )

        await asyncio.gather(*(one(r) for r in rids))
    return out


async def _snapshot(target: str) -> list[str]:
    """The coordinator's queue and instances, as the admin API shows them."""
    try:
        async with CoordinatorClient(target, timeout_s=10) as c:
            queue, instances = await c.queue(limit=20), await c.instances()
    except grpc.aio.AioRpcError as exc:
        return [f"admin API: {exc.code().name}: {exc.details()}"]
    out = [f"queue: {queue.queued} queued, {queue.dispatched} dispatched"]
    out += [
        f"  {r.request_id} {r.state} on {r.instance_id or '-'} age {r.age_s:.1f} s class {r.slo_class}"
        for r in queue.requests
    ]
    out += [
        f"instance {i.instance_id}: healthy {i.healthy}, dispatched {i.dispatched}, running "
        f"{i.state.num_running}, waiting {i.state.num_waiting}, heartbeat {i.last_heartbeat_age_s:.1f} s ago"
        for i in instances.instances
    ]
    return out


def _evidence(run: Run, rids: list[str], gens: list[Generation], lines: int = 12) -> list[str]:
    """For each request: its engine records, and the log lines that name it."""
    out = []
    logs = {name: c.log for name, c in run.children.items()}
    for rid in rids:
        mine = [(g.generator, g.attempt, round(g.seen_at, 2)) for g in gens if g.request_id == rid]
        out.append(f"  {rid}: generations (engine, attempt, seen at) {mine}")
        for name, path in logs.items():
            with contextlib.suppress(OSError):
                hits = [ln for ln in path.read_text(errors="replace").splitlines() if rid in ln]
                out += [f"    {name}: {ln[:300]}" for ln in hits[:lines]]
    return out


def _journal_rows(path: Path) -> list[tuple[str, str | None, str, int, str]]:
    """(request id, idempotency key, state, attempt, error) of every row of the journal."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT request_id, idempotency_key, state, attempt, error FROM jobs"))
    finally:
        conn.close()


@dataclass
class Outcome:
    lines: list[str]
    failures: list[str]


def check(
    run: Run,
    items: list[Item],
    final: Mapping[str, pb.RequestStatus | None],
    gens: list[Generation],
    malformed: list[str],
    journal: list[tuple[str, str | None, str, int, str]],
    wall_s: float,
) -> Outcome:
    failures: list[str] = []
    by_key = {it.key: it for it in items}
    accepted = {rid: key for key, rid in run.rid_of.items()}
    completed: list[str] = []
    lost: list[str] = []
    for rid, key in accepted.items():
        st, n = final.get(rid), by_key[key].n
        ok = (
            st is not None
            and st.state == "finished"
            and st.output == synthetic_text(rid, 0, n)
            and st.output_tokens == n
        )
        (completed if ok else lost).append(rid)

    # Clients
    def explained(conn: Connection) -> bool:
        broke = conn.error.startswith(("transport:", "unavailable:"))
        return broke and run.coordinator_outage(conn.closed_at)

    verdicts: dict[str, Verdict] = {}
    for key, view in run.views.items():
        known = run.rid_of.get(key)
        if known is not None:
            expected = words(synthetic_text(known, 0, view.item.n))
            verdicts[key] = judge_answer(expected, view.connections, explained)
    dup_clients = [k for k, v in verdicts.items() if v.duplicated]
    not_once = [k for k, v in verdicts.items() if not v.answered_once]
    reconnected = sum(len(v.connections) > 1 for v in run.views.values())
    # Engines
    expl = explain_generations(gens, run.kills, _lead)
    unexplained = [e for e in expl if e.kill is None]
    by_kind = collections.Counter(e.kill.kind for e in expl if e.kill is not None)
    unknown_gens = sorted({g.request_id for g in gens} - set(accepted))
    # Journal
    rows = {r[0]: r for r in journal}
    # A submission refused after it waited for an instance is journaled as failed, without its key
    # (the client submits it again): not an accepted request. Any other row must be one.
    refusals = [r for rid, r in rows.items() if rid not in accepted and r[2] == "failed" and r[1] is None]
    extra_rows = sorted(set(rows) - set(accepted) - {r[0] for r in refusals})
    missing_rows = sorted(set(accepted) - set(rows))
    kills = collections.Counter(k.kind for k in run.kills)

    lines = [
        f"seed {run.seed}: accepted {len(accepted)}, completed {len(completed)}, lost {len(lost)}, "
        f"duplicated to clients {len(dup_clients)} (of {len(verdicts)} followed, {reconnected} reconnected), "
        f"duplicate generations {len(expl)} (explained: "
        + (", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())) or "none")
        + f"; unexplained {len(unexplained)}), kills "
        + ", ".join(f"{k} {kills[k]}" for k in sorted(KILLS))
        + f", wall {wall_s:.0f} s"
        + (f"; {len(refusals)} refused while no instance served (sent again)" if refusals else ""),
        "  kills: "
        + "; ".join(
            f"{k.kind} {k.target} at {k.killed_at:.2f}s ({run.clock.wall(k.killed_at)}) "
            f"restarted {k.restarted_at or 0:.2f}s" + (f" ready {k.ready_at:.2f}s" if k.ready_at else "")
            for k in sorted(run.kills, key=lambda k: k.killed_at)
        ),
    ]
    log_errors = {name: _log_errors(c.log) for name, c in run.children.items()}
    if any(log_errors.values()):  # reported, not asserted: the counts above are the verdict
        lines.append(
            "  ERROR lines in the logs: " + ", ".join(f"{n} {c}" for n, c in log_errors.items() if c)
        )
    attempts = collections.Counter(r[3] for r in journal if r[0] in accepted)
    lines.append(
        "  dispatches per request (journal): " + ", ".join(f"{a}: {c}" for a, c in sorted(attempts.items()))
    )
    lines += [f"  generated again: {_describe(e)}" for e in expl if e.kill is not None][:30]
    if len(accepted) != len(items):
        failures.append(
            f"{len(items) - len(accepted)} of {len(items)} requests never accepted: "
            + "; ".join(f"{k}: {why}" for k, why in list(run.refused.items())[:10])
        )
    if run.crashes:
        failures.append(f"{len(run.crashes)} clients failed: " + "; ".join(run.crashes[:5]))
    if run.conflicts:
        failures.append("one idempotency key, two requests: " + "; ".join(run.conflicts[:10]))
    if lost:
        detail = []
        for rid in lost[:10]:
            st = final.get(rid)
            n = by_key[accepted[rid]].n
            if st is None:
                detail.append(f"{rid}: no status")
            else:
                text_ok = st.output == synthetic_text(rid, 0, st.output_tokens)
                detail.append(
                    f"{rid}: {st.state} on {st.instance_id or '-'} attempt {st.attempt}, "
                    f"{st.output_tokens} of {n} tokens, output {'ok' if text_ok else 'WRONG'}"
                    f"{' (' + st.error + ')' if st.error else ''}; journal {rows.get(rid)}"
                )
        failures.append(f"{len(lost)} accepted requests not answered in full:\n  " + "\n  ".join(detail))
        failures += run.snapshot
        failures += _evidence(run, lost[:3], gens)
    if not_once:
        detail = [
            f"{run.rid_of[k]} ({run.views[k].item.channel}, {len(run.views[k].connections)} connections): "
            + "; ".join(verdicts[k].problems[:4])
            for k in not_once[:10]
        ]
        failures.append(f"{len(not_once)} clients not answered exactly once:\n  " + "\n  ".join(detail))
    if unexplained:
        detail = [_describe(e) for e in unexplained[:10]]
        failures.append(
            f"{len(unexplained)} generations done again with no kill to explain it:\n  " + "\n  ".join(detail)
        )
        failures += _evidence(run, [e.wasted.request_id for e in unexplained[:3]], gens)
    if unknown_gens:
        failures.append(f"engines generated requests nobody accepted: {unknown_gens[:10]}")
    if malformed:
        failures.append(f"malformed record lines: {malformed[:10]}")
    if extra_rows or missing_rows:
        failures.append(
            f"journal rows not accepted: {extra_rows[:10]}; accepted, not journaled: {missing_rows[:10]}"
        )
    unfinished_rows = [r for r in journal if r[0] in accepted and r[2] != "finished"]
    if unfinished_rows:
        failures.append(
            f"{len(unfinished_rows)} accepted requests not finished in the journal: "
            + ", ".join(f"{r[0]} {r[2]}" for r in unfinished_rows[:5])
        )
    for kind, count in KILLS.items():
        if kills[kind] != count:
            failures.append(f"{kills[kind]} kills of kind {kind}, planned {count}")
    return Outcome(lines, failures)


def _log_errors(path: Path) -> int:
    try:
        return sum(
            " ERROR " in ln or ln.startswith("Traceback")
            for ln in path.read_text(errors="replace").splitlines()
        )
    except OSError:
        return 0


def _describe(e: Explanation) -> str:
    w, a, k = e.wasted, e.again, e.kill
    return (
        f"{w.request_id}: attempt {w.attempt} on {w.generator} seen at {w.seen_at:.2f}s, "
        f"again attempt {a.attempt} on {a.generator} at {a.seen_at:.2f}s"
        + (f"; explained by the kill of {k.target} at {k.killed_at:.2f}s" if k is not None else "")
    )


def _write_report(path: Path, outcome: Outcome, run: Run, gens: list[Generation]) -> None:
    """Everything the run saw, for a post-mortem next to the processes' logs."""
    out = [*outcome.lines, *outcome.failures, "", "generations (request, attempt, engine, seen at s):"]
    out += [f"  {g.request_id} {g.attempt} {g.generator} {g.seen_at:.3f}" for g in gens]
    out += ["", "clients (key, request, channel, connections: chunks, end, error):"]
    for key, view in run.views.items():
        conns = "; ".join(
            f"[{c.opened_at:.2f}-{c.closed_at:.2f}s {len(c.chunks)} chunks"
            f"{' end ' + c.finish_reason if c.finished else ''}{' ' + c.error if c.error else ''}]"
            for c in view.connections
        )
        out.append(f"  {key} {run.rid_of.get(key, '-')} {view.item.channel}: {conns}")
    path.write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------ the test
@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_chaos_every_request_answered_once_through_kills(tmp_path: Path, seed: int) -> None:
    started = time.monotonic()
    (tmp_path / "config.yaml").write_text(CONFIG)
    run = Run(
        seed=seed,
        tmp=tmp_path,
        clock=Clock(),
        http_port=free_port(),
        grpc_port=free_port(),
        stub_ports={s: free_port() for s in STUBS},
    )
    run.children = _children(run)
    items = make_replay(seed)
    plan = plan_kills(
        seed,
        {
            "coordinator": ["coordinator"],
            "sim": list(SIMS),
            "agent": list(STUBS.values()),
            "stub": list(STUBS),
        },
        KILLS,
        KILL_WINDOW,
        RESTART_AFTER,
    )
    records = [tmp_path / f"{n}.done" for n in [*SIMS, *STUBS]]
    tailer = run.tailer = RecordTailer(records, run.clock)
    final: dict[str, pb.RequestStatus | None] = {}

    async def main() -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for child in run.children.values():
                child.start(run.clock)
            want = sorted([*SIMS.values(), *STUBS.values()])

            async def all_registered() -> bool:
                return await _instances(run.target) == want

            await _wait(all_registered, 90, f"the coordinator and instances {want}")
            for port in run.stub_ports.values():

                async def healthy(port: int = port) -> bool:
                    return await _stub_healthy(session, port)

                await _wait(healthy, 30, f"the stub on port {port}")
            tailer.start()
            run.replay_t0 = run.clock.now()
            run.deadline = run.replay_t0 + REPLAY_S + SETTLE_S
            await asyncio.gather(replay(run, items, session), execute_kills(run, plan, session))
            # Every child is up again; wait for the clients, then for every accepted request.
            while run.tasks and run.clock.now() < run.deadline:
                pending = [t for t in run.tasks if not t.done()]
                if not pending:
                    break
                await asyncio.wait(pending, timeout=max(0.1, run.deadline - run.clock.now()))
            for t in run.tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*run.tasks, return_exceptions=True)
            rids = sorted(set(run.rid_of.values()))
            while True:
                final.update(await statuses(run, rids))
                unfinished = [
                    r for r in rids if (st := final[r]) is None or st.state in ("queued", "dispatched")
                ]
                if not unfinished or run.clock.now() > run.deadline:
                    break
                await asyncio.sleep(0.5)
            if unfinished:  # the coordinator's view of what is stuck, for the report
                run.snapshot = await _snapshot(run.target)
            await asyncio.sleep(0.5)  # the last records
            for c in run.clients:
                await c.close()

    try:
        asyncio.run(main())
    except BaseException:
        for child in run.children.values():
            print(f"----- {child.name} (last lines of {child.log})\n{child.tail()}")
        raise
    finally:
        # The coordinator first: SIGTERM drains it, and it exits 0. Then the engines' last records
        # (a generation finished after every request was answered would be one too many).
        coordinator_exit = run.children["coordinator"].stop(20)
        for child in run.children.values():
            child.stop(10)
        gens = tailer.stop()
    journal = _journal_rows(tmp_path / "journal.db")
    outcome = check(run, items, final, gens, tailer.malformed, journal, time.monotonic() - started)
    if coordinator_exit != 0:
        outcome.failures.append(f"the coordinator did not drain and exit 0 on SIGTERM: {coordinator_exit}")
    _write_report(tmp_path / "chaos-report.txt", outcome, run, gens)
    print("\n" + "\n".join(outcome.lines))
    if outcome.failures:
        print(f"logs, records and chaos-report.txt: {tmp_path}")
    assert not outcome.failures, "\n".join(outcome.failures)


# ----------------------------------------------------------------------- the test's own instruments
def test_judge_answer_tells_a_clean_answer_from_a_duplicate_a_gap_and_a_bad_break() -> None:
    exp = words(synthetic_text("r-1", 0, 6))

    def conn(chunks: list[tuple[int | None, int, str]], end: bool, error: str = "") -> Connection:
        c = Connection(0.0, chunks, finished=end, finish_reason="length" if end else "", error=error)
        c.closed_at = 5.0
        return c

    def text(a: int, b: int) -> str:
        return "".join(exp[a:b])

    def judge(*conns: Connection, explained: bool = True) -> Verdict:
        return judge_answer(exp, list(conns), lambda c: explained)

    whole = conn([(0, 2, text(0, 2)), (2, 4, text(2, 6))], True)
    assert judge(whole).answered_once
    broken = conn([(0, 2, text(0, 2))], False, "transport: UNAVAILABLE")
    assert judge(broken, whole).answered_once  # a reconnect reads from the start
    assert not judge(broken, whole, explained=False).answered_once  # a break nobody explains
    again = judge(conn([(0, 2, text(0, 2)), (0, 2, text(0, 2)), (2, 4, text(2, 6))], True))
    assert again.duplicated and not again.answered_once
    unnumbered = judge(conn([(None, 2, text(0, 2)), (None, 2, text(0, 2)), (None, 4, text(2, 6))], True))
    assert unnumbered.duplicated and not unnumbered.answered_once  # HTTP: the repeat is in the text
    gap = judge(conn([(0, 2, text(0, 2)), (3, 3, text(3, 6))], True))
    assert not gap.answered_once and not gap.duplicated
    short = judge(conn([(0, 2, text(0, 2))], True))
    assert short.incomplete and not short.answered_once
    twice = judge(whole, whole)
    assert twice.duplicated and not twice.answered_once
    assert judge(broken).incomplete


def test_explain_generations_needs_a_kill_of_the_right_part_at_the_right_time() -> None:
    def gens(first: str, t1: float, second: str, t2: float) -> list[Generation]:
        return [Generation("r", 1, first, t1), Generation("r", 2, second, t2)]

    sim = Kill("sim", "sim-a", 0, 10.0, 1, 10.5)
    coord = Kill("coordinator", "coordinator", 0, 20.0, 2, 21.0, ready_at=22.0)
    (e,) = explain_generations(gens("sim-a-0", 9.8, "sim-b-0", 12.0), [sim], _lead)
    assert e.kill is sim
    (e,) = explain_generations(gens("sim-b-0", 9.8, "sim-a-0", 12.0), [sim], _lead)
    assert e.kill is None  # the other engine was killed
    (e,) = explain_generations(gens("sim-a-0", 5.0, "sim-b-0", 12.0), [sim], _lead)
    assert e.kill is None  # its report was journaled long before the kill
    late = Kill("sim", "sim-a", 0, 25.0, 1, 25.5)
    (e,) = explain_generations(gens("sim-a-0", 19.0, "sim-b-0", 27.0), [coord, late], _lead)
    assert e.kill is late  # the report waited for the coordinator, and died with the engine
    (e,) = explain_generations(gens("sim-a-0", 10.6, "sim-b-0", 12.0), [sim], _lead)
    assert e.kill is None  # written by the engine started again after the kill
    agent = Kill("agent", "bb-0", 0, 10.0, 3, 10.5)
    (e,) = explain_generations(gens("stub-0", 10.2, "sim-a-0", 12.0), [agent], _lead)
    assert e.kill is agent  # the server finished as its agent died
    stub = Kill("stub", "stub-0", 0, 8.0, 4, 8.5)
    (e,) = explain_generations(gens("stub-0", 10.0, "sim-a-0", 12.0), [stub, agent], _lead)
    assert e.kill is agent  # not the server's earlier death: it was started again since


def test_openai_stub_streams_the_simulator_text_resumes_records_and_aborts(tmp_path: Path) -> None:
    from aiohttp import web

    from qlm_plugin.testing.openai_stub import StubServer

    async def go() -> None:
        with open(tmp_path / "record", "a") as record:
            stub = StubServer(name="stub-t", tokens_per_s=200, max_num_seqs=1, record=record)
            runner = web.AppRunner(stub.app(), handler_cancellation=True)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            url = f"http://127.0.0.1:{port}"
            try:
                async with aiohttp.ClientSession() as http:
                    body = {
                        "model": MODEL,
                        "prompt": "hello q" + synthetic_text("req-x", 0, 3),  # resumed after 3 tokens
                        "max_tokens": 4,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    chunks, usage, finish = [], None, None
                    async with http.post(
                        f"{url}/v1/completions", json=body, headers={"X-Request-Id": "req-x.2"}
                    ) as r:
                        async for raw in r.content:
                            line = raw.strip()
                            if line.startswith(b"data: {"):
                                payload = json.loads(line[6:])
                                usage = payload.get("usage") or usage
                                for c in payload["choices"]:
                                    chunks.append(c["text"])
                                    finish = c["finish_reason"] or finish
                    assert chunks == words(synthetic_text("req-x", 3, 4)) and finish == "length"
                    assert usage is not None and usage["completion_tokens"] == 4
                    # One seat: a second request waits; a client that goes away aborts its generation.
                    long = {**body, "prompt": "q", "max_tokens": 200}
                    first = asyncio.ensure_future(http.post(f"{url}/v1/completions", json=long))
                    second = asyncio.ensure_future(http.post(f"{url}/v1/completions", json=long))
                    await asyncio.sleep(0.3)
                    async with http.get(f"{url}/metrics") as r:
                        metrics = await r.text()
                    assert 'vllm:num_requests_running{model_name="llama-3.1-8b"} 1.0' in metrics
                    assert 'vllm:num_requests_waiting{model_name="llama-3.1-8b"} 1.0' in metrics
                    for f in (first, second):
                        f.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            (await f).close()
                    await asyncio.sleep(0.3)
                    assert stub.running == stub.waiting == 0 and stub.completed == 1
            finally:
                await runner.cleanup()

    asyncio.run(go())
    assert (tmp_path / "record").read_text() == "req-x 2 stub-t\n"
