"""The global queue: every request the queue manager holds that is not on an engine yet.

Per model, requests wait in urgency order (least laxity on the predicted output length, absolute,
so keys never drift), with a work index (how much work waits ahead of any urgency, O(log n)) and a
late list (requests that can no longer meet their SLO: they run after every request that still
can). The totals of each request group (model, class, deadline window) are kept as requests come
and go, so a planner reads a few hundred groups instead of 10,000 requests.

Thread safety: none; one event loop (or scheduler thread) owns it.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from qlm_plugin.brain.local_policy import Key, urgency_key
from qlm_plugin.brain.work_index import WorkIndex
from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.groups import GroupKey, group_key
from qlm_plugin.domain.request import Request

#: Decode batch at which a request's seat time is priced before the instance is known.
REFERENCE_BATCH = 64
#: Memory of each lane's arrival rates (work and SLOs per second), seconds.
ARRIVAL_MEMORY_S = 60.0


@dataclass(slots=True)
class Entry:
    """A request the queue manager knows: queued (``dispatched_at`` None) or on an engine."""

    request: Request
    length: LengthDistribution  # predicted output tokens at submission
    service_s: float  # predicted seat-seconds (prefill + decode at the reference batch)
    service_var: float
    key: Key  # urgency: lower first
    planned: str | None = None  # the instance whose virtual queue holds it
    instance: str | None = None  # the instance serving it, once dispatched
    dispatched_at: float | None = None
    late: bool = False  # can no longer meet its SLO: runs after every request that still can
    group: GroupKey = ("", "", -1)  # its request group (model, class, deadline window)
    finish_at: float = math.inf  # predicted, once dispatched
    evicted_for: bool = False  # a seat was freed for it once: never a second eviction
    plan_epoch: int = -1  # the last plan that placed it (-1: no plan has seen it yet)


def laxity_key(request: Request, length: LengthDistribution, cost: CostModel | None) -> Key:
    """Urgency (:func:`~qlm_plugin.brain.local_policy.urgency_key`) priced on the model's reference
    cost model: its prefill, and decode at a batch of 32."""
    if cost is None:
        return urgency_key(request, length, 0.0, 0.0)
    return urgency_key(request, length, cost.step_s(request.prompt_tokens, 0), cost.decode_tpot_s(32))


@dataclass(slots=True)
class LaneRate:
    """What arrives in one lane (model and SLO class) per second lately, decayed over
    ``ARRIVAL_MEMORY_S``, and the lane's budget to its first deadline (its latest arrival's)."""

    seat_s: float
    weight: float
    budget_s: float
    ttft_bound: bool
    at: float

    def decayed(self, now: float) -> float:
        return math.exp(-max(0.0, now - self.at) / ARRIVAL_MEMORY_S)


@dataclass(slots=True)
class GroupAgg:
    """Running totals of one request group's queued requests."""

    ids: dict[str, Entry] = field(default_factory=dict)
    seat_s: float = 0.0
    weight: float = 0.0
    urgency: float = math.inf
    deadline: float = math.inf
    stale: bool = False  # the most urgent member left: recompute the minima before use

    def refresh(self) -> None:
        if self.stale:
            self.urgency = min((e.key[0] for e in self.ids.values()), default=math.inf)
            self.deadline = min((e.request.slo.first_deadline() for e in self.ids.values()), default=math.inf)
            self.stale = False


