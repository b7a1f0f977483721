"""Online output-length prediction as a distribution (ALISE's idea, with its uncertainty).

:class:`LengthPredictor` learns the true output lengths of finished requests, per
``(model, slo_class, prompt-length bucket)``, and answers with a
:class:`~qlm_plugin.domain.distributions.LengthDistribution` of the tokens a request *still* has to generate:
the empirical distribution of the recent lengths of its key, conditioned on what the request already
generated, and clipped to its ``max_tokens``. It scores its own predictions as the truth arrives
(prequential evaluation, :meth:`LengthPredictor.report`).

:class:`PredictorPlugin` puts a predictor behind the ``qlm_predict_output_length`` hook and teaches
it from ``qlm_request_finished``. (The clairvoyant ``oracle`` policy reads each request's true length
instead: :class:`~qlm_plugin.brain.queue_manager.QueueManager` with ``clairvoyant=True``.)
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from statistics import NormalDist
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl

__all__ = [
    "QUANTILES",
    "SOURCE_BUCKET",
    "SOURCE_CLASS",
    "SOURCE_MODEL",
    "SOURCE_PRIOR",
    "SOURCE_TAIL",
    "LengthPredictor",
    "PredictorPlugin",
    "PredictorReport",
]

#: The quantiles every prediction carries (and the report scores).
QUANTILES: Final[tuple[float, ...]] = (0.5, 0.9, 0.99)

_Z: Final[tuple[float, ...]] = tuple(NormalDist().inv_cdf(p) for p in QUANTILES)
#: Pending observations a window folds into its sorted copy one by one; beyond, it re-sorts.
_MERGE_LIMIT: Final = 32
#: Distributions cached per window (one per distinct max_tokens asked at generated_tokens == 0).
_CACHE_LIMIT: Final = 64

#: Where a prediction came from (LengthPredictor.source).
SOURCE_BUCKET: Final = "model/class/bucket"
SOURCE_CLASS: Final = "model/class"
SOURCE_MODEL: Final = "model"
SOURCE_PRIOR: Final = "prior"
SOURCE_TAIL: Final = "tail"
_LEVEL_NAMES: Final = (SOURCE_BUCKET, SOURCE_CLASS, SOURCE_MODEL)


class _Window:
    """The most recent ``capacity`` output lengths of one key.

    A numpy ring buffer holds them in arrival order; a sorted copy (for quantiles and conditioning) is
    brought up to date lazily, on the next prediction: pending additions and evictions are folded in one
    by one when they are few, else the window is re-sorted. Exact integer sums give the mean and
    variance; prefix sums (for conditional and clipped moments) are built on demand and kept until the
    next observation.
    """

    __slots__ = (
        "_added",
        "_capacity",
        "_pos",
        "_prefix",
        "_removed",
        "_resort",
        "_ring",
        "cache",
        "dirty",
        "n",
        "s1",
        "s2",
        "sorted",
    )

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ring: npt.NDArray[np.int64] = np.zeros(capacity, dtype=np.int64)
        self._pos = 0
        self.n = 0
        self.s1 = 0  # sum of the lengths in the window (exact)
        self.s2 = 0  # sum of their squares (exact)
        self.sorted: list[int] = []
        self._added: list[int] = []
        self._removed: list[int] = []
        self._resort = False
        self.dirty = False
        self._prefix: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
        self.cache: dict[int, LengthDistribution] = {}

    def add(self, x: int) -> None:
        """O(1): the sorted copy and the caches are updated at the next read."""
        if self.n < self._capacity:
            self._ring[self.n] = x
            self.n += 1
        else:
            pos = self._pos
            old: int = self._ring.item(pos)
            self._ring[pos] = x
            self._pos = pos + 1 if pos + 1 < self._capacity else 0
            self.s1 -= old
            self.s2 -= old * old
            if not self._resort:
                self._removed.append(old)
        self.s1 += x
        self.s2 += x * x
        if not self._resort:
            self._added.append(x)
            if len(self._added) > _MERGE_LIMIT:
                self._resort = True
                self._added.clear()
                self._removed.clear()
        self.dirty = True

    def refresh(self) -> None:
        """Bring the sorted copy up to date and drop what was derived from the old contents."""
        if self._resort:
            self.sorted = np.sort(self._ring[: self.n]).tolist()
            self._resort = False
        else:
            values = self.sorted
            for x in self._added:  # additions first: an evicted value may be one of them
                insort(values, x)
            for old in self._removed:
                del values[bisect_right(values, old) - 1]
            self._added.clear()
            self._removed.clear()
        self.dirty = False
        self._prefix = None
        self.cache.clear()

    def prefix(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Prefix sums of the sorted lengths and of their squares (index i: the sum of the i smallest)."""
        if self._prefix is None:
            ordered = np.sort(self._ring[: self.n])  # the same values as self.sorted, faster than a copy
            c1 = np.zeros(self.n + 1, dtype=np.int64)
            c2 = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(ordered, out=c1[1:])
            np.cumsum(ordered * ordered, out=c2[1:])
            self._prefix = (c1, c2)
        return self._prefix

    def tail_count(self, g: int) -> int:
        """How many lengths in the window exceed ``g``."""
        if self.dirty:
            self.refresh()
        return self.n - bisect_right(self.sorted, g)

    def remaining(self, g: int, cap: int) -> LengthDistribution:
        """The distribution of ``min(L, cap) - g`` over the lengths ``L > g`` (at least one exceeds g)."""
        if self.dirty:
            self.refresh()
        values = self.sorted
        n = self.n
        if g == 0 and values[-1] <= cap:
            # The common case (nothing to condition on, max_tokens does not bind): exact running sums.
            lo, k = 0, n
            s1, s2 = self.s1, self.s2
        else:
            lo = bisect_right(values, g)
            k = n - lo
            hi = bisect_right(values, cap)  # lengths above cap count as cap (the request stops there)
            c1, c2 = self.prefix()
            above = n - hi
            s1 = c1.item(hi) - c1.item(lo) + cap * above
            s2 = c2.item(hi) - c2.item(lo) + cap * cap * above
        room = float(cap - g)
        last = k - 1

        def remaining_quantile(p: float) -> float:
            # Linear interpolation (numpy's default) in values[lo:lo + k], then min(L, cap) - g.
            pos = p * last
            i = int(pos)
            v: float = values[lo + i]
            frac = pos - i
            if frac > 0.0:
                v += frac * (values[lo + i + 1] - v)
            v -= g  # then min(., cap - g): the request stops at max_tokens
            return 1.0 if v < 1.0 else (v if v < room else room)

        q50, q90, q99 = QUANTILES
        mean = s1 / k - g
        return LengthDistribution(
            mean=1.0 if mean < 1.0 else (mean if mean < room else room),
            var=max((k * s2 - s1 * s1) / (k * k), 0.0),
            quantiles=(
                (q50, remaining_quantile(q50)),
                (q90, remaining_quantile(q90)),
                (q99, remaining_quantile(q99)),
            ),
        )

    def mean_excess(self, m: int) -> float:
        """Mean overshoot of the ``m`` largest lengths over the next largest (the deepest threshold with
        ``m`` samples beyond it): the tail's scale where the data run out. Needs ``n >= m >= 1``."""
        if self.dirty:
            self.refresh()
        values = self.sorted
        n = self.n
        threshold = values[n - m - 1] if n > m else 0
        return max(sum(values[n - m :]) / m - threshold, 1.0)


