"""The brain inside vLLM's scheduler (the engine's plugin manager and roles) and the request fields,
on plain request objects with a fake clock (no engine); and the plugin entry point's version guard."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from qlm_plugin.adapters.vllm import UnsupportedVLLMError, check_vllm, register
from qlm_plugin.adapters.vllm.engine_brain import EngineBrain, RankedQueue, hinted_length
from qlm_plugin.adapters.vllm.fields import QLMFields, parse_fields
from qlm_plugin.adapters.vllm.orders import EvictionOrder, SeatsGiven, order_action
from qlm_plugin.brain.local_policy import LocalPolicy, Rank
from qlm_plugin.domain.instance import RunningView
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.hooks import hookimpl

NOW = 1_000.0


@dataclass
class Req:
    request_id: str
    arrival_time: float = NOW
    num_output_tokens: int = 0
    max_tokens: int = 256
    num_prompt_tokens: int = 32
    num_computed_tokens: int = 0
    priority: int = 0


def test_fields_from_vllm_xargs_and_nested_extra_args() -> None:
    f = parse_fields(
        {
            "qlm_id": "r1",
            "qlm_attempt": 2,
            "qlm_class": "interactive",
            "qlm_ttft_deadline": NOW + 1,
            "qlm_tenant": "acme",
            "qlm_predicted_tokens": 40,
            "other": 1,
        },
        priority=3,
        arrival_time=NOW,
    )
    assert f == QLMFields("r1", 2, "interactive", NOW + 1, None, "acme", 40.0, None, 3)
    rel = parse_fields({"qlm": {"ttft_ms": 500, "e2e_ms": 9000}}, priority=0, arrival_time=NOW)
    assert (rel.ttft_deadline, rel.e2e_deadline) == (NOW + 0.5, NOW + 9.0)
    junk = parse_fields(
        {"qlm_ttft_ms": "soon", "qlm_e2e_deadline": -5, "qlm_attempt": "x"}, priority=0, arrival_time=NOW
    )
    assert not junk.has_slo and junk.attempt == 0  # malformed values: default urgency, still served
    assert not parse_fields(None, priority=0, arrival_time=NOW).has_slo


def brain() -> EngineBrain:
    """The engine's brain as the scheduler builds it, without third-party plugins."""
    return EngineBrain("tiny", "engine-0", autoload=False)


def admitted(b: EngineBrain, pairs: list[tuple[Req, QLMFields]]) -> list[Req]:
    for r, f in pairs:
        b.admit(r, f, NOW)
    return [r for r, _ in pairs]


def test_waiting_order_puts_ttft_bound_before_batch_and_a_preempted_request_keeps_its_rank() -> None:
    b = brain()
    reqs = admitted(
        b,
        [
            (Req("b2"), QLMFields(e2e_deadline=NOW + 600.0)),
            (Req("p"), QLMFields()),  # no SLO: due a minute after its virtual finish
            (Req("p0"), QLMFields(priority=-5)),  # the client's priority moves it up
            (Req("b1"), QLMFields(e2e_deadline=NOW + 10.0)),
            (Req("i", arrival_time=NOW + 0.5), QLMFields(ttft_deadline=NOW + 1.5)),
        ],
    )
    q = RankedQueue(b.key)
    for r in reqs:
        q.add_request(r)
    assert [r.request_id for r in q] == ["i", "b1", "p0", "p", "b2"]
    head = q.pop_request()
    q.prepend_request(head)  # preempted: back with the rank it had, not behind the others
    assert q.peek_request().request_id == "i" and len(q) == 5
    q.remove_requests([reqs[0], reqs[1]])
    assert [r.request_id for r in q] == ["i", "b1", "p0"]


