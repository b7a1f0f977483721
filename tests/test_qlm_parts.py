"""The parts of QLM's brain one by one: ablations that build and run, a plan that is obeyed, the
step budget of a pull, the engine-local swap rule that strands no request, and admission that
refuses below a class's P(meet)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from qlm_plugin.brain.admission import AdmissionControl, retry_after_s
from qlm_plugin.brain.dispatch import EARLY_BIND_MAX_WAITING, Dispatcher
from qlm_plugin.brain.estimator import WaitEstimator
from qlm_plugin.brain.fleet_view import FleetView
from qlm_plugin.brain.global_queue import GlobalQueue
from qlm_plugin.domain.costmodel import gpu_speed
from qlm_plugin.domain.distributions import LengthDistribution, WaitEstimate
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.outcome import Status
from qlm_plugin.domain.request import SLO, Request, SLOClass
from qlm_plugin.hooks import get_plugin_manager
from qlm_plugin.policies.qlm import PARTS, build_qlm
from qlm_plugin.policies.registry import PolicyContext, policy_registry
from qlm_plugin.tools.simulate import build_requests, run_policy
from qlm_plugin.workloads.scenario import load_scenario, parse_scenario

MODEL = "llama-3.1-8b"


def state(iid: str = "i0", model: str = MODEL, **kw: Any) -> InstanceState:
    base = dict(
        instance_id=iid,
        backend="test",
        now=0.0,
        models_loaded=(model,),
        models_warm=(),
        loading_model=None,
        num_running=0,
        num_waiting=0,
        num_swapped=0,
        queued_tokens=0,
        kv_blocks_used=0,
        kv_blocks_total=100_000,
        max_num_seqs=64,
    )
    return InstanceState(**{**base, **kw})  # type: ignore[arg-type]


class Engines:
    """The backend side of the hooks the dispatcher calls: records what each engine was handed."""

    def __init__(self) -> None:
        self.handed: dict[str, list[str]] = {}

    def qlm_dispatch(self, instance_id: str, request: Request) -> bool:
        self.handed.setdefault(instance_id, []).append(request.id)
        return True


def dispatcher(
    *states: InstanceState, gpus: dict[str, str] | None = None
) -> tuple[Dispatcher, GlobalQueue, FleetView, Engines]:
    costs = load_scenario(None).reference_cost_models()
    queue = GlobalQueue(costs)
    fleet = FleetView(costs, lambda view, st: None)
    estimator = WaitEstimator(costs, queue, fleet, lambda r, g: LengthDistribution.point(64))
    d = Dispatcher(queue, fleet, estimator, {"pulls": 0, "steals": 0, "stranded_pulls": 0})
    engines = Engines()
    d.hook = engines
    for s in states:
        fleet.add(s.instance_id, (gpus or {}).get(s.instance_id)).state = s
    return d, queue, fleet, engines


def queued(d: Dispatcher, queue: GlobalQueue, rid: str, deadline: float, model: str = MODEL) -> None:
    r = Request(rid, model, 100, 64, 0.0, SLO(None, deadline), slo_class="batch")
    e = queue.entries[rid] = queue.entry(r, LengthDistribution.point(64))
    d.enqueue(e)


# ------------------------------------------------------------------------------------ ablations


def test_every_ablation_is_registered_hidden_from_listings_and_runs() -> None:
    registry = policy_registry(get_plugin_manager(autoload=False))
    assert not any(n.startswith("qlm-no-") for n in registry.names())
    assert {f"qlm-no-{p}" for p in PARTS} <= set(registry.names(ablations=True))
    assert "edf-shed" in registry.names()
    scenario = load_scenario(None)
    scenario = scenario.model_copy(
        update={"workload": scenario.workload.model_copy(update={"max_requests": 150})}
    )
    requests, rejected = build_requests(scenario)
    for part in PARTS:
        result = run_policy(scenario, f"qlm-no-{part}", requests, rejected, autoload=False)
        assert len(result.outcomes) == len(requests), part
        assert result.overall.slo_attainment > 0.5, part


def test_an_unknown_part_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"unknown QLM parts.*'nonsense'"):
        build_qlm(PolicyContext(), without=["nonsense"])


# ------------------------------------------------------------------------------------ the plan


def test_pulls_follow_the_plan_order_and_new_requests_by_urgency() -> None:
    d, queue, _, engines = dispatcher(state())
    for rid, deadline in (("a", 100.0), ("b", 200.0), ("c", 300.0)):
        queued(d, queue, rid, deadline)
    d.follow({"i0": ["c", "a", "b"]})  # not urgency order: the plan's is obeyed
    # Requests the plan has not seen merge in by urgency: before the plan's head when more urgent
    # than it, after the plan's requests when less urgent than all of them.
    queued(d, queue, "urgent", 50.0)
    queued(d, queue, "relaxed", 400.0)
    view = d.fleet.instances["i0"]
    d.pull(view, 5, 0.0)
    assert engines.handed["i0"] == ["urgent", "c", "a", "b", "relaxed"]


def test_another_instances_plan_is_left_to_it_unless_it_cannot_start_it() -> None:
    d, queue, fleet, engines = dispatcher(state("i0"), state("i1"))
    queued(d, queue, "x", 100.0)
    d.follow({"i1": ["x"]})
    d.pull(fleet.instances["i0"], 4, 0.0)
    assert "i0" not in engines.handed, "i1 can start it: it is i1's"
    fleet.instances["i1"].state = state("i1", num_running=64)  # i1 full: i0 balances the load
    d.pull(fleet.instances["i0"], 4, 0.0)
    assert engines.handed["i0"] == ["x"]


def test_a_pull_hands_over_only_what_the_next_step_can_prefill() -> None:
    s = state(max_num_batched_tokens=250, prefill_tokens_pending=0)
    assert s.prefill_room == 250 and state().prefill_room is None
    d, queue, fleet, engines = dispatcher(s)
    for i in range(5):
        queued(d, queue, f"r{i}", 100.0 + i)  # 100-token prompts
    d.pull(fleet.instances["i0"], 5, 0.0)
    assert engines.handed["i0"] == ["r0", "r1", "r2"], "250 tokens of room: three prompts start"
    d.pull(fleet.instances["i0"], 5, 0.0)
    assert len(engines.handed["i0"]) == 3, "the cached state counts what was handed over"


def test_an_arrival_also_binds_the_request_left_waiting_even_while_some_are_late() -> None:
    d, queue, _, _ = dispatcher(state())

    def interactive(rid: str, arrival: float) -> None:
        r = Request(rid, MODEL, 100, 64, arrival, SLO(arrival + 1.0, None), slo_class="interactive")
        d.enqueue(queue.entries.setdefault(rid, queue.entry(r, LengthDistribution.point(64))))

    interactive("left", 0.0)  # found every engine queue long: it waits in the global queue
    interactive("arrival", 0.3)
    waiting = d.left_waiting(MODEL, 0.3)
    assert waiting is not None and waiting.request.id == "left", "most urgent, 0.7 s of 1 s left"
    waiting = d.left_waiting(MODEL, 0.6)
    assert waiting is not None and waiting.request.id == "arrival", "under half its budget left: next"
    queue.queue(MODEL).make_late(queue.entries["left"])
    waiting = d.left_waiting(MODEL, 0.6)
    assert waiting is not None and waiting.request.id == "arrival", "a late request stops nothing"


def test_the_request_left_waiting_binds_one_place_past_the_engine_queues_limit() -> None:
    """An arrival binds early only to an engine queue with fewer than ``EARLY_BIND_MAX_WAITING``
    urgent requests; the older request bound beside it gets one place more (where the arrival took
    the last one, the more urgent request would otherwise be passed by every later arrival)."""
    full = state(num_waiting=EARLY_BIND_MAX_WAITING, num_waiting_urgent=EARLY_BIND_MAX_WAITING)
    d, queue, _, engines = dispatcher(full)
    engines.qlm_instance_state = lambda instance_id, detail: full  # type: ignore[attr-defined]
    r = Request("left", MODEL, 100, 64, 0.0, SLO(1.0, None), slo_class="interactive")
    e = queue.entries["left"] = queue.entry(r, LengthDistribution.point(64))
    d.enqueue(e)
    d.bind_early(e, 0.3)
    assert e.dispatched_at is None and "i0" not in engines.handed
    d.bind_early(e, 0.3, max_waiting=EARLY_BIND_MAX_WAITING + 1)
    assert e.dispatched_at == 0.3 and engines.handed["i0"] == ["left"] and "left" in d.bound_early


def test_a_looser_tier_bound_early_does_not_keep_a_tighter_one_out() -> None:
    """Three tiers of TTFT (0.5 s, 3 s, batch): the engine queue's places for urgent requests are
    taken by 3-s requests bound early. A 0.5-s request arriving after them binds all the same,
    since the engine ranks it ahead of them; another 3-s request does not. (A tier of 3-s requests
    bound early kept the 0.5-s tier out: 94% of its TTFTs met at 3.5x the load where EDF met 99.9%.)"""
    places = EARLY_BIND_MAX_WAITING
    full = state(num_running=64, num_waiting=places, num_waiting_urgent=places)
    d, queue, _, engines = dispatcher(full)
    engines.qlm_instance_state = lambda instance_id, detail: full  # type: ignore[attr-defined]

    def arrive(rid: str, at: float, ttft_s: float) -> Any:
        r = Request(rid, MODEL, 100, 64, at, SLO(at + ttft_s, None), slo_class="t")
        e = queue.entries[rid] = queue.entry(r, LengthDistribution.point(64))
        d.enqueue(e)
        return e

    for i in range(places):  # what filled the queue: 3-s requests bound early
        e = arrive(f"standard-{i}", 0.1 * i, 3.0)
        e.instance, e.dispatched_at = "i0", 0.1 * i
        d.bound_early[e.request.id] = e
    later = arrive("standard-late", 1.0, 3.0)
    d.bind_early(later, 1.0)
    assert later.dispatched_at is None
    premium = arrive("premium", 1.0, 0.5)
    d.bind_early(premium, 1.0)
    assert premium.dispatched_at == 1.0 and engines.handed["i0"] == ["premium"]


def urgent(d: Dispatcher, queue: GlobalQueue, rid: str, prompt: int, deadline: float) -> Any:
    r = Request(rid, MODEL, prompt, 16, 0.0, SLO(deadline, None), slo_class="interactive")
    e = queue.entries[rid] = queue.entry(r, LengthDistribution.point(16))
    d.enqueue(e)
    return e


@pytest.mark.parametrize("step_deadline", [True, False])
def test_a_pull_starts_no_prompt_that_would_push_a_first_token_past_its_deadline(step_deadline: bool) -> None:
    """Prompts that start in one step delay each other's first token: at 17 us a token, three
    8,000-token prompts take 0.42 s, two 0.29 s. Those that would make the step miss a TTFT of
    0.3 s wait for the next pull; a short batch prompt still fits beside them."""
    d, queue, fleet, engines = dispatcher(state())
    d.step_deadline = step_deadline
    for i in range(3):
        urgent(d, queue, f"u{i}", 8000, 0.3)
    queued(d, queue, "batch", 100.0)  # 100 tokens, no TTFT
    d.pull(fleet.instances["i0"], 8, 0.0)
    expected = ["u0", "u1", "batch"] if step_deadline else ["u0", "u1", "u2", "batch"]
    assert engines.handed["i0"] == expected


@pytest.mark.parametrize("step_deadline", [True, False])
def test_a_request_binds_early_only_where_its_first_token_can_come_in_time(step_deadline: bool) -> None:
    """Three urgent requests already wait in the engine's queue: with a 20,000-token prompt of its
    own size each, their step takes 1.4 s, past a 1 s TTFT. The request waits for a pull instead;
    in an empty queue it would make it (0.35 s) and binds."""
    busy = state(num_waiting=3, num_waiting_urgent=3)
    d, queue, _, engines = dispatcher(busy)
    d.step_deadline = step_deadline
    engines.qlm_instance_state = lambda instance_id, detail: busy  # type: ignore[attr-defined]
    e = urgent(d, queue, "long", 20_000, 1.0)
    d.bind_early(e, 0.0)
    assert (e.dispatched_at is None) is step_deadline
    if step_deadline:
        idle = state()
        d.fleet.instances["i0"].state = idle
        engines.qlm_instance_state = lambda instance_id, detail: idle  # type: ignore[attr-defined]
        d.bind_early(e, 0.0)
        assert engines.handed["i0"] == ["long"]


# ------------------------------------------------------------------------------------ mixed GPUs


def test_an_arrival_is_placed_on_the_fastest_gpu_with_a_free_seat() -> None:
    """On an A100 a Llama-3.1-8B step takes about 2.8 times as long as on an H100: a request
    placed there waits longer for its first token, though the A100 has more free seats."""
    d, queue, fleet, _ = dispatcher(
        state("a100", num_running=10), state("h100", num_running=60), gpus={"a100": "a100-80", "h100": "h100"}
    )
    assert fleet.instances["a100"].speed == pytest.approx(0.35, abs=0.02)
    assert fleet.instances["h100"].speed == 1.0
    queued(d, queue, "x", 100.0)
    assert queue.entries["x"].planned == "h100"
    fleet.instances["h100"].state = state("h100", num_running=64)  # no seat left there
    fleet.version += 1
    queued(d, queue, "y", 100.0)
    assert queue.entries["y"].planned == "a100"


def test_early_binding_picks_the_engine_that_starts_it_soonest_at_its_gpus_speed() -> None:
    """Two A100 and one H100 engine queues: the H100 works through two waiting prompts before
    the A100 works through one."""
    states = {
        "a100": state("a100", num_running=64, num_waiting=1, num_waiting_urgent=1),
        "h100": state("h100", num_running=64, num_waiting=2, num_waiting_urgent=2),
    }
    d, queue, _, engines = dispatcher(*states.values(), gpus={"a100": "a100-80", "h100": "h100"})
    engines.qlm_instance_state = lambda instance_id, detail: states[instance_id]  # type: ignore[attr-defined]
    r = Request("urgent", MODEL, 100, 64, 0.0, SLO(1.0, None), slo_class="interactive")
    e = queue.entries["urgent"] = queue.entry(r, LengthDistribution.point(64))
    d.enqueue(e)
    d.bind_early(e, 0.1)
    assert engines.handed == {"h100": ["urgent"]}


def test_gpu_speed_comes_from_the_catalogue_and_an_unknown_gpu_counts_as_the_reference() -> None:
    costs = load_scenario(None).reference_cost_models()
    assert gpu_speed(costs, "h100") == 1.0
    assert gpu_speed(costs, "A100-80") == pytest.approx(0.35, abs=0.02)
    assert gpu_speed(costs, "some-new-gpu") == 1.0


def test_an_instance_with_nothing_queued_takes_a_stranded_model() -> None:
    d, queue, fleet, engines = dispatcher(state("i0", model="phi-4"))
    fleet.instances["i0"].costs.setdefault(MODEL, next(iter(fleet.instances["i0"].costs.values())))
    queued(d, queue, "lonely", 100.0)  # nobody serves its model
    d.pull(fleet.instances["i0"], 4, 0.0)
    assert engines.handed["i0"] == ["lonely"]


def test_no_request_waits_for_ever_for_a_model_without_a_planner() -> None:
    text = """
