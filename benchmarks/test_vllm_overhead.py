"""What the QLM scheduler adds to one vLLM scheduling step, at 256 running requests
(pytest-benchmark; no engine needed). Run:
python -m pytest benchmarks/test_vllm_overhead.py --benchmark-enable

The work is what the scheduler's brain (:class:`~qlm_plugin.adapters.vllm.engine_brain.EngineBrain`,
through the engine's plugin manager) does around vLLM's own ``schedule()``: every seat taken and an
interactive request at the head of the queue, so the seat check predicts every running request's
remaining length (``seat_frees_in_time`` stops early; ``eviction_needed`` scans them all and asks
``qlm_select_victim``); ``kv_pressure`` orders every running request for vLLM's own preemption. Each
is compared with ``baseline``: building vLLM's step view of the same 256 requests once (a list of
their token counts), the least a scheduler step does. The share of a real step is measured by
``qlm bench-vllm`` (the scheduler times its own code on the engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from qlm_plugin.adapters.vllm.engine_brain import EngineBrain
from qlm_plugin.adapters.vllm.fields import QLMFields

RUNNING = 256


@dataclass
class Req:
    request_id: str
    arrival_time: float
    num_output_tokens: int
    max_tokens: int = 512
    num_prompt_tokens: int = 128
    num_computed_tokens: int = 0
    priority: int = 0


def _engine(now: float, ttft: float) -> tuple[EngineBrain, Req, list[Req]]:
    brain = EngineBrain("tiny", "bench", autoload=False)
    brain.policy.step_s = 0.02
    running = [Req(f"b{i}", now - RUNNING + i, 500 - i, num_computed_tokens=628 - i) for i in range(RUNNING)]
    for r in running:
        brain.admit(r, QLMFields(e2e_deadline=now + 600), now)
    head = Req("i", now, 0)
    brain.admit(head, QLMFields(ttft_deadline=now + ttft), now)
    return brain, head, running


@pytest.mark.parametrize("case", ["baseline", "seat_frees_in_time", "eviction_needed", "kv_pressure"])
def test_added_work_per_step_at_256_running(benchmark: Any, case: str) -> None:
    now = time.time()
    # A seat frees in time (the usual case): the check stops early. "eviction_needed": no running
    # request finishes within the TTFT, so every one is looked at (rare: an eviction follows).
    brain, head, running = _engine(now, 1.0 if case == "seat_frees_in_time" else 0.05)

    def step() -> object:
        if case == "baseline":
            return [(r.request_id, r.num_computed_tokens, r.num_output_tokens) for r in running]
        if case == "kv_pressure":
            return brain.kv_victim_order(running, now)
        found = brain.seat_for(head, running, RUNNING, now)
        brain.policy._no_victim = ("", -1e18)  # each call checks afresh, as a new head would
        brain.observe_step(0.02, RUNNING)
        return found

    benchmark(step)
    benchmark.extra_info["running"] = RUNNING
