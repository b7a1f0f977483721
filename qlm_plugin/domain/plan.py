"""A plan: where each request group goes and in which order, and the serving operations to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from qlm_plugin.domain.instance import EvictMode


class PlanAction(Protocol):
    """A serving operation a plan orders on one instance. The built-in ones are below; a plugin may
    add its own, with the part of the LSO executor that runs it
    (:meth:`qlm_plugin.brain.lso.LSOExecutor.register`)."""

    @property
    def instance_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Evict:
    instance_id: str
    request_id: str
    mode: EvictMode


@dataclass(frozen=True, slots=True)
class LoadModel:
    instance_id: str
    model: str
    target: str = "gpu"  # "gpu": serve it; "host": stage weights in host memory (warm start)


LSO = Evict | LoadModel  # the built-in actions


@dataclass(slots=True)
class Plan:
    """Virtual queues and the LSOs that carry the plan out.

    ``queues`` maps an instance to request ids in execution order; ``groups`` to request-group keys
    (what a planner over groups produces: cheaper to apply than ids). ``solver`` names what produced
    it (``heuristic``, the built-in planner; a planner plugin names its own); ``objective`` is the
    weighted number of SLOs the plan expects to meet.
    """

    queues: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)  # instance -> group keys
    actions: list[PlanAction] = field(default_factory=list)
    solver: str = "none"
    objective: float = 0.0
    solve_s: float = 0.0
