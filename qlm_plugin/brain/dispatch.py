"""Request pulling and load balancing (LSOs): handing queued requests to engines.

Instances *pull* when they have room, which binds placement late: an instance takes the most urgent
requests it can serve, from its own virtual queue (the plan's placement of their groups), or from
the virtual queue of an instance that cannot start them now (load balancing). Each pull is bounded
by the engine's free KV (prompt plus predicted output), so no request waits in an engine's own queue
where a later, more urgent arrival could not pass it; late requests run after every request that
can still meet its SLO, but one pull in ``LATE_SHARE`` serves the oldest first, so none starves.
Prompts that start in one step delay each other's first token, so a pull takes no prompt that would
push a TTFT-bound request it takes past its deadline. A TTFT-bound request with no room anywhere
binds early to the engine queue that starts it soonest (its length at its GPU's speed), which ranks
it by urgency, if its first token can come in time there. Thread safety: none; one event loop owns
it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import Entry, GlobalQueue

#: A TTFT-bound request binds early to an engine whose own queue is shorter than this.
EARLY_BIND_MAX_WAITING = 8  # TTFT-bound requests waiting there (batch waiting there does not count)
#: How far into the urgency order an arrival looks for a request left waiting, to bind it too...
BIND_LOOK_AHEAD = 64
#: ... one with this share of its TTFT budget left (nearer its deadline it would likely miss in
#: the engine's queue too).
BIND_BUDGET_LEFT = 0.5
#: One pull in this many serves the oldest late request first (no starvation under overload).
LATE_SHARE = 16
#: A pull passes over at most this many prompts that would make its step miss a TTFT deadline.
DEADLINE_SKIPS = 8


class Dispatcher:
    """Pulls, early binding and the dispatch bookkeeping. ``plan_queues`` are the last plan's
    virtual queues (request ids in order, per instance); ``bound_early`` the TTFT-bound requests
    handed to an engine's own queue before a seat was free there (watched until they start)."""

    def __init__(
        self,
        queue: GlobalQueue,
        fleet: FleetView,
        estimator: WaitEstimator,
        counters: dict[str, float],
        *,
        late_list: bool = True,
        step_budget: bool = True,
        step_deadline: bool = True,
    ) -> None:
        self.queue = queue
        self.late_list = late_list
        self.step_budget = step_budget
        self.step_deadline = step_deadline
        self.fleet = fleet
        self.estimator = estimator
        self.counters = counters
        self.hook: Any = None
        self.plan_epoch = 0
        self.plan_queues: dict[str, list[str]] = {}  # the last plan's virtual queues
        self.plan_cursor: dict[str, int] = {}  # per instance: ahead of it, all taken or gone
        self.bound_early: dict[str, Entry] = {}
        self._pull_count = 0

    # ------------------------------------------------------------------ placement at arrival
    def enqueue(self, entry: Entry) -> None:
        """Into the global queue, planned (until a plan says otherwise) on the roomiest instance."""
        self.queue.queue(entry.request.model).add(entry)
        if entry.planned is None:
            entry.planned = self.fleet.cached(
                "roomiest", entry.request.model, lambda: self._roomiest(entry.request.model)
            )

    def _roomiest(self, model: str) -> str | None:
        serving = self.fleet.serving(model)
        if not serving:
            return None
        # The fastest engine with a free seat (a request is served sooner there), then the roomiest.
        return min(
            serving, key=lambda v: (v.free_slots() == 0, -v.speed, -v.free_slots(), v.instance_id)
        ).instance_id

    def left_waiting(self, model: str, now: float) -> Entry | None:
        """A request to bind early beside an arrival of ``model``: the most urgent TTFT-bound one
        in the global queue with at least half its TTFT budget left. It found every engine queue
        long when it came; an arrival binds only itself, so later ones passed it for good (the
        engines fill freed seats from their own queues: no pull comes) until it was late, and then
        it ran after all on-time work. Late requests waiting do not stop it: under a load whose
        batch work has minutes of slack a few late ones wait behind that work for minutes, and
        while they did, every arrival passed the requests left waiting (64 seats at twice the load:
        97.8% met, 99.3% without that stop)."""
        q = self.queue.queues.get(model)
        if q is None:
            return None
        entries = self.queue.entries
        for _, rid in q.order[:BIND_LOOK_AHEAD]:
            e = entries[rid]
            due = e.request.slo.ttft_deadline
            if due is not None and due - now >= BIND_BUDGET_LEFT * (due - e.request.arrival_time):
                return e
        return None

    def bind_early(self, entry: Entry, now: float, *, max_waiting: int = EARLY_BIND_MAX_WAITING) -> None:
        """A TTFT-bound request with no room anywhere joins the shortest engine queue at once: the
        engine ranks it by urgency, so it passes the batch work waiting there the moment KV frees
        (waiting for a pull would leave it behind work the engine already holds). Only while engine
        queues are short (fewer than ``max_waiting`` TTFT-bound requests waiting there): under
        overload the global queue, with its late list, keeps control."""
        serving = [v for v in self.fleet.serving(entry.request.model) if v.state is not None]
        if not serving:
            return

        budget = _ttft_budget(entry)

        def urgent_waiting(v: InstanceView) -> int:
            # The engine's own queue, as it reports it now: the TTFT-bound requests waiting there,
            # less those of a looser tier bound early there, which the engine ranks behind this one
            # (else a tier of 3-s requests bound early keeps out the 0.5-s ones arriving after them;
            # within a tier the limit holds as it is).
            if v.state is None or v.state.num_waiting == 0:
                return 0
            state = self.hook.qlm_instance_state(instance_id=v.instance_id, detail=False)
            here = (e for e in self.bound_early.values() if e.instance == v.instance_id)
            looser = sum(1 for e in here if _ttft_budget(e) > budget)
            return max(0, int(state.num_waiting_urgent) - looser)

        # Ask at most two engines (the least loaded first): the answer costs a copy of their queue.
        # The engine that would start it soonest: its queue, at its GPU's speed.
        def load(v: InstanceView) -> tuple[float, int, str]:
            s = v.state
            if s is None:
                return (math.inf, 0, v.instance_id)
            return ((s.num_waiting + 1) / v.speed, s.num_running, v.instance_id)

        for view in sorted(serving, key=load)[:2]:
            waiting = urgent_waiting(view)
            if waiting < max_waiting:
                # Only where its first token can come in time, were it to start in one step with
                # the TTFT-bound requests waiting there (priced as its own prompt each): else it
                # waits for a pull (a slow GPU's queue would make it miss).
                step = _StepDeadline(self, view, entry.request.model, now) if self.step_deadline else None
                if step is not None and not step.fits(entry, copies=waiting + 1):
                    continue
                if self.dispatch(view, entry, now):
                    self.bound_early[entry.request.id] = entry  # watched until it starts
                return

    # ------------------------------------------------------------------ pulling
    def pull(self, view: InstanceView, slots: int, now: float) -> None:
        """Hand ``view`` the most urgent requests it can serve (its own virtual queue first in
        urgency order; another instance's only if that one cannot start it now)."""
        model = view.model()
        if model is None or slots <= 0:
            return
        q = self.queue.queues.get(model)
        if q is None or not len(q):
            self.pull_stranded(view, now)
            return
        entries = self.queue.entries
        s = view.state
        # Requests past their deadline go to the late list: they still run, after all that can meet.
        while self.late_list and q.order and doomed(entries[q.order[0][1]], now):
            _, rid = q.order.pop(0)
            q.make_late(entries[rid])
        taken: list[Entry] = []
        # No starvation: late requests run after every request that can still meet its SLO, but
        # one pull in LATE_SHARE serves the oldest late request first, whatever the load.
        self._pull_count += 1
        if q.late and self._pull_count % LATE_SHARE == 0:
            taken.append(entries[q.late[0]])
        # KV budget: hand over only what the engine can hold (prompt and predicted output), so no
        # request waits in the engine's own queue, where a more urgent later arrival cannot pass it.
        kv_free = (s.kv_blocks_total - s.kv_blocks_used) if s is not None else math.inf
        # Step budget: only the prompts the engine's next step can start; more would wait in the
        # engine's own queue, out of reach of reordering and of the late list.
        room = s.prefill_room if s is not None and self.step_budget else None
        prefill_free = math.inf if room is None else room
        if prefill_free <= 0:
            return
        guard = _StepDeadline(self, view, model, now) if self.step_deadline and s is not None else None
        skipped = 0
        for e in self._candidates(view, model, now):
            if len(taken) >= slots or prefill_free <= 0:
                break
            blocks = (e.request.prompt_tokens + e.length.mean) / 16.0
            if taken and blocks > kv_free:
                break
            if taken and guard is not None and not guard.fits(e):
                skipped += 1
                if skipped >= DEADLINE_SKIPS:
                    break
                continue
            kv_free -= blocks
            prefill_free -= e.request.prompt_tokens
            taken.append(e)
            if guard is not None:
                guard.take(e)
        for rid in list(q.late):
            if len(taken) >= slots or prefill_free <= 0:
                break
            if not taken or taken[0].request.id != rid:
                if guard is not None and taken and not guard.fits(entries[rid]):
                    break
                taken.append(entries[rid])
                prefill_free -= entries[rid].request.prompt_tokens
                if guard is not None:
                    guard.take(entries[rid])
        for e in taken:
            self.dispatch(view, e, now)

    def _candidates(self, view: InstanceView, model: str, now: float) -> Iterator[Entry]:
        """What ``view`` may pull, in order: its virtual queue in the plan's order, merged with the
        requests the plan has not seen yet (by urgency), and the requests planned on an instance
        that cannot start them now (load balancing, by urgency)."""
        iid = view.instance_id
        entries = self.queue.entries

        def own_ok(e: Entry | None) -> bool:
            return (
                e is not None
                and e.dispatched_at is None
                and not e.late
                and e.planned == iid
                and e.plan_epoch == self.plan_epoch
                and e.request.model == model
            )

        ids = self.plan_queues.get(iid, [])
        cursor = self.plan_cursor.get(iid, 0)
        while cursor < len(ids) and not own_ok(entries.get(ids[cursor])):
            cursor += 1  # taken or gone: never looked at again
        self.plan_cursor[iid] = cursor
        own = (entries[rid] for rid in ids[cursor:] if own_ok(entries.get(rid)))
        can_start = {v.instance_id: self._can_start(v) for v in self.fleet.instances.values()}

        def other_ok(e: Entry) -> bool:
            if e.planned == iid and e.plan_epoch == self.plan_epoch:
                return False  # in ``own``
            # planned elsewhere (or, before any plan, placed there at arrival): only if that
            # instance cannot start it now
            return e.planned in (None, iid) or not can_start.get(e.planned, False)

        other = (e for _, rid in self.queue.queues[model].order if other_ok(e := entries[rid]))
        a, b = next(own, None), next(other, None)
        while a is not None or b is not None:
            if b is not None and (a is None or b.key < a.key):
                yield b
                b = next(other, None)
            else:
                assert a is not None
                yield a
                a = next(own, None)

    def follow(self, queues: dict[str, list[str]]) -> None:
        """A new plan: its virtual queues (request ids in order, per instance) are what pulls
        follow from now on."""
        self.plan_epoch += 1
        self.plan_queues = {}
        self.plan_cursor = {}
        entries = self.queue.entries
        for iid, rids in queues.items():
            if iid not in self.fleet.instances:
                continue
            self.plan_queues[iid] = rids
            for rid in rids:
                e = entries.get(rid)
                if e is not None and e.dispatched_at is None:
                    e.planned = iid
                    e.plan_epoch = self.plan_epoch

    def pull_stranded(self, view: InstanceView, now: float) -> None:
        """The engine-local model-swap rule: an instance with nothing queued for its model takes the
        most urgent request of a model no instance serves (on time first, then late; under a
        planner, late work only: the planner swaps for the rest, in batches), and its engine swaps
        to that model once its own work is done. So no request waits for ever for a model."""
        busy = {v.model() for v in self.fleet.instances.values()}
        busy.update(e.request.model for v in self.fleet.instances.values() for e in v.running.values())
        best: tuple[tuple[bool, float], Entry] | None = None
        for m, q in self.queue.queues.items():
            if m in busy or not len(q) or not view.can_load(m, now):
                continue
            if q.order and self.plan_epoch > 0:
                continue  # a planner places on-time work (and swaps for it); it never sees late work
            head = self.queue.entries[q.order[0][1] if q.order else q.late[0]]
            rank = (not q.order, head.key[0])
            if best is None or rank < best[0]:
                best = (rank, head)
        if best is not None:
            self.counters["stranded_pulls"] += 1
            self.dispatch(view, best[1], now)

    def _can_start(self, view: InstanceView) -> bool:
        """Whether ``view``'s engine could start a request now (a seat, KV and step room)."""
        if view.free_slots() == 0:
            return False
        room = view.state.prefill_room if view.state is not None and self.step_budget else None
        return room is None or room > 0

    def dispatch(self, view: InstanceView, e: Entry, now: float) -> bool:
        """Hand ``e`` to ``view``'s engine (``qlm_dispatch``); False (and ``e`` queued again) if the
        engine refuses it."""
        queue = self.queue.queue(e.request.model)
        if e.dispatched_at is None:
            queue.remove(e)
        ok = bool(self.hook.qlm_dispatch(instance_id=view.instance_id, request=e.request))
        if not ok:
            if e.dispatched_at is None:
                e.late = False
                queue.add(e)
            return False
        if e.planned not in (None, view.instance_id):
            self.counters["steals"] += 1
        e.instance = e.planned = view.instance_id
        e.dispatched_at = now
        view.running[e.request.id] = e
        self.estimator.started(e, now)
        self.counters["pulls"] += 1
        self.fleet.count_running(view, +1, e.request.prompt_tokens)
        return True

    def undispatch(self, e: Entry) -> None:
        """``e`` left its engine (finished, given back, or its engine was lost)."""
        self.bound_early.pop(e.request.id, None)
        view = self.fleet.instances.get(e.instance) if e.instance is not None else None
        if view is not None and view.running.pop(e.request.id, None) is not None:
            self.fleet.count_running(view, -1)

    def forget_instance(self, instance_id: str) -> None:
        """The instance left: the plan's placement there no longer holds."""
        self.plan_queues.pop(instance_id, None)
        for e in self.queue.entries.values():
            if e.planned == instance_id and e.dispatched_at is None:
                e.planned = None


