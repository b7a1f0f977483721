"""Sanity check of the simulator against its cost model: pure-decode TPOT and token throughput."""

from __future__ import annotations

from functools import partial

import pluggy

from qlm_plugin.adapters.sim import SimBackend, SimFleet, SimInstance
from qlm_plugin.domain.costmodel import cost_model
from qlm_plugin.domain.request import Request, make_request
from qlm_plugin.hooks import get_plugin_manager

PROMPT_TOKENS = 16  # small enough that a batch of 256 prefills in one step
OUTPUT_TOKENS = 512


def _dispatch(pm: pluggy.PluginManager, instance_id: str, request: Request) -> None:
    pm.hook.qlm_dispatch(instance_id=instance_id, request=request)


def cost_check(model: str, gpu: str, batches: list[int]) -> list[dict[str, float]]:
    """Run ``batch`` identical requests at once on one simulated instance and compare the measured
    time per output token and decode throughput with ``b0 + b2*batch``."""
    cm = cost_model(model, gpu)
    rows = []
    for batch in batches:
        if not 1 <= batch <= cm.max_num_seqs:
            raise ValueError(
                f"--batches: {batch} is outside 1..{cm.max_num_seqs}, the batch sizes {model} runs on {gpu}"
            )
        inst = SimInstance("check-0", gpu, {model: cm}, initial_model=model)
        fleet = SimFleet([inst])
        backend = SimBackend(fleet)
        pm = get_plugin_manager(autoload=False)
        pm.register(backend)
        backend.attach(pm)
        requests = [
            make_request(f"c{i}", model, PROMPT_TOKENS, OUTPUT_TOKENS, 0.0, true_output_tokens=OUTPUT_TOKENS)
            for i in range(batch)
        ]
        fleet.run(requests, partial(_dispatch, pm, "check-0"))
        outcomes = list(backend.outcomes.values())
        tpots = [
            (o.finish_time - o.first_token_time) / (o.output_tokens - 1)  # type: ignore[operator]
            for o in outcomes
        ]
        tpot_sim = sum(tpots) / len(tpots)
        tpot_model = cm.decode_tpot_s(batch)
        rows.append(
            {
                "batch": batch,
                "tpot_sim_ms": tpot_sim * 1e3,
                "tpot_model_ms": tpot_model * 1e3,
                "tokens_per_s_sim": batch / tpot_sim,
                "tokens_per_s_model": batch / tpot_model,
                "rel_error": abs(tpot_sim - tpot_model) / tpot_model,
            }
        )
    return rows
