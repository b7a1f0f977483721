"""Serving metrics from request outcomes: SLO attainment, goodput, throughput, latency percentiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from qlm_plugin.domain.outcome import RequestOutcome, Status


@dataclass(frozen=True, slots=True)
class Metrics:
    requests: int
    finished: int
    rejected: int
    slo_attainment: float  # fraction of all requests (rejected and unfinished included) that met every SLO
    weighted_attainment: float  # the same, each request counted with its weight
    goodput_rps: float  # requests that met their SLOs, per second of the run's span
    throughput_rps: float  # finished requests per second
    output_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    preemptions: int
    wasted_tokens: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: Sequence[RequestOutcome], span_s: float) -> Metrics:
    span = max(span_s, 1e-9)
    n = len(outcomes)
    finished = [o for o in outcomes if o.status is Status.FINISHED]
    met = [o for o in outcomes if o.met_slo()]
    total_w = sum(o.request.weight for o in outcomes)
    ttfts = [o.first_token_time - o.request.arrival_time for o in outcomes if o.first_token_time is not None]
    e2es = [o.finish_time - o.request.arrival_time for o in finished if o.finish_time is not None]
    return Metrics(
        requests=n,
        finished=len(finished),
        rejected=sum(1 for o in outcomes if o.status is Status.REJECTED),
        slo_attainment=len(met) / n if n else 0.0,
        # every weight 0: all weigh the same (the plain attainment, not 0)
        weighted_attainment=sum(o.request.weight for o in met) / total_w
        if total_w
        else len(met) / n
        if n
        else 0.0,
        goodput_rps=len(met) / span,
        throughput_rps=len(finished) / span,
        output_tokens_per_s=sum(o.output_tokens for o in finished) / span,
        ttft_p50_s=_pct(ttfts, 50),
        ttft_p99_s=_pct(ttfts, 99),
        e2e_p50_s=_pct(e2es, 50),
        e2e_p99_s=_pct(e2es, 99),
        preemptions=sum(o.preemptions for o in outcomes),
        wasted_tokens=sum(o.wasted_tokens for o in outcomes),
    )


def run_span(outcomes: Sequence[RequestOutcome]) -> float:
    """First arrival to last completion (or last arrival when nothing finished)."""
    if not outcomes:
        return 0.0
    start = min(o.request.arrival_time for o in outcomes)
    ends = [o.finish_time for o in outcomes if o.finish_time is not None]
    end = max(ends) if ends else max(o.request.arrival_time for o in outcomes)
    return end - start
