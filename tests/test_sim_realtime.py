"""Aborts and token progress in the simulated engine, and simulated instances run in real time."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import random
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlm_plugin.adapters.sim import (
    Progress,
    RealtimeFleet,
    RealtimeSim,
    SimFleet,
    SimInstance,
    synthetic_text,
)
from qlm_plugin.adapters.sim.process import SimEngineLink
from qlm_plugin.domain.costmodel import CostModel, cost_model
from qlm_plugin.domain.instance import EvictMode
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import Request, make_request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

H100_8B = cost_model("llama-3.1-8b", "h100")


def req(rid: str, prompt: int, out: int, t: float = 0.0, ttft_s: float | None = None) -> Request:
    return make_request(rid, "m", prompt, out, t, ttft_s=ttft_s, e2e_s=1e6, true_output_tokens=out)


class Engine:
    """One instance on a SimFleet, recording its outcomes and callbacks."""

    def __init__(self, cost: CostModel = H100_8B, **kw: object) -> None:
        self.inst = SimInstance("i0", "h100", {"m": cost}, initial_model="m", **kw)  # type: ignore[arg-type]
        self.fleet = SimFleet([self.inst])
        self.outcomes: dict[str, RequestOutcome] = {}
        self.finished: list[str] = []
        self.first_tokens: list[str] = []
        self.inst.on_finished = lambda o: self.finished.append(o.request.id)
        self.inst.on_first_token = lambda o: self.first_tokens.append(o.request.id)

    def at(self, t: float) -> SimInstance:
        self.fleet.advance_to(t)
        return self.inst

    def dispatch(self, r: Request) -> None:
        self.fleet.advance_to(r.arrival_time)
        self.outcomes[r.id] = RequestOutcome(r)
        assert self.inst.dispatch(r, self.outcomes[r.id])

    def drain(self) -> None:
        self.fleet.advance_to(1e6)
        assert_drained(self.inst)


def assert_drained(inst: SimInstance) -> None:
    assert inst.step is None and not inst.decoding and not inst.prefilling and not inst.pending_aborts
    assert inst.kv_used == 0 and sum(inst.phase_cnt) == 0
    assert (inst.num_waiting, inst.num_swapped_waiting, inst.num_waiting_urgent) == (0, 0, 0)
    assert inst.queued_tokens() == 0
    s = inst.state(inst.fleet.now if inst.fleet else 0.0, detail=True)
    assert s.running_ids == s.waiting_ids == s.swapped_ids == ()


def assert_cancelled(e: Engine, rid: str) -> None:
    o = e.outcomes[rid]
    assert o.status is Status.CANCELLED and o.finish_time is None and rid not in e.finished
    assert e.inst.generated_tokens(rid) is None
    assert e.inst.abort(rid) is False, "a second abort finds nothing"


# ---------------------------------------------------------------------------- engine: abort
def test_abort_a_waiting_request_takes_it_out_of_every_count_at_once() -> None:
    e = Engine(max_num_seqs=1)
    e.dispatch(req("a", 100, 2000))
    e.dispatch(req("b", 100, 50, ttft_s=1.0))
    inst = e.at(0.5)
    assert (inst.num_waiting, inst.num_waiting_urgent) == (1, 1)
    queued = inst.queued_tokens(0.5)
    assert inst.abort("b")
    assert (inst.num_waiting, inst.num_waiting_urgent) == (0, 0)
    assert inst.queued_tokens(0.5) == queued - 150
    e.drain()
    assert_cancelled(e, "b")
    assert e.finished == ["a"] and e.first_tokens == ["a"]


def test_abort_while_prefilling_frees_the_kv_at_the_step_boundary() -> None:
    e = Engine()
    e.dispatch(req("a", 20000, 10))  # three prefill chunks of the 8192-token budget
    step = H100_8B.step_s(8192, 0)
    inst = e.at(1.5 * step)
    assert inst.prefilling and inst.kv_used > 0
    assert inst.abort("a")
    assert inst.kv_used > 0, "the step in flight still computes it"
    inst = e.at(2 * step + 1e-9)
    assert not inst.prefilling and inst.kv_used == 0
    e.drain()
    assert_cancelled(e, "a")
    assert e.first_tokens == []


@pytest.mark.parametrize("mid_last_step", [False, True])
def test_abort_while_decoding_cuts_the_macro_step(mid_last_step: bool) -> None:
    e = Engine()
    e.dispatch(req("a", 100, 3000))
    e.dispatch(req("b", 100, 5000))
    assert e.at(0.1).step is not None
    macro_end = e.inst.next_event_t
    first, dt = H100_8B.step_s(200, 0), H100_8B.step_s(0, 2)
    # a's last step ends at first + 2999 dt: aborted during it, a must still not finish
    t = first + 2998.5 * dt if mid_last_step else 3.0
    inst = e.at(t)
    assert inst.generated_tokens("a") == 1 + math.floor((t - first) / dt)
    assert inst.abort("a")
    assert inst.next_event_t is not None and inst.next_event_t < t + dt, "cut at the next step boundary"
    assert macro_end is None or inst.next_event_t <= macro_end
    inst = e.at(t + dt)
    assert len(inst.decoding) == 1 and inst.generated_tokens("b") is not None
    e.drain()
    assert_cancelled(e, "a")
    assert e.finished == ["b"] and e.outcomes["b"].output_tokens == 5000


def test_abort_a_swapped_and_a_promoted_request() -> None:
    for promote in (False, True):
        e = Engine(max_num_seqs=1)
        e.inst.rank_key = lambda r, i, n: (-r.arrival_time, r.id)  # newest first: b takes a's seat
        e.dispatch(req("a", 100, 2000))
        e.dispatch(req("b", 100, 300, t=1.0))
        e.at(1.0).evict("a", EvictMode.SWAP)
        inst = e.at(1.1)
        assert inst.num_swapped_waiting == 1 and inst.state(1.1, True).running_ids == ("b",)
        if promote:
            assert inst.swap_in("a") and inst.promoted
        assert inst.abort("a")
        assert (inst.num_waiting, inst.num_swapped_waiting) == (0, 0)
        e.drain()
        assert_cancelled(e, "a")
        assert e.finished == ["b"]


def test_abort_of_unknown_or_finished_requests_is_refused() -> None:
    e = Engine()
    e.dispatch(req("a", 10, 5))
    assert e.inst.abort("nope") is False
    e.drain()
    assert e.inst.abort("a") is False
    assert e.outcomes["a"].status is Status.FINISHED


# ---------------------------------------------------------------------------- engine: differential
def _run_with_aborts(
    seed: int, macro: bool, mode: EvictMode
) -> tuple[dict[str, RequestOutcome], dict[str, str], list[dict[str, int | None]], list[SimInstance]]:
    """A random workload on 2 instances with tight KV, ~1/4 of its requests aborted at fixed times,
    and every request's generated_tokens sampled at fixed times."""
    rng = random.Random(seed)
    tight = {"m": replace(H100_8B, kv_blocks=600, max_num_seqs=24, max_num_batched_tokens=2048)}
    kw: dict[str, object] = {"preemption_mode": mode} | ({} if macro else {"max_macro_steps": 1})
    insts = [SimInstance(f"i{i}", "h100", tight, initial_model="m", **kw) for i in range(2)]  # type: ignore[arg-type]
    fleet = SimFleet(insts)
    events: list[tuple[float, int, str, int]] = []
    t = 0.0
    for i in range(250):
        t += rng.expovariate(6.0)
        events.append((t, 0, "arrive", i))
        if rng.random() < 0.25:  # soon (to catch it prefilling) or late (decoding, or done)
            delay = rng.uniform(0.0, 0.2) if rng.random() < 0.5 else rng.expovariate(0.5)
            events.append((t + delay, 1, "abort", i))
    events += [(k * 0.0731, 2, "sample", 0) for k in range(int(t / 0.0731) + 100)]
    events.sort()
    work = {
        i: req(f"r{i}", rng.randint(1, 3000), rng.randint(1, 600), at)
        for at, _, k, i in events
        if k == "arrive"
    }
    outcomes: dict[str, RequestOutcome] = {}
    aborted: dict[str, str] = {}  # where each abort found its request
    samples: list[dict[str, int | None]] = []
    for at, _, kind, i in events:
        fleet.advance_to(at)
        if kind == "arrive":
            r = work[i]
            outcomes[r.id] = RequestOutcome(r)
            assert insts[i % 2].dispatch(r, outcomes[r.id])
        elif kind == "abort":
            inst, rid = insts[i % 2], f"r{i}"
            running = rid in inst.state(fleet.now, detail=True).running_ids
            where = "running" if running else "gone" if inst.generated_tokens(rid) is None else "waiting"
            assert inst.abort(rid) is (where != "gone")
            aborted[rid] = where
        else:
            samples.append({rid: insts[int(rid[1:]) % 2].generated_tokens(rid) for rid in outcomes})
    fleet.advance_to(1e6)
    return outcomes, aborted, samples, insts


