"""An agent never blocks its own event loop: a serving operation that takes longer than the
heartbeat timeout (a model load, a slow server) runs beside the heartbeats, and the instance stays
connected; and an agent whose server is down takes no work. Real parts: a coordinator on loopback
(gRPC, journal), the agents, and HTTP servers (one whose operations answer only after a while, one
simulated OpenAI server)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

from aiohttp import web

from qlm_plugin.adapters.openai import OpenAIEngineLink, OpenAISettings
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.adapters.vllm.engine_agent import Link
from qlm_plugin.coordinator.instances import Session
from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.openai_stub import StubServer, serve
from qlm_plugin.testing.stack import LocalStack, local_stack
from qlm_plugin.transport.agent import InstanceAgent
from qlm_plugin.transport.client import CoordinatorClient

MODEL = "llama-3.1-8b"
#: The stack declares an instance lost after 2 s without a heartbeat; the operation takes longer.
SLOW_S = 3.0


@contextlib.asynccontextmanager
async def slow_server() -> AsyncIterator[tuple[str, list[str]]]:
    """An engine's server whose operations each take ``SLOW_S``; yields its URL and the calls."""
    calls: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        calls.append(request.path_qs)
        await asyncio.sleep(SLOW_S)
        return web.json_response({})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")  # also the (empty) /metrics: no gauges

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", health)
    for path in ("/load", "/pause", "/resume"):
        app.router.add_post(path, slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", calls
    finally:
        await runner.cleanup()


async def _session(st: LocalStack, instance_id: str) -> Session:
    await st.wait_registered(1)
    s = st.coordinator.fleet.live(instance_id)
    assert s is not None
    return s


async def _outlives_the_heartbeat_timeout(st: LocalStack, s: Session, cid: str) -> None:
    """The operation is acknowledged, ok, after more than the heartbeat timeout, and the session it
    was ordered on is still the instance's (never declared lost, never registered again)."""
    began = time.monotonic()  # the command was sent just before: real time, not loop passes
    while cid in s.pending:
        await asyncio.sleep(0.1)
        assert time.monotonic() - began < SLOW_S + 10, "the operation was never acknowledged"
    assert time.monotonic() - began > st.coordinator.cfg.heartbeat_timeout_s
    assert s.alive and st.coordinator.fleet.live(s.instance_id) is s


def test_a_slow_load_command_of_the_black_box_agent_does_not_lose_the_instance(tmp_path: Path) -> None:
    async def main() -> None:
        async with slow_server() as (url, calls), local_stack(tmp_path, instances=0) as st:
            link = OpenAIEngineLink(
                OpenAISettings(instance_id="box", base_url=url, model=MODEL, load_command=f"POST {url}/load")
            )
            agent = InstanceAgent(st.settings, link)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            try:
                s = await _session(st, "box")
                cid = st.coordinator.fleet.command(s, "load_model", model=MODEL, target="gpu")
                await _outlives_the_heartbeat_timeout(st, s, cid)
                assert calls == ["/load"] and agent.sessions_started == 1
            finally:
                stop.set()
                await task
                await link.close()

    asyncio.run(main())


def test_a_slow_sleep_of_the_vllm_engine_agent_does_not_lose_the_instance(tmp_path: Path) -> None:
    """The engine-side agent of the vLLM adapter (its own thread and loop, as inside EngineCore)
    wakes the engine through its server (``/resume`` on CPU, ``/wake_up`` on GPU)."""
    model_config = SimpleNamespace(served_model_name=MODEL, model="/models/tiny")
    sched = SimpleNamespace(
        vllm_config=SimpleNamespace(model_config=model_config, kv_transfer_config=None),
        cache_config=SimpleNamespace(num_gpu_blocks=1000),
        max_num_running_reqs=8,
        qlm_snapshot=(0, 0, 0.0, 0.0, 0),
        qlm_steps=[],
        qlm_evicted=[],
    )

    async def main() -> None:
        async with slow_server() as (url, calls), local_stack(tmp_path, instances=0) as st:
            settings = {
                "coordinator": st.grpc_target,
                "instance_id": "engine",
                "endpoint": url,
                "gpu": "cpu",
                "token": "",
            }
            link = Link(sched, settings)
            try:
                s = await _session(st, "engine")
                link.engine.paused = True  # as after a sleep: the order wakes it
                cid = st.coordinator.fleet.command(s, "load_model", model=MODEL, target="gpu")
                await _outlives_the_heartbeat_timeout(st, s, cid)
                assert calls == ["/resume"] and link.agent.sessions_started == 1
                assert not link.engine.paused
            finally:
                await asyncio.to_thread(link.stop)

    asyncio.run(main())


def test_a_black_box_whose_server_is_down_takes_no_work_and_fails_nothing(tmp_path: Path) -> None:
    """The server behind a black-box agent dies (the agent lives on): the requests handed to it
    go back to the queue without counting as failures, the instance reports its server down and is
    sent nothing more, and once the server is back every request completes, on its first failure-
    free attempt. (They used to fail at once, the coordinator handing them straight back, until
    ``max_attempts``.)"""

    async def main() -> None:
        port = free_port()

        def start_server() -> tuple[asyncio.Event, asyncio.Task[None]]:
            stop = asyncio.Event()
            return stop, asyncio.create_task(serve(StubServer(tokens_per_s=200.0), "127.0.0.1", port, stop))

        async with local_stack(tmp_path, instances=0, config={"instance_return_wait_s": 30.0}) as st:
            stop_server, server = start_server()
            link = OpenAIEngineLink(
                OpenAISettings(
                    instance_id="box",
                    base_url=f"http://127.0.0.1:{port}",
                    model=MODEL,
                    metrics_interval_s=0.1,
                )
            )
            agent = InstanceAgent(st.settings, link)
            link.on_room, link.on_state = agent.room, agent.state_changed
            stop_agent = asyncio.Event()
            agent_task = asyncio.create_task(agent.run(stop_agent))
            try:
                await _session(st, "box")
                while link.metrics["running"] is None:  # its first look at the server's metrics
                    await asyncio.sleep(0.05)
                stop_server.set()  # the server dies; its agent does not
                await server
                async with CoordinatorClient(st.grpc_target) as c:
                    early = await c.submit_batch(  # handed over before the agent notices (its next scrape)
                        [
                            pb.RequestSpec(model=MODEL, prompt="x", max_tokens=8, true_output_tokens=8)
                            for _ in range(5)
                        ]
                    )
                    while link.down_since is None:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)  # several heartbeats: nothing is sent to a dead server

                    async def later() -> list[pb.SubmitReply]:  # wait for an instance to serve them
                        return await c.submit_batch(
                            [
                                pb.RequestSpec(model=MODEL, prompt="y", max_tokens=8, true_output_tokens=8)
                                for _ in range(5)
                            ]
                        )

                    waiting = asyncio.create_task(later())
                    await asyncio.sleep(0.5)
                    stop_server, server = start_server()  # back, on the same port
                    replies = [*early, *await waiting]
                    for r in replies:
                        chunks = [ch async for ch in c.stream(r.request_id, timeout_s=30)]
                        assert chunks[-1].finished
                for r in replies:
                    job = st.coordinator.jobs[r.request_id]
                    assert job.state == "finished" and job.failures == 0, (job.state, job.failures, job.error)
                    assert job.text == synthetic_text(r.request_id, 0, 8)
            finally:
                stop_agent.set()
                await agent_task
                await link.close()
                stop_server.set()
                await server

    asyncio.run(asyncio.wait_for(main(), 120))
