"""What happened to a request: the queue manager's admission answer and the measured outcome, from
which SLO verdicts are computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qlm_plugin.domain.request import Request


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