name: two-models-one-engine
workload: {synthetic: {rate_rps: 2, duration_s: 30, prompt_mean: 200, output_mean: 50}}
models:
  - {name: llama-3.1-8b, profile: llama-3.1-8b, share: 0.5}
  - {name: phi-4, profile: phi-4, share: 0.5}
instances:
  - {gpu: h100, models: [llama-3.1-8b, phi-4]}
classes:
  - {name: batch, share: 1, e2e_s: 600}
"""
    scenario = parse_scenario(text)
    requests, rejected = build_requests(scenario)
    result = run_policy(scenario, "qlm-no-planner", requests, rejected, autoload=False)
    assert len(result.outcomes) == len(requests)
    assert all(o.status is Status.FINISHED for o in result.outcomes), "both models served"


# ------------------------------------------------------------------------------------ estimates told


def test_a_client_is_told_its_lanes_head_of_line_delay_while_the_lane_has_a_backlog() -> None:
    d, queue, fleet, _ = dispatcher(state())
    est = d.estimator
    entries = []
    for i, at in enumerate((0.0, 1.0, 2.0, 10.0)):
        r = Request(f"b{i}", MODEL, 100, 64, at, SLO(None, at + 600.0), slo_class="batch")
        e = queue.entries[r.id] = queue.entry(r, LengthDistribution.point(64))
        d.enqueue(e)
        est.note_arrival(e, at)
        entries.append(e)
    model = WaitEstimate("i0", 0.5, 0.2, 3.0, 1.0, 0.9)
    prefill = est._ref_cost[MODEL].step_s(100, 0)
    told = est.told(entries[3].request, model, 10.0)
    # the oldest request still waiting arrived 10 s ago: the newcomer waits about as long
    assert told.wait_mean_s == pytest.approx(10.0 + prefill)
    assert told.completion_mean_s == pytest.approx(3.0 + 10.0 + prefill - 0.5)
    assert told.p_meet == 0.9 and told.wait_std_s == 0.2
    # the head handed to an engine, the next one late (it runs after every on-time request): skipped
    d.dispatch(fleet.instances["i0"], entries[0], 10.0)
    queue.queue(MODEL).make_late(entries[1])
    assert est.told(entries[3].request, model, 10.0).wait_mean_s == pytest.approx(8.0 + prefill)
    # one already handed to an engine (as an eviction at admission does) starts there: the model's
    assert est.told(entries[0].request, model, 10.0).wait_mean_s == 0.5
    # another class of the same model has its own lane: no backlog there, the model's estimate
    other = Request("i", MODEL, 100, 64, 10.0, SLO(11.0, None), slo_class="interactive")
    assert est.told(other, model, 10.0).wait_mean_s == 0.5
    for e in entries[2:]:
        d.dispatch(fleet.instances["i0"], e, 10.0)
    assert est.told(entries[3].request, model, 10.0).wait_mean_s == 0.5  # backlog gone


# ------------------------------------------------------------------------------------ admission


def test_a_class_refuses_below_its_p_meet_with_the_estimate() -> None:
    control = AdmissionControl({"interactive": SLOClass("interactive", ttft_s=1.0, refuse_below_p_meet=0.5)})
    r = Request("r", MODEL, 10, 10, 0.0, SLO(1.0, None))
    low = WaitEstimate("i0", 4.0, 1.0, 5.0, 1.0, 0.2)
    verdict = control.qlm_admit(r, low, 0.0)
    assert not verdict.accepted and verdict.p_meet == 0.2 and verdict.wait_mean_s == 4.0
    assert "slo_unattainable" in verdict.reason and "0.50" in verdict.reason
    assert retry_after_s(low) == 4.0
    assert control.qlm_admit(r, replace(low, p_meet=0.6), 0.0).accepted
    other = replace(r, slo_class="batch")  # a class without a threshold is never refused
    assert control.qlm_admit(other, replace(low, p_meet=0.0), 0.0).accepted


def test_refused_requests_count_as_missed_in_the_simulator() -> None:
    base = load_scenario(None)
    classes = [c.model_copy(update={"refuse_below_p_meet": 0.5}) for c in base.classes]
    workload = base.workload.model_copy(
        update={"rate_scale": base.workload.rate_scale * 4, "max_requests": 3000}
    )
    scenario = base.model_copy(update={"classes": classes, "workload": workload})
    requests, rejected = build_requests(scenario)
    result = run_policy(scenario, "qlm", requests, rejected, autoload=False)
    refused = [o for o in result.outcomes if o.status is Status.REJECTED]
    assert refused, "at 4x load some requests are given less than 0.5"
    assert all(not o.met_slo() for o in refused)
    assert result.counters["refused"] == len(refused)
    assert len(result.outcomes) == len(requests)


def test_a_class_that_refuses_does_not_lock_itself_out_at_a_moderate_load() -> None:
    """Refusals keep the global queue empty; the step timings must still be read then, or one stale
    prefill-heavy step makes every estimate too long and the class refuses half its requests (found
    at 15 req/s on one H100: 46.8% met against EDF's 92.1%)."""
    text = """
name: refuse-e2e
seed: 0
workload: {synthetic: {rate_rps: 15, duration_s: 120, prompt_mean: 800, output_mean: 200, length_sigma: 1.0}}
models: [{name: llama-3.1-8b, profile: llama-3.1-8b}]
instances: [{count: 1, gpu: h100, models: [llama-3.1-8b]}]
classes: [{name: e2e, share: 1, e2e_s: 4, refuse_below_p_meet: 0.5}]
"""
    scenario = parse_scenario(text)
    requests, rejected = build_requests(scenario)
    met = {
        p: run_policy(scenario, p, requests, rejected, autoload=False).overall.slo_attainment
        for p in ("edf", "qlm")
    }
    assert met["qlm"] >= met["edf"] - 0.005, met


@pytest.mark.slow
def test_late_requests_waiting_behind_batch_work_do_not_stop_binding_the_ones_left_waiting() -> None:
    """At twice what two 64-seat engines take, a few interactive requests go late and then wait
    minutes behind batch work with ten minutes of slack. While any was late, no arrival bound the
    request left waiting beside it, and later arrivals passed those for good: QLM met 1.5 points
    fewer SLOs than `edf-shed` (97.9% against 99.4%, seeds 0-1); now 99.4% against 99.4%."""
    text = """
name: late-behind-batch
seed: 0
workload:
  synthetic: {rate_rps: 90, duration_s: 120, prompt_mean: 1000, output_mean: 200, length_sigma: 1.0}
  max_tokens: 1024
models: [{name: llama-3.1-8b, profile: llama-3.1-8b}]
instances: [{count: 2, gpu: h100, models: [llama-3.1-8b], max_num_seqs: 64}]
classes:
  - {name: interactive, share: 0.6, ttft_s: 1.5}
  - {name: batch, share: 0.4, e2e_s: 600, priority: 1}
"""
    met: dict[str, float] = {"qlm": 0.0, "edf-shed": 0.0}
    for seed in (0, 1):
        scenario = parse_scenario(text).model_copy(update={"seed": seed})
        requests, rejected = build_requests(scenario)
        for p in met:
            met[p] += run_policy(scenario, p, requests, rejected, autoload=False).overall.slo_attainment / 2
    assert met["qlm"] >= met["edf-shed"] - 0.005, met


def test_edf_shed_spreads_arrivals_over_the_fleet() -> None:
    """The baseline pulls least busy first: in list order the first instance took every arrival
    until it was full (39.9% met where every other policy met 100%)."""
    text = """
name: shed-spread
seed: 15
workload: {synthetic: {rate_rps: 60, duration_s: 20, prompt_mean: 1500, output_mean: 300, length_sigma: 0}}
models: [{name: llama-3.1-8b, profile: llama-3.1-8b}]
instances: [{count: 8, gpu: h100, models: [llama-3.1-8b]}]
classes: [{name: chat, share: 1, e2e_s: 4.0}]
"""
    scenario = parse_scenario(text)
    requests, rejected = build_requests(scenario)
    result = run_policy(scenario, "edf-shed", requests, rejected, autoload=False)
    assert result.overall.slo_attainment == 1.0
    per_instance: dict[str, int] = {}
    for o in result.outcomes:
        per_instance[o.instance_id or ""] = per_instance.get(o.instance_id or "", 0) + 1
    assert len(per_instance) == 8 and max(per_instance.values()) < 2 * min(per_instance.values()), (
        per_instance
    )
