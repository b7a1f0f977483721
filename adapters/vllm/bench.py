"""``qlm bench-vllm``: QLM's scheduler against vLLM's FCFS and priority policies on one real engine.

Two workloads, each repeated over seeds, each policy on a fresh server (the tiny random Llama on CPU
unless ``--model``; ``--max-num-seqs 8``):

* ``slo`` (the default): a backlog of batch requests (256 output tokens, a one-hour deadline) sent
  first, and only once the engine's ``/metrics`` show it holds them (a client of hundreds of
  connections may not get its requests in first on two cores), interactive requests of 16 tokens
  with a 1 s TTFT SLO, Poisson arrivals at 2/s. Reported: interactive attainment, TTFT p50/p99, the
  batch makespan, preemptions, recomputed tokens and failed requests.
* ``alise``: 300 requests without SLOs of two kinds told apart only by their class tag: short
  (8-32 tokens) and long (128-384), 30% long, Poisson arrivals at 40/s (a little more than the tiny
  engine serves: a queue builds), after a warm-up of 120 requests the engine's predictor learns from.
  Reported: mean and p90 latency (QLM's predicted-shortest-first, with aging, against FCFS).

The tiny random model never stops by itself: lengths are set with ``max_tokens`` and ``ignore_eos``.
Recomputed tokens are the tokens the engine computed beyond each prompt's first prefill and each
generated token (from ``vllm:iteration_tokens_total``): the work preemptions made it redo.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("fcfs", "priority", "qlm")
WORKLOADS = ("slo", "alise")
ERRORS: list[str] = []  # why requests of the current run failed (run_policy resets it)
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards")


@dataclass
class BenchResult:
    policy: str
    workload: str
    seed: int
    failures: int
    preemptions: float
    recomputed_tokens: float
    # slo
    interactive_met: float = 0.0  # fraction of interactive requests with TTFT <= SLO
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    batch_makespan_s: float = 0.0
    # alise
    latency_mean_s: float = 0.0
    latency_p90_s: float = 0.0
    qlm: dict[str, float] = field(default_factory=dict)  # the scheduler's own counters
    failure_reasons: dict[str, int] = field(default_factory=dict)  # why requests failed, and how often


def metrics(url: str) -> dict[str, float]:
    """The engine's Prometheus metrics, summed over their labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            name, _, value = line.rpartition(" ")
            base = name.split("{", 1)[0]
            if "source=" in name and 'source="local_compute"' not in name:
                continue  # prompt tokens by source: only those computed here
            out[base] = out.get(base, 0.0) + float(value)
    return out


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def _post(
    http: Any, url: str, body: dict[str, Any], sent: float, stream: bool = True
) -> tuple[float, float] | None:
    """(TTFT, end-to-end) of one completion (TTFT: infinite unless streamed), None if it failed."""
    ttft = float("inf")
    try:
        async with http.post(f"{url}/v1/completions", json={**body, "stream": stream}) as r:
            if r.status != 200:
                ERRORS.append(f"HTTP {r.status}: {(await r.text())[:200]}")
                return None
            async for line in r.content:
                if stream and line.startswith(b"data: {") and ttft == float("inf"):
                    ttft = time.monotonic() - sent
    except Exception as exc:
        ERRORS.append(f"{type(exc).__name__}: {exc}")
        return None
    return ttft, time.monotonic() - sent


