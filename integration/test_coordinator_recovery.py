"""Exactly once across a coordinator crash: 1,000 requests over gRPC and 100 streamed through the
HTTP front door's two worker processes, ``kill -9`` of the coordinator process mid-run, a restart on
the same journal; simulated instances run as their own processes and keep serving meanwhile. Every
acknowledged request completes once: none lost, none served twice; an HTTP client whose stream
broke gets its request's whole output by submitting again with its idempotency key."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.processes import (
    coordinator_process,
    instance_process,
    served_counts,
    stop_all,
    wait_ready,
)
from qlm_plugin.transport.client import CoordinatorClient

MODEL = "llama-3.1-8b"
N = 1000
HTTP_N = 100
TOKENS = 300
WORKERS = ("--http-workers", "2")

pytestmark = pytest.mark.slow

CONFIG = """
heartbeat_interval_s: 0.2
heartbeat_timeout_s: 2.0
drain_timeout_s: 5.0
"""


async def _statuses(target: str, ids: list[str]) -> dict[str, pb.RequestStatus]:
    async with CoordinatorClient(target, timeout_s=10) as c:
        sem = asyncio.Semaphore(64)

        async def one(rid: str) -> pb.RequestStatus:
            async with sem:
                return await c.status(rid)

        replies = await asyncio.gather(*(one(r) for r in ids))
    return dict(zip(ids, replies, strict=True))


def _http_body(key: str, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "h" * 300,
        "max_tokens": TOKENS,
        "stream": stream,
        "qlm": {"class": "batch", "idempotency_key": key},
    }


async def _stream_until_killed(
    session: aiohttp.ClientSession, url: str, key: str, started: list[str]
) -> None:
    """A streaming client whose request is accepted, then whose stream breaks with the coordinator."""
    async with session.post(f"{url}/v1/completions", json=_http_body(key, True)) as resp:
        assert resp.status == 200, await resp.text()
        started.append(resp.headers["x-qlm-request-id"])
        try:
            async for _ in resp.content:
                pass
        except aiohttp.ClientError:
            pass


def test_kill_9_of_the_coordinator_loses_nothing_and_serves_nothing_twice(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    http, grpc_port = free_port(), free_port()
    target, url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http}"
    coord = coordinator_process(tmp_path, http, grpc_port, *WORKERS)
    instances = [instance_process(tmp_path, grpc_port, n) for n in ("a", "b")]
    http_ids: list[str] = []
    streams: list[asyncio.Task[None]] = []
    try:

        async def first_half(session: aiohttp.ClientSession) -> list[str]:
            await wait_ready(target, 2)
            ids: list[str] = []
            for k in range(HTTP_N):
                streams.append(asyncio.create_task(_stream_until_killed(session, url, f"h{k}", http_ids)))
            while len(http_ids) < HTTP_N:
                assert not any(t.done() and t.exception() for t in streams)
                await asyncio.sleep(0.05)
            async with CoordinatorClient(target) as c:
                for _ in range(N // 100):
                    replies = await c.submit_batch(
                        [
                            pb.RequestSpec(
                                model=MODEL,
                                prompt="q" * 300,
                                max_tokens=TOKENS,
                                slo=pb.SLO(slo_class="batch"),
                            )
                            for _ in range(100)
                        ]
                    )
                    ids += [r.request_id for r in replies if r.accepted]
            # mid-run: some finished, some on the engines, some queued
            while True:
                states = collections.Counter(s.state for s in (await _statuses(target, ids[::10])).values())
                if states["finished"] >= 5:
                    return ids
                await asyncio.sleep(0.05)

        async def crash() -> list[str]:
            async with aiohttp.ClientSession() as session:
                ids = await first_half(session)
                coord.send_signal(signal.SIGKILL)  # the workers go with it: every stream breaks
                await asyncio.wait_for(asyncio.gather(*streams), 30)
            return ids

        ids = asyncio.run(crash())
        assert len(ids) == N  # every one acknowledged, so every one journaled
        coord.wait(10)
        time.sleep(0.5)  # the instances notice and keep serving what they hold
        coord = coordinator_process(tmp_path, http, grpc_port, *WORKERS)

        async def second_half() -> tuple[dict[str, pb.RequestStatus], list[dict[str, Any]]]:
            await wait_ready(target, 2)
            # The HTTP clients submit again with their keys and wait for the answer.
            async with aiohttp.ClientSession() as session:

                async def again(k: int) -> dict[str, Any]:
                    async with session.post(f"{url}/v1/completions", json=_http_body(f"h{k}", False)) as r:
                        assert r.status == 200, await r.text()
                        body: dict[str, Any] = await r.json()
                        return body

                answers = await asyncio.wait_for(asyncio.gather(*(again(k) for k in range(HTTP_N))), 120)
            deadline = time.monotonic() + 120
            while True:
                statuses = await _statuses(target, ids)
                if all(s.state == "finished" for s in statuses.values()) or time.monotonic() > deadline:
                    return statuses, answers
                await asyncio.sleep(0.2)

        statuses, answers = asyncio.run(second_half())
        # Graceful stop: SIGTERM drains and exits cleanly.
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(20) == 0
    finally:
        stop_all([coord, *instances])

    finished = [rid for rid, s in statuses.items() if s.state == "finished"]
    served = collections.Counter(served_counts(tmp_path, ("a", "b")))
    lost = N - len(finished)
    duplicated = sum(1 for rid in [*ids, *http_ids] if served[rid] > 1)
    print(
        f"\naccepted {len(ids)} + {len(http_ids)} over HTTP, completed {len(finished)}, "
        f"lost {lost}, served twice {duplicated}"
    )
    assert lost == 0
    assert duplicated == 0
    assert all(served[rid] == 1 for rid in [*ids, *http_ids])
    # Each HTTP client's retry found its own request, whole.
    assert len(set(http_ids)) == HTTP_N
    for answer in answers:
        rid = answer["qlm"]["request_id"]
        assert rid in http_ids
        assert answer["choices"][0]["text"] == synthetic_text(rid, 0, TOKENS)
        assert answer["usage"]["completion_tokens"] == TOKENS
    for rid in ids:
        assert statuses[rid].output == synthetic_text(rid, 0, TOKENS)
        assert statuses[rid].output_tokens == TOKENS


def test_a_request_claimed_after_a_crash_keeps_the_time_of_its_first_token(tmp_path: Path) -> None:
    """The first token's time is journaled at a graceful stop, not as it comes: after a crash the
    instance's replay of the output was taken as the first token, and a TTFT met looked missed by
    the length of the outage (found by review). The replay keeps the time its engine stamped."""
    (tmp_path / "config.yaml").write_text(CONFIG)
    http, grpc_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    coord = coordinator_process(tmp_path, http, grpc_port)
    instance = instance_process(tmp_path, grpc_port, "a")
    try:

        async def before() -> tuple[str, float]:
            await wait_ready(target, 1)
            async with CoordinatorClient(target) as c:
                slo = pb.SLO(ttft_ms=1500, e2e_ms=600_000)
                reply = await c.submit(pb.RequestSpec(model=MODEL, prompt="q", max_tokens=4000, slo=slo))
                while (status := await c.status(reply.request_id)).ttft_ms == 0:
                    await asyncio.sleep(0.05)
            return reply.request_id, status.ttft_ms

        request_id, ttft_ms = asyncio.run(before())
        coord.send_signal(signal.SIGKILL)
        coord.wait(10)
        time.sleep(2.0)  # longer than its TTFT SLO
        coord = coordinator_process(tmp_path, http, grpc_port)

        async def after() -> pb.RequestStatus:
            await wait_ready(target, 1)
            async with CoordinatorClient(target) as c:
                deadline = time.monotonic() + 30
                while (status := await c.status(request_id)).ttft_ms == 0:
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.05)
            return status

        status = asyncio.run(after())
        assert status.attempt == 1, status  # claimed by its instance, not served again
        assert status.ttft_ms == pytest.approx(ttft_ms, abs=300) and not status.late, (status, ttft_ms)
    finally:
        stop_all([coord, instance])
