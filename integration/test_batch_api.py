"""The OpenAI Batch API end to end, in one process: the official ``openai`` SDK against a real
coordinator on loopback (real SQLite journal and batch store) with simulated instances."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.batch_store import BatchStore
from qlm_plugin.testing.stack import LocalStack, run_with_stack
from qlm_plugin.workloads.scenario import load_scenario

MODEL = "llama-3.1-8b"


run = run_with_stack


def client(st: LocalStack, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{st.http_url}/v1", api_key=key, max_retries=0)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def completion_lines(n: int, tokens: int = 8, url: str = "/v1/completions") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"task-{i}",
            "method": "POST",
            "url": url,
            "body": {"model": MODEL, "prompt": f"item {i}", "max_tokens": tokens + i % 3},
        }
        for i in range(n)
    ]


async def create(oa: openai.AsyncOpenAI, file_id: str, window: str) -> Any:
    """A completions batch of ``file_id``."""
    endpoint = "/v1/completions"
    return await oa.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window=window)


async def wait_status(
    oa: openai.AsyncOpenAI, batch_id: str, statuses: set[str], timeout_s: float = 60
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await oa.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.1)


async def lines_of(oa: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await oa.files.content(file_id)
    return [json.loads(x) for x in content.text.splitlines()]


def test_the_openai_sdk_runs_a_batch_end_to_end(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = completion_lines(12)
        f = await oa.files.create(file=("requests.jsonl", jsonl(rows)), purpose="batch")
        assert f.purpose == "batch" and f.bytes == len(jsonl(rows))
        batch = await oa.batches.create(
            input_file_id=f.id,
            endpoint="/v1/completions",
            completion_window="24h",
            metadata={"job": "nightly"},
            output_expires_after={"anchor": "created_at", "seconds": 7200},
        )
        assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
        done = await wait_status(oa, batch.id, {"completed", "failed"})
        assert done.status == "completed", done.errors
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            12,
            12,
            0,
        )
        assert done.error_file_id is None
        out = await lines_of(oa, done.output_file_id)
        assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]  # input order
        for o, r in zip(out, rows, strict=True):
            resp = o["response"]
            assert resp["status_code"] == 200 and o["error"] is None
            text = resp["body"]["choices"][0]["text"]
            assert text == synthetic_text(resp["request_id"], 0, r["body"]["max_tokens"])
            assert resp["body"]["usage"]["completion_tokens"] == r["body"]["max_tokens"]
        assert done.usage is not None and done.usage.output_tokens == sum(
            r["body"]["max_tokens"] for r in rows
        )
        output = await oa.files.retrieve(done.output_file_id or "")
        assert output.expires_at == output.created_at + 7200  # as the batch asked
        listed = await oa.batches.list()
        assert [b.id for b in listed.data] == [batch.id]
        files = await oa.files.list()
        assert {x.purpose for x in files.data} == {"batch", "batch_output"}
        # the batch's requests were batch work: the class's deadline replaced by the window
        jobs = [st.coordinator.lookup(o["response"]["request_id"]) for o in out]
        assert all(j is not None and j.request.slo_class == "batch" for j in jobs)
        e2e = [j.request.slo.e2e_deadline for j in jobs if j is not None]
        assert all(d is not None and abs(d - (batch.created_at + 24 * 3600)) < 2 for d in e2e)
        with pytest.raises(openai.ConflictError) as conflict:  # not transient: SDKs told not to retry
            await oa.batches.cancel(batch.id)
        assert conflict.value.response.headers["x-should-retry"] == "false"
        await oa.files.delete(f.id)
        with pytest.raises(openai.NotFoundError):
            await oa.files.retrieve(f.id)
        await oa.close()

    run(tmp_path, body)


def test_a_chat_batch_answers_chat_completions(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 5},
            }
            for i in range(4)
        ]
        f = await oa.files.create(file=("chat.jsonl", jsonl(rows)), purpose="batch")
        batch = await oa.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
        done = await wait_status(oa, batch.id, {"completed", "failed"})
        assert done.status == "completed"
        out = await lines_of(oa, done.output_file_id)
        assert [o["response"]["body"]["object"] for o in out] == ["chat.completion"] * 4
        assert all(o["response"]["body"]["choices"][0]["message"]["role"] == "assistant" for o in out)
        await oa.close()

    run(tmp_path, body)


def test_invalid_lines_fail_validation_with_their_line_numbers(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        good = completion_lines(2)
        rows = [
            json.dumps(good[0]),
            "{not json",
            json.dumps({**good[1], "custom_id": "task-0"}),  # duplicate custom_id
            json.dumps({**good[1], "custom_id": "x", "body": {**good[1]["body"], "model": "nope"}}),
            json.dumps({**good[1], "custom_id": "y", "url": "/v1/chat/completions"}),
            json.dumps({**good[1], "custom_id": "z", "body": {**good[1]["body"], "stream": True}}),
            json.dumps({**good[1], "custom_id": "w", "body": {**good[1]["body"], "max_tokens": -1}}),
        ]
        f = await oa.files.create(file=("bad.jsonl", ("\n".join(rows) + "\n").encode()), purpose="batch")
        batch = await oa.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        done = await wait_status(oa, batch.id, {"failed", "completed"})
        assert done.status == "failed" and done.failed_at is not None
        assert done.errors is not None and done.errors.data is not None
        by_line = {e.line: e for e in done.errors.data}
        assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
        assert "custom_id" in (by_line[3].message or "")
        assert by_line[4].param == "body.model" and "nope" in (by_line[4].message or "")
        assert by_line[5].param == "url"
        assert by_line[6].param == "body.stream"
        assert by_line[7].param == "body.max_tokens"
        # nothing of a failed batch was queued
        assert not any(j.spec.idempotency_key for j in st.coordinator.jobs.values())
        await oa.close()

    run(tmp_path, body)


def test_bad_batch_requests_get_precise_errors(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        f = await oa.files.create(file=("r.jsonl", jsonl(completion_lines(1))), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            await oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="3d")  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            await oa.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await oa.batches.create(
                input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await oa.batches.retrieve("batch_nope")
        with pytest.raises(openai.BadRequestError) as short:
            await oa.batches.create(
                input_file_id=f.id,
                endpoint="/v1/completions",
                completion_window="24h",
                output_expires_after={"anchor": "created_at", "seconds": 5},
            )
        assert short.value.param == "output_expires_after.seconds"
        store = st.server.batch_store
        assert store is not None
        expired = store.put_file(
            "default", "old.jsonl", "batch", jsonl(completion_lines(1)), expires_after_s=0
        )
        with pytest.raises(openai.NotFoundError):  # an expired file is gone for a new batch too
            await oa.batches.create(
                input_file_id=expired.id, endpoint="/v1/completions", completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await oa.files.create(file=("r.jsonl", b"{}"), purpose="fine-tune")
        async with aiohttp.ClientSession() as http:  # a client may not use the batches' keys
            body = {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 2,
                "qlm": {"idempotency_key": "qlm-batch/b/0"},
            }
            async with http.post(f"{st.http_url}/v1/completions", json=body) as r:
                assert r.status == 400 and "reserved" in (await r.json())["error"]["message"]
        await oa.close()

    run(tmp_path, body)


def test_cancel_stops_queued_requests_and_keeps_finished_ones(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = completion_lines(200, tokens=400)
        for i, row in enumerate(rows):  # lengths spread out, so the batch cannot finish in one burst
            row["body"]["max_tokens"] = 40 + (i * 97) % 1600
        f = await oa.files.create(file=("many.jsonl", jsonl(rows)), purpose="batch")
        batch = await oa.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while (
            b := await oa.batches.retrieve(batch.id)
        ).request_counts is None or b.request_counts.completed < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        estimate = (b.model_extra or {}).get("qlm")  # the estimator's view of the batch in progress
        assert estimate is not None and estimate["deadline"] == pytest.approx(batch.created_at + 86400, abs=1)
        assert estimate["queued"] + estimate["running"] > 0
        assert time.time() - 1 < estimate["estimated_completion_at"] < estimate["deadline"]
        assert estimate["p_meet"] > 0.9  # a day for a few seconds of work
        cancelling = await oa.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        seen = set()
        while (b := await oa.batches.retrieve(batch.id)).status != "cancelled":
            seen.add(b.status)
            await asyncio.sleep(0.01)
        assert seen <= {"cancelling"}, (
            "OpenAI's cancel: cancelling, then cancelled (it went through finalizing)"
        )
        done = await wait_status(oa, batch.id, {"cancelled"})
        assert done.finalizing_at is None and done.cancelled_at is not None
        counts = done.request_counts
        assert counts is not None and counts.total == 200 and counts.completed + counts.failed == 200
        assert 3 <= counts.completed < 200
        out = await lines_of(oa, done.output_file_id)
        err = await lines_of(oa, done.error_file_id)
        assert len(out) == counts.completed and len(err) == counts.failed
        assert sorted(o["custom_id"] for o in out + err) == sorted(r["custom_id"] for r in rows)  # each once
        assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
        # nothing of the batch is left queued or running
        assert not [j for j in st.coordinator.jobs.values() if j.state in ("queued", "dispatched")]
        await oa.close()

    run(tmp_path, body, speed=2.0)


def test_a_batch_cancelled_while_it_validates_is_cancelled(tmp_path: Path) -> None:
    """Cancelled before its file was validated, a batch with an invalid line was taken for one
    restarted after validation: the invalid line became a 400 answer among the cancelled ones."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = completion_lines(20_000, tokens=2)
        content = jsonl(rows).replace(json.dumps(rows[3]).encode(), b"not json", 1)
        f = await oa.files.create(file=("big.jsonl", content), purpose="batch")
        batch = await create(oa, f.id, "24h")
        cancelling = await oa.batches.cancel(batch.id)
        if cancelling.status != "cancelling":
            pytest.skip(f"validation ended before the cancel ({cancelling.status}): nothing to check")
        done = await wait_status(oa, batch.id, {"cancelled", "failed"})
        assert done.status == "cancelled" and done.in_progress_at is None
        counts = done.request_counts
        assert counts is not None and counts.total == counts.failed == 19_999 and counts.completed == 0
        err = await lines_of(oa, done.error_file_id)
        assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
        await oa.close()

    run(tmp_path, body)


