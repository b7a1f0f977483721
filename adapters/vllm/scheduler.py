"""The scheduler subclass vLLM builds inside its EngineCore process.

``--scheduler-cls qlm_plugin.adapters.vllm.QLMScheduler`` builds a subclass of vLLM's
``AsyncScheduler`` when the engine schedules asynchronously (the GPU default) and of the plain
``Scheduler`` otherwise (the CPU platform), so vLLM's own additions are inherited either way.

What changes: the brain runs inside the scheduler through the hooks, on the engine's own plugin
manager (:mod:`qlm_plugin.adapters.vllm.engine_brain`). vLLM's waiting queue is ordered by
``qlm_rank_key`` (a preempted request keeps its rank); before each step, an urgent request that would
otherwise miss its TTFT takes a seat from a running request that still meets its own SLO after a
recompute (``qlm_select_victim`` among those), when ``max_num_seqs`` (or ``--max-num-active-seqs``)
binds; under KV pressure vLLM's
own preemption takes the victims in the order ``qlm_select_victim`` gives (recompute: V1 has no
swap; with ``--kv-offloading-size`` the KV stays in host memory and re-admission reloads it);
evictions ordered by the coordinator are carried out at the next step. Lengths are predicted online
from the engine's finished requests (the coordinator's prediction until then). Requests without QLM
fields run at default urgency. A failure in QLM's code or a plugin's is logged once and vLLM's own
scheduling goes on.

This module imports vLLM only when a scheduler class is built: the mixin is tested on a fake base.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from qlm_plugin.adapters.vllm.engine_brain import EngineBrain, RankedQueue
from qlm_plugin.adapters.vllm.fields import QLMFields, parse_fields
from qlm_plugin.adapters.vllm.orders import EvictionOrder, SeatsGiven, order_action
from qlm_plugin.domain.instance import StepTiming

if TYPE_CHECKING:
    from vllm.v1.request import Request

# A child of vLLM's logger: its handlers print it with the engine's own log lines.
log = logging.getLogger("vllm.qlm_plugin")

#: How long a coordinator's eviction order waits for its request to run (then it is dropped: the
#: request finished, or never came).
ORDER_WAIT_S = 10.0
#: KV cache usage from which vLLM may preempt for room: the victims are ordered before the step.
KV_PRESSURE = 0.9
#: The KV victim order is brought up to date every this many steps (it scans every running request;
#: the requests admitted meanwhile keep their client priority, below every ordered one).
KV_ORDER_EVERY_STEPS = 8
#: vLLM's finished statuses whose output length the predictor learns from.
_COMPLETED = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")
#: Waiting statuses vLLM's step skips while they last (names across the supported releases).
_BLOCKED = ("WAITING_FOR_FSM", "WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR", "WAITING_FOR_REMOTE_KVS")
_STREAMING = "WAITING_FOR_STREAMING_REQ"
#: Step timings kept for their update_from_output (async scheduling runs ahead by a step or two).
_PENDING_STEPS = 64


class _QLMMixin:
    """The QLM additions, on top of whichever vLLM scheduler base the engine needs."""

    # attributes of vLLM's Scheduler this mixin uses (declared for readers and type checkers)
    running: list[Request]
    requests: dict[str, Request]
    waiting: Any
    kv_holding_waiting: Any
    policy: Any
    max_num_running_reqs: int
    kv_cache_manager: Any
    vllm_config: Any
    # vLLM's RequestStatus and SchedulingPolicy, set by scheduler_class (this module imports no vLLM)
    qlm_status: Any
    qlm_priority_policy: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model_config = getattr(self.vllm_config, "model_config", None)
        served = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
        self.qlm_brain = EngineBrain(
            str(served[0] if isinstance(served, (list, tuple)) else served),
            os.environ.get("QLM_INSTANCE_ID", "vllm"),
        )
        status = self.qlm_status
        self._qlm_running_status = status.RUNNING
        self._qlm_completed = tuple(getattr(status, n) for n in _COMPLETED)
        self._qlm_blocked = tuple(getattr(status, n) for n in _BLOCKED if hasattr(status, n))
        preempt = getattr(self, "_preempt_request", None)
        self._qlm_drop_stale = preempt is not None and "drop_stale_output" in _parameters(preempt)
        self._qlm_grammar = getattr(status, _BLOCKED[0], None) or getattr(status, _BLOCKED[1], None)
        self._qlm_streaming = getattr(status, _STREAMING, None)
        # The waiting queues in QLM's order; vLLM's own KV preemption takes max(priority), which the
        # step before sets from qlm_select_victim under KV pressure.
        self.policy = self.qlm_priority_policy
        self.waiting = RankedQueue(self.qlm_brain.key, self._qlm_urgent)
        self.kv_holding_waiting = RankedQueue(self.qlm_brain.key)
        self.qlm_fields: dict[str, QLMFields] = {}
        self.qlm_by_id: dict[str, set[str]] = {}  # coordinator id -> vLLM request ids (n > 1: several)
        # coordinator-ordered evictions; the agent's thread appends
        self.qlm_orders: deque[EvictionOrder] = deque()
        self.qlm_seats = SeatsGiven()  # urgent requests a seat was freed for: one eviction each
        self._qlm_seats_pending: list[str] = []  # seats freed before this step, until it shows who took them
        self.qlm_evicted: deque[tuple[str, int, int]] = deque()  # (coordinator id, attempt, wasted tokens)
        self.qlm_steps: deque[StepTiming] = deque(maxlen=512)  # read by the agent thread
        self.qlm_counters = {
            "evictions": 0,
            "ordered_evictions": 0,
            "orders_skipped": 0,
            "wasted_tokens": 0,
            "steps": 0,
        }
        self.qlm_overhead_s = 0.0  # time spent in QLM code around vLLM's own scheduling
        self.qlm_step_total_s = 0.0  # time of the steps themselves (from schedule to update_from_output)
        # running, waiting, kv usage, at, prompt tokens of running requests not computed yet
        self.qlm_snapshot: tuple[int, int, float, float, int] = (0, 0, 0.0, time.time(), 0)
        # id(scheduler output) -> its step's timing: with async scheduling vLLM schedules the next
        # step before it updates from this one's output
        self._qlm_pending_steps: dict[int, tuple[float, float, int, int, int]] = {}
        self._qlm_kv_ordered_at = -KV_ORDER_EVERY_STEPS
        self._qlm_carried: dict[str, float] = {}  # coordinator id -> when its eviction was carried out
        self._qlm_last_began: float | None = None  # the previous step's start, while busy (perf_counter)
        self._qlm_errors: set[str] = set()  # where QLM code failed (logged once each)
        self.qlm_link: Any = None
        steps_path = os.environ.get("QLM_VLLM_STEPS")
        self._qlm_steps_file = open(steps_path, "a", buffering=1) if steps_path else None  # noqa: SIM115
        requests_path = os.environ.get("QLM_VLLM_REQUESTS")
        self._qlm_requests_file = open(requests_path, "a", buffering=1) if requests_path else None  # noqa: SIM115
        self._qlm_added: dict[str, float] = {}  # request id -> when it reached the engine (unix s)
        from qlm_plugin.adapters.vllm.engine_agent import start_link

        self.qlm_link = start_link(self)

    def _qlm_failed(self, where: str) -> None:
        """QLM code failed (a bug, or a plugin's beyond the brain's guards): vLLM goes on without it."""
        if where not in self._qlm_errors:
            self._qlm_errors.add(where)
            log.exception("QLM: %s failed; vLLM's own scheduling goes on (logged once)", where)

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        t0 = time.perf_counter()
        try:
            sp = request.sampling_params
            fields = parse_fields(
                sp.extra_args if sp is not None else None,
                priority=request.priority,
                arrival_time=request.arrival_time,
                max_tokens=request.max_tokens,
            )
            self.qlm_fields[request.request_id] = fields
            if fields.qlm_id is not None:
                self.qlm_by_id.setdefault(fields.qlm_id, set()).add(request.request_id)
            self.qlm_brain.admit(request, fields, time.time())
        except Exception:  # the request still runs, at default urgency
            self._qlm_failed("add_request")
        self.qlm_overhead_s += time.perf_counter() - t0
        if self._qlm_requests_file is not None:
            self._qlm_added[request.request_id] = time.time()
        super().add_request(request)  # type: ignore[misc]

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        try:
            self._qlm_forget(request)
        finally:  # vLLM's own bookkeeping, whatever happens above
            freed = super()._free_request(request, *args, **kwargs)  # type: ignore[misc]
        return freed

    def _qlm_forget(self, request: Request) -> None:
        try:
            if self._qlm_requests_file is not None:  # QLM_VLLM_REQUESTS
                added = self._qlm_added.pop(request.request_id, None)
                if added is not None:
                    self._qlm_requests_file.write(
                        f"{request.request_id} {added} {time.time()} {request.num_prompt_tokens} "
                        f"{request.num_output_tokens}\n"
                    )
            fields = self.qlm_fields.pop(request.request_id, None)
            if fields is not None and fields.qlm_id is not None:
                ids = self.qlm_by_id.get(fields.qlm_id)
                if ids is not None:
                    ids.discard(request.request_id)
                    if not ids:
                        del self.qlm_by_id[fields.qlm_id]
            t0 = time.perf_counter()
            self.qlm_brain.finished(request, request.status in self._qlm_completed, time.time())
            self.qlm_overhead_s += time.perf_counter() - t0
        except Exception:
            self._qlm_failed("_free_request")

    def _qlm_urgent(self, request: Request) -> bool:
        """Waiting for its first token under a TTFT SLO (the waiting queue counts these)."""
        fields = self.qlm_fields.get(request.request_id)
        return fields is not None and fields.ttft_deadline is not None and request.num_output_tokens == 0

    # ------------------------------------------------------------------ evictions
    def _qlm_evict(self, request: Request, now: float) -> None:
        if request.status != self._qlm_running_status or request not in self.running:
            return
        self.running.remove(request)
        self.qlm_counters["evictions"] += 1
        self.qlm_counters["wasted_tokens"] += request.num_computed_tokens
        fields = self.qlm_fields.get(request.request_id)
        if self.qlm_link is not None and fields is not None and fields.qlm_id is not None:
            # the agent reports it (EVICTED); without a coordinator nobody would read it
            self.qlm_evicted.append((fields.qlm_id, fields.attempt, request.num_computed_tokens))
        if self._qlm_drop_stale:  # as vLLM preempts: a KV producer's in-flight output is dropped
            drop = bool(getattr(self, "requires_kv_delivery", False))
            self._preempt_request(request, now, drop_stale_output=drop)  # type: ignore[attr-defined]
        else:  # a vLLM without the argument
            self._preempt_request(request, now)  # type: ignore[attr-defined]
        # Preempted between steps, it may be seated again in the very next one: as vLLM's own
        # reset_prefix_cache does, it must not count as scheduled in the previous step, or the
        # V1 model runner gets no token ids for it (KeyError in the engine core).
        prev = getattr(self, "prev_step_scheduled_req_ids", None)
        if isinstance(prev, set):
            prev.discard(request.request_id)

    def _qlm_requests(self, qid: str) -> list[Request]:
        """The requests here a coordinator id (or, failing that, a vLLM request id) names."""
        ids = self.qlm_by_id.get(qid) or (qid,)
        return [r for i in ids if (r := self.requests.get(i)) is not None]

    def _qlm_running(self, qid: str) -> Request | None:
        """The running request a coordinator id names (None: not here, or not running); with n > 1,
        the running child with the least work to redo."""
        running = [r for r in self._qlm_requests(qid) if r.status == self._qlm_running_status]
        return min(running, key=lambda r: r.num_computed_tokens) if running else None

    def _qlm_seats_free(self) -> int:
        """The seats running requests may take: vLLM admits while running requests (and paused
        streaming sessions, which hold a slot) are fewer than ``max_num_active_reqs``."""
        seats = int(getattr(self, "max_num_active_reqs", None) or self.max_num_running_reqs)
        return seats - int(getattr(self, "num_waiting_for_streaming_input", 0) or 0)

    def _qlm_schedulable(self, loras: set[int] | None) -> Callable[[Any], bool]:
        """Whether vLLM's next step would consider a waiting request (it skips requests waiting for
        their grammar, for remote KV, for more streamed input, or beyond ``max_loras``)."""
        grammar, streaming = self._qlm_grammar, self._qlm_streaming
        done_kv = getattr(self, "finished_recving_kv_req_ids", ())
        max_loras = getattr(getattr(self, "lora_config", None), "max_loras", None)

        def ready(r: Any) -> bool:
            st = r.status
            if st in self._qlm_blocked:
                if st == grammar:
                    so = getattr(r, "structured_output_request", None)
                    g = getattr(so, "grammar", None)
                    return g is not None and not isinstance(g, Exception)
                return r.request_id in done_kv
            if st == streaming and streaming is not None:
                return False
            if getattr(r, "num_stale_output_tokens", 0) and not getattr(r, "drop_stale_output", False):
                return False
            lora = getattr(getattr(r, "lora_request", None), "lora_int_id", 0) or 0
            return not (
                loras is not None and max_loras and lora > 0 and lora not in loras and len(loras) >= max_loras
            )

        return ready

    def _qlm_before_step(self) -> None:
        now, mono = time.time(), time.monotonic()
        for _ in range(len(self.qlm_orders)):  # the agent thread may append meanwhile
            order = self.qlm_orders.popleft()
            if order.came <= self._qlm_carried.get(order.victim, -math.inf):
                continue  # carried out already (the same order, sent again)
            victim = self._qlm_running(order.victim)
            action = order_action(
                order,
                victim_running=victim is not None,
                beneficiary_here=bool(order.for_request) and bool(self._qlm_requests(order.for_request)),
                beneficiary_running=bool(order.for_request)
                and self._qlm_running(order.for_request) is not None,
                seats=self.qlm_seats,
                now=mono,
                wait_s=ORDER_WAIT_S,
            )
            if action == "evict" and victim is not None:
                self._qlm_carried[order.victim] = mono
                if len(self._qlm_carried) > 256:  # only recent ones can be sent again
                    self._qlm_carried = {
                        q: t for q, t in self._qlm_carried.items() if t > mono - ORDER_WAIT_S
                    }
                if order.for_request:
                    self.qlm_seats.give(order.for_request, mono)
                    self._qlm_seats_pending.append(order.for_request)
                self.qlm_counters["ordered_evictions"] += 1
                log.info("QLM: evicting %s (%s) as the coordinator ordered", victim.request_id, order.victim)
                self._qlm_evict(victim, now)
            elif action == "skip":
                self.qlm_counters["orders_skipped"] += 1  # its urgent request has a seat already
            elif action == "wait":
                # Not running yet, or the request it is for not here yet: the order overtook the
                # request (commands and dispatch travel apart), or it waits for a seat. It is
                # carried out once both are here.
                self.qlm_orders.append(order)
        steps = self.qlm_counters["steps"]
        if (
            self.running
            and steps - self._qlm_kv_ordered_at >= KV_ORDER_EVERY_STEPS
            and float(self.kv_cache_manager.usage) >= KV_PRESSURE
        ):
            self._qlm_kv_ordered_at = steps
            # vLLM preempts max(priority) when a step finds no room: the order QLM's victims give.
            victims = self.qlm_brain.kv_victim_order(self.running, now)
            for i, r in enumerate(victims):
                r.priority = len(victims) - i
        seats = self._qlm_seats_free()
        if not self.waiting.flagged or len(self.running) < seats:
            return  # no urgent request waits (the common case, in O(1)), or a seat is free

        def given(request_id: str) -> bool:
            fields = self.qlm_fields.get(request_id)
            return self.qlm_seats.given(fields.qlm_id or request_id, mono) if fields is not None else True

        loras = None
        if getattr(self, "lora_config", None) is not None:
            loras = {r.lora_request.lora_int_id for r in self.running if getattr(r, "lora_request", None)}
        ready = self._qlm_schedulable(loras)
        if self.kv_holding_waiting.first(1, ready, scan=4 * seats):
            # vLLM seats the requests that hold KV blocks (async or remote KV loads) first: a seat
            # freed now would go to one of them, and the urgent request would cost another
            # eviction at every step while they last
            return
        # the first requests vLLM would seat, in rank order (an urgent one behind others counts too)
        waiting = self.waiting.first(seats, ready, scan=4 * seats)
        found = self.qlm_brain.seat_for(waiting, self.running, seats, now, given)
        if found is not None:
            victim, choice = found
            log.info("QLM: evicting %s: %s", victim.request_id, choice.reason)
            fields = self.qlm_fields.get(choice.for_request)
            key = (fields.qlm_id if fields else None) or choice.for_request
            self.qlm_seats.give(key, mono)
            self._qlm_seats_pending.append(key)
            self._qlm_evict(victim, now)

    def _qlm_seats_taken(self) -> None:
        """A seat freed for a request here that the step did not schedule (vLLM skipped it, or gave
        the seat to another) is not spent: it may be freed again."""
        for key in self._qlm_seats_pending:
            here = self._qlm_requests(key)
            if here and all(r.status != self._qlm_running_status for r in here):
                self.qlm_seats.take_back(key)
        self._qlm_seats_pending.clear()

    # ------------------------------------------------------------------ the step
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            self._qlm_before_step()
        except Exception:
            self._qlm_failed("the step's evictions")
        t1 = time.perf_counter()
        out = super().schedule(*args, **kwargs)  # type: ignore[misc]
        t2 = time.perf_counter()
        try:
            if self._qlm_seats_pending:
                self._qlm_seats_taken()
            total = out.total_num_scheduled_tokens
            if total:
                # O(1): requests scheduled for the first time are prefills, the others (nearly all) decodes
                batch = len(out.num_scheduled_tokens)
                decode = batch - len(out.scheduled_new_reqs)
                pending = self._qlm_pending_steps
                if len(pending) >= _PENDING_STEPS:  # outputs never updated from (not vLLM's way)
                    del pending[next(iter(pending))]
                pending[id(out)] = (time.time(), t2, total - decode, decode, batch)
        except Exception:
            self._qlm_failed("the step's timing")
        self.qlm_overhead_s += (t1 - t0) + (time.perf_counter() - t2)
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        result = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        t0 = time.perf_counter()
        try:
            self._qlm_after_step(scheduler_output, t0)
        except Exception:
            self._qlm_failed("update_from_output")
        self.qlm_overhead_s += time.perf_counter() - t0
        return result

    def _qlm_after_step(self, scheduler_output: Any, t0: float) -> None:
        step = self._qlm_pending_steps.pop(id(scheduler_output), None)
        if step is not None:
            start, began, prefill, decode, batch = step
            duration = t0 - began
            self.qlm_steps.append(StepTiming(start, duration, prefill, decode, batch))
            self.qlm_counters["steps"] += 1
            self.qlm_step_total_s += duration
            if self.qlm_counters["steps"] % 200 == 0 or not self.running:
                # and when the engine empties: vLLM's server kills EngineCore at SIGTERM before
                # shutdown() writes them, and a benchmark read counters up to 199 steps old
                _write_stats(self)
            if self._qlm_steps_file is not None:  # QLM_VLLM_STEPS: every step, for calibration checks
                self._qlm_steps_file.write(f"{start} {duration} {prefill} {decode} {batch}\n")
            # The pace a running request sees is the time from one step to the next, not the step's
            # own duration: on a loaded machine the engine waits for a CPU between steps.
            last, self._qlm_last_began = self._qlm_last_began, began
            if prefill == 0 and last is not None:
                self.qlm_brain.observe_step(began - last, decode)
            elif prefill > 0:  # what a recompute costs: victims are chosen by it
                self.qlm_brain.observe_prefill(duration, prefill)
        if not self.running:
            self._qlm_last_began = None  # idle: the next step's pace starts afresh
        usage = float(self.kv_cache_manager.usage)
        pending = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.running)
        self.qlm_snapshot = (len(self.running), len(self.waiting), usage, time.time(), pending)
        if self.qlm_link is not None:
            self.qlm_link.step_done()

    def shutdown(self) -> None:
        if self.qlm_link is not None:
            self.qlm_link.stop()
        _write_stats(self)
        super().shutdown()  # type: ignore[misc]


def _parameters(function: Callable[..., Any]) -> Mapping[str, Any]:
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}


_classes: dict[type, type] = {}
_lock = threading.Lock()


def _write_stats(sched: Any) -> None:
    """``QLM_VLLM_STATS=path``: the scheduler's counters, a line every 200 steps, when the engine
    empties and at shutdown (benchmarks read the last)."""
    path = os.environ.get("QLM_VLLM_STATS")
    if path:
        import json

        with open(path, "a") as f:
            stats = {
                **sched.qlm_counters,
                "overhead_s": sched.qlm_overhead_s,
                "step_s": sched.qlm_step_total_s,
            }
            f.write(json.dumps(stats) + "\n")


def scheduler_class(base: type, *, request_status: Any = None, priority_policy: Any = None) -> type:
    """The QLM scheduler class on ``base`` (built once per base). ``request_status`` and
    ``priority_policy``: vLLM's ``RequestStatus`` and ``SchedulingPolicy.PRIORITY`` (imported from
    vLLM unless given: tests build the class on a fake base without vLLM)."""
    with _lock:
        cls = _classes.get(base)
        if cls is None:
            if request_status is None or priority_policy is None:
                from vllm.v1.core.sched.request_queue import SchedulingPolicy
                from vllm.v1.request import RequestStatus

                request_status = request_status or RequestStatus
                priority_policy = priority_policy or SchedulingPolicy.PRIORITY
            attrs = {
                "__module__": __name__,
                "qlm_status": request_status,
                "qlm_priority_policy": priority_policy,
            }
            # named as this module gives it (``QLMSyncScheduler``): pickled by reference, the class
            # object is found again (named ``QLMScheduler``, pickle found the factory instead)
            name = EXPORTED_NAMES.get(base.__name__, f"QLM{base.__name__}")
            attrs["__qualname__"] = name
            cls = _classes[base] = type(name, (_QLMMixin, base), attrs)
        return cls


#: The names this module exports the QLM scheduler classes under, by vLLM base class.
EXPORTED_NAMES = {"Scheduler": "QLMSyncScheduler", "AsyncScheduler": "QLMAsyncScheduler"}


def _vllm_class(async_on: bool) -> type:
    if async_on:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler

        return scheduler_class(AsyncScheduler)
    from vllm.v1.core.sched.scheduler import Scheduler

    return scheduler_class(Scheduler)


def __getattr__(name: str) -> Any:  # vLLM is imported when a scheduler class is first asked for
    if name in ("QLMSyncScheduler", "QLMAsyncScheduler"):
        return _vllm_class(name == "QLMAsyncScheduler")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class QLMScheduler:
    """The one class to name in ``--scheduler-cls``: builds the QLM subclass of the scheduler base
    that matches the engine's ``async_scheduling``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("vllm_config", args[0] if args else None)
        async_on = bool(getattr(getattr(config, "scheduler_config", None), "async_scheduling", False))
        return _vllm_class(async_on)(*args, **kwargs)