async def _wait_held(
    url: str, count: int, finished_before: float, failed: Callable[[], int], timeout_s: float = 120.0
) -> None:
    """Until the engine has taken ``count`` requests (waiting, running or finished since
    ``finished_before``) less those that ``failed`` on their way, as its metrics say: the backlog
    is in before anything else is sent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = await asyncio.to_thread(metrics, url)
        taken = (
            m.get("vllm:num_requests_waiting", 0)
            + m.get("vllm:num_requests_running", 0)
            + m.get("vllm:request_success_total", 0)
            - finished_before
        )
        if taken >= count - failed():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the engine did not take {count} requests within {timeout_s} s: {ERRORS[-3:]}")


def _session() -> Any:
    import aiohttp

    # A fresh connection per request: a pooled keep-alive connection that the server closes (idle
    # for 5 s) just as it is reused fails the request ("Can not write request body").
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=aiohttp.ClientTimeout(total=None)
    )


async def _slo_workload(
    url: str, seed: int, *, batch: int, batch_tokens: int, interactive: int, rate: float, slo_s: float
) -> dict[str, Any]:
    rng = random.Random(seed)
    finished_before = (await asyncio.to_thread(metrics, url)).get("vllm:request_success_total", 0.0)
    async with _session() as http:
        t0 = time.monotonic()
        batch_tasks = []
        for i in range(batch):  # in waves: 400 simultaneous connects overflow the listen backlog
            body = {
                "model": "tiny",
                "prompt": _prompt(rng, 30),
                "max_tokens": batch_tokens,
                "ignore_eos": True,
                "priority": 1,
                "vllm_xargs": {"qlm_class": "batch", "qlm_e2e_ms": 3_600_000},
            }
            # Not streamed: 400 streams of tokens would take the CPU from the client (and the
            # server) on a small machine, and delay the interactive requests before they are sent.
            batch_tasks.append(asyncio.create_task(_post(http, url, body, t0, stream=False)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await _wait_held(
            url, batch, finished_before, lambda: sum(t.done() and t.result() is None for t in batch_tasks)
        )
        gaps = [rng.expovariate(rate) for _ in range(interactive)]

        async def one(delay: float) -> tuple[float, float] | None:
            await asyncio.sleep(delay)
            body = {
                "model": "tiny",
                "prompt": _prompt(rng, 4),
                "max_tokens": 16,
                "ignore_eos": True,
                "priority": 0,
                "vllm_xargs": {"qlm_class": "interactive", "qlm_ttft_ms": slo_s * 1000},
            }
            return await _post(http, url, body, time.monotonic())

        starts = [sum(gaps[: i + 1]) for i in range(interactive)]
        inter = await asyncio.gather(*(one(s) for s in starts))
        done = await asyncio.gather(*batch_tasks)
    return {"interactive": inter, "batch": done}


async def _alise_workload(url: str, seed: int, *, requests: int, rate: float, warmup: int) -> dict[str, Any]:
    rng = random.Random(seed)

    def body() -> dict[str, Any]:
        long = rng.random() < 0.3
        return {
            "model": "tiny",
            "prompt": _prompt(rng, 12),
            "max_tokens": rng.randint(128, 384) if long else rng.randint(8, 32),
            "ignore_eos": True,
            "vllm_xargs": {"qlm_class": "long" if long else "short"},
        }

    async with _session() as http:
        # Warm-up: the engine sees each kind finish (its predictor learns them), four at a time.
        sem = asyncio.Semaphore(4)

        async def warm() -> None:
            async with sem:
                await _post(http, url, body(), time.monotonic(), stream=False)

        await asyncio.gather(*(warm() for _ in range(warmup)))
        bodies = [body() for _ in range(requests)]
        gaps = [rng.expovariate(rate) for _ in range(requests)]

        async def one(delay: float, b: dict[str, Any]) -> tuple[float, float] | None:
            await asyncio.sleep(delay)
            return await _post(http, url, b, time.monotonic(), stream=False)

        starts = [sum(gaps[: i + 1]) for i in range(requests)]
        done = await asyncio.gather(*(one(s, b) for s, b in zip(starts, bodies, strict=True)))
    return {"requests": done}


def _q(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def run_policy(
    model: Path,
    policy: str,
    port: int,
    work: Path,
    *,
    workload: str = "slo",
    seed: int = 0,
    batch: int = 400,
    batch_tokens: int = 256,
    interactive: int = 40,
    rate: float = 2.0,
    slo_s: float = 1.0,
    alise_requests: int = 300,
    alise_rate: float = 40.0,
    max_num_seqs: int = 8,
) -> BenchResult:
    from qlm_plugin.adapters.vllm.launch import start_server, wait_ready

    ERRORS.clear()
    stats = work / f"{policy}-{workload}-{seed}.stats.jsonl"
    # The client on one CPU, the server on the others: on a small machine the engine's busy
    # processes otherwise starve the client for seconds, and its delays swamp the policies'.
    mine = sorted(os.sched_getaffinity(0))
    split = len(mine) >= 2
    server = start_server(
        model,
        port,
        work / f"{policy}-{workload}-{seed}.log",
        max_num_seqs=max_num_seqs,
        max_model_len=2048,
        scheduler=policy == "qlm",
        policy="priority" if policy == "priority" else "fcfs",
        env={**os.environ, "QLM_VLLM_STATS": str(stats)},
        cpus=",".join(str(c) for c in mine[1:]) if split else None,
    )
    if split:
        os.sched_setaffinity(0, mine[:1])
    try:
        wait_ready([server], timeout_s=600)
        before = metrics(server.url)
        if workload == "slo":
            out = asyncio.run(
                _slo_workload(
                    server.url,
                    seed,
                    batch=batch,
                    batch_tokens=batch_tokens,
                    interactive=interactive,
                    rate=rate,
                    slo_s=slo_s,
                )
            )
        else:
            out = asyncio.run(
                _alise_workload(server.url, seed, requests=alise_requests, rate=alise_rate, warmup=120)
            )
        after = metrics(server.url)
    finally:
        server.stop()
        os.sched_setaffinity(0, mine)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    recomputed = max(
        0.0,
        delta("vllm:iteration_tokens_total_sum")
        - delta("vllm:prompt_tokens_by_source_total")
        - delta("vllm:generation_tokens_total"),  # without preemption: exactly 0 (measured)
    )
    result = BenchResult(
        policy=policy,
        workload=workload,
        seed=seed,
        failures=sum(r is None for rs in out.values() for r in rs),
        failure_reasons=dict(Counter(ERRORS)),
        preemptions=delta("vllm:num_preemptions_total"),
        recomputed_tokens=recomputed,
    )
    if workload == "slo":
        ttfts = [r[0] if r is not None else float("inf") for r in out["interactive"]]
        result.interactive_met = sum(t <= slo_s for t in ttfts) / len(ttfts)
        result.ttft_p50_s = statistics.median(ttfts)
        result.ttft_p99_s = _q(ttfts, 0.99)
        result.batch_makespan_s = max((r[1] for r in out["batch"] if r is not None), default=float("nan"))
    else:
        lat = [r[1] for r in out["requests"] if r is not None]
        result.latency_mean_s = statistics.fmean(lat) if lat else float("nan")
        result.latency_p90_s = _q(lat, 0.9)
    if stats.exists():
        lines = [json.loads(x) for x in stats.read_text().splitlines() if x.strip()]
        if lines:
            last = lines[-1]
            steps = max(1, last["steps"])
            result.qlm = {
                "overhead_us_per_step": last["overhead_s"] / steps * 1e6,
                "overhead_share": last["overhead_s"] / max(1e-9, last["step_s"]),
                "evictions": last["evictions"],
                "wasted_tokens": last["wasted_tokens"],
            }
    return result


def run(
    model: Path | None = None,
    policies: Sequence[str] = POLICIES,
    workload: str = "slo",
    seeds: Sequence[int] = (0, 1, 2),
    **kw: Any,
) -> list[BenchResult]:
    from qlm_plugin.deploy.child_process import free_port

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if model is None:
            from qlm_plugin.adapters.vllm.launch import build_tiny_model

            model = build_tiny_model(work)
        return [
            run_policy(model, p, free_port(), work, workload=workload, seed=s, **kw)
            for s in seeds
            for p in policies
        ]


def _median(results: list[BenchResult], attr: str) -> float:
    return float(statistics.median(float(getattr(r, attr)) for r in results))


def table(results: list[BenchResult]) -> str:
    """Per policy, the median over seeds (and the range where it matters)."""
    by: dict[str, list[BenchResult]] = {}
    for r in results:
        by.setdefault(r.policy, []).append(r)
    if results and results[0].workload == "alise":
        base = _median(by["fcfs"], "latency_mean_s") if "fcfs" in by else None
        lines = [
            "| policy | seeds | latency mean | latency p90 | preemptions | recomputed tokens | failed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p, rs in by.items():
            mean = _median(rs, "latency_mean_s")
            rel = f" ({(mean / base - 1) * 100:+.0f}%)" if base and p != "fcfs" else ""
            lines.append(
                f"| {p} | {len(rs)} | {mean:.2f} s{rel} | {_median(rs, 'latency_p90_s'):.2f} s | "
                f"{_median(rs, 'preemptions'):.0f} | {_median(rs, 'recomputed_tokens'):.0f} | "
                f"{sum(r.failures for r in rs)} |"
            )
        return "\n".join(lines)
    base = _median(by["fcfs"], "batch_makespan_s") if "fcfs" in by else None
    lines = [
        "| policy | seeds | interactive SLO met (median, range) | TTFT p50 | TTFT p99 | batch makespan "
        "| preemptions | recomputed tokens | failed | QLM share of step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p, rs in by.items():
        met = [r.interactive_met * 100 for r in rs]
        makespan = _median(rs, "batch_makespan_s")
        rel = f" ({(makespan / base - 1) * 100:+.0f}%)" if base and p != "fcfs" else ""
        shares = [r.qlm["overhead_share"] for r in rs if r.qlm]
        share = f"{statistics.median(shares) * 100:.2f}%" if shares else "-"
        lines.append(
            f"| {p} | {len(rs)} | {statistics.median(met):.1f}% ({min(met):.1f}-{max(met):.1f}) | "
            f"{_median(rs, 'ttft_p50_s'):.2f} s | {_median(rs, 'ttft_p99_s'):.2f} s | "
            f"{makespan:.1f} s{rel} | "
            f"{_median(rs, 'preemptions'):.0f} | {_median(rs, 'recomputed_tokens'):.0f} | "
            f"{sum(r.failures for r in rs)} | {share} |"
        )
    return "\n".join(lines)


def main(args: Any) -> int:
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else POLICIES
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(
            f"qlm bench-vllm: unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}"
        )
    results = run(
        Path(args.model) if args.model else None,
        policies,
        args.workload,
        seeds=range(args.seeds),
        batch=args.batch,
        interactive=args.interactive,
        rate=args.rate,
        batch_tokens=args.batch_tokens,
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(table(results))
        reasons = Counter[str]()
        for r in results:
            reasons.update(r.failure_reasons)
        for reason, n in reasons.most_common(5):
            print(f"failed {n}x: {reason}")
    return 0
