"""EchoInstance: a toy continuous-batching engine on a discrete clock.

Each step (``STEP_S`` seconds) every running request produces one token until ``max_tokens`` (a toy:
it would echo its prompt, so only token counts are modelled). One model is on the GPU at a time; the
others may be warm in host memory. The engine knows nothing of pluggy: it calls back through
``hook`` (the plugin manager's hook relay) for the policy's ranking and victim choice and to report
finished requests.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

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

STEP_S = 0.01
BLOCK = 16  # tokens per KV block
WARM_LOAD_S, COLD_LOAD_S = 0.5, 2.0  # weights from host memory, from disk
HOST_SLOTS = 2  # models whose weights fit in host memory at once
MODELS = ("echo-small", "echo-large")
CAPABILITIES = frozenset({"evict", "swap", "load_model", "warm_start"})
_order = itertools.count()


@dataclass(eq=False, slots=True)
class _Seq:
    request: Request
    outcome: RequestOutcome
    generated: int = 0
    key: Any = None  # the policy's rank key (qlm_rank_key), taken when it enters the waiting queue
    order: int = field(default_factory=lambda: next(_order))  # ties between equal keys
    admitted_at: float = 0.0

    @property
    def kv_tokens(self) -> int:  # while running or swapped: prompt plus everything generated
        return self.request.prompt_tokens + self.generated


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


class EchoInstance:
    def __init__(self, instance_id: str, models: tuple[str, ...] = MODELS, max_num_seqs: int = 4) -> None:
        self.instance_id = instance_id
        self.models = models
        self.max_num_seqs = max_num_seqs
        self.kv_blocks = 256
        self.hook: Any = None  # pm.hook once attached; None: FIFO, no callbacks
        self.loaded: str | None = models[0]
        self.warm: OrderedDict[str, None] = OrderedDict()  # LRU of models in host memory
        self.staging: dict[str, float] = {}  # model -> when its weights reach host memory
        self.loading: tuple[str, float, bool] | None = None  # model, ready at, warm
        self.pending: tuple[str | None, bool] | None = None  # after the drain: next model, keep warm
        self.running: dict[str, _Seq] = {}
        self.waiting: dict[str, _Seq] = {}
        self.swapped: dict[str, _Seq] = {}  # KV in host memory; resumed before new admissions
        self.timings: deque[StepTiming] = deque(maxlen=64)

    # ------------------------------------------------------------------ requests
    def dispatch(self, request: Request, now: float) -> bool:
        known = request.id in self.running or request.id in self.waiting or request.id in self.swapped
        if known or request.model not in self.models:
            return False
        self._enqueue(_Seq(request, RequestOutcome(request, instance_id=self.instance_id)), now)
        return True

    def _enqueue(self, seq: _Seq, now: float) -> None:
        r = seq.request
        seq.key = (
            (r.arrival_time, r.id)
            if self.hook is None
            else self.hook.qlm_rank_key(request=r, instance_id=self.instance_id, now=now)
        )
        self.waiting[r.id] = seq

    def evict(self, request_id: str, mode: EvictMode, now: float) -> EvictResult:
        seq = self.running.pop(request_id, None)
        if seq is None:  # the contract: KeyError when it is not running here
            raise KeyError(f"request {request_id!r} is not running on {self.instance_id}")
        seq.outcome.preemptions += 1
        if mode is EvictMode.SWAP:
            self.swapped[request_id] = seq
            return EvictResult(request_id, EvictMode.SWAP, 0)
        wasted = seq.kv_tokens  # dropped; re-prefilled (prompt plus output so far) on readmission
        seq.outcome.wasted_tokens += wasted
        self._enqueue(seq, now)
        return EvictResult(request_id, EvictMode.RECOMPUTE, wasted)

    def swap_in(self, request_id: str) -> bool:
        seq = self.swapped.pop(request_id, None)
        if seq is None:
            return False
        self.swapped = {request_id: seq, **self.swapped}  # first in line for the next free seat
        return True

    # ------------------------------------------------------------------ models
    def load_model(self, model: str, target: str, now: float) -> LoadResult:
        if model not in self.models:
            raise KeyError(f"{self.instance_id} cannot serve {model!r}")
        if target == "host":
            ready = now if model in self.warm else self.staging.setdefault(model, now + COLD_LOAD_S)
            return LoadResult(self.instance_id, model, False, ready)
        if target != "gpu":
            raise ValueError(f"target must be 'gpu' or 'host', got {target!r}")
        if self.loaded == model and self.pending is None:
            return LoadResult(self.instance_id, model, True, now)
        if self.loading is not None and self.loading[0] == model:
            return LoadResult(self.instance_id, model, self.loading[2], self.loading[1])
        warm = model in self.warm
        self.pending = (model, True)  # the running requests finish first
        return LoadResult(self.instance_id, model, warm, now + (WARM_LOAD_S if warm else COLD_LOAD_S))

    def unload_model(self, model: str, keep_warm: bool) -> bool:
        if self.loaded != model:
            return False
        self.pending = (None, keep_warm)
        return True

    def _keep_warm(self, model: str) -> None:
        self.warm[model] = None
        self.warm.move_to_end(model)
        while len(self.warm) > HOST_SLOTS:
            self.warm.popitem(last=False)

    def _models(self, now: float) -> None:
        queued = [s.request.model for s in (*self.waiting.values(), *self.swapped.values())]
        if self.pending is None and self.loading is None and queued and self.loaded not in queued:
            # Routing may send a model that is not loaded (qlm_choose_instance): swap to it once
            # the served model has no work left here.
            self.pending = (queued[0], True)
        for model, ready in list(self.staging.items()):
            if ready <= now:
                del self.staging[model]
                self._keep_warm(model)
        if self.loading is not None and self.loading[1] <= now:
            self.loaded = self.loading[0]
            self.warm.pop(self.loaded, None)
            self.loading = None
        if self.pending is not None and not self.running:
            nxt, keep_warm = self.pending
            if self.loaded is not None and keep_warm:
                self._keep_warm(self.loaded)
            self.loaded, self.pending = None, None
            if nxt is not None:
                warm = nxt in self.warm
                self.loading = (nxt, now + (WARM_LOAD_S if warm else COLD_LOAD_S), warm)

    # ------------------------------------------------------------------ the step
    def free_slots(self) -> int:
        if self.loaded is None or self.pending is not None:
            return 0
        return max(0, self.max_num_seqs - len(self.running) - len(self.waiting) - len(self.swapped))

    def _used_blocks(self) -> int:
        return sum(_blocks(s.kv_tokens) for s in self.running.values())

    def step(self, start: float) -> None:
        """One engine step from ``start`` to ``start + STEP_S``: admit, then one token each."""
        end = start + STEP_S
        self._models(start)
        prefill = 0
        if self.loaded is not None and self.pending is None:
            ready = [s for s in self.waiting.values() if s.request.model == self.loaded]
            ready.sort(key=lambda s: (s.key, s.order))
            swapped = [s for s in self.swapped.values() if s.request.model == self.loaded]
            for seq in swapped + ready:
                fits = self._used_blocks() + _blocks(seq.kv_tokens + 1) <= self.kv_blocks
                if len(self.running) >= self.max_num_seqs or not fits:
                    break
                if self.swapped.pop(seq.request.id, None) is None:
                    del self.waiting[seq.request.id]
                    prefill += seq.kv_tokens
                seq.admitted_at = start
                self.running[seq.request.id] = seq
        # Out of KV for this step's tokens: the policy picks whom to preempt (recompute).
        while (
            len(self.running) > 1
            and sum(_blocks(s.kv_tokens + 1) for s in self.running.values()) > self.kv_blocks
        ):
            views = [
                RunningView(s.request, s.generated, s.kv_tokens, s.admitted_at) for s in self.running.values()
            ]
            victim = (
                views[-1]
                if self.hook is None
                else self.hook.qlm_select_victim(candidates=views, instance_id=self.instance_id, now=start)
            )
            self.evict(victim.request.id, EvictMode.RECOMPUTE, start)
        done: list[_Seq] = []
        for seq in self.running.values():
            seq.generated += 1
            if seq.outcome.first_token_time is None:
                seq.outcome.first_token_time = end
            if seq.generated >= seq.request.max_tokens:
                done.append(seq)
        if self.running:
            n = len(self.running)
            self.timings.append(StepTiming(start, STEP_S, prefill, n, n))
        for seq in done:
            del self.running[seq.request.id]
            out = seq.outcome
            out.status, out.finish_time, out.output_tokens = Status.FINISHED, end, seq.generated
            if self.hook is not None:
                self.hook.qlm_request_finished(outcome=out, now=end)
        if done and self.hook is not None and self.free_slots():
            # Request pulling: a queue manager hands over more work (it may dispatch right here).
            self.hook.qlm_instance_ready(instance_id=self.instance_id, free_slots=self.free_slots(), now=end)

    def state(self, now: float, detail: bool) -> InstanceState:
        seqs = [*self.running.values(), *self.waiting.values(), *self.swapped.values()]
        return InstanceState(
            instance_id=self.instance_id,
            backend="echo",
            now=now,
            models_loaded=() if self.loaded is None else (self.loaded,),
            models_warm=tuple(self.warm),
            loading_model=self.loading[0] if self.loading else self.pending[0] if self.pending else None,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_swapped=len(self.swapped),
            num_waiting_urgent=sum(s.request.slo.ttft_deadline is not None for s in self.waiting.values()),
            queued_tokens=sum(s.request.max_tokens - s.generated for s in seqs)
            + sum(s.kv_tokens for s in self.waiting.values()),
            kv_blocks_used=self._used_blocks(),
            kv_blocks_total=self.kv_blocks,
            max_num_seqs=self.max_num_seqs,
            capabilities=CAPABILITIES,
            step_timings=tuple(self.timings) if detail else (),
            running_ids=tuple(self.running) if detail else (),
            waiting_ids=tuple(self.waiting) if detail else (),
            swapped_ids=tuple(self.swapped) if detail else (),
        )
