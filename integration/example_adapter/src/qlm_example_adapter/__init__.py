"""qlm-example-adapter: a toy backend for qlm-plugin, the worked example of its adapter docs.

``EchoInstance`` (``engine``) is the "engine"; ``EchoBackend`` (``plugin``) answers the backend
hooks for its instances; ``plugin.plugin`` is what the ``qlm`` entry point registers;
``harness.conformance_harness()`` drives it through the adapter conformance suite.
"""

from __future__ import annotations

from qlm_example_adapter.engine import EchoInstance
from qlm_example_adapter.plugin import EchoBackend

__all__ = ["EchoBackend", "EchoInstance"]
