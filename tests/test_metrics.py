"""SLO attainment and latency metrics from outcomes."""

from __future__ import annotations

import pytest

from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import make_request
from qlm_plugin.tools.metrics import run_span, summarize


def outcome(
    i: int,
    ttft: float | None,
    e2e: float | None,
    *,
    ttft_slo: float | None = 1.0,
    e2e_slo: float | None = None,
    weight: float = 1.0,
    status: Status = Status.FINISHED,
) -> RequestOutcome:
    r = make_request(f"r{i}", "m", 10, 10, float(i), ttft_s=ttft_slo, e2e_s=e2e_slo, weight=weight)
    return RequestOutcome(
        r,
        status,
        first_token_time=None if ttft is None else r.arrival_time + ttft,
        finish_time=None if e2e is None else r.arrival_time + e2e,
        output_tokens=10 if status is Status.FINISHED else 0,
    )


def test_attainment_counts_every_slo_and_every_request() -> None:
    outs = [
        outcome(0, 0.5, 2.0),  # met
        outcome(1, 1.5, 2.0),  # TTFT missed
        outcome(2, 0.2, 50.0, e2e_slo=10.0),  # e2e missed
        outcome(3, None, None, status=Status.REJECTED),  # rejected counts as a miss
        outcome(4, 0.9, None, status=Status.UNFINISHED),  # never finished: a miss
    ]
    m = summarize(outs, span_s=10.0)
    assert m.requests == 5 and m.finished == 3 and m.rejected == 1
    assert m.slo_attainment == pytest.approx(1 / 5)
    assert m.goodput_rps == pytest.approx(0.1)
    assert m.throughput_rps == pytest.approx(0.3)
    assert m.output_tokens_per_s == pytest.approx(3.0)


def test_weighted_attainment_uses_request_weights() -> None:
    outs = [outcome(0, 0.5, 1.0, weight=3.0), outcome(1, 5.0, 6.0, weight=1.0)]
    assert summarize(outs, 1.0).weighted_attainment == pytest.approx(0.75)
    # every weight 0: all weigh the same, so the plain attainment (it read 0 when every SLO was met)
    free = [outcome(0, 0.5, 1.0, weight=0.0), outcome(1, 0.5, 1.0, weight=0.0)]
    assert summarize(free, 1.0).weighted_attainment == 1.0


def test_percentiles() -> None:
    outs = [outcome(i, ttft=float(i), e2e=float(i) + 1, ttft_slo=100.0) for i in range(1, 101)]
    m = summarize(outs, 100.0)
    assert m.ttft_p50_s == pytest.approx(50.5)
    assert m.ttft_p99_s == pytest.approx(99.01)
    assert m.e2e_p50_s == pytest.approx(51.5)


def test_span_runs_from_first_arrival_to_last_finish() -> None:
    outs = [outcome(2, 0.1, 3.0), outcome(5, 0.1, 10.0)]
    assert run_span(outs) == pytest.approx(13.0)
    assert summarize([], 0.0).slo_attainment == 0.0