@pytest.mark.parametrize("mode", [EvictMode.RECOMPUTE, EvictMode.SWAP])
def test_aborts_and_token_counts_are_the_same_with_macro_steps_as_with_single_steps(mode: EvictMode) -> None:
    fast, fast_aborted, fast_samples, fast_insts = _run_with_aborts(11, True, mode)
    slow, slow_aborted, slow_samples, slow_insts = _run_with_aborts(11, False, mode)
    assert sum(i.counters["preemptions"] for i in slow_insts) > 0
    assert fast_aborted == slow_aborted
    where = collections.Counter(slow_aborted.values())
    assert where["running"] > 10 and where["waiting"] > 10 and where["gone"] > 0, where
    for inst in (*fast_insts, *slow_insts):
        assert_drained(inst)
    for rid, o in slow.items():
        f = fast[rid]
        assert f.status is o.status
        assert (o.status is Status.CANCELLED) is (slow_aborted.get(rid, "gone") != "gone")
        if o.status is Status.FINISHED:
            assert f.first_token_time == pytest.approx(o.first_token_time, abs=1e-6)
            assert f.finish_time == pytest.approx(o.finish_time, abs=1e-6)
            assert (f.preemptions, f.output_tokens) == (o.preemptions, o.output_tokens)
        else:
            assert f.finish_time is o.finish_time is None
    assert fast_samples == slow_samples
    mid = [g for s in slow_samples for g in s.values() if g is not None and g > 1]
    assert len(mid) > 1000, "samples caught requests mid-decode"
    for rid in slow:  # progress never goes back (a recompute keeps the tokens already generated)
        seen = [g for s in slow_samples if (g := s.get(rid)) is not None]
        assert seen == sorted(seen)


