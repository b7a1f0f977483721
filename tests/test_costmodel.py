"""The cost-model catalogue (DESIGN.md section 5) and its overrides."""

from __future__ import annotations

import pytest

from qlm_plugin.domain.costmodel import UnknownProfileError, cost_model, known_profiles

TABLE = {  # model/gpu -> (tp, b0, b1, b2, kv_blocks), as published
    "llama-3.1-8b/h100": (1, 5753, 17.25, 6.00, 29205),
    "llama-3.1-8b/a100-80": (1, 16442, 47.84, 18.21, 29205),
    "llama-3.3-70b/h100": (4, 12601, 76.42, 66.84, 128273),
    "phi-4/h100": (1, 4406, 47.41, 23.36, 14645),
    "mistral-small-24b/a100-80": (2, 8045, 185.13, 13.89, 81996),
}


@pytest.mark.parametrize("key", sorted(TABLE))
def test_catalogue_holds_the_published_fits(key: str) -> None:
    model, gpu = key.split("/")
    c = cost_model(model.upper(), gpu.replace("-", "_"))  # names are case- and separator-insensitive
    assert (c.tp, c.b0_us, c.b1_us, c.b2_us, c.kv_blocks) == TABLE[key]
    assert c.step_s(100, 10) == pytest.approx((c.b0_us + 100 * c.b1_us + 10 * c.b2_us) * 1e-6)
    assert known_profiles() == sorted(TABLE)


def test_warm_start_is_18_to_200_times_faster_than_a_cold_one() -> None:
    for key in TABLE:
        c = cost_model(*key.split("/"))
        ratio = c.load_s(warm=False) / c.load_s(warm=True)
        assert 18 <= ratio <= 200, (key, ratio)
        assert 20 <= c.load_s(warm=False) <= 120, "cold vLLM restarts take 30-100+ s for 7-70B"


def test_kv_swap_time_uses_the_host_link_of_every_tensor_parallel_gpu() -> None:
    c8 = cost_model("llama-3.1-8b", "h100")
    assert c8.kv_transfer_s(1000) == pytest.approx(1000 * 128 * 1024 / 50e9)
    c70 = cost_model("llama-3.3-70b", "h100")
    assert c70.kv_transfer_s(1000) == pytest.approx(1000 * 320 * 1024 / (4 * 50e9))


def test_overrides_replace_fields_and_define_new_pairs() -> None:
    c = cost_model("llama-3.1-8b", "h100", {"b0_us": 6000, "max_num_seqs": 64.0, "context_len": 4096.0})
    assert (c.b0_us, c.max_num_seqs, c.model.context_len) == (6000, 64, 4096)
    assert isinstance(c.max_num_seqs, int) and isinstance(c.model.context_len, int)
    new = cost_model("phi-4", "a100-80", {"b0_us": 9000, "b1_us": 90, "b2_us": 40, "kv_blocks": 9000})
    assert new.kv_blocks == 9000 and new.model.weights_gb == pytest.approx(29.3)


@pytest.mark.parametrize(
    ("model", "gpu", "overrides", "message"),
    [
        ("llama-3.1-8b", "h200", None, "no cost profile for model 'llama-3.1-8b' on gpu 'h200'"),
        (
            "gpt-9",
            "h100",
            {"b0_us": 1, "b1_us": 1, "b2_us": 1, "kv_blocks": 10},
            "unknown model profile 'gpt-9'",
        ),
        ("llama-3.1-8b", "h100", {"b9_us": 1}, "unknown cost-model field(s): b9_us"),
    ],
)
def test_unknown_profiles_and_fields_are_named(
    model: str, gpu: str, overrides: dict[str, float] | None, message: str
) -> None:
    with pytest.raises(UnknownProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cost_model(model, gpu, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"b1_us": -1.0}, "b1_us must be a finite number >= 0"),
        ({"kv_blocks": 100.5}, "kv_blocks must be a whole number"),
        ({"tp": 0}, "tp must be a whole number >= 1"),
        ({"weights_gb": -5.0}, "weights_gb must be a finite number > 0"),
        ({"host_link_gbps": 0.0}, "host_link_gbps must be a finite number > 0"),
        ({"cold_start_s": float("inf")}, "cold_start_s must be a finite number >= 0"),
    ],
)
def test_values_that_would_break_a_run_later_are_rejected_now(
    overrides: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cost_model("llama-3.1-8b", "h100", overrides)
