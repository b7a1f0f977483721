"""The test run's defaults, inherited by every process the tests start.

- ``QLM_HTTP_WORKERS``: the suite runs the HTTP front door in the core process unless told
  otherwise (``QLM_HTTP_WORKERS=2 python -m pytest`` runs it on two worker processes), so that its
  results do not depend on the machine's core count.

vLLM-CPU engines run their model in the engine-core process wherever qlm starts them
(``launch.cpu_env``); ``VLLM_ENABLE_V1_MULTIPROCESSING=1 python -m pytest`` runs them with vLLM's
worker process instead.

The suite runs on two pytest-xdist workers (``-n 2`` in ``pyproject.toml``; ``-n 0`` runs it in one
process): first every other module, a module at a time on either worker, then the modules of
:data:`ONE_AT_A_TIME` on one worker, one after another, with the other worker done.
"""

import os

os.environ.setdefault("QLM_HTTP_WORKERS", "0")


import pytest

#: Test modules that start vLLM engines or a Ray cluster, in the order they run: last, on one
#: worker, with nothing beside them (xdist group ``engines``). Two of them at once on two cores
#: slow each other past the latency bounds they check, ``ray stop --force`` stops every Ray on the
#: machine, and an engine started once per process (the conformance harnesses) serves the modules
#: after it. (Ray first, beside the other modules, measured slower: 870 s against 823 s.)
ONE_AT_A_TIME = (
    "tests/test_adapter_conformance.py",
    "integration/test_openai_adapter.py",
    "integration/test_vllm.py",
    "integration/test_vllm_plugins.py",
    "integration/test_serve_vllm.py",
    "tests/test_ray_fleet.py",
    "integration/test_ray.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which names each item's group from its marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The other modules first (the integration ones, the longer, first), then those of
    :data:`ONE_AT_A_TIME`. Under xdist each module is one unit of work (its module fixtures start
    once), and those of :data:`ONE_AT_A_TIME` one unit, queued last."""
    last = {path: i for i, path in enumerate(ONE_AT_A_TIME)}
    module = {item: item.nodeid.split("::", 1)[0] for item in items}
    # stable: a module's tests keep their order
    items.sort(key=lambda item: (last.get(module[item], -1), not module[item].startswith("integration/")))
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            group = "engines" if module[item] in last else module[item]
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config: pytest.Config) -> None:
    """A benchmark run (``--benchmark-enable``) runs in one process: pytest-benchmark measures
    nothing under xdist."""
    if config.getoption("benchmark_enable", False) and config.pluginmanager.hasplugin("xdist"):
        config.option.numprocesses, config.option.dist, config.option.tx = 0, "no", []


@pytest.fixture(autouse=True)
def _plugin_logs_once_per_test() -> None:
    """A broken plugin is logged once per process (``hooks/guard.py``, ``hooks/manager.py``); each
    test that checks that log starts as a fresh process would."""
    from qlm_plugin.hooks import guard, manager

    guard.reset_logged()
    manager._load_failures_logged.clear()
