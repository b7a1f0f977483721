"""The vLLM adapter's in-engine policy and request fields, on plain request objects with a fake
clock (no engine); and the plugin entry point's version guard."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest

from qlm_plugin.adapters.vllm import UnsupportedVLLMError, check_vllm, register
from qlm_plugin.adapters.vllm.fields import QLMFields, parse_fields
from qlm_plugin.adapters.vllm.policy import (
    DEFAULT_SLACK_S,
    EvictionOrder,
    InEnginePolicy,
    SeatsGiven,
    order_action,
)

NOW = 1_000.0


@dataclass
class Req:
    request_id: str
    arrival_time: float = NOW
    num_output_tokens: int = 0
    max_tokens: int = 256
    num_prompt_tokens: int = 32


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
    assert f == QLMFields("r1", 2, "interactive", NOW + 1, None, "acme", 40.0, 3)
    rel = parse_fields({"qlm": {"ttft_ms": 500, "e2e_ms": 9000}}, priority=0, arrival_time=NOW)
    assert (rel.ttft_deadline, rel.e2e_deadline) == (NOW + 0.5, NOW + 9.0)
    junk = parse_fields(
        {"qlm_ttft_ms": "soon", "qlm_e2e_deadline": -5, "qlm_attempt": "x"}, priority=0, arrival_time=NOW
    )
    assert not junk.has_slo and junk.attempt == 0  # malformed values: default urgency, still served
    assert not parse_fields(None, priority=0, arrival_time=NOW).has_slo


def test_waiting_order_puts_ttft_bound_before_batch_and_no_slo_last() -> None:
    p = InEnginePolicy(epoch=NOW, step_s=0.02)
    interactive = (Req("i"), QLMFields(ttft_deadline=NOW + 1.0))
    batch_tight = (Req("b1"), QLMFields(e2e_deadline=NOW + 10.0))  # 256 tokens * 20 ms = 5.1 s of work
    batch_loose = (Req("b2"), QLMFields(e2e_deadline=NOW + 600.0))
    plain = (Req("p"), QLMFields())
    plain_urgent = (Req("p0"), QLMFields(priority=-5))
    ranks = {
        r.request_id: p.rank(r, f) for r, f in (interactive, batch_tight, batch_loose, plain, plain_urgent)
    }
    assert sorted(ranks, key=ranks.__getitem__) == ["i", "b1", "p0", "p", "b2"]
    assert p.urgency(*plain) == NOW + DEFAULT_SLACK_S
    assert isinstance(ranks["i"], int)  # vLLM's priority is an int


def _lookup(pairs: list[tuple[Req, QLMFields]]) -> tuple[list[Req], Any]:
    table = {r.request_id: f for r, f in pairs}
    return [r for r, _ in pairs], table.__getitem__


def test_no_eviction_while_a_seat_frees_in_time() -> None:
    p = InEnginePolicy(epoch=NOW, step_s=0.02)
    head, urgent = Req("i"), QLMFields(ttft_deadline=NOW + 1.0)
    running, fields = _lookup(
        [(Req(f"b{k}", num_output_tokens=250), QLMFields()) for k in range(8)]
    )  # 6 left
    assert p.choose_eviction(head, urgent, running, fields, NOW, seats=8) is None
    assert p.choose_eviction(head, urgent, running[:7], fields, NOW, seats=8) is None  # a free seat


def test_eviction_only_when_the_ttft_would_be_missed_and_of_the_one_with_most_slack() -> None:
    p = InEnginePolicy(epoch=NOW, step_s=0.02)
    urgent = QLMFields(ttft_deadline=NOW + 1.0)
    pairs = [
        (
            Req("tight", num_output_tokens=10),
            QLMFields(e2e_deadline=NOW + 6.0),
        ),  # 5 s of work left, 1 s slack
        (Req("loose", num_output_tokens=10), QLMFields(e2e_deadline=NOW + 600.0)),
        (Req("none", num_output_tokens=10, arrival_time=NOW - 5), QLMFields()),  # no SLO: infinite slack
        (
            Req("urgent", num_output_tokens=0, max_tokens=4096),
            QLMFields(ttft_deadline=NOW + 0.5),
        ),  # no victim
    ]
    running, fields = _lookup(pairs)
    choice = p.choose_eviction(Req("i"), urgent, running, fields, NOW, seats=4)
    assert choice is not None and choice.request_id == "none"
    assert p.slack(*pairs[2], NOW) == math.inf
    # Already too late: evicting would waste work for nothing.
    late = QLMFields(ttft_deadline=NOW - 0.1)
    assert p.choose_eviction(Req("i"), late, running, fields, NOW, seats=4) is None
    # No TTFT SLO at the head: never evict.
    assert p.choose_eviction(Req("b"), QLMFields(e2e_deadline=NOW + 5), running, fields, NOW, seats=4) is None
    # Nobody can afford it: no eviction.
    tight, tight_fields = _lookup(
        [(Req(f"t{k}", num_output_tokens=10), QLMFields(e2e_deadline=NOW + 4.95)) for k in range(2)]
    )
    assert p.choose_eviction(Req("i"), urgent, tight, tight_fields, NOW, seats=2) is None


def test_step_time_follows_measurements() -> None:
    p = InEnginePolicy(epoch=NOW, step_s=0.02)
    for _ in range(100):
        p.observe_step(0.05, decode_tokens=8)
    assert p.step_s == pytest.approx(0.05, rel=0.01)
    p.observe_step(10.0, decode_tokens=0)  # prefill-only steps do not count
    assert p.step_s == pytest.approx(0.05, rel=0.01)


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
        o: EvictionOrder, given: SeatsGiven, *, victim: bool = True, urgent: bool = False, now: float = 10.1
    ) -> str:
        return order_action(
            o, victim_running=victim, beneficiary_running=urgent, seats=given, now=now, wait_s=10.0
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
