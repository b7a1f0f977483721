#!/usr/bin/env python
"""QLM on a real GPU: run it on a machine with an NVIDIA GPU and vLLM installed.

    pip install -e ".[vllm]"          # the CUDA vLLM of the supported range
    python integration/gpu/run_gpu_scenario.py --out gpu-results.json

What it does (nothing is downloaded: the model is built here with random weights):
1. builds a random-weight model with Llama-3.1-8B's shapes (``--layers`` trims it for a quick run);
2. runs the issue-5 workload at scale on one engine under vLLM FCFS, vLLM priority and QLM
   (``--scheduler-cls qlm_plugin.adapters.vllm.QLMScheduler``): a batch backlog, then interactive
   requests with a TTFT SLO; reports SLO attainment, TTFT and the batch makespan;
3. measures sleep mode: ``/sleep?level=1`` (weights to host memory), ``/wake_up``, and level 2;
4. runs QLM with a KV offload tier (``--kv-offloading-size``) and reports the evictions whose KV
   came back from host memory (the "swap" LSO) against recompute;
5. the multi-model swap scenario: ``qlm serve --engine vllm`` with the model under two names on
   one GPU, ``--max-awake 1``, at sleep level 1 and then 2, each engine with 85% of the GPU's
   memory (they start one after another): bursts alternating the models; reports the requests
   served (each once), the swaps and each swap's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from qlm_plugin.adapters.vllm.bench import run_policy
from qlm_plugin.adapters.vllm.launch import start_server, wait_ready
from qlm_plugin.deploy.child_process import free_port


def build_model(out: Path, layers: int) -> Path:
    """Llama-3.1-8B's shapes with random weights, and a locally trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlm_plugin.testing.tiny_model import build_tiny_llama

    build_tiny_llama(out)  # the tokenizer (and a config we replace)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def post(url: str, path: str) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + path, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t0


def sleep_wake(model: Path, work: Path) -> dict[str, float]:
    port = free_port()
    server = start_server(
        model,
        port,
        work / "sleep.log",
        scheduler=True,
        max_num_seqs=256,
        max_model_len=4096,
        extra_args=["--enable-sleep-mode"],
        env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"},
    )
    try:
        wait_ready([server], timeout_s=1200)
        out = {
            "sleep_level1_s": post(server.url, "/sleep?level=1"),
            "wake_level1_s": post(server.url, "/wake_up"),
        }
        out["sleep_level2_s"] = post(server.url, "/sleep?level=2")
        out["wake_level2_s"] = post(server.url, "/wake_up")
        return out
    finally:
        server.stop()


GPU_ENGINE_ARGS = ("--max-model-len", "4096", "--max-num-seqs", "64", "--gpu-memory-utilization", "0.45")
#: The swap scenario's engines each take most of the GPU: possible because ``qlm serve`` starts
#: them one after another, each put to sleep before the next starts.
SWAP_ENGINE_ARGS = ("--max-model-len", "4096", "--max-num-seqs", "64", "--gpu-memory-utilization", "0.85")


def swap_scenario(
    model: Path,
    work: Path,
    level: int,
    bursts: int = 6,
    per_burst: int = 32,
    engine_args: tuple[str, ...] = SWAP_ENGINE_ARGS,
    tokens: int = 128,
) -> dict[str, object]:
    """Two models sharing the GPU, one awake: swaps at sleep ``level``, from ``qlm serve``'s log."""
    import asyncio
    import re
    import signal
    import subprocess

    import openai

    from qlm_plugin.deploy.child_process import python_command

    http = free_port()
    log = work / f"serve-swap-level{level}.log"
    cmd = python_command(
        "qlm_plugin.cli", "serve", "--engine", "vllm", "--model", f"llama-a={model}", "--model",
        f"llama-b={model}", "--max-awake", "1", "--sleep-level", str(level), "--http-port", str(http),
        "--grpc-port", str(free_port()), "--journal", str(work / f"swap{level}.db"), "--engine-logs",
        str(work / f"swap{level}-engines"), "--", *engine_args,
    )  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 1800
        while "engines registered" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qlm serve did not start: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(2)

        async def run() -> list[tuple[str, int]]:
            oa = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", timeout=1800)

            async def one(name: str, i: int) -> tuple[str, int]:
                r = await oa.completions.create(
                    model=name,
                    prompt=f"burst {i}",
                    max_tokens=tokens,
                    extra_body={"qlm": {"true_output_tokens": tokens}},
                )
                return r.id, r.usage.completion_tokens if r.usage else 0

            tasks = []
            for b in range(bursts):
                name = "llama-a" if b % 2 == 0 else "llama-b"
                tasks += [asyncio.create_task(one(name, b * 1000 + i)) for i in range(per_burst)]
                await asyncio.sleep(2.0)
            return await asyncio.gather(*tasks)

        t0 = time.perf_counter()
        answers = asyncio.run(run())
        took = time.perf_counter() - t0
        text = log.read_text(errors="replace")
        times = [float(t) for t in re.findall(r"switched in ([0-9.]+) s", text)]
        return {
            "sleep_level": level,
            "requests": bursts * per_burst,
            "served": len(answers),
            "unique": len({rid for rid, _ in answers}),
            "tokens_ok": sum(n == tokens for _, n in answers),
            "swaps": len(times),
            "swap_s": times,
            "failed_switches": len(re.findall(r"switch to \S+ failed", text)),
            "wall_s": round(took, 1),
        }
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: the real 8B depth)")
    ap.add_argument("--batch", type=int, default=4000, help="batch requests at t=0")
    ap.add_argument("--interactive", type=int, default=400, help="interactive requests")
    ap.add_argument("--rate", type=float, default=20.0, help="interactive arrivals per second")
    ap.add_argument("--kv-offload-gib", type=float, default=32.0, help="KV offload tier for the swap run")
    ap.add_argument("--work", default="gpu-work", help="folder for the model and logs")
    ap.add_argument("--out", default="gpu-results.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "llama-8b-shapes"
    if not (model / "config.json").exists():
        build_model(model, args.layers)
    results: dict[str, object] = {"layers": args.layers}
    kw = {
        "batch": args.batch,
        "interactive": args.interactive,
        "rate": args.rate,
        "slo_s": 1.0,
        "max_num_seqs": 256,
    }
    for policy in ("fcfs", "priority", "qlm"):
        results[policy] = run_policy(model, policy, free_port(), work, **kw).__dict__
        print(policy, results[policy], flush=True)
    results["sleep_mode"] = sleep_wake(model, work)
    print("sleep mode", results["sleep_mode"], flush=True)
    os.environ["QLM_EXTRA_VLLM_ARGS"] = f"--kv-offloading-size {args.kv_offload_gib}"
    results["qlm_kv_offload"] = run_policy(model, "qlm", free_port(), work, **kw).__dict__
    os.environ.pop("QLM_EXTRA_VLLM_ARGS")
    for level in (1, 2):
        results[f"swap_level{level}"] = swap_scenario(model, work, level, engine_args=SWAP_ENGINE_ARGS)
        print(f"swap level {level}", results[f"swap_level{level}"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
