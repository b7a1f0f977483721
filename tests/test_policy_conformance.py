"""Every registered policy, built-in or from a plugin, against the contracts of its roles (the
suite a plugin's author runs on theirs: ``qlm_plugin.testing.roles``), and what distinguishes each
baseline."""

from __future__ import annotations

from collections.abc import Hashable

import pluggy
import pytest

from qlm_plugin.brain.contracts import RoutingPolicy
from qlm_plugin.domain.costmodel import cost_model
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.plan import Plan
from qlm_plugin.domain.request import DEFAULT_CLASSES, Request, make_request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.defaults import Defaults
from qlm_plugin.policies.registry import PolicyContext, PolicyFactory, policy_registry
from qlm_plugin.testing.roles import RoleConformance, Wired, workload

CTX = PolicyContext({"m": cost_model("llama-3.1-8b", "h100")})
REGISTRY = policy_registry(get_plugin_manager())
POLICIES = REGISTRY.names()


class TestEveryRegisteredPolicy(RoleConformance):
    @pytest.fixture(params=POLICIES)
    def factory(self, request: pytest.FixtureRequest) -> PolicyFactory:
        return REGISTRY.get(request.param).factory


def wired(name: str) -> tuple[pluggy.PluginManager, list[object]]:
    """The policy's plugins registered in a plugin manager, configured as a run configures them."""
    w = Wired(REGISTRY.get(name).factory, CTX)
    return w.pm, w.plugins


def key(pm: pluggy.PluginManager, r: Request, now: float = 0.0) -> Hashable:
    return pm.hook.qlm_rank_key(request=r, instance_id="i0", now=now)  # type: ignore[no-any-return]


def test_the_baselines_are_registered_first() -> None:
    assert POLICIES[:6] == ["fcfs", "edf", "edf-shed", "priority", "qlm", "oracle"]
    assert REGISTRY.get("oracle").reference and not REGISTRY.get("fcfs").reference


def _state(iid: str, models: tuple[str, ...], queued: int) -> InstanceState:
    return InstanceState(iid, "sim", 0.0, models, (), None, 0, 0, 0, queued, 0, 100, 8)


def test_default_router_prefers_instances_serving_the_model_then_the_shortest_queue() -> None:
    router = Defaults()
    assert isinstance(router, RoutingPolicy)
    r = make_request("a", "m", 10, 10, 0.0)
    states = [_state("i0", ("other",), 0), _state("i1", ("m",), 500), _state("i2", ("m",), 100)]
    assert router.qlm_choose_instance(request=r, instances=states, now=0.0) == "i2"
    assert router.qlm_choose_instance(request=r, instances=states[:1], now=0.0) == "i0", (
        "swap in when none serves it"
    )
    assert router.qlm_choose_instance(request=r, instances=[], now=0.0) is None


# ---- what distinguishes each baseline


def test_edf_serves_the_earliest_deadline_first() -> None:
    pm, _ = wired("edf")
    batch_early = make_request("b", "m", 10, 10, 0.0, slo_class=DEFAULT_CLASSES["batch"])  # deadline 600
    interactive_late = make_request("i", "m", 10, 10, 50.0, ttft_s=1.0)  # deadline 51
    assert key(pm, interactive_late) < key(pm, batch_early)  # type: ignore[operator]


def test_priority_follows_vllm_lower_value_first() -> None:
    pm, _ = wired("priority")
    hi = make_request("hi", "m", 10, 10, 9.0, priority=-1)
    lo = make_request("lo", "m", 10, 10, 0.0, priority=2)
    assert key(pm, hi) < key(pm, lo)  # type: ignore[operator]


@pytest.mark.parametrize("name", ["qlm", "oracle"])
def test_qlm_ranks_by_laxity_interactive_before_batch_of_the_same_moment(name: str) -> None:
    pm, _ = wired(name)
    interactive = make_request("i", "m", 500, 2048, 10.0, ttft_s=1.0, true_output_tokens=100)
    batch = make_request("b", "m", 500, 2048, 0.0, slo_class=DEFAULT_CLASSES["batch"], true_output_tokens=100)
    assert key(pm, interactive) < key(pm, batch)  # type: ignore[operator]


def test_oracle_prices_true_output_length() -> None:
    pm, _ = wired("oracle")
    batch = DEFAULT_CLASSES["batch"]
    long_job = make_request("long", "m", 100, 2048, 0.0, slo_class=batch, true_output_tokens=2000)
    short_job = make_request("short", "m", 100, 2048, 0.0, slo_class=batch, true_output_tokens=5)
    assert key(pm, long_job) < key(pm, short_job), "same deadline: less laxity (more work) first"  # type: ignore[operator]


# ---- the LSO executor: a plugin adds a serving operation by registering its action and runner


def test_a_registered_lso_runs_with_its_instance_and_an_unknown_one_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dataclasses import dataclass

    from qlm_plugin.brain.fleet_view import InstanceView
    from qlm_plugin.brain.queue_manager import QueueManager

    @dataclass(frozen=True)
    class Drain:
        instance_id: str

    @dataclass(frozen=True)
    class Mystery:
        instance_id: str

    w = Wired(REGISTRY.get("qlm").factory, CTX)
    w.submit(workload(3, 5))
    plugins, fleet = w.plugins, w.fleet
    qm = next(p for p in plugins if isinstance(p, QueueManager))
    ran: list[tuple[str, str, float]] = []

    def drain(view: InstanceView, action: Drain, now: float) -> None:
        state = qm.lso.dispatcher.hook.qlm_instance_state(instance_id=view.instance_id, detail=False)
        ran.append((view.instance_id, state.instance_id, now))

    qm.lso.register(Drain, drain)
    with pytest.raises(ValueError, match="already registered"):
        qm.lso.register(Drain, drain)
    plan = Plan(actions=[Drain("i1"), Drain("no-such-instance"), Mystery("i0"), Mystery("i1")])
    qm.lso.apply(plan, fleet.now)
    assert ran == [("i1", "i1", fleet.now)], "run once, on the instance it names, through the backend hooks"
    errors = [r for r in caplog.records if "Mystery" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelname == "ERROR"