def test_a_batch_past_its_window_expires_with_what_finished(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = completion_lines(120, tokens=1500)
        for i, r in enumerate(rows):  # one in ten short enough to finish in the window
            r["body"]["max_tokens"] = 10 if i % 10 == 0 else 1500
        f = await oa.files.create(file=("slow.jsonl", jsonl(rows)), purpose="batch")
        batch = await oa.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="3s"
        )
        done = await wait_status(oa, batch.id, {"expired", "completed"}, timeout_s=30)
        assert done.status == "expired" and done.expired_at is not None
        out = await lines_of(oa, done.output_file_id)
        err = await lines_of(oa, done.error_file_id)
        assert out and err and len(out) + len(err) == 120
        assert {e["error"]["code"] for e in err} == {"batch_expired"}
        assert not [j for j in st.coordinator.jobs.values() if j.state in ("queued", "dispatched")]
        await oa.close()

    run(tmp_path, body, speed=1.0, config={"batches": {"min_window_s": 1}})


def test_files_and_batches_are_visible_to_their_tenant_only(tmp_path: Path) -> None:
    env = {"TOK_A": "token-a", "TOK_B": "token-b", "TOK_ADMIN": "token-admin", "TOK_I": "token-i"}
    tokens = [
        {"token_env": "TOK_A", "scopes": ["client"], "tenant": "a"},
        {"token_env": "TOK_B", "scopes": ["client"], "tenant": "b"},
        {"token_env": "TOK_ADMIN", "scopes": ["client", "admin"]},
        {"token_env": "TOK_OPS", "scopes": ["admin"]},
        {"token_env": "TOK_I", "scopes": ["instance"]},
    ]
    env["TOK_OPS"] = "token-ops"

    async def body(st: LocalStack) -> None:
        a, b, admin = client(st, "token-a"), client(st, "token-b"), client(st, "token-admin")
        f = await a.files.create(file=("a.jsonl", jsonl(completion_lines(2))), purpose="batch")
        batch = await a.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        with pytest.raises(openai.NotFoundError):
            await b.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            await b.files.content(f.id)
        with pytest.raises(openai.NotFoundError):
            await b.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await b.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):  # b cannot run a's file either
            await b.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        assert (await b.batches.list()).data == [] and (await b.files.list()).data == []
        assert [x.id for x in (await admin.batches.list()).data] == [batch.id]
        assert (await admin.files.retrieve(f.id)).id == f.id
        async with client(st, "token-ops") as ops:  # the admin scope alone sees all too (it was a 403)
            assert f.id in [x.id for x in (await ops.files.list()).data]
            assert (await ops.batches.retrieve(batch.id)).id == batch.id
        with pytest.raises(openai.AuthenticationError):
            await client(st, "wrong").files.list()
        done = await wait_status(a, batch.id, {"completed"})
        assert done.output_file_id is not None
        with pytest.raises(openai.NotFoundError):
            await b.files.content(done.output_file_id)
        for c in (a, b, admin):
            await c.close()

    run(tmp_path, body, config={"tokens": tokens}, env=env, token="token-i")


