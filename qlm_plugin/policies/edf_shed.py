"""``edf-shed``: earliest deadline first over one global queue per model, shedding late work.

The strongest simple baseline: requests wait in a central queue (as in llm-d's flow control) and
instances pull from it when they have room, earliest first deadline first. A request already past
its deadline (its TTFT deadline, or its end-to-end one when it has no TTFT SLO) is served only when
nothing on time waits for its model. An instance whose model has nothing queued takes the most
urgent request of a model no instance serves, and its engine swaps models once its own work is done.

It has no predictions, no plan and no eviction: what ``qlm`` gains over it does not come from
shedding alone. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from typing import Any

import pluggy

from qlm_plugin.brain.fleet_view import KV_BLOCKS_PER_REQUEST
from qlm_plugin.domain.instance import InstanceState, RunningView
from qlm_plugin.domain.outcome import Admission
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl, list_instances

_Item = tuple[float, float, str]  # (first deadline, arrival, id)


def free_slots(state: InstanceState) -> int:
    """Requests an instance could start now: free seats bounded by free KV, none while its own
    queue still holds work or a model is loading (late binding)."""
    if not state.healthy or state.loading_model is not None or not state.models_loaded or state.num_waiting:
        return 0
    kv = (state.kv_blocks_total - state.kv_blocks_used) // KV_BLOCKS_PER_REQUEST
    return max(0, min(state.max_num_seqs - state.num_running, kv))


def _served(states: Sequence[InstanceState]) -> set[str]:
    """The models the instances hold or are loading."""
    served: set[str] = set()
    for state in states:
        served.update(state.models_loaded)
        if state.loading_model is not None:
            served.add(state.loading_model)
    return served


class _ModelQueue:
    """Two heaps by deadline: on time, and late (the least late first). Entries of requests that
    left (cancelled, or queued again after a requeue) are dropped lazily."""

    def __init__(self, live: dict[str, Request]) -> None:
        self.on_time: list[_Item] = []
        self.late: list[_Item] = []
        self.live = live

    def _clean(self, heap: list[_Item]) -> None:
        while heap and heap[0][2] not in self.live:
            heapq.heappop(heap)

    def shed(self, now: float) -> None:
        self._clean(self.on_time)
        while self.on_time and self.on_time[0][0] < now:
            heapq.heappush(self.late, heapq.heappop(self.on_time))
            self._clean(self.on_time)
        self._clean(self.late)

    def head(self) -> _Item | None:
        self._clean(self.on_time)
        self._clean(self.late)
        return self.on_time[0] if self.on_time else self.late[0] if self.late else None

    def pop(self) -> _Item | None:
        if self.head() is None:
            return None
        return heapq.heappop(self.on_time if self.on_time else self.late)


class EDFShed:
    def __init__(self, models: Sequence[str]) -> None:
        self.models = set(models)
        self.queues: dict[str, _ModelQueue] = {}
        self.requests: dict[str, Request] = {}
        self.instances: list[str] = []
        self.hook: Any = None

    @hookimpl
    def qlm_configure(self, pm: pluggy.PluginManager) -> None:
        self.hook = pm.hook
        self.instances = [info.instance_id for info in list_instances(pm)]

    @hookimpl
    def qlm_instance_joined(self, info: Any, now: float) -> None:
        if info.instance_id not in self.instances:
            self.instances.append(info.instance_id)

    @hookimpl
    def qlm_instance_left(self, instance_id: str, now: float) -> None:
        if instance_id in self.instances:
            self.instances.remove(instance_id)

    @hookimpl
    def qlm_submit(self, request: Request, now: float) -> Admission:
        if request.model not in self.models:
            return Admission(
                request.id, False, False, reason=f"no instance can serve model {request.model!r}"
            )
        self.requests[request.id] = request
        self._push(request)
        self._pull_all(now)
        return Admission(request.id, True, True)

    def _push(self, request: Request) -> None:
        q = self.queues.get(request.model)
        if q is None:
            q = self.queues[request.model] = _ModelQueue(self.requests)
        heapq.heappush(q.on_time, (request.slo.first_deadline(), request.arrival_time, request.id))

    @hookimpl
    def qlm_request_finished(self, outcome: Any, now: float) -> None:
        self.requests.pop(outcome.request.id, None)  # cancelled while queued

    @hookimpl
    def qlm_instance_ready(self, instance_id: str, free_slots: int, now: float) -> None:
        state = self.hook.qlm_instance_state(instance_id=instance_id, detail=False)
        if state is not None:
            self._pull(state, free_slots, now)

    @hookimpl
    def qlm_tick(self, now: float) -> bool:
        self._pull_all(now)
        return bool(self.requests)

    def _states(self) -> list[InstanceState]:
        states = (self.hook.qlm_instance_state(instance_id=iid, detail=False) for iid in self.instances)
        return [s for s in states if s is not None]

    def _pull_all(self, now: float) -> None:
        states = self._states()
        served = _served(states)
        # The least busy first: work spreads over the fleet (in list order the first instance took
        # every arrival until it was full, and queued them behind its own running work).
        states.sort(key=lambda s: s.num_running / max(1, s.max_num_seqs))
        for state in states:
            self._pull(state, free_slots(state), now, served)

    def _pull(self, state: InstanceState, slots: int, now: float, served: set[str] | None = None) -> None:
        if slots <= 0 or not state.models_loaded:
            return
        q = self.queues.get(state.models_loaded[0])
        if q is None or q.head() is None:
            q = self._stranded_model_queue(now, _served(self._states()) if served is None else served)
            if q is None:
                return
            slots = 1  # the engine swaps once its own work is done: one request asks for it
        q.shed(now)
        # Only what the engine's next step can start: the rest waits here, where it can be reordered.
        room = state.prefill_room
        budget = (1 << 62) if room is None else room
        while slots > 0 and budget > 0 and (item := q.pop()) is not None:
            request = self.requests.pop(item[2])
            budget -= request.prompt_tokens
            if not self.hook.qlm_dispatch(instance_id=state.instance_id, request=request):
                self.requests[request.id] = request  # refused: queued again, tried at the next pull
                self._push(request)
                return
            slots -= 1

    def _stranded_model_queue(self, now: float, served: set[str]) -> _ModelQueue | None:
        """The queue of the model with the most urgent request among models no instance serves."""
        waiting = [
            (head, q) for m, q in self.queues.items() if m not in served and (head := q.head()) is not None
        ]
        return min(waiting, key=lambda w: (w[0][0] < now, w[0]))[1] if waiting else None

    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        return (request.slo.first_deadline(), request.arrival_time, request.id)

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        return max(
            candidates,
            key=lambda c: (c.request.deadline_after_first_token(), c.request.arrival_time, c.request.id),
        )
