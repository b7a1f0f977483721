"""Named scheduling policies, as plugins contribute them through ``qlm_add_policies``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pluggy

from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.request import SLOClass


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may know when it is built for a run: the cost model of each served model (on the
    fleet's first instance that serves it), and the SLO classes."""

    cost_models: Mapping[str, CostModel] = field(default_factory=dict)
    #: The SLO classes of the deployment (their weights, priorities and admission thresholds).
    classes: Mapping[str, SLOClass] = field(default_factory=dict)
    #: The policy runs on a wall clock (the coordinator), not a simulator's event clock: calls come
    #: at distinct times, so per-time caches never hit and work must be amortised over time instead.
    wall_clock: bool = False


#: Builds the plugin object(s) of a policy for one run: one object, or a list registered in order.
PolicyFactory = Callable[[PolicyContext], object]


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    name: str
    factory: PolicyFactory
    description: str
    reference: bool = False  # a yardstick that uses knowledge no deployment has (true output lengths)
    ablation: bool = False  # a policy with one part left out: run when named, not in "all policies"


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class PolicyRegistry:
    def __init__(self) -> None:
        self._policies: dict[str, PolicyInfo] = {}

    def add(
        self,
        name: str,
        factory: PolicyFactory,
        description: str,
        *,
        reference: bool = False,
        ablation: bool = False,
    ) -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"policy name must be alphanumeric (with - or _), got {name!r}")
        if name in self._policies:
            raise ValueError(f"policy {name!r} is already registered")
        self._policies[name] = PolicyInfo(name, factory, description, reference, ablation)

    def get(self, name: str) -> PolicyInfo:
        try:
            return self._policies[name]
        except KeyError:
            raise UnknownPolicyError(
                f"unknown policy {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self, *, ablations: bool = False) -> list[str]:
        """The registered policies, in registration order; ablation variants only if asked."""
        return [n for n, info in self._policies.items() if ablations or not info.ablation]

    def __contains__(self, name: object) -> bool:
        return name in self._policies


def policy_registry(pm: pluggy.PluginManager) -> PolicyRegistry:
    """All policies the plugins of ``pm`` contribute (the built-ins first: their hook is ``tryfirst``)."""
    registry = PolicyRegistry()
    pm.hook.qlm_add_policies(registry=registry)
    return registry
