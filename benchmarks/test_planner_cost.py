"""Planner and queue-manager cost (pytest-benchmark). Run:

    python -m pytest benchmarks/test_planner_cost.py --benchmark-enable

Targets (issue 3): one replanning with 10,000 queued requests over 64 instances under 20 ms at
p99; enqueue + estimate of one request under 100 us. The baseline in the same process is sorting
the same queue by urgency once (the least any planner must do), so the ratios travel across
machines.
"""

from __future__ import annotations

import random

import pytest

from qlm_plugin.adapters.sim import SimBackend, SimFleet, SimInstance
from qlm_plugin.brain.planner import Planner
from qlm_plugin.brain.predictor import LengthPredictor, PredictorPlugin
from qlm_plugin.brain.queue_manager import QueueManager
from qlm_plugin.domain.costmodel import cost_model
from qlm_plugin.domain.request import DEFAULT_CLASSES, Request, make_request
from qlm_plugin.hooks import get_plugin_manager

MODELS = {f"m{i}": cost_model("llama-3.1-8b", "h100", {"max_num_seqs": 1}) for i in range(4)}


def queue_manager(instances: int, queued: int, seed: int = 0) -> tuple[QueueManager, list[Request]]:
    """A queue manager over ``instances`` busy simulated engines (4 models) holding ``queued``."""
    fleet = SimFleet(
        [SimInstance(f"i{k}", "h100", MODELS, initial_model=f"m{k % 4}") for k in range(instances)]
    )
    backend = SimBackend(fleet)
    qm = QueueManager(dict(MODELS), replan_interval_s=1e9)
    pm = get_plugin_manager(autoload=False)
    for n, p in enumerate([PredictorPlugin(LengthPredictor()), qm, Planner(qm.queue, qm.fleet), backend]):
        pm.register(p, name=f"p{n}")
    pm.hook.qlm_configure(pm=pm)
    backend.attach(pm)
    rng = random.Random(seed)
    classes = [DEFAULT_CLASSES["interactive"], DEFAULT_CLASSES["batch"]]

    def req(i: int, batch_only: bool = False) -> Request:
        cls = DEFAULT_CLASSES["batch"] if batch_only else rng.choice(classes)
        return make_request(
            f"q{i}", f"m{i % 4}", rng.randint(10, 3000), 1024, rng.uniform(0, 60), slo_class=cls
        )

    for k in range(instances):  # one long request per engine: every seat taken
        qm.qlm_submit(make_request(f"busy{k}", f"m{k % 4}", 10, 4000, 0.0, e2e_s=1e5), 0.0)
    for i in range(queued):  # batch work stays queued (urgent work would bind early to the engines)
        qm.qlm_submit(req(i, batch_only=True), 0.0)
    assert sum(len(q) for q in qm.queue.queues.values()) == queued, "everything stays queued"
    return qm, [req(queued + i) for i in range(2000)]


@pytest.mark.parametrize("instances", [8, 64])
@pytest.mark.parametrize("queued", [1_000, 10_000, 100_000])
def test_replanning(benchmark, instances: int, queued: int) -> None:  # type: ignore[no-untyped-def]
    if queued == 100_000 and instances == 8:
        pytest.skip("one 100k case is enough (64 instances)")
    qm, _ = queue_manager(instances, queued)
    benchmark.group = f"replan {queued} queued"
    benchmark.pedantic(qm.replan, args=(1.0,), rounds=20 if queued < 100_000 else 5, iterations=1)
    assert qm.last_plan is not None
    benchmark.extra_info["solver"] = qm.last_plan.solver


@pytest.mark.parametrize("queued", [1_000, 10_000, 100_000])
def test_baseline_sort_the_queue(benchmark, queued: int) -> None:  # type: ignore[no-untyped-def]
    qm, _ = queue_manager(64, queued)
    keys = [qm.queue.entries[rid].key for q in qm.queue.queues.values() for _, rid in q.order]
    random.Random(1).shuffle(keys)
    benchmark.group = f"replan {queued} queued"
    benchmark(sorted, keys)


def test_enqueue_and_estimate_one_request(benchmark) -> None:  # type: ignore[no-untyped-def]
    qm, fresh = queue_manager(64, 10_000)
    it = iter(fresh)

    def submit() -> None:
        r = next(it)
        qm.qlm_submit(r, 1.0)

    benchmark.group = "per request"
    benchmark.pedantic(submit, rounds=1500, iterations=1)
    assert sum(len(q) for q in qm.queue.queues.values()) > 10_000, "batch submissions stay queued"
