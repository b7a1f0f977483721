"""The baseline policies every comparison runs: what engines do today, and a clairvoyant yardstick.

* ``fcfs``: first-come-first-served; preempts the most recently admitted request (vLLM's default).
* ``edf``: earliest deadline first (the TTFT deadline, else the end-to-end one).
* ``priority``: static priority, ``(priority, arrival)`` lower first, preempting the lowest priority
  (vLLM's ``--scheduling-policy priority``).
* ``oracle``: least laxity first on the *true* remaining work. A reference that knows each request's
  real output length: no deployment can run it; it bounds what prediction could buy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from qlm_plugin.costmodel import CostModel
from qlm_plugin.hooks import hookimpl
from qlm_plugin.policies.registry import PolicyContext, PolicyRegistry
from qlm_plugin.request import Request
from qlm_plugin.state import RunningView


class FCFS:
    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        return (request.arrival_time, request.id)

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        return max(candidates, key=lambda c: (c.admitted_at, c.request.arrival_time, c.request.id))


class EDF:
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


class StaticPriority:
    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        return (request.priority, request.arrival_time, request.id)

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        return max(candidates, key=lambda c: (c.request.priority, c.request.arrival_time, c.request.id))


#: Decode batch at which the oracle prices a token of work (a mid-size continuous batch).
ORACLE_REFERENCE_BATCH = 32


class Oracle:
    """Least-laxity-first on true remaining work (a clairvoyant reference, not a deployable policy).

    Laxity = deadline - work still needed before it: the prefill for a TTFT deadline, prefill plus
    every true output token (priced at a reference batch) for an end-to-end deadline. The key is the
    smaller laxity; it is absolute, so it does not drift with time.
    """

    def __init__(self, cost_models: dict[str, CostModel]) -> None:
        self._cost = cost_models

    def _laxity(self, request: Request, generated: int) -> float:
        cost = self._cost.get(request.model)
        true_out = (
            request.true_output_tokens if request.true_output_tokens is not None else request.max_tokens
        )
        remaining = max(0, true_out - generated)
        if cost is None:
            prefill_s, decode_s = 0.0, float(remaining)
        else:
            prefill_s = cost.step_s(request.prompt_tokens + generated, 0)
            decode_s = remaining * cost.decode_tpot_s(ORACLE_REFERENCE_BATCH) / 1.0
        laxity = math.inf
        if request.slo.ttft_deadline is not None and generated == 0:
            laxity = request.slo.ttft_deadline - prefill_s
        if request.slo.e2e_deadline is not None:
            laxity = min(laxity, request.slo.e2e_deadline - prefill_s - decode_s)
        return laxity

    @hookimpl
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        return (self._laxity(request, 0), request.arrival_time, request.id)

    @hookimpl
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        return max(
            candidates,
            key=lambda c: (self._laxity(c.request, c.generated_tokens), c.request.arrival_time, c.request.id),
        )


class BaselinePolicies:
    """Contributes the baselines to the policy registry (first, so they lead every listing)."""

    @hookimpl(tryfirst=True)
    def qlm_add_policies(self, registry: PolicyRegistry) -> None:
        registry.add("fcfs", lambda ctx: FCFS(), "first-come-first-served (vLLM default)")
        registry.add("edf", lambda ctx: EDF(), "earliest deadline first")
        registry.add("priority", lambda ctx: StaticPriority(), "static priority (vLLM priority policy)")
        registry.add("oracle", _make_oracle, "REFERENCE: least laxity on true output lengths", reference=True)


def _make_oracle(ctx: PolicyContext) -> Oracle:
    return Oracle(dict(ctx.cost_models))
