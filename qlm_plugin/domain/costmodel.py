"""Engine cost model: step time of a continuous-batching engine, KV capacity, model load times.

A step that computes ``p`` prefill tokens and ``d`` decode tokens takes ``b0 + b1*p + b2*d`` microseconds.
The defaults are published fits (BLIS simulator, vLLM 0.8.4; docs/DESIGN facts); any entry can be
overridden from a YAML file or a scenario.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

#: KV cache block size in tokens (vLLM's default).
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """Host link and load speeds of one GPU kind."""

    name: str
    host_link_gbps: float  # host<->GPU copy bandwidth, GB/s (PCIe 4: ~25, PCIe 5: ~50)
    cold_load_gbps: float = 2.0  # weights from disk into a fresh engine, GB/s
    cold_start_s: float = 20.0  # process + engine start before weights stream in
    warm_start_s: float = 0.5  # wake from sleep mode beyond the weight copy


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Shape facts of a model family that do not depend on the GPU."""

    name: str
    weights_gb: float
    kv_bytes_per_token: int
    context_len: int


@dataclass(frozen=True, slots=True)
class CostModel:
    """Cost of serving one model on one GPU kind (possibly with tensor parallelism)."""

    model: ModelProfile
    gpu: GPUSpec
    tp: int
    b0_us: float
    b1_us: float
    b2_us: float
    kv_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def step_s(self, prefill_tokens: int, decode_tokens: int) -> float:
        return (self.b0_us + self.b1_us * prefill_tokens + self.b2_us * decode_tokens) * 1e-6

    def decode_tpot_s(self, batch: int) -> float:
        """Time per output token of a pure-decode batch of ``batch`` requests."""
        return self.step_s(0, batch)

    def kv_transfer_s(self, tokens: int) -> float:
        """Time to copy ``tokens`` tokens of KV cache between GPU and host memory, one way."""
        # KV is sharded over the tp GPUs, each copying its shard over its own host link.
        return tokens * self.model.kv_bytes_per_token / (self.gpu.host_link_gbps * 1e9 * self.tp)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // BLOCK_SIZE)

    def load_s(self, warm: bool) -> float:
        """Time until the model serves: from host memory (warm, sleep-mode wake) or from disk (cold)."""
        if warm:
            return self.gpu.warm_start_s + self.model.weights_gb / (self.gpu.host_link_gbps * self.tp)
        return self.gpu.cold_start_s + self.model.weights_gb / self.gpu.cold_load_gbps


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("h100", host_link_gbps=50.0),
    "a100-80": GPUSpec("a100-80", host_link_gbps=25.0),
}

MODELS: dict[str, ModelProfile] = {
    "llama-3.1-8b": ModelProfile(
        "llama-3.1-8b", weights_gb=16.1, kv_bytes_per_token=128 * 1024, context_len=32768
    ),
    "llama-3.3-70b": ModelProfile(
        "llama-3.3-70b", weights_gb=141.0, kv_bytes_per_token=320 * 1024, context_len=32768
    ),
    "phi-4": ModelProfile("phi-4", weights_gb=29.3, kv_bytes_per_token=200 * 1024, context_len=16384),
    "mistral-small-24b": ModelProfile(
        "mistral-small-24b", weights_gb=47.1, kv_bytes_per_token=160 * 1024, context_len=32768
    ),
}

# (model, gpu) -> (tp, b0_us, b1_us, b2_us, kv_blocks): DESIGN.md section 5.
_FITS: dict[tuple[str, str], tuple[int, float, float, float, int]] = {
    ("llama-3.1-8b", "h100"): (1, 5753, 17.25, 6.00, 29205),
    ("llama-3.1-8b", "a100-80"): (1, 16442, 47.84, 18.21, 29205),
    ("llama-3.3-70b", "h100"): (4, 12601, 76.42, 66.84, 128273),
    ("phi-4", "h100"): (1, 4406, 47.41, 23.36, 14645),
    ("mistral-small-24b", "a100-80"): (2, 8045, 185.13, 13.89, 81996),
}


class UnknownProfileError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def known_profiles() -> list[str]:
    return sorted(f"{m}/{g}" for m, g in _FITS)