def test_requests_without_slo_go_shortest_predicted_first_and_a_long_one_ages() -> None:
    """ALISE's order with aging: the engine's predictor, once it has seen each class's lengths,
    puts the short class first; a long request that waited its own service time goes before a
    short one that comes after that."""
    b = brain()
    b.policy.step_s = 0.02
    for k in range(40):  # finished requests teach the predictor: "short" ~10 tokens, "long" ~400
        for cls, n in (("short", 10), ("long", 400)):
            r = Req(f"{cls}-done-{k}", max_tokens=512)
            b.admit(r, QLMFields(slo_class=cls), NOW)
            r.num_output_tokens = n
            b.finished(r, True, NOW)
    long_r, short_r = Req("long", max_tokens=512), Req("short", arrival_time=NOW + 1, max_tokens=512)
    admitted(b, [(long_r, QLMFields(slo_class="long")), (short_r, QLMFields(slo_class="short"))])
    assert Rank(b.key(short_r)) < Rank(b.key(long_r))  # 0.2 s of work goes before 8 s
    late = Req("short-late", arrival_time=NOW + 9, max_tokens=512)  # the long one waited its 8 s
    admitted(b, [(late, QLMFields(slo_class="short"))])
    assert Rank(b.key(long_r)) < Rank(b.key(late))


def test_the_coordinators_prediction_stands_in_until_the_engine_knows_the_class() -> None:
    b = brain()
    r = Req("r", max_tokens=512)
    b.admit(r, QLMFields(slo_class="chat", predicted_tokens=40, predicted_q90=90), NOW)
    dist = b.policy.predict(b.requests["r"], 0)
    assert dist.quantile(0.5) == pytest.approx(40) and dist.quantile(0.9) == pytest.approx(90)
    assert b.policy.predict(b.requests["r"], 30).quantile(0.5) == pytest.approx(10)  # less what ran
    for k in range(40):  # the engine's own lengths for the class: 200 tokens
        done = Req(f"d{k}", max_tokens=512)
        b.admit(done, QLMFields(slo_class="chat"), NOW)
        done.num_output_tokens = 200
        b.finished(done, True, NOW)
    assert b.policy.predict(b.requests["r"], 0).quantile(0.5) == pytest.approx(200)
    aborted = Req("a", max_tokens=512)
    b.admit(aborted, QLMFields(slo_class="other"), NOW)
    aborted.num_output_tokens = 3
    b.finished(aborted, False, NOW)  # an aborted request teaches nothing: "other" has no lengths
    assert b.predictor.source(Request("x", "tiny", 32, 512, NOW, slo_class="other")) == "model"


def test_no_seat_eviction_while_a_seat_frees_in_time() -> None:
    b = brain()
    b.policy.step_s = 0.02
    head = admitted(b, [(Req("i"), QLMFields(ttft_deadline=NOW + 1.0))])[0]
    running = admitted(
        b,
        [
            (Req(f"b{k}", num_output_tokens=250, num_computed_tokens=282), QLMFields(slo_class="b"))
            for k in range(8)
        ],
    )
    for k in range(40):  # the predictor learns these run 256 tokens: 6 left
        done = Req(f"d{k}")
        b.admit(done, QLMFields(slo_class="b"), NOW)
        done.num_output_tokens = 256
        b.finished(done, True, NOW)
    assert b.seat_for([head], running, 8, NOW) is None
    assert b.seat_for([head], running[:7], 8, NOW) is None  # a free seat


def test_a_seat_is_taken_only_to_meet_a_ttft_from_a_request_that_still_meets_its_own_slo() -> None:
    """Among the running requests that still meet their SLO after a recompute, the one the order
    serves last; an urgent request before its first token never gives way."""
    b = brain()
    b.policy.step_s = 0.02
    urgent = admitted(b, [(Req("i"), QLMFields(ttft_deadline=NOW + 1.0))])[0]
    running = admitted(
        b,
        [
            # 5 s of work left at the 90th percentile of a 256-token prior... and 1 s of slack: too tight
            (Req("tight", num_output_tokens=10, num_computed_tokens=42), QLMFields(e2e_deadline=NOW + 3.0)),
            (
                Req("loose-big", num_output_tokens=200, num_computed_tokens=232),
                QLMFields(e2e_deadline=NOW + 900),
            ),
            (
                Req("loose-small", num_output_tokens=20, num_computed_tokens=52),
                QLMFields(e2e_deadline=NOW + 600),
            ),
            (Req("urgent", num_output_tokens=0, max_tokens=4096), QLMFields(ttft_deadline=NOW + 0.5)),
        ],
    )
    found = b.seat_for([urgent], running, 4, NOW)
    # the one the order serves last (the later deadline), not the least work to redo
    # ("loose-small" ranks first: preempted, it would be the first to come back)
    assert found is not None and found[0].request_id == "loose-big"
    # A started interactive request with much left ranks before the newcomer (it keeps its rank):
    # preempted, it would take the seat straight back, so it never gives way to it.
    chat = admitted(
        b,
        [
            (
                Req("chat", arrival_time=NOW - 1, num_output_tokens=5, num_computed_tokens=37),
                QLMFields(ttft_deadline=NOW),
            )
        ],
    )[0]
    found = b.seat_for([urgent], [chat, *running[:1], running[3]], 3, NOW)
    assert found is None
    # Already too late: evicting would waste work for nothing.
    late = admitted(b, [(Req("late"), QLMFields(ttft_deadline=NOW - 0.1))])[0]
    assert b.seat_for([late], running, 4, NOW) is None
    # No TTFT SLO at the head: never evict.
    plain = admitted(b, [(Req("b"), QLMFields(e2e_deadline=NOW + 5))])[0]
    assert b.seat_for([plain], running, 4, NOW) is None
    # Nobody can afford it: no eviction.
    tight = admitted(
        b, [(Req(f"t{k}", num_output_tokens=10), QLMFields(e2e_deadline=NOW + 2.0)) for k in range(2)]
    )
    urgent2 = admitted(b, [(Req("i2"), QLMFields(ttft_deadline=NOW + 1.0))])[0]
    assert b.seat_for([urgent2], tight, 2, NOW) is None