class _StepDeadline:
    """Prompts that start in the same step delay each other's first token: the step's prefill
    takes the time of all of them (on a slow GPU a full token budget takes over a second). So a pull
    takes a prompt only if every TTFT-bound request it takes (this one included) still gets its
    first token by its deadline, priced on the engine's fitted step cost (the first one taken
    always goes), and a request binds early only to an engine where it would. Built per pull."""

    __slots__ = ("cost", "decodes", "due", "start", "tokens")

    def __init__(self, dispatcher: Dispatcher, view: InstanceView, model: str, now: float) -> None:
        s = view.state
        assert s is not None
        self.cost = dispatcher.estimator.step_cost(view, model)
        self.decodes = s.num_running
        self.tokens = s.prefill_tokens_pending  # prompts handed over that have not started yet
        # the step in flight ends first
        self.start = now + dispatcher.estimator.tpot(view, model)
        self.due = math.inf

    def _due(self, e: Entry) -> float:
        d = e.request.slo.ttft_deadline
        return d if d is not None and d > self.start else math.inf  # a late one binds nothing

    def fits(self, e: Entry, copies: int = 1) -> bool:
        """Whether ``e`` may start in this step (with ``copies - 1`` more prompts of its size)."""
        due = min(self.due, self._due(e))
        if due == math.inf:
            return True
        return (
            self.start + self.cost.step_s(self.tokens + copies * e.request.prompt_tokens, self.decodes) <= due
        )

    def take(self, e: Entry) -> None:
        self.tokens += e.request.prompt_tokens
        self.due = min(self.due, self._due(e))


def doomed(e: Entry, now: float) -> bool:
    """Whether ``e`` can no longer meet its SLO, whenever it starts."""
    d = e.request.slo.ttft_deadline
    if d is not None:
        return now > d
    d = e.request.slo.e2e_deadline
    return d is not None and now + e.service_s > d


def _ttft_budget(e: Entry) -> float:
    """The request's first-token budget from its arrival, rounded to a millisecond (its tier)."""
    due = e.request.slo.ttft_deadline
    return math.inf if due is None else round(due - e.request.arrival_time, 3)
