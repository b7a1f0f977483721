"""The global planner (QLM): where each request group runs, in which order, and which models swap.

Planning is over *request groups* (same model, same class, first deadlines in one window), not
requests, which keeps it small. Each instance is modelled as processing its virtual queue's groups
one after another with all its seats (a fluid model); a group's time is its predicted seat-seconds
over the seats, after the model is ready (a swap costs its warm or cold load time).

The solver is list scheduling: groups in least-laxity order (late groups after every on-time one),
each placed on the instance where it finishes earliest (load balancing), models swapped onto the
least-needed instance when no instance serves them (batching a model's groups there). Always
answers; O(groups x instances). An exact MILP over the same groups was measured and removed: on
A-F it was never better on weighted SLOs met where it mattered (docs/benchmarks.md).

Not thread-safe: called from the queue manager's loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qlm_plugin.brain.fleet_view import FleetView
from qlm_plugin.brain.global_queue import GlobalQueue
from qlm_plugin.domain.groups import GroupKey
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.plan import LoadModel, Plan
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl

#: How many of the next groups a swap's cost is weighed over (the plan is rebuilt every tick).
SWAP_LOOKAHEAD_GROUPS = 64


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


def _meets(g: GroupStat, start: float, end: float) -> bool:
    """Whether a group started at ``start`` and done at ``end`` meets its binding deadline."""
    return (start if g.ttft_bound else end) <= g.deadline


class Planner:
    """Default ``qlm_plan`` implementation, over the queue manager's global queue and fleet view (it
    reads the group totals and predictions they already hold, so planning 10,000 requests costs no
    prediction calls)."""

    def __init__(self, queue: GlobalQueue, fleet: FleetView) -> None:
        self.queue = queue
        self.fleet = fleet

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
        return sorted(out.values(), key=lambda g: (g.urgency, g.key))

    def machines(self, states: Sequence[InstanceState], now: float) -> list[Machine]:
        out = []
        for s in states:
            view = self.fleet.instances.get(s.instance_id)
            if view is None or not s.healthy:
                continue
            serving = s.loading_model or (s.models_loaded[0] if s.models_loaded else None)
            anycost = next(iter(view.costs.values()))
            seats = max(1, min(s.max_num_seqs, anycost.max_num_seqs))
            running = sum(e.service_s for e in view.running.values()) / 2
            drain = max((e.service_s for e in view.running.values()), default=0.0) / 2
            # what it can serve: its model, and models whose load did not fail there lately
            able = frozenset(m for m in view.costs if m == serving or view.can_load(m, now))
            loads = {m: view.load_s(m) for m in able}
            out.append(
                Machine(
                    s.instance_id,
                    seats,
                    now + running / seats,
                    serving,
                    frozenset(s.models_warm),
                    loads,
                    able,
                    drain,
                )
            )
        return out

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
        plan = self.heuristic(groups, machines, now)
        plan.solve_s = time.perf_counter() - t0
        return plan

    def heuristic(self, groups: Sequence[GroupStat], machines: Sequence[Machine], now: float) -> Plan:
        """List scheduling across models: groups in urgency order, each on the instance where it
        finishes earliest, a model swap priced in (the drain of the work ahead of it, then the
        load, warm or cold). So swaps are batched where they are dear, and made early where a
        model's urgent work would otherwise wait behind another model's slack work. An instance
        whose virtual queue starts with another model's group is ordered to swap now; models it
        serves later are staged in host memory (warm start). A swap that would make more of the
        served model's work late than it saves is not made (overload): that group stays unplanned."""
        plan = Plan(solver="heuristic")
        clock = {m.instance_id: max(now, m.busy_until) for m in machines}
        model = {m.instance_id: m.serving for m in machines}
        drain = {m.instance_id: m.drain_s for m in machines}
        objective = 0.0
        # Late groups after every on-time one (the late list's rule): the most late are the most
        # urgent by laxity, and placed first they had engines swap models for work already lost.
        groups = sorted(groups, key=lambda g: (g.deadline <= now, g.urgency, g.key))
        placed: set[int] = set()
        for i, g in enumerate(groups):
            if i in placed:
                continue
            options: list[tuple[float, float, str]] = []
            for m in machines:
                if g.model not in m.costs:
                    continue
                iid = m.instance_id
                switch = 0.0 if model[iid] == g.model else drain[iid] + m.load_s.get(g.model, math.inf)
                end = clock[iid] + switch + g.seat_s / m.seats
                if math.isfinite(end):
                    options.append((end, switch, iid))
            if not options:
                continue

            end, switch, iid = min(options)
            m = next(mm for mm in machines if mm.instance_id == iid)
            if switch and self._swap_loses(groups, i, placed, m, model, clock[iid], end - clock[iid]):
                continue  # unplanned: it waits for a swap that pays, or for the late list
            if switch:
                if iid not in plan.queues:  # the head of its virtual queue: swap now
                    plan.actions.append(LoadModel(iid, g.model, target="gpu"))
                elif g.model not in m.warm and g.model != m.serving:
                    plan.actions.append(LoadModel(iid, g.model, target="host"))  # its turn comes later
                model[iid] = g.model
            start = clock[iid] + switch
            clock[iid] = end
            drain[iid] = g.seat_s / max(1, len(g.ids))  # a swap after it waits for one request's work
            batch = [(g, start, end)]
            if switch:
                # One swap for the batch: the model's next groups follow it on this instance while
                # the most urgent waiting group of another model still meets its deadline after
                # them (and a swap back).
                for j in range(i + 1, len(groups)):
                    h = groups[j]
                    if j in placed or h.model != g.model:
                        continue
                    nxt = next(
                        (
                            p
                            for k, p in enumerate(groups[i + 1 :], i + 1)
                            if k not in placed and p.model != g.model
                        ),
                        None,
                    )
                    after = clock[iid] + h.seat_s / m.seats
                    back = m.load_s.get(nxt.model, 0.0) + nxt.seat_s / m.seats if nxt is not None else 0.0
                    if nxt is not None and after + back > nxt.deadline:
                        break
                    placed.add(j)
                    batch.append((h, clock[iid], after))
                    clock[iid] = after
            for b, b_start, b_end in batch:
                plan.queues.setdefault(iid, []).extend(b.ids)
                plan.groups.setdefault(iid, []).append(b.key)
                if _meets(b, b_start, b_end):
                    objective += b.weight
        plan.objective = objective
        return plan

    @staticmethod
    def _swap_loses(
        groups: Sequence[GroupStat],
        i: int,
        placed: set[int],
        m: Machine,
        model: dict[str, str | None],
        clock: float,
        delay: float,
    ) -> bool:
        """Whether swapping ``m`` to group ``i``'s model costs more SLOs than it wins: the weight of
        the groups of the model it serves now (and that no other instance serves) that would meet
        their deadline there without the swap but not after it, and a swap back, against group
        ``i``'s weight. In overload this keeps an engine on the work it can still finish in time."""
        current = model[m.instance_id]
        if current is None or sum(v == current for v in model.values()) > 1:
            return False
        delay += m.load_s.get(current, 0.0)  # and the swap back
        t, lost = clock, 0.0
        for j in range(i + 1, min(len(groups), i + 1 + SWAP_LOOKAHEAD_GROUPS)):
            h = groups[j]
            if j in placed or h.model != current:  # placed ones are timed into ``clock`` already
                continue
            start, t = t, t + h.seat_s / m.seats
            if _meets(h, start, t) and not _meets(h, start + delay, t + delay):
                lost += h.weight
        return lost > groups[i].weight
