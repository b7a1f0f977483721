"""The RWT estimator's building blocks: pooled seats, priority inflow, calibration, work index."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from qlm_plugin.brain.waiting_time import (
    PMeetCalibrator,
    ResidualCalibrator,
    SeatTimes,
    StepCalibrator,
    heavy_tail_factor,
    p_meet,
)
from qlm_plugin.brain.work_index import WorkIndex
from qlm_plugin.domain.costmodel import cost_model
from qlm_plugin.domain.instance import StepTiming
from qlm_plugin.domain.request import make_request


def brute_force_start(residuals: list[float], work: float, inflow: float = 0.0, dt: float = 4e-3) -> float:
    """Step a fluid multi-server queue in small time steps until ``work`` is done."""
    if inflow >= len(residuals):
        return math.inf  # the seats can never catch up
    t, done = 0.0, 0.0
    while done < work + inflow * t:
        t += dt
        done = sum(max(0.0, t - r) for r in residuals)
        if t > 1e4:
            return math.inf
    return max(t, residuals[0])


@pytest.mark.parametrize("seed", range(6))
def test_pooled_start_matches_a_brute_force_fluid_queue(seed: int) -> None:
    rng = random.Random(seed)
    residuals = sorted([0.0] * rng.randint(0, 2) + [rng.uniform(0, 5) for _ in range(rng.randint(1, 6))])
    work = rng.uniform(0, 10)
    inflow = rng.choice([0.0, 0.5, 1.5])
    expected = brute_force_start(residuals, work, inflow)
    assert SeatTimes(residuals).start_s(work, inflow) == pytest.approx(expected, abs=8e-3)


@pytest.mark.parametrize("seed", range(20))
def test_seats_read_later_are_the_same_seats_freed_that_much_sooner(seed: int) -> None:
    """A coordinator reuses its seats for a few ms: read ``age`` seconds later, they must give what
    seats built then would (those free by then at 0, the others ``age`` sooner)."""
    rng = random.Random(seed)
    n = rng.choice([1, 3, 40, 300])
    residuals = [0.0] * rng.randint(0, n) + [rng.uniform(0, 5) for _ in range(n)]
    work, inflow, age = rng.uniform(0, 50), rng.choice([0.0, 0.5, 2.5, n + 1.0]), rng.uniform(0, 3)
    later = SeatTimes([max(r - age, 0.0) for r in residuals])
    assert SeatTimes(residuals).start_s(work, inflow, age) == pytest.approx(later.start_s(work, inflow))
    assert SeatTimes(residuals).first_s(age) == pytest.approx(later.first_s())


def test_pooled_start_edge_cases() -> None:
    assert SeatTimes([0.0, 0.0]).start_s(0.0) == 0.0, "a free seat and nothing ahead: now"
    assert SeatTimes([5.0, 3.0]).start_s(0.0) == 3.0, "nothing ahead: when the first seat frees"
    assert SeatTimes([0.0, 0.0]).start_s(4.0) == pytest.approx(2.0), "two seats share 4 seat-seconds"
    assert SeatTimes([]).start_s(1.0) == math.inf
    assert SeatTimes([0.0, 0.0]).start_s(1.0, inflow=2.5) == math.inf, "urgent work alone fills the seats"
    assert SeatTimes([0.0, 0.0]).start_s(2.0, inflow=1.0) == pytest.approx(2.0), "half the capacity left"
    assert SeatTimes([1.0, 4.0]).start_s(0.0, age=2.0) == 0.0, "the first seat freed meanwhile"


def test_heavy_tail_widens_only_short_queues() -> None:
    assert heavy_tail_factor(1) > heavy_tail_factor(5) > heavy_tail_factor(29) > 1.0
    assert heavy_tail_factor(0) == heavy_tail_factor(30) == heavy_tail_factor(1000) == 1.0


def test_p_meet_uses_both_deadlines() -> None:
    r = make_request("r", "m", 10, 10, 0.0, ttft_s=1.0, e2e_s=10.0)
    assert p_meet(r, 0.0, 0.5, 0.0, 5.0, 0.0) == 1.0
    assert p_meet(r, 0.0, 1.5, 0.0, 5.0, 0.0) == 0.0, "TTFT missed"
    assert p_meet(r, 0.0, 0.5, 0.0, 11.0, 0.0) == 0.0, "end-to-end missed"
    assert p_meet(r, 0.0, 1.0, 0.5, 5.0, 0.0) == pytest.approx(0.5), "mean on the deadline: a coin flip"


def test_step_calibrator_learns_the_engines_real_coefficients() -> None:
    prior = cost_model("llama-3.1-8b", "h100")
    cal = StepCalibrator(prior, half_life_steps=200)
    true = (0.004, 30e-6, 9e-6)  # a slower engine than the catalogue says
    rng = random.Random(0)
    steps = []
    for i in range(2000):
        p, d = rng.choice([0, 0, 512, 2048]), rng.randint(1, 256)
        steps.append(StepTiming(float(i), true[0] + true[1] * p + true[2] * d, p, d, d))
    cal.observe(steps)
    assert cal.coef == pytest.approx(true, rel=0.05)
    assert cal.step_s(1000, 100) == pytest.approx(true[0] + true[1] * 1000 + true[2] * 100, rel=0.02)


def test_residual_calibrator_corrects_a_biased_estimator_and_its_probabilities() -> None:
    rng = random.Random(1)
    cal = ResidualCalibrator(window=400, min_samples=50)
    assert cal.corrected(2.0) == 2.0 and cal.p_within(2.0, 1.0) is None, "no data: no opinion"
    for _ in range(400):  # the model says 1 s; reality is 3 s, +-20%
        cal.observe(1.0, 3.0 * rng.uniform(0.8, 1.2))
    assert cal.corrected(1.0) == pytest.approx(3.0, rel=0.1)
    assert cal.p_within(1.0, 2.0) == 0.0
    assert cal.p_within(1.0, 4.0) == 1.0
    assert cal.p_within(1.0, 3.0) == pytest.approx(0.5, abs=0.1)


def test_work_index_sums_what_is_ahead() -> None:
    idx = WorkIndex()
    items = [(5.0, 1.0, 0.1, 100), (2.0, 2.0, 0.2, 200), (9.0, 4.0, 0.4, 400), (2.05, 8.0, 0.8, 800)]
    for lax, w, v, p in items:
        idx.add(lax, w, v, prompt=p)
    assert idx.ahead(1.0) == (0, 0.0, 0.0)
    count, work, var = idx.ahead(5.0)
    assert (count, work, var) == (3, pytest.approx(11.0), pytest.approx(1.1))
    assert idx.prompt_ahead(5.0) == pytest.approx(1100)
    assert idx.ahead(math.inf)[1] == pytest.approx(15.0), "no deadline: last"
    idx.remove(2.0, 2.0, 0.2, prompt=200)
    assert idx.ahead(5.0)[:2] == (2, pytest.approx(9.0))
    assert idx.count == 3 and idx.work == pytest.approx(13.0)


def test_the_p_meet_told_is_the_rate_met_by_requests_told_as_much() -> None:
    c = PMeetCalibrator()
    assert c.told(0.3) == 0.3  # nothing seen: the model's own value
    for i in range(400):  # the model says 0.3; nine in ten of those requests meet their SLO
        c.observe(0.32, i % 10 != 0)
    assert abs(c.told(0.35) - 0.9) < 0.03
    assert c.told(0.95) == 0.95  # another bin, still unseen
    for _ in range(2000):  # the load changed: now none of them meets
        c.observe(0.32, False)
    assert c.told(0.35) < 0.05


def test_a_batchs_chance_from_its_rate_so_far_is_skewed_when_few_lines_are_done() -> None:
    """A batch's unsent lines follow at the rate it has finished lines so far, a rate known within
    a factor of a few after one line: its P(meet) said 17% for a batch that needed a rate 30 times
    its own (one line in 0.5 s, 299 left, 7 s to go). The same gap measured over 100 lines, and
    more or less time than the rate needs, gives the coin flips the rate's spread allows."""
    from qlm_plugin.coordinator.batches import p_rate_suffices

    assert p_rate_suffices(1, 0.5, 299, 7.0) < 1e-6
    assert p_rate_suffices(100, 10.0, 100, 10.0) == pytest.approx(0.5, abs=0.03)
    assert 0.6 < p_rate_suffices(100, 10.0, 100, 10.5) < 0.75
    assert 0.25 < p_rate_suffices(100, 10.0, 100, 9.5) < 0.35
    assert p_rate_suffices(100, 10.0, 100, 20.0) > 0.999
    assert p_rate_suffices(3, 1.0, 0, 0.0) == 1.0  # nothing left
    assert p_rate_suffices(3, 1.0, 5, 0.0) == 0.0  # past the deadline with lines left


