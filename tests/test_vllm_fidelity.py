"""The fidelity tools of the vLLM adapter, on synthetic step timings (no engine): the fit recovers
a known cost model, and the cost outside the steps is what the probes measured beyond it."""

from __future__ import annotations

import random

import pytest

from qlm_plugin.adapters.vllm.fidelity import Replayed, calibrated_model, fit, front_end_s, replay
from qlm_plugin.domain.instance import StepTiming


def test_the_fit_recovers_the_step_cost_model() -> None:
    rng = random.Random(1)
    steps = []
    for i in range(500):
        prefill, decode = rng.choice([0, 0, 0, 64, 256]), rng.randint(1, 8)
        seconds = (3000 + 80 * prefill + 400 * decode) * 1e-6 * rng.uniform(0.97, 1.03)
        steps.append(StepTiming(float(i), seconds, prefill, decode, decode + (prefill > 0)))
    b0, b1, b2 = fit(steps)
    assert b0 == pytest.approx(3000, rel=0.1)
    assert b1 == pytest.approx(80, rel=0.1)
    assert b2 == pytest.approx(400, rel=0.1)


def test_the_fit_counts_the_engines_time_between_back_to_back_steps() -> None:
    """0.4 ms between steps run back to back is step time (its requests wait through it); a pause
    before a step that found the engine idle is not."""
    steps, t = [], 0.0
    for i in range(400):
        decode = 1 + i % 8
        seconds = (3000 + 400 * decode) * 1e-6
        steps.append(StepTiming(t, seconds, 0, decode, decode))
        t += seconds + (0.0004 if i % 50 else 0.5)  # busy, with an idle pause every 50 steps
    b0, _, b2 = fit(steps)
    assert b0 == pytest.approx(3400, rel=0.03)
    assert b2 == pytest.approx(400, rel=0.03)


def test_the_cost_outside_the_steps_is_what_probes_measure_beyond_the_simulator() -> None:
    cost = calibrated_model((3000.0, 80.0, 400.0), max_num_seqs=8, max_batched=2048)
    alone = {p: replay([Replayed(0.0, p, 1)], cost)[0].e2e or 0.0 for p in (8, 40, 200)}
    probes = [(p, alone[p] + 0.006 + 0.001 * (i % 3 - 1)) for i, p in enumerate([8, 40, 200] * 3)]
    assert front_end_s(probes, cost) == pytest.approx(0.006, abs=1e-3)
    # Probes faster than the simulator (a fit that overestimates) add nothing: never negative.
    assert front_end_s([(p, 0.5 * alone[p]) for p in alone], cost) == 0.0


def test_replay_answers_in_the_order_of_its_input() -> None:
    cost = calibrated_model((3000.0, 80.0, 400.0), max_num_seqs=2, max_batched=2048)
    requests = [Replayed(0.2, 16, 64), Replayed(0.0, 16, 8), Replayed(0.1, 16, 32)]
    outcomes = replay(requests, cost)
    assert [o.output_tokens for o in outcomes] == [64, 8, 32]
    assert all(o.e2e is not None and o.e2e > 0 for o in outcomes)
