"""Instances as adapters report them: static facts, state snapshots, step timings, and what serving
operations return."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

from qlm_plugin.domain.request import Request


class EvictMode(str, enum.Enum):
    """How a running request leaves the GPU: its KV cache kept in host memory, or dropped and recomputed."""

    SWAP = "swap"
    RECOMPUTE = "recompute"


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One engine step, as the engine measured it (for online calibration of the cost model)."""

    start: float
    duration_s: float
    prefill_tokens: int
    decode_tokens: int
    batch_size: int


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """The static facts of an instance, as listed by its adapter."""

    instance_id: str
    backend: str
    gpu: str
    capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class InstanceState:
    """A snapshot of one serving instance.

    Counts are always filled; the id tuples only when the caller asked for ``detail`` (they cost a copy
    of the queues).
    """

    instance_id: str
    backend: str
    now: float
    models_loaded: tuple[str, ...]
    models_warm: tuple[str, ...]
    loading_model: str | None
    num_running: int
    num_waiting: int
    num_swapped: int
    queued_tokens: int  # prompt tokens still to prefill plus max output tokens still to decode, all queues
    kv_blocks_used: int
    kv_blocks_total: int
    max_num_seqs: int
    healthy: bool = True
    capabilities: frozenset[str] = frozenset()
    step_timings: tuple[StepTiming, ...] = ()
    running_ids: tuple[str, ...] = ()
    waiting_ids: tuple[str, ...] = ()
    swapped_ids: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the backend cannot do here, e.g. "no sleep mode on CPU"
    num_waiting_urgent: int = 0  # of num_waiting, those with a TTFT SLO (a queue manager binds early by it)
    #: The engine's token budget per step (vLLM's max_num_batched_tokens); 0: not known.
    max_num_batched_tokens: int = 0
    #: Prompt tokens of running requests not computed yet (chunked prefill still to do).
    prefill_tokens_pending: int = 0
    #: Every model the instance can serve (loaded, warm, or loaded on an order); empty: any.
    models_servable: tuple[str, ...] = ()
    #: The device whose memory it shares with other instances (one awake at a time); "": its own.
    device: str = ""
    #: A model swap as measured here (sleep one engine, wake another), seconds; 0: not measured
    #: (the cost model's load time holds).
    swap_s: float = 0.0

    def can_serve(self, model: str) -> bool:
        return not self.models_servable or model in self.models_servable

    def with_counts(
        self, num_running: int, kv_blocks_used: int, prefill_tokens_pending: int
    ) -> InstanceState:
        """A copy with these counts (``dataclasses.replace`` re-runs the frozen ``__init__``, 2x the
        cost; a queue manager adjusts the counts at every dispatch and completion)."""
        new: InstanceState = object.__new__(InstanceState)
        put = object.__setattr__
        for name in _STATE_FIELDS:
            put(new, name, getattr(self, name))
        put(new, "num_running", num_running)
        put(new, "kv_blocks_used", kv_blocks_used)
        put(new, "prefill_tokens_pending", prefill_tokens_pending)
        return new

    @property
    def prefill_room(self) -> int | None:
        """Prompt tokens the engine's next step can start beside the work it already runs (its
        decodes and pending prefill); None where the engine does not report its step budget.
        Handing an engine more than this only queues it there, out of a global queue's reach."""
        if self.max_num_batched_tokens <= 0:
            return None
        return max(0, self.max_num_batched_tokens - self.num_running - self.prefill_tokens_pending)

    @property
    def kv_free_fraction(self) -> float:
        return 1.0 - self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


_STATE_FIELDS = tuple(f.name for f in fields(InstanceState))


@dataclass(frozen=True, slots=True)
class RunningView:
    """A running request as victim selection sees it. Times are the engine's (the ``now`` its
    ``qlm_select_victim`` is given), not necessarily the coordinator's."""

    request: Request
    generated_tokens: int
    kv_tokens: int  # tokens whose KV it holds
    admitted_at: float  # when it was (last) admitted to run; in vLLM, when the engine first saw it running


@dataclass(frozen=True, slots=True)
class EvictResult:
    request_id: str
    mode: EvictMode
    wasted_tokens: int  # tokens whose KV is thrown away and must be recomputed (0 for a swap)
    transfer_s: float = 0.0  # host copy time for a swap


@dataclass(frozen=True, slots=True)
class LoadResult:
    instance_id: str
    model: str
    warm: bool  # loaded from host memory (sleep-mode wake) rather than from disk
    ready_at: float  # when the model serves, on the backend's clock