def test_a_burst_of_urgent_requests_gets_the_seats_it_needs_not_one() -> None:
    """Four interactive requests arrive together at an engine whose 4 seats run batch work that
    frees a seat every second or so: the first two get seats in time (the second the one the first
    frees after its 16 tokens), the third would not, so a seat is freed for it, by a request that
    would not have finished in time anyway."""
    b = brain()
    b.policy.step_s = 0.02
    for k in range(40):  # the engine knows its batch requests run 256 tokens, interactive ones 16
        for cls, n in (("batch", 256), ("interactive", 16)):
            done = Req(f"{cls}-{k}")
            b.admit(done, QLMFields(slo_class=cls), NOW)
            done.num_output_tokens = n
            b.finished(done, True, NOW)
    running = admitted(
        b,
        [
            (
                Req(f"b{k}", num_output_tokens=226 - 50 * k, num_computed_tokens=250),
                QLMFields("q", 0, "batch", None, NOW + 600),
            )
            for k in range(4)
        ],
    )  # seats free in 0.6, 1.6, 2.6 and 3.6 s
    burst = admitted(
        b,
        [
            (
                Req(f"i{k}", arrival_time=NOW + k * 1e-3),
                QLMFields(slo_class="interactive", ttft_deadline=NOW + 1.0),
            )
            for k in range(4)
        ],
    )
    found = b.seat_for(burst, running, 4, NOW)
    assert found is not None and found[1].for_request == "i2" and found[0].request_id != "b0"
    assert b.seat_for(burst[:1], running, 4, NOW) is None  # alone, the first seat is in time
    assert b.seat_for(burst, running, 4, NOW, given=lambda rid: rid != "i0") is None  # the rest have seats


def test_kv_victims_follow_qlm_select_victim_then_the_least_urgent() -> None:
    b = brain()
    running = admitted(
        b,
        [
            (Req("i", num_output_tokens=0, num_computed_tokens=30), QLMFields(ttft_deadline=NOW + 1.0)),
            (Req("big", num_output_tokens=100, num_computed_tokens=400), QLMFields(e2e_deadline=NOW + 700)),
            (Req("small", num_output_tokens=5, num_computed_tokens=40), QLMFields(e2e_deadline=NOW + 600)),
            (Req("soon", num_output_tokens=5, num_computed_tokens=40), QLMFields(e2e_deadline=NOW + 20)),
        ],
    )
    order = [r.request_id for r in b.kv_victim_order(running, NOW)]
    # among those that still meet their SLO, the one the order serves last first ("big", with the
    # most work to redo): "soon", with the least work to redo but the earliest deadline, would come
    # straight back and have another preempted for it; the urgent one before its first token only
    # if nobody else can go
    assert order == ["big", "small", "soon", "i"]


