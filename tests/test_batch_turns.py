"""Batch lines of several tenants take turns into the global queue (coordinator/batch_turns.py):
the tenants waiting alternate, at most ``depth`` of the lines let in wait in the queue, and every
way a line's requests leave the queue (an engine takes them, they end, nothing was submitted, the
batch stopped) hands its place on."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from qlm_plugin.coordinator.batch_turns import BatchTurns

MODEL = "m"


def _job(rid: str) -> Any:
    return SimpleNamespace(
        id=rid, state="queued", done=asyncio.Event(), on_dispatch=None, request=SimpleNamespace(model=MODEL)
    )


def _dispatch(job: Any) -> None:
    """What the coordinator's dispatch does."""
    job.state = "dispatched"
    if job.on_dispatch is not None:
        job.on_dispatch(job)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_waiting_tenants_take_turns_within_the_depth() -> None:
    async def main() -> None:
        turns = BatchTurns(lambda model: 2)
        stop = asyncio.Event()
        jobs = []
        for i in range(2):  # tenant a alone: goes in at once, up to the depth
            assert await turns.enter(MODEL, "a", 1, stop)
            jobs.append(_job(f"a{i}"))
            turns.hold(MODEL, [jobs[-1]], 1)
        order: list[str] = []

        async def line(tenant: str, i: int) -> None:
            assert await turns.enter(MODEL, tenant, 1, stop)
            order.append(f"{tenant}{i}")
            job = _job(f"{tenant}{i}")
            jobs.append(job)
            turns.hold(MODEL, [job], 1)

        tasks = [asyncio.create_task(line("a", i)) for i in range(2, 6)]
        await _settle()
        tasks += [asyncio.create_task(line("b", i)) for i in range(3)]
        await _settle()
        assert order == [] and turns.waiting(MODEL) == 7  # the queue holds its depth
        taken = 0
        while len(order) < 7:
            _dispatch(jobs[taken])  # an engine takes the oldest: the next turn goes in
            taken += 1
            await _settle()
        await asyncio.gather(*tasks)
        # a's waiters asked first, then b came: they alternate, and a goes on once b has none
        assert order == ["a2", "b0", "a3", "b1", "a4", "b2", "a5"]
        assert turns.waiting(MODEL) == 0

    asyncio.run(main())


def test_every_way_out_of_the_queue_hands_the_place_on() -> None:
    async def main() -> None:
        turns = BatchTurns(lambda model: 1)
        stop = asyncio.Event()
        assert await turns.enter(MODEL, "a", 1, stop)
        first = _job("r1")
        turns.hold(MODEL, [first], 1)
        waiting = asyncio.create_task(turns.enter(MODEL, "b", 1, stop))
        await _settle()
        assert not waiting.done()
        first.done.set()  # ended in the queue (cancelled): the worker forgets it
        turns.forget(MODEL, [first])
        assert await waiting
        turns.release(MODEL, 1)  # the grant submitted nothing (the line was answered)
        assert await asyncio.wait_for(turns.enter(MODEL, "a", 1, stop), 1)
        already = _job("r2")
        already.state = "dispatched"  # taken before it was held (an engine was free)
        turns.hold(MODEL, [already], 1)
        assert await asyncio.wait_for(turns.enter(MODEL, "b", 1, stop), 1)

    asyncio.run(main())


def test_a_stopped_batch_s_waiters_go_on_without_a_turn() -> None:
    async def main() -> None:
        turns = BatchTurns(lambda model: 1)
        assert await turns.enter(MODEL, "a", 1, asyncio.Event())
        turns.hold(MODEL, [_job("r1")], 1)
        stop = asyncio.Event()
        waiting = asyncio.create_task(turns.enter(MODEL, "b", 1, stop))
        await _settle()
        stop.set()  # the batch expired or was cancelled
        turns.wake_stopped()
        assert await asyncio.wait_for(waiting, 1) is False
        assert turns.waiting(MODEL) == 0

    asyncio.run(main())


def test_a_line_larger_than_the_depth_goes_in_alone_and_a_cancelled_grant_is_given_back() -> None:
    async def main() -> None:
        turns = BatchTurns(lambda model: 2)
        stop = asyncio.Event()
        assert await turns.enter(MODEL, "a", 5, stop)  # n=5 choices: nothing else inside
        big = [_job(f"c{i}") for i in range(5)]
        turns.hold(MODEL, big, 5)
        late = asyncio.create_task(turns.enter(MODEL, "b", 1, stop))
        await _settle()
        assert not late.done()
        for job in big:
            _dispatch(job)
        assert await late
        # a waiter cancelled (its batch's task stopped) leaves nothing held
        blocked = asyncio.create_task(turns.enter(MODEL, "a", 2, stop))
        await _settle()
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        turns.release(MODEL, 1)
        assert await asyncio.wait_for(turns.enter(MODEL, "b", 2, stop), 1)

    asyncio.run(main())


def test_a_stopped_batch_behind_another_tenant_s_turn_goes_on_at_once() -> None:
    """The waiters of a stopped batch are answered wherever they wait, not when their tenant's turn
    comes: behind a tenant whose lines fill the depth it stayed cancelling for as long as those
    took (a review: 32 s; without bound where no engine took them)."""

    async def main() -> None:
        turns = BatchTurns(lambda model: 1)
        live = asyncio.Event()
        assert await turns.enter(MODEL, "a", 1, live)
        turns.hold(MODEL, [_job("a0")], 1)  # the depth is full, and stays so
        ahead = asyncio.create_task(turns.enter(MODEL, "a", 1, live))
        stop = asyncio.Event()
        behind = [asyncio.create_task(turns.enter(MODEL, "b", 1, stop)) for _ in range(3)]
        await _settle()
        stop.set()
        turns.wake_stopped()
        assert await asyncio.wait_for(asyncio.gather(*behind), 1) == [False, False, False]
        assert not ahead.done() and turns.waiting(MODEL) == 1
        ahead.cancel()

    asyncio.run(main())
