"""Request eviction (an LSO): a seat for an urgent request that would otherwise miss its TTFT.

The victim is the running batch request with the most spare time that can afford a recompute (it
costs its whole service again) and still meet its own SLO; the backend swaps its KV to host memory
where it has a host tier, else drops it. One urgent request costs at most one eviction: the order
names it, so an engine whose own policy already seated it skips the order, and the queue manager
never evicts for it twice. Requests are looked at on admission, and again on each tick while they
wait: in the global queue (the most urgent few, by their estimate), or in an engine's own queue
after binding early (when no seat there frees before their deadline). Thread safety: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qlm_plugin.brain.dispatch import Dispatcher
from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import Entry, GlobalQueue
from qlm_plugin.domain.instance import EvictMode
from qlm_plugin.domain.plan import Evict

#: Below this probability of meeting its TTFT an urgent request gets a seat by eviction.
EVICT_BELOW_P = 0.5
#: Queued TTFT-bound requests whose chance is looked at again on each tick (the most urgent).
RECHECK_URGENT = 4


class Evictor:
    def __init__(
        self,
        queue: GlobalQueue,
        fleet: FleetView,
        estimator: WaitEstimator,
        dispatcher: Dispatcher,
        counters: dict[str, float],
        *,
        enabled: bool = True,
    ) -> None:
        self.queue = queue
        self.fleet = fleet
        self.estimator = estimator
        self.dispatcher = dispatcher
        self.counters = counters
        self.enabled = enabled
        self.hook: Any = None

    def victim(self, views: Sequence[InstanceView], now: float) -> tuple[InstanceView, Entry] | None:
        """The running batch request with the most spare time, among ``views``, that can afford a
        recompute (it costs the whole service again) and still meet its own SLO."""
        best: tuple[float, InstanceView, Entry] | None = None
        for view in views:
            if view.state is None or view.state.loading_model:
                continue
            for e in view.running.values():
                d = e.request.slo.e2e_deadline
                if e.request.slo.ttft_deadline is not None or d is None:
                    continue
                spare = d - now - 2.0 * e.service_s
                if spare > 0 and (best is None or spare > best[0]):
                    best = (spare, view, e)
        return None if best is None else (best[1], best[2])

    def order(self, view: InstanceView, victim: Entry, entry: Entry) -> bool:
        """Preempt ``victim`` on ``view`` for the urgent ``entry``, once per urgent request."""
        entry.evicted_for = True
        caps = view.state.capabilities if view.state is not None else frozenset()
        mode = EvictMode.SWAP if "swap" in caps else EvictMode.RECOMPUTE
        try:
            self.hook.qlm_evict(
                instance_id=view.instance_id,
                request_id=victim.request.id,
                mode=mode,
                for_request_id=entry.request.id,
            )
        except KeyError:
            return False  # it finished meanwhile
        self.counters["evictions"] += 1
        return True

    def planned(self, action: Evict) -> None:
        """An eviction a plan ordered (for no request in particular)."""
        try:
            self.hook.qlm_evict(
                instance_id=action.instance_id,
                request_id=action.request_id,
                mode=action.mode,
                for_request_id=None,
            )
            self.counters["evictions"] += 1
        except KeyError:
            pass

    def evict_for(self, entry: Entry, now: float) -> bool:
        """Make a seat for a queued urgent request that would otherwise miss its TTFT: preempt the
        running request with the most slack on an instance serving its model, and hand it the seat."""
        deadline = entry.request.slo.ttft_deadline
        if deadline is None or now >= deadline or entry.evicted_for:
            return False
        found = self.victim(self.fleet.serving(entry.request.model), now)
        if found is None or not self.order(*found, entry):
            return False
        # The victim waits in the engine's own queue, behind the urgent request handed over now.
        return self.dispatcher.dispatch(found[0], entry, now)

    def recheck(self, now: float) -> None:
        """An urgent request whose chance has fallen since its admission (the load rose, a seat it
        counted on did not free) gets a seat by eviction, as at admission, once."""
        due: list[Entry] = []
        for q in self.queue.queues.values() if self.enabled else ():
            found = 0
            for _, rid in q.order[: 4 * RECHECK_URGENT]:  # urgency order: TTFT-bound ones lead
                e = self.queue.entries[rid]
                if e.request.slo.ttft_deadline is not None and not e.evicted_for:
                    due.append(e)
                    found += 1
                    if found == RECHECK_URGENT:
                        break
        for e in due:
            if (
                e.dispatched_at is None
                and self.estimator.estimate(e, now, record=False).p_meet < EVICT_BELOW_P
            ):
                self.evict_for(e, now)
        bound = self.dispatcher.bound_early
        for rid, e in list(bound.items()):
            view = self.fleet.instances.get(e.instance or "")
            deadline = e.request.slo.ttft_deadline
            if (
                view is None
                or e.evicted_for
                or deadline is None
                or now >= deadline
                or self.queue.entries.get(rid) is not e
                or not waits_in_engine(view, e)
            ):
                del bound[rid]
                continue
            if self.enabled and self._seat_free_at(view, e, now) + self._prefill_s(e) > deadline:
                victim = self.victim([view], now)
                if victim is not None:
                    self.order(view, victim[1], e)
                    del bound[rid]

    def _seat_free_at(self, view: InstanceView, e: Entry, now: float) -> float:
        """When the first of ``view``'s busy seats frees, as predicted (overdue requests predicted
        again from their progress)."""
        self.estimator.seat_times(e.request.model, now)  # re-predicts the overdue
        early = self.dispatcher.bound_early
        return min(
            (r.finish_at for rid, r in view.running.items() if rid not in early and rid != e.request.id),
            default=now,
        )

    def _prefill_s(self, e: Entry) -> float:
        cost = self.queue.cost_models.get(e.request.model)
        return cost.step_s(e.request.prompt_tokens, 0) if cost is not None else 0.0


def waits_in_engine(view: InstanceView, e: Entry) -> bool:
    """Whether ``e`` may still wait in the engine's own queue (its report names the waiting
    requests, or at least counts the urgent ones)."""
    s = view.state
    if s is None:
        return False
    if s.waiting_ids:
        return e.request.id in s.waiting_ids
    return s.num_waiting_urgent > 0 or s.num_waiting > 0
