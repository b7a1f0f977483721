"""What the QLM scheduler adds to one vLLM scheduling step, at 256 running requests
(pytest-benchmark; no engine needed). Run:
python -m pytest benchmarks/test_vllm_overhead.py --benchmark-enable

The work is what ``_QLMMixin`` does around vLLM's own ``schedule()`` and ``update_from_output()``
in the worst case: every seat taken and an interactive request at the head of the queue, so the
eviction check scans every running request; then counting the step's decode tokens and recording
its timing. Target: under 50 µs per step. The share of a real step is measured by ``qlm bench-vllm``
(the scheduler times its own code on the engine).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest

from qlm_plugin.adapters.vllm.fields import QLMFields
from qlm_plugin.adapters.vllm.policy import InEnginePolicy
from qlm_plugin.domain.instance import StepTiming

RUNNING = 256


@dataclass
class Req:
    request_id: str
    arrival_time: float
    num_output_tokens: int
    max_tokens: int = 512
    num_prompt_tokens: int = 128


@pytest.mark.parametrize("case", ["seat_frees_in_time", "eviction_needed"])
def test_added_work_per_step_at_256_running(benchmark: Any, case: str) -> None:
    now = time.time()
    policy = InEnginePolicy(epoch=now, step_s=0.02)
    running = [
        Req(f"b{i}", now - RUNNING + i, 500 - i) for i in range(RUNNING)
    ]  # oldest first, as vLLM keeps them
    fields = {r.request_id: QLMFields(e2e_deadline=now + 600) for r in running}
    # A seat frees in time (the usual case): the check stops early. When none does, an eviction
    # follows and the full scan is the price of it (rare).
    # "eviction_needed": no running request finishes within the TTFT, so every one is scanned twice.
    ttft = 1.0 if case == "seat_frees_in_time" else 0.05
    head, head_fields = Req("i", now, 0), QLMFields(ttft_deadline=now + ttft)
    scheduled = {r.request_id: 1 for r in running}
    steps: deque[StepTiming] = deque(maxlen=512)

    def step() -> None:
        policy.choose_eviction(
            head, head_fields, running, lambda rid: fields.get(rid, head_fields), now, RUNNING
        )
        batch = len(scheduled)
        decode = batch - 0  # as the scheduler counts: batch less the newly scheduled prefills
        steps.append(StepTiming(now, 0.02, 0, decode, batch))
        policy.observe_step(0.02, decode)

    benchmark(step)
    benchmark.extra_info["running"] = RUNNING
    assert len(steps) > 0