def test_kv_victims_follow_the_rank_the_engines_queue_holds() -> None:
    """The victim is the request the engine's queue would serve last, by the key it got at
    admission: a key priced again at a later pace would name a request the queue serves first."""
    b = brain()
    b.policy.step_s = 0.02
    running = admitted(
        b,
        [
            (Req("long", num_output_tokens=5, max_tokens=4096), QLMFields(e2e_deadline=NOW + 300)),
            (Req("short", num_output_tokens=5, max_tokens=64), QLMFields(e2e_deadline=NOW + 250)),
        ],
    )
    served_last = max(running, key=lambda r: Rank(b.key(r))).request_id
    b.policy.step_s = 0.2  # the engine measured its pace: keys priced now would differ
    assert b.kv_victim_order(running, NOW)[0].request_id == served_last


def test_a_victim_plugin_sees_when_each_request_was_admitted_on_the_engines_clock() -> None:
    """``admitted_at`` was the request's position in vLLM's running list (0.0, 1.0, ...): a plugin
    reading ``now - admitted_at`` got nonsense. It is now when the engine first saw the request
    running, taken again when it runs again after a preemption (vLLM puts it last)."""
    seen: list[dict[str, float]] = []

    class Records:
        @hookimpl
        def qlm_select_victim(self, candidates: list[RunningView], instance_id: str, now: float) -> None:
            seen.append({c.request.id: now - c.admitted_at for c in candidates})

    b = EngineBrain("tiny", "engine-0", autoload=False, plugins=[("records", Records())])
    a, c = admitted(b, [(Req("a"), QLMFields()), (Req("c"), QLMFields())])
    b.kv_victim_order([a, c], NOW)
    assert seen[0] == {"a": 0.0, "c": 0.0}  # (the first of the victims asked for, in order)
    (d,) = admitted(b, [(Req("d"), QLMFields())])
    seen.clear()
    b.kv_victim_order([a, c, d], NOW + 5)
    assert seen[0] == {"a": 5.0, "c": 5.0, "d": 0.0}
    seen.clear()
    b.kv_victim_order([c, d, a], NOW + 7)  # "a" was preempted and runs again: admitted again
    assert seen[0] == {"c": 7.0, "d": 2.0, "a": 0.0}
    b.finished(a, True, NOW + 8)
    assert "a" not in b.admitted_at


def test_step_time_follows_measurements() -> None:
    p = LocalPolicy(step_s=0.02)
    for _ in range(100):
        p.observe_step(0.05, decode_tokens=8)
    assert p.step_s == pytest.approx(0.05, rel=0.01)
    p.observe_step(10.0, decode_tokens=0)  # prefill-only steps do not count
    assert p.step_s == pytest.approx(0.05, rel=0.01)
    # a pause of the engine (vLLM's /pause with requests running) is one step of two minutes: it
    # took the pace to 12 s, and ranked the requests admitted then to be due half an hour late
    p.observe_step(120.0, decode_tokens=8)
    assert p.step_s < 0.07
    for _ in range(60):  # a real slowdown is still learned
        p.observe_step(0.5, decode_tokens=8)
    assert p.step_s == pytest.approx(0.5, rel=0.05)


def test_a_victims_recompute_counts_its_context_once_prefill_is_measured() -> None:
    """The engine never measured its prefill: a request of 100,000 context tokens and one of 32
    were equally safe to preempt, and the long one, 3.7 s before its deadline, was chosen."""
    p = LocalPolicy(step_s=0.02)
    for _ in range(30):
        p.observe_prefill(0.02 + 0.00005 * 2048, prefill_tokens=2048)  # 50 us a token
    assert p.prefill_s_per_token == pytest.approx(0.00005, rel=0.01)
    p.observe_prefill(600.0, prefill_tokens=1)  # one stalled step moves it a little only
    assert p.prefill_s_per_token < 0.0003

    def running(rid: str, prompt: int) -> RunningView:
        r = Request(rid, "m", prompt, 64, NOW - 1, SLO(None, NOW + 3.7))
        return RunningView(r, generated_tokens=8, kv_tokens=prompt + 8, admitted_at=NOW - 1)

    short, long = running("short", 32), running("long", 100_000)  # 5 s to redo the long one
    assert p.slack(short, NOW) > 0 > p.slack(long, NOW)
    assert p.qlm_select_victim(candidates=[long, short], instance_id="e", now=NOW) is short


