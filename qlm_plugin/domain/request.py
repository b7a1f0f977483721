"""Requests, SLOs and their validation.

Times are seconds on one clock (the coordinator's, or the simulator's). SLO budgets are relative
(seconds after arrival); a request carries absolute deadlines derived from them at arrival.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


class RequestValidationError(ValueError):
    """A request was rejected; ``field`` names the offending field (API layers turn it into a 4xx)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the core must know of a served model to validate requests for it."""

    name: str
    context_len: int


@dataclass(frozen=True, slots=True)
class SLOClass:
    """A named service class: relative SLO budgets, a weight in the attainment objective, a priority.

    ``priority`` follows vLLM's convention: lower values are served first. ``refuse_below_p_meet``:
    a new request the waiting-time estimator gives a lower probability of meeting its SLO is refused
    at once (HTTP 429 with the estimate and a ``Retry-After``) instead of queued; 0 never refuses.
    """

    name: str
    ttft_s: float | None = None
    e2e_s: float | None = None
    weight: float = 1.0
    priority: int = 0
    refuse_below_p_meet: float = 0.0


#: The two classes every deployment has unless its configuration names others.
DEFAULT_CLASSES: Mapping[str, SLOClass] = {
    "interactive": SLOClass("interactive", ttft_s=2.0, e2e_s=None, weight=1.0, priority=0),
    "batch": SLOClass("batch", ttft_s=None, e2e_s=600.0, weight=1.0, priority=1),
}


#: The budget sent for a deadline already past (0 would mean "no deadline").
LATE_BUDGET_S = 1e-3


@dataclass(frozen=True, slots=True)
class SLO:
    """Absolute deadlines (seconds on the request's clock); None where the request has no such SLO."""

    ttft_deadline: float | None = None
    e2e_deadline: float | None = None

    def first_deadline(self) -> float:
        """The deadline that binds before the first token: TTFT if set, else end-to-end, else +inf."""
        if self.ttft_deadline is not None:
            return self.ttft_deadline
        if self.e2e_deadline is not None:
            return self.e2e_deadline
        return math.inf

    def budgets(self, now: float, *, started: bool) -> tuple[float, float]:
        """(TTFT, end-to-end) seconds left at ``now``, 0 for none: what an engine is sent instead of
        the deadlines, to count from its own receipt on its own clock (hosts' clocks may disagree).
        A deadline already past leaves the smallest budget, not 0; the TTFT deadline is over once the
        request ``started`` (a token was delivered)."""
        ttft = 0.0
        if self.ttft_deadline is not None and not started:
            ttft = max(self.ttft_deadline - now, LATE_BUDGET_S)
        e2e = 0.0 if self.e2e_deadline is None else max(self.e2e_deadline - now, LATE_BUDGET_S)
        return ttft, e2e


@dataclass(slots=True, eq=False)
class Request:
    """One generation request as the queue manager sees it.

    ``true_output_tokens`` is the length the request will really generate; only the simulator and the
    clairvoyant ``oracle`` reference know it. Deployable policies must never read it.
    """

    id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    arrival_time: float
    slo: SLO = field(default_factory=SLO)
    slo_class: str = "interactive"
    priority: int = 0
    weight: float = 1.0
    tenant: str = "default"
    true_output_tokens: int | None = None

    def deadline_after_first_token(self) -> float:
        return self.slo.e2e_deadline if self.slo.e2e_deadline is not None else math.inf


def _check_budget(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestValidationError(name, f"must be a finite number of seconds, got {value!r}")
    if value <= 0:
        raise RequestValidationError(name, f"must be > 0 seconds, got {value}")


def validate_request(request: Request, models: Mapping[str, ModelSpec] | None = None) -> None:
    """Raise :class:`RequestValidationError` naming the first invalid field of ``request``.

    With ``models``, the model must be one of them and the prompt plus ``max_tokens`` must fit its
    context window.
    """
    if not request.id:
        raise RequestValidationError("id", "must be a non-empty string")
    if not request.model:
        raise RequestValidationError("model", "must be a non-empty string")
    if not isinstance(request.prompt_tokens, int) or request.prompt_tokens < 1:
        raise RequestValidationError(
            "prompt_tokens", f"must be an integer >= 1, got {request.prompt_tokens!r}"
        )
    if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
        raise RequestValidationError("max_tokens", f"must be an integer >= 1, got {request.max_tokens!r}")
    if not math.isfinite(request.weight) or request.weight < 0:
        raise RequestValidationError("weight", f"must be a finite number >= 0, got {request.weight!r}")
    if not request.tenant:
        raise RequestValidationError("tenant", "must be a non-empty string")
    ttft, e2e = request.slo.ttft_deadline, request.slo.e2e_deadline
    for name, deadline in (("slo.ttft_deadline", ttft), ("slo.e2e_deadline", e2e)):
        if deadline is not None and deadline <= request.arrival_time:
            raise RequestValidationError(
                name, f"must be after arrival ({request.arrival_time}), got {deadline}"
            )
    if ttft is not None and e2e is not None and e2e < ttft:
        raise RequestValidationError("slo.e2e_deadline", f"({e2e}) is before slo.ttft_deadline ({ttft})")
    if models is None:
        return
    spec = models.get(request.model)
    if spec is None:
        known = ", ".join(sorted(models)) or "none"
        raise RequestValidationError("model", f"unknown model {request.model!r} (served: {known})")
    if request.prompt_tokens >= spec.context_len:
        raise RequestValidationError(
            "prompt_tokens",
            f"prompt of {request.prompt_tokens} tokens does not fit "
            f"{spec.name}'s context of {spec.context_len} (its maximum context length)",
        )
    if request.prompt_tokens + request.max_tokens > spec.context_len:
        raise RequestValidationError(
            "max_tokens",
            f"prompt ({request.prompt_tokens}) + max_tokens ({request.max_tokens}) exceeds "
            f"{spec.name}'s context of {spec.context_len} (its maximum context length)",
        )


def make_request(
    id: str,
    model: str,
    prompt_tokens: int,
    max_tokens: int,
    arrival_time: float,
    *,
    slo_class: SLOClass | None = None,
    ttft_s: float | None = None,
    e2e_s: float | None = None,
    priority: int | None = None,
    weight: float | None = None,
    tenant: str = "default",
    true_output_tokens: int | None = None,
    models: Mapping[str, ModelSpec] | None = None,
) -> Request:
    """Build and validate a request from relative SLO budgets.

    Budgets given here override the class's; the class supplies the rest (and priority and weight),
    but not a budget that contradicts one given (a class's TTFT beyond the end-to-end budget given,
    or its end-to-end budget before the TTFT given): the caller's stands alone.
    """
    cls = slo_class or DEFAULT_CLASSES["interactive"]
    ttft_budget = ttft_s if ttft_s is not None else cls.ttft_s
    e2e_budget = e2e_s if e2e_s is not None else cls.e2e_s
    if ttft_budget is not None and e2e_budget is not None and e2e_budget < ttft_budget:
        if ttft_s is None and e2e_s is not None:
            ttft_budget = None
        elif e2e_s is None and ttft_s is not None:
            e2e_budget = None
    _check_budget("slo.ttft_s", ttft_budget)
    _check_budget("slo.e2e_s", e2e_budget)
    if ttft_budget is not None and e2e_budget is not None and e2e_budget < ttft_budget:
        raise RequestValidationError(
            "slo.e2e_s", f"({e2e_budget:g} s) is shorter than the TTFT SLO ({ttft_budget:g} s)"
        )
    request = Request(
        id=id,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        arrival_time=arrival_time,
        slo=SLO(
            ttft_deadline=None if ttft_budget is None else arrival_time + ttft_budget,
            e2e_deadline=None if e2e_budget is None else arrival_time + e2e_budget,
        ),
        slo_class=cls.name,
        priority=cls.priority if priority is None else priority,
        weight=cls.weight if weight is None else weight,
        tenant=tenant,
        true_output_tokens=true_output_tokens,
    )
    validate_request(request, models)
    return request
