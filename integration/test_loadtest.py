"""``qlm loadtest`` on real processes: the coordinator's figures come with the pass-through
reference measured in the same run, and the reference answers what the front door answers."""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import pytest

from qlm_plugin import event_loop
from qlm_plugin.coordinator import loadtest

pytestmark = pytest.mark.slow


def test_loadtest_reports_each_rate_against_the_pass_through_server() -> None:
    result = loadtest.run(n=200, rates=(40.0,), duration_s=1.0, instances=1)
    assert result["event_loop"] == event_loop.loop_kind()
    assert result["submit_batch"]["accepted"] == 200
    assert result["submit_unary"]["accepted"] == 100
    for name in ("submit_batch", "submit_unary"):  # each beside the gRPC pass-through, same calls
        submits = result[name]
        assert submits["passthrough"]["accepted"] == submits["requests"]
        ratio = submits["per_s"] / submits["passthrough"]["per_s"]
        assert math.isclose(submits["ratio_to_passthrough"], ratio)
        assert submits["server_cpu_us_per_request"] > 0
    [row] = result["front_door"]
    assert row["errors"] == 0 and row["passthrough"]["errors"] == 0
    assert row["requests"] > 10 and row["passthrough"]["requests"] == row["requests"]  # same arrivals
    assert row["coordinator_cpu_ms_per_request"] > 0
    assert math.isclose(row["p99_over_passthrough"], row["p99_ms"] / row["passthrough"]["p99_ms"])
    table = loadtest.table(result)
    assert "| 40 |" in table and "pass-through" in table and "| unary Submit |" in table


def test_pass_through_server_streams_openai_chunks() -> None:
    async def main() -> list[dict[str, object]]:
        with loadtest.passthrough_process() as ref:
            async with aiohttp.ClientSession() as http:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
                async with http.post(f"{ref.http_url}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    whole = await r.json()
                async with http.post(
                    f"{ref.http_url}/v1/chat/completions", json={**body, "stream": True}
                ) as r:
                    lines = [ln for ln in (await r.text()).split("\n\n") if ln]
        assert whole["object"] == "chat.completion" and whole["usage"]["completion_tokens"] == 3
        assert lines[-1] == "data: [DONE]"
        return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]

    chunks = asyncio.run(main())
    assert len(chunks) == 3 and all(c["choices"][0]["delta"]["content"] for c in chunks)  # type: ignore[index]
