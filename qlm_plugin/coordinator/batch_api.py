"""The Batch API's HTTP routes, as OpenAI defines them: ``/v1/files`` (upload, list, retrieve,
content, delete) and ``/v1/batches`` (create, retrieve, list, cancel).

Files and batches belong to a tenant (the client token's, else ``x-qlm-tenant``, else
``default``) and are visible only to it; a token with the admin scope sees all. Another tenant's
file or batch is answered 404, as one that does not exist.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import BodyPartReader, web

from qlm_plugin.coordinator.auth import Authenticator, AuthError, Principal
from qlm_plugin.coordinator.batch_store import BatchRecord, BatchStore, FileRecord
from qlm_plugin.coordinator.batches import BatchService, metadata_param, visible
from qlm_plugin.coordinator.config import CoordinatorConfig
from qlm_plugin.coordinator.http_api import error_response
from qlm_plugin.coordinator.openai_params import MAX_NAME_CHARS, BadRequest, printable_ascii, text

#: Purposes a file may be uploaded with (outputs are the coordinator's own, ``batch_output``).
UPLOAD_PURPOSES = ("batch",)
#: The body of a create-batch call (the file is uploaded apart).
MAX_JSON_BYTES = 64 * 1024


def _bad(exc: BadRequest) -> web.Response:
    message = f"{exc.param}: {exc}" if exc.param else str(exc)
    return error_response(exc.status, message, param=exc.param, code=exc.code)


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


def _limit(value: str | None, default: int, hi: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= hi:
        raise BadRequest("limit", f"must be an integer from 1 to {hi}, got {value!r}")
    return int(value)


class BatchAPI:
    def __init__(
        self, service: BatchService, store: BatchStore, auth: Authenticator, cfg: CoordinatorConfig
    ) -> None:
        self.service = service
        self.store = store
        self.auth = auth
        self.cfg = cfg

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
        """(tenant, admin) of the caller; raises :class:`AuthError`, or :class:`BadRequest` for a
        tenant header that is not a name."""
        authorization = request.headers.get("Authorization")
        if authorization is not None and not printable_ascii(authorization) and self.auth.enabled:
            raise AuthError("unauthenticated", "the Authorization header must be printable ASCII")
        principal: Principal = self.auth.authenticate(authorization, "client")
        tenant = principal.tenant
        if tenant is None:
            header = request.headers.get("x-qlm-tenant")
            if header is not None and not printable_ascii(header):
                raise BadRequest("x-qlm-tenant", "must be printable ASCII")
            tenant = text(header, "x-qlm-tenant", max_chars=MAX_NAME_CHARS) if header else "default"
        return tenant, "admin" in principal.scopes

    async def _guard(self, request: web.Request) -> tuple[str, bool] | web.Response:
        try:
            return self._who(request)
        except AuthError as exc:
            return error_response(401 if exc.status == "unauthenticated" else 403, str(exc), code=exc.status)
        except BadRequest as exc:
            return _bad(exc)

    # ------------------------------------------------------------------ files
    async def upload(self, request: web.Request) -> web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        tenant, _ = who
        limits = self.cfg.limits_for(tenant)
        if not request.content_type.startswith("multipart/"):
            return error_response(400, "upload a file as multipart/form-data (fields 'purpose' and 'file')")
        purpose: str | None = None
        filename = "upload.jsonl"
        content: bytes | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif isinstance(part, BodyPartReader) and part.name == "file":
                    filename = part.filename or filename
                    chunks, size = [], 0
                    while chunk := await part.read_chunk(1 << 20):
                        size += len(chunk)
                        if size > limits.max_file_bytes:
                            return error_response(
                                413, f"the file exceeds {limits.max_file_bytes} bytes", code="too_large"
                            )
                        chunks.append(chunk)
                    content = b"".join(chunks)
        except (ValueError, web.HTTPException) as exc:
            return error_response(400, f"the multipart body could not be read: {exc}", code="invalid_body")
        if purpose not in UPLOAD_PURPOSES:
            return error_response(
                400, f"purpose: must be 'batch', got {purpose!r}", param="purpose", code="invalid_value"
            )
        if content is None:
            return error_response(400, "file: missing", param="file", code="invalid_value")
        if len(filename) > MAX_NAME_CHARS or not filename.isprintable():
            return error_response(
                400, "file: the file name must be printable, at most 256 characters", param="file"
            )
        used = await asyncio.to_thread(self.store.tenant_bytes, tenant)
        if used + len(content) > limits.max_stored_bytes:
            return error_response(
                429,
                f"tenant {tenant!r} stores {used} bytes of files; {len(content)} more exceed the limit of "
                f"{limits.max_stored_bytes} (delete some)",
                code="limit",
            )
        rec = await asyncio.to_thread(self.store.put_file, tenant, filename, purpose, content)
        return web.json_response(rec.to_openai())

    async def _file(self, request: web.Request) -> FileRecord | web.Response:
        who = await self._guard(request)
        if isinstance(who, web.Response):
            return who
        file_id = request.match_info["file_id"]
        rec = self.store.get_file(file_id)
        if rec is None or not visible(rec, *who):
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

    async def file_content(self, request: web.Request) -> web.Response:
        rec = await self._file(request)
        if isinstance(rec, web.Response):
            return rec
        content = await asyncio.to_thread(self.store.file_content, rec.id)
        if content is None:
            return _not_found("file", rec.id)
        return web.Response(body=content, content_type="application/octet-stream")

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
        raw = await request.read()
        if len(raw) > MAX_JSON_BYTES:
            return error_response(413, f"the body exceeds {MAX_JSON_BYTES} bytes", code="too_large")
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
            batch = await self.service.create(
                tenant, file_id, endpoint, window, metadata_param(body.get("metadata"))
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
