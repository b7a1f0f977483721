"""The adapter conformance suite, run over every adapter package in the repo."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import pytest

import qlm_plugin.adapters
from qlm_plugin.testing.conformance import AdapterConformance, BackendHarness, HarnessUnavailable

ADAPTERS = sorted(m.name for m in pkgutil.iter_modules(qlm_plugin.adapters.__path__) if m.ispkg)


@pytest.fixture(scope="module", autouse=True)
def _engines(request: pytest.FixtureRequest) -> Iterator[None]:
    """Adapters whose harness starts real engines (once per process) start them all at once before
    this module's first test (``prestart``; only those with a test selected) and stop them after
    its last (``shutdown``)."""
    harnesses = [importlib.import_module(f"qlm_plugin.adapters.{name}.harness") for name in ADAPTERS]
    selected = {a for a in ADAPTERS for item in request.session.items if item.nodeid.endswith(f"[{a}]")}
    for name, h in zip(ADAPTERS, harnesses, strict=True):
        if name in selected and (start := getattr(h, "prestart", None)) is not None:
            start()
    yield
    for h in harnesses:
        if (stop := getattr(h, "shutdown", None)) is not None:
            stop()


def test_every_adapter_ships_a_conformance_harness() -> None:
    assert ADAPTERS, "no adapter package found"
    for name in ADAPTERS:
        harness_mod = importlib.import_module(f"qlm_plugin.adapters.{name}.harness")
        assert callable(getattr(harness_mod, "conformance_harness", None)), f"adapter {name} has no harness"


@pytest.mark.parametrize("adapter", ADAPTERS)
class TestAdapterConformance(AdapterConformance):
    @pytest.fixture
    def harness(self, adapter: str) -> Iterator[BackendHarness]:
        try:
            h: BackendHarness = importlib.import_module(
                f"qlm_plugin.adapters.{adapter}.harness"
            ).conformance_harness()
        except HarnessUnavailable as exc:
            pytest.skip(str(exc))
        yield h
        h.close()