def test_without_authentication_each_caller_sees_the_tenant_it_names(tmp_path: Path) -> None:
    """With authentication off a caller was an admin: asking as tenant b listed a's files and
    read a's responses, where the docs say they are a's alone (and running a's file was a 404)."""

    async def body(st: LocalStack) -> None:
        a = openai.AsyncOpenAI(
            base_url=f"{st.http_url}/v1", api_key="x", max_retries=0, default_headers={"x-qlm-tenant": "a"}
        )
        b = openai.AsyncOpenAI(
            base_url=f"{st.http_url}/v1", api_key="x", max_retries=0, default_headers={"x-qlm-tenant": "b"}
        )
        f = await a.files.create(file=("a.jsonl", jsonl(completion_lines(1))), purpose="batch")
        answer = await a.responses.create(model=MODEL, input="hi", max_output_tokens=2)
        assert [x.id for x in (await a.files.list()).data] == [f.id]
        assert (await b.files.list()).data == []
        with pytest.raises(openai.NotFoundError):
            await b.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(answer.id)
        assert (await a.responses.retrieve(answer.id)).id == answer.id
        await a.close()
        await b.close()

    run(tmp_path, body)


def test_file_size_limits_per_tenant(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        oa = client(st)
        with pytest.raises(openai.APIStatusError) as too_big:
            await oa.files.create(file=("big.jsonl", b"x" * 2000), purpose="batch")
        assert too_big.value.status_code == 413
        await oa.files.create(file=("one.jsonl", b"y" * 900), purpose="batch")
        with pytest.raises(openai.RateLimitError, match="limit") as full:
            await oa.files.create(file=("two.jsonl", b"z" * 900), purpose="batch")
        # a retry cannot help until files are deleted: the SDKs uploaded the whole file 3 times
        assert full.value.response.headers["x-should-retry"] == "false"
        await oa.close()

    limits = {"max_file_bytes": 1000, "max_stored_bytes": 1500}
    run(tmp_path, body, config={"tenant_limits": limits})


def test_a_batch_resumes_after_a_restart_in_any_state(tmp_path: Path) -> None:
    """The store and the journal alone carry a batch over a restart: one left validating, and one
    that finished but is set back to finalizing with its output files gone (a crash before the
    finalizing transaction) and restarted after its window, both complete on the next start with
    every line answered once."""
    rows = completion_lines(30)
    ids: dict[str, str] = {}

    async def first(st: LocalStack) -> None:
        oa = client(st)
        f = await oa.files.create(file=("r.jsonl", jsonl(rows)), purpose="batch")
        b1 = await oa.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        done = await wait_status(oa, b1.id, {"completed"})
        ids.update(finalized=b1.id, input=f.id, output=done.output_file_id or "")
        await oa.close()

    run(tmp_path, first)
    store = BatchStore(BatchStore.beside(str(tmp_path / "journal.db")))
    rec = store.get_batch(ids["finalized"])
    assert rec is not None
    output_before = store.file_content(ids["output"])
    store.delete_file(ids["output"])
    rec.status, rec.output_file_id, rec.completed_at = "finalizing", None, None
    rec.created_at -= rec.window_s + 60  # restarted after its window: it ended before, so not expired
    store.put_batch(rec)
    from qlm_plugin.coordinator.batch_store import BatchRecord

    pending = BatchRecord(
        "batch_pending", "default", ids["input"], "/v1/completions", "24h", 86400.0, time.time()
    )
    store.put_batch(pending)
    store.close()

    async def second(st: LocalStack) -> None:
        oa = client(st)
        again = await wait_status(oa, ids["finalized"], {"completed"})
        out = await lines_of(oa, again.output_file_id)
        assert json.dumps(out).encode() and len(out) == 30
        before = [json.loads(x) for x in (output_before or b"").splitlines()]
        # the same answers: the same requests, found in the journal, not served again
        assert [o["response"]["request_id"] for o in out] == [o["response"]["request_id"] for o in before]
        fresh = await wait_status(oa, "batch_pending", {"completed"})
        assert fresh.request_counts is not None and fresh.request_counts.completed == 30
        await oa.close()

    run(tmp_path, second)


def test_a_batch_s_counts_never_fall_over_a_restart(tmp_path: Path) -> None:
    """A client polling a batch across a restart of the coordinator sees its request counts go on
    from where they were (they are saved while it runs and at the stop), never back to zero while
    the next start follows the lines again; they end exact."""
    total = 1000
    rows = completion_lines(total, tokens=40)
    seen: dict[str, Any] = {}

    async def first(st: LocalStack) -> None:
        oa = client(st)
        f = await oa.files.create(file=("r.jsonl", jsonl(rows)), purpose="batch")
        batch = await create(oa, f.id, "24h")
        deadline = time.monotonic() + 60
        while not 0 < (done := (await oa.batches.retrieve(batch.id)).request_counts.completed) < total:  # type: ignore[union-attr]
            assert time.monotonic() < deadline and done < total, "no state caught between start and end"
            await asyncio.sleep(0.02)
        seen.update(id=batch.id, completed=done)
        await oa.close()

    run(tmp_path, first, instances=1, speed=1.0)
    store = BatchStore(BatchStore.beside(str(tmp_path / "journal.db")))
    saved = store.get_batch(seen["id"])
    store.close()
    assert saved is not None and saved.status == "in_progress"
    assert saved.completed >= seen["completed"]  # written at the stop, not only when it began

    async def second(st: LocalStack) -> None:
        oa = client(st)
        counts: list[int] = []
        deadline = time.monotonic() + 60
        while (b := await oa.batches.retrieve(seen["id"])).status != "completed":
            assert b.request_counts is not None
            counts.append(b.request_counts.completed)
            assert time.monotonic() < deadline, f"batch still {b.status}"
            await asyncio.sleep(0.02)
        assert counts and counts[0] >= saved.completed
        assert counts == sorted(counts), "a count went down"
        assert b.request_counts is not None
        assert (b.request_counts.completed, b.request_counts.failed) == (total, 0)
        assert len(await lines_of(oa, b.output_file_id)) == total
        await oa.close()

    run(tmp_path, second, instances=1, speed=1.0)


def test_a_later_tenant_s_small_batch_is_not_held_behind_an_earlier_large_one(tmp_path: Path) -> None:
    """Two tenants' batches share the seats: b's 20 lines, created a second after a's 1,500 (all
    24 h windows), end while a has most of its lines still to do. In deadline order they ended
    together, last: every line of a batch shares its window's end."""
    big, small = completion_lines(1500, tokens=128), completion_lines(20, tokens=128)

    async def body(st: LocalStack) -> None:
        a, b = (
            openai.AsyncOpenAI(
                base_url=f"{st.http_url}/v1", api_key="x", max_retries=0, default_headers={"x-qlm-tenant": t}
            )
            for t in "ab"
        )
        fa = await a.files.create(file=("a.jsonl", jsonl(big)), purpose="batch")
        batch_a = await create(a, fa.id, "24h")
        await wait_status(a, batch_a.id, {"in_progress"})
        await asyncio.sleep(1.0)
        fb = await b.files.create(file=("b.jsonl", jsonl(small)), purpose="batch")
        batch_b = await create(b, fb.id, "24h")
        done_b = await wait_status(b, batch_b.id, {"completed"}, timeout_s=120)
        assert done_b.request_counts is not None and done_b.request_counts.completed == 20
        progress = (await a.batches.retrieve(batch_a.id)).request_counts
        assert progress is not None and progress.completed < 0.7 * 1500, progress
        done_a = await wait_status(a, batch_a.id, {"completed"}, timeout_s=120)
        assert done_a.request_counts is not None and done_a.request_counts.completed == 1500
        for c in (a, b):
            await c.close()

    run(tmp_path, body, instances=1, speed=1.0)


def test_bench_batch_measures_each_way_of_sending_the_batch() -> None:
    from qlm_plugin.coordinator.batch_bench import report, run_bench

    results = run_bench(["qlm", "fcfs"], requests=20, window="2m", rate=5.0, duration_s=3.0, warmup_s=0.5)
    assert [r.sent_as for r in results] == ["Batch API", "plain requests"]
    for r in results:
        assert r.batch_completed == 20 and r.batch_in_window == 1.0
        assert 0 < r.batch_completion_s < r.window_s == 120
        assert r.interactive > 0 and r.interactive_failed == 0 and 0 <= r.interactive_met <= 1
        assert 0 < r.busy_fraction <= 1
    table = report(results)
    assert "| qlm | Batch API |" in table and "| fcfs | plain requests |" in table


def test_a_finished_batch_is_shown_only_once_its_files_can_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client polling the batch must never get an output file id it cannot download: the
    final state is committed with its files before anyone sees it (slowed here to widen the gap)."""
    finalize = BatchStore.finalize

    def slow_finalize(self: BatchStore, *args: Any) -> None:
        time.sleep(1.5)  # longer than a stall of the polling client on a loaded machine
        finalize(self, *args)

    monkeypatch.setattr(BatchStore, "finalize", slow_finalize)

    async def body(st: LocalStack) -> None:
        oa = client(st)
        f = await oa.files.create(file=("few.jsonl", jsonl(completion_lines(4))), purpose="batch")
        batch = await oa.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while (b := await oa.batches.retrieve(batch.id)).status != "completed":
            seen.add(b.status)
            assert b.output_file_id is None, b.status
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert "finalizing" in seen  # the slow commit was watched
        assert len(await lines_of(oa, b.output_file_id)) == 4
        await oa.close()

    run(tmp_path, body)


def test_lines_end_at_newlines_only(tmp_path: Path) -> None:
    """JSON allows U+2028, U+2029 and U+0085 raw inside strings (JSON.stringify and
    json.dumps(ensure_ascii=False) write them so): they do not end a line. A byte-order mark and
    CRLF line ends are read too."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = completion_lines(3)
        rows[0]["body"]["prompt"] = "one\u2028two\u2029three\x85four"
        content = "\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
        f = await oa.files.create(file=("u.jsonl", content.encode()), purpose="batch")
        batch = await create(oa, f.id, "1h")
        done = await wait_status(oa, batch.id, {"completed", "failed"})
        assert (done.status, done.errors) == ("completed", None)
        assert done.request_counts is not None and done.request_counts.completed == 3
        await oa.close()

    run(tmp_path, body)


def test_a_tenants_batches_together_leave_room_for_its_other_requests(tmp_path: Path) -> None:
    """Half the tenant's request limit is for all its batches together, not for each: with two
    batches running, its interactive requests still get in."""
    limit = 40

    async def body(st: LocalStack) -> None:
        oa = client(st)
        batches = []
        for k in range(2):
            rows = completion_lines(120, tokens=400)
            f = await oa.files.create(file=(f"b{k}.jsonl", jsonl(rows)), purpose="batch")
            batches.append(await create(oa, f.id, "24h"))
        for b in batches:
            await wait_status(oa, b.id, {"in_progress"})
        await asyncio.sleep(0.5)
        assert st.coordinator.book.tenant_load["default"][0] <= limit // 2
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                req = {"model": MODEL, "prompt": "interactive", "max_tokens": 4}
                async with http.post(f"{st.http_url}/v1/completions", json=req) as r:
                    assert r.status == 200, await r.text()
        for b in batches:
            await oa.batches.cancel(b.id)
        for b in batches:
            assert (await wait_status(oa, b.id, {"cancelled"})).status == "cancelled"
        await oa.close()

    run(tmp_path, body, speed=5.0, config={"tenant_limits": {"max_queued_requests": limit}})


def test_a_batch_waiting_for_room_another_holds_is_cancelled_at_once(tmp_path: Path) -> None:
    """A batch whose lines waited for the tenant's room, held whole by another batch of the
    tenant, stayed ``cancelling`` (and in progress past its window) until that batch ended."""
    limit = 20  # the tenant's batches together: 10 unfinished requests

    async def body(st: LocalStack) -> None:
        oa = client(st)
        hold = await oa.files.create(
            file=("a.jsonl", jsonl(completion_lines(10, tokens=4000))), purpose="batch"
        )
        a = await create(oa, hold.id, "24h")
        await wait_status(oa, a.id, {"in_progress"})
        while st.coordinator.book.tenant_load["default"][0] < limit // 2:
            await asyncio.sleep(0.05)
        wait = await oa.files.create(file=("b.jsonl", jsonl(completion_lines(10, tokens=3))), purpose="batch")
        b = await create(oa, wait.id, "24h")
        await wait_status(oa, b.id, {"in_progress"})
        await oa.batches.cancel(b.id)
        done = await wait_status(oa, b.id, {"cancelled"}, timeout_s=10)
        assert done.request_counts is not None and done.request_counts.failed == 10
        assert (await oa.batches.retrieve(a.id)).status == "in_progress"  # the other one goes on
        await oa.batches.cancel(a.id)
        await wait_status(oa, a.id, {"cancelled"})
        await oa.close()

    run(tmp_path, body, speed=1.0, config={"tenant_limits": {"max_queued_requests": limit}})


def test_files_page_by_cursor_past_any_count(tmp_path: Path) -> None:
    """Every file is reachable by pages (the cursor is in the query: the listing used to stop at
    10,000 files with has_more false)."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        ids = [(await oa.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="batch")).id for i in range(7)]
        pages: list[list[str]] = []
        after: str | None = None
        while True:
            page = await oa.files.list(limit=3, order="asc", **({"after": after} if after else {}))
            pages.append([f.id for f in page.data])
            if not page.has_more:
                break
            after = page.data[-1].id
        assert pages == [ids[:3], ids[3:6], ids[6:]]
        newest = [f.id async for f in oa.files.list(limit=2)]  # the SDK's auto-paging, newest first
        assert newest == ids[::-1]
        assert (await oa.files.list(after="file-gone")).data == []
        await oa.close()

    run(tmp_path, body)


def test_a_batch_larger_than_its_in_flight_width_is_estimated_with_its_unsent_lines(tmp_path: Path) -> None:
    """Lines not yet submitted are in no queue: the estimate counts them at the batch's rate, so a
    batch that cannot finish in its window is told so before it expires."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        f = await oa.files.create(file=("r.jsonl", jsonl(completion_lines(300, tokens=200))), purpose="batch")
        batch = await create(oa, f.id, "8s")
        deadline = time.monotonic() + 30
        while True:
            extra = (await oa.batches.retrieve(batch.id)).model_extra or {}
            q = extra.get("qlm")
            if q and q["p_meet"] is not None and q["not_yet_submitted"] > 0:
                break
            assert time.monotonic() < deadline, extra
            await asyncio.sleep(0.05)
        assert q["estimated_completion_at"] > q["deadline"] and q["p_meet"] < 0.1, q
        done = await wait_status(oa, batch.id, {"expired", "completed"})
        assert done.status == "expired"
        await oa.close()

    run(tmp_path, body, speed=2.0, config={"batches": {"max_in_flight": 10, "min_window_s": 1}})


TWO_MODELS = f"""
name: two-models
models:
  - {{name: {MODEL}, profile: llama-3.1-8b}}
  - {{name: other, profile: llama-3.1-8b}}
instances:
  - {{count: 2, gpu: h100, models: [{MODEL}, other]}}
classes:
  - {{name: interactive, share: 0.7, ttft_s: 1.0}}
  - {{name: batch, share: 0.3, e2e_s: 600, priority: 1}}
"""


def test_a_file_of_several_models_runs_each_line_on_its_model(tmp_path: Path) -> None:
    """OpenAI takes one model per file; here a file may name several (the batch's model is then
    null)."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        rows = completion_lines(2)
        rows[1]["body"]["model"] = "other"
        f = await oa.files.create(file=("m.jsonl", jsonl(rows)), purpose="batch")
        batch = await create(oa, f.id, "1h")
        done = await wait_status(oa, batch.id, {"completed", "failed"})
        assert (done.status, done.model) == ("completed", None)
        out = await lines_of(oa, done.output_file_id)
        assert [o["response"]["body"]["model"] for o in out] == [MODEL, "other"]
        await oa.close()

    (tmp_path / "two.yaml").write_text(TWO_MODELS)
    run(tmp_path, body, scenario=load_scenario(tmp_path / "two.yaml"))


def test_a_tenants_unfinished_batches_read_a_bounded_input_together(tmp_path: Path) -> None:
    """Each batch holds its parsed lines in memory, and the batches of one file were not counted:
    six batches of one 10-MB file took 260 MB, a tenant could take the coordinator down."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        data = jsonl(completion_lines(40, tokens=4000))
        f = await oa.files.create(file=("in.jsonl", data), purpose="batch")
        first = await create(oa, f.id, "24h")
        with pytest.raises(openai.RateLimitError) as err:
            await create(oa, f.id, "24h")  # the same file again: its bytes count again
        assert "batches.max_open_bytes" in str(err.value)
        await oa.batches.cancel(first.id)
        await wait_status(oa, first.id, {"cancelled"})
        again = await create(oa, f.id, "24h")  # room again once it ended
        await oa.batches.cancel(again.id)
        await oa.close()

    data_len = len(jsonl(completion_lines(40, tokens=4000)))
    run(tmp_path, body, config={"batches": {"max_open_bytes": data_len + 1}})


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    """No batch reads one, and each counted nothing against its tenant's store: an endless supply."""

    async def body(st: LocalStack) -> None:
        oa = client(st)
        with pytest.raises(openai.BadRequestError) as err:
            await oa.files.create(file=("empty.jsonl", b""), purpose="batch")
        assert "file: is empty" in str(err.value)
        await oa.close()

    run(tmp_path, body)
