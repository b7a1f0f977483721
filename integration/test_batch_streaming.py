"""A batch whose input file spans several of the store's chunks, end to end: uploaded through the
official ``openai`` SDK, read back byte for byte, and validated a line at a time, lines cut by
chunk boundaries included."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai

from qlm_plugin.coordinator.batch_store import CHUNK_BYTES
from qlm_plugin.testing.stack import LocalStack, run_with_stack

MODEL = "llama-3.1-8b"


def lines(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"task-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"item {i} " + "word " * 1000, "max_tokens": 2},
        }
        for i in range(n)
    ]


async def wait_done(oa: openai.AsyncOpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 60
    while (batch := await oa.batches.retrieve(batch_id)).status in (
        "validating",
        "in_progress",
        "finalizing",
    ):
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.1)
    return batch


def test_a_batch_of_a_file_larger_than_a_chunk_runs_every_line(tmp_path: Path) -> None:
    rows = lines(300)
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert len(content) > CHUNK_BYTES  # lines straddle the first chunk's end

    async def body(st: LocalStack) -> None:
        oa = openai.AsyncOpenAI(base_url=f"{st.http_url}/v1", api_key="none", max_retries=0)
        f = await oa.files.create(file=("big.jsonl", content), purpose="batch")
        assert f.bytes == len(content)
        assert (await oa.files.content(f.id)).content == content
        batch = await oa.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        while (batch := await oa.batches.retrieve(batch.id)).status in (
            "validating",
            "in_progress",
            "finalizing",
        ):
            await asyncio.sleep(0.1)
        assert (batch.status, batch.errors) == ("completed", None)
        assert batch.output_file_id is not None
        out = [json.loads(x) for x in (await oa.files.content(batch.output_file_id)).text.splitlines()]
        assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
        await oa.close()

    run_with_stack(tmp_path, body, speed=50.0)


def test_a_file_past_its_first_chunk_is_checked_whole_before_any_line_runs(tmp_path: Path) -> None:
    """Not UTF-8 after the first chunk, or more lines than a batch takes: the batch fails with
    nothing of it queued, as when the file was read whole."""
    valid = "".join(json.dumps(r) + "\n" for r in lines(260)).encode()
    bad = valid + b'{"custom_id": "caf\xe9"}\n'
    assert len(valid) > CHUNK_BYTES

    async def body(st: LocalStack) -> None:
        oa = openai.AsyncOpenAI(base_url=f"{st.http_url}/v1", api_key="none", max_retries=0)
        for content, code, line in ((bad, "invalid_file", 261), (valid, "too_many_requests", None)):
            f = await oa.files.create(file=("f.jsonl", content), purpose="batch")
            batch = await oa.batches.create(
                input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
            )
            batch = await wait_done(oa, batch.id)
            assert batch.status == "failed" and batch.errors is not None and batch.errors.data is not None
            assert [(e.code, e.line) for e in batch.errors.data] == [(code, line)]
        assert st.coordinator.book.tenant_load.get("default", (0,))[0] == 0
        await oa.close()

    run_with_stack(tmp_path, body, config={"batches": {"max_requests": 259}})
