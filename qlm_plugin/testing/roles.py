"""Conformance suite for the brain's roles (``qlm_plugin.brain.contracts``): a policy, built-in or a
user's, checked against the contract of each role it fills, through the hooks only.

Use it from a policy's tests::

    import pytest
    from qlm_plugin.testing.roles import RoleConformance

    class TestMyPolicy(RoleConformance):
        @pytest.fixture
        def factory(self):
            return lambda ctx: MyPolicy()  # a PolicyFactory: one plugin object, or a list of them

The factory is what ``registry.add(name, factory, ...)`` takes in ``qlm_add_policies``; an
entry-point plugin whose policy hooks apply to every run passes ``lambda ctx: plugin``. Each test
checks one role and is skipped when the policy does not fill it (it must fill one at least). The
policy runs on a small fleet of two simulated H100s serving model ``m`` (``context`` fixture: its
cost model; override it for a policy that needs other models).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterator

import pluggy
import pytest

from qlm_plugin.adapters.sim import SimBackend, SimFleet, SimInstance
from qlm_plugin.brain.contracts import (
    AdmissionRole,
    LengthPredictorRole,
    OrderingPolicy,
    PlannerRole,
    VictimPolicy,
    WaitEstimatorRole,
)
from qlm_plugin.domain.costmodel import cost_model
from qlm_plugin.domain.distributions import WaitEstimate
from qlm_plugin.domain.instance import RunningView
from qlm_plugin.domain.plan import LoadModel, Plan
from qlm_plugin.domain.request import DEFAULT_CLASSES, Request, make_request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.registry import PolicyContext, PolicyFactory

#: The hooks that fill a role (one at least per policy).
ROLE_HOOKS = (
    "qlm_rank_key",
    "qlm_select_victim",
    "qlm_choose_instance",
    "qlm_submit",
    "qlm_predict_output_length",
    "qlm_estimate_wait",
    "qlm_admit",
    "qlm_plan",
)


def workload(seed: int, n: int = 60, model: str = "m") -> list[Request]:
    """Interactive and batch requests of varied prompts, priorities and true lengths, over 100 s."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cls = DEFAULT_CLASSES[rng.choice(["interactive", "batch"])]
        out.append(
            make_request(
                f"r{i}",
                model,
                rng.randint(1, 4000),
                2048,
                rng.uniform(0, 100),
                slo_class=cls,
                priority=rng.randint(0, 3),
                true_output_tokens=rng.randint(1, 2000),
            )
        )
    return out


class Wired:
    """A policy's plugins in a plugin manager of their own (no installed plugins), configured as a run
    configures them, with two simulated instances behind a :class:`SimBackend`."""

    def __init__(self, factory: PolicyFactory, ctx: PolicyContext) -> None:
        built = factory(ctx)
        self.plugins: list[object] = built if isinstance(built, list) else [built]
        model = next(iter(ctx.cost_models))
        self.model = model
        self.fleet = SimFleet(
            [SimInstance(f"i{k}", "h100", dict(ctx.cost_models), initial_model=model) for k in range(2)]
        )
        backend = SimBackend(self.fleet)
        self.pm: pluggy.PluginManager = get_plugin_manager(autoload=False)
        for n, plugin in enumerate([*self.plugins, backend]):
            self.pm.register(plugin, name=f"policy-under-test:{n}")
        self.pm.hook.qlm_configure(pm=self.pm)
        backend.attach(self.pm)

    def fills(self, hook: str) -> bool:
        return any(hasattr(p, hook) for p in self.plugins)

    def submit(self, requests: list[Request]) -> None:
        """The requests arrive, in order (for a policy that takes arrivals: a queue manager)."""
        if self.fills("qlm_submit"):
            for r in sorted(requests, key=lambda r: r.arrival_time):
                self.fleet.advance_to(r.arrival_time)
                self.pm.hook.qlm_submit(request=r, now=self.fleet.now)

    def key(self, r: Request, now: float = 0.0) -> Hashable:
        return self.pm.hook.qlm_rank_key(request=r, instance_id="i0", now=now)  # type: ignore[no-any-return]


