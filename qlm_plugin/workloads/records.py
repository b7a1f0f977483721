"""Workloads: reshaping request records, synthetic arrivals, and turning records into requests.

A workload is a list of :class:`~qlm_plugin.workloads.trace_files.TraceRecord` (arrival time, prompt
length, true output length), sorted by arrival. Sources are trace files
(:mod:`~qlm_plugin.workloads.trace_files`: the Azure, BurstGPT and Mooncake schemas, and the samples
shipped with the package) and :func:`synthetic` arrivals. :func:`scale_arrivals`, :func:`window` and
:func:`sample` reshape a workload; :func:`assign` gives each record a model, an SLO class and a tenant
and validates it into a :class:`~qlm_plugin.domain.request.Request`.

Every function that draws random numbers takes an explicit :class:`random.Random`, so a seeded
generator makes the result reproducible.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from qlm_plugin.domain.request import ModelSpec, Request, RequestValidationError, SLOClass, make_request
from qlm_plugin.workloads.trace_files import TraceRecord

__all__ = [
    "Rejected",
    "Share",
    "assign",
    "sample",
    "scale_arrivals",
    "synthetic",
    "window",
]


# --------------------------------------------------------------------------------------------- transforming


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(name: str, value: float) -> float:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def scale_arrivals(
    records: Sequence[TraceRecord], *, rate_scale: float | None = None, target_rps: float | None = None
) -> list[TraceRecord]:
    """Compress or stretch arrival times; lengths are kept.

    ``rate_scale=2`` makes arrivals twice as dense (every arrival time is divided by 2). ``target_rps``
    scales so that the mean rate over the trace span, ``(len(records) - 1) / (last - first arrival)``
    (one over the mean gap), equals ``target_rps``; it needs at least two records with distinct arrivals.
    Give at most one of the two; with neither, the result is an unchanged copy. Non-positive or
    non-finite values raise ValueError.
    """
    if rate_scale is not None and target_rps is not None:
        raise ValueError("give rate_scale or target_rps, not both")
    if rate_scale is not None:
        factor = _check_positive("rate_scale", rate_scale)
    elif target_rps is not None:
        target = _check_positive("target_rps", target_rps)
        if len(records) < 2:
            raise ValueError(f"target_rps needs at least 2 records, got {len(records)}")
        arrivals = [record.arrival_s for record in records]
        span = max(arrivals) - min(arrivals)
        if span <= 0:
            raise ValueError("target_rps: all records arrive at the same time, the trace has no rate")
        factor = target / ((len(records) - 1) / span)
    else:
        return list(records)
    return [TraceRecord(r.arrival_s / factor, r.prompt_tokens, r.output_tokens) for r in records]


def window(
    records: Iterable[TraceRecord], *, start_s: float = 0.0, duration_s: float | None = None
) -> list[TraceRecord]:
    """The records with ``start_s <= arrival_s < start_s + duration_s``, re-based to start at 0.

    ``duration_s=None`` keeps everything from ``start_s`` on. Order is kept. An empty window gives ``[]``.
    """
    if not _is_real(start_s):
        raise ValueError(f"start_s must be a finite number, got {start_s!r}")
    end = math.inf if duration_s is None else start_s + _check_positive("duration_s", duration_s)
    kept = [record for record in records if start_s <= record.arrival_s < end]
    if not kept:
        return []
    base = min(record.arrival_s for record in kept)
    return [TraceRecord(r.arrival_s - base, r.prompt_tokens, r.output_tokens) for r in kept]


def sample(
    records: Sequence[TraceRecord],
    *,
    n: int | None = None,
    fraction: float | None = None,
    rng: random.Random,
) -> list[TraceRecord]:
    """A uniform random subset without replacement, in input order with its arrival times (thinning).

    Give exactly one of ``n`` (0 <= n <= len(records)) and ``fraction`` (0 <= fraction <= 1; keeps
    ``round(fraction * len(records))`` records). Thinning a Poisson trace by ``fraction`` gives a Poisson
    trace of ``fraction`` times the rate.
    """
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n and fraction")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(records):
            raise ValueError(f"n must be an integer in [0, {len(records)}], got {n!r}")
        k = n
    else:
        assert fraction is not None
        if not _is_real(fraction) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        k = round(fraction * len(records))
    return [records[i] for i in sorted(rng.sample(range(len(records)), k))]


# --------------------------------------------------------------------------------------------- synthetic

_ARRIVALS = ("poisson", "gamma", "onoff")


def synthetic(
    *,
    rate_rps: float,
    duration_s: float,
    rng: random.Random,
    arrival: str = "poisson",
    cv: float = 1.0,
    lengths: Sequence[TraceRecord] | None = None,
    prompt_mean: float = 1024,
    output_mean: float = 128,
    sigma: float = 1.0,
    on_s: float = 10.0,
    off_s: float = 30.0,
    off_rate_fraction: float = 0.1,
) -> list[TraceRecord]:
    """A synthetic workload over ``[0, duration_s)``: first arrival at 0, then i.i.d. gaps of mean 1/rate.

    ``arrival="poisson"``: exponential gaps (``cv`` must stay 1). ``arrival="gamma"``: gamma gaps with
    coefficient of variation ``cv`` (shape ``1/cv**2``); ``cv=1`` is Poisson, ``cv > 1`` bursty, ``cv < 1``
    more regular. ``arrival="onoff"``: bursts. Poisson arrivals whose rate switches between an on
    phase and an off phase, with exponentially distributed phase lengths of means ``on_s`` and
    ``off_s`` (the run starts in a burst); the off rate is ``off_rate_fraction`` of the on rate, and the
    on rate is set so that the long-run mean stays ``rate_rps``.

    Lengths: with ``lengths``, each record takes the (prompt, output) pair of a record drawn from it with
    replacement, which keeps the real joint distribution; else both are lognormal with log-sigma ``sigma``
    and means ``prompt_mean`` and ``output_mean`` (``mu = log(mean) - sigma**2/2``), rounded, >= 1 token.

    Deterministic for a seeded ``rng``. Bad parameters raise ValueError naming the parameter.
    """
    rate = _check_positive("rate_rps", rate_rps)
    duration = _check_positive("duration_s", duration_s)
    shape = _check_positive("cv", cv) ** -2
    if arrival not in _ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(_ARRIVALS)}, got {arrival!r}")
    if arrival != "gamma" and cv != 1.0:
        raise ValueError(f"cv applies to arrival='gamma' only (Poisson gaps have cv 1), got cv={cv!r}")
    on = _check_positive("on_s", on_s)
    off = _check_positive("off_s", off_s)
    if not _is_real(off_rate_fraction) or not 0 <= off_rate_fraction <= 1:
        raise ValueError(f"off_rate_fraction must be within [0, 1], got {off_rate_fraction!r}")
    pool = None if lengths is None else list(lengths)
    if pool is not None and not pool:
        raise ValueError("lengths must not be empty")
    prompt_mu = math.log(_check_positive("prompt_mean", prompt_mean))
    output_mu = math.log(_check_positive("output_mean", output_mean))
    if not _is_real(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    prompt_mu -= sigma * sigma / 2
    output_mu -= sigma * sigma / 2

    if arrival == "poisson":

        def gap() -> float:
            return rng.expovariate(rate)
    elif arrival == "gamma":
        scale = 1.0 / (rate * shape)

        def gap() -> float:
            return rng.gammavariate(shape, scale)
    else:
        gap = _on_off_gaps(rng, rate, on, off, off_rate_fraction)

    records: list[TraceRecord] = []
    t = 0.0
    while t < duration:
        if pool is not None:
            picked = rng.choice(pool)
            prompt, output = picked.prompt_tokens, picked.output_tokens
        else:
            prompt = max(1, round(rng.lognormvariate(prompt_mu, sigma)))
            output = max(1, round(rng.lognormvariate(output_mu, sigma)))
        records.append(TraceRecord(t, prompt, output))
        t += gap()
    return records


def _on_off_gaps(
    rng: random.Random, rate: float, on_s: float, off_s: float, off_fraction: float
) -> Callable[[], float]:
    """Gaps of a two-phase Markov-modulated Poisson process whose long-run mean rate is ``rate``."""
    burst = rate * (on_s + off_s) / (on_s + off_fraction * off_s)
    rates = (burst, burst * off_fraction)
    means = (on_s, off_s)
    phase, left = 0, rng.expovariate(1.0 / on_s)

    def gap() -> float:
        nonlocal phase, left
        waited = 0.0
        while True:
            # Memoryless: a draw cut short by the phase's end is redrawn at the next phase's rate.
            step = rng.expovariate(rates[phase]) if rates[phase] > 0 else math.inf
            if step <= left:
                left -= step
                return waited + step
            waited += left
            phase = 1 - phase
            left = rng.expovariate(1.0 / means[phase])

    return gap


# --------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Share:
    """A name with a relative share; shares need not sum to 1 but must be finite and > 0."""

    name: str
    share: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Share.name must be a non-empty string")
        _check_positive(f"share of {self.name!r}", self.share)


@dataclass(slots=True)
class Rejected:
    """A record :func:`assign` could not turn into a valid request."""

    index: int
    """The record's index in the input."""
    error: RequestValidationError


