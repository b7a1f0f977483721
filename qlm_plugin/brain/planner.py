"""The global planner (QLM): where each request group runs, in which order, and which models swap.

Planning is over *request groups* (same model, same class, first deadlines in one window), not
requests, which keeps it small. Each instance is modelled as processing its virtual queue's groups
one after another with all its seats (a fluid model); a group's time is its predicted seat-seconds
over the seats, after the model is ready (a swap costs its warm or cold load time).

Two solvers behind one interface:

* ``heuristic``: groups in least-laxity order, each placed on the instance where it finishes
  earliest (load balancing), models swapped onto the least-needed instance when no instance serves
  them (batching a model's groups there). Always answers; O(groups x instances).
* ``milp``: assignment and order of groups as a mixed-integer program (scipy.optimize.milp, HiGHS)
  maximising the weighted number of groups meeting their deadline, then throughput; used when the
  problem is small enough for its time budget, and only when its plan is at least as good.

Not thread-safe: called from the queue manager's loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

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


def _ready_at(m: Machine, model: str, now: float) -> float:
    if m.serving == model:
        return max(now, m.busy_until)
    return max(now, m.busy_until) + m.load_s.get(model, math.inf)


class Planner:
    """Default ``qlm_plan`` implementation, over the queue manager's global queue and fleet view (it
    reads the group totals and predictions they already hold, so planning 10,000 requests costs no
    prediction calls)."""

    def __init__(
        self,
        queue: GlobalQueue,
        fleet: FleetView,
        *,
        milp_max_groups: int = 10,
        milp_max_instances: int = 8,
        milp_time_limit_s: float = 0.05,
    ) -> None:
        self.queue = queue
        self.fleet = fleet
        self.milp_max_groups = milp_max_groups
        self.milp_max_instances = milp_max_instances
        self.milp_time_limit_s = milp_time_limit_s

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
        if groups and len(groups) <= self.milp_max_groups and len(machines) <= self.milp_max_instances:
            exact = self.milp(groups, machines, now)
            if exact is not None and exact.objective > plan.objective:  # strictly: ties keep urgency order
                plan = exact
        plan.solve_s = time.perf_counter() - t0
        return plan

    # ------------------------------------------------------------------ heuristic
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
        groups = sorted(groups, key=lambda g: (g.urgency, g.key))
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

    # ------------------------------------------------------------------ exact
    def milp(self, groups: Sequence[GroupStat], machines: Sequence[Machine], now: float) -> Plan | None:
        """Assignment x[g,i], pairwise order o[g,h], start S[g], on-time z[g]: maximise
        sum w_g z_g - eps * sum S_g subject to one instance per group, groups on one instance not
        overlapping, and z_g only if the group's binding time meets its deadline."""
        G, M = len(groups), len(machines)
        pairs = [(a, b) for a in range(G) for b in range(a + 1, G)]
        nx, no = G * M, len(pairs)

        def ix(g: int, i: int) -> int:
            return g * M + i

        io = nx
        iS = nx + no
        iz = iS + G
        nvar = iz + G
        proc = np.array([[g.seat_s / m.seats for m in machines] for g in groups])
        ready = np.array([[_ready_at(m, g.model, now) - now for m in machines] for g in groups])
        # Placement and order only: groups go to instances serving their model (swaps are decided
        # by the swap rules, which weigh the stranded model's work; the fluid MILP cannot).
        for gi, grp in enumerate(groups):
            serving = [i for i, m in enumerate(machines) if m.serving == grp.model]
            if serving:
                for i in range(len(machines)):
                    if i not in serving:
                        ready[gi, i] = math.inf
        horizon = float(np.nansum(np.where(np.isfinite(ready), ready, 0)).max() + proc.sum() + 1.0)
        big = horizon * 2
        c = np.zeros(nvar)
        weights = np.array([max(g.weight, 1e-3) for g in groups])
        c[iz : iz + G] = -weights
        c[iS : iS + G] = 1e-4 / horizon
        lb = np.zeros(nvar)
        ub = np.ones(nvar)
        ub[iS : iS + G] = horizon
        integrality = np.ones(nvar)
        integrality[iS : iS + G] = 0
        for g in range(G):
            for i in range(M):
                if not math.isfinite(ready[g, i]):
                    ub[ix(g, i)] = 0  # cannot serve that model
        rows = G + G + 2 * no * M + G
        A = lil_matrix((rows, nvar))
        lo = np.full(rows, -np.inf)
        hi = np.full(rows, np.inf)
        r = 0
        for g in range(G):  # exactly one instance
            for i in range(M):
                A[r, ix(g, i)] = 1
            lo[r] = hi[r] = 1
            r += 1
        for g in range(G):  # start after the instance (and its model) is ready
            A[r, iS + g] = 1
            for i in range(M):
                if math.isfinite(ready[g, i]):
                    A[r, ix(g, i)] = -ready[g, i]
            lo[r] = 0
            r += 1
        for p, (a, b) in enumerate(pairs):  # no overlap on a shared instance
            for i in range(M):
                pa = proc[a, i]
                pb = proc[b, i]
                # S_b >= S_a + p_a - big*(1 - o) - big*(2 - x_a - x_b)
                A[r, iS + b] = 1
                A[r, iS + a] = -1
                A[r, io + p] = -big
                A[r, ix(a, i)] = -big
                A[r, ix(b, i)] = -big
                lo[r] = pa - 3 * big
                r += 1
                # S_a >= S_b + p_b - big*o - big*(2 - x_a - x_b)
                A[r, iS + a] = 1
                A[r, iS + b] = -1
                A[r, io + p] = big
                A[r, ix(a, i)] = -big
                A[r, ix(b, i)] = -big
                lo[r] = pb - 2 * big
                r += 1
        for g in range(G):  # on time: binding time <= deadline + big*(1 - z)
            grp = groups[g]
            deadline = grp.deadline - now if math.isfinite(grp.deadline) else horizon * 4
            A[r, iS + g] = 1
            if not grp.ttft_bound:
                for i in range(M):
                    A[r, ix(g, i)] = proc[g, i]
            A[r, iz + g] = big
            hi[r] = deadline + big
            r += 1
        try:
            res = milp(
                c,
                constraints=LinearConstraint(A.tocsr(), lo, hi),
                integrality=integrality,
                bounds=Bounds(lb, ub),
                options={"time_limit": self.milp_time_limit_s, "disp": False},
            )
        except ValueError:
            return None
        if res.x is None:
            return None
        x = res.x
        plan = Plan(solver="milp")
        order: dict[str, list[tuple[float, int]]] = {}
        for g in range(G):
            i = int(np.argmax([x[ix(g, j)] for j in range(M)]))
            order.setdefault(machines[i].instance_id, []).append((x[iS + g], g))
        for iid, items in order.items():
            items.sort()
            plan.queues[iid] = [rid for _, g in items for rid in groups[g].ids]
            plan.groups[iid] = [groups[g].key for _, g in items]
            m = next(mm for mm in machines if mm.instance_id == iid)
            for _, g in items:
                if m.serving != groups[g].model:
                    plan.actions.append(LoadModel(iid, groups[g].model, target="gpu"))
                    break
        plan.objective = float(sum(groups[g].weight for g in range(G) if x[iz + g] > 0.5))
        return plan
