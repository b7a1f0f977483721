"""Every registered policy, built-in or from a plugin, against the contracts of its roles."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pluggy
import pytest

from qlm_plugin.adapters.sim import SimBackend, SimFleet, SimInstance
from qlm_plugin.brain.contracts import (
    AdmissionRole,
    LengthPredictorRole,
    OrderingPolicy,
    PlannerRole,
    RoutingPolicy,
    VictimPolicy,
    WaitEstimatorRole,
)
from qlm_plugin.domain.costmodel import cost_model
from qlm_plugin.domain.distributions import WaitEstimate
from qlm_plugin.domain.instance import InstanceState, RunningView
from qlm_plugin.domain.plan import LoadModel, Plan
from qlm_plugin.domain.request import DEFAULT_CLASSES, Request, make_request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.defaults import Defaults
from qlm_plugin.policies.registry import PolicyContext, policy_registry

CTX = PolicyContext({"m": cost_model("llama-3.1-8b", "h100")})
REGISTRY = policy_registry(get_plugin_manager())
POLICIES = REGISTRY.names()


def wired(name: str) -> tuple[pluggy.PluginManager, list[object]]:
    """The policy's plugins registered in a plugin manager, configured as a run configures them."""
    built = REGISTRY.get(name).factory(CTX)
    plugins = built if isinstance(built, list) else [built]
    pm = get_plugin_manager(autoload=False)
    for n, plugin in enumerate(plugins):
        pm.register(plugin, name=f"{name}:{n}")
    pm.hook.qlm_configure(pm=pm)
    return pm, plugins


def implements(plugins: list[object], hook: str) -> bool:
    return any(hasattr(p, hook) for p in plugins)


def workload(seed: int, n: int = 60) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cls = DEFAULT_CLASSES[rng.choice(["interactive", "batch"])]
        out.append(
            make_request(
                f"r{i}",
                "m",
                rng.randint(1, 4000),
                2048,
                rng.uniform(0, 100),
                slo_class=cls,
                priority=rng.randint(0, 3),
                true_output_tokens=rng.randint(1, 2000),
            )
        )
    return out


def key(pm: pluggy.PluginManager, r: Request, now: float = 0.0) -> Hashable:
    return pm.hook.qlm_rank_key(request=r, instance_id="i0", now=now)  # type: ignore[no-any-return]


def test_the_baselines_are_registered_first() -> None:
    assert POLICIES[:6] == ["fcfs", "edf", "edf-shed", "priority", "qlm", "oracle"]
    assert REGISTRY.get("oracle").reference and not REGISTRY.get("fcfs").reference


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_fills_at_least_one_role(name: str) -> None:
    _, plugins = wired(name)
    roles = ("qlm_rank_key", "qlm_select_victim", "qlm_choose_instance", "qlm_submit")
    assert any(implements(plugins, r) for r in roles)
    for p in plugins:
        if hasattr(p, "qlm_rank_key"):
            assert isinstance(p, OrderingPolicy)
        if hasattr(p, "qlm_select_victim"):
            assert isinstance(p, VictimPolicy)


@pytest.mark.parametrize("name", POLICIES)
def test_ordering_keys_are_total_deterministic_and_do_not_drift(name: str) -> None:
    pm, plugins = wired(name)
    if not implements(plugins, "qlm_rank_key"):
        pytest.skip("not an ordering policy")
    reqs = workload(1)
    keys = [key(pm, r) for r in reqs]
    sorted(keys)  # type: ignore[type-var]  # totally ordered: raises TypeError otherwise
    assert keys == [key(pm, r) for r in reqs], "same request, same key"
    assert keys == [key(pm, r, now=12345.0) for r in reqs], "keys must not depend on now"
    assert len(set(keys)) == len(keys), "ties are broken (arrival, id)"


@pytest.mark.parametrize("name", POLICIES)
def test_equal_standing_is_served_first_come_first_served(name: str) -> None:
    pm, plugins = wired(name)
    if not implements(plugins, "qlm_rank_key"):
        pytest.skip("not an ordering policy")
    early = make_request("x1", "m", 100, 100, 5.0, ttft_s=2.0, true_output_tokens=50)
    late = make_request("x2", "m", 100, 100, 5.0, ttft_s=2.0, true_output_tokens=50)
    later = make_request("x0", "m", 100, 100, 6.0, ttft_s=1.0, true_output_tokens=50)  # same deadline 7.0
    assert key(pm, early) < key(pm, late), "same arrival: id order"  # type: ignore[operator]
    if name != "fcfs":
        # same deadline and work, later arrival: served after
        assert key(pm, early) < key(pm, later)  # type: ignore[operator]


@pytest.mark.parametrize("name", POLICIES)
def test_victim_is_one_of_the_candidates_and_deterministic(name: str) -> None:
    pm, plugins = wired(name)
    if not implements(plugins, "qlm_select_victim"):
        pytest.skip("not a victim policy")
    reqs = workload(2, 20)
    views = [
        RunningView(r, generated_tokens=i * 3, kv_tokens=r.prompt_tokens + i, admitted_at=float(i))
        for i, r in enumerate(reqs)
    ]
    victim = pm.hook.qlm_select_victim(candidates=views, instance_id="i0", now=50.0)
    assert victim in views
    assert pm.hook.qlm_select_victim(candidates=list(views), instance_id="i0", now=50.0) is victim
    assert pm.hook.qlm_select_victim(candidates=views[:1], instance_id="i0", now=50.0) is views[0]


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