def test_a_client_priority_moves_a_request_without_an_slo_by_a_minute_at_most() -> None:
    """Priority moved a request by a second a unit without bound: -100 put a request without an
    SLO before an interactive one due in 0.3 s, +1e9 made one due in 32 years."""
    p = LocalPolicy(step_s=0.02)
    due = Request("due", "m", 32, 16, NOW, SLO(NOW + 0.1, None))
    eager = Request("eager", "m", 32, 16, NOW, SLO(None, None), priority=-100)
    meek = Request("meek", "m", 32, 16, NOW, SLO(None, None), priority=10**9)
    plain = Request("plain", "m", 32, 16, NOW, SLO(None, None))
    key = {r.id: p.qlm_rank_key(request=r, instance_id="e", now=NOW) for r in (due, eager, meek, plain)}
    assert key["due"] < key["eager"] < key["plain"] < key["meek"]  # still an order among them
    assert key["plain"][0] - key["eager"][0] == pytest.approx(60.0)  # at its virtual finish at most
    assert key["meek"][0] - key["plain"][0] == pytest.approx(60.0)


def test_beyond_an_hour_of_slack_requests_are_served_first_come_first_served() -> None:
    """The lines of a batch all share its window's end: in deadline order an earlier 24 h batch's
    lines all went before a later one's. Past FAR_HORIZON_S of slack the order is the arrival's;
    shorter budgets keep their deadline order, and an hour-plus request still goes before one due
    later than its own hour."""
    from qlm_plugin.brain.local_policy import FAR_HORIZON_S

    p = LocalPolicy(step_s=0.02)
    day = 24 * 3600.0
    first = Request("first", "m", 32, 16, NOW, SLO(None, NOW + day))  # the earlier batch
    later = Request("later", "m", 32, 16, NOW + 5, SLO(None, NOW + 600 + day))  # created 10 min later
    minutes = Request("minutes", "m", 32, 16, NOW + 10, SLO(None, NOW + 10 + 900))
    after = Request("after", "m", 32, 16, NOW + 4000, SLO(None, NOW + 4000 + 2 * day))
    key = {r.id: p.qlm_rank_key(request=r, instance_id="e", now=NOW) for r in (first, later, minutes, after)}
    assert key["minutes"] < key["first"] < key["later"] < key["after"]
    assert key["later"][0] == pytest.approx(NOW + 5 + FAR_HORIZON_S)  # not its deadline, a day away
    assert key["minutes"][0] < NOW + 10 + 900  # its deadline less its service, as before


def test_a_user_plugin_overrides_the_engines_order_and_a_broken_one_does_not_stop_it() -> None:
    class LongestPromptFirst:
        @hookimpl
        def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> tuple[int]:
            return (-request.prompt_tokens,)

    b = EngineBrain("tiny", "engine-0", autoload=False, plugins=[("user", LongestPromptFirst())])
    reqs = admitted(
        b,
        [
            (Req("short", num_prompt_tokens=8), QLMFields(ttft_deadline=NOW + 1)),
            (Req("long", num_prompt_tokens=300), QLMFields()),
        ],
    )
    q = RankedQueue(b.key)
    for r in reqs:
        q.add_request(r)
    assert [r.request_id for r in q] == ["long", "short"]

    class Broken:
        @hookimpl
        def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> tuple[int]:
            raise RuntimeError("bug")

    b = EngineBrain("tiny", "engine-0", autoload=False, plugins=[("broken", Broken())])
    r = Req("x")
    assert b.admit(r, QLMFields(), NOW)[1] == r.arrival_time  # arrival order


def test_version_guard_gives_one_clear_error() -> None:
    assert check_vllm("0.32.0") == "0.32.0" and check_vllm("0.33.1+cpu") == "0.33.1+cpu"
    for bad in ("0.31.9", "0.34.0", "1.0.0"):
        with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM >=0.32,<0.34; vLLM .* is installed"):
            check_vllm(bad)


def test_register_is_reentrant_and_imports_no_vllm() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from qlm_plugin.adapters.vllm import register; register(); register(); "
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'vllm imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    register()


