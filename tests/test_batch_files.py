"""Batch API files stream through the store a chunk at a time: what goes in comes out byte for
byte across chunk boundaries, a refused, broken or killed upload leaves nothing stored, the store
serves other work while a large upload copies in, and a tenant's transfers at once are bounded.
The routes run on a bare aiohttp app over a real store (no coordinator: file routes need none)."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from qlm_plugin.coordinator import batch_api, batch_store
from qlm_plugin.coordinator.auth import Authenticator
from qlm_plugin.coordinator.batch_api import MAX_TRANSFERS_PER_TENANT, BatchAPI
from qlm_plugin.coordinator.batch_store import CHUNK_BYTES, BatchStore, StoredBytesExceeded
from qlm_plugin.coordinator.batches import BatchService
from qlm_plugin.coordinator.config import BatchSettings, CoordinatorConfig, TenantLimits
from qlm_plugin.coordinator.coordinator import Coordinator


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of lines of many lengths, one of them longer than a chunk."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    total = 0
    while total < size:
        n = CHUNK_BYTES + 1234 if not parts else rng.choice((0, 1, 17, 700, 65_537))
        parts.append(rng.randbytes(n).replace(b"\n", b"x") + b"\n")
        total += n + 1
    return b"".join(parts)[:size]


@pytest.fixture(params=[True, False], ids=["blob-io", "whole"])
def blob_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways of reading a file written whole (a batch's output, as versions before stop 38 stored
    it): a chunk at a time through a blob handle (Python 3.11), or whole (3.10). Uploads and outputs
    are stored as chunk rows now."""
    monkeypatch.setattr(batch_store, "BLOB_IO", request.param)
    return cast(bool, request.param)


def test_a_file_larger_than_a_chunk_comes_back_byte_for_byte(tmp_path: Path, blob_io: bool) -> None:
    content = payload(2 * CHUNK_BYTES + 4321)
    store = BatchStore(tmp_path / "b.db")
    try:
        with store.spool() as spool:
            spool.write(content)
            rec = store.put_file_from("acme", "in.jsonl", "batch", spool, len(content))
        assert (rec.bytes, store.tenant_bytes("acme")) == (len(content), len(content))
        assert store.file_content(rec.id) == content
        reader = store.open_content(rec.id)
        assert reader is not None and reader.size == len(content)
        with reader:
            chunks = list(iter(lambda: reader.read(CHUNK_BYTES), b""))
        assert len(chunks) == 3 and b"".join(chunks) == content
        assert list(store.file_lines(rec.id)) == content.split(b"\n")
        assert store.open_content("file-nope") is None
        whole = store.put_file("acme", "out.jsonl", "batch_output", content)  # an earlier output
        reader = store.open_content(whole.id)
        assert reader is not None and reader.size == len(content)
        with reader:
            assert b"".join(iter(lambda: reader.read(CHUNK_BYTES), b"")) == content
    finally:
        store.close()


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"a", b"a\n", b"\n\nb\n\n", b"x" * CHUNK_BYTES + b"\n" + b"y" * (CHUNK_BYTES - 1) + b"\nz"],
    ids=["empty", "newline", "no-newline", "one-line", "blank-lines", "lines-across-chunks"],
)
def test_lines_are_split_at_newlines_across_chunks(tmp_path: Path, content: bytes) -> None:
    store = BatchStore(tmp_path / "b.db")
    try:
        rec = store.put_file_from("t", "f.jsonl", "batch", io.BytesIO(content), len(content))
        assert list(store.file_lines(rec.id)) == content.split(b"\n")
        with pytest.raises(KeyError):
            next(store.file_lines("file-nope"))
    finally:
        store.close()


def test_a_refused_or_broken_upload_leaves_nothing_stored(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "b.db")
    try:
        first = store.put_file_from(
            "t", "a.jsonl", "batch", io.BytesIO(b"a" * 600), 600, max_stored_bytes=1000
        )
        with pytest.raises(StoredBytesExceeded) as over:
            store.put_file_from("t", "b.jsonl", "batch", io.BytesIO(b"b" * 500), 500, max_stored_bytes=1000)
        assert over.value.used == 600
        # the spool ends short of its size (a disk error mid-way): rolled back, not half stored
        short = io.BytesIO(b"c" * (CHUNK_BYTES + 10))
        with pytest.raises(ValueError, match="spool"):
            store.put_file_from("t", "c.jsonl", "batch", short, 2 * CHUNK_BYTES)
        assert [f.id for f in store.list_files(None)] == [first.id]
        assert store.tenant_bytes("t") == 600
        # other tenants' files do not count
        store.put_file_from("u", "d.jsonl", "batch", io.BytesIO(b"d" * 900), 900, max_stored_bytes=1000)
    finally:
        store.close()


