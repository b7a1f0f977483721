"""The contracts of the brain's roles, one small protocol each. A policy plugin fills one or more of
them through the hooks (``qlm_plugin.hooks.hookspecs``); :mod:`qlm_plugin.testing.roles` checks an
implementation against the contract of each role it fills (``tests/test_policy_conformance.py``
runs it over every registered policy).

Thread safety, for every role: the caller calls an implementation from one thread at a time (its
event loop, the simulator's loop, or vLLM's scheduler thread), so implementations need no locks for
their own state; it must keep no thread-local state all the same (a driver may move to another
thread over its life, as an engine restarting its scheduler does). No implementation blocks:
no I/O, no sleeping. Times are seconds on the caller's clock, passed in (``now``): no role reads a
clock of its own, so the simulator, the coordinator and the engine run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

from qlm_plugin.domain.distributions import LengthDistribution, WaitEstimate
from qlm_plugin.domain.instance import InstanceState, RunningView
from qlm_plugin.domain.outcome import Admission, RequestOutcome
from qlm_plugin.domain.plan import Plan
from qlm_plugin.domain.request import Request


@runtime_checkable
class OrderingPolicy(Protocol):
    """Ranks a waiting queue: lower keys first.

    Contract: keys of one policy are totally ordered; the key of a request does not depend on
    ``now`` (keys computed at different times are compared); equal urgency falls back to arrival
    order, so requests of equal standing are served first-come-first-served.
    """

    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable: ...


@runtime_checkable
class VictimPolicy(Protocol):
    """Chooses which running request to preempt when KV cache runs out.

    Contract: returns one of ``candidates`` (never empty), deterministically for the same input.
    """

    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView: ...


@runtime_checkable
class RoutingPolicy(Protocol):
    """Places a request on an instance (load balancing, for runs without a queue manager).

    Contract: returns the id of one of ``instances``; prefers an instance with the request's model
    loaded when one exists (a model swap costs seconds to minutes).
    """

    def qlm_choose_instance(
        self, request: Request, instances: Sequence[InstanceState], now: float
    ) -> str | None: ...


@runtime_checkable
class LengthPredictorRole(Protocol):
    """Predicts the output tokens a request still has to generate, as a distribution, and learns
    from the requests that finish.

    Contract: a distribution with a mean and quantiles in ``[0, max_tokens - generated_tokens]``,
    quantiles non-decreasing in their probability; deterministic between observations.
    """

    def qlm_predict_output_length(self, request: Request, generated_tokens: int) -> LengthDistribution: ...

    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None: ...


@runtime_checkable
class WaitEstimatorRole(Protocol):
    """Estimates when a request gets its first token and when it finishes, as distributions.

    Contract: times relative to ``now``, non-negative (infinite where nothing can serve the
    request); completion no earlier than the first token; ``p_meet`` in ``[0, 1]``; ``None`` only for
    a request it cannot estimate (a model it does not know).
    """

    def qlm_estimate_wait(self, request: Request, now: float) -> WaitEstimate | None: ...


@runtime_checkable
class AdmissionRole(Protocol):
    """Decides whether a new request is taken, given its estimate.

    Contract: answers for that request (same id); a refusal says why; deterministic for the same
    request and estimate.
    """

    def qlm_admit(self, request: Request, estimate: WaitEstimate, now: float) -> Admission | None: ...


@runtime_checkable
class PlannerRole(Protocol):
    """Places the queued request groups on instances, in order, and orders model swaps.

    Contract: places groups and orders loads only on the ``instances`` given, loads only models
    those instances can serve; names its solver; an objective no larger than the groups' weight.
    """

    def qlm_plan(
        self, queue: Sequence[Request], instances: Sequence[InstanceState], now: float
    ) -> Plan | None: ...


class LSOExecutorRole(Protocol):
    """Carries plans and decisions out through the backend hooks (``qlm_dispatch``, ``qlm_evict``,
    ``qlm_load_model``): request pulling, load balancing, eviction, model swap and warm start.
    Internal to a queue manager (its implementation: :class:`qlm_plugin.brain.lso.LSOExecutor`).

    Contract: a backend refusal leaves the request queued, never lost; one urgent request costs at
    most one eviction; a load that failed is not ordered on that instance again at once.
    """

    def apply(self, plan: Plan, now: float) -> None: ...

    def register(self, action_type: type, run: Callable[[Any, Any, float], None]) -> None:
        """Plans may carry ``action_type``; ``run(instance_view, action, now)`` carries one out."""
