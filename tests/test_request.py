"""Requests and their validation: every rejection names the offending field."""

from __future__ import annotations

import math

import pytest

from qlm_plugin.domain.request import (
    DEFAULT_CLASSES,
    ModelSpec,
    RequestValidationError,
    SLOClass,
    make_request,
)

MODELS = {"llama": ModelSpec("llama", context_len=4096)}


def test_deadlines_are_arrival_plus_budgets() -> None:
    r = make_request("a", "llama", 100, 50, 10.0, ttft_s=1.5, e2e_s=30.0, models=MODELS)
    assert (r.slo.ttft_deadline, r.slo.e2e_deadline) == (11.5, 40.0)
    assert r.slo.first_deadline() == 11.5


def test_class_supplies_budgets_priority_and_weight_and_request_overrides_them() -> None:
    gold = SLOClass("gold", ttft_s=0.5, e2e_s=20.0, weight=4.0, priority=-2)
    r = make_request("a", "llama", 10, 5, 0.0, slo_class=gold)
    assert (r.slo_class, r.priority, r.weight, r.slo.ttft_deadline) == ("gold", -2, 4.0, 0.5)
    r2 = make_request("b", "llama", 10, 5, 0.0, slo_class=gold, ttft_s=2.0, priority=3, weight=0.5)
    assert (r2.priority, r2.weight, r2.slo.ttft_deadline, r2.slo.e2e_deadline) == (3, 0.5, 2.0, 20.0)


def test_batch_class_has_only_an_end_to_end_deadline() -> None:
    r = make_request("a", "llama", 10, 5, 100.0, slo_class=DEFAULT_CLASSES["batch"])
    assert r.slo.ttft_deadline is None and r.slo.e2e_deadline == 700.0
    assert r.slo.first_deadline() == 700.0


def test_a_budget_given_is_not_contradicted_by_its_class() -> None:
    """An end-to-end budget shorter than the class's TTFT (a short answer wanted within 0.9 s of
    an interactive class with a 1 s TTFT), or a TTFT past the class's end-to-end budget: the
    caller's stands alone, where it was a 400 naming a budget the caller never sent."""
    interactive = SLOClass("interactive", ttft_s=1.0, e2e_s=60.0)
    short = make_request("a", "llama", 10, 5, 0.0, slo_class=interactive, e2e_s=0.9)
    assert (short.slo.ttft_deadline, short.slo.e2e_deadline) == (None, 0.9)
    lax = make_request("b", "llama", 10, 5, 0.0, slo_class=DEFAULT_CLASSES["batch"], ttft_s=700.0)
    assert (lax.slo.ttft_deadline, lax.slo.e2e_deadline) == (700.0, None)
    fits = make_request("c", "llama", 10, 5, 0.0, slo_class=interactive, e2e_s=5.0)
    assert (fits.slo.ttft_deadline, fits.slo.e2e_deadline) == (1.0, 5.0)  # the class's TTFT holds


def test_no_slo_means_no_deadline() -> None:
    r = make_request("a", "llama", 10, 5, 0.0, slo_class=SLOClass("best-effort"))
    assert r.slo.first_deadline() == math.inf


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"ttft_s": -1.0}, "slo.ttft_s", "> 0"),
        ({"e2e_s": -5.0}, "slo.e2e_s", "> 0"),
        ({"ttft_s": 0.0}, "slo.ttft_s", "> 0"),
        ({"ttft_s": math.nan}, "slo.ttft_s", "finite"),
        ({"ttft_s": 10.0, "e2e_s": 5.0}, "slo.e2e_s", "shorter than the TTFT SLO"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"prompt_tokens": 0}, "prompt_tokens", ">= 1"),
        ({"model": "gpt-9"}, "model", "unknown model 'gpt-9' (served: llama)"),
        ({"prompt_tokens": 5000}, "prompt_tokens", "does not fit llama's context of 4096"),
        ({"prompt_tokens": 4000, "max_tokens": 200}, "max_tokens", "exceeds llama's context of 4096"),
        ({"weight": -1.0}, "weight", ">= 0"),
        ({"tenant": ""}, "tenant", "non-empty"),
        ({"id": ""}, "id", "non-empty"),
    ],
)
def test_invalid_requests_are_rejected_naming_the_field(
    kwargs: dict[str, object], field: str, words: str
) -> None:
    args: dict[str, object] = {
        "id": "r",
        "model": "llama",
        "prompt_tokens": 100,
        "max_tokens": 50,
        "arrival_time": 0.0,
    }
    args.update(kwargs)
    with pytest.raises(RequestValidationError) as info:
        make_request(models=MODELS, **args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert words in str(info.value)
    assert str(info.value).startswith(field + ":")


def test_a_request_that_exactly_fills_the_context_is_accepted() -> None:
    r = make_request("a", "llama", 4000, 96, 0.0, models=MODELS)
    assert r.prompt_tokens + r.max_tokens == 4096
