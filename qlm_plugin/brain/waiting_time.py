"""Building blocks of request waiting time (RWT) estimation (QLM); the queue manager
(:mod:`qlm_plugin.brain.estimator`) combines them.

* :class:`SeatTimes`: when a request gets a seat. The seats of the instances serving its model
  free as their running requests finish, then work through the seat-seconds queued ahead of it, while
  more urgent work keeps arriving and is served first (a fluid multi-server priority queue).
* :func:`heavy_tail_factor`: output lengths are random, so the work ahead is a sum of random service
  times, about normal by the central limit theorem (variance ``sum(var_i) / seats^2``). With few
  requests ahead the sum is far from normal: a Student-t with that many degrees of freedom widens
  the tail.
* :func:`p_meet`: the probability of meeting the TTFT and end-to-end deadlines.
* :class:`StepCalibrator`: step time calibrated online, as an exponentially weighted fit of
  ``b0 + b1*prefill + b2*decode`` to the step timings backends report, starting from the cost model.
* :class:`ResidualCalibrator`: estimates calibrated online against outcomes (conformal-style).
* :class:`HeadOfLine`: the delay history of one lane: how long its oldest waiting request has waited.

Not thread-safe: owned by the queue manager's loop.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np

from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.instance import StepTiming
from qlm_plugin.domain.request import Request

#: Below this many requests ahead, the waiting time's tail is widened (Student-t).
HEAVY_TAIL_BELOW = 30


class StepCalibrator:
    """Online least-squares fit of step time = b0 + b1*prefill + b2*decode (seconds), exponentially
    forgetting old steps, with the cost model as the prior (a few pseudo-observations)."""

    def __init__(
        self, cost: CostModel, *, half_life_steps: float = 2000.0, prior_weight: float = 20.0
    ) -> None:
        self._decay = 0.5 ** (1.0 / half_life_steps)
        prior = np.array([cost.b0_us, cost.b1_us, cost.b2_us]) * 1e-6
        # Prior as pseudo-observations at representative operating points.
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        for p, d in ((0, 1), (0, 64), (512, 32), (2048, 0), (0, 256)):
            x = np.array([1.0, p, d])
            self._xtx += prior_weight * np.outer(x, x)
            self._xty += prior_weight * x * (x @ prior)
        self.coef = prior
        self._seen: set[tuple[float, float]] = set()
        self.observations = 0

    def observe(self, timings: Iterable[StepTiming]) -> None:
        changed = False
        for s in timings:
            key = (s.start, s.duration_s)
            if key in self._seen:
                continue
            self._seen.add(key)
            x = np.array([1.0, s.prefill_tokens, s.decode_tokens])
            self._xtx = self._decay * self._xtx + np.outer(x, x)
            self._xty = self._decay * self._xty + x * s.duration_s
            self.observations += 1
            changed = True
        if len(self._seen) > 4096:
            self._seen.clear()  # memory bound; re-reporting the same window is rare and harmless
        if changed:
            coef = np.linalg.lstsq(self._xtx, self._xty, rcond=None)[0]
            self.coef = np.maximum(coef, 0.0)

    def step_s(self, prefill_tokens: float, decode_tokens: float) -> float:
        b0, b1, b2 = self.coef
        return float(b0 + b1 * prefill_tokens + b2 * decode_tokens)


def p_meet(
    request: Request, now: float, wait_mean: float, wait_std: float, done_mean: float, done_std: float
) -> float:
    """Probability that first token and completion land before the request's deadlines."""
    p = 1.0
    if request.slo.ttft_deadline is not None:
        p = _cdf(request.slo.ttft_deadline - now - wait_mean, wait_std)
    if request.slo.e2e_deadline is not None:
        p = min(p, _cdf(request.slo.e2e_deadline - now - done_mean, done_std))
    return p


def _cdf(slack: float, std: float) -> float:
    """Standard normal CDF of slack/std (math.erf: scipy's per-call overhead dominates here)."""
    if not math.isfinite(slack):
        return 1.0 if slack > 0 else 0.0
    if std <= 1e-9:
        return 1.0 if slack >= 0 else 0.0
    return 0.5 * (1.0 + math.erf(slack / (std * math.sqrt(2.0))))


