"""The test run's defaults, inherited by every process the tests start.

- ``QLM_HTTP_WORKERS``: the suite runs the HTTP front door in the core process unless told
  otherwise (``QLM_HTTP_WORKERS=2 python -m pytest`` runs it on two worker processes), so that its
  results do not depend on the machine's core count.

vLLM-CPU engines run their model in the engine-core process wherever qlm starts them
(``launch.cpu_env``); ``VLLM_ENABLE_V1_MULTIPROCESSING=1 python -m pytest`` runs them with vLLM's
worker process instead.
"""

import os

os.environ.setdefault("QLM_HTTP_WORKERS", "0")


import pytest


@pytest.fixture(autouse=True)
def _plugin_logs_once_per_test() -> None:
    """A broken plugin is logged once per process (``hooks/guard.py``, ``hooks/manager.py``); each
    test that checks that log starts as a fresh process would."""
    from qlm_plugin.hooks import guard, manager

    guard.reset_logged()
    manager._load_failures_logged.clear()