# ---------------------------------------------------------------------------- synthetic text
@settings(deadline=None)  # a loaded CI machine must not fail it on time
@given(st.text(min_size=1, max_size=20), st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))
def test_synthetic_text_continues_where_it_left_off(rid: str, a: int, b: int, c: int) -> None:
    k, n = a + b, a + b + c
    whole = synthetic_text(rid, a, n - a)
    assert whole == synthetic_text(rid, a, k - a) + synthetic_text(rid, k, n - k)
    assert whole.count(" ") == n - a and (whole == "" or whole.startswith(" "))
    assert synthetic_text(rid, a, n - a) == whole, "deterministic"


def test_synthetic_text_varies() -> None:
    words = synthetic_text("r1", 0, 200).split()
    assert len(words) == 200 and len(set(words)) > 50
    assert synthetic_text("r1", 0, 50) != synthetic_text("r2", 0, 50)


# ---------------------------------------------------------------------------- real time
SPEED = 20.0


def _instances(n: int) -> list[SimInstance]:
    return [SimInstance(f"i{k}", "h100", {"m": H100_8B}, initial_model="m") for k in range(n)]


def test_requests_stream_their_tokens_in_scaled_real_time() -> None:
    async def main() -> tuple[dict[str, list[tuple[float, Progress]]], dict[str, float], RealtimeSim]:
        sim = RealtimeSim(_instances(2), speed=SPEED)
        sim.start()
        events: dict[str, list[tuple[float, Progress]]] = {}
        submitted: dict[str, float] = {}
        done = asyncio.Event()
        outs = [1500, 4000, 2500, 3000, 1, 2000]

        def on_progress(p: Progress) -> None:
            events[p.request_id].append((time.time(), p))
            if sum(evs[-1][1].kind == "finished" for evs in events.values() if evs) == len(outs):
                done.set()

        for k, out in enumerate(outs):
            rid = f"r{k}"
            events[rid] = []
            submitted[rid] = time.time()
            assert sim.submit(f"i{k % 2}", req(rid, 300 + 100 * k, out, t=sim.now), on_progress)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(done.wait(), 10)
        await sim.stop()
        return events, submitted, sim

    events, submitted, sim = asyncio.run(main())
    for rid, evs in events.items():
        kinds = [p.kind for _, p in evs]
        assert kinds[-1] == "finished" and kinds.count("finished") == 1 and "cancelled" not in kinds
        tokens = [p for _, p in evs if p.kind == "tokens"]
        assert (tokens[0].index, tokens[0].count) == (0, 1)
        assert all(p.count > 0 and p.index == q.index + q.count for q, p in itertools.pairwise(tokens))
        outcome = evs[-1][1].outcome
        total = outcome.request.true_output_tokens
        assert sum(p.count for p in tokens) == evs[-1][1].index == outcome.output_tokens == total
        assert outcome.status is Status.FINISHED and outcome.first_token_time is not None
        assert outcome.finish_time is not None
        if total > 1000:
            assert len(tokens) >= 4, "tokens stream while the request decodes"
        # wall durations match the simulated ones / speed
        for wall_end, sim_end in ((evs[0][0], outcome.first_token_time), (evs[-1][0], outcome.finish_time)):
            expected = (sim_end - outcome.request.arrival_time) / SPEED
            assert abs((wall_end - submitted[rid]) - expected) <= max(0.2, 0.3 * expected), rid
        assert evs[-1][1].time == pytest.approx(sim.wall_time(outcome.finish_time))
        assert abs(evs[-1][1].time - evs[-1][0]) < 0.2
    longest = max(events.values(), key=lambda evs: evs[-1][1].outcome.output_tokens)
    assert longest[-1][0] - longest[0][0] > 0.5, "the test ran in real time, not all at once"
    for inst in (sim.instance("i0"), sim.instance("i1")):
        assert_drained(inst)


