"""The simulated engine: cost-model fidelity, chunked prefill, KV pressure, preemption, model swaps."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from qlm_plugin.adapters.sim import SimBackend, SimFleet, SimInstance
from qlm_plugin.adapters.sim.engine import ORDERED_IDLE_HOLD_S
from qlm_plugin.domain.costmodel import CostModel, cost_model
from qlm_plugin.domain.instance import EvictMode
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import DEFAULT_CLASSES, Request, make_request
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.baselines import FCFS, StaticPriority
from qlm_plugin.tools.costcheck import cost_check

H100_8B = cost_model("llama-3.1-8b", "h100")


def run(
    requests: list[Request],
    costs: dict[str, CostModel] | None = None,
    *,
    instances: int = 1,
    policy: object | None = None,
    initial_model: str = "m",
    **kw: object,
) -> tuple[dict[str, RequestOutcome], list[SimInstance]]:
    costs = costs or {"m": H100_8B}
    insts = [SimInstance(f"i{i}", "h100", costs, initial_model=initial_model, **kw) for i in range(instances)]  # type: ignore[arg-type]
    fleet = SimFleet(insts)
    backend = SimBackend(fleet)
    pm = get_plugin_manager(autoload=False)
    pm.register(policy or FCFS())
    pm.register(backend)
    backend.attach(pm)
    rr = iter(range(10**9))
    fleet.run(requests, lambda r: pm.hook.qlm_dispatch(instance_id=f"i{next(rr) % instances}", request=r))
    return backend.outcomes, insts


def req(i: int, prompt: int, out: int, t: float = 0.0, model: str = "m", priority: int = 0) -> Request:
    return make_request(f"r{i}", model, prompt, out, t, e2e_s=1e6, priority=priority, true_output_tokens=out)


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_decode_time_per_token_matches_the_cost_model(batch: int) -> None:
    (row,) = cost_check("llama-3.1-8b", "h100", [batch])
    assert row["rel_error"] < 1e-9
    assert row["tpot_model_ms"] == pytest.approx((5753 + 6.0 * batch) / 1000)


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    outcomes, _ = run([req(0, 20000, 2)])
    b0, b1 = H100_8B.b0_us, H100_8B.b1_us
    expected_ttft = (2 * (b0 + b1 * 8192) + (b0 + b1 * (20000 - 2 * 8192))) * 1e-6
    assert outcomes["r0"].first_token_time == pytest.approx(expected_ttft, rel=1e-9)


def test_an_arrival_during_a_long_decode_joins_at_the_next_step() -> None:
    # r0 decodes 5000 tokens as one macro step; r1 arrives in the middle and must not wait for it.
    outcomes, _ = run([req(0, 16, 5000), req(1, 16, 4, t=3.0)])
    step = H100_8B.step_s(0, 1)
    ttft = outcomes["r1"].first_token_time - 3.0  # type: ignore[operator]
    assert ttft <= step + H100_8B.step_s(16, 1) + 1e-9
    assert outcomes["r0"].finish_time > outcomes["r1"].finish_time  # type: ignore[operator]


def _random_workload(seed: int, n: int = 250) -> list[Request]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(20.0)
        out.append(req(i, rng.randint(1, 3000), rng.randint(1, 600), t, priority=rng.randint(0, 2)))
    return out


@pytest.mark.parametrize("mode", [EvictMode.RECOMPUTE, EvictMode.SWAP])
@pytest.mark.parametrize("policy", [FCFS, StaticPriority])
def test_macro_steps_give_the_same_results_as_single_steps(mode: EvictMode, policy: type) -> None:
    # Small KV and seat limits force preemptions, partial prefills and blocked admissions.
    tight = {"m": replace(H100_8B, kv_blocks=600, max_num_seqs=24, max_num_batched_tokens=2048)}
    fast, insts_fast = run(_random_workload(7), tight, instances=2, policy=policy(), preemption_mode=mode)
    slow, insts_slow = run(
        _random_workload(7), tight, instances=2, policy=policy(), preemption_mode=mode, max_macro_steps=1
    )
    assert sum(i.counters["preemptions"] for i in insts_slow) > 0, "the workload must exercise preemption"
    assert sum(i.counters["steps"] for i in insts_fast) == sum(i.counters["steps"] for i in insts_slow)
    for rid, o in slow.items():
        f = fast[rid]
        assert f.status is o.status is Status.FINISHED
        assert f.first_token_time == pytest.approx(o.first_token_time, abs=1e-6)
        assert f.finish_time == pytest.approx(o.finish_time, abs=1e-6)
        assert (f.preemptions, f.wasted_tokens, f.output_tokens) == (
            o.preemptions,
            o.wasted_tokens,
            o.output_tokens,
        )


def test_kv_exhaustion_preempts_by_recompute_and_every_request_completes() -> None:
    tight = {"m": replace(H100_8B, kv_blocks=300)}
    outcomes, (inst,) = run([req(i, 500, 400) for i in range(20)], tight)
    assert inst.counters["preemptions"] > 0
    assert inst.counters["wasted_tokens"] > 0
    assert all(o.status is Status.FINISHED and o.output_tokens == 400 for o in outcomes.values())
    assert inst.kv_used == 0 and inst.queued_tokens() == 0, "KV blocks and queued tokens all given back"


def test_swap_preemption_wastes_no_work_and_costs_a_host_copy() -> None:
    tight = {"m": replace(H100_8B, kv_blocks=300)}
    work = [req(i, 500, 400) for i in range(20)]
    recompute, _ = run(work, tight)
    swap, (inst,) = run(work, tight, preemption_mode=EvictMode.SWAP)
    assert inst.counters["swaps_out"] > 0 and inst.counters["swaps_in"] == inst.counters["swaps_out"]
    assert sum(o.wasted_tokens for o in swap.values()) < sum(o.wasted_tokens for o in recompute.values())
    assert all(o.status is Status.FINISHED for o in swap.values())
    assert inst.kv_used == 0


def test_priority_policy_preempts_the_lowest_priority_request() -> None:
    tight = {"m": replace(H100_8B, kv_blocks=120)}
    work = [req(0, 800, 300, priority=5), req(1, 800, 300, t=0.001, priority=0)]
    outcomes, _ = run(work, tight, policy=StaticPriority())
    assert outcomes["r0"].preemptions >= 1
    assert outcomes["r1"].preemptions == 0


def test_batch_never_exceeds_max_num_seqs() -> None:
    outcomes, (inst,) = run([req(i, 10, 50) for i in range(40)], max_num_seqs=8)
    assert inst.max_batch_seen == 8
    assert len(outcomes) == 40


def test_model_swap_pays_the_cold_load_then_the_warm_one() -> None:
    costs = {"a": cost_model("llama-3.1-8b", "h100"), "b": cost_model("phi-4", "h100")}
    work = [req(0, 10, 5, model="b"), req(1, 10, 5, t=200.0, model="a")]
    outcomes, (inst,) = run(work, costs, initial_model="a")
    cold_b = costs["b"].load_s(warm=False)
    warm_a = costs["a"].load_s(warm=True)
    assert outcomes["r0"].first_token_time == pytest.approx(cold_b + costs["b"].step_s(10, 0), rel=1e-6)
    assert outcomes["r1"].first_token_time == pytest.approx(
        200.0 + warm_a + costs["a"].step_s(10, 0), rel=1e-6
    )
    assert warm_a * 10 < cold_b
    assert inst.counters["model_loads_cold"] == 1 and inst.counters["model_loads_warm"] == 1
    assert inst.model == "a" and "b" in inst.warm


def test_host_memory_budget_limits_warm_models() -> None:
    costs = {"a": cost_model("llama-3.1-8b", "h100"), "b": cost_model("phi-4", "h100")}
    work = [req(0, 10, 5, model="b"), req(1, 10, 5, t=200.0, model="a"), req(2, 10, 5, t=400.0, model="b")]
    _, (inst,) = run(work, costs, initial_model="a", host_mem_gb=20.0)
    assert inst.counters["model_loads_cold"] == 2, "phi-4 (29 GB) does not fit 20 GB of host memory"
    assert inst.counters["model_loads_warm"] == 1, "llama-3.1-8b (16 GB) does"
    assert inst.model == "b" and list(inst.warm) == ["a"]


def test_requests_for_a_model_the_instance_cannot_serve_are_refused() -> None:
    inst = SimInstance("i0", "h100", {"m": H100_8B}, initial_model="m")
    SimFleet([inst])
    assert inst.dispatch(req(0, 10, 5, model="other"), RequestOutcome(req(0, 10, 5, model="other"))) is False


def test_macro_steps_match_single_steps_with_model_swaps() -> None:
    costs = {
        "a": replace(H100_8B, kv_blocks=800, max_num_seqs=16),
        "b": replace(cost_model("phi-4", "h100"), kv_blocks=800, max_num_seqs=16),
    }
    rng = random.Random(3)
    work, t = [], 0.0
    for i in range(200):
        t += rng.expovariate(5.0)
        work.append(req(i, rng.randint(1, 2000), rng.randint(1, 300), t, model=rng.choice("ab")))
    fast, insts_fast = run(work, costs, instances=2, initial_model="a", max_model_residency_s=3.0)
    slow, _ = run(work, costs, instances=2, initial_model="a", max_model_residency_s=3.0, max_macro_steps=1)
    assert sum(i.counters["model_loads_warm"] + i.counters["model_loads_cold"] for i in insts_fast) > 2
    for rid, o in slow.items():
        assert fast[rid].status is o.status is Status.FINISHED
        assert fast[rid].first_token_time == pytest.approx(o.first_token_time, abs=1e-6)
        assert fast[rid].finish_time == pytest.approx(o.finish_time, abs=1e-6)


def test_macro_steps_match_single_steps_under_state_driven_routing() -> None:
    # The default router reads instance state between events; mid-macro-step reports must show the
    # decode progress a step-by-step engine would, or placements (and everything after) diverge.
    import qlm_plugin.tools.simulate as sim
    from qlm_plugin.workloads.scenario import load_scenario

    scenario = load_scenario(None)
    scenario = scenario.model_copy(
        update={"workload": scenario.workload.model_copy(update={"rate_scale": 40.0})}
    )
    requests, rejected = sim.build_requests(scenario)
    fast = {o.request.id: o for o in sim.run_policy(scenario, "fcfs", requests, rejected).outcomes}
    slow = sim.run_policy(scenario, "fcfs", requests, rejected, macro_steps=False).outcomes
    assert len(slow) == len(fast) == len(requests)
    for o in slow:
        f = fast[o.request.id]
        assert f.instance_id == o.instance_id
        assert f.first_token_time == pytest.approx(o.first_token_time, abs=1e-6)
        assert f.finish_time == pytest.approx(o.finish_time, abs=1e-6)


def test_warm_model_start_stages_weights_in_host_memory_before_the_swap() -> None:
    costs = {"a": cost_model("llama-3.1-8b", "h100"), "b": cost_model("phi-4", "h100")}
    inst = SimInstance("i0", "h100", costs, initial_model="a")
    fleet = SimFleet([inst])
    staged = inst.load_model("b", target="host")
    assert not staged.warm and staged.ready_at == pytest.approx(29.3 / 2.0)
    assert "b" not in inst.state(0.0, False).models_warm, "not warm until the copy is done"
    fleet.advance_to(staged.ready_at + 1)
    assert "b" in inst.state(fleet.now, False).models_warm
    assert inst.state(fleet.now, False).models_loaded == ("a",), "staging does not take the GPU"
    swap = inst.load_model("b", target="gpu")
    assert swap.warm and swap.ready_at - fleet.now == pytest.approx(costs["b"].load_s(warm=True))
    fleet.advance_to(swap.ready_at + 1)
    assert (
        inst.model == "b"
        and inst.counters["model_loads_warm"] == 1
        and inst.counters["model_loads_cold"] == 0
    )


def test_swapped_in_requests_are_counted_once_against_max_num_seqs() -> None:
    tight = {"m": replace(H100_8B, kv_blocks=150, max_num_seqs=6)}
    outcomes, (inst,) = run(
        [req(i, 300, 300, t=i * 0.01) for i in range(30)], tight, preemption_mode=EvictMode.SWAP
    )
    assert inst.counters["swaps_in"] > 0
    assert inst.max_batch_seen == 6
    assert all(o.status is Status.FINISHED for o in outcomes.values())


def test_a_request_swapped_in_ahead_of_order_can_be_evicted_again() -> None:
    # Swap out, swap in ahead of the policy order (the engine's promotion deque), run, swap out
    # again: the request finishes once, with no recompute.
    inst = SimInstance("i0", "h100", {"m": H100_8B}, initial_model="m", max_num_seqs=1)
    fleet = SimFleet([inst])
    backend = SimBackend(fleet)
    pm = get_plugin_manager(autoload=False)
    pm.register(StaticPriority())
    pm.register(backend)
    backend.attach(pm)
    low, high = req(0, 100, 2000, priority=0), req(1, 100, 50, t=1.0, priority=-1)
    for t, r in ((0.0, low), (1.0, high)):
        fleet.advance_to(t)
        assert pm.hook.qlm_dispatch(instance_id="i0", request=r)
    fleet.advance_to(2.0)
    assert (
        pm.hook.qlm_evict(instance_id="i0", request_id="r0", mode=EvictMode.SWAP, for_request_id=None).mode
        is EvictMode.SWAP
    )
    fleet.advance_to(2.1)
    assert inst.state(fleet.now, True).swapped_ids == ("r0",) and inst.state(fleet.now, True).running_ids == (
        "r1",
    )
    assert inst.swap_in("r0") is True
    fleet.advance_to(4.0)
    assert backend.outcomes["r1"].status is Status.FINISHED
    assert inst.state(fleet.now, True).running_ids == ("r0",)
    pm.hook.qlm_evict(instance_id="i0", request_id="r0", mode=EvictMode.SWAP, for_request_id=None)
    fleet.advance_to(100.0)
    done = backend.outcomes["r0"]
    assert done.status is Status.FINISHED and done.preemptions == 2 and done.wasted_tokens == 0
    assert inst.kv_used == 0 and inst.counters["swaps_in"] == inst.counters["swaps_out"] == 2


def test_state_counts_the_urgent_requests_waiting_in_the_engine() -> None:
    inst = SimInstance("i0", "h100", {"m": H100_8B}, initial_model="m", max_num_seqs=1)
    fleet = SimFleet([inst])
    batch = DEFAULT_CLASSES["batch"]
    work = [
        make_request("b0", "m", 100, 500, 0.0, slo_class=batch, true_output_tokens=500),
        make_request("b1", "m", 100, 500, 0.0, slo_class=batch, true_output_tokens=500),
        make_request("i0", "m", 100, 5, 0.0, ttft_s=1.0, true_output_tokens=5),
        make_request("i1", "m", 100, 5, 0.0, ttft_s=1.0, true_output_tokens=5),
    ]
    for r in work:
        inst.dispatch(r, RequestOutcome(r))
    fleet.advance_to(0.05)
    s = inst.state(fleet.now, detail=True)
    urgent = {"i0", "i1"}
    assert s.num_waiting == 3 and s.num_waiting_urgent == len(urgent & set(s.waiting_ids)) == 2


def test_an_ordered_swap_is_not_undone_by_the_engines_own_rule_nor_strands_the_other_models_work() -> None:
    # A queue manager swaps the engine to b while a request of a still waits there (one the engine
    # preempted, or handed over before the order). The engine's own rule (swap to the most urgent
    # waiting model) would swap back as soon as b is loaded, before the queue manager hands it b's
    # work: the order holds. But not for the whole max_model_residency_s while b has no work: the
    # request of a waited five minutes on an idle engine (found by review, in qlm serve).
    costs = {"a": cost_model("llama-3.1-8b", "h100"), "b": cost_model("phi-4", "h100")}
    inst = SimInstance(
        "i0", "h100", costs, initial_model="a", warm_models=("b",), max_model_residency_s=600.0
    )
    fleet = SimFleet([inst])
    swap = inst.load_model("b", target="gpu")
    left = req(0, 10, 5, model="a")
    out = RequestOutcome(left)
    inst.on_finished = lambda o: None
    assert inst.dispatch(left, out)
    fleet.advance_to(swap.ready_at + 20.0)
    assert inst.model == "b" and out.status is Status.UNFINISHED, "the ordered model keeps the GPU"
    fleet.advance_to(swap.ready_at + ORDERED_IDLE_HOLD_S + costs["a"].load_s(warm=True) + 1.0)
    assert inst.model == "a" and out.status is Status.FINISHED, "not stranded behind an idle model"
