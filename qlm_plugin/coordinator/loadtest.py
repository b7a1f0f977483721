"""``qlm loadtest``: the coordinator's submit throughput and the front door's added latency,
measured against a real ``qlm serve`` process on loopback (this process is only the client).

* **Submit throughput**: requests submitted over gRPC as fast as the coordinator takes them, in
  batches (``SubmitBatch``) and one call per request (``Submit``); every one journaled and queued
  before it is acknowledged. The same calls go first to the pass-through server's gRPC service
  (:mod:`.passthrough`: accepted at once), so each figure is also a ratio to what this machine's
  gRPC stack and this client do at all; and each server's own CPU per submission (from /proc).
* **Front-door added latency**: open-loop Poisson arrivals at ``--rate`` of one-token completions
  through the HTTP front door, with simulated engines running ``--speed`` times faster than real
  time, so the engine's own time is microseconds and what is left is the serving system's
  overhead (HTTP, queueing decision, journal, dispatch over gRPC, the instance's report back).
  Beside each rate, the same test against a pass-through server (:mod:`.passthrough`: the same
  HTTP stack answering at once, no queue), so each figure is also a ratio to what this machine's
  HTTP stack does at all; and the coordinator process's own CPU per request (from /proc).

Profile the coordinator under this load (the documented command, docs/coordinator.md):
``py-spy record -p <qlm serve pid> -f raw -o prof.txt -d 15`` while ``qlm loadtest`` runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlm_plugin import event_loop
from qlm_plugin.coordinator.http_workers import resolve_workers
from qlm_plugin.deploy.child_process import free_port, python_command

MODEL = "llama-3.1-8b"


@dataclass
class Served:
    http_url: str
    grpc_target: str
    process: subprocess.Popen[bytes]


@contextmanager
def _child_server(
    cmd: list[str], http: int, name: str, timeout_s: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """A server in a child process (its own session), once its ``/health`` answers 200."""
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become healthy")
            time.sleep(0.1)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def serve_process(
    *,
    instances: int = 2,
    speed: float = 1000.0,
    policy: str = "qlm",
    http_workers: int | None = None,
    timeout_s: float = 60.0,
) -> Iterator[Served]:
    """``qlm serve`` in a child process on free ports with a fresh journal; waits for /health."""
    with tempfile.TemporaryDirectory() as tmp:
        http, grpc_port = free_port(), free_port()
        cmd = python_command(
            "qlm_plugin.cli",
            "serve",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--instances",
            str(instances),
            "--speed",
            str(speed),
            "--policy",
            policy,
            "--journal",
            str(Path(tmp) / "journal.db"),
            *(() if http_workers is None else ("--http-workers", str(http_workers))),
        )
        with _child_server(cmd, http, "qlm serve", timeout_s) as proc:
            yield Served(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", proc)


@contextmanager
def passthrough_process() -> Iterator[Served]:
    """The reference servers (:mod:`.passthrough`, HTTP and gRPC) in a child process."""
    http, grpc_port = free_port(), free_port()
    cmd = python_command("qlm_plugin.coordinator.passthrough", str(http), str(grpc_port))
    with _child_server(cmd, http, "the pass-through server") as proc:
        yield Served(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", proc)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used, its children not included; NaN
    where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(pid: int) -> list[int]:
    """The front-door worker processes of the ``qlm serve`` process ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"http_workers" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _spec(i: int) -> Any:
    from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

    return pb.RequestSpec(model=MODEL, prompt="x" * 400, max_tokens=32, slo=pb.SLO(slo_class="batch"))


async def submit_throughput(target: str, n: int, *, batch: int, concurrency: int) -> dict[str, float]:
    """Submit ``n`` requests, ``batch`` per call (1: unary Submit), ``concurrency`` calls in flight
    (warmed by one call first, not counted)."""
    from qlm_plugin.transport.client import CoordinatorClient

    async with CoordinatorClient(target, timeout_s=60) as client:
        await client.submit(_spec(-1))  # warm the channel
        sem = asyncio.Semaphore(concurrency)
        accepted = 0

        async def call(start: int) -> None:
            nonlocal accepted
            async with sem:
                if batch == 1:
                    replies = [await client.submit(_spec(start))]
                else:
                    replies = await client.submit_batch([_spec(start + k) for k in range(batch)])
                accepted += sum(r.accepted for r in replies)  # after the await: no lost update

        t0 = time.perf_counter()
        await asyncio.gather(*(call(i) for i in range(0, n, batch)))
        dt = time.perf_counter() - t0
    return {"requests": n, "accepted": accepted, "seconds": dt, "per_s": n / dt}