def _exponential_tail(mean_excess: float, room: int) -> LengthDistribution:
    """Remaining = 1 + min(E, room - 1), E exponential of mean ``mean_excess - 1``: a memoryless tail
    that still runs (at least 1 token) and stops at max_tokens."""
    scale = mean_excess - 1.0
    span = room - 1
    if scale <= 0.0 or span <= 0:
        return LengthDistribution.point(1.0)
    r = span / scale
    tail = math.exp(-r)
    mean = scale * -math.expm1(-r)  # E[min(E, span)]
    second = 2.0 * scale * scale * (1.0 - tail * (1.0 + r))  # E[min(E, span)^2]
    var = max(second - mean * mean, 0.0)
    quantiles = tuple((p, 1.0 + min(-scale * math.log1p(-p), float(span))) for p in QUANTILES)
    return LengthDistribution(mean=1.0 + mean, var=var, quantiles=quantiles)


@dataclass(frozen=True, slots=True)
class PredictorReport:
    """Prequential scores of the predictions recorded at queueing, against the true lengths.

    ``mae_tokens``, ``mape`` and ``median_abs_error`` score the predicted *mean* (the point estimate
    the waiting-time estimator sums); ``mape`` is over true lengths >= 1; ``median_abs_error`` is to
    the nearest token. ``coverage[p]`` is the fraction of true remaining lengths at or below the
    predicted ``p``-quantile (calibrated: close to ``p``). NaN where nothing was scored.
    """

    n: int
    mae_tokens: float
    mape: float
    median_abs_error: float
    coverage: dict[float, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mae_tokens": self.mae_tokens,
            "mape": self.mape,
            "median_abs_error": self.median_abs_error,
            "coverage": {str(p): c for p, c in self.coverage.items()},
        }


