"""Contracts of the policy roles. A named policy is a plugin object implementing one or more of them;
``tests/test_policy_conformance.py`` checks every registered policy against these contracts.

Safety: the core calls a policy from one thread at a time (its event loop, the simulator's loop, or
vLLM's scheduler thread), so implementations need no locks for their own state; but the same object
may be called from different threads over its life (the vLLM engine-side agent hands it over), so it
must not keep thread-local state. Policies must not block: no I/O, no sleeping.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable

from qlm_plugin.domain.instance import InstanceState, RunningView
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
    """Places a request on an instance (load balancing).

    Contract: returns the id of one of ``instances``; prefers an instance with the request's model
    loaded when one exists (a model swap costs seconds to minutes).
    """

    def qlm_choose_instance(
        self, request: Request, instances: Sequence[InstanceState], now: float
    ) -> str | None: ...