async def front_door_latency(url: str, *, rate: float, duration_s: float, seed: int = 0) -> dict[str, Any]:
    """Open-loop one-token completions at ``rate`` per second; latency percentiles in ms."""
    import aiohttp

    rng = random.Random(seed)
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 1, "qlm": {"class": "interactive"}}
        for _ in range(20):  # warm up connections and the coordinator's estimators
            async with http.post(f"{url}/v1/completions", json=body) as r:
                await r.read()

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with http.post(f"{url}/v1/completions", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except (aiohttp.ClientError, OSError):  # a refused or reset connection is an error too
                errors += 1
                return
            lat.append((time.perf_counter() - t) * 1000)

        tasks = []
        start = time.perf_counter()
        t_next = start
        while t_next - start < duration_s:
            t_next += rng.expovariate(rate)
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {
        "rate": rate,
        "achieved_rate": len(tasks) / elapsed,
        "requests": len(tasks),
        "errors": errors,
        "p50_ms": q[49],
        "p90_ms": q[89],
        "p99_ms": q[98],
        "max_ms": lat[-1] if lat else float("nan"),
    }


def _submits(served: Served, n: int, batch: int, concurrency: int) -> dict[str, Any]:
    """:func:`submit_throughput` against ``served``, with the server process's CPU per submission."""
    before = cpu_s(served.process.pid)
    result: dict[str, Any] = event_loop.run(
        submit_throughput(served.grpc_target, n, batch=batch, concurrency=concurrency)
    )
    result["server_cpu_us_per_request"] = (cpu_s(served.process.pid) - before) * 1e6 / (n + 1)
    return result


def run(
    *,
    n: int = 5000,
    rates: tuple[float, ...] = (100.0, 250.0, 1000.0),
    duration_s: float = 8.0,
    instances: int = 2,
    http_workers: int | str | None = None,
) -> dict[str, Any]:
    workers = resolve_workers(http_workers)
    out: dict[str, Any] = {"event_loop": event_loop.loop_kind(), "http_workers": workers}
    for name, count, batch, concurrency in (("submit_batch", n, 100, 4), ("submit_unary", n // 2, 1, 64)):
        with passthrough_process() as ref:
            reference = _submits(ref, count, batch, concurrency)
        # Real time: the queue manager's estimates work on realistic engines.
        with serve_process(instances=instances, speed=1.0, http_workers=workers) as served:
            out[name] = _submits(served, count, batch, concurrency)
        out[name]["passthrough"] = reference
        out[name]["ratio_to_passthrough"] = out[name]["per_s"] / reference["per_s"]
    out["front_door"] = []
    for rate in rates:  # a fresh system per rate: an overloaded run must not slow the next
        with passthrough_process() as ref:
            reference = event_loop.run(front_door_latency(ref.http_url, rate=rate, duration_s=duration_s))
        with serve_process(instances=instances, http_workers=workers) as served:
            pids = worker_pids(served.process.pid)
            before = cpu_s(served.process.pid), sum(cpu_s(p) for p in pids)
            result = event_loop.run(front_door_latency(served.http_url, rate=rate, duration_s=duration_s))
            used = cpu_s(served.process.pid) - before[0], sum(cpu_s(p) for p in pids) - before[1]
        requests = max(1, result["requests"] + 20)
        result["coordinator_cpu_ms_per_request"] = used[0] * 1000 / requests
        result["workers_cpu_ms_per_request"] = used[1] * 1000 / requests
        result["passthrough"] = reference
        result["p99_over_passthrough"] = result["p99_ms"] / reference["p99_ms"]
        result["p99_added_ms"] = result["p99_ms"] - reference["p99_ms"]
        out["front_door"].append(result)
    return out


def table(result: dict[str, Any]) -> str:
    """The figures as Markdown tables: gRPC submissions, then the front door per rate."""
    lines = [f"event loop: {result['event_loop']}; HTTP workers: {result['http_workers']}", ""]
    lines += [
        "| gRPC | submits/s | pass-through /s | ratio | server CPU us/submit | pass-through |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("submit_batch", "SubmitBatch (100 per call)"), ("submit_unary", "unary Submit")):
        r = result[name]
        ref = r["passthrough"]
        lines.append(
            f"| {label} | {r['per_s']:.0f} | {ref['per_s']:.0f} | {r['ratio_to_passthrough']:.2f} "
            f"| {r['server_cpu_us_per_request']:.0f} | {ref['server_cpu_us_per_request']:.0f} |"
        )
    lines += [
        "",
        "| rate | achieved | errors | p50 / p99 ms | pass-through p50 / p99 ms | p99 ratio | p99 added "
        "| CPU ms/request: core | workers |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["front_door"]:
        ref = r["passthrough"]
        lines.append(
            f"| {r['rate']:.0f} | {r['achieved_rate']:.0f} | {r['errors']} "
            f"| {r['p50_ms']:.1f} / {r['p99_ms']:.1f} "
            f"| {ref['p50_ms']:.1f} / {ref['p99_ms']:.1f} | {r['p99_over_passthrough']:.1f}x "
            f"| {r['p99_added_ms']:.1f} | {r['coordinator_cpu_ms_per_request']:.2f} "
            f"| {r['workers_cpu_ms_per_request']:.2f} |"
        )
    return "\n".join(lines)


def main(args: Any) -> int:
    rates = tuple(float(r) for r in str(args.rates).split(","))
    result = run(
        n=args.requests,
        rates=rates,
        duration_s=args.duration,
        instances=args.instances,
        http_workers=args.http_workers,
    )
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
