"""The brain's roles at one engine: the order of its waiting requests, which running request gives
way, and when a waiting urgent request takes a running one's seat.

The queue manager ranks its global queue with :func:`urgency_key` and picks KV victims with
:func:`choose_victim`; inside vLLM's scheduler, :class:`LocalPolicy` answers the same hooks
(``qlm_rank_key``, ``qlm_select_victim``) with the same functions, priced on the engine's measured
step pace instead of a reference cost model, and decides seat evictions (:meth:`LocalPolicy.seat_for`).

* **Order**: the TTFT deadline, or the end-to-end deadline less the predicted service (least laxity),
  but no later than :data:`FAR_HORIZON_S` after its arrival (among requests with more slack than
  that, first come first served); a request without deadlines is due a minute after its *virtual
  finish* (arrival plus predicted service), so shorter predicted requests go first (ALISE) while a
  long one ages past every later arrival once it has waited its own service time (nothing
  starves). Keys are absolute: they do not drift with time.
* **Victims**: among the running requests that still meet their own SLO after being preempted and
  recomputed, the one the order serves last (the greatest rank key: a victim ranked earlier than
  those waiting takes its seat straight back, and another is preempted for it); if none would, the
  one with the most slack.

Thread safety: none; one thread (the scheduler's, or the queue manager's loop) calls a policy.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.instance import RunningView
from qlm_plugin.domain.outcome import RequestOutcome
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl

Key = tuple[float, float, str]  # (laxity, then virtual finish or arrival, id): lower first

#: A waiting request for which no running request could give way is looked at again after this long.
RETRY_S = 0.5
#: A request without an SLO is due this long after its virtual finish (default urgency).
DEFAULT_SLACK_S = 60.0
#: A request with more end-to-end slack than this is ordered as if due this long after it came:
#: beyond it, deadline order only makes the lines of a later batch (which all share their window's
#: end) wait for every line of an earlier one, where first come first served lets the batches'
#: lines, submitted in their tenants' turns, share the seats (coordinator/batch_turns.py). Shorter
#: budgets (every scenario's: 20 s to 15 min) are ordered by their deadlines as before.
FAR_HORIZON_S = 3600.0
#: A client's own priority moves a request without an SLO by this much per unit (lower first), by
#: :data:`DEFAULT_SLACK_S` at most either way: it neither passes work already due nor starves.
PRIORITY_STEP_S = 1.0
#: A running request's predicted remaining length is asked again after this many more tokens.
REPREDICT_TOKENS = 16
#: The engine's time per decode step before it has measured one.
DEFAULT_STEP_S = 0.02


def urgency_key(request: Request, length: LengthDistribution, prefill_s: float, tpot_s: float) -> Key:
    """The rank of ``request`` (lower first): its TTFT deadline (earliest first: taking the prefill off
    it would put long prompts first, which under overload meets fewer SLOs), the end-to-end deadline
    less the predicted service at the 90th percentile of its length, whichever binds, and at the
    latest :data:`FAR_HORIZON_S` after its arrival. A request
    without either is due :data:`DEFAULT_SLACK_S` after its *virtual finish* (arrival plus predicted
    mean service), moved by its client priority: among such requests the shorter go first (ALISE),
    and a long one ages past every later arrival once it has waited its own service time."""
    lax = math.inf
    if request.slo.ttft_deadline is not None:
        lax = request.slo.ttft_deadline
    if request.slo.e2e_deadline is not None:
        lax = min(lax, request.slo.e2e_deadline - prefill_s - length.quantile(0.9) * tpot_s)
        lax = min(lax, request.arrival_time + FAR_HORIZON_S)
    if math.isinf(lax):
        virtual_finish = request.arrival_time + prefill_s + length.mean * tpot_s
        moved = max(-DEFAULT_SLACK_S, min(DEFAULT_SLACK_S, request.priority * PRIORITY_STEP_S))
        lax = virtual_finish + DEFAULT_SLACK_S + moved
    return (lax, request.arrival_time, request.id)


def slack_after_recompute(
    request: Request, generated: int, remaining: LengthDistribution, now: float, step_s: float, redo_s: float
) -> float:
    """Seconds ``request`` could still lose after being preempted now and recomputed (``redo_s``: the
    prefill of its prompt and its tokens so far) and meet its SLO; infinite without one."""
    if request.slo.ttft_deadline is not None and generated == 0:
        return request.slo.ttft_deadline - now - redo_s - step_s
    if request.slo.e2e_deadline is None:
        return math.inf
    return request.slo.e2e_deadline - now - redo_s - (remaining.quantile(0.9) + 1) * step_s


def before_first_token(c: RunningView) -> bool:
    """A TTFT-bound request still before its first token: it gives way to no other (it would be
    the first to come back, and its user is waiting)."""
    return c.request.slo.ttft_deadline is not None and c.generated_tokens == 0


def choose_victim(
    candidates: Sequence[RunningView],
    slack: Callable[[RunningView], float],
    rank: Callable[[RunningView], Any],
) -> RunningView:
    """Among ``candidates`` that still meet their SLO after a recompute (``slack`` > 0), the one the
    order serves last (the greatest ``rank``: the policy's own key), a TTFT-bound request before its
    first token last of all; when none would, the one with the most slack.

    The order, not the work to redo, decides: a preempted request waits again under its own rank,
    and one ranked before the requests waiting (a fresh, short-KV request of a tight class) would
    take its seat straight back and have another preempted for it, over and over."""
    scored = [(slack(c), c) for c in candidates]
    safe = [c for s, c in scored if s > 0]
    if safe:
        return max(safe, key=lambda c: (not before_first_token(c), rank(c)))
    return max(scored, key=lambda sc: (sc[0], sc[1].admitted_at, sc[1].request.id))[1]


class Rank:
    """A rank key that never raises when compared: keys of different plugins that cannot be compared
    (a user's key beside the built-in one) fall back to their type names, so the engine's heap stays
    valid instead of raising in the scheduler."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key

    def __lt__(self, other: Rank) -> bool:
        try:
            return bool(self.key < other.key)  # type: ignore[operator]
        except TypeError:
            return (type(self.key).__name__, repr(self.key)) < (type(other.key).__name__, repr(other.key))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rank) and self.key == other.key

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class SeatEviction:
    """A seat to free for ``for_request``: preempt ``victim``."""

    victim: RunningView
    for_request: str
    reason: str


class LocalPolicy:
    """The ordering and victim roles at one engine, priced on its measured pace (``step_s``: the time
    from one decode step to the next, which the scheduler feeds to :meth:`observe_step`) and
    ``prefill_s_per_token``. Lengths come from the ``qlm_predict_output_length`` hook of the plugin
    manager it is configured with (the engine's own online predictor, or a user's)."""

    def __init__(self, step_s: float = DEFAULT_STEP_S, prefill_s_per_token: float = 0.0) -> None:
        self.step_s = step_s
        self.prefill_s_per_token = prefill_s_per_token
        self._hook: Any = None
        # request id -> (tokens generated when predicted, remaining then): a running request's
        # prediction is reused for REPREDICT_TOKENS tokens (every step would ask for every request)
        self._remaining: dict[str, tuple[int, LengthDistribution]] = {}
        self._no_victim: tuple[str, float] = ("", -math.inf)  # (request, when): nobody could give way
        # The rank a request waits under once preempted (the engine sets it to the key its queue
        # holds); None: this policy's own key.
        self.rank_of: Callable[[Request], Any] | None = None

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def qlm_configure(self, pm: Any) -> None:
        self._hook = pm.hook

    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        return urgency_key(
            request, self.predict(request, 0), self.prefill_s_per_token * request.prompt_tokens, self.step_s
        )

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        rank_of = self.rank_of or (lambda r: self.qlm_rank_key(r, instance_id, now))
        return choose_victim(candidates, lambda c: self.slack(c, now), lambda c: rank_of(c.request))

    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        self.forget(outcome.request.id)

    # ------------------------------------------------------------------ the engine's pace
    def observe_step(self, period_s: float, decode_tokens: int) -> None:
        """A decode step's period. One sample moves the estimate by at most 4x its value: a pause
        of the engine (vLLM's ``/pause``, a stall) made the next period minutes long and ranked
        the requests admitted then to be due half an hour late; a real slowdown is still learned
        within a few steps."""
        if decode_tokens > 0 and period_s > 0:
            self.step_s = 0.9 * self.step_s + 0.1 * min(period_s, 4 * self.step_s)

    def observe_prefill(self, duration_s: float, prefill_tokens: int) -> None:
        """A step that prefilled ``prefill_tokens``: its time past a decode step's, per token (what
        a preempted request's recompute costs; bounded per sample as :meth:`observe_step`)."""
        if prefill_tokens <= 0 or duration_s <= 0:
            return
        per_token = max(0.0, duration_s - self.step_s) / prefill_tokens
        if self.prefill_s_per_token <= 0:
            self.prefill_s_per_token = per_token
        else:
            sample = min(per_token, 4 * self.prefill_s_per_token)
            self.prefill_s_per_token = 0.9 * self.prefill_s_per_token + 0.1 * sample

    def predict(self, request: Request, generated: int) -> LengthDistribution:
        """The remaining length of ``request`` after ``generated`` tokens (the predictor hook)."""
        if generated > 0:
            cached = self._remaining.get(request.id)
            if cached is not None and 0 <= generated - cached[0] < REPREDICT_TOKENS:
                return cached[1]
        dist: LengthDistribution | None = None
        if self._hook is not None:
            dist = self._hook.qlm_predict_output_length(request=request, generated_tokens=generated)
        if dist is None:  # no predictor: half of what is left, widely uncertain
            room = max(0, request.max_tokens - generated)
            dist = LengthDistribution(room / 2, (room / 4) ** 2)
        if generated > 0:
            self._remaining[request.id] = (generated, dist)
        return dist

    def forget(self, request_id: str) -> None:
        """The request left the engine."""
        self._remaining.pop(request_id, None)

    def frees_within(self, request: Request, generated: int, seconds: float) -> bool:
        """Whether a running request is predicted to finish within ``seconds``."""
        return self.predict(request, generated).mean * self.step_s <= seconds

    def slack(self, c: RunningView, now: float) -> float:
        redo = self.prefill_s_per_token * (c.request.prompt_tokens + c.generated_tokens) + self.step_s
        remaining = self.predict(c.request, c.generated_tokens)
        return slack_after_recompute(c.request, c.generated_tokens, remaining, now, self.step_s, redo)

    # ------------------------------------------------------------------ seat evictions
    def seat_for(
        self,
        waiting: Sequence[Request],
        running: Sequence[RunningView],
        seats: int,
        now: float,
        select: Callable[[Sequence[RunningView]], RunningView | None] | None = None,
        ranks_after: Callable[[Request, RunningView], bool] | None = None,
    ) -> SeatEviction | None:
        """Whether a waiting request takes a running request's seat now (the engine's
        ``max_num_seqs`` binds, not its KV cache). ``waiting``: the first waiting requests in rank
        order. They take seats in that order as seats free (each running request's seat at its
        predicted finish at the engine's pace; a request that takes one frees it again after its own
        predicted service): the first TTFT-bound request before its first token that would get its
        seat after its deadline takes one now, from a running request that still meets its own SLO
        after a recompute, chosen by ``select`` (the ``qlm_select_victim`` hook; default
        :meth:`qlm_select_victim`) among those that ``ranks_after`` the waiting request (a preempted
        request keeps its rank: one ranked first would take its seat straight back). A burst of
        urgent requests thus gets the seats it needs, not one.
        The common case stops early: no urgent request waits, or its seat frees in time."""
        if len(running) < seats or not running:
            return None
        urgent = [r for r in waiting if r.slo.ttft_deadline is not None]
        if not urgent:
            return None
        step = self.step_s
        if len(urgent) == 1:  # the usual case: any running request finishing in time will do
            left = (urgent[0].slo.ttft_deadline or now) - now - step
            if left < 0 or any(self.frees_within(c.request, c.generated_tokens, left) for c in running):
                return None
        frees = [self.predict(c.request, c.generated_tokens).mean * step for c in running]
        heapq.heapify(frees)
        needy: Request | None = None
        for r in waiting:
            at = heapq.heappop(frees) if frees else math.inf
            deadline = r.slo.ttft_deadline
            if deadline is not None and at > deadline - now - step and deadline - now - step >= 0:
                needy = r  # it would miss its TTFT waiting for a seat
                break
            service = step + self.predict(r, 0).mean * step
            heapq.heappush(frees, at + service)
        if needy is None:
            return None
        if self._no_victim[0] == needy.id and now - self._no_victim[1] < RETRY_S:
            return None  # nobody could give way a moment ago: do not scan every step
        left = (needy.slo.ttft_deadline or now) - now - step
        # A request finishing before then frees its seat anyway: evicting it would gain nothing.
        candidates = [
            c
            for c in running
            if not before_first_token(c)
            and not self.frees_within(c.request, c.generated_tokens, left)
            and (ranks_after is None or ranks_after(needy, c))
            and self.slack(c, now) > 0
        ]
        if select is None:
            select = lambda cs: self.qlm_select_victim(cs, "", now)  # noqa: E731
        victim = select(candidates) if candidates else None
        if victim is None:
            self._no_victim = (needy.id, now)
            return None
        return SeatEviction(
            victim, needy.id, f"{needy.id} would miss its TTFT: no seat frees within {left:.2f} s"
        )
