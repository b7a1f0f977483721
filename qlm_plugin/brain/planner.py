"""The global planner (QLM): where each request group runs, in which order, and which models swap.

Planning is over *request groups* (same model, same class, first deadlines in one window), not
requests, which keeps it small. Each instance is modelled as processing its virtual queue's groups
one after another (a fluid model), after the model is ready (a swap costs the drain of the work
ahead of it and the warm or cold load). An end-to-end-bound group takes its predicted seat-seconds
over the pace of a full engine serving its model (its KV cache and step cost on the queued mix of
requests: seat-seconds are priced at a reference batch, and a full engine is several times slower
per request); a TTFT-bound group is timed over the seats (the engine starts it ahead of the rest).

The solver is list scheduling: groups in least-laxity order (late groups after every on-time one),
each placed where its model is served and it meets its deadline, else where it finishes earliest
(load balancing, a model swap), batching a model's groups after a swap; no engine swaps models for
late groups. In sustained overload (the queue misses and what arrives is more than the fleet gets
through) the plan also weighs the arrivals expected over the next minute, at each lane's recent
rates, and gives up a whole model where that meets more SLOs, both with those arrivals and for the
queue as it stands. Always answers; O(groups x instances) (and, in overload, one plan per queued
model). An exact
MILP over the same groups was measured and removed: on A-F it was never better on weighted SLOs
met where it mattered (docs/benchmarks.md).

Not thread-safe: called from the queue manager's loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import ARRIVAL_MEMORY_S, GlobalQueue
from qlm_plugin.domain.groups import GroupKey
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.plan import LoadModel, Plan
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl

#: How far ahead a plan weighs the expected arrivals before giving a model up (no further than
#: their rates were measured), and the span of one expected group, seconds.
LOOK_AHEAD_S = ARRIVAL_MEMORY_S
EXPECTED_GROUP_S = 10.0


@dataclass(slots=True)
class GroupStat:
    key: GroupKey
    model: str
    ids: list[str] = field(default_factory=list)
    seat_s: float = 0.0  # predicted seat-seconds of all its requests
    urgency: float = math.inf  # least laxity (absolute time) of its requests
    deadline: float = math.inf  # earliest first deadline
    ttft_bound: bool = False
    weight: float = 0.0  # sum of request weights


@dataclass(slots=True)
class Machine:
    instance_id: str
    seats: int
    busy_until: float  # when its running work frees the seats (absolute)
    serving: str | None
    warm: frozenset[str]
    load_s: dict[str, float]  # model -> load time here (warm or cold)
    costs: frozenset[str]  # models it can serve
    drain_s: float = 0.0  # before a swap, its running work must finish: about one request's service
    pace: dict[str, float] = field(default_factory=dict)  # model -> seat-seconds it finishes per second

    def rate(self, g: GroupStat) -> float:
        """Predicted seat-seconds of ``g`` it gets through per second: an end-to-end-bound group's
        at the pace of a full engine; a TTFT-bound group's at every seat's reference pace (an engine
        starts those ahead of the rest, in the seats and steps the other work leaves, so how fast
        a full engine drains work does not time them)."""
        if g.ttft_bound:
            return float(self.seats)
        return self.rate_of(g.model)

    def rate_of(self, model: str) -> float:
        """Seat-seconds of ``model``'s end-to-end-bound work it gets through per second."""
        return self.pace.get(model, float(self.seats))


@dataclass(slots=True)
class _Slot:
    """A group's turn on one instance in a plan: the model swap before it, and its start and end."""

    group: GroupStat
    switch: float
    start: float
    end: float


def _timeline(
    m: Machine, groups: Sequence[GroupStat], clock: float, model: str | None, drain: float
) -> list[_Slot]:
    """When each of ``groups`` runs on ``m``, one after another, from ``clock``: a group of another
    model waits for the drain of the work ahead of it and the load."""
    out = []
    for g in groups:
        switch = 0.0 if model == g.model else drain + m.load_s.get(g.model, math.inf)
        start = clock + switch
        clock = start + g.seat_s / m.rate(g)
        out.append(_Slot(g, switch, start, clock))
        model, drain = g.model, g.seat_s / max(1, len(g.ids))  # a swap after it waits for one request
    return out


def _meets(g: GroupStat, start: float, end: float) -> bool:
    """Whether a group started at ``start`` and done at ``end`` meets its binding deadline."""
    return (start if g.ttft_bound else end) <= g.deadline


