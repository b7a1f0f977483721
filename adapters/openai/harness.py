"""The conformance harness of the black-box adapter: not runnable in-process.

Like the vLLM adapter, this adapter is an agent that talks to the coordinator over gRPC and to a
server over HTTP on wall-clock time, while the suite drives backend hooks on its own clock.
``integration/test_openai_adapter.py`` covers dispatch, the learned concurrency limit, eviction by
abort and requeue, and state from Prometheus against a real vLLM-CPU OpenAI server.
"""

from __future__ import annotations

from qlm_plugin.testing.conformance import BackendHarness, HarnessUnavailable


def conformance_harness() -> BackendHarness:
    raise HarnessUnavailable(
        "the black-box adapter is an agent over gRPC and HTTP on wall-clock time; "
        "integration/test_openai_adapter.py covers it against a real vLLM-CPU OpenAI server"
    )