def test_a_file_deleted_while_it_is_read_fails_the_next_read(tmp_path: Path) -> None:
    if not batch_store.BLOB_IO:
        pytest.skip("Python 3.10: a file is read whole")
    store = BatchStore(tmp_path / "b.db")
    try:
        content = payload(2 * CHUNK_BYTES)
        rec = store.put_file_from("t", "f.jsonl", "batch", io.BytesIO(content), len(content))
        reader = store.open_content(rec.id)
        assert reader is not None
        assert reader.read(CHUNK_BYTES) == content[:CHUNK_BYTES]
        other = store.put_file_from("t", "g.jsonl", "batch", io.BytesIO(b"g"), 1)  # writes go on meanwhile
        assert store.delete_file(other.id)
        assert reader.read(10) == content[CHUNK_BYTES : CHUNK_BYTES + 10]
        assert store.delete_file(rec.id)
        with pytest.raises(sqlite3.OperationalError):
            reader.read(10)
        reader.close()
    finally:
        store.close()


class _PausedSpool(io.BytesIO):
    """An upload's spool whose second read waits until ``go`` is set (a slow disk, a large file)."""

    def __init__(self, content: bytes) -> None:
        super().__init__(content)
        self.reads = 0
        self.paused = threading.Event()
        self.go = threading.Event()

    def read(self, n: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads == 2:
            self.paused.set()
            self.go.wait(30)
        return super().read(n)


def test_the_store_serves_other_work_while_a_large_upload_copies_in(tmp_path: Path) -> None:
    """A batch's progress is written on the coordinator's event loop: an upload of many megabytes
    must not hold the store for the whole copy (it held it about 0.9 s per 150 MB)."""
    store = BatchStore(tmp_path / "b.db")
    content = payload(3 * CHUNK_BYTES)
    spool = _PausedSpool(content)
    uploaded: list[batch_store.FileRecord] = []
    upload = threading.Thread(
        target=lambda: uploaded.append(store.put_file_from("t", "big.jsonl", "batch", spool, len(content)))
    )
    try:
        upload.start()
        assert spool.paused.wait(10)
        seen: dict[str, Any] = {}

        def other_work() -> None:  # what the event loop does meanwhile
            store.put_batch(
                batch_store.BatchRecord("batch-1", "t", "file-x", "/v1/chat/completions", "24h", 86400.0, 0.0)
            )
            seen["batch"] = store.get_batch("batch-1")
            seen["listed"] = store.list_files("t")
            seen["bytes"] = store.tenant_bytes("t")

        beside = threading.Thread(target=other_work)
        beside.start()
        beside.join(5)
        finished_beside = not beside.is_alive()
        spool.go.set()
        upload.join(30)
        beside.join(30)
        assert finished_beside, "the store was held for the whole upload"
        assert seen["batch"] is not None and seen["batch"].id == "batch-1"
        # half copied: not listed yet, but its bytes count against the tenant's limit already
        assert (seen["listed"], seen["bytes"]) == ([], len(content))
        assert [f.id for f in store.list_files("t")] == [uploaded[0].id]
        assert store.file_content(uploaded[0].id) == content
    finally:
        spool.go.set()
        store.close()


def test_a_batch_output_is_stored_a_chunk_at_a_time_and_shown_only_with_the_final_state(
    tmp_path: Path,
) -> None:
    """A batch's output file of many megabytes is written as it is built (it was built whole in
    memory, 3.5 times its size, then written in one transaction that held the store): hidden while
    written, shown with the batch's final state in one commit, byte for byte; a crash before that
    leaves no file when the store opens again, and finalizing runs again from the top."""
    path = tmp_path / "b.db"
    store = BatchStore(path)
    batch = batch_store.BatchRecord("batch-1", "t", "file-x", "/v1/completions", "24h", 86400.0, 0.0)
    store.put_batch(batch)
    lines = [b'{"custom_id": "%d", "text": "%s"}\n' % (i, b"x" * (i % 997)) for i in range(6000)]
    writer = store.new_file("t", "batch-1_output.jsonl", "batch_output")
    for i, line in enumerate(lines):
        writer.write(line)
        if i == 4000:  # mid-way: chunks are stored, the file is not shown, other work goes on
            assert store.get_file(writer.record.id) is None and store.list_files("t") == []
            assert store.get_batch("batch-1") is not None
    writer.flush()
    chunks = store._db.execute("SELECT count(*) FROM file_chunks WHERE file_rowid = ?", (writer.rowid,))
    assert chunks.fetchone()[0] >= 2
    assert store.get_file(writer.record.id) is None
    store.close()

    store = BatchStore(path)  # a crash before the final commit: the hidden file is gone
    assert store._db.execute("SELECT count(*) FROM files").fetchone()[0] == 0
    assert store._db.execute("SELECT count(*) FROM file_chunks").fetchone()[0] == 0
    writer = store.new_file("t", "batch-1_output.jsonl", "batch_output")
    for line in lines:
        writer.write(line)
    writer.flush()
    final = store.get_batch("batch-1")
    assert final is not None
    final.status, final.output_file_id, final.completed = "completed", writer.record.id, len(lines)
    store.finalize(final, [writer])
    shown = store.get_file(writer.record.id)
    assert shown is not None and shown.bytes == sum(map(len, lines)) and shown.purpose == "batch_output"
    assert store.file_content(writer.record.id) == b"".join(lines)
    assert [x + b"\n" for x in store.file_lines(writer.record.id)][:-1] == lines
    got = store.get_batch("batch-1")
    assert got is not None and got.status == "completed" and got.output_file_id == writer.record.id
    stopped = store.new_file("t", "batch-2_output.jsonl", "batch_output")  # a batch stopped mid-write
    stopped.write(b"x" * 10)
    store.discard(stopped)
    stopped.flush()  # a write still running in its thread as the batch stopped: dropped
    assert (
        store._db.execute(
            "SELECT count(*) FROM file_chunks WHERE file_rowid = ?", (stopped.rowid,)
        ).fetchone()[0]
        == 0
    )
    assert store.file_content(writer.record.id) == b"".join(lines)
    store.close()


def test_an_upload_killed_mid_copy_is_gone_when_the_store_opens_again(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    script = f"""
import io, os, signal
from qlm_plugin.coordinator.batch_store import CHUNK_BYTES, BatchStore

class Dies(io.BytesIO):
    reads = 0
    def read(self, n=-1):
        self.reads += 1
        if self.reads == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(n)

store = BatchStore({str(path)!r})
store.put_file_from("t", "kept.jsonl", "batch", io.BytesIO(b"kept"), 4)
store.put_file_from("t", "cut.jsonl", "batch", Dies(b"x" * 4 * CHUNK_BYTES), 4 * CHUNK_BYTES)
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    store = BatchStore(path)
    try:
        assert [f.filename for f in store.list_files("t")] == ["kept.jsonl"]
        assert store.tenant_bytes("t") == 4
    finally:
        store.close()
    with sqlite3.connect(path) as db:  # and its chunks are not kept on disk
        assert db.execute("SELECT sum(length(data)) FROM file_chunks").fetchone()[0] == 4


def test_a_store_of_the_first_schema_opens_with_its_files(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with sqlite3.connect(path) as db:  # schema 1: every file's bytes in its row
        db.execute(
            "CREATE TABLE files (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL,"
            " purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,"
            " content BLOB NOT NULL)"
        )
        db.execute(
            "CREATE TABLE batches (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
            " tenant TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL)"
        )
        db.execute(
            "CREATE TABLE line_answers (batch_id TEXT NOT NULL, line INTEGER NOT NULL,"
            " answer TEXT NOT NULL, PRIMARY KEY (batch_id, line))"
        )
        db.execute("INSERT INTO files VALUES ('file-old', 't', 'old.jsonl', 'batch', 6, 1, X'6f6c640a6f6c')")
        db.execute("PRAGMA user_version=1")
    store = BatchStore(path)
    try:
        assert [f.id for f in store.list_files("t")] == ["file-old"]
        assert list(store.file_lines("file-old")) == [b"old", b"ol"]
        new = store.put_file_from("t", "new.jsonl", "batch", io.BytesIO(b"new\n"), 4)
        assert store.file_content(new.id) == b"new\n"
        assert store.get_file("file-old").expires_at is None  # type: ignore[union-attr]  # kept, as before
        assert store.delete_file("file-old") and store.tenant_bytes("t") == 4
    finally:
        store.close()


# ---------------------------------------------------------------------------------- the routes
def api_run(
    tmp_path: Path, body: Callable[[BatchAPI, TestClient[Any, Any]], Awaitable[None]], **limits: int
) -> None:
    async def main() -> None:
        store = BatchStore(tmp_path / "b.db")
        cfg = CoordinatorConfig(tenant_limits=TenantLimits(**limits))
        service = BatchService(cast(Coordinator, None), store, BatchSettings())
        api = BatchAPI(service, store, Authenticator({}), cfg)
        app = web.Application()
        api.add_routes(app)
        try:
            async with TestClient(TestServer(app)) as client:
                await body(api, client)
        finally:
            store.close()

    asyncio.run(main())


async def given_back(api: BatchAPI) -> None:
    """Every transfer's slot is given back (a handler ends just after its client has the answer)."""
    for _ in range(500):
        if not api.transfers.running:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"transfers still held: {api.transfers.running}")


def form(content: bytes, purpose: str = "batch") -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("purpose", purpose)
    data.add_field("file", content, filename="in.jsonl")
    return data


def test_an_upload_and_download_of_several_chunks_are_identical(tmp_path: Path) -> None:
    content = payload(3 * CHUNK_BYTES + 99, seed=1)

    async def body(api: BatchAPI, client: TestClient[Any, Any]) -> None:
        async with client.post("/v1/files", data=form(content)) as r:
            assert r.status == 200, await r.text()
            file_id = (await r.json())["id"]
            assert (await r.json())["bytes"] == len(content)
        async with client.get(f"/v1/files/{file_id}/content") as r:
            assert r.status == 200 and r.content_length == len(content)
            assert await r.read() == content
        async with client.head(f"/v1/files/{file_id}/content") as r:
            assert r.status == 200 and r.content_length == len(content)
        assert api.store.file_content(file_id) == content
        await given_back(api)

    api_run(tmp_path, body)


def test_a_file_expires_as_asked_or_after_30_days_and_is_then_gone_for_its_owner(tmp_path: Path) -> None:
    """OpenAI's ``expires_after`` (the SDK sends it as form fields): the file's ``expires_at``; by
    default 30 days, as OpenAI's batch files. Once expired, a file is not listed, read, counted
    against its tenant or given to a new batch; the sweep removes it, but not one an unfinished
    batch still reads."""

    def expiring(seconds: Any, anchor: str = "created_at") -> aiohttp.FormData:
        data = form(b"{}\n")
        data.add_field("expires_after[anchor]", anchor)
        data.add_field("expires_after[seconds]", str(seconds))
        return data

    async def body(api: BatchAPI, client: TestClient[Any, Any]) -> None:
        async with client.post("/v1/files", data=expiring(3600)) as r:
            hour = await r.json()
        async with client.post("/v1/files", data=form(b"{}\n")) as r:
            default = await r.json()
        refused = []
        for seconds, anchor in (
            (60, "created_at"),
            (31 * 86400, "created_at"),
            ("soon", "created_at"),
            (3600, "now"),
        ):
            async with client.post("/v1/files", data=expiring(seconds, anchor)) as r:
                refused.append((r.status, (await r.json())["error"]["param"]))
        assert hour["expires_at"] == hour["created_at"] + 3600
        assert default["expires_at"] == default["created_at"] + 30 * 86400
        assert refused == [(400, "expires_after.seconds")] * 3 + [(400, "expires_after.anchor")]

        store = api.store
        gone = store.put_file_from("default", "old.jsonl", "batch", io.BytesIO(b"x\n"), 2, expires_after_s=0)
        read = store.put_file_from("default", "read.jsonl", "batch", io.BytesIO(b"y\n"), 2, expires_after_s=0)
        async with client.get(f"/v1/files/{gone.id}") as r:
            assert r.status == 404
        async with client.get(f"/v1/files/{gone.id}/content") as r:
            assert r.status == 404
        async with client.get("/v1/files") as r:
            assert {f["id"] for f in (await r.json())["data"]} == {hour["id"], default["id"]}
        assert store.tenant_bytes("default") == 6  # the two unexpired files' bytes
        assert store.sweep_expired(keep={read.id}) == [gone.id]
        assert store.get_file(gone.id) is None and list(store.file_lines(read.id)) == [b"y", b""]

    api_run(tmp_path, body)


def test_uploads_over_a_limit_leave_nothing_stored(tmp_path: Path) -> None:
    async def body(api: BatchAPI, client: TestClient[Any, Any]) -> None:
        async with client.post("/v1/files", data=form(b"x" * (CHUNK_BYTES + 11))) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
        async with client.post("/v1/files", data=form(b"y" * CHUNK_BYTES)) as r:
            assert r.status == 200
        async with client.post("/v1/files", data=form(b"z" * CHUNK_BYTES)) as r:
            assert r.status == 429
            assert (
                "stores 1048576 bytes of files; 1048576 more exceed" in (await r.json())["error"]["message"]
            )
        async with client.post("/v1/files", data=form(b"{}\n", purpose="b" * 100_000)) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "purpose"
        assert [f.bytes for f in api.store.list_files(None)] == [CHUNK_BYTES]
        await given_back(api)

    api_run(tmp_path, body, max_file_bytes=CHUNK_BYTES + 10, max_stored_bytes=CHUNK_BYTES + 20)


def test_a_tenants_transfers_at_once_are_bounded(tmp_path: Path) -> None:
    async def body(api: BatchAPI, client: TestClient[Any, Any]) -> None:
        async with client.post("/v1/files", data=form(b"{}\n")) as r:
            file_id = (await r.json())["id"]
        for _ in range(MAX_TRANSFERS_PER_TENANT):  # as many under way as a tenant may have
            assert api.transfers.take("default")
        async with client.get(f"/v1/files/{file_id}/content") as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "too_many_transfers"
        async with client.post("/v1/files", data=form(b"{}\n")) as r:
            assert r.status == 429
        async with client.post("/v1/files", data=form(b"{}\n"), headers={"x-qlm-tenant": "other"}) as r:
            assert r.status == 200  # another tenant's are not held up
        async with client.get(f"/v1/files/{file_id}") as r:
            assert r.status == 200  # nor is what moves no file bytes
        api.transfers.give("default")
        async with client.get(f"/v1/files/{file_id}/content") as r:
            assert r.status == 200 and await r.read() == b"{}\n"

    api_run(tmp_path, body)


def test_a_client_that_leaves_mid_download_frees_its_transfer_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    content = payload(8 * CHUNK_BYTES, seed=2)

    async def body(api: BatchAPI, client: TestClient[Any, Any]) -> None:
        rec = await asyncio.to_thread(
            api.store.put_file_from, "default", "f.jsonl", "batch", io.BytesIO(content), len(content)
        )
        for _ in range(8):  # the handler sees either a cancellation or a ConnectionError: both
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(f"GET /v1/files/{rec.id}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await reader.readexactly(1000)  # the download is under way; the rest is never read
            writer.transport.abort()
        await given_back(api)

    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        api_run(tmp_path, body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_an_upload_that_stalls_is_answered_408_and_frees_its_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_api, "TRANSFER_STALL_S", 0.2)

    async def body(api: BatchAPI, client: TestClient[Any, Any]) -> None:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n{"a": 1}\n'
        head = (
            "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(part) + 1000}\r\n\r\n"
        )
        writer.write(head.encode() + part)  # and nothing more
        answer = await reader.read(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        writer.close()
        assert api.store.list_files(None) == []
        await given_back(api)

    api_run(tmp_path, body)


def test_a_listing_pages_on_past_the_files_deleted_from_it(tmp_path: Path) -> None:
    """A client deleting every file it lists (the SDK's auto-paging, each page after the last id
    of the one before) reaches them all: a cursor naming a deleted file goes on from where it
    stood. The listing stopped there before (an empty page), leaving every later file."""
    store = BatchStore(tmp_path / "b.db")
    ids = {store.put_file("t", f"{i}.jsonl", "batch", b"{}\n").id for i in range(7)}
    for newest_first in (True, False):
        seen: list[str] = []
        after: str | None = None
        while page := store.list_files("t", limit=2, newest_first=newest_first, after=after):
            for rec in page:
                assert store.delete_file(rec.id)
            seen += [rec.id for rec in page]
            after = page[-1].id
        assert sorted(seen) == sorted(ids) and len(seen) == len(ids)
        ids = {store.put_file("t", f"{i}.jsonl", "batch", b"{}\n").id for i in range(7)}
    assert store.list_files("t", after="file-never") == []
    store.close()
    reopened = BatchStore(tmp_path / "b.db")  # a cursor outlives a restart
    (first,) = reopened.list_files("t", limit=1, newest_first=False)
    assert reopened.delete_file(first.id)
    assert len(reopened.list_files("t", newest_first=False, after=first.id)) == 6