def cost_model(
    model: str,
    gpu: str,
    overrides: Mapping[str, Any] | None = None,
) -> CostModel:
    """The calibrated cost model of ``model`` on ``gpu`` (names as in the table, case-insensitive).

    ``overrides`` replaces any field (``b0_us``, ``b1_us``, ``b2_us``, ``kv_blocks``, ``tp``,
    ``max_num_seqs``, ``max_num_batched_tokens``, and the model facts ``weights_gb``,
    ``kv_bytes_per_token``, ``context_len``); with all of ``b0_us``..``kv_blocks`` given, a pair
    missing from the table can be defined.
    """
    m, g = _norm(model), _norm(gpu)
    ov = {k: _whole(k, v) if k in _WHOLE_FIELDS else v for k, v in (overrides or {}).items()}
    model_fields = {k: ov.pop(k) for k in ("weights_gb", "kv_bytes_per_token", "context_len") if k in ov}
    gpu_fields = {
        k: ov.pop(k) for k in ("host_link_gbps", "cold_load_gbps", "cold_start_s", "warm_start_s") if k in ov
    }
    fit = _FITS.get((m, g))
    if fit is None:
        needed = {"b0_us", "b1_us", "b2_us", "kv_blocks"}
        if not needed <= ov.keys():
            raise UnknownProfileError(
                f"no cost profile for model {model!r} on gpu {gpu!r}; known: {', '.join(known_profiles())} "
                f"(a scenario may give its own: b0_us, b1_us, b2_us and kv_blocks in its profiles)"
            )
        fit = (int(ov.get("tp", 1)), ov["b0_us"], ov["b1_us"], ov["b2_us"], int(ov["kv_blocks"]))
    base_model = MODELS.get(m)
    if base_model is None:
        if not {"weights_gb", "kv_bytes_per_token", "context_len"} <= model_fields.keys():
            raise UnknownProfileError(
                f"unknown model profile {model!r}; known: {', '.join(sorted(MODELS))} "
                "(a scenario may give its own: weights_gb, kv_bytes_per_token and context_len in its "
                "profiles)"
            )
        base_model = ModelProfile(m, 0.0, 0, 0)
    base_gpu = GPUS.get(g) or GPUSpec(g, host_link_gbps=25.0)
    tp, b0, b1, b2, blocks = fit
    result = CostModel(
        model=replace(base_model, **model_fields),
        gpu=replace(base_gpu, **gpu_fields),
        tp=tp,
        b0_us=b0,
        b1_us=b1,
        b2_us=b2,
        kv_blocks=blocks,
    )
    unknown = set(ov) - {
        "tp",
        "b0_us",
        "b1_us",
        "b2_us",
        "kv_blocks",
        "max_num_seqs",
        "max_num_batched_tokens",
    }
    if unknown:
        raise UnknownProfileError(f"unknown cost-model field(s): {', '.join(sorted(unknown))}")
    result = replace(result, **ov)
    _check(result)
    return result


_INT_FIELDS = ("tp", "kv_blocks", "max_num_seqs", "max_num_batched_tokens")
_WHOLE_FIELDS = (*_INT_FIELDS, "kv_bytes_per_token", "context_len")


def _whole(name: str, value: Any) -> Any:
    """Config files give numbers as floats; a whole-number field takes 2048.0 but not 100.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


def _check(c: CostModel) -> None:
    """Reject values that would make times negative or divide by zero later in a run."""
    for name in ("b0_us", "b1_us", "b2_us"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name in _INT_FIELDS:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    m, g = c.model, c.gpu
    for label, value, whole in (
        ("weights_gb", m.weights_gb, False),
        ("kv_bytes_per_token", m.kv_bytes_per_token, True),
        ("context_len", m.context_len, True),
        ("host_link_gbps", g.host_link_gbps, False),
        ("cold_load_gbps", g.cold_load_gbps, False),
    ):
        bad_type = isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
        if bad_type or not math.isfinite(value) or value <= 0:
            kind = "a whole number" if whole else "a finite number"
            raise ValueError(f"{label} must be {kind} > 0, got {value!r}")
    for label, value in (("cold_start_s", g.cold_start_s), ("warm_start_s", g.warm_start_s)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")


def gpu_speed(reference: Mapping[str, CostModel], gpu: str) -> float:
    """How fast ``gpu`` serves against the GPUs of the ``reference`` cost models (a slower GPU < 1),
    from the table: the geometric mean, over the models profiled on both, of the reference step
    time over this GPU's, at a mixed step (a 512-token prompt chunk beside 32 decodes). 1 where
    no model is profiled on both (an unknown GPU is taken as the reference)."""
    ratios = []
    for c in reference.values():
        if (_norm(c.model.name), _norm(gpu)) in _FITS:
            ratios.append(c.step_s(512, 32) / cost_model(c.model.name, gpu).step_s(512, 32))
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0
