"""Exactly once across a coordinator crash: 1,000 requests, ``kill -9`` of the coordinator process
mid-run, a restart on the same journal; simulated instances run as their own processes and keep
serving meanwhile. Every acknowledged request completes once: none lost, none served twice."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from pathlib import Path

import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.loadtest import free_port
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
TOKENS = 300

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


def test_kill_9_of_the_coordinator_loses_nothing_and_serves_nothing_twice(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    http, grpc_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    coord = coordinator_process(tmp_path, http, grpc_port)
    instances = [instance_process(tmp_path, grpc_port, n) for n in ("a", "b")]
    try:

        async def first_half() -> list[str]:
            await wait_ready(target, 2)
            ids: list[str] = []
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

        ids = asyncio.run(first_half())
        assert len(ids) == N  # every one acknowledged, so every one journaled
        coord.send_signal(signal.SIGKILL)
        coord.wait(10)
        time.sleep(0.5)  # the instances notice and keep serving what they hold
        coord = coordinator_process(tmp_path, http, grpc_port)

        async def second_half() -> dict[str, pb.RequestStatus]:
            await wait_ready(target, 2)
            deadline = time.monotonic() + 120
            while True:
                statuses = await _statuses(target, ids)
                if all(s.state == "finished" for s in statuses.values()) or time.monotonic() > deadline:
                    return statuses
                await asyncio.sleep(0.2)

        statuses = asyncio.run(second_half())
        # Graceful stop: SIGTERM drains and exits cleanly.
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(20) == 0
    finally:
        stop_all([coord, *instances])

    finished = [rid for rid, s in statuses.items() if s.state == "finished"]
    served = collections.Counter(served_counts(tmp_path, ("a", "b")))
    lost = N - len(finished)
    duplicated = sum(1 for rid in ids if served[rid] > 1)
    print(f"\naccepted {len(ids)}, completed {len(finished)}, lost {lost}, served twice {duplicated}")
    assert lost == 0
    assert duplicated == 0
    assert all(served[rid] == 1 for rid in ids)
    for rid in ids:
        assert statuses[rid].output == synthetic_text(rid, 0, TOKENS)
        assert statuses[rid].output_tokens == TOKENS
