"""Batch lines of several tenants take turns into the global queue, per model.

All the lines of a batch share one deadline, the end of its window, so in the queue's deadline
order an earlier batch's lines all come before a later one's: a tenant's 50-line batch waited for
another tenant's 3,000 lines to finish first (16.6 s against about 2 s of its own work). So a
batch line waits here before it is submitted, and goes in while fewer than ``depth(model)`` of the
lines let in are still queued (not handed to an engine yet). The depth is about the seats that
serve the model, so every seat that frees still finds batch work queued, and the tenants waiting
take turns, one line each: each tenant's batches get an equal share of what batch work gets,
whatever their sizes and the order they came in. Within a tenant, lines go in the order its
batches' workers asked.

Runs on the coordinator's event loop (not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qlm_plugin.coordinator.jobs import Job


@dataclass(slots=True)
class _Waiter:
    units: int
    granted: asyncio.Future[bool]
    stop: asyncio.Event


@dataclass(slots=True)
class _Model:
    """One model's turns: the units let in and not yet handed to an engine, and who waits."""

    inside: int = 0  # granted and not yet submitted, plus submitted and still queued
    queued: set[str] = field(default_factory=set)  # request ids let in, still queued
    waiting: dict[str, deque[_Waiter]] = field(default_factory=dict)  # tenant -> its waiters
    turns: deque[str] = field(default_factory=deque)  # tenants with waiters, next turn first


class BatchTurns:
    """``depth(model)``: how many batch requests of the model may wait in the global queue."""

    def __init__(self, depth: Callable[[str], int]) -> None:
        self._depth = depth
        self._models: dict[str, _Model] = {}

    async def enter(self, model: str, tenant: str, units: int, stop: asyncio.Event) -> bool:
        """Wait for the tenant's turn to submit ``units`` requests of ``model``; False (nothing
        held) once ``stop`` is set first (see :meth:`wake_stopped`). A grant is handed back with
        :meth:`hold` once submitted, or :meth:`release` if nothing was."""
        m = self._models.setdefault(model, _Model())
        if not m.turns and (m.inside == 0 or m.inside + units <= self._depth(model)):
            m.inside += units
            return True
        waiter = _Waiter(units, asyncio.get_running_loop().create_future(), stop)
        m.waiting.setdefault(tenant, deque()).append(waiter)
        if tenant not in m.turns:
            m.turns.append(tenant)
        try:
            return await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.result():
                self.release(model, units)
            raise

    def hold(self, model: str, jobs: Sequence[Job], units: int) -> None:
        """The granted ``units`` became ``jobs``: those still queued stay counted until their
        engine takes them (their ``on_dispatch``) or they end (:meth:`forget`)."""
        m = self._models[model]
        kept = 0
        for job in jobs:
            if job.state == "queued" and not job.done.is_set() and job.id not in m.queued:
                m.queued.add(job.id)
                job.on_dispatch = self._dispatched
                kept += 1
        self._give_back(model, m, units - kept)

    def release(self, model: str, units: int) -> None:
        """A grant that submitted nothing."""
        self._give_back(model, self._models[model], units)

    def forget(self, model: str, jobs: Sequence[Job]) -> None:
        """``jobs`` ended (an ended job never reaches an engine)."""
        m = self._models.get(model)
        if m is None:
            return
        gone = 0
        for job in jobs:
            if job.id in m.queued:
                m.queued.discard(job.id)
                job.on_dispatch = None
                gone += 1
        if gone:
            self._give_back(model, m, gone)

    def wake_stopped(self) -> None:
        """Answer False to the waiters whose batch stopped (expired, cancelled), wherever they
        wait: answered only when their turn came, a cancelled batch stayed cancelling while another
        tenant's lines held the depth (32 s in a review, without bound on a model no engine took)."""
        for model, m in self._models.items():
            for tenant in list(m.turns):
                queue = m.waiting[tenant]
                live = deque(w for w in queue if not (w.granted.done() or w.stop.is_set()))
                for w in queue:
                    if not w.granted.done() and w.stop.is_set():
                        w.granted.set_result(False)  # goes on without a turn
                if live:
                    m.waiting[tenant] = live
                else:
                    del m.waiting[tenant]
                    m.turns.remove(tenant)
            self._grant(model, m)

    def waiting(self, model: str) -> int:
        """Requests of ``model`` waiting for a turn."""
        m = self._models.get(model)
        return 0 if m is None else sum(w.units for q in m.waiting.values() for w in q)

    def _dispatched(self, job: Job) -> None:
        job.on_dispatch = None
        m = self._models.get(job.request.model)
        if m is not None and job.id in m.queued:
            m.queued.discard(job.id)
            self._give_back(job.request.model, m, 1)

    def _give_back(self, model: str, m: _Model, units: int) -> None:
        m.inside -= units
        self._grant(model, m)

    def _grant(self, model: str, m: _Model) -> None:
        depth = self._depth(model) if m.turns else 0
        while m.turns:
            tenant = m.turns[0]
            queue = m.waiting[tenant]
            while queue and (queue[0].granted.done() or queue[0].stop.is_set()):
                with contextlib.suppress(asyncio.InvalidStateError):
                    queue.popleft().granted.set_result(False)  # stopped: goes on without a turn
            if not queue:
                m.turns.popleft()
                del m.waiting[tenant]
                continue
            waiter = queue[0]
            if m.inside > 0 and m.inside + waiter.units > depth:
                return
            queue.popleft()
            m.inside += waiter.units
            waiter.granted.set_result(True)
            if queue:
                m.turns.rotate(-1)  # the next tenant's turn
            else:
                m.turns.popleft()
                del m.waiting[tenant]
