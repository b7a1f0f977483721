"""Batch API files stream through the store a chunk at a time: what goes in comes out byte for
byte across chunk boundaries, a refused or broken upload leaves nothing stored, and a tenant's
transfers at once are bounded. The routes run on a bare aiohttp app over a real store (no
coordinator: file routes need none)."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import sqlite3
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
    """Both ways of moving a file's bytes: chunks through a blob handle (Python 3.11), whole (3.10)."""
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


def test_a_refused_or_broken_upload_leaves_nothing_stored(tmp_path: Path, blob_io: bool) -> None:
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


def test_an_upload_and_download_of_several_chunks_are_identical(tmp_path: Path, blob_io: bool) -> None:
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
