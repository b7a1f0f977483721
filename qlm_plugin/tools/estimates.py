"""How good the waiting-time estimates told to clients were: what each request was told at admission
(its estimated wait until the first token, and its probability of meeting its SLO) against what
happened, per SLO class.

* **MAPE** and **bias** over the requests that waited more than :data:`LONG_WAIT_S` for their first
  token: the mean of ``|told - actual| / actual``, and the median of ``(told - actual) / actual``
  (0: median-unbiased; positive: the estimator says longer than it turns out).
* **Calibration**: requests grouped by the P(meet) they were told, in deciles; in each decile with at
  least :data:`MIN_PER_DECILE` requests, the fraction that met its SLO against the mean P(meet) told.
  ``calibration_gap`` is the largest difference over those deciles.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from qlm_plugin.domain.outcome import RequestOutcome

LONG_WAIT_S = 1.0
MIN_PER_DECILE = 50

Told = tuple[float | None, float | None]  # (wait until first token, p_meet), as told at admission


def accuracy(outcomes: Sequence[RequestOutcome], told: Mapping[str, Told]) -> dict[str, dict[str, float]]:
    """Per class (and ``all``): ``n``, ``n_long``, ``mape``, ``bias``, ``calibration_gap``,
    ``deciles`` (how many deciles had enough requests) and per decile ``p<d>_told`` /
    ``p<d>_met`` / ``p<d>_n``. Classes without a single estimate are left out."""
    by_class: dict[str, list[tuple[RequestOutcome, Told]]] = {}
    for o in outcomes:
        t = told.get(o.request.id)
        if t is None or t[1] is None:
            continue
        by_class.setdefault(o.request.slo_class, []).append((o, t))
        by_class.setdefault("all", []).append((o, t))
    return {c: _stats(pairs) for c, pairs in sorted(by_class.items())}


def _stats(pairs: list[tuple[RequestOutcome, Told]]) -> dict[str, float]:
    out: dict[str, float] = {"n": float(len(pairs))}
    errors = []
    for o, (wait, _) in pairs:
        if o.first_token_time is None or wait is None or not math.isfinite(wait):
            continue
        actual = o.first_token_time - o.request.arrival_time
        if actual > LONG_WAIT_S:
            errors.append((wait - actual) / actual)
    out["n_long"] = float(len(errors))
    if errors:
        out["mape"] = sum(abs(e) for e in errors) / len(errors)
        out["bias"] = statistics.median(errors)
    bins: dict[int, list[tuple[float, bool]]] = {}
    for o, (_, p) in pairs:
        assert p is not None
        bins.setdefault(min(9, int(p * 10)), []).append((p, o.met_slo()))
    gap, full = 0.0, 0
    for d, items in sorted(bins.items()):
        p_told = sum(p for p, _ in items) / len(items)
        met = sum(m for _, m in items) / len(items)
        out[f"p{d}_told"], out[f"p{d}_met"], out[f"p{d}_n"] = p_told, met, float(len(items))
        if len(items) >= MIN_PER_DECILE:
            full += 1
            gap = max(gap, abs(met - p_told))
    out["calibration_gap"] = gap
    out["deciles"] = float(full)
    return out