# ---- the brain's other roles: every registered implementation, on a small simulated fleet


def wired_to_a_fleet(name: str, submitted: int = 40) -> tuple[pluggy.PluginManager, list[object], SimFleet]:
    """The policy's plugins with two simulated H100s, after ``submitted`` arrivals of the workload
    (where the policy takes arrivals: a queue manager)."""
    built = REGISTRY.get(name).factory(CTX)
    plugins = built if isinstance(built, list) else [built]
    fleet = SimFleet(
        [SimInstance(f"i{k}", "h100", dict(CTX.cost_models), initial_model="m") for k in range(2)]
    )
    backend = SimBackend(fleet)
    pm = get_plugin_manager(autoload=False)
    for n, plugin in enumerate([*plugins, backend]):
        pm.register(plugin, name=f"{name}:{n}")
    pm.hook.qlm_configure(pm=pm)
    backend.attach(pm)
    if implements(plugins, "qlm_submit"):
        for r in sorted(workload(3, submitted), key=lambda r: r.arrival_time):
            fleet.advance_to(r.arrival_time)
            pm.hook.qlm_submit(request=r, now=fleet.now)
    return pm, plugins, fleet


def role_policies(hook: str) -> list[str]:
    return [n for n in POLICIES if implements(wired(n)[1], hook)]


@pytest.mark.parametrize("name", role_policies("qlm_predict_output_length"))
def test_length_predictions_are_distributions_within_the_room_left(name: str) -> None:
    pm, plugins, _ = wired_to_a_fleet(name)
    assert any(isinstance(p, LengthPredictorRole) for p in plugins)
    for r in workload(4, 20):
        for generated in (0, 7, r.max_tokens - 1):
            d = pm.hook.qlm_predict_output_length(request=r, generated_tokens=generated)
            room = r.max_tokens - generated
            assert 0 <= d.mean <= room
            qs = [d.quantile(p) for p in (0.5, 0.9, 0.99)]
            assert all(0 <= q <= room for q in qs) and qs == sorted(qs)
            assert d == pm.hook.qlm_predict_output_length(request=r, generated_tokens=generated)


@pytest.mark.parametrize("name", role_policies("qlm_estimate_wait"))
def test_wait_estimates_are_distributions_and_probabilities(name: str) -> None:
    pm, plugins, fleet = wired_to_a_fleet(name)
    assert any(isinstance(p, WaitEstimatorRole) for p in plugins)
    for r in workload(5, 20):
        est = pm.hook.qlm_estimate_wait(request=r, now=fleet.now)
        assert isinstance(est, WaitEstimate)
        assert 0.0 <= est.p_meet <= 1.0
        assert 0.0 <= est.wait_mean_s <= est.completion_mean_s
        assert est.wait_std_s >= 0 and est.completion_std_s >= 0
    other = make_request("unknown", "no-such-model", 10, 10, fleet.now)
    assert pm.hook.qlm_estimate_wait(request=other, now=fleet.now) is None


@pytest.mark.parametrize("name", role_policies("qlm_admit"))
def test_admission_answers_for_the_request_and_gives_its_reasons(name: str) -> None:
    pm, plugins, _ = wired_to_a_fleet(name, submitted=0)
    assert any(isinstance(p, AdmissionRole) for p in plugins)
    for p_meet in (0.0, 0.01, 0.5, 1.0):
        r = make_request(f"a{p_meet}", "m", 10, 10, 0.0, ttft_s=1.0)
        est = WaitEstimate("i0", 0.5, 0.1, 0.6, 0.1, p_meet)
        verdict = pm.hook.qlm_admit(request=r, estimate=est, now=0.0)
        assert verdict.request_id == r.id
        assert verdict.accepted or verdict.reason, "a refusal says why"
        assert verdict.can_meet_slo or verdict.reason, "a flag says why"
        assert verdict == pm.hook.qlm_admit(request=r, estimate=est, now=0.0)


@pytest.mark.parametrize("name", role_policies("qlm_plan"))
def test_plans_place_work_and_load_models_only_where_possible(name: str) -> None:
    pm, plugins, fleet = wired_to_a_fleet(name, submitted=60)
    assert any(isinstance(p, PlannerRole) for p in plugins)
    states = [pm.hook.qlm_instance_state(instance_id=i, detail=False) for i in ("i0", "i1")]
    plan = pm.hook.qlm_plan(queue=[], instances=states[:1], now=fleet.now)
    assert isinstance(plan, Plan) and plan.solver not in ("", "none"), "a plan names its solver"
    assert set(plan.groups) | set(plan.queues) <= {"i0"}
    assert all(
        a.instance_id == "i0" and a.model in CTX.cost_models for a in plan.actions if isinstance(a, LoadModel)
    )
    assert plan.objective <= sum(r.weight for r in workload(3, 60)) + 1e-9


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

    _, plugins, fleet = wired_to_a_fleet("qlm", submitted=5)
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