class LengthPredictor:
    """Online predictor of output length as a distribution (ALISE's idea, with uncertainty).

    It keeps the ``window`` most recent true output lengths per ``(model, slo_class, prompt bucket)``,
    per ``(model, slo_class)`` and per ``model``, and predicts from the finest of them that holds at
    least ``min_samples`` relevant lengths (hierarchical backoff); with none, from a cold-start prior,
    a lognormal of mean ``prior_mean`` and coefficient of variation ``prior_cv``. Prompt buckets are
    ``[0, b0), [b0, b1), ..., [b_last, inf)`` for ``prompt_buckets = (b0, b1, ...)``.

    :meth:`predict` answers with the distribution of the *remaining* tokens, ``min(L, max_tokens) -
    generated`` for the lengths ``L > generated`` (the empirical conditional distribution): mean,
    variance and the 0.5, 0.9 and 0.99 quantiles, all in ``[1, max_tokens - generated]`` while the
    request runs. When fewer than ``min_samples`` lengths exceed ``generated`` at every level, the
    remaining is an exponential tail whose mean is the mean overshoot of the longest ``min_samples``
    lengths of the coarsest level that has them (else ``prior_mean``), capped at ``max_tokens -
    generated``.

    Cost: :meth:`observe` is O(1) amortised; :meth:`predict` at ``generated_tokens == 0`` is a few
    dictionary look-ups once a key's distribution is cached (the cache of a key lasts until it gets a
    new observation), and a few binary searches otherwise.

    A length observed at ``max_tokens`` is right-censored (the request might have gone on); it is
    kept as observed. Lengths below 1 count as 1 (a finished request emitted at least one token).

    Prequential self-evaluation: :meth:`record` keeps the prediction made when a request was queued
    (at most ``max_records``, the oldest dropped first), :meth:`observe` scores it when the truth
    arrives, :meth:`report` sums up.

    Not thread-safe: a predictor is owned by one event loop (the core's or the simulator's), which
    calls every method; share it across threads only behind a lock.
    """

    def __init__(
        self,
        *,
        window: int = 2048,
        min_samples: int = 30,
        prompt_buckets: Sequence[int] = (256, 1024, 4096),
        prior_mean: float = 256.0,
        prior_cv: float = 1.2,
        max_records: int = 100_000,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be an integer >= 1, got {min_samples!r}")
        if min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) must not exceed window ({window})")
        edges = tuple(prompt_buckets)
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in edges) or any(
            a >= b for a, b in pairwise(edges)
        ):
            raise ValueError(f"prompt_buckets must be increasing integers >= 1, got {prompt_buckets!r}")
        if not math.isfinite(prior_mean) or prior_mean < 1:
            raise ValueError(f"prior_mean must be a finite number >= 1, got {prior_mean!r}")
        if not math.isfinite(prior_cv) or prior_cv <= 0:
            raise ValueError(f"prior_cv must be a finite number > 0, got {prior_cv!r}")
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
            raise ValueError(f"max_records must be an integer >= 0, got {max_records!r}")
        self.window = window
        self.min_samples = min_samples
        self.prompt_buckets = edges
        self.prior_mean = float(prior_mean)
        self.prior_cv = float(prior_cv)
        self.max_records = max_records
        sigma2 = math.log1p(prior_cv * prior_cv)
        self._sigma = math.sqrt(sigma2)
        self._mu = math.log(prior_mean) - sigma2 / 2.0
        self._prior_cache: dict[int, LengthDistribution] = {}
        self._windows: dict[tuple[object, ...], _Window] = {}
        # Prequential state: request id -> (generated tokens at prediction, mean, quantile values).
        self._records: dict[str, tuple[int, float, tuple[float, ...]]] = {}
        self._scored = 0
        self._abs_err_sum = 0.0
        self._ape_sum = 0.0
        self._ape_n = 0
        self._abs_err_hist: Counter[int] = Counter()
        self._covered = [0] * len(QUANTILES)

    # ------------------------------------------------------------------------------------- keys

    def bucket(self, prompt_tokens: int) -> int:
        """The prompt-length bucket: 0 below the first edge, ``len(prompt_buckets)`` from the last."""
        return bisect_right(self.prompt_buckets, prompt_tokens)

    def _keys(self, request: Request) -> tuple[tuple[str, str, int], tuple[str, str], tuple[str]]:
        model, cls = request.model, request.slo_class
        return (model, cls, bisect_right(self.prompt_buckets, request.prompt_tokens)), (model, cls), (model,)

    # ------------------------------------------------------------------------------------- predicting

    def predict(self, request: Request, generated_tokens: int = 0) -> LengthDistribution:
        """The distribution of the tokens ``request`` still generates after ``generated_tokens``."""
        cap = request.max_tokens
        g = generated_tokens
        if g == 0:
            windows = self._windows
            model, cls = request.model, request.slo_class
            w = windows.get((model, cls, bisect_right(self.prompt_buckets, request.prompt_tokens)))
            if w is None or w.n < self.min_samples:
                w = windows.get((model, cls))
                if w is None or w.n < self.min_samples:
                    w = windows.get((model,))
                    if w is None or w.n < self.min_samples:
                        return self._prior(cap)
            if w.dirty:
                w.refresh()
            dist = w.cache.get(cap)
            if dist is None:
                if cap < 1:
                    return LengthDistribution.point(0.0)
                if len(w.cache) >= _CACHE_LIMIT:
                    w.cache.clear()
                dist = w.cache[cap] = w.remaining(0, cap)
            return dist
        return self._predict_running(request, g)[0]

    def source(self, request: Request, generated_tokens: int = 0) -> str:
        """Which level :meth:`predict` answers from: ``"model/class/bucket"``, ``"model/class"``,
        ``"model"``, ``"prior"`` (no level has ``min_samples`` lengths, at ``generated_tokens == 0``)
        or ``"tail"`` (the exponential tail, for a running request beyond the data)."""
        if generated_tokens == 0:
            for name, key in zip(_LEVEL_NAMES, self._keys(request), strict=True):
                w = self._windows.get(key)
                if w is not None and w.n >= self.min_samples:
                    return name
            return SOURCE_PRIOR
        return self._predict_running(request, generated_tokens)[1]

    def _predict_running(self, request: Request, g: int) -> tuple[LengthDistribution, str]:
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(f"generated_tokens must be an integer >= 0, got {g!r}")
        cap = request.max_tokens
        if g >= cap:
            return LengthDistribution.point(0.0), SOURCE_TAIL
        m = self.min_samples
        found: list[_Window] = []
        for name, key in zip(_LEVEL_NAMES, self._keys(request), strict=True):
            w = self._windows.get(key)
            if w is None or w.n < m:
                continue
            if w.tail_count(g) >= m:
                return w.remaining(g, cap), name
            found.append(w)
        # The coarsest level has seen the most long requests: its deepest tail sets the scale.
        excess = found[-1].mean_excess(m) if found else self.prior_mean
        return _exponential_tail(excess, cap - g), SOURCE_TAIL

    def _prior(self, cap: int) -> LengthDistribution:
        """The cold-start lognormal, ``min(L, cap)``, at least 1 token."""
        dist = self._prior_cache.get(cap)
        if dist is not None:
            return dist
        if cap < 1:
            return LengthDistribution.point(0.0)
        mu, s = self._mu, self._sigma
        if cap == 1:
            dist = LengthDistribution.point(1.0)
        else:
            log_cap = math.log(cap)

            def phi(x: float) -> float:
                return 0.5 * math.erfc(-x / math.sqrt(2.0))

            above = 1.0 - phi((log_cap - mu) / s)  # P(L > cap)
            m1 = math.exp(mu + s * s / 2.0) * phi((log_cap - mu - s * s) / s) + cap * above
            m2 = math.exp(2.0 * mu + 2.0 * s * s) * phi((log_cap - mu - 2.0 * s * s) / s) + cap * cap * above
            quantiles = tuple(
                (p, min(max(math.exp(mu + s * z), 1.0), float(cap)))
                for p, z in zip(QUANTILES, _Z, strict=True)
            )
            dist = LengthDistribution(
                mean=min(max(m1, 1.0), float(cap)), var=max(m2 - m1 * m1, 0.0), quantiles=quantiles
            )
        if len(self._prior_cache) >= _CACHE_LIMIT:
            self._prior_cache.clear()
        self._prior_cache[cap] = dist
        return dist

    # ------------------------------------------------------------------------------------- learning

    def observe(self, request: Request, output_tokens: int) -> None:
        """Learn the true output length of a finished request (and score its recorded prediction)."""
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"output_tokens must be an integer >= 0, got {output_tokens!r}")
        x = output_tokens if output_tokens >= 1 else 1
        windows = self._windows
        for key in self._keys(request):
            w = windows.get(key)
            if w is None:
                w = windows[key] = _Window(self.window)
            w.add(x)
        record = self._records.pop(request.id, None)
        if record is not None:
            self._score(record, output_tokens)

    def record(self, request: Request, dist: LengthDistribution, generated_tokens: int = 0) -> None:
        """Keep ``dist``, predicted for ``request`` after ``generated_tokens``, to score it when the
        request finishes. Beyond ``max_records`` pending predictions, the oldest is dropped."""
        records = self._records
        if self.max_records == 0:
            return
        records.pop(request.id, None)
        while len(records) >= self.max_records:
            del records[next(iter(records))]
        records[request.id] = (
            generated_tokens,
            dist.mean,
            tuple(dist.quantile(p) for p in QUANTILES),
        )

    def is_recorded(self, request_id: str) -> bool:
        """Whether a prediction for ``request_id`` waits for its truth."""
        return request_id in self._records

    def forget(self, request_id: str) -> None:
        """Drop the recorded prediction of a request that will not finish (rejected, cancelled)."""
        self._records.pop(request_id, None)

    def _score(self, record: tuple[int, float, tuple[float, ...]], output_tokens: int) -> None:
        generated, mean, qvalues = record
        truth = max(output_tokens - generated, 0)
        err = abs(mean - truth)
        self._scored += 1
        self._abs_err_sum += err
        self._abs_err_hist[round(err)] += 1
        if truth >= 1:
            self._ape_sum += err / truth
            self._ape_n += 1
        covered = self._covered
        for i, value in enumerate(qvalues):
            if truth <= value:
                covered[i] += 1

    def report(self) -> PredictorReport:
        """Scores of every recorded prediction whose truth has arrived."""
        n = self._scored
        if n == 0:
            return PredictorReport(
                n=0, mae_tokens=math.nan, mape=math.nan, median_abs_error=math.nan,
                coverage={p: math.nan for p in QUANTILES},
            )  # fmt: skip
        return PredictorReport(
            n=n,
            mae_tokens=self._abs_err_sum / n,
            mape=self._ape_sum / self._ape_n if self._ape_n else math.nan,
            median_abs_error=_median_of_counts(self._abs_err_hist, n),
            coverage={p: c / n for p, c in zip(QUANTILES, self._covered, strict=True)},
        )


