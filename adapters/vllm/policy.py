"""The in-engine policy: urgency of waiting requests, preemption victims, and when to evict.

Pure Python over plain objects (anything with the attributes of :class:`RunningLike`), so it is
tested with a fake clock and no engine. The scheduler subclass calls it on vLLM's own requests.
Thread safety: not thread-safe; one scheduler thread calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from qlm_plugin.adapters.vllm.fields import QLMFields

#: Requests without an SLO rank as if due this long after arrival (default urgency).
DEFAULT_SLACK_S = 60.0
#: A client's own vLLM priority shifts a request without an SLO by this much per unit.
PRIORITY_STEP_S = 1.0
#: When no running request could give way to a waiting one, the check waits this long to look again.
RETRY_S = 0.5
#: vLLM's priority is an int: urgency keys are milliseconds after the scheduler's epoch.
_INT_MAX = 2**62


class RunningLike(Protocol):
    request_id: str
    arrival_time: float
    num_output_tokens: int
    max_tokens: int
    num_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Eviction:
    request_id: str
    reason: str


class InEnginePolicy:
    """Least-slack ordering from deadlines and predicted remaining work.

    ``step_s`` is the engine's measured time from one decode step to the next (each running
    request gains one token per step), kept up to date by the scheduler."""

    def __init__(self, epoch: float, step_s: float = 0.02) -> None:
        self.epoch = epoch
        self.step_s = step_s
        self._no_victim: tuple[str, float] = ("", -math.inf)  # (head, when): nobody could be evicted

    def observe_step(self, period_s: float, decode_tokens: int) -> None:
        if decode_tokens > 0 and period_s > 0:
            self.step_s = 0.9 * self.step_s + 0.1 * period_s

    def remaining_tokens(self, r: RunningLike, f: QLMFields) -> float:
        target = f.predicted_tokens if f.predicted_tokens is not None else r.max_tokens
        return max(1.0, min(target, r.max_tokens) - r.num_output_tokens)

    def urgency(self, r: RunningLike, f: QLMFields) -> float:
        """When the request must start, at the latest (lower: more urgent)."""
        if f.ttft_deadline is not None and r.num_output_tokens == 0:
            return f.ttft_deadline
        if f.e2e_deadline is not None:
            return f.e2e_deadline - self.remaining_tokens(r, f) * self.step_s
        return r.arrival_time + DEFAULT_SLACK_S + f.priority * PRIORITY_STEP_S

    def rank(self, r: RunningLike, f: QLMFields) -> int:
        """The urgency as vLLM's integer priority (its waiting heap and its victim choice use it)."""
        ms = (self.urgency(r, f) - self.epoch) * 1000.0
        return int(max(-_INT_MAX, min(_INT_MAX, ms)))

    def slack(self, r: RunningLike, f: QLMFields, now: float) -> float:
        """Seconds a running request could lose and still meet its SLO (inf without one)."""
        if f.ttft_deadline is not None and r.num_output_tokens == 0:
            return f.ttft_deadline - now - self.step_s
        if f.e2e_deadline is None:
            return math.inf
        # A recompute costs the prompt and the tokens so far again (a prefill step or so).
        return f.e2e_deadline - now - (self.remaining_tokens(r, f) + 1) * self.step_s - self.step_s

    def choose_eviction(
        self,
        head: RunningLike,
        head_fields: QLMFields,
        running: Sequence[RunningLike],
        fields_of: Callable[[str], QLMFields],
        now: float,
        seats: int,
    ) -> Eviction | None:
        """Evict only when the most urgent waiting request would otherwise miss its TTFT SLO: every
        seat is taken and no running request is predicted to finish in time. The victim is the
        running request with the most slack, provided it keeps enough to meet its own SLO after a
        recompute. The common case (a seat frees in time) stops at the first request that finishes
        early enough, oldest first, so a step usually pays a few lookups, not a scan."""
        deadline = head_fields.ttft_deadline
        if deadline is None or head.num_output_tokens > 0 or len(running) < seats or not running:
            return None
        time_left = deadline - self.step_s - now  # its prefill takes about a step
        if time_left < 0:
            return None  # too late whatever happens: evicting would only waste work
        if self._no_victim[0] == head.request_id and now - self._no_victim[1] < RETRY_S:
            return None  # nobody could give way a moment ago: do not scan every step
        step_s = self.step_s
        for r in running:
            if self.remaining_tokens(r, fields_of(r.request_id)) * step_s <= time_left:
                return None  # a seat frees in time: no eviction
        best: tuple[float, float, RunningLike] | None = None
        for r in running:
            f = fields_of(r.request_id)
            if f.ttft_deadline is not None and not r.num_output_tokens:
                continue  # an urgent request is never evicted for another
            s = self.slack(r, f, now)
            if s > 0 and (best is None or (s, r.arrival_time) > best[:2]):
                best = (s, r.arrival_time, r)
        if best is None:
            self._no_victim = (head.request_id, now)
            return None
        return Eviction(
            best[2].request_id,
            f"{head.request_id} would miss its TTFT: no seat frees within {time_left:.2f} s",
        )


@dataclass(frozen=True, slots=True)
class EvictionOrder:
    """A coordinator's order: evict ``victim`` (its coordinator id), to free a seat for
    ``for_request`` ("" for an operator's order); ``came``: when it reached the engine (monotonic)."""

    victim: str
    for_request: str
    came: float


class SeatsGiven:
    """The urgent requests (coordinator ids, or the engine's own ids for requests without one) a
    seat was freed for, by the engine's own policy or by a coordinator's order: one urgent request
    costs one eviction, whichever side acts first. Not thread-safe: the scheduler's thread."""

    def __init__(self, memory_s: float = 60.0) -> None:
        self.memory_s = memory_s
        self._given: dict[str, float] = {}

    def give(self, request: str, now: float) -> None:
        self._given[request] = now
        if len(self._given) > 1024:  # only recent ones can be ordered again
            self._given = {r: t for r, t in self._given.items() if now - t < self.memory_s}

    def given(self, request: str) -> bool:
        return request in self._given


def order_action(
    order: EvictionOrder,
    *,
    victim_running: bool,
    beneficiary_running: bool,
    seats: SeatsGiven,
    now: float,
    wait_s: float,
) -> str:
    """What the scheduler does with a coordinator's eviction order before a step: ``skip`` it (the
    request it was for already has a seat: running, or given one by the engine's own policy),
    ``evict`` the victim, ``wait`` for the victim to run (the order overtook the request: orders and
    requests travel apart), or ``drop`` it (the victim never ran within ``wait_s``: it finished, or
    never came)."""
    if order.for_request and (beneficiary_running or seats.given(order.for_request)):
        return "skip"
    if victim_running:
        return "evict"
    return "wait" if now - order.came < wait_s else "drop"
