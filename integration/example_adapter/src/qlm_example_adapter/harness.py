"""The example adapter's conformance harness (qlm_plugin.testing.conformance.BackendHarness)."""

from __future__ import annotations

import pluggy

from qlm_example_adapter.engine import MODELS, EchoInstance
from qlm_example_adapter.plugin import EchoBackend


class EchoHarness:
    """Two echo instances of their own (not the entry point's), serving ``echo-small`` at start."""

    def __init__(self) -> None:
        self.backend = EchoBackend(EchoInstance(f"echo-{i}", MODELS) for i in range(2))

    def start(self, pm: pluggy.PluginManager) -> None:
        pm.register(self.backend, name="example-echo")
        self.backend.attach(pm)  # the suite calls no qlm_configure

    def instance_id(self) -> str:
        return "echo-0"

    def model(self) -> str:
        return MODELS[0]

    def other_model(self) -> str | None:
        return MODELS[1]

    def advance(self, seconds: float) -> None:
        self.backend.advance(seconds)

    def close(self) -> None:
        pass  # nothing to stop: the toy has no threads or processes


def conformance_harness() -> EchoHarness:
    return EchoHarness()