class RoleConformance:
    """The contract of each role a policy fills (``qlm_plugin.brain.contracts``). Subclass it and
    give the ``factory`` fixture."""

    @pytest.fixture
    def factory(self) -> PolicyFactory:
        raise NotImplementedError("give a `factory` fixture: the policy's PolicyFactory")

    @pytest.fixture
    def context(self) -> PolicyContext:
        return PolicyContext({"m": cost_model("llama-3.1-8b", "h100")})

    @pytest.fixture
    def wired(self, factory: PolicyFactory, context: PolicyContext) -> Iterator[Wired]:
        yield Wired(factory, context)

    @staticmethod
    def _needs(wired: Wired, hook: str) -> None:
        if not wired.fills(hook):
            pytest.skip(f"the policy does not implement {hook}")

    # ------------------------------------------------------------------ every policy
    def test_fills_at_least_one_role_and_its_protocol(self, wired: Wired) -> None:
        assert any(wired.fills(h) for h in ROLE_HOOKS), f"implements none of {', '.join(ROLE_HOOKS)}"
        protocols = {
            "qlm_rank_key": OrderingPolicy,
            "qlm_select_victim": VictimPolicy,
            "qlm_estimate_wait": WaitEstimatorRole,
            "qlm_admit": AdmissionRole,
            "qlm_plan": PlannerRole,
        }
        for p in wired.plugins:
            for hook, protocol in protocols.items():
                if hasattr(p, hook):
                    assert isinstance(p, protocol), (
                        f"{p!r} has {hook} but not the {protocol.__name__} protocol"
                    )

    # ------------------------------------------------------------------ ordering
    def test_ordering_keys_are_total_deterministic_and_do_not_drift(self, wired: Wired) -> None:
        self._needs(wired, "qlm_rank_key")
        reqs = workload(1, model=wired.model)
        keys = [wired.key(r) for r in reqs]
        sorted(keys)  # type: ignore[type-var]  # totally ordered: raises TypeError otherwise
        assert keys == [wired.key(r) for r in reqs], "same request, same key"
        assert keys == [wired.key(r, now=12345.0) for r in reqs], "keys must not depend on now"
        assert len(set(keys)) == len(keys), "ties are broken (by arrival, then id)"

    def test_equal_standing_is_served_first_come_first_served(self, wired: Wired) -> None:
        self._needs(wired, "qlm_rank_key")
        first = make_request("x1", wired.model, 100, 100, 5.0, ttft_s=2.0, true_output_tokens=50)
        same_time = make_request("x2", wired.model, 100, 100, 5.0, ttft_s=2.0, true_output_tokens=50)
        later = make_request("x0", wired.model, 100, 100, 6.0, ttft_s=2.0, true_output_tokens=50)
        assert wired.key(first) != wired.key(same_time), "two requests of the same moment: a tie broken"
        assert wired.key(first) < wired.key(later), "the same request arriving later is served after"  # type: ignore[operator]

    # ------------------------------------------------------------------ victims
    def test_victim_is_one_of_the_candidates_and_deterministic(self, wired: Wired) -> None:
        self._needs(wired, "qlm_select_victim")
        views = [
            RunningView(r, generated_tokens=i * 3, kv_tokens=r.prompt_tokens + i, admitted_at=float(i))
            for i, r in enumerate(workload(2, 20, wired.model))
        ]
        victim = wired.pm.hook.qlm_select_victim(candidates=views, instance_id="i0", now=50.0)
        assert any(victim is v for v in views)
        assert wired.pm.hook.qlm_select_victim(candidates=list(views), instance_id="i0", now=50.0) is victim
        assert wired.pm.hook.qlm_select_victim(candidates=views[:1], instance_id="i0", now=50.0) is views[0]

    # ------------------------------------------------------------------ the brain's other roles
    def test_length_predictions_are_distributions_within_the_room_left(self, wired: Wired) -> None:
        self._needs(wired, "qlm_predict_output_length")
        assert any(
            isinstance(p, LengthPredictorRole)
            for p in wired.plugins
            if hasattr(p, "qlm_predict_output_length")
        )
        wired.submit(workload(3, 40, wired.model))
        for r in workload(4, 20, wired.model):
            for generated in (0, 7, r.max_tokens - 1):
                d = wired.pm.hook.qlm_predict_output_length(request=r, generated_tokens=generated)
                room = r.max_tokens - generated
                assert 0 <= d.mean <= room
                qs = [d.quantile(p) for p in (0.5, 0.9, 0.99)]
                assert all(0 <= q <= room for q in qs) and qs == sorted(qs)
                assert d == wired.pm.hook.qlm_predict_output_length(request=r, generated_tokens=generated)

    def test_wait_estimates_are_distributions_and_probabilities(self, wired: Wired) -> None:
        self._needs(wired, "qlm_estimate_wait")
        wired.submit(workload(3, 40, wired.model))
        now = wired.fleet.now
        for r in workload(5, 20, wired.model):
            est = wired.pm.hook.qlm_estimate_wait(request=r, now=now)
            assert isinstance(est, WaitEstimate)
            assert 0.0 <= est.p_meet <= 1.0
            assert 0.0 <= est.wait_mean_s <= est.completion_mean_s
            assert est.wait_std_s >= 0 and est.completion_std_s >= 0
        other = make_request("unknown", "no-such-model", 10, 10, now)
        assert wired.pm.hook.qlm_estimate_wait(request=other, now=now) is None

    def test_admission_answers_for_the_request_and_gives_its_reasons(self, wired: Wired) -> None:
        self._needs(wired, "qlm_admit")
        for p_meet in (0.0, 0.01, 0.5, 1.0):
            r = make_request(f"a{p_meet}", wired.model, 10, 10, 0.0, ttft_s=1.0)
            est = WaitEstimate("i0", 0.5, 0.1, 0.6, 0.1, p_meet)
            verdict = wired.pm.hook.qlm_admit(request=r, estimate=est, now=0.0)
            assert verdict.request_id == r.id
            assert verdict.accepted or verdict.reason, "a refusal says why"
            assert verdict.can_meet_slo or verdict.reason, "a flag says why"
            assert verdict == wired.pm.hook.qlm_admit(request=r, estimate=est, now=0.0)

    def test_plans_place_work_and_load_models_only_where_possible(
        self, wired: Wired, context: PolicyContext
    ) -> None:
        self._needs(wired, "qlm_plan")
        arrivals = workload(3, 60, wired.model)
        wired.submit(arrivals)
        states = [wired.pm.hook.qlm_instance_state(instance_id=i, detail=False) for i in ("i0", "i1")]
        plan = wired.pm.hook.qlm_plan(queue=arrivals, instances=states[:1], now=wired.fleet.now)
        if plan is None:
            return  # "keep the current plan": allowed
        assert isinstance(plan, Plan) and plan.solver not in ("", "none"), "a plan names its solver"
        assert set(plan.groups) | set(plan.queues) <= {"i0"}, "work placed only on the instances given"
        assert all(
            a.instance_id == "i0" and a.model in context.cost_models
            for a in plan.actions
            if isinstance(a, LoadModel)
        )
        assert plan.objective <= sum(r.weight for r in arrivals) + 1e-9