def test_the_hand_written_distributions_agree_with_scipy() -> None:
    """The coordinator computes its few distribution functions without scipy.stats and
    scipy.special (a second of every process's start): the Poisson tail behind a batch's P(meet),
    the Student-t quantiles that widen a short queue's wait, the normal quantile of a length."""
    from scipy.special import gammaincc
    from scipy.stats import norm, t

    from qlm_plugin.brain.waiting_time import HEAVY_TAIL_BELOW, T_QUANTILES_90
    from qlm_plugin.coordinator.batches import poisson_at_most
    from qlm_plugin.domain.distributions import LengthDistribution

    rng = random.Random(3)
    for _ in range(3000):
        done = rng.choice([1, 2, 3, 7, 40, 300, 5000, 100_000])
        x = done * math.exp(rng.uniform(-4.0, 4.0))
        assert poisson_at_most(done - 1, x) == pytest.approx(float(gammaincc(done, x)), abs=1e-8)
    assert poisson_at_most(4, 0.0) == 1.0 and poisson_at_most(-1, 3.0) == 0.0
    scipys = [t.ppf(0.9, k) for k in range(1, HEAVY_TAIL_BELOW)]
    assert list(T_QUANTILES_90) == pytest.approx(scipys, rel=1e-12)
    length = LengthDistribution(mean=200.0, var=900.0)
    for p in (0.01, 0.3, 0.75, 0.95, 0.999):
        assert length.quantile(p) == pytest.approx(max(0.0, 200.0 + norm.ppf(p) * 30.0), rel=1e-12)
    assert LengthDistribution.point(7.0).quantile(0.8) == 7.0


