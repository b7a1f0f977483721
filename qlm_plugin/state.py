"""What a backend reports about an instance, and what the core learns about finished requests."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qlm_plugin.request import Request


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

    @property
    def kv_free_fraction(self) -> float:
        return 1.0 - self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True, slots=True)
class RunningView:
    """A running request as victim selection sees it."""

    request: Request
    generated_tokens: int
    kv_tokens: int
    admitted_at: float


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


@dataclass(frozen=True, slots=True)
class Admission:
    """A queue manager's answer to a new request."""

    request_id: str
    accepted: bool
    can_meet_slo: bool  # False: even at the head of the best queue the SLO would be missed
    instance_id: str | None = None  # where it is planned (None: not yet placed)
    wait_mean_s: float | None = None
    p_meet: float | None = None
    reason: str = ""


class Status(str, enum.Enum):
    FINISHED = "finished"
    REJECTED = "rejected"  # failed validation or admission; never queued
    UNFINISHED = "unfinished"  # still queued or running when the run ended
    CANCELLED = "cancelled"


@dataclass(slots=True)
class RequestOutcome:
    """The life of one request, as measured; SLO verdicts are computed from these times."""

    request: Request
    status: Status = Status.UNFINISHED
    instance_id: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    output_tokens: int = 0
    preemptions: int = 0
    wasted_tokens: int = 0
    reason: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    start_time: float | None = None  # first admitted to a running batch (its prefill began)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.request.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.request.arrival_time

    def met_ttft(self) -> bool:
        d = self.request.slo.ttft_deadline
        return self.first_token_time is not None and (d is None or self.first_token_time <= d)

    def met_e2e(self) -> bool:
        d = self.request.slo.e2e_deadline
        return self.status is Status.FINISHED and (d is None or (self.finish_time or 0.0) <= d)

    def met_slo(self) -> bool:
        """Finished, and every SLO the request carries was met."""
        return self.status is Status.FINISHED and self.met_ttft() and self.met_e2e()
