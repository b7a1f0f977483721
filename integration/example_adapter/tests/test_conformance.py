"""qlm-plugin's adapter conformance suite, run on this adapter (pip install ".[test]"; pytest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from qlm_example_adapter.harness import conformance_harness

from qlm_plugin.testing.conformance import AdapterConformance, BackendHarness


class TestEchoAdapter(AdapterConformance):
    @pytest.fixture
    def harness(self) -> Iterator[BackendHarness]:
        h = conformance_harness()
        yield h
        h.close()
