"""The coordinator's own cost per accepted request (pytest-benchmark). Run:
python -m pytest benchmarks/test_coordinator_submit.py --benchmark-enable

``Coordinator.submit`` in-process, without gRPC or HTTP: validation, the journal commit (real SQLite
file), the policy's admission (for ``qlm``: prediction, the waiting-time estimate, queueing) and the
dispatch to one of two registered instances. Measured for ``qlm`` and, in the same process, for the
``fcfs`` baseline (no queue manager), so ``extra_info`` holds the requests/s of each and their ratio.
The end-to-end figures through the network are ``qlm loadtest``'s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.journal import Journal
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.workloads.scenario import load_scenario

N = 2000
RATES: dict[str, float] = {}


async def _submit_all(tmp: Path, policy: str) -> float:
    coord = Coordinator(CoordinatorConfig(policy=policy), load_scenario(), Journal(tmp / f"{policy}.db"))
    await coord.start()
    for i in range(2):
        state = pb.StateReport(models_loaded=["llama-3.1-8b"], max_num_seqs=256, kv_blocks_total=30_000)
        s, _, _ = coord.registry.register(
            pb.RegisterRequest(instance_id=f"i{i}", backend="sim", gpu="h100", state=state)
        )
        coord.registry.pull_opened(s)
    specs = [
        pb.RequestSpec(model="llama-3.1-8b", prompt="x" * 400, max_tokens=32, slo=pb.SLO(slo_class="batch"))
        for _ in range(N)
    ]
    t0 = time.perf_counter()
    for i in range(0, N, 100):  # as SubmitBatch does: 100 at a time, one journal commit each
        await asyncio.gather(*(coord.submit(spec) for spec in specs[i : i + 100]))
    elapsed = time.perf_counter() - t0
    assert sum(j.state in ("queued", "dispatched") for j in coord.jobs.values()) == N
    await coord.journal.close()
    return elapsed


@pytest.mark.parametrize("policy", ["fcfs", "qlm"])
def test_submit_cost(benchmark: Any, tmp_path: Path, policy: str) -> None:
    runs = iter(range(1000))

    def once() -> float:
        folder = tmp_path / str(next(runs))
        folder.mkdir()
        return asyncio.run(_submit_all(folder, policy))

    elapsed = benchmark.pedantic(once, rounds=3, iterations=1)
    RATES[policy] = N / elapsed
    benchmark.extra_info["requests_per_s"] = round(RATES[policy])
    if "fcfs" in RATES and policy != "fcfs":
        benchmark.extra_info["ratio_to_fcfs"] = round(RATES[policy] / RATES["fcfs"], 3)
