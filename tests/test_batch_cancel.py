"""A stopped batch cancels its open requests a slice per turn of the event loop: the 4,096 of a
large batch at once held the loop 2.4 s (a review's 30,000-line batch), every client waiting."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from qlm_plugin.coordinator import batches
from qlm_plugin.coordinator.batches import BatchService, _Running


class _Coordinator:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, request_id: str, reason: str) -> None:
        self.cancelled.append(request_id)


def test_a_stopped_batch_cancels_its_requests_a_slice_per_loop_turn() -> None:
    async def main() -> None:
        coord = _Coordinator()
        service = BatchService(coord, store=None, settings=None)  # type: ignore[arg-type]
        jobs: dict[int, list[Any]] = {
            line: [SimpleNamespace(id=f"r{line}", done=asyncio.Event())] for line in range(1000)
        }
        jobs[3][0].done.set()  # finished already: not cancelled
        running = _Running(batch=SimpleNamespace(tenant="t"), jobs=jobs)  # type: ignore[arg-type]
        service._stop(running, "the batch was cancelled")
        assert running.stop.is_set()
        turns = 0
        while len(coord.cancelled) < 999:
            await asyncio.sleep(0)  # another client's turn
            turns += 1
            assert len(coord.cancelled) <= turns * batches.CANCEL_SLICE
            assert turns < 100, "the cancellations stopped"
        assert turns >= 1000 // batches.CANCEL_SLICE
        assert "r3" not in coord.cancelled and len(set(coord.cancelled)) == 999

    asyncio.run(main())