class SeatTimes:
    """When each seat of a model's serving instances frees: seconds from the time it was built
    (one per seat, sorted; 0 for a free seat), with their running sums, so that the start of any
    request (:meth:`start_s`) takes O(log seats), at that time or later, without a copy: a
    coordinator asks for every admission and keeps the seats for a few milliseconds."""

    __slots__ = ("free_at", "prefix")

    def __init__(self, free_at: Iterable[float]) -> None:
        self.free_at = sorted(float(r) for r in free_at)
        self.prefix = list(itertools.accumulate(self.free_at))  # sequential sums, as a loop adds

    def __len__(self) -> int:
        return len(self.free_at)

    def first_s(self, age: float = 0.0) -> float:
        """When the first seat frees, ``age`` seconds after the seats were built."""
        return max(self.free_at[0] - age, 0.0) if self.free_at else math.inf

    def start_s(self, ahead_seat_s: float, inflow: float = 0.0, age: float = 0.0) -> float:
        """When a seat takes a request with ``ahead_seat_s`` seat-seconds queued before it, asked
        ``age`` seconds after the seats were built: the seats free, then work through the queue
        (a fluid multi-server queue), while more urgent work keeps arriving at ``inflow``
        seat-seconds per second and is served first (a priority queue's lower class sees the
        capacity the higher one leaves). Solves sum(max(0, t - r_i)) = work + inflow*t for t."""
        r, n = self.free_at, len(self.free_at)
        if n == 0:
            return math.inf
        if ahead_seat_s <= 0 and inflow <= 0:
            return self.first_s(age)
        # Seats free by ``age`` are free now; the others free ``age`` sooner.
        zero = bisect.bisect_right(r, age) if age > 0 else 0
        before = self.prefix[zero - 1] if zero else 0.0

        def freed(k: int) -> float:  # sum of the first k+1 seats' times, as of ``age``
            return 0.0 if k < zero else self.prefix[k] - before - (k - zero + 1) * age

        def frees(k: int) -> float:
            return math.inf if k >= n else max(r[k] - age, 0.0)

        def starts(k: int) -> float:  # with seats 0..k free by then; inf where urgent work fills them
            active = k + 1 - inflow
            return (ahead_seat_s + freed(k)) / active if active > 0 else math.inf

        # The first k whose start falls before seat k+1 frees: false, then true (the excess work
        # sum(max(0, t - r_i)) - inflow*t is convex and starts at or below the work).
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if starts(mid) <= frees(mid + 1):
                hi = mid
            else:
                lo = mid + 1
        if lo == n:
            return math.inf  # more urgent work alone fills every seat
        return max(starts(lo), frees(lo))


def heavy_tail_factor(ahead: int) -> float:
    """Widening of a normal standard deviation so its 90% quantile matches a Student-t with
    ``ahead`` degrees of freedom (sums of few random lengths are far from normal)."""
    if ahead <= 0 or ahead >= HEAVY_TAIL_BELOW:
        return 1.0
    return _T_FACTORS[ahead]


#: ``scipy.stats.t.ppf(0.9, k)`` for k = 1 .. HEAVY_TAIL_BELOW - 1, written out: importing
#: ``scipy.stats`` took about a second of every process's start (tests/test_estimator.py checks them).
T_QUANTILES_90 = (
    3.0776835371752544, 1.8856180831641272, 1.637744353696209, 1.533206274058944,
    1.4758840488244815, 1.4397557472651483, 1.4149239276505086, 1.3968153097438654,
    1.3830287383966329, 1.372183641110336, 1.3634303180205407, 1.356217334023205,
    1.3501712887800552, 1.345030374454651, 1.3406056078504558, 1.3367571673273153,
    1.3333793897216268, 1.3303909435699093, 1.3277282090267986, 1.3253407069850465,
    1.3231878738651728, 1.321236741613362, 1.3194602398161621, 1.3178359336731498,
    1.31634507267387, 1.3149718642705175, 1.3137029128292737, 1.3125267815926664,
    1.311433647301551,
)  # fmt: skip
_T_FACTORS = [1.0] + [q / 1.2815515655446004 for q in T_QUANTILES_90]


#: Arrivals a lane's delay history keeps (a bound on its memory if its head never leaves).
MAX_LANE_ARRIVALS = 100_000


