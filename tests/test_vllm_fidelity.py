"""The fidelity tools of the vLLM adapter, on synthetic step timings (no engine): the fit recovers
a known cost model, and the cost outside the steps is what the probes measured beyond it."""

from __future__ import annotations

import random

import pytest

from qlm_plugin.adapters.vllm.fidelity import (
    HostSpeed,
    Replayed,
    calibrated_model,
    fit,
    fit_with_host_speed,
    front_end_s,
    replay,
)
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


def test_the_hosts_speed_is_fitted_per_window_beside_the_step_cost() -> None:
    """A host 1.6 times slower from the third second on: one cost model for the whole trace is
    wrong in both parts; fitted with the host's speed per window, the step cost is the fast part's
    and the slowness follows the host."""
    rng = random.Random(2)
    steps, t = [], 0.0
    while t < 6.0:
        prefill, decode = rng.choice([0, 0, 0, 64, 256]), rng.randint(1, 8)
        seconds = (3000 + 80 * prefill + 400 * decode) * 1e-6 * (1.6 if t >= 2.0 else 1.0)
        steps.append(StepTiming(100.0 + t, seconds * rng.uniform(0.97, 1.03), prefill, decode, decode))
        t += seconds + 0.005
    coef, host = fit_with_host_speed(steps, origin=100.0, window_s=1.0)
    scale = host(0.5)  # the fit is normalised to the median window (here a slow one)
    assert scale * coef[0] == pytest.approx(3000, rel=0.1)
    assert scale * coef[2] == pytest.approx(400, rel=0.1)
    assert [round(s / scale, 1) for s in host.slowness] == [1.0, 1.0, 1.6, 1.6, 1.6, 1.6]
    assert host(-1.0) == host.slowness[0] and host(60.0) == host.slowness[-1]


def test_a_replay_runs_each_step_at_the_hosts_speed_of_its_time() -> None:
    cost = calibrated_model((3000.0, 80.0, 400.0), max_num_seqs=8, max_batched=2048)
    requests = [Replayed(0.0, 16, 64), Replayed(5.0, 16, 64)]
    steady = replay(requests, cost)
    slower_later = replay(requests, cost, HostSpeed(origin=0.0, window_s=1.0, slowness=(1.0,) * 5 + (1.5,)))
    assert slower_later[0].e2e == pytest.approx(steady[0].e2e)
    assert slower_later[1].e2e == pytest.approx(1.5 * (steady[1].e2e or 0.0), rel=0.01)


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