def test_one_urgent_request_costs_one_eviction_whichever_side_acts_first() -> None:
    """The engine's own policy and a coordinator's order may both free a seat for the same urgent
    request: the second one is skipped. An order without a beneficiary (an operator's) is carried out."""
    seats = SeatsGiven()
    order = EvictionOrder("victim", "urgent", came=10.0)

    def act(
        o: EvictionOrder,
        given: SeatsGiven,
        *,
        victim: bool = True,
        urgent: bool = False,
        here: bool = True,
        now: float = 10.1,
    ) -> str:
        return order_action(
            o,
            victim_running=victim,
            beneficiary_running=urgent,
            beneficiary_here=here,
            seats=given,
            now=now,
            wait_s=10.0,
        )

    assert act(order, seats) == "evict"
    seats.give("urgent", 10.0)  # the engine's policy freed a seat for it first
    assert act(order, seats) == "skip"
    assert act(order, SeatsGiven(), urgent=True) == "skip"  # it runs already
    operator = EvictionOrder("victim", "", came=10.0)
    assert act(operator, seats) == "evict"
    # the victim is not running yet (the order overtook it): wait, then drop
    early = EvictionOrder("later", "other", came=10.0)
    assert act(early, seats, victim=False, now=12.0) == "wait"
    assert act(early, seats, victim=False, now=21.0) == "drop"
    # the order overtook the urgent request (the Evict is sent before the request): it waits for
    # it (the seat went straight back to the victim, and its mark held the engine's own eviction
    # off for a minute)
    assert act(order, SeatsGiven(), here=False) == "wait"
    assert act(order, SeatsGiven(), here=False, now=21.0) == "drop"
    assert act(operator, SeatsGiven(), here=False) == "evict"  # an operator's is for no request


def test_malformed_numbers_are_ignored_and_integers_clamped() -> None:
    """vLLM's engine died of an OverflowError on ``qlm_priority`` Infinity: every numeric field takes
    finite numbers only (no bools), integers clamped to int32."""

    def parse(**xargs: object) -> QLMFields:
        return parse_fields({f"qlm_{k}": v for k, v in xargs.items()}, priority=7, arrival_time=NOW)

    for bad in (float("inf"), float("-inf"), float("nan"), "Infinity", "1e400", True, [1], {"a": 1}, None):
        f = parse(priority=bad, attempt=bad, ttft_ms=bad, e2e_deadline=bad, predicted_tokens=bad)
        assert (f.priority, f.attempt, f.has_slo, f.predicted_tokens) == (7, 0, False, None), bad
    assert parse(priority=10**400).priority == 2**31 - 1 and parse(priority=-1e300).priority == -(2**31)
    assert parse(priority="-3").priority == -3 and parse(priority=2.9).priority == 2
    assert parse(attempt=3e9).attempt == 2**31 - 1 and parse(attempt=-4).attempt == 0
    assert parse(ttft_ms=10**400).ttft_deadline is None  # too large for a float
    assert parse_fields(["qlm_priority"], priority=1, arrival_time=NOW).priority == 1  # type: ignore[arg-type]
    assert parse_fields({1: 2, "qlm_priority": 4}, priority=0, arrival_time=NOW).priority == 4  # type: ignore[dict-item]