class HeadOfLine:
    """The head-of-line delay of one lane (one model and SLO class, whose requests share a budget
    and so are served first come, first served among themselves): how long the oldest request still
    waiting has waited so far. Under a backlog a new arrival waits about as long as that (the HOL
    predictor of Ibrahim & Whitt, "Real-time delay estimation based on delay history", 2009): it is
    measured, so it holds what a model of the queue misses (the urgent work that keeps overtaking,
    swaps, the engines' real pace), and it follows a load that changes, which a drain rate
    extrapolated from the last seconds does not. ``waiting(request_id)`` says whether a request
    still waits in order (not handed to an engine, not late, not gone); the others are dropped as
    they reach the head (at most ``MAX_LANE_ARRIVALS`` are kept: the oldest go first)."""

    def __init__(self, waiting: Callable[[str], bool]) -> None:
        self._waiting = waiting
        self._arrivals: deque[tuple[float, str]] = deque(maxlen=MAX_LANE_ARRIVALS)

    def arrived(self, request_id: str, at: float) -> None:
        self._arrivals.append((at, request_id))

    def delay_s(self, now: float) -> float:
        """How long the oldest request still waiting has waited; 0 with no backlog."""
        arrivals = self._arrivals
        while arrivals and not self._waiting(arrivals[0][1]):
            arrivals.popleft()
        return max(0.0, now - arrivals[0][0]) if arrivals else 0.0


class ResidualCalibrator:
    """Online calibration of a time estimate against what happened (conformal-style): keeps the
    log-ratios actual/predicted of recent requests, corrects new estimates by their median, and
    answers P(actual <= budget) from their empirical distribution. Until it has ``min_samples`` it
    answers None and the model's normal approximation is used."""

    def __init__(self, window: int = 512, min_samples: int = 50) -> None:
        self.window = window
        self.min_samples = min_samples
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []

    def observe(self, predicted_s: float, actual_s: float) -> None:
        if not (math.isfinite(predicted_s) and math.isfinite(actual_s)):
            return
        r = math.log((actual_s + 0.05) / (predicted_s + 0.05))
        self._fifo.append(r)
        bisect.insort(self._sorted, r)
        if len(self._fifo) > self.window:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    @property
    def ready(self) -> bool:
        return len(self._sorted) >= self.min_samples

    def corrected(self, predicted_s: float) -> float:
        if not self.ready:
            return predicted_s
        median = self._sorted[len(self._sorted) // 2]
        return (predicted_s + 0.05) * math.exp(median) - 0.05

    def p_within(self, predicted_s: float, budget_s: float) -> float | None:
        """P(actual <= budget) for a raw prediction, from the observed ratios; None if not ready."""
        if not self.ready:
            return None
        if budget_s <= 0:
            return 0.0
        if not math.isfinite(predicted_s):
            return 0.0
        threshold = math.log((budget_s + 0.05) / (predicted_s + 0.05))
        return bisect.bisect_right(self._sorted, threshold) / len(self._sorted)


class PMeetCalibrator:
    """Online calibration of a probability of meeting an SLO (reliability binning): the model's
    P(meet) falls in one of ``bins`` equal bins, and what is told is the rate at which requests told
    that bin's P(meet) lately met their SLO, shrunk towards the model's own value while the bin has
    few outcomes. Recent outcomes weigh most (each bin forgets with a memory of ``memory`` outcomes),
    so it follows a load that changes. Not thread-safe: one per class, owned by its estimator's loop."""

    def __init__(self, bins: int = 10, memory: float = 300.0, prior_weight: float = 10.0) -> None:
        self.bins = bins
        self.keep = 1.0 - 1.0 / memory
        self.prior_weight = prior_weight
        self._n = [0.0] * bins
        self._met = [0.0] * bins

    def _bin(self, p: float) -> int:
        return min(self.bins - 1, max(0, int(p * self.bins)))

    def observe(self, p_model: float, met: bool) -> None:
        if not math.isfinite(p_model):
            return
        b = self._bin(p_model)
        self._n[b] = self._n[b] * self.keep + 1.0
        self._met[b] = self._met[b] * self.keep + float(met)

    def told(self, p_model: float) -> float:
        """The calibrated P(meet) for a model's ``p_model``."""
        if not math.isfinite(p_model):
            return p_model
        b = self._bin(p_model)
        k = self.prior_weight
        return (self._met[b] + k * p_model) / (self._n[b] + k)
