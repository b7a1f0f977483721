"""The test run's defaults, inherited by every process the tests start.

- ``QLM_HTTP_WORKERS``: the suite runs the HTTP front door in the core process unless told
  otherwise (``QLM_HTTP_WORKERS=2 python -m pytest`` runs it on two worker processes), so that its
  results do not depend on the machine's core count.

vLLM-CPU engines run their model in the engine-core process wherever qlm starts them
(``launch.cpu_env``); ``VLLM_ENABLE_V1_MULTIPROCESSING=1 python -m pytest`` runs them with vLLM's
worker process instead.

The suite runs on two pytest-xdist workers (``-n 2`` in ``pyproject.toml``; ``-n 0`` runs it in one
process): first the tests that start engines or Ray and check no latency (:data:`FIRST`, two units
of work, one per worker), then the other modules a module at a time on either worker, then the tests
of :data:`ALONE` on one worker, one after another, once the other worker is done. Measured on 2
cores, the same machine: 663 and 710 s (the last unit 107 s); 889 s with every module that starts an
engine or Ray in the last unit (630 s of it, on one worker, with about one core of two in use).
"""

import os
from typing import Any

os.environ.setdefault("QLM_HTTP_WORKERS", "0")


import pytest

#: Tests that start vLLM engines or a Ray cluster and check no latency: two units of work
#: (xdist groups) taken first, each run one test after another on one worker, beside each other
#: and the light modules. ``ray stop --force`` stops every Ray on the machine, so the Ray modules
#: are all in one; the conformance harnesses' reference server (started once per process) serves
#: the black-box adapter's module after them; ``test_serve_vllm``'s fleet is started once for its
#: tests. (Node-id prefixes, in the order they run.)
FIRST = {
    "vllm": (
        "tests/test_adapter_conformance.py",
        "integration/test_openai_adapter.py",
        "integration/test_serve_vllm.py",
        "integration/test_vllm_plugins.py",
    ),
    "ray": ("tests/test_ray_fleet.py", "integration/test_ray.py"),
}

#: The tests that check vLLM engines' latencies (the simulator fitted to the engines, interactive
#: work overtaking batch work), and those that share their engines: the last unit, on one worker,
#: started only once the other worker has nothing left (:class:`AloneLast`), since anything beside
#: them slows the engines past those bounds.
ALONE = (
    "integration/test_vllm.py",
    "integration/test_serve_vllm.py::test_one_awake_engine_swaps_in_batches_as_the_simulator_predicts",
)


def _unit(item: pytest.Item) -> tuple[str, tuple[int, int]]:
    """The item's unit of work (its xdist group) and where the unit is queued."""
    if item.nodeid.startswith(ALONE):
        return "alone", (len(FIRST) + 1, 0)
    for rank, (group, prefixes) in enumerate(FIRST.items()):
        for i, prefix in enumerate(prefixes):
            if item.nodeid.startswith(prefix):
                return group, (rank, i)
    module = item.nodeid.split("::", 1)[0]
    return module, (len(FIRST), not module.startswith("integration/"))


@pytest.hookimpl(tryfirst=True)  # before xdist's, which names each item's group from its marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The units of :data:`FIRST`, then the other modules (each its own unit; the integration ones,
    the longer, first), then :data:`ALONE`. Without xdist, the same order."""
    units = {item: _unit(item) for item in items}
    items.sort(key=lambda item: units[item][1])  # stable: a module's tests keep their order
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            item.add_marker(pytest.mark.xdist_group(units[item][0]))


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # an xdist hook: pytest -p no:xdist runs too
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's ``loadgroup`` scheduling, except that the unit of :data:`ALONE` goes to the last
    worker left: a worker that reaches it while another still works stops (the other goes on to
    take it), and one that reaches it while the others stop waits until they are gone.

    (An xdist worker runs a test only once it has the next one or is told to stop, so a worker
    waiting for work still holds its last test: it cannot simply idle beside the unit.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class AloneLast(LoadGroupScheduling):  # type: ignore[misc]
        def _reschedule(self, node: Any) -> None:
            head = next(iter(self.workqueue), None)
            others = [n for n in self.assigned_work if n is not node]
            if head == "alone" and others and not node.shutting_down:
                if self._pending_of(self.assigned_work[node]) > 2:
                    return  # not yet at its last tests
                if not all(n.shutting_down for n in others):
                    node.shutdown()  # another worker works on: it takes the unit
                return  # the others stop: the last to go reschedules this one
            super()._reschedule(node)

        def remove_node(self, node: Any) -> Any:
            crashed = super().remove_node(node)
            for other in list(self.assigned_work):
                self._reschedule(other)
            return crashed

    return AloneLast(config, log)


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