class Planner:
    """Default ``qlm_plan`` implementation, over the queue manager's global queue and fleet view (it
    reads the group totals and predictions they already hold, so planning 10,000 requests costs no
    prediction calls)."""

    def __init__(self, queue: GlobalQueue, fleet: FleetView, *, give_up: bool = True) -> None:
        self.queue = queue
        self.fleet = fleet
        self.give_up = give_up
        self._mix: dict[str, tuple[float, float, float]] = {}  # model -> mean seat-s, prompt, output

    # ------------------------------------------------------------------ inputs
    def groups(self) -> list[GroupStat]:
        """Group statistics, from the global queue's running totals (a few hundred groups), each
        with its request ids in urgency order (one pass over the queue: the plan's virtual queues
        hold requests, so an instance can pull in the plan's order)."""
        out: dict[GroupKey, GroupStat] = {}
        for key, agg in self.queue.groups.items():
            agg.refresh()
            head = next(iter(agg.ids.values()))
            out[key] = GroupStat(
                key,
                key[0],
                [],
                agg.seat_s,
                agg.urgency,
                agg.deadline,
                head.request.slo.ttft_deadline is not None,
                agg.weight,
            )
        entries = self.queue.entries
        for q in self.queue.queues.values():
            for _, rid in q.order:
                g = out.get(entries[rid].group)
                if g is not None:
                    g.ids.append(rid)
        self._mix = {
            model: (seat_s / n, prompt / n, output / n)
            for model, q in self.queue.queues.items()
            for n, seat_s, prompt, output in [q.mix]
            if n >= 0.5
        }
        return sorted(out.values(), key=lambda g: (g.urgency, g.key))

    def machines(self, states: Sequence[InstanceState], now: float) -> list[Machine]:
        views = [self.fleet.instances.get(s.instance_id) for s in states]
        out = []
        for s, view in zip(states, views, strict=True):
            if view is None or not s.healthy:
                continue
            serving = s.loading_model or (s.models_loaded[0] if s.models_loaded else None)
            anycost = next(iter(view.costs.values()))
            seats = max(1, min(s.max_num_seqs, anycost.max_num_seqs))
            # what it can serve: its model, and models whose load did not fail there lately
            able = frozenset(m for m in view.costs if m == serving or view.can_load(m, now))
            pace = {m: p for m in able if (p := self._pace(view, m, seats)) is not None}
            # Its running work, and before a swap the drain of about its longest request, at the
            # pace of a full engine serving its model.
            speed = pace.get(serving, seats) if serving is not None else seats
            running = sum(e.service_s for e in view.running.values()) / 2
            drain = max((e.service_s for e in view.running.values()), default=0.0) / 2 * seats / speed
            out.append(
                Machine(
                    s.instance_id,
                    seats,
                    now + running / speed,
                    serving,
                    frozenset(s.models_warm),
                    {m: view.load_s(m) for m in able},
                    able,
                    drain,
                    pace,
                )
            )
        return out

    def _pace(self, view: InstanceView, model: str, seats: int) -> float | None:
        """How many of the seat-seconds the groups are priced in ``view`` gets through per second
        serving ``model``, full, on the model's queued mix of requests (None: nothing queued).

        Seat-seconds are priced at a reference batch; a full engine runs as many requests as its
        seats and KV cache hold, each step slower for every request in it and for the prompts mixed
        in (each request's prompt over its output's steps). A plan that assumed every seat at the
        reference pace (ten times too fast on long conversations) swapped models for work it could
        not finish in time."""
        mix = self._mix.get(model)
        cost = view.costs.get(model)
        if mix is None or cost is None:
            return None
        seat_s, prompt, output = mix
        output = max(output, 1.0)
        kv = cost.kv_blocks
        if view.state is not None and view.model() == model and view.state.kv_blocks_total > 0:
            kv = view.state.kv_blocks_total
        held = max(1, cost.blocks_for(int(prompt + output / 2)))  # a running request, half done
        running = max(1, min(seats, kv // held))
        step = cost.step_s(int(running * prompt / output), running) / max(view.speed, 1e-6)
        return running * (seat_s / output) / max(step, 1e-9)

    # ------------------------------------------------------------------ the hook
    @hookimpl
    def qlm_plan(
        self, queue: Sequence[Request], instances: Sequence[InstanceState], now: float
    ) -> Plan | None:
        t0 = time.perf_counter()
        groups = self.groups()
        machines = self.machines(instances, now)
        if not machines:
            return None
        plan, misses = self.schedule(groups, machines, now)
        if misses:
            # End-to-end-bound work still on time is planned to miss: overload, or a peak (TTFT-bound
            # work is never given up). A model given up?
            plan = self._give_up(groups, machines, now, plan)[1]
        plan.solve_s = time.perf_counter() - t0
        return plan

    def expected(self, machines: Sequence[Machine], now: float) -> list[GroupStat] | None:
        """The groups expected to arrive over the next ``LOOK_AHEAD_S``, one per lane (model and
        class) and ``EXPECTED_GROUP_S``, at the lane's recent rates; None when the fleet, splitting
        its time over the models at its best pace for each, gets through what arrives."""
        lanes = [(lane, r, r.decayed(now)) for lane, r in self.queue.arrivals.items()]
        work: dict[str, float] = {}
        for (model, _), r, decay in lanes:
            work[model] = work.get(model, 0.0) + r.seat_s * decay
        need = 0.0
        for model, w in work.items():
            pace = max((m.rate_of(model) for m in machines if model in m.costs), default=0.0)
            need += w / pace if pace > 0 else math.inf
        if need <= len(machines):
            return None
        out = []
        for (model, cls), r, decay in lanes:
            seat_s, weight = r.seat_s * decay * EXPECTED_GROUP_S, r.weight * decay * EXPECTED_GROUP_S
            for k in range(int(LOOK_AHEAD_S / EXPECTED_GROUP_S)):
                due = now + (k + 0.5) * EXPECTED_GROUP_S + r.budget_s
                out.append(GroupStat((model, cls, -2 - k), model, [], seat_s, due, due, r.ttft_bound, weight))
        return out

    def given_up(
        self, groups: Sequence[GroupStat], machines: Sequence[Machine], now: float
    ) -> frozenset[str]:
        """The model whose work waits until every other model's on-time work is planned, if any.

        Asked when the queue's end-to-end-bound work cannot all be served in time; only in
        overload, when what arrives is also more than the fleet gets through (else it is a peak,
        which the deadlines' slack absorbs). Then the queue is planned with the arrivals expected
        over the next minute, once as it is and once with each queued model given up; the model
        whose giving up meets the most SLOs over the minute (if that is more than none) is given
        up, if giving it up also meets more of the queue as it stands. A plan of the queue alone
        does not start this: in sustained overload the slow model's groups still fit, the engines
        swap to them, and the fast models' next arrivals, several SLOs per engine-second more, pile
        up behind them. But the expected arrivals are the last minute's rates, and a peak ends
        (without the check on the queue as it stands, B at 3x lost 1.2 points over 30 seeds)."""
        return self._give_up(groups, machines, now, self.heuristic(groups, machines, now))[0]

    def _give_up(
        self, groups: Sequence[GroupStat], machines: Sequence[Machine], now: float, present: Plan
    ) -> tuple[frozenset[str], Plan]:
        """:meth:`given_up`, and the plan of the queue to use: ``present`` (the plan of ``groups``
        as they are) unless a model is given up."""
        models = {g.model for g in groups if not g.ttft_bound}
        if not self.give_up or len({g.model for g in groups}) < 2:
            return frozenset(), present
        expected = self.expected(machines, now)
        if expected is None:
            return frozenset(), present
        both = sorted([*groups, *expected], key=lambda g: (g.urgency, g.key))
        best, choice = self.heuristic(both, machines, now).objective, frozenset[str]()
        for model in sorted(models):
            trial = self.heuristic(both, machines, now, frozenset([model])).objective
            if trial > best:
                best, choice = trial, frozenset([model])
        if not choice:
            return choice, present
        # The expected arrivals are a forecast from the last minute's rates, and a peak ends: the
        # choice must also meet more of the queue as it stands, or it is not made.
        chosen = self.heuristic(groups, machines, now, choice)
        return (choice, chosen) if chosen.objective > present.objective else (frozenset(), present)

    def heuristic(
        self,
        groups: Sequence[GroupStat],
        machines: Sequence[Machine],
        now: float,
        given_up: frozenset[str] = frozenset(),
    ) -> Plan:
        """The plan of ``groups`` (:meth:`schedule`), with the models in ``given_up`` given up."""
        return self.schedule(groups, machines, now, given_up)[0]

    def schedule(
        self,
        groups: Sequence[GroupStat],
        machines: Sequence[Machine],
        now: float,
        given_up: frozenset[str] = frozenset(),
    ) -> tuple[Plan, bool]:
        """The plan, and whether an end-to-end-bound group still on time misses its deadline in it.

        List scheduling across models: groups in urgency order, each where its model is served
        and it meets its deadline, else on the instance where it finishes earliest, a model swap
        priced in (the drain of the work ahead of it, then the load, warm or cold). So swaps are
        batched where they are dear, and made early where a model's urgent work would otherwise
        wait behind another model's slack work. An instance whose virtual queue starts with another
        model's group is ordered to swap now; models it serves later are staged in host memory
        (warm start).

        Groups already late (and those of a model given up) follow every on-time group: no engine
        swaps models for work already lost while it has other work. A group that would miss where
        it is placed stays in urgency order: moving out the groups that take the most time per SLO
        (Moore and Hodgson's rule) was measured and removed, as it cost more than it gained
        (docs/benchmarks.md, stop 44)."""
        plan = Plan(solver="heuristic")
        by_id = {m.instance_id: m for m in machines}
        seq: dict[str, list[GroupStat]] = {m.instance_id: [] for m in machines}
        slots: dict[str, list[_Slot]] = {m.instance_id: [] for m in machines}
        clock = {m.instance_id: max(now, m.busy_until) for m in machines}
        model = {m.instance_id: m.serving for m in machines}
        drain = {m.instance_id: m.drain_s for m in machines}

        def replay(iid: str, appended: int) -> None:
            """Time ``iid``'s last ``appended`` groups, after the rest of its plan."""
            m = by_id[iid]
            slots[iid] += _timeline(m, seq[iid][-appended:], clock[iid], model[iid], drain[iid])
            last = slots[iid][-1]
            clock[iid], model[iid] = last.end, last.group.model
            drain[iid] = last.group.seat_s / max(1, len(last.group.ids))

        # Late groups after every on-time one (the late list's rule): the most late are the most
        # urgent by laxity, and placed first they had engines swap models for work already lost.
        # A model given up: its end-to-end-bound groups (never its TTFT-bound ones) go after too.
        def lost(g: GroupStat) -> bool:
            return g.deadline <= now or (g.model in given_up and not g.ttft_bound)

        on_time = sorted((g for g in groups if not lost(g)), key=lambda g: (g.urgency, g.key))
        after = [g for g in groups if lost(g)]

        def options(g: GroupStat) -> list[tuple[bool, bool, float, float, str]]:
            """Where ``g`` could go next: (misses there, needs a swap, its end, the swap, instance)."""
            out = []
            for m in machines:
                if g.model not in m.costs:
                    continue
                iid = m.instance_id
                switch = 0.0 if model[iid] == g.model else drain[iid] + m.load_s.get(g.model, math.inf)
                start = clock[iid] + switch
                end = start + g.seat_s / m.rate(g)
                if math.isfinite(end):
                    out.append((not _meets(g, start, end), switch > 0, end, switch, m.instance_id))
            return out

        placed: set[int] = set()
        for i, g in enumerate(on_time):
            if i in placed:
                continue
            where = options(g)
            if not where:
                continue
            # An instance that serves the group's model and meets its deadline, if one does: a swap
            # costs what the timeline does not show (the other model's TTFTs, its KV cache).
            _, _, end, switch, iid = min(where)
            m = by_id[iid]
            before = len(seq[iid])
            seq[iid].append(g)
            if switch:
                # One swap for the batch: the model's next groups follow it on this instance while
                # the most urgent waiting group of another model still meets its deadline after
                # them (and a swap back).
                t = end
                for j in range(i + 1, len(on_time)):
                    h = on_time[j]
                    if j in placed or h.model != g.model:
                        continue
                    nxt = next(
                        (
                            p
                            for k, p in enumerate(on_time[i + 1 :], i + 1)
                            if k not in placed and p.model != g.model
                        ),
                        None,
                    )
                    t_after = t + h.seat_s / m.rate(h)
                    back = 0.0
                    if nxt is not None:
                        back = m.load_s.get(nxt.model, 0.0) + nxt.seat_s / m.rate(nxt)
                    if nxt is not None and t_after + back > nxt.deadline:
                        break
                    placed.add(j)
                    seq[iid].append(h)
                    t = t_after
            replay(iid, len(seq[iid]) - before)
        # What is expected to miss, in urgency order, where it finishes earliest (after the rest).
        for g in sorted(after, key=lambda g: (g.urgency, g.key)):
            where = options(g)
            if where:
                iid = min(where, key=lambda o: o[2:])[4]
                seq[iid].append(g)
                replay(iid, 1)
        objective, misses = 0.0, False
        for iid, its in slots.items():
            m = by_id[iid]
            for n, slot in enumerate(its):
                g = slot.group
                if n == 0 and slot.switch:
                    plan.actions.append(LoadModel(iid, g.model, target="gpu"))  # its head: swap now
                elif slot.switch and g.model not in m.warm and g.model != m.serving:
                    plan.actions.append(LoadModel(iid, g.model, target="host"))  # its turn comes later
                plan.queues.setdefault(iid, []).extend(g.ids)
                plan.groups.setdefault(iid, []).append(g.key)
                if _meets(g, slot.start, slot.end):
                    objective += g.weight
                elif not g.ttft_bound and g.deadline > now:
                    misses = True
        plan.objective = objective
        return plan, misses
