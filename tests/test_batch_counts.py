"""A batch's request counts as a client polls them while the batch's lines are followed again
after a restart: they go on from what the record showed, never down, and end exact."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any

from qlm_plugin.coordinator.batch_store import BatchRecord
from qlm_plugin.coordinator.batch_turns import BatchTurns
from qlm_plugin.coordinator.batches import BatchService, Line, _Running
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb


class _Store:
    def line_answers(self, batch_id: str) -> dict[int, dict[str, Any]]:
        return {9: {"error": "refused before the restart"}}  # line 9 was answered as an error


def _job(line: int, done: bool) -> Any:
    event = asyncio.Event()
    if done:
        event.set()
    return SimpleNamespace(
        id=f"r{line}",
        done=event,
        state="finished",
        request=SimpleNamespace(prompt_tokens=10),
        answered_tokens=5,
    )


def test_counts_go_on_from_the_saved_ones_while_the_lines_are_followed_again() -> None:
    async def main() -> None:
        service = BatchService(
            coord=None,  # type: ignore[arg-type]
            store=_Store(),  # type: ignore[arg-type]
            settings=SimpleNamespace(max_in_flight=4),  # type: ignore[arg-type]
        )
        # As saved before the restart: 6 lines done, line 9 failed.
        batch = BatchRecord("batch_x", "t", "f", "/v1/completions", "24h", 86400.0, 0.0, status="in_progress")
        batch.total, batch.completed, batch.failed, batch.input_tokens, batch.output_tokens = 10, 6, 1, 60, 30
        running = _Running(batch)
        jobs = {i: _job(i, done=i < 6) for i in range(9)}  # 0-5 finished before; 6-8 still running

        async def submit_line(running: _Running, line: Line, specs: Any) -> list[Any]:
            await asyncio.sleep(0)
            return [jobs[line.index]]

        service._submit_line = submit_line  # type: ignore[method-assign]
        service.turns = BatchTurns(lambda model: 100)
        lines = [Line(i, f"c{i}", pb.RequestSpec()) for i in range(10)]
        serving = asyncio.create_task(service._serve(running, lines, tenant_limit=100))
        shown: list[tuple[int, int, int, int]] = []
        for _ in range(20):
            shown.append((batch.completed, batch.failed, batch.input_tokens, batch.output_tokens))
            await asyncio.sleep(0)
        for i in (6, 7, 8):
            jobs[i].done.set()
            await asyncio.sleep(0)
            shown.append((batch.completed, batch.failed, batch.input_tokens, batch.output_tokens))
        await serving
        shown.append((batch.completed, batch.failed, batch.input_tokens, batch.output_tokens))
        assert shown[0] == (6, 1, 60, 30)
        for earlier, later in itertools.pairwise(shown):
            assert all(b >= a for a, b in zip(earlier, later, strict=True)), shown
        assert shown[-1] == (9, 1, 90, 45)  # every line counted once

    asyncio.run(main())


def test_running_batches_counts_are_saved_when_they_changed() -> None:
    """Every few seconds (and at the stop) the counts of a running batch are written, so that after
    a crash the next start shows what was done; unchanged counts are not written again, and a
    batch being finalized is left to its own write."""
    written: list[tuple[str, int]] = []
    store = SimpleNamespace(put_batch=lambda b: written.append((b.id, b.completed)))
    service = BatchService(coord=None, store=store, settings=None)  # type: ignore[arg-type]
    running = BatchRecord("batch_a", "t", "f", "/v1/completions", "24h", 86400.0, 0.0, status="in_progress")
    ending = BatchRecord("batch_b", "t", "f", "/v1/completions", "24h", 86400.0, 0.0, status="finalizing")
    service._running = {b.id: _Running(b) for b in (running, ending)}
    running.completed = ending.completed = 3
    service._save_counts()
    service._save_counts()
    running.completed = 4
    service._save_counts()
    assert written == [("batch_a", 3), ("batch_a", 4)]
