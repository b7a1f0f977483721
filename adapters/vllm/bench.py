"""``qlm bench-vllm``: QLM's scheduler against vLLM's FCFS and priority policies on one real engine.

The workload of issue 5: one vLLM server (the tiny random Llama on CPU, ``--max-num-seqs 8``), a
backlog of 400 batch requests of 256 output tokens at t=0, then 40 interactive requests of 16
tokens arriving at 2/s with a 1 s TTFT SLO. Each policy gets a fresh server. Reported per policy:
interactive SLO attainment and TTFT, the batch makespan, preemptions, and for QLM the time its
code adds to each scheduling step.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

POLICIES = ("fcfs", "priority", "qlm")


@dataclass
class BenchResult:
    policy: str
    interactive_met: float  # fraction of interactive requests with TTFT <= SLO
    ttft_p50_s: float
    ttft_p90_s: float
    batch_makespan_s: float
    preemptions: float
    qlm_overhead_per_step_us: float | None = None
    qlm_overhead_fraction: float | None = None
    qlm_evictions: float | None = None


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def _workload(
    url: str, *, batch: int, batch_tokens: int, interactive: int, rate: float, slo_s: float, policy: str
) -> tuple[list[float], float]:
    import aiohttp

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    ) as http:
        t0 = time.monotonic()

        async def one_batch() -> float:
            body = {
                "model": "tiny",
                "prompt": "the quick brown fox " * 8,
                "max_tokens": batch_tokens,
                "ignore_eos": True,
                "priority": 1,
                "vllm_xargs": {"qlm_class": "batch", "qlm_e2e_ms": 3_600_000},
            }
            async with http.post(f"{url}/v1/completions", json=body) as r:
                await r.read()
                assert r.status == 200, await r.text()
            return time.monotonic() - t0

        async def one_interactive(delay: float) -> float:
            await asyncio.sleep(delay)
            body = {
                "model": "tiny",
                "prompt": "hello world",
                "max_tokens": 16,
                "ignore_eos": True,
                "stream": True,
                "priority": 0,
                "vllm_xargs": {"qlm_class": "interactive", "qlm_ttft_ms": slo_s * 1000},
            }
            sent = time.monotonic()
            ttft = float("inf")
            async with http.post(f"{url}/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: {") and ttft == float("inf"):
                        ttft = time.monotonic() - sent
            return ttft

        batch_tasks = []
        for i in range(batch):  # in waves: 400 simultaneous connects overflow the listen backlog
            batch_tasks.append(asyncio.create_task(one_batch()))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the backlog is in the engine before the first interactive request
        ttfts = await asyncio.gather(*(one_interactive(i / rate) for i in range(interactive)))
        makespan = max(await asyncio.gather(*batch_tasks))
    return list(ttfts), makespan


def run_policy(
    model: Path,
    policy: str,
    port: int,
    work: Path,
    *,
    batch: int = 400,
    batch_tokens: int = 256,
    interactive: int = 40,
    rate: float = 2.0,
    slo_s: float = 1.0,
    max_num_seqs: int = 8,
) -> BenchResult:
    from qlm_plugin.adapters.vllm.launch import start_server, wait_ready

    stats = work / f"{policy}.stats.jsonl"
    server = start_server(
        model,
        port,
        work / f"{policy}.log",
        max_num_seqs=max_num_seqs,
        scheduler=policy == "qlm",
        policy="priority" if policy == "priority" else "fcfs",
        env={**__import__("os").environ, "QLM_VLLM_STATS": str(stats)},
    )
    try:
        wait_ready([server], timeout_s=600)
        before = _metric(server.url, "vllm:num_preemptions_total")
        ttfts, makespan = asyncio.run(
            _workload(
                server.url,
                batch=batch,
                batch_tokens=batch_tokens,
                interactive=interactive,
                rate=rate,
                slo_s=slo_s,
                policy=policy,
            )
        )
        preemptions = _metric(server.url, "vllm:num_preemptions_total") - before
    finally:
        server.stop()
    result = BenchResult(
        policy=policy,
        interactive_met=sum(t <= slo_s for t in ttfts) / len(ttfts),
        ttft_p50_s=statistics.median(ttfts),
        ttft_p90_s=statistics.quantiles(ttfts, n=10)[8],
        batch_makespan_s=makespan,
        preemptions=preemptions,
    )
    if stats.exists():
        lines = [json.loads(x) for x in stats.read_text().splitlines() if x.strip()]
        if lines:
            last = lines[-1]
            steps = max(1, last["steps"])
            result.qlm_overhead_per_step_us = last["overhead_s"] / steps * 1e6
            result.qlm_overhead_fraction = last["overhead_s"] / max(1e-9, last["step_s"])
            result.qlm_evictions = last["evictions"]
    return result


def run(model: Path | None = None, policies: tuple[str, ...] = POLICIES, **kw: Any) -> list[BenchResult]:
    from qlm_plugin.coordinator.loadtest import free_port

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if model is None:
            from qlm_plugin.adapters.vllm.launch import build_tiny_model

            model = build_tiny_model(work)
        return [run_policy(model, p, free_port(), work, **kw) for p in policies]


def table(results: list[BenchResult]) -> str:
    lines = [
        "| policy | interactive SLO met | TTFT p50 | TTFT p90 | batch makespan | preemptions | QLM µs/step "
        "| QLM share of step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = next((r.batch_makespan_s for r in results if r.policy == "fcfs"), None)
    for r in results:
        rel = f" ({(r.batch_makespan_s / base - 1) * 100:+.0f}%)" if base else ""
        us = "-" if r.qlm_overhead_per_step_us is None else f"{r.qlm_overhead_per_step_us:.1f}"
        share = "-" if r.qlm_overhead_fraction is None else f"{r.qlm_overhead_fraction * 100:.2f}%"
        lines.append(
            f"| {r.policy} | {r.interactive_met * 100:.0f}% | {r.ttft_p50_s:.2f} s | {r.ttft_p90_s:.2f} s | "
            f"{r.batch_makespan_s:.1f} s{rel} | {r.preemptions:.0f} | {us} | {share} |"
        )
    return "\n".join(lines)


def main(args: Any) -> int:
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else POLICIES
    results = run(
        Path(args.model) if args.model else None, policies, batch=args.batch, interactive=args.interactive
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(table(results))
    return 0
