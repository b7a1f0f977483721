"""A batch in progress survives ``kill -9`` of the coordinator: 400 lines, the coordinator killed
once some have finished, restarted on the same journal and batch store; simulated instances run as
their own processes and keep serving meanwhile. Every line is answered once in the output file, and
no request is served twice."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.testing.processes import (
    coordinator_process,
    instance_process,
    served_counts,
    stop_all,
    wait_ready,
)

MODEL = "llama-3.1-8b"
N = 400

pytestmark = pytest.mark.slow

CONFIG = """
heartbeat_interval_s: 0.2
heartbeat_timeout_s: 10.0
drain_timeout_s: 5.0
"""


async def _get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json(content_type=None)


def _choices(line: int) -> int:
    return 2 if line % 10 == 0 else 1  # a line of several choices is several requests to find again


def _tokens(line: int) -> int:
    # spread out, so the lines finish over seconds, never in one burst before the kill
    return 40 + (line * 97) % 1600


def test_kill_9_during_a_batch_answers_every_line_once(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    http_port, grpc_port = free_port(), free_port()
    url, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    coord = coordinator_process(tmp_path, http_port, grpc_port)
    instances = [instance_process(tmp_path, grpc_port, n) for n in ("a", "b")]
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "q" * 300, "max_tokens": _tokens(i), "n": _choices(i)},
        }
        for i in range(N)
    ]
    try:

        async def first_half() -> tuple[str, dict[str, int]]:
            await wait_ready(target, 2)
            async with aiohttp.ClientSession() as http:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                content = "".join(json.dumps(r) + "\n" for r in rows).encode()
                form.add_field("file", content, filename="lines.jsonl")
                async with http.post(f"{url}/v1/files", data=form) as r:
                    file_id = (await r.json())["id"]
                body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "1h"}
                async with http.post(f"{url}/v1/batches", json=body) as r:
                    batch_id = (await r.json())["id"]
                while True:  # mid-run: some lines finished, some running, most queued
                    batch = await _get(http, f"{url}/v1/batches/{batch_id}")
                    if batch["request_counts"]["completed"] >= 10:
                        assert batch["status"] == "in_progress"
                        return batch_id, batch["request_counts"]
                    await asyncio.sleep(0.05)

        batch_id, before = asyncio.run(first_half())
        coord.send_signal(signal.SIGKILL)
        coord.wait(10)
        killed_at = time.monotonic()
        time.sleep(0.5)  # the instances notice and keep serving what they hold
        coord = coordinator_process(tmp_path, http_port, grpc_port)

        async def second_half() -> tuple[dict[str, Any], list[dict[str, Any]], float]:
            await wait_ready(target, 2)
            recovered = time.monotonic() - killed_at
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 180
                while True:
                    batch = await _get(http, f"{url}/v1/batches/{batch_id}")
                    if batch["status"] in ("completed", "failed", "expired") or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert batch["status"] == "completed", batch
                async with http.get(f"{url}/v1/files/{batch['output_file_id']}/content") as r:
                    out = [json.loads(x) for x in (await r.text()).splitlines()]
            return batch, out, recovered

        batch, out, recovered = asyncio.run(second_half())
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(20) == 0
    finally:
        stop_all([coord, *instances])

    served = served_counts(tmp_path, ("a", "b"))
    request_ids = [
        f["request_id"]
        for o in out
        for f in o["response"]["body"]["qlm"].get("choices", [o["response"]["body"]["qlm"]])
    ]
    twice = sum(1 for rid in request_ids if served.get(rid, 0) > 1)
    print(
        f"\nbatch of {N}: {before['completed']} completed before kill -9; after restart "
        f"{batch['request_counts']}, output lines {len(out)}, distinct custom_ids "
        f"{len({o['custom_id'] for o in out})}, served twice {twice}, coordinator back in {recovered:.1f} s"
    )
    assert batch["request_counts"] == {"total": N, "completed": N, "failed": 0}
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]  # each once, in input order
    assert batch["error_file_id"] is None
    assert len(set(request_ids)) == sum(map(_choices, range(N)))
    assert twice == 0
    for i, o in enumerate(out):
        body = o["response"]["body"]
        assert len(body["choices"]) == _choices(i)
        for choice, facts in zip(body["choices"], body["qlm"].get("choices", [body["qlm"]]), strict=True):
            assert choice["text"] == synthetic_text(facts["request_id"], 0, _tokens(i))
