"""One simulated continuous-batching engine (vLLM V1-like), driven by the fleet's event loop.

Per step: running decodes first (one token each), then partial prefills, then admissions from the
waiting queue in policy order, within a token budget (chunked prefill) and ``max_num_seqs``; KV
blocks of 16 tokens allocated as tokens are computed; when a step's decode blocks do not fit, victims
chosen by the policy are preempted (recompute, or swap with a host-copy cost). Step time is
``b0 + b1*prefill + b2*decode`` (:mod:`qlm_plugin.domain.costmodel`).

Speed: consecutive pure-decode steps with nothing to admit are simulated as one event ("macro step").
Decode progress is kept lazily against a per-instance step counter, and KV growth is computed from a
16-bucket histogram of block phases, so a macro step costs O(1) whatever the batch size. A macro step
is cut at the next step boundary when something arrives that could change the batch.

Aborts (the client went away, or the request was re-served elsewhere) take a waiting request out at
once and a running one at the next step boundary, as evictions do; an aborted request never finishes.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from qlm_plugin.domain.costmodel import BLOCK_SIZE, CostModel
from qlm_plugin.domain.instance import (
    EvictMode,
    EvictResult,
    InstanceState,
    LoadResult,
    RunningView,
    StepTiming,
)
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import Request

WAITING, PREFILL, DECODE, DONE = range(4)
_MAX_MACRO_STEPS = 1 << 20
#: How long a model a queue manager ordered here may sit with none of its work, other models'
#: requests waiting, before the engine swaps back for them, seconds: the queue manager hands an
#: ordered model its work within a tick of the load, so this is no gap between its requests.
ORDERED_IDLE_HOLD_S = 30.0


class Driver(Protocol):
    """What drives an instance (:class:`SimFleet`, or a real-time loop): a clock, and one live wake-up
    per instance that a new ``schedule`` supersedes."""

    @property
    def now(self) -> float: ...

    def schedule(self, inst: SimInstance, t: float) -> None: ...


class _Run:
    """Simulation state of one request on one instance."""

    __slots__ = (
        "admitted_at",
        "blocks",
        "c0",
        "cancelled",
        "computed",
        "g0",
        "generated",
        "key",
        "kv0",
        "out_target",
        "outcome",
        "phase",
        "prefill_target",
        "push_id",
        "req",
        "seq",
        "swapped",
    )

    def __init__(self, req: Request, outcome: RequestOutcome, seq: int) -> None:
        self.req = req
        self.outcome = outcome
        self.seq = seq
        true_out = req.true_output_tokens if req.true_output_tokens is not None else req.max_tokens
        self.out_target = max(1, min(true_out, req.max_tokens))
        self.phase = WAITING
        self.key: Any = None  # the policy's sort key (totally ordered, see qlm_rank_key)
        self.push_id = 0  # identifies its live waiting-heap entry; older entries are stale
        self.generated = 0  # tokens generated, valid outside DECODE
        self.prefill_target = req.prompt_tokens  # tokens to (re)compute before decoding
        self.computed = 0  # prefill progress
        self.blocks = 0  # KV blocks held, valid outside DECODE
        self.kv0 = 0  # DECODE: KV tokens at counter c0
        self.g0 = 0  # DECODE: generated tokens at counter c0
        self.c0 = 0
        self.admitted_at = 0.0
        self.swapped = False  # KV in host memory (evicted with swap)
        self.cancelled = False  # aborted: it leaves at the next step boundary and reports nothing more


@dataclass(slots=True)
class _Step:
    start: float
    dt: float
    k: int
    ctr_start: int
    decode: int
    prefill: list[tuple[_Run, int]]
    reserved_decode_blocks: int
    prefill_tokens: int


class SimInstance:
    """A simulated engine. Not thread-safe: driven by one :class:`SimFleet` loop."""

    def __init__(
        self,
        instance_id: str,
        gpu: str,
        cost_models: dict[str, CostModel],
        *,
        initial_model: str | None,
        warm_models: tuple[str, ...] = (),
        host_mem_gb: float = 256.0,
        preemption_mode: EvictMode = EvictMode.RECOMPUTE,
        max_model_residency_s: float = 300.0,
        min_model_residency_s: float = 5.0,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_macro_steps: int = _MAX_MACRO_STEPS,
        device: str = "",
    ) -> None:
        self.instance_id = instance_id
        self.device = device  # shared with other instances: one awake at a time (coordinator devices)
        self.gpu = gpu
        self.cost_models = cost_models
        self.host_mem_gb = host_mem_gb
        self.preemption_mode = preemption_mode
        self.max_model_residency_s = max_model_residency_s
        self.min_model_residency_s = min_model_residency_s
        self._max_num_seqs_override = max_num_seqs
        self._max_batched_override = max_num_batched_tokens
        self.max_macro_steps = max_macro_steps  # 1: one event per engine step (the reference for tests)
        # The host's slowness at a time (1: as the cost model says). A calibration replay sets it
        # from the steps a real engine measured, with ``max_macro_steps`` 1 so each step reads it.
        self.step_time_scale: Callable[[float], float] | None = None
        self.fleet: Driver | None = None
        # ordered (a heap's key), not necessarily hashable (the brain's Rank)
        self.rank_key: Callable[[Request, str, float], Any] = lambda r, i, n: (r.arrival_time, r.id)
        self.select_victim: Callable[[list[RunningView], str, float], RunningView] = lambda c, i, n: c[-1]
        self.on_finished: Callable[[RequestOutcome], None] = lambda o: None
        self.on_first_token: Callable[[RequestOutcome], None] = lambda o: None
        # request pulling: (instance id, free slots, now) -> the queue manager may dispatch
        self.on_room: Callable[[str, int, float], None] | None = None
        self.healthy = True
        # model state
        self.model: str | None = None
        self.model_since = 0.0
        self.last_finish_at = -math.inf  # when a request last finished here
        self.ordered_model: str | None = None  # the last model a queue manager ordered loaded here
        self.warm: OrderedDict[str, float] = OrderedDict()  # host-cached weights: model -> GB
        self.loading: tuple[str, float] | None = None  # (model, ready_at)
        self.switch_to: str | None = None  # drain, then load this model
        self.unload_pending: bool = False
        self.staging: dict[str, float] = {}  # model -> when its weights are in host memory
        for m in warm_models:
            self._cache_warm(m)
        if initial_model is not None:
            self._activate(initial_model, 0.0)
        # queues
        self.waiting: dict[str, list[tuple[Any, int, _Run]]] = {}
        self.promoted: deque[_Run] = deque()  # swap-ins the planner asked for: before the heap
        self.prefilling: list[_Run] = []
        self.decoding: dict[int, _Run] = {}  # seq -> run
        self.finish_heap: list[tuple[int, int, _Run]] = []
        self.phase_cnt = [0] * BLOCK_SIZE
        self.ctr = 0
        self.kv_used = 0
        self.num_waiting = 0
        self.num_swapped_waiting = 0
        self.num_waiting_urgent = 0
        # queued-token bookkeeping: waiting/prefilling exact; decoding lazily as A - n*ctr
        self._queued_static = 0
        self._decode_remaining_a = 0
        self.pending_evictions: list[tuple[int, EvictMode]] = []
        self.pending_aborts: list[_Run] = []  # running when aborted: they leave at the step boundary
        self.step: _Step | None = None
        self.busy_s = 0.0
        self.max_batch_seen = 0
        self.step_timings: deque[StepTiming] = deque(maxlen=64)
        self.counters = {
            "preemptions": 0,
            "swaps_out": 0,
            "swaps_in": 0,
            "wasted_tokens": 0,
            "model_loads_cold": 0,
            "model_loads_warm": 0,
            "steps": 0,
        }
        self._seq_by_id: dict[str, _Run] = {}
        self._next_seq = 0
        self._pushes = 0
        self._pending_transfer_s = 0.0
        self._last_load_warm = False
        self._keep_warm_on_unload = True
        self.next_event_t: float | None = None

    # ------------------------------------------------------------------ model state
    @property
    def cost(self) -> CostModel | None:
        return self.cost_models.get(self.model) if self.model is not None else None

    @property
    def max_num_seqs(self) -> int:
        c = self.cost
        return self._max_num_seqs_override or (c.max_num_seqs if c else 256)

    @property
    def max_batched(self) -> int:
        c = self.cost
        return self._max_batched_override or (c.max_num_batched_tokens if c else 8192)

    @property
    def kv_total(self) -> int:
        c = self.cost
        return c.kv_blocks if c else 0

    def _activate(self, model: str, now: float) -> None:
        self.model = model
        self.model_since = now
        self.warm.pop(model, None)

    def _cache_warm(self, model: str) -> bool:
        cost = self.cost_models.get(model)
        if cost is None:
            return False
        size = cost.model.weights_gb
        if size > self.host_mem_gb:
            return False
        self.warm.pop(model, None)
        while self.warm and sum(self.warm.values()) + size > self.host_mem_gb:
            self.warm.popitem(last=False)  # least recently used out
        self.warm[model] = size
        return True

    def _promote_staged(self, now: float) -> None:
        """Weights staged to host memory (warm model start) count as warm once their copy is done."""
        for model, ready in list(self.staging.items()):
            if ready <= now:
                del self.staging[model]
                self._cache_warm(model)

    def _now(self) -> float:
        return self.fleet.now if self.fleet is not None else 0.0

    def _start_load(self, model: str, now: float) -> LoadResult:
        cost = self.cost_models[model]
        self._promote_staged(now)
        warm = model in self.warm
        if self.model is not None:
            old = self.model
            self.model = None
            self._cache_warm(old)
        ready = now + cost.load_s(warm=warm)
        self.loading = (model, ready)
        self._last_load_warm = warm
        self.switch_to = None
        self.counters["model_loads_warm" if warm else "model_loads_cold"] += 1
        return LoadResult(self.instance_id, model, warm, ready)

    def load_model(self, model: str, target: str) -> LoadResult:
        now = self._now()
        if model not in self.cost_models:
            raise KeyError(f"instance {self.instance_id} has no cost model for {model!r}")
        cost = self.cost_models[model]
        if target == "host":
            ready = now + cost.model.weights_gb / cost.gpu.cold_load_gbps
            self.staging[model] = ready
            return LoadResult(self.instance_id, model, False, ready)
        if target != "gpu":
            raise ValueError(f"target must be 'gpu' or 'host', got {target!r}")
        if self.model == model and self.switch_to is None and not self.unload_pending:
            return LoadResult(self.instance_id, model, True, now)
        if self.loading is not None and self.loading[0] == model:
            return LoadResult(self.instance_id, model, self._last_load_warm, self.loading[1])
        self._promote_staged(now)
        warm = model in self.warm
        self.switch_to = self.ordered_model = model
        self.unload_pending = False
        self._kick()
        # Ready once the running requests drain; the estimate assumes they drain now.
        return LoadResult(self.instance_id, model, warm, now + cost.load_s(warm=warm))

    def unload_model(self, model: str, keep_warm: bool) -> bool:
        if self.model != model:
            return False
        self.unload_pending = True
        self.switch_to = None
        self._keep_warm_on_unload = keep_warm
        self._kick()
        return True

    # ------------------------------------------------------------------ queues
    def _push_waiting(self, run: _Run, now: float) -> None:
        run.phase = WAITING
        run.key = self.rank_key(run.req, self.instance_id, now)
        # A unique push id breaks ties, so heap comparisons never reach the run objects, and tells a
        # run's live entry from stale ones it left behind (promoted swap-ins, earlier pushes).
        self._pushes += 1
        run.push_id = self._pushes
        heapq.heappush(self.waiting.setdefault(run.req.model, []), (run.key, run.push_id, run))
        self.num_waiting += 1
        if run.swapped:
            self.num_swapped_waiting += 1
        elif run.req.slo.ttft_deadline is not None:
            self.num_waiting_urgent += 1

    def _head(self, model: str) -> _Run | None:
        while self.promoted:
            run = self.promoted[0]
            if run.phase == WAITING and run.req.model == model:
                return run
            if run.phase != WAITING:
                self.promoted.popleft()
                continue
            break
        heap = self.waiting.get(model)
        while heap:
            run = heap[0][2]
            if run.phase == WAITING and heap[0][1] == run.push_id:
                return run
            heapq.heappop(heap)  # stale entry (admitted via promotion, cancelled or re-keyed)
        return None

    def _pop_head(self, run: _Run) -> None:
        if self.promoted and self.promoted[0] is run:
            self.promoted.popleft()
        else:
            heap = self.waiting[run.req.model]
            if heap and heap[0][2] is run:
                heapq.heappop(heap)
        self._uncount_waiting(run)

    def _uncount_waiting(self, run: _Run) -> None:
        self.num_waiting -= 1
        if run.swapped:
            self.num_swapped_waiting -= 1
        elif run.req.slo.ttft_deadline is not None:
            self.num_waiting_urgent -= 1

    def dispatch(self, req: Request, outcome: RequestOutcome) -> bool:
        if not self.healthy or req.model not in self.cost_models:
            return False
        now = self._now()
        self._next_seq += 1
        run = _Run(req, outcome, self._next_seq)
        self._seq_by_id[req.id] = run
        outcome.instance_id = self.instance_id
        self._queued_static += run.prefill_target + req.max_tokens
        self._push_waiting(run, now)
        if self.model is None and self.loading is None and self.switch_to is None and not self._running():
            self.switch_to = req.model
        self._kick(admission=req.model == self.model)
        return True

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is (client gone, or re-served elsewhere); False if unknown
        or done. A waiting one leaves now; a running one at the next step boundary, as an eviction
        does (a step in flight computes it either way). It never finishes and reports nothing more:
        the outcome is marked cancelled and no callback is called for it."""
        run = self._seq_by_id.pop(request_id, None)
        if run is None:
            return False
        run.cancelled = True
        run.outcome.status = Status.CANCELLED
        if run.phase == WAITING:
            self._uncount_waiting(run)  # its heap or promotion entry goes stale
            self._release(run)
        elif self.step is None:
            self._drop_running(run)  # between steps: nothing is computing it
        else:
            self.pending_aborts.append(run)
        # Its seat, KV or place in the queue may let another request in (or a model swap fall due).
        self._kick(admission=True)
        return True

    def _drop_running(self, run: _Run) -> None:
        if run.phase == DECODE:
            self._leave_decode(run)  # its finish-heap entry goes stale
        elif run.phase == PREFILL:
            self.prefilling.remove(run)
        else:
            return  # it ended with the step that was in flight (see _finish)
        self._release(run)

    def _release(self, run: _Run) -> None:
        """A cancelled run leaves (outside DECODE): its KV and queued tokens are given back."""
        run.phase = DONE
        self.kv_used -= run.blocks
        run.blocks = 0
        self._queued_static -= run.prefill_target - run.computed + run.req.max_tokens - run.generated

    def generated_tokens(self, request_id: str) -> int | None:
        """Tokens generated so far at the driver's current time (None: unknown, done or aborted).
        During a macro step it counts the steps ended by now, as :meth:`queued_tokens` does."""
        run = self._seq_by_id.get(request_id)
        if run is None:
            return None
        if run.phase != DECODE:
            return run.generated
        return min(run.out_target, run.g0 + self._ctr_at(self._now()) - run.c0)

    def _running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def _steps_done(self, now: float) -> int:
        """Steps of the in-flight macro step that have ended before ``now`` (an observer between
        events sees the decode progress a step-by-step engine would show)."""
        st = self.step
        if st is None or st.k <= 1 or now <= st.start or st.dt <= 0:
            return 0
        return min(st.k, max(0, math.ceil((now - st.start) / st.dt) - 1))

    def _ctr_at(self, now: float) -> int:
        st = self.step
        return self.ctr if st is None or st.k <= 1 else st.ctr_start + self._steps_done(now)

    def queued_tokens(self, now: float | None = None) -> int:
        ctr = self.ctr if now is None else self._ctr_at(now)
        return self._queued_static + self._decode_remaining_a - len(self.decoding) * ctr

    # ------------------------------------------------------------------ decode bookkeeping
    def _enter_decode(self, run: _Run, kv: int, c0: int) -> None:
        run.phase = DECODE
        run.kv0, run.g0, run.c0 = kv, run.generated, c0
        self.decoding[run.seq] = run
        self.phase_cnt[(kv - c0) % BLOCK_SIZE] += 1
        heapq.heappush(self.finish_heap, (c0 + run.out_target - run.generated, run.seq, run))
        remaining = run.req.max_tokens - run.generated
        self._queued_static -= remaining
        self._decode_remaining_a += remaining + c0

    def _leave_decode(self, run: _Run) -> tuple[int, int]:
        """Materialise a decoding run's counters; return (kv tokens, generated)."""
        del self.decoding[run.seq]
        self.phase_cnt[(run.kv0 - run.c0) % BLOCK_SIZE] -= 1
        progressed = self.ctr - run.c0
        kv, gen = run.kv0 + progressed, run.g0 + progressed
        run.generated = gen
        run.blocks = -(-kv // BLOCK_SIZE)
        remaining_then = run.req.max_tokens - run.g0
        self._decode_remaining_a -= remaining_then + run.c0
        self._queued_static += run.req.max_tokens - gen
        return kv, gen

    def _new_decode_blocks(self, k: int, ctr: int) -> int:
        """KV blocks the decoding runs need over k steps starting at counter ctr."""
        total = 0
        for r, n in enumerate(self.phase_cnt):
            if n:
                d = (-(r + ctr)) % BLOCK_SIZE
                if d < k:
                    total += n * ((k - 1 - d) // BLOCK_SIZE + 1)
        return total

    def _max_steps_fitting(self, free: int, kmax: int) -> int:
        if self._new_decode_blocks(kmax, self.ctr) <= free:
            return kmax
        lo, hi = 0, kmax  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._new_decode_blocks(mid, self.ctr) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    # ------------------------------------------------------------------ preemption
    def _views(self, now: float) -> list[RunningView]:
        views = []
        for run in list(self.decoding.values()) + self.prefilling:
            if run.phase == DECODE:
                prog = self.ctr - run.c0
                gen, kv = run.g0 + prog, run.kv0 + prog
            else:
                gen, kv = run.generated, run.computed
            views.append(RunningView(run.req, gen, kv, run.admitted_at))
        return views

    def _preempt(self, run: _Run, mode: EvictMode, now: float) -> EvictResult:
        was_decode = run.phase == DECODE
        if was_decode:
            kv, gen = self._leave_decode(run)
        else:
            self.prefilling.remove(run)
            kv, gen = run.computed, run.generated
        self.kv_used -= run.blocks
        run.blocks = 0
        out = run.outcome
        out.preemptions += 1
        self.counters["preemptions"] += 1
        cost = self.cost
        if mode is EvictMode.SWAP and was_decode and cost is not None:
            # KV copied to host memory (charged to the next step); resumes decoding where it was.
            transfer = cost.kv_transfer_s(kv)
            self._pending_transfer_s += transfer
            run.swapped = True
            run.kv0 = kv
            self.counters["swaps_out"] += 1
            result = EvictResult(run.req.id, EvictMode.SWAP, 0, transfer)
        else:
            # KV dropped: re-prefill the prompt and every token generated so far.
            new_target = run.req.prompt_tokens + gen
            self._queued_static += new_target - (run.prefill_target - run.computed)
            run.prefill_target, run.computed = new_target, 0
            out.wasted_tokens += kv
            self.counters["wasted_tokens"] += kv
            result = EvictResult(run.req.id, EvictMode.RECOMPUTE, kv)
        self._push_waiting(run, now)
        return result

    def evict(self, request_id: str, mode: EvictMode) -> EvictResult:
        run = self._seq_by_id.get(request_id)
        if run is None or run.phase not in (PREFILL, DECODE):
            raise KeyError(f"request {request_id!r} is not running on {self.instance_id}")
        self.pending_evictions.append((run.seq, mode))
        self._kick(admission=True)
        cost = self.cost
        kv = run.kv0 + self._ctr_at(self._now()) - run.c0 if run.phase == DECODE else run.computed
        if mode is EvictMode.SWAP and run.phase == DECODE and cost is not None:
            return EvictResult(request_id, mode, 0, cost.kv_transfer_s(kv))
        return EvictResult(request_id, EvictMode.RECOMPUTE, kv)

    def swap_in(self, request_id: str) -> bool:
        run = self._seq_by_id.get(request_id)
        if run is None or run.phase != WAITING or not run.swapped:
            return False
        self.promoted.append(run)
        self._kick(admission=True)
        return True

    # ------------------------------------------------------------------ the step loop
    def _kick(self, admission: bool = True) -> None:
        """Something changed: wake up if idle, or cut a long macro step at the next step boundary."""
        if self.fleet is None:
            return
        now = self.fleet.now
        st = self.step
        if st is None:
            if self.next_event_t is None or self.next_event_t > now:
                self.fleet.schedule(self, now)
            return
        if st.k > 1 and admission:
            j = max(1, math.ceil((now - st.start) / st.dt - 1e-9)) if st.dt > 0 else 1
            if j < st.k:
                kept = self._new_decode_blocks(j, st.ctr_start)
                self.kv_used -= st.reserved_decode_blocks - kept
                st.reserved_decode_blocks = kept
                st.k = j
                self.fleet.schedule(self, st.start + j * st.dt)

    def on_event(self, now: float) -> None:
        """The fleet calls this at the end of the current step (or at a wake-up when idle)."""
        self.next_event_t = None
        st = self.step
        if st is not None:
            self._finish_step(st, now)
            self.step = None
        for cancelled in self.pending_aborts:
            self._drop_running(cancelled)
        self.pending_aborts.clear()
        if self.loading is not None:
            model, ready = self.loading
            if now + 1e-12 < ready:
                self.fleet.schedule(self, ready)  # type: ignore[union-attr]
                return
            self.loading = None
            self._activate(model, now)
        for seq, mode in self.pending_evictions:
            run = next(
                (r for r in (self.decoding.get(seq), *self.prefilling) if r is not None and r.seq == seq),
                None,
            )
            if run is not None:
                self._preempt(run, mode, now)
        self.pending_evictions.clear()
        self._manage_models(now)
        if self.on_room is not None:
            slots = self.free_slots()
            if slots > 0:
                self.on_room(self.instance_id, slots, now)
        self._schedule_step(now)
        if self.step is None and self.next_event_t is None and self.loading is None:
            due = self._swap_due_at()
            if due is not None and due > now:
                self.fleet.schedule(self, due)  # type: ignore[union-attr]  # idle: wake when its swap is due

    #: KV blocks a pulled request is assumed to need (about 1.5k tokens) when counting free slots.
    PULL_BLOCKS_PER_REQUEST = (
        96  # as the queue manager assumes (qlm_plugin.brain.fleet_view.KV_BLOCKS_PER_REQUEST)
    )

    def free_slots(self) -> int:
        """How many more requests this engine could start now: free seats, bounded by free KV, and
        none while its own waiting queue still holds work for the served model (pull late)."""
        if (
            self.model is None
            or self.loading is not None
            or self.switch_to is not None
            or self.unload_pending
        ):
            return 0
        if self._head(self.model) is not None:
            return 0
        seats = self.max_num_seqs - self._running()
        kv = (self.kv_total - self.kv_used) // self.PULL_BLOCKS_PER_REQUEST
        return max(0, min(seats, kv))

    def _finish_step(self, st: _Step, now: float) -> None:
        self.ctr = st.ctr_start + st.k
        elapsed = st.k * st.dt
        self.busy_s += elapsed
        self.counters["steps"] += st.k
        batch = st.decode + len(st.prefill)
        self.max_batch_seen = max(self.max_batch_seen, batch)
        self.step_timings.append(StepTiming(st.start, st.dt, st.prefill_tokens, st.decode, batch))
        for run, chunk in st.prefill:
            if run.phase != PREFILL:
                continue
            run.computed += chunk
            self._queued_static -= chunk
            if run.computed >= run.prefill_target:
                self.prefilling.remove(run)
                out = run.outcome
                if run.generated == 0:
                    run.generated = 1
                    self._queued_static -= 1
                    if not run.cancelled:  # the outcome may already serve a re-dispatch elsewhere
                        out.first_token_time = now
                        self.on_first_token(out)
                kv = run.computed
                if run.generated >= run.out_target:
                    self._finish(run, now, blocks=run.blocks)
                else:
                    self._enter_decode(run, kv, self.ctr)
        fh = self.finish_heap
        while fh and fh[0][0] <= self.ctr:
            due, seq, run = heapq.heappop(fh)
            # stale entries: the run was preempted (and maybe re-entered decode with a new due step)
            if self.decoding.get(seq) is not run or run.c0 + run.out_target - run.g0 != due:
                continue
            self._leave_decode(run)
            self._finish(run, now, blocks=run.blocks)

    def _finish(self, run: _Run, now: float, blocks: int) -> None:
        if run.cancelled:  # aborted while its last step was in flight: it does not finish
            self._release(run)
            return
        run.phase = DONE
        self.kv_used -= blocks
        run.blocks = 0
        out = run.outcome
        out.status = Status.FINISHED
        out.finish_time = now
        self.last_finish_at = now
        out.output_tokens = run.out_target
        self._queued_static -= run.req.max_tokens - run.generated if run.generated < run.req.max_tokens else 0
        self._seq_by_id.pop(run.req.id, None)
        self.on_finished(out)

    def _swap_due_at(self) -> float | None:
        """When this engine will swap to another waiting model on its own (None: no model waits).

        It serves its queue in the policy's order across models: once the most urgent waiting
        request is another model's (head-of-line), it drains and swaps, after holding the GPU at
        least ``min_model_residency_s``; and whatever the order, after ``max_model_residency_s``
        while others wait. A queue manager that plans swaps (QLM) hands an engine only requests
        for its current model, so this engine-local rule is what the baselines get."""
        cur = self.model
        heads = {m: h for m in self.waiting if m != cur and (h := self._head(m)) is not None}
        if not heads:
            return None
        cur_head = self._head(cur) if cur is not None else None
        if cur is not None and cur == self.ordered_model:
            # A queue manager ordered this model here: it hands this engine that model's work (the
            # others' left here are requests it preempted itself, or handed over before it ordered
            # the swap), so swapping back at once would undo the order; it swaps on its own once
            # the model has held the GPU for long, or once none of its work has been here for a
            # while (the others' requests waited the whole residency, minutes, on an engine with
            # nothing else to do).
            if cur_head is None and not self._running():  # idle since its last request ended
                since = max(self.model_since, self.last_finish_at)
                return min(since + ORDERED_IDLE_HOLD_S, self.model_since + self.max_model_residency_s)
            return self.model_since + self.max_model_residency_s
        if cur_head is None:
            return self.model_since  # nothing left of the current model: now
        best_other = min(h.key for h in heads.values())
        wait = self.min_model_residency_s if best_other < cur_head.key else self.max_model_residency_s
        return self.model_since + wait

    def _manage_models(self, now: float) -> None:
        """Carry out unloads and swaps: ordered ones (load_model), and the engine's own (see
        :meth:`_swap_due_at`)."""
        if self.loading is not None:
            return
        running = self._running()
        if self.unload_pending:
            if running:
                return
            self.unload_pending = False
            old = self.model
            self.model = None
            if old is not None and self._keep_warm_on_unload:
                self._cache_warm(old)
            return
        if self.switch_to is not None:
            if running == 0:
                self._start_load(self.switch_to, now)
                self.fleet.schedule(self, self.loading[1])  # type: ignore[union-attr,index]
            return
        due = self._swap_due_at()
        if due is None or now + 1e-12 < due:
            return
        cur = self.model
        heads = {m: h for m in self.waiting if m != cur and (h := self._head(m)) is not None}
        best = min(heads, key=lambda m: heads[m].key)
        self.switch_to = best
        self.ordered_model = None  # its own swap: the rule holds again
        if running == 0:
            self._start_load(best, now)
            self.fleet.schedule(self, self.loading[1])  # type: ignore[union-attr,index]

    def _schedule_step(self, now: float) -> None:
        if self.loading is not None or self.model is None:
            return
        cost = self.cost
        assert cost is not None
        free = cost.kv_blocks - self.kv_used
        # 1. decodes: make room for this step's new blocks, preempting by policy when short
        preempted = False
        need = self.phase_cnt[(-self.ctr) % BLOCK_SIZE]
        while need > free and self._running():
            views = self._views(now)
            victim_view = self.select_victim(views, self.instance_id, now)
            victim = self._seq_by_id[victim_view.request.id]
            self._preempt(victim, self.preemption_mode, now)
            preempted = True
            free = cost.kv_blocks - self.kv_used
            need = self.phase_cnt[(-self.ctr) % BLOCK_SIZE]
        n_dec = len(self.decoding)
        budget = self.max_batched - n_dec
        prefill: list[tuple[_Run, int]] = []
        prefill_tokens = 0
        # 2. partial prefills, admission order
        for run in self.prefilling:
            if budget <= 0:
                break
            chunk = min(run.prefill_target - run.computed, budget)
            extra = -(-(run.computed + chunk) // BLOCK_SIZE) - run.blocks
            if extra > free - need:
                chunk = min(chunk, (free - need) * BLOCK_SIZE + run.blocks * BLOCK_SIZE - run.computed)
                extra = -(-(run.computed + chunk) // BLOCK_SIZE) - run.blocks
            if chunk <= 0:
                continue
            run.blocks += extra
            self.kv_used += extra
            free -= extra
            budget -= chunk
            prefill.append((run, chunk))
            prefill_tokens += chunk
        # 3. admissions in policy order (none after a preemption in this step, as vLLM does)
        transfer = self._pending_transfer_s
        self._pending_transfer_s = 0.0
        admit_possible = False
        model = self.model
        if not preempted and self.switch_to is None and not self.unload_pending:
            while self._running() < self.max_num_seqs and budget > 0:
                head = self._head(model)
                if head is None:
                    break
                if head.swapped:
                    kv = head.kv0
                    blocks = -(-kv // BLOCK_SIZE)
                    if blocks + 1 > free - need:  # +1: it decodes in this very step
                        break
                    self._pop_head(head)
                    head.swapped = False
                    head.blocks = blocks
                    self.kv_used += blocks
                    free -= blocks
                    transfer += cost.kv_transfer_s(kv)
                    self.counters["swaps_in"] += 1
                    head.admitted_at = now
                    self._enter_decode(head, kv, self.ctr)
                    continue
                chunk = min(head.prefill_target, budget)
                blocks = -(-chunk // BLOCK_SIZE)
                if blocks > free - need:
                    break
                self._pop_head(head)
                head.phase = PREFILL
                head.admitted_at = now
                if head.outcome.start_time is None:
                    head.outcome.start_time = now
                head.computed = 0
                head.blocks = blocks
                self.kv_used += blocks
                free -= blocks
                budget -= chunk
                self.prefilling.append(head)
                prefill.append((head, chunk))
                prefill_tokens += chunk
            # Could the next step admit? (Its token budget is what the decodes leave.)
            head = self._head(model) if model is not None else None
            next_budget = self.max_batched - len(self.decoding)
            admit_possible = (
                head is not None
                and self._running() < self.max_num_seqs
                and next_budget > 0
                and -(-min(head.prefill_target, next_budget) // BLOCK_SIZE) <= free - need
            )
        elif preempted:
            admit_possible = True  # admission was skipped this step: vLLM tries again at the next one
        n_dec = len(self.decoding)
        if n_dec == 0 and not prefill and transfer == 0.0:
            return  # idle until a dispatch or command wakes the instance
        dt = cost.step_s(prefill_tokens, n_dec)
        if self.step_time_scale is not None:
            dt *= self.step_time_scale(now)
        dt += transfer
        k = 1
        if not prefill and transfer == 0.0 and not admit_possible and not self.pending_evictions:
            k_finish = self.finish_heap[0][0] - self.ctr if self.finish_heap else self.max_macro_steps
            k = max(1, min(k_finish, self.max_macro_steps))
            k = max(1, self._max_steps_fitting(free, k))
            if self.switch_to is None and not self.unload_pending:
                # wake up when a swap falls due (head-of-line or residency)
                due = self._swap_due_at()
                if due is not None:
                    left = due - now
                    k = max(1, min(k, math.ceil(left / dt) if left > 0 else 1))
        reserved = self._new_decode_blocks(k, self.ctr)
        self.kv_used += reserved
        self.step = _Step(now, dt, k, self.ctr, n_dec, prefill, reserved, prefill_tokens)
        self.fleet.schedule(self, now + k * dt)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ state
    def _kv_used_at(self, now: float) -> int:
        st = self.step
        if st is None or st.k <= 1:
            return self.kv_used
        # blocks reserved for the macro step's later steps are not in use yet
        return (
            self.kv_used
            - st.reserved_decode_blocks
            + self._new_decode_blocks(self._steps_done(now), st.ctr_start)
        )

    def state(self, now: float, detail: bool) -> InstanceState:
        self._promote_staged(now)
        notes: tuple[str, ...] = ()
        running_ids: tuple[str, ...] = ()
        waiting_ids: tuple[str, ...] = ()
        swapped_ids: tuple[str, ...] = ()
        if detail:
            running_ids = tuple(r.req.id for r in (*self.decoding.values(), *self.prefilling))
            live = [
                e[2]
                for heap in self.waiting.values()
                for e in heap
                if e[2].phase == WAITING and e[1] == e[2].push_id
            ]
            live.sort(key=lambda r: r.seq)
            waiting_ids = tuple(r.req.id for r in live if not r.swapped)
            swapped_ids = tuple(r.req.id for r in live if r.swapped)
        return InstanceState(
            instance_id=self.instance_id,
            backend="sim",
            now=now,
            models_loaded=(self.model,) if self.model is not None else (),
            models_servable=tuple(self.cost_models),
            device=self.device,
            models_warm=tuple(self.warm),
            loading_model=self.loading[0] if self.loading else self.switch_to,
            num_running=self._running(),
            num_waiting=self.num_waiting - self.num_swapped_waiting,
            num_swapped=self.num_swapped_waiting,
            num_waiting_urgent=self.num_waiting_urgent,
            max_num_batched_tokens=self.max_batched,
            prefill_tokens_pending=sum(r.prefill_target - r.computed for r in self.prefilling),
            queued_tokens=self.queued_tokens(now),
            kv_blocks_used=self._kv_used_at(now),
            kv_blocks_total=self.kv_total,
            max_num_seqs=self.max_num_seqs,
            healthy=self.healthy,
            capabilities=frozenset({"evict", "swap", "load_model", "unload_model", "warm_start"}),
            step_timings=tuple(self.step_timings) if detail else (),
            running_ids=running_ids,
            waiting_ids=waiting_ids,
            swapped_ids=swapped_ids,
            notes=notes,
        )
