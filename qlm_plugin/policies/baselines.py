"""The baseline policies every comparison runs: what engines do today, and a clairvoyant yardstick.

* ``fcfs``: first-come-first-served; preempts the most recently admitted request (vLLM's default).
* ``edf``: earliest deadline first (the TTFT deadline, else the end-to-end one).
* ``edf-shed``: EDF over a global queue that serves late requests only when nothing on time waits
  (:mod:`qlm_plugin.policies.edf_shed`).
* ``priority``: static priority, ``(priority, arrival)`` lower first, preempting the lowest priority
  (vLLM's ``--scheduling-policy priority``).
* ``qlm``: the queue manager (:mod:`qlm_plugin.brain.queue_manager`) with the online length
  predictor and the planner.
* ``oracle``: the same queue manager and planner fed each request's *true* output length. A reference
  no deployment can run: the gap between ``qlm`` and it is the price of prediction.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from qlm_plugin.domain.instance import RunningView
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl
from qlm_plugin.policies.edf_shed import EDFShed
from qlm_plugin.policies.qlm import add_qlm_policies
from qlm_plugin.policies.registry import PolicyRegistry


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


class BaselinePolicies:
    """Contributes the baselines to the policy registry (first, so they lead every listing)."""

    @hookimpl(tryfirst=True)
    def qlm_add_policies(self, registry: PolicyRegistry) -> None:
        registry.add("fcfs", lambda ctx: FCFS(), "first-come-first-served (vLLM default)")
        registry.add("edf", lambda ctx: EDF(), "earliest deadline first")
        registry.add(
            "edf-shed",
            lambda ctx: EDFShed(list(ctx.cost_models)),
            "EDF over a global queue, late requests only when nothing on time waits (llm-d flow control)",
        )
        registry.add("priority", lambda ctx: StaticPriority(), "static priority (vLLM priority policy)")
        add_qlm_policies(registry)