class ModelQueue:
    """The queue of one model: urgency order, a late list, the work index, and the running
    totals of its request groups."""

    def __init__(self, groups: dict[GroupKey, GroupAgg]) -> None:
        self.order: list[tuple[Key, str]] = []  # (key, id), sorted
        self.late: deque[str] = deque()
        self.index = WorkIndex()
        self.groups = groups
        # Totals over its requests in order (not late): count, seat-seconds, prompt tokens and
        # predicted output tokens (the planner prices a full engine on this mix).
        self.mix = [0.0, 0.0, 0.0, 0.0]

    def add(self, e: Entry) -> None:
        bisect.insort(self.order, (e.key, e.request.id))
        self.index.add(e.key[0], e.service_s, e.service_var, prompt=e.request.prompt_tokens)
        agg = self.groups.get(e.group)
        if agg is None:
            agg = self.groups[e.group] = GroupAgg()
        agg.ids[e.request.id] = e
        self._count(e, +1.0)
        agg.seat_s += e.service_s
        agg.weight += e.request.weight
        agg.urgency = min(agg.urgency, e.key[0])
        agg.deadline = min(agg.deadline, e.request.slo.first_deadline())

    def _leave_group(self, e: Entry) -> None:
        agg = self.groups.get(e.group)
        if agg is None or agg.ids.pop(e.request.id, None) is None:
            return
        self._count(e, -1.0)
        if not agg.ids:
            del self.groups[e.group]
            return
        agg.seat_s -= e.service_s
        agg.weight -= e.request.weight
        if e.key[0] <= agg.urgency or e.request.slo.first_deadline() <= agg.deadline:
            agg.stale = True

    def _count(self, e: Entry, sign: float) -> None:
        mix = self.mix
        mix[0] += sign
        mix[1] += sign * e.service_s
        mix[2] += sign * e.request.prompt_tokens
        mix[3] += sign * e.length.mean

    def make_late(self, e: Entry) -> None:
        self.index.remove(e.key[0], e.service_s, e.service_var, prompt=e.request.prompt_tokens)
        self._leave_group(e)
        e.late = True
        self.late.append(e.request.id)

    def remove(self, e: Entry) -> None:
        if e.late:
            self.late.remove(e.request.id)
            return
        i = bisect.bisect_left(self.order, (e.key, e.request.id))
        if i < len(self.order) and self.order[i][1] == e.request.id:
            del self.order[i]
            self.index.remove(e.key[0], e.service_s, e.service_var, prompt=e.request.prompt_tokens)
            self._leave_group(e)

    def __len__(self) -> int:
        return len(self.order) + len(self.late)


class GlobalQueue:
    """Every entry the queue manager holds (queued or dispatched), and the per-model queues of those
    not on an engine yet."""

    def __init__(self, cost_models: Mapping[str, CostModel]) -> None:
        self.cost_models = cost_models
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.groups: dict[GroupKey, GroupAgg] = {}  # queued request groups, kept incrementally
        self.arrivals: dict[tuple[str, str], LaneRate] = {}  # (model, class) -> its arrival rates

    def note_arrival(self, e: Entry, now: float) -> None:
        """``e`` arrived: it counts toward its lane's arrival rates."""
        r = e.request
        lane = self.arrivals.get((r.model, r.slo_class))
        budget = r.slo.first_deadline() - r.arrival_time
        ttft_bound = r.slo.ttft_deadline is not None
        if lane is None:
            self.arrivals[(r.model, r.slo_class)] = LaneRate(
                e.service_s / ARRIVAL_MEMORY_S, r.weight / ARRIVAL_MEMORY_S, budget, ttft_bound, now
            )
            return
        decay = lane.decayed(now)
        lane.seat_s = lane.seat_s * decay + e.service_s / ARRIVAL_MEMORY_S
        lane.weight = lane.weight * decay + r.weight / ARRIVAL_MEMORY_S
        lane.budget_s, lane.ttft_bound, lane.at = budget, ttft_bound, max(lane.at, now)

    def entry(self, request: Request, length: LengthDistribution) -> Entry:
        """A new entry for ``request``, its work priced at the reference batch."""
        cost = self.cost_models.get(request.model)
        if cost is None:
            service, var = 0.0, 0.0
        else:
            tpot = cost.decode_tpot_s(REFERENCE_BATCH)
            service = cost.step_s(request.prompt_tokens, 0) + length.mean * tpot
            var = length.var * tpot * tpot
        return Entry(
            request, length, service, var, laxity_key(request, length, cost), group=group_key(request)
        )

    def queue(self, model: str) -> ModelQueue:
        q = self.queues.get(model)
        if q is None:
            q = self.queues[model] = ModelQueue(self.groups)
        return q

    def pending(self) -> bool:
        return any(len(q) for q in self.queues.values())

    def requests(self) -> QueuedRequests:
        return QueuedRequests(self)


class QueuedRequests(Sequence[Request]):
    """The queued requests, for ``qlm_plan``, without copying them (the built-in planner reads the
    group totals instead)."""

    def __init__(self, queue: GlobalQueue) -> None:
        self._queue = queue

    def __len__(self) -> int:
        return sum(len(q) for q in self._queue.queues.values())

    def __iter__(self) -> Iterator[Request]:
        entries = self._queue.entries
        for q in self._queue.queues.values():
            for _, rid in q.order:
                yield entries[rid].request
            for rid in q.late:
                yield entries[rid].request

    def __getitem__(self, i: int) -> Request:  # type: ignore[override]
        for n, r in enumerate(self):
            if n == i:
                return r
        raise IndexError(i)