def test_abort_mid_decode_stops_the_stream_and_frees_the_instance() -> None:
    async def main() -> tuple[list[Progress], SimInstance, float]:
        sim = RealtimeSim(_instances(2), speed=SPEED, stream_interval_s=0.02)
        sim.start()
        got: list[Progress] = []
        assert sim.submit("i0", req("a", 200, 20000, t=sim.now), got.append)
        deadline = time.monotonic() + 10
        while sum(p.kind == "tokens" for p in got) < 3:  # decoding, whatever the machine's pace
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        inst = sim.instance("i0")
        assert inst.decoding and inst.kv_used > 0
        assert sim.abort("i0", "a")
        assert sim.abort("i0", "a") is False
        aborted_at = time.time()
        n = len(got)
        await asyncio.sleep(0.2)
        assert len(got) == n, "nothing after the cancellation"
        assert sim.submit("i0", req("b", 10, 3, t=sim.now), lambda p: None), "the instance serves again"
        await asyncio.sleep(0.1)
        await sim.stop()
        return got, inst, aborted_at

    got, inst, aborted_at = asyncio.run(main())
    assert got[-1].kind == "cancelled" and [p.kind for p in got].count("cancelled") == 1
    tokens = [p for p in got if p.kind == "tokens"]
    assert len(tokens) >= 3 and got[-1].index == sum(p.count for p in tokens) > 1
    assert abs(got[-1].time - aborted_at) < 0.1
    assert got[-1].outcome.status is Status.CANCELLED and got[-1].outcome.finish_time is None
    assert inst.generated_tokens("a") is None
    assert_drained(inst)


