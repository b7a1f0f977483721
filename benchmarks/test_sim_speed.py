"""Simulator speed (pytest-benchmark). Run: python -m pytest benchmarks --benchmark-enable

Target (issue 2): the full one-hour conversation trace (19,366 requests) on 4 instances in under
30 s on one core (``taskset -c 0``). The baseline in the same process is the same engine with macro
steps off (one event per engine step): the ratio is what the lazy decode bookkeeping buys, whatever
the machine's speed. Both produce the same per-request results (tests/test_sim_engine.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import qlm_plugin.tools.simulate as sim
from qlm_plugin.workloads.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "scenarios" / "conv_full_4xh100.yaml"
needs_trace = pytest.mark.skipif(
    not (ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv").exists(),
    reason="../shared/traces is not beside the checkout",
)


@needs_trace
@pytest.mark.parametrize("macro", [True, False], ids=["macro-steps", "single-steps"])
def test_full_conversation_trace_on_4_instances(benchmark, macro: bool) -> None:  # type: ignore[no-untyped-def]
    scenario = load_scenario(FULL)
    requests, rejected = sim.build_requests(scenario)
    benchmark.group = "full conversation trace (19,366 requests), 4 x H100, fcfs"
    result = benchmark.pedantic(
        sim.run_policy,
        args=(scenario, "fcfs", requests, rejected),
        kwargs={"macro_steps": macro},
        rounds=3 if macro else 1,
        iterations=1,
    )
    assert result.overall.finished == 19366
    benchmark.extra_info["engine_steps"] = result.counters["steps"]


def test_packaged_default_all_baselines(benchmark) -> None:  # type: ignore[no-untyped-def]
    scenario = load_scenario(None)
    requests, rejected = sim.build_requests(scenario)

    def all_policies() -> None:
        for policy in ("fcfs", "edf", "priority", "oracle"):
            sim.run_policy(scenario, policy, requests, rejected)

    benchmark.pedantic(all_policies, rounds=3, iterations=1)