def test_starting_the_coordinator_does_not_import_scipy() -> None:
    """scipy.stats and scipy.special took about a second of every start of ``qlm serve``, of each of
    its HTTP workers and of every CLI command that builds the brain; the planner's MILP imports
    scipy.optimize only when it runs."""
    code = (
        "import sys, qlm_plugin.coordinator.coordinator, qlm_plugin.coordinator.batches, "
        "qlm_plugin.brain.queue_manager; print(sorted(m for m in sys.modules if m.startswith('scipy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_estimates_scored_are_the_last_admissions_and_nothing_else_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each request's outcome was kept for ever (two dicts by request id: 150 B a request, found by
    a review after 100,000 batch lines). The score reads the last WAIT_LOG_SIZE admissions, and
    what a request left behind goes with its entry."""
    from qlm_plugin.brain import estimator as est
    from qlm_plugin.brain.fleet_view import FleetView
    from qlm_plugin.brain.global_queue import GlobalQueue
    from qlm_plugin.domain.distributions import WaitEstimate
    from qlm_plugin.domain.outcome import RequestOutcome, Status

    monkeypatch.setattr(est, "WAIT_LOG_SIZE", 10)
    costs = {"m": cost_model("llama-3.1-8b", "h100")}
    queue = GlobalQueue(costs)
    fleet = FleetView(costs, lambda view, state: None)
    e = est.WaitEstimator(costs, queue, fleet, predict=lambda r, g=0: None)  # type: ignore[arg-type,misc]
    for i in range(25):
        r = make_request(f"r{i}", "m", 32, 16, float(i), ttft_s=1.0)
        e.admitted(r.id, float(i), WaitEstimate("x", 2.0, 1.0, 3.0, 1.0, 0.9), 0.9)
        if i != 20:  # r20 never ends (its instance was lost, say)
            e.observe(RequestOutcome(r, Status.FINISHED, "x", float(i) + 4.0, float(i) + 5.0, 16))
    acc = e.accuracy()
    assert acc["est_samples"] == 9 and acc["est_samples_over_1s"] == 9  # r15-r24 but r20
    assert acc["est_mape_over_1s"] == pytest.approx(0.5)  # told 2 s, waited 4 s
    assert acc["est_p09_samples"] == 9 and acc["est_p09_observed"] == 0.0  # all missed a 1 s TTFT
    assert list(e._unended) == ["r20"]
    for i in range(25, 40):  # r20 leaves the log: forgotten, ended or not
        e.admitted(f"r{i}", float(i), WaitEstimate("x", 2.0, 1.0, 3.0, 1.0, 0.9), 0.9)
    assert "r20" not in e._unended and len(e._unended) == 10