def test_the_clock_never_goes_back_even_when_timers_fire_late() -> None:
    async def main() -> list[float]:
        sim = RealtimeSim(_instances(1), speed=SPEED, stream_interval_s=0.01)
        sim.start()
        seen: list[float] = []

        def on_progress(p: Progress) -> None:
            seen.append(sim.now)
            if p.kind == "tokens" and p.index == 0:
                time.sleep(0.03)  # block the loop: the timers due meanwhile fire late

        for k in range(4):
            assert sim.submit("i0", req(f"r{k}", 50 * (k + 1), 200 * (k + 1), t=sim.now), on_progress)
            for _ in range(20):
                seen.append(sim.now)
                await asyncio.sleep(0.002)
        while sim.instance("i0").decoding:
            seen.append(sim.now)
            await asyncio.sleep(0.005)
        await sim.stop()
        return seen

    seen = asyncio.run(main())
    assert len(seen) > 50 and seen == sorted(seen)


def test_fleet_speed_must_be_positive_and_maps_wall_to_simulated_time() -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            RealtimeFleet(_instances(1), speed=0.0)
        fleet = RealtimeFleet(_instances(1), speed=SPEED)
        w0, s0 = time.monotonic(), fleet.now
        await asyncio.sleep(0.1)
        elapsed = time.monotonic() - w0
        assert fleet.now - s0 == pytest.approx(elapsed * SPEED, abs=0.05 * SPEED)
        fleet.close()

    asyncio.run(main())


def test_an_engine_counts_deadline_budgets_on_its_own_clock() -> None:
    """The coordinator's clock an hour behind the engine's: the absolute deadline it sends says the
    TTFT is long past, the budget says 2 s are left. The engine takes the budget, from its receipt."""

    async def main() -> tuple[Request, float]:
        sim = RealtimeSim(_instances(1), speed=SPEED)
        sim.start()
        seen: list[Request] = []
        submit = sim.submit

        def recording(instance_id: str, request: Request, on_progress: Any) -> bool:
            seen.append(request)
            return submit(instance_id, request, on_progress)

        sim.submit = recording  # type: ignore[method-assign]
        link = SimEngineLink(sim, sim.instance("i0"))
        spec = pb.RequestSpec(
            request_id="r",
            model="m",
            prompt_tokens=10,
            max_tokens=5,
            slo=pb.SLO(ttft_ms=2000, e2e_ms=5000, priority=3, slo_class="interactive"),
        )
        received = sim.now
        behind = pb.Assignment(
            request=spec, attempt=1, deadline=time.time() - 3600, ttft_budget_s=2.0, e2e_budget_s=5.0
        )
        assert link.start(behind, lambda _e: None)
        await sim.stop()
        return seen[0], received

    request, received = asyncio.run(main())
    assert request.slo.ttft_deadline == pytest.approx(received + 2.0 * SPEED, abs=0.5)
    # what a victim plugin of the instance sees of the request: its SLO whole, and its priority
    assert request.slo.e2e_deadline == pytest.approx(received + 5.0 * SPEED, abs=0.5)
    assert request.priority == 3


def test_an_order_to_evict_a_request_not_running_makes_a_seat_only_for_an_urgent_request() -> None:
    """The coordinator's view runs ahead of the engine's: an eviction for an urgent request names
    a victim the engine may not run yet, and means "make a seat" (the engine picks a batch
    request). An operator's order (no urgent request) names that request: the engine evicted
    another one in its place."""

    async def main() -> tuple[pb.CommandAck, pb.CommandAck]:
        sim = RealtimeSim(_instances(1), speed=SPEED)
        sim.start()
        link = SimEngineLink(sim, sim.instance("i0"))
        spec = pb.RequestSpec(request_id="b", model="m", prompt_tokens=10, max_tokens=5000)
        assert link.start(pb.Assignment(request=spec, attempt=1), lambda _e: None)
        while not sim.instance("i0")._views(sim.now):
            await asyncio.sleep(0.01)
        operator = link.execute(pb.Command(evict=pb.Evict(request_id="waiting", mode="recompute")))
        urgent = link.execute(
            pb.Command(evict=pb.Evict(request_id="waiting", mode="recompute", for_request_id="u"))
        )
        await sim.stop()
        return operator, urgent

    operator, urgent = asyncio.run(main())
    assert not operator.ok and operator.error == "request 'waiting' is not running here"
    assert urgent.ok and urgent.wasted_tokens > 0  # the batch request "b" gave its seat
