"""Length-predictor speed (pytest-benchmark). Run:
python -m pytest benchmarks/test_predictor_speed.py --benchmark-enable

Target: ``predict`` at ``generated_tokens == 0`` well under 20 us on the hot path (a key's distribution is
cached until the key learns a new length), ``observe`` O(1) amortised. The baseline in the same process is
``statistics.fmean`` over the same window of lengths (2,048): what recomputing a plain mean per call would
cost. Each benchmark reports its median as a ratio to that baseline (``extra_info["x_fmean"]``); the
assertions are on ratios, never on absolute times, so they hold on any machine.
"""

from __future__ import annotations

import itertools
import random
import statistics
import timeit
from collections import deque
from collections.abc import Iterator

import pytest

from qlm_plugin.brain.predictor import LengthPredictor
from qlm_plugin.domain.request import Request

WINDOW = 2048
GROUP = f"length predictor (window {WINDOW}) vs statistics.fmean over the window"


def _request(i: int, prompt: int, cls: str) -> Request:
    return Request(f"b{i}", "m", prompt, 4096, 0.0, slo_class=cls)


class Setup:
    """A predictor whose windows are all full (3 buckets x 2 classes, lognormal lengths), and the
    window of the key the benchmarks predict for."""

    def __init__(self) -> None:
        rng = random.Random(0)
        self.predictor = LengthPredictor(window=WINDOW)
        self.request = _request(-1, 500, "interactive")
        self.window: deque[float] = deque(maxlen=WINDOW)
        for i in range(12 * WINDOW):
            r = _request(i, rng.choice([100, 500, 2000]), rng.choice(["interactive", "batch"]))
            x = max(1, round(rng.lognormvariate(5.0, 0.9)))
            self.predictor.observe(r, x)
            if r.slo_class == "interactive" and r.prompt_tokens == 500:
                self.window.append(float(x))
        assert len(self.window) == WINDOW
        self.lengths: Iterator[int] = itertools.cycle(
            max(1, round(rng.lognormvariate(5.0, 0.9))) for _ in range(997)
        )


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def fmean_s(setup: Setup) -> float:
    """The baseline: seconds per ``statistics.fmean`` over the window (best of 5)."""
    values = list(setup.window)
    return min(timeit.repeat(lambda: statistics.fmean(values), number=500, repeat=5)) / 500


def _ratio(benchmark, baseline_s: float) -> float | None:  # type: ignore[no-untyped-def]
    """The benchmark's median over the baseline; None when benchmarks are disabled (a plain test run)."""
    if benchmark.stats is None:
        return None
    ratio = float(benchmark.stats.stats.median) / baseline_s
    benchmark.extra_info["x_fmean"] = round(ratio, 4)
    benchmark.extra_info["fmean_us"] = round(baseline_s * 1e6, 2)
    return ratio


def test_baseline_fmean_over_the_window(benchmark, setup: Setup) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = GROUP
    values = list(setup.window)
    assert benchmark(statistics.fmean, values) > 0


def test_predict_warm_cache(benchmark, setup: Setup, fmean_s: float) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = GROUP
    p, r = setup.predictor, setup.request
    p.predict(r)
    d = benchmark(p.predict, r)
    assert d.mean > 0
    ratio = _ratio(benchmark, fmean_s)
    assert ratio is None or ratio < 0.5, ratio  # a cached answer: a few dictionary look-ups


def test_predict_cold_cache(benchmark, setup: Setup, fmean_s: float) -> None:  # type: ignore[no-untyped-def]
    """Each round first teaches the key a new length (untimed), so the timed predict folds it into the
    sorted window and recomputes the distribution."""
    benchmark.group = GROUP
    p, r, lengths = setup.predictor, setup.request, setup.lengths
    d = benchmark.pedantic(
        p.predict, args=(r,), setup=lambda: p.observe(r, next(lengths)), rounds=3000, warmup_rounds=50
    )
    assert d.mean > 0
    ratio = _ratio(benchmark, fmean_s)
    assert ratio is None or ratio < 2.0, ratio


def test_predict_running_warm(benchmark, setup: Setup, fmean_s: float) -> None:  # type: ignore[no-untyped-def]
    """Conditioning on progress (generated_tokens > 0): binary searches in the cached sorted window."""
    benchmark.group = GROUP
    p, r = setup.predictor, setup.request
    p.predict(r, 137)
    d = benchmark(p.predict, r, 137)
    assert d.mean > 0
    ratio = _ratio(benchmark, fmean_s)
    assert ratio is None or ratio < 2.0, ratio


def test_predict_running_cold(benchmark, setup: Setup, fmean_s: float) -> None:  # type: ignore[no-untyped-def]
    """After a new length, conditioning rebuilds the window's prefix sums (a sort and two cumsums)."""
    benchmark.group = GROUP
    p, r, lengths = setup.predictor, setup.request, setup.lengths
    d = benchmark.pedantic(
        p.predict, args=(r, 137), setup=lambda: p.observe(r, next(lengths)), rounds=2000, warmup_rounds=50
    )
    assert d.mean > 0
    ratio = _ratio(benchmark, fmean_s)
    assert ratio is None or ratio < 10.0, ratio


def test_observe(benchmark, setup: Setup, fmean_s: float) -> None:  # type: ignore[no-untyped-def]
    """Three windows (bucket, class, model) take the length; nothing is sorted here."""
    benchmark.group = GROUP
    p, r, lengths = setup.predictor, setup.request, setup.lengths
    benchmark(lambda: p.observe(r, next(lengths)))
    ratio = _ratio(benchmark, fmean_s)
    assert ratio is None or ratio < 1.0, ratio
