"""Journal accept throughput (pytest-benchmark). Run:
python -m pytest benchmarks/test_journal_speed.py --benchmark-enable

Target (the coordinator's front door): 5,000 accepted submits/s, each one committed before its client is
acknowledged. A round is 2,000 concurrent ``Journal.accept`` calls (``asyncio.gather``) on a fresh file in
a temp folder; the writer thread group-commits whatever has queued up. ``extra_info`` holds the rate
(accepts/s, from the median round), the number of commits and the largest batch. Nothing is asserted on
the rate: it depends on the disk (``synchronous="full"`` pays an fsync per commit).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from qlm_plugin.coordinator.journal import JobRecord, Journal

N = 2000
ROUNDS = 5


def _records() -> list[JobRecord]:
    spec: dict[str, Any] = {"model": "llama-8b", "prompt": "x" * 200, "max_tokens": 256, "slo_class": "batch"}
    return [JobRecord(f"r{i}", f"tenant{i % 7}", spec, 1.7e9 + i, idempotency_key=f"k{i}") for i in range(N)]


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_concurrent_accepts(benchmark, tmp_path: Path, synchronous: str) -> None:  # type: ignore[no-untyped-def]
    journals: list[Journal] = []
    seconds: list[float] = []

    def setup() -> tuple[tuple[Journal, list[JobRecord]], dict[str, Any]]:
        journals.append(Journal(tmp_path / f"j{len(journals)}.db", synchronous=synchronous))
        return (journals[-1], _records()), {}

    async def accept_all(journal: Journal, recs: list[JobRecord]) -> None:
        start = time.perf_counter()
        await asyncio.gather(*(journal.accept(r) for r in recs))
        seconds.append(time.perf_counter() - start)

    def run(journal: Journal, recs: list[JobRecord]) -> None:
        asyncio.run(accept_all(journal, recs))

    benchmark.group = f"journal: {N} concurrent accepts, fresh file per round"
    try:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
        last = journals[-1]
        assert last.counts()["queued"] == N
        benchmark.extra_info["accepts_per_s"] = round(N / statistics.median(seconds))
        benchmark.extra_info["commits"] = last._batches
        benchmark.extra_info["largest_batch"] = last._largest_batch
    finally:
        for journal in journals:
            journal.close_sync()
