"""The Batch API's HTTP routes, as OpenAI defines them: ``/v1/files`` (upload, list, retrieve,
content, delete) and ``/v1/batches`` (create, retrieve, list, cancel).

Files and batches belong to a tenant (the client token's, else ``x-qlm-tenant``, else
``default``) and are visible only to it; a token with the admin scope sees all. Another tenant's
file or batch is answered 404, as one that does not exist.

File bytes stream both ways, a chunk at a time (a transfer holds a MiB or two, whatever the file's
size): an upload is spooled to a temporary file as it arrives and copied into the store once whole;
a download is read from the store as the client takes it. At most :data:`MAX_TRANSFERS_PER_TENANT`
transfers of a tenant's files run at once (:data:`MAX_TRANSFERS` in all); one more is refused 429
with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable
from typing import IO, Any, TypeVar

from aiohttp import BodyPartReader, web

from qlm_plugin.coordinator.auth import Authenticator, AuthError
from qlm_plugin.coordinator.batch_store import (
    CHUNK_BYTES,
    BatchRecord,
    BatchStore,
    FileContent,
    FileRecord,
    StoredBytesExceeded,
)
from qlm_plugin.coordinator.batches import BatchService, visible
from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.http_api import (
    auth_refusal,
    body_stalled,
    body_unreadable,
    caller,
    error_response,
    read_body,
)
from qlm_plugin.coordinator.openai_params import (
    MAX_NAME_CHARS,
    BadRequest,
    integer,
    metadata_param,
    show,
    text,
)

#: Purposes a file may be uploaded with (outputs are the coordinator's own, ``batch_output``).
UPLOAD_PURPOSES = ("batch",)
#: The body of a create-batch call (the file is uploaded apart).
MAX_JSON_BYTES = 64 * 1024
#: Uploads and downloads of one tenant's files at once; one more is refused 429 (``Retry-After``)
#: rather than queued: each holds a connection, a chunk of memory and a spool file or a blob handle.
MAX_TRANSFERS_PER_TENANT = 4
#: ... and of all tenants together (with authentication off, ``x-qlm-tenant`` names any tenant).
MAX_TRANSFERS = 32
#: Seconds a refused transfer is told to wait (OpenAI's SDKs retry a 429 after ``Retry-After``).
TRANSFER_RETRY_AFTER_S = 1
#: An upload that sends nothing, or a download its client does not take, for this long is ended:
#: it would hold its transfer slot for ever.
TRANSFER_STALL_S = 60.0
#: Bytes of the ``purpose`` field read (its only valid value is ``batch``).
MAX_PURPOSE_BYTES = 1024
#: The life a file's ``expires_after`` may give it, seconds (OpenAI's bounds: an hour to 30 days).
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400

log = logging.getLogger("qlm_plugin.coordinator.batch_api")
T = TypeVar("T")


#: The form fields of a file's ``expires_after``, as the SDKs send a nested field in a form.
EXPIRY_FIELDS = {"expires_after[anchor]": "anchor", "expires_after[seconds]": "seconds"}


def expires_after(policy: Any, param: str, *, form: bool = False) -> int:
    """The life in seconds an ``expires_after`` policy (``{"anchor": "created_at", "seconds": N}``)
    gives a file; ``form``: its fields as a form's text."""
    if not isinstance(policy, dict):
        raise BadRequest(param, f"must be an object with anchor and seconds, got {show(policy)}")
    if policy.get("anchor") != "created_at":
        raise BadRequest(f"{param}.anchor", f"must be 'created_at', got {show(policy.get('anchor'))}")
    return integer(policy.get("seconds"), f"{param}.seconds", MIN_EXPIRY_S, MAX_EXPIRY_S, strings=form)


def _bad(exc: BadRequest) -> web.Response:
    message = f"{exc.param}: {exc}" if exc.param else str(exc)
    # a limit that holds until a batch ends: the SDKs' automatic retries would only repeat it
    headers = {"x-should-retry": "false"} if exc.status == 429 else None
    return error_response(exc.status, message, param=exc.param, code=exc.code, headers=headers)


def _not_found(kind: str, ident: str) -> web.Response:
    return error_response(404, f"no {kind} {ident!r}", code="not_found")