def _cumulative(what: str, shares: Sequence[float]) -> list[float]:
    if not shares:
        raise ValueError(f"{what} must not be empty")
    total = 0.0
    cumulative = []
    for share in shares:
        total += _check_positive(f"{what} share", share)
        cumulative.append(total)
    return cumulative


def assign(
    records: Sequence[TraceRecord],
    *,
    models: Sequence[Share],
    classes: Sequence[tuple[SLOClass, float]],
    rng: random.Random,
    model_specs: Mapping[str, ModelSpec] | None = None,
    max_tokens: int = 2048,
    tenants: Sequence[Share] = (),
    id_prefix: str = "r",
) -> tuple[list[Request], list[Rejected]]:
    """Turn records into validated requests, each with a model, SLO class and tenant drawn by share.

    Request ``i`` gets id ``f"{id_prefix}{i}"``, the record's arrival, prompt and true output length, and
    the class's SLO budgets, priority and weight. Its ``max_tokens`` is the client's ``max_tokens`` but
    never below the true output length and, where ``model_specs`` knows the model's context window,
    clipped to fit it: ``max(output, min(max_tokens, context_len - prompt))``. Records that fail
    validation (a prompt that does not fit the context, a true output that does not fit beside it) go to
    the rejected list with the :class:`RequestValidationError` naming the field; none is dropped silently.

    Each record consumes exactly three ``rng.random()`` draws (model, class, tenant, in that order, drawn
    even where there is a single choice), so the result is deterministic for a seeded ``rng`` and changing
    one dimension's shares never reshuffles the others. Without ``tenants`` every request is tenant
    ``"default"``. Configuration errors (empty or non-positive shares, a model missing from
    ``model_specs``) raise ValueError.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    model_names = [share.name for share in models]
    model_cum = _cumulative("models", [share.share for share in models])
    class_list = [cls for cls, _ in classes]
    class_cum = _cumulative("classes", [share for _, share in classes])
    tenant_names = [share.name for share in tenants] or ["default"]
    tenant_cum = _cumulative("tenants", [share.share for share in tenants] or [1.0])
    context: list[int | None] = [None] * len(model_names)
    if model_specs is not None:
        unknown = [name for name in model_names if name not in model_specs]
        if unknown:
            served = ", ".join(sorted(model_specs)) or "none"
            raise ValueError(f"models not in model_specs: {', '.join(unknown)} (specs for: {served})")
        context = [model_specs[name].context_len for name in model_names]

    # bisect's hi= caps the index at the last choice, should rounding ever put a draw at the total.
    m_total, m_last = model_cum[-1], len(model_cum) - 1
    c_total, c_last = class_cum[-1], len(class_cum) - 1
    t_total, t_last = tenant_cum[-1], len(tenant_cum) - 1
    draw, make = rng.random, make_request
    requests: list[Request] = []
    rejected: list[Rejected] = []
    for i, record in enumerate(records):
        m = bisect_right(model_cum, draw() * m_total, 0, m_last)
        c = bisect_right(class_cum, draw() * c_total, 0, c_last)
        t = bisect_right(tenant_cum, draw() * t_total, 0, t_last)
        prompt, output = record.prompt_tokens, record.output_tokens
        context_len = context[m]
        room = max_tokens if context_len is None else min(max_tokens, context_len - prompt)
        try:
            request = make(
                f"{id_prefix}{i}",
                model_names[m],
                prompt,
                output if output > room else room,
                record.arrival_s,
                slo_class=class_list[c],
                tenant=tenant_names[t],
                true_output_tokens=output,
                models=model_specs,
            )
        except RequestValidationError as error:
            rejected.append(Rejected(i, error.with_traceback(None)))  # no frames kept alive
        else:
            requests.append(request)
    return requests, rejected
