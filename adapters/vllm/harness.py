"""The conformance harness of the vLLM adapter: not runnable in-process.

The suite drives an adapter's backend hooks on a clock it controls. A vLLM engine's backend hooks
are the coordinator's, over gRPC, with the engine in its own process on wall-clock time; running
the suite against that needs a harness that starts engines and a coordinator (issue 6). Until then
the behaviour the suite checks is covered by ``integration/test_vllm.py`` on real engines.
"""

from __future__ import annotations

from qlm_plugin.testing.conformance import BackendHarness, HarnessUnavailable


def conformance_harness() -> BackendHarness:
    raise HarnessUnavailable(
        "the vLLM adapter's conformance needs running engines and a coordinator (issue 6); "
        "integration/test_vllm.py covers dispatch, eviction and lost engines on real vLLM-CPU servers"
    )
