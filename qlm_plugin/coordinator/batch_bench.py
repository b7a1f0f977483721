"""``qlm bench-batch``: a Batch API batch beside steady interactive traffic, on a real coordinator
(loopback HTTP and gRPC, SQLite journal and batch store) with simulated instances in real time.

Interactive requests arrive as a Poisson stream (1 s TTFT SLO) for ``duration_s``; ``warmup_s``
in, a batch of ``requests`` lines is submitted. The lengths of both are drawn from the packaged
Azure conversation trace (each request's true output length is told to the simulator, not to the
scheduler). Each run is one way of sending the same work:

* ``qlm``: the Batch API, its ``completion_window`` the deadline of every line, QLM scheduling;
* ``edf``, ``fcfs``: the same lines as plain requests sent at once (class ``batch``, end-to-end
  SLO = the window), under EDF or FCFS scheduling.

Reported per run: interactive attainment and TTFT p50/p99, the batch's completion time against its
window and the share of its lines done in it, and the instances' busy fraction from the batch's
submission to its end.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from qlm_plugin.testing.stack import LocalStack, local_stack
from qlm_plugin.workloads.trace_files import TraceRecord, load_azure_trace, packaged_trace_path

MODEL = "llama-3.1-8b"
#: run name -> (coordinator policy, how the batch is sent)
RUNS = {"qlm": ("qlm", "api"), "edf": ("edf", "plain"), "fcfs": ("fcfs", "plain")}
MAX_TOKENS = 2048
MAX_PROMPT = 4096


@dataclass
class BatchRun:
    run: str
    policy: str
    sent_as: str
    interactive: int
    interactive_met: float  # fraction
    ttft_p50_s: float
    ttft_p99_s: float
    interactive_failed: int
    batch_requests: int
    batch_completed: int
    batch_in_window: float  # fraction of lines finished before the window's end
    batch_completion_s: float  # submission to the last line's end (or to the window's end)
    window_s: float
    busy_fraction: float
    wall_s: float


def _lengths(seed: int) -> list[TraceRecord]:
    records = load_azure_trace(packaged_trace_path("conv"))
    rng = random.Random(seed)
    rng.shuffle(records)
    return records


def _body(rec: TraceRecord, **qlm: Any) -> dict[str, Any]:
    prompt = max(1, min(rec.prompt_tokens, MAX_PROMPT))
    return {
        "model": MODEL,
        "prompt": [1] * prompt,
        "max_tokens": MAX_TOKENS,
        "qlm": {"true_output_tokens": max(1, min(rec.output_tokens, MAX_TOKENS)), **qlm},
    }


def _busy_s(st: LocalStack) -> float:
    return sum(li.link.inst.busy_s for li in st.instances.values())


async def _interactive(
    http: aiohttp.ClientSession,
    url: str,
    records: list[TraceRecord],
    rate: float,
    duration_s: float,
    seed: int,
) -> list[tuple[bool, float | None]]:
    rng = random.Random(seed)
    results: list[tuple[bool, float | None]] = []

    async def one(rec: TraceRecord) -> None:
        body = _body(rec, **{"class": "interactive"})
        try:
            async with http.post(f"{url}/v1/completions", json=body) as r:
                out = await r.json(content_type=None)
        except aiohttp.ClientError:
            results.append((False, None))
            return
        if r.status != 200:
            results.append((False, None))
            return
        info = out["qlm"]
        ttft = info["ttft_ms"] / 1000 if info.get("ttft_ms") is not None else None
        results.append((bool(info.get("slo_met")), ttft))

    tasks = []
    start = time.monotonic()
    t_next = start
    i = 0
    while True:
        t_next += rng.expovariate(rate)
        if t_next - start > duration_s:
            break
        await asyncio.sleep(max(0.0, t_next - time.monotonic()))
        tasks.append(asyncio.create_task(one(records[i % len(records)])))
        i += 1
    await asyncio.gather(*tasks)
    return results


async def _batch_api(
    http: aiohttp.ClientSession, url: str, records: list[TraceRecord], window: str
) -> tuple[int, list[float], float]:
    """(lines completed, their end times, submission time) of a Batch API batch."""
    rows = [
        {"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions", "body": _body(rec)}
        for i, rec in enumerate(records)
    ]
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", "".join(json.dumps(r) + "\n" for r in rows).encode(), filename="batch.jsonl")
    submitted = time.time()
    async with http.post(f"{url}/v1/files", data=form) as r:
        file_id = (await r.json())["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": window}
    async with http.post(f"{url}/v1/batches", json=body) as r:
        batch_id = (await r.json())["id"]
    while True:
        async with http.get(f"{url}/v1/batches/{batch_id}") as r:
            batch = await r.json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.5)
    ends: list[float] = []
    if batch.get("output_file_id"):
        async with http.get(f"{url}/v1/files/{batch['output_file_id']}/content") as r:
            for line in (await r.text()).splitlines():
                qlm = json.loads(line)["response"]["body"]["qlm"]
                ends.append(qlm["finished_at"])
    return len(ends), ends, submitted


async def _plain(
    http: aiohttp.ClientSession, url: str, records: list[TraceRecord], window_s: float
) -> tuple[int, list[float], float]:
    """The same lines as plain requests, all sent at once."""
    ends: list[float] = []
    submitted = time.time()

    async def one(rec: TraceRecord) -> None:
        body = _body(rec, **{"class": "batch", "e2e_ms": window_s * 1000})
        async with http.post(f"{url}/v1/completions", json=body) as r:
            out = await r.json(content_type=None)
        if r.status == 200:
            ends.append(out["qlm"]["finished_at"])

    await asyncio.gather(*(one(rec) for rec in records))
    return len(ends), ends, submitted


async def run_one(
    run: str,
    *,
    requests: int,
    window: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    seed: int,
    tmp: Path,
) -> BatchRun:
    from qlm_plugin.coordinator.batches import parse_window

    policy, sent_as = RUNS[run]
    window_s = parse_window(window, 1.0)
    records = _lengths(seed)
    batch_records = [records[i % len(records)] for i in range(requests)]
    interactive_records = records[len(records) // 2 :] + records[: len(records) // 2]
    config = {"policy": policy, "batches": {"min_window_s": 1}}
    t0 = time.monotonic()
    async with local_stack(tmp / run, instances=2, speed=1.0, config=config) as st:
        connector = aiohttp.TCPConnector(limit=0)
        no_timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=no_timeout) as http:
            url = st.http_url
            inter = asyncio.create_task(_interactive(http, url, interactive_records, rate, duration_s, seed))
            await asyncio.sleep(warmup_s)
            busy0, wall0 = _busy_s(st), time.time()
            if sent_as == "api":
                done, ends, submitted = await _batch_api(http, url, batch_records, window)
            else:
                done, ends, submitted = await _plain(http, url, batch_records, window_s)
            finished = max(ends) if ends else time.time()
            busy = (_busy_s(st) - busy0) / (len(st.instances) * max(1e-9, time.time() - wall0))
            results = await inter
    met = [m for m, _ in results]
    ttfts = sorted(t for _, t in results if t is not None)
    q = statistics.quantiles(ttfts, n=100) if len(ttfts) >= 2 else [float("nan")] * 99
    return BatchRun(
        run=run,
        policy=policy,
        sent_as="Batch API" if sent_as == "api" else "plain requests",
        interactive=len(results),
        interactive_met=sum(met) / max(1, len(met)),
        ttft_p50_s=q[49],
        ttft_p99_s=q[98],
        interactive_failed=sum(1 for _, t in results if t is None),
        batch_requests=requests,
        batch_completed=done,
        batch_in_window=sum(1 for e in ends if e <= submitted + window_s) / requests,
        batch_completion_s=finished - submitted,
        window_s=window_s,
        busy_fraction=min(1.0, busy),
        wall_s=time.monotonic() - t0,
    )


def run_bench(
    runs: list[str],
    *,
    requests: int = 2000,
    window: str = "10m",
    rate: float = 20.0,
    duration_s: float = 120.0,
    warmup_s: float = 5.0,
    seed: int = 0,
) -> list[BatchRun]:
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"unknown run {unknown[0]!r} (known: {', '.join(RUNS)})")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            out.append(
                asyncio.run(
                    run_one(
                        run,
                        requests=requests,
                        window=window,
                        rate=rate,
                        duration_s=duration_s,
                        warmup_s=warmup_s,
                        seed=seed,
                        tmp=Path(tmp),
                    )
                )
            )
    return out


def report(results: list[BatchRun]) -> str:
    lines = [
        "| run | batch sent as | interactive met | TTFT p50 / p99 | batch done | batch time / window "
        "| lines in window | busy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.run} | {r.sent_as} | {r.interactive_met:.1%} ({r.interactive}) "
            f"| {r.ttft_p50_s:.2f} / {r.ttft_p99_s:.2f} s | {r.batch_completed}/{r.batch_requests} "
            f"| {r.batch_completion_s:.0f} / {r.window_s:.0f} s | {r.batch_in_window:.1%} "
            f"| {r.busy_fraction:.0%} |"
        )
    return "\n".join(lines)


def to_json(results: list[BatchRun]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