def test_a_field_the_engine_cannot_use_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TTFT of "soon", or a misspelt key, left the request without its SLO and nobody told."""
    from qlm_plugin.adapters.vllm import fields

    monkeypatch.setattr(fields, "_warned", set())
    for _ in range(3):
        parse_fields({"qlm_ttft_ms": "soon", "qlm_ttft": 300, "qlm_e2e_ms": -5}, priority=0, arrival_time=NOW)
    parse_fields({"qlm_ttft_ms": 300, "qlm_priority": -3, "qlm_id": "x"}, priority=0, arrival_time=NOW)
    said = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert len(said) == 3, said
    assert said[0].startswith("QLM: qlm_e2e_ms must be a number above 0, got -5")
    assert said[1].startswith("QLM: qlm_ttft is not a field the engine reads")
    assert said[2].startswith("QLM: qlm_ttft_ms must be a finite number, got 'soon'")


def test_length_hints_are_clipped_and_never_overflow() -> None:
    """A hint of 10 tokens with a 90th percentile of 1e30 overflowed in ``math.exp`` inside a step."""
    f = parse_fields(
        {"qlm_predicted_tokens": 0.001, "qlm_predicted_q90": 1e30},
        priority=0,
        arrival_time=NOW,
        max_tokens=512,
    )
    assert (f.predicted_tokens, f.predicted_q90) == (1.0, 512.0)
    dist = hinted_length(10, 1e30, 0, 1 << 30)
    assert math.isfinite(dist.mean) and dist.quantile(0.5) == pytest.approx(10)
    b = brain()  # unclipped fields straight to the brain: the sigma cap holds
    b.admit(Req("r", max_tokens=1 << 20), QLMFields(predicted_tokens=10, predicted_q90=1e30), NOW)
    assert math.isfinite(b.policy.predict(b.requests["r"], 0).mean)


def test_a_broken_plugin_falls_back_and_is_logged_once_by_name(caplog: pytest.LogCaptureFixture) -> None:
    """Only ``qlm_rank_key`` was guarded: a plugin raising in any other hook took the engine down."""

    class Broken:
        @hookimpl
        def qlm_request_queued(self, request: Request, instance_id: str, now: float) -> None:
            raise RuntimeError("queued")

        @hookimpl
        def qlm_request_finished(self, outcome: object, now: float) -> None:
            raise RuntimeError("finished")

        @hookimpl
        def qlm_select_victim(self, candidates: object, instance_id: str, now: float) -> None:
            raise RuntimeError("victim")

        @hookimpl
        def qlm_predict_output_length(self, request: Request, generated_tokens: int) -> None:
            raise RuntimeError("predict")

    b = EngineBrain("tiny", "engine-0", autoload=False, plugins=[("broken-plugin", Broken())])
    b.policy.step_s = 0.02
    urgent = Req("i")
    b.admit(urgent, QLMFields(ttft_deadline=NOW + 0.5), NOW)
    running = admitted(
        b,
        [
            (Req(f"b{k}", num_output_tokens=5, num_computed_tokens=37, max_tokens=4000), QLMFields())
            for k in range(2)
        ],
    )
    assert b.policy.predict(b.requests["b0"], 5).mean == pytest.approx((4000 - 5) / 2)  # the fallback
    assert b.seat_for([urgent], running, 2, NOW) is None  # no victim: no eviction
    assert len(b.kv_victim_order(running, NOW)) == 2  # least urgent first
    b.finished(running[0], True, NOW)
    b.finished(running[1], True, NOW)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    hooks = ("qlm_request_queued", "qlm_request_finished", "qlm_select_victim", "qlm_predict_output_length")
    assert sorted(r.getMessage().split(" failed in ")[1].split(";")[0] for r in errors) == sorted(hooks)
    assert all("broken-plugin" in r.getMessage() for r in errors)
    assert b.failures["qlm_request_finished"] == 2 and not b.policy._remaining  # nothing left behind


def test_the_ranked_queue_removes_lazily_counts_flagged_requests_and_walks_the_first_in_order() -> None:
    ranks = {f"r{k}": (k * 7919) % 1000 for k in range(1000)}
    q = RankedQueue(lambda r: ranks[r.request_id], flag=lambda r: r.priority == 1)
    reqs = [Req(f"r{k}", priority=k % 2) for k in range(1000)]
    for r in reqs:
        q.add_request(r)
    assert len(q) == 1000 and q.flagged == 500
    q.remove_requests(reqs[:600])
    q.remove_request(reqs[0])  # not there any more: nothing happens
    alive = sorted(reqs[600:], key=lambda r: ranks[r.request_id])
    assert len(q) == 400 and q.flagged == 200 and list(q) == alive
    assert (
        q.first(5) == alive[:5]
        and q.first(3, lambda r: r.priority == 1) == [r for r in alive if r.priority == 1][:3]
    )
    assert q.first(10, lambda r: False, scan=50) == []
    assert (
        q.peek_request() is alive[0] and q.pop_request() is alive[0] and q.flagged == 200 - alive[0].priority
    )
    q.prepend_request(alive[0])  # preempted: back with its rank
    assert [q.pop_request() for _ in range(400)] == alive and not q and q.flagged == 0
    with pytest.raises(IndexError):
        q.peek_request()


def test_a_seat_not_taken_is_given_back_and_a_mark_expires() -> None:
    seats = SeatsGiven(memory_s=60.0)
    seats.give("urgent", 10.0)
    assert seats.given("urgent", 11.0) and not seats.given("urgent", 70.0)
    seats.take_back("urgent")
    assert not seats.given("urgent", 11.0)
