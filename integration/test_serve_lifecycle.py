"""`qlm serve` as a terminal runs it: Ctrl-C (SIGINT to its whole process group) drains the
coordinator while its instances finish the requests in flight; an instance that dies is started
again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.testing.processes import http_call, serve_process, wait_healthy
from qlm_plugin.transport.client import CoordinatorClient


def _post(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    status, answer = http_call(url, body, timeout_s=60)
    out["status"], out["body"] = status, json.loads(answer) if status == 200 else answer


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_ctrl_c_drains_while_instances_finish_and_a_dead_instance_comes_back(tmp_path: Path) -> None:
    http = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLM_") or k == "QLM_PLUGINS"}
    args = ("--instances", "1", "--speed", "5")
    # its own process group, as a terminal's foreground job
    serve = serve_process(tmp_path, http, free_port(), *args, env=env, new_session=True)
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(url, serve, log)

        # An instance killed is started again, and serves.
        (instance,) = _children(serve.pid)
        os.kill(instance, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (
            _children(serve.pid)
            and _children(serve.pid) != [instance]
            and http_call(f"{url}/health")[0] == 200
        ):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert "exited with status -9" in log.read_text()

        answer: dict[str, Any] = {}
        body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 3000}
        call = threading.Thread(target=_post, args=(f"{url}/v1/completions", body, answer))
        call.start()
        time.sleep(1.0)  # it runs on the instance
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        call.join(60)
        assert answer.get("status") == 200, (answer, log.read_text()[-3000:])
        assert answer["body"]["usage"]["completion_tokens"] == 3000
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def test_a_stop_takes_the_drain_timeout_and_about_2_s_and_says_what_it_kept(tmp_path: Path) -> None:
    """SIGTERM with requests still running past ``drain_timeout_s``: the process exits about 2 s
    after the drain ends (not 10), saying that those requests are kept for the next start; no
    gRPC INFO line in its log."""
    http, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLM_", "GRPC_")) or k == "QLM_PLUGINS"}
    (tmp_path / "config.yaml").write_text("drain_timeout_s: 3\n")
    args = ("--instances", "1", "--speed", "1", "--config", str(tmp_path / "config.yaml"))
    serve = serve_process(tmp_path, http, grpc_port, *args, env=env)
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(url, serve, log)
        body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 20000}
        calls = [threading.Thread(target=_post, args=(f"{url}/v1/completions", body, {})) for _ in range(2)]
        for call in calls:
            call.start()

        async def both_running() -> None:
            async with CoordinatorClient(f"127.0.0.1:{grpc_port}") as c:
                while (await c.queue()).dispatched < 2:
                    await asyncio.sleep(0.05)

        asyncio.run(asyncio.wait_for(both_running(), 30))
        t0 = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
        took = time.monotonic() - t0
        for call in calls:
            call.join(10)
        text = log.read_text()
        assert 3.0 <= took < 3.0 + 3.0, (took, text[-3000:])  # the servers' grace: 2 s at most
        # an HTTP completion without an idempotency key could not be asked for after a restart:
        # cancelled, its client told to send it again (kept, the SDK's retry made it twice)
        assert "stopped (0 unfinished requests kept in" in text, text[-3000:]
        assert "2 cancelled (their clients were told to send them again)" in text
        assert "fork_posix" not in text
        assert "WARNING qlm_plugin.transport.agent" not in text  # a normal stop: no warning per instance
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_a_second_signal_stops_at_once_keeping_what_is_unfinished(tmp_path: Path) -> None:
    """Ctrl-C twice: the second used to be ignored, and the stop waited out the whole drain
    (30 s by default) for the requests still running."""
    http, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QLM_", "GRPC_")) or k == "QLM_PLUGINS"}
    serve = serve_process(tmp_path, http, grpc_port, "--instances", "1", "--speed", "1", env=env)
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(url, serve, log)
        body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 20000}
        call = threading.Thread(target=_post, args=(f"{url}/v1/completions", body, {}))
        call.start()

        async def running() -> None:
            async with CoordinatorClient(f"127.0.0.1:{grpc_port}") as c:
                while (await c.queue()).dispatched < 1:
                    await asyncio.sleep(0.05)

        asyncio.run(asyncio.wait_for(running(), 30))
        t0 = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(30) == 0
        took = time.monotonic() - t0
        call.join(10)
        text = log.read_text()
        assert took < 0.5 + 4.0, (took, text[-3000:])  # the servers' grace, not the 30 s drain
        assert "second signal: stopping now" in text
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_each_instance_group_of_the_scenario_gets_its_own_gpu_models_and_limits(tmp_path: Path) -> None:
    """`qlm serve` started every simulated instance as the scenario's first group: a second group's
    GPU, model order and engine limits were dropped (both engines came up serving the first
    group's model, and the planner had to order a swap at once)."""
    scenario = tmp_path / "two_groups.yaml"
    scenario.write_text(
        "name: two-groups\n"
        "workload: {synthetic: {rate_rps: 1, duration_s: 10}}\n"
        "models: [{name: llama-3.1-8b, profile: llama-3.1-8b}, {name: phi-4, profile: phi-4}]\n"
        "instances:\n"
        "  - {name: a, gpu: h100, models: [llama-3.1-8b, phi-4], max_num_seqs: 8}\n"
        "  - {name: b, gpu: h100, count: 2, models: [phi-4, llama-3.1-8b], max_num_seqs: 16}\n"
        "classes: [{name: chat, share: 1, ttft_s: 1}]\n"
    )
    http, grpc_port = free_port(), free_port()
    proc = serve_process(tmp_path, http, grpc_port, "--scenario", str(scenario))
    try:
        wait_healthy(f"http://127.0.0.1:{http}", proc, tmp_path / "serve.log")

        async def listed() -> dict[str, tuple[str, tuple[str, ...], int]]:
            async with CoordinatorClient(f"127.0.0.1:{grpc_port}") as c:
                deadline = time.monotonic() + 30
                while True:
                    snapshot = await c.instances()
                    if len(snapshot.instances) == 3 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            return {
                i.instance_id: (i.gpu, tuple(i.state.models_loaded), i.state.max_num_seqs)
                for i in snapshot.instances
            }

        assert asyncio.run(listed()) == {
            "sim0-0": ("h100", ("llama-3.1-8b",), 8),
            "sim1-0": ("h100", ("phi-4",), 16),
            "sim2-0": ("h100", ("phi-4",), 16),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_the_instances_qlm_serve_starts_hold_no_client_or_admin_token(tmp_path: Path) -> None:
    """They inherited the serve's whole environment: every tenant's and the operator's tokens, in
    processes that (with vLLM) run a model's code. Only their own instance token is theirs."""
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "QLM_CLIENT_TOKEN": "c-1", "QLM_ADMIN_TOKEN": "a-1", "QLM_INSTANCE_TOKEN": "i-1"}
    proc = serve_process(tmp_path, http, grpc_port, "--instances", "1", env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{http}", proc, tmp_path / "serve.log")
        # the instance; not the front door's workers (QLM_HTTP_WORKERS), which are the core's own
        (child,) = [c for c in _children(proc.pid) if b"http_workers" not in _cmdline(c)]
        held = dict(
            line.split("=", 1)
            for line in Path(f"/proc/{child}/environ").read_bytes().decode().split("\0")
            if "=" in line
        )
        assert "QLM_CLIENT_TOKEN" not in held and "QLM_ADMIN_TOKEN" not in held
        assert held.get("QLM_INSTANCE_TOKEN") == "i-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