def _page(items: list[tuple[str, dict[str, Any]]], limit: int) -> web.Response:
    """OpenAI's list object: the first ``limit`` of ``items`` ((id, object) pairs, one more than a
    page when there are more)."""
    page = items[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": [obj for _, obj in page],
            "first_id": page[0][0] if page else None,
            "last_id": page[-1][0] if page else None,
            "has_more": len(items) > limit,
        }
    )


async def _stalling(step: Awaitable[T]) -> T:
    """``step``, or :class:`TimeoutError` once it has waited :data:`TRANSFER_STALL_S`."""
    return await asyncio.wait_for(step, TRANSFER_STALL_S)


async def _read_small(part: BodyPartReader, limit: int) -> str:
    """A form field's text, at most ``limit`` bytes of it (the rest is skipped, not held)."""
    data = bytearray()
    while (chunk := await _stalling(part.read_chunk(limit))) and len(data) <= limit:
        data += chunk
    return data[:limit].decode("utf-8", errors="replace")


def _rewind(spool: IO[bytes]) -> None:
    spool.seek(0)
    spool.truncate()


def _limit(value: str | None, default: int, hi: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= hi:
        raise BadRequest("limit", f"must be an integer from 1 to {hi}, got {value!r}")
    return int(value)


class Transfers:
    """File transfers under way, per tenant and in all (the event loop's: not thread-safe)."""

    def __init__(self, per_tenant: int = MAX_TRANSFERS_PER_TENANT, total: int = MAX_TRANSFERS) -> None:
        self.per_tenant, self.total = per_tenant, total
        self.running: Counter[str] = Counter()

    def take(self, tenant: str) -> bool:
        if self.running[tenant] >= self.per_tenant or self.running.total() >= self.total:
            return False
        self.running[tenant] += 1
        return True

    def give(self, tenant: str) -> None:
        self.running[tenant] -= 1
        if not self.running[tenant]:
            del self.running[tenant]

    def refusal(self, tenant: str) -> web.Response:
        if self.running[tenant] >= self.per_tenant:
            message = f"tenant {tenant!r} has {self.per_tenant} file transfers under way, the most at once"
        else:
            message = f"{self.total} file transfers are under way, the most at once"
        return error_response(
            429,
            f"{message}: retry in a moment",
            code="too_many_transfers",
            headers={"Retry-After": str(TRANSFER_RETRY_AFTER_S)},
        )


class BatchAPI:
    def __init__(
        self, service: BatchService, store: BatchStore, auth: Authenticator, cfg: CoordinatorConfig
    ) -> None:
        self.service = service
        self.store = store
        self.auth = auth
        self.cfg = cfg
        self.transfers = Transfers()

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/files", self.upload)
        r.add_get("/v1/files", self.list_files)
        r.add_get("/v1/files/{file_id}", self.get_file)
        r.add_get("/v1/files/{file_id}/content", self.file_content)
        r.add_delete("/v1/files/{file_id}", self.delete_file)
        r.add_post("/v1/batches", self.create_batch)
        r.add_get("/v1/batches", self.list_batches)
        r.add_get("/v1/batches/{batch_id}", self.get_batch)
        r.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)

    def _who(self, request: web.Request) -> tuple[str, bool]:
        return caller(self.auth, request)

    async def _guard(self, request: web.Request) -> tuple[str, bool] | web.Response:
        try:
            return self._who(request)
        except AuthError as exc:
            return auth_refusal(exc)
        except BadRequest as exc:
            return _bad(exc)

    # ------------------------------------------------------------------ files
    async def upload(self, request: web.Request) -> web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        tenant, _ = who
        if not request.content_type.startswith("multipart/"):
            return error_response(400, "upload a file as multipart/form-data (fields 'purpose' and 'file')")
        if not self.transfers.take(tenant):
            return self.transfers.refusal(tenant)
        spool: IO[bytes] | None = None
        try:
            spool = await asyncio.to_thread(self.store.spool)
            return await self._upload(request, tenant, spool)
        finally:
            self.transfers.give(tenant)
            if spool is not None:
                await asyncio.to_thread(spool.close)  # frees its disk space: a big file's takes a while

    async def _upload(self, request: web.Request, tenant: str, spool: IO[bytes]) -> web.Response:
        limits = self.cfg.limits_for(tenant)
        purpose: str | None = None
        filename = "upload.jsonl"
        size: int | None = None
        expiry: dict[str, str] = {}  # expires_after[anchor] and [seconds], as the SDKs send a form
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and part.name == "purpose":
                    purpose = (await _read_small(part, MAX_PURPOSE_BYTES)).strip()
                elif isinstance(part, BodyPartReader) and part.name in EXPIRY_FIELDS:
                    expiry[EXPIRY_FIELDS[part.name]] = (await _read_small(part, MAX_PURPOSE_BYTES)).strip()
                elif isinstance(part, BodyPartReader) and part.name == "file":
                    filename = part.filename or filename
                    # written as it arrives, a MiB at a time off the event loop; a second file part
                    # replaces the first, as when the whole body was read
                    await asyncio.to_thread(_rewind, spool)
                    size, buffer = 0, bytearray()
                    while chunk := await _stalling(part.read_chunk(CHUNK_BYTES)):
                        size += len(chunk)
                        if size > limits.max_file_bytes:
                            return error_response(
                                413, f"the file exceeds {limits.max_file_bytes} bytes", code="too_large"
                            )
                        buffer += chunk
                        if len(buffer) >= CHUNK_BYTES:
                            await asyncio.to_thread(spool.write, bytes(buffer))
                            buffer.clear()
                    await asyncio.to_thread(spool.write, bytes(buffer))
        except TimeoutError:
            return error_response(408, f"the upload sent nothing for {TRANSFER_STALL_S:g} s", code="timeout")
        except web.RequestPayloadError as exc:  # a content-encoding that does not decode: it was a 500
            request.content.feed_eof()
            return body_unreadable(exc)
        except (ValueError, web.HTTPException) as exc:
            return error_response(400, f"the multipart body could not be read: {exc}", code="invalid_body")
        if purpose not in UPLOAD_PURPOSES:
            return error_response(
                400, f"purpose: must be 'batch', got {purpose!r}", param="purpose", code="invalid_value"
            )
        if size is None:
            return error_response(400, "file: missing", param="file", code="invalid_value")
        if size == 0:  # no batch reads one, and they counted nothing against the tenant's store
            return error_response(400, "file: is empty", param="file", code="invalid_value")
        try:
            expires_after_s = (
                expires_after(expiry, "expires_after", form=True)
                if expiry
                else self.service.settings.file_expiry_s
            )
        except BadRequest as exc:
            return _bad(exc)
        if len(filename) > MAX_NAME_CHARS or not filename.isprintable():
            return error_response(
                400, "file: the file name must be printable, at most 256 characters", param="file"
            )
        try:
            rec = await asyncio.to_thread(
                self.store.put_file_from,
                tenant,
                filename,
                purpose,
                spool,
                size,
                max_stored_bytes=limits.max_stored_bytes,
                expires_after_s=expires_after_s,
            )
        except StoredBytesExceeded as exc:
            return error_response(
                429,
                f"tenant {tenant!r} stores {exc.used} bytes of files; {size} more exceed the limit of "
                f"{limits.max_stored_bytes} (delete some)",
                code="limit",
                headers={"x-should-retry": "false"},  # the SDKs retried: 3 uploads of the whole file
            )
        return web.json_response(rec.to_openai())

    async def _file(self, request: web.Request) -> FileRecord | web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        file_id = request.match_info["file_id"]
        rec = self.store.get_file(file_id)
        if rec is None or not visible(rec, *who) or rec.expired(time.time()):
            return _not_found("file", file_id)
        return rec

    async def list_files(self, request: web.Request) -> web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        tenant, admin = who
        q = request.query
        try:
            limit = _limit(q.get("limit"), 10_000, 10_000)
            order = q.get("order", "desc")
            if order not in ("asc", "desc"):
                raise BadRequest("order", f"must be 'asc' or 'desc', got {order!r}")
        except BadRequest as exc:
            return _bad(exc)
        files = await asyncio.to_thread(
            self.store.list_files,
            None if admin else tenant,
            purpose=q.get("purpose"),
            limit=limit + 1,
            newest_first=order == "desc",
            after=q.get("after"),
        )
        return _page([(f.id, f.to_openai()) for f in files], limit)

    async def get_file(self, request: web.Request) -> web.Response:
        rec = await self._file(request)
        return rec if isinstance(rec, web.Response) else web.json_response(rec.to_openai())

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        rec = await self._file(request)
        if isinstance(rec, web.Response):
            return rec
        if not self.transfers.take(rec.tenant):  # the owner's: an admin's download counts for it
            return self.transfers.refusal(rec.tenant)
        try:
            reader = await asyncio.to_thread(self.store.open_content, rec.id)
            if reader is None:
                return _not_found("file", rec.id)
            try:
                return await self._send(request, reader)
            finally:
                await asyncio.to_thread(reader.close)
        finally:
            self.transfers.give(rec.tenant)

    async def _send(self, request: web.Request, reader: FileContent) -> web.StreamResponse:
        """The file's bytes, a chunk at a time as the client takes them (``write`` waits for the
        transport's buffer to drain)."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = reader.size
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        try:
            while chunk := await asyncio.to_thread(reader.read, CHUNK_BYTES):
                await _stalling(resp.write(chunk))
        except ConnectionError:
            return resp  # the client left: aiohttp ends the request quietly
        except (TimeoutError, sqlite3.Error) as exc:
            # a client that stopped reading, or the file deleted (or the store closed) mid-way: the
            # connection is cut, so the client sees the body end short of its length (aiohttp's
            # write_eof then finds the transport closing and ends the request quietly)
            log.info("download of %s cut: %s", request.path, str(exc) or "the client stopped reading")
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    async def delete_file(self, request: web.Request) -> web.Response:
        rec = await self._file(request)
        if isinstance(rec, web.Response):
            return rec
        if self.service.input_in_use(rec.id):
            return error_response(
                409, f"file {rec.id!r} is the input of an unfinished batch", code="conflict"
            )
        deleted = await asyncio.to_thread(self.store.delete_file, rec.id)
        return web.json_response({"id": rec.id, "object": "file", "deleted": deleted})

    # ------------------------------------------------------------------ batches
    def _batch_json(self, batch: BatchRecord) -> dict[str, Any]:
        body = batch.to_openai()
        estimate = self.service.estimate(batch.id)
        if estimate is not None:
            body["qlm"] = estimate
        return body

    async def create_batch(self, request: web.Request) -> web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        tenant, _ = who
        try:
            raw = await read_body(request, MAX_JSON_BYTES, TRANSFER_STALL_S)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the body exceeds {MAX_JSON_BYTES} bytes", code="too_large")
        except web.RequestPayloadError as exc:  # a content-encoding that does not decode: it was a 500
            return body_unreadable(exc)
        except TimeoutError:
            return body_stalled(TRANSFER_STALL_S)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            return error_response(400, f"the body is not valid JSON: {exc}", code="invalid_json")
        try:
            if not isinstance(body, dict):
                raise BadRequest(None, "the body must be a JSON object")
            known = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
            unknown = sorted(set(body) - known)
            if unknown:
                raise BadRequest(unknown[0], "unknown field")
            file_id = text(body.get("input_file_id"), "input_file_id", max_chars=MAX_NAME_CHARS)
            endpoint = text(body.get("endpoint"), "endpoint", max_chars=MAX_NAME_CHARS)
            window = body.get("completion_window")
            output_expiry = body.get("output_expires_after")
            batch = await self.service.create(
                tenant,
                file_id,
                endpoint,
                window,
                metadata_param(body.get("metadata")),
                None if output_expiry is None else expires_after(output_expiry, "output_expires_after"),
            )
        except BadRequest as exc:
            return _bad(exc)
        return web.json_response(self._batch_json(batch))

    async def _batch(self, request: web.Request) -> BatchRecord | web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        batch_id = request.match_info["batch_id"]
        batch = self.service.get(batch_id)
        if batch is None or not visible(batch, *who):
            return _not_found("batch", batch_id)
        return batch

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = await self._batch(request)
        return batch if isinstance(batch, web.Response) else web.json_response(self._batch_json(batch))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = await self._batch(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status in ("failed", "completed", "expired"):
            return error_response(
                409, f"batch {batch.id} is {batch.status}: it cannot be cancelled", code="conflict"
            )
        cancelled = self.service.cancel(batch.id) or batch
        return web.json_response(self._batch_json(cancelled))

    async def list_batches(self, request: web.Request) -> web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        tenant, admin = who
        try:
            limit = _limit(request.query.get("limit"), 20, 100)
        except BadRequest as exc:
            return _bad(exc)
        batches = self.service.list_batches(
            None if admin else tenant, limit=limit + 1, after=request.query.get("after")
        )
        return _page([(b.id, self._batch_json(b)) for b in batches[: limit + 1]], limit)
