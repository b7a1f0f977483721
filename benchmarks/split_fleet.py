"""What splitting a fleet across coordinators by model costs, simulated (docs/coordinator.md,
"Beyond one machine"). Run from the checkout:

    python benchmarks/split_fleet.py --mix 0.5 --rates 8,12,16 [--policy qlm]

Four H100s serve Llama-3.1-8B and Phi-4 (``--mix``: the 8B's share of the requests; 70%
interactive with a 1 s TTFT SLO, 30% batch with 10 minutes end to end) from the Azure conversation
trace beside the checkout (``../shared/traces``, CC-BY 4.0; the packaged sample without it) at each
rate scale. **joint**: one coordinator, every engine able to swap to either model (both warm).
**split N+M**: one coordinator per model, N engines of the 8B and M of Phi-4, no swaps; its
attainment is the two groups' weighted by their share of the requests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_llm_2023_conv.csv"
CLASSES = [
    {"name": "interactive", "share": 0.7, "ttft_s": 1.0, "priority": 0},
    {"name": "batch", "share": 0.3, "e2e_s": 600, "priority": 1},
]
EIGHT_B = {"name": "llama-3.1-8b", "profile": "llama-3.1-8b"}
PHI = {"name": "phi-4", "profile": "phi-4"}


def scenario(
    name: str, models: list[dict[str, Any]], groups: list[dict[str, Any]], rate: float
) -> dict[str, Any]:
    trace = str(TRACE) if TRACE.exists() else "conv"
    workload = {"trace": trace, "rate_scale": rate, "max_tokens": 2048}
    return {
        "name": name,
        "seed": 0,
        "workload": workload,
        "models": models,
        "instances": groups,
        "classes": CLASSES,
    }


def simulate(folder: Path, spec: dict[str, Any], policy: str) -> tuple[float, float]:
    """(SLO attainment, GPU busy fraction) of ``policy`` on the scenario ``spec``."""
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "qlm_plugin.cli", "simulate", "--scenario", str(path)]
    out = subprocess.run(
        [*cmd, "--policies", policy, "--no-progress", "--json"], capture_output=True, text=True, check=True
    )
    overall = json.loads(out.stdout)["policies"][policy]["overall"]
    return overall["slo_attainment"], overall["gpu_busy_fraction"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", type=float, default=0.5, help="the 8B's share of the requests (default 0.5)")
    ap.add_argument("--rates", default="8,12,16", help="rate scales of the trace (default 8,12,16)")
    ap.add_argument("--policy", default="qlm")
    args = ap.parse_args()
    mix = args.mix
    print("| rate scale | joint (busy) | split 2+2 (8B, Phi-4) | split 3+1 (8B, Phi-4) |")
    print("| ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rate in (float(r) for r in args.rates.split(",")):
            both = [
                {"name": "a", "count": 2, "gpu": "h100", "models": ["llama-3.1-8b", "phi-4"]},
                {"name": "b", "count": 2, "gpu": "h100", "models": ["phi-4", "llama-3.1-8b"]},
            ]
            models = [{**EIGHT_B, "share": mix}, {**PHI, "share": 1 - mix}]
            met, busy = simulate(folder, scenario(f"joint-{rate}", models, both, rate), args.policy)
            row = [f"{rate:g}", f"{100 * met:.1f}% ({100 * busy:.0f}%)"]
            for n in (2, 3):
                # Each group sees its model's arrivals only: the trace at the model's share of the rate.
                eight, _ = simulate(
                    folder,
                    scenario(
                        f"8b-{rate}-{n}",
                        [EIGHT_B],
                        [{"name": "a", "count": n, "gpu": "h100", "models": ["llama-3.1-8b"]}],
                        rate * mix,
                    ),
                    args.policy,
                )
                phi, _ = simulate(
                    folder,
                    scenario(
                        f"phi-{rate}-{n}",
                        [PHI],
                        [{"name": "b", "count": 4 - n, "gpu": "h100", "models": ["phi-4"]}],
                        rate * (1 - mix),
                    ),
                    args.policy,
                )
                row.append(
                    f"{100 * (mix * eight + (1 - mix) * phi):.1f}% ({100 * eight:.1f}%, {100 * phi:.1f}%)"
                )
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
