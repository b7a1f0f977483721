"""The sim adapter's harness for the adapter conformance suite (qlm_plugin.testing.conformance)."""

from __future__ import annotations

import pluggy

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.fleet import SimFleet
from qlm_plugin.adapters.sim.plugin import SimBackend
from qlm_plugin.domain.costmodel import cost_model


class SimHarness:
    """Two simulated H100 instances serving Llama-3.1-8B, with Phi-4 loadable."""

    def __init__(self) -> None:
        costs = {"llama-3.1-8b": cost_model("llama-3.1-8b", "h100"), "phi-4": cost_model("phi-4", "h100")}
        self.fleet = SimFleet(
            [SimInstance(f"sim-{i}", "h100", costs, initial_model="llama-3.1-8b") for i in range(2)]
        )
        self.backend = SimBackend(self.fleet)

    def start(self, pm: pluggy.PluginManager) -> None:
        pm.register(self.backend, name="sim-backend")
        self.backend.attach(pm)

    def instance_id(self) -> str:
        return "sim-0"

    def model(self) -> str:
        return "llama-3.1-8b"

    def other_model(self) -> str | None:
        return "phi-4"

    def advance(self, seconds: float) -> None:
        self.fleet.advance_to(self.fleet.now + seconds)

    def close(self) -> None:
        pass


def conformance_harness() -> SimHarness:
    return SimHarness()