def _median_of_counts(counts: Counter[int], n: int) -> float:
    """The median of ``n`` values given as value -> count."""
    lower_rank, upper_rank = (n - 1) // 2, n // 2
    lower: int | None = None
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if lower is None and seen > lower_rank:
            lower = value
        if seen > upper_rank:
            return (float(lower if lower is not None else value) + value) / 2.0
    return math.nan


class PredictorPlugin:
    """The ``qlm_predict_output_length`` policy hook backed by a :class:`LengthPredictor`.

    Records the prediction made when a request is first queued and learns from every finished
    request (``qlm_request_finished``), so ``predictor.report()`` scores the predictions online.
    Runs on the caller's event loop, like the predictor (not thread-safe).
    """

    def __init__(self, predictor: LengthPredictor | None = None) -> None:
        self.predictor = predictor if predictor is not None else LengthPredictor()

    @hookimpl
    def qlm_predict_output_length(self, request: Request, generated_tokens: int) -> LengthDistribution:
        return self.predictor.predict(request, generated_tokens)

    @hookimpl
    def qlm_request_queued(self, request: Request, instance_id: str | None, now: float) -> None:
        # Once per request: when it enters the global queue or, without one, its first instance queue
        # (a re-queue after preemption is not a new prediction to score).
        predictor = self.predictor
        if not predictor.is_recorded(request.id):
            predictor.record(request, predictor.predict(request, 0))

    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        if outcome.status is Status.FINISHED:
            self.predictor.observe(outcome.request, outcome.output_tokens)
        else:
            self.predictor.forget(outcome.request.id)

    @hookimpl
    def qlm_stats(self) -> dict[str, float]:
        """The predictor's own error on the requests it predicted at queueing (prequential)."""
        report = self.predictor.report()
        if report.n == 0:
            return {}
        out = {"pred_samples": float(report.n), "pred_mae_tokens": report.mae_tokens}
        for q, covered in report.coverage.items():
            out[f"pred_coverage_q{round(q * 100)}"] = covered
        return out
