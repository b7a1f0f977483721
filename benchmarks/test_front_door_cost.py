"""CPU per request through the HTTP front door, in one process (pytest-benchmark). Run:
python -m pytest benchmarks/test_front_door_cost.py --benchmark-enable

One process holds the client, the server and (for the coordinator) two simulated instances 1,000x
faster than real time with their agents over loopback gRPC, so ``time.process_time()`` per request
is the whole serving path's CPU: HTTP in and out, the journal, admission, dispatch, the instance's
report. Each server runs on each event loop (asyncio's own and uvloop), and the pass-through server
(:mod:`qlm_plugin.coordinator.passthrough`: the same HTTP stack answering at once) is the reference
measured in the same run: ``extra_info`` holds the CPU ms per request and its ratio to the
pass-through's on the same loop. The latency figures under open-loop load are ``qlm loadtest``'s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from qlm_plugin.coordinator import passthrough
from qlm_plugin.testing.stack import local_stack

N = 1000
CONCURRENCY = 32
BODY = {"model": "llama-3.1-8b", "prompt": "hello", "max_tokens": 1, "qlm": {"class": "interactive"}}
CPU_MS: dict[tuple[str, str], float] = {}


async def _drive(url: str) -> float:
    """CPU ms per request for ``N`` one-token completions, ``CONCURRENCY`` in flight."""
    async with aiohttp.ClientSession() as http:

        async def one() -> None:
            async with http.post(f"{url}/v1/completions", json=BODY) as r:
                await r.read()
                assert r.status == 200, await r.text()

        for _ in range(50):  # warm the connections and the estimators
            await one()
        todo = iter(range(N))

        async def worker() -> None:
            for _ in todo:
                await one()

        start = time.process_time()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return (time.process_time() - start) * 1000 / N


async def _passthrough(_tmp: Path) -> float:
    runner = web.AppRunner(passthrough.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        return await _drive(f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()


def _coordinator(policy: str) -> Callable[[Path], Coroutine[Any, Any, float]]:
    async def run(tmp: Path) -> float:
        async with local_stack(tmp, instances=2, speed=1000.0, config={"policy": policy}) as stack:
            return await _drive(f"http://127.0.0.1:{stack.server.http_port}")

    return run


SERVERS = {"passthrough": _passthrough, "fcfs": _coordinator("fcfs"), "qlm": _coordinator("qlm")}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("server", list(SERVERS))
def test_cpu_per_request(benchmark: Any, tmp_path: Path, server: str, loop: str) -> None:
    runs = iter(range(1000))
    cpu_ms: list[float] = []

    def once() -> None:
        folder = tmp_path / str(next(runs))
        folder.mkdir()
        main = SERVERS[server](folder)
        if loop == "uvloop":
            import uvloop

            cpu_ms.append(uvloop.run(main))
        else:
            cpu_ms.append(asyncio.run(main))

    benchmark.group = f"front door: CPU per request, {N} one-token completions, {CONCURRENCY} in flight"
    benchmark.pedantic(once, rounds=3, iterations=1)
    CPU_MS[(server, loop)] = statistics.median(cpu_ms)
    benchmark.extra_info["cpu_ms_per_request"] = round(CPU_MS[(server, loop)], 3)
    reference = CPU_MS.get(("passthrough", loop))
    if reference and server != "passthrough":
        benchmark.extra_info["ratio_to_passthrough"] = round(CPU_MS[(server, loop)] / reference, 2)
    if server != "passthrough" and loop == "uvloop" and (server, "asyncio") in CPU_MS:
        benchmark.extra_info["uvloop_over_asyncio"] = round(
            CPU_MS[(server, loop)] / CPU_MS[(server, "asyncio")], 2
        )
