"""Durable files and batches of the Batch API: one SQLite file beside the journal (WAL).

What lives here: uploaded files (their bytes too), each batch's record (its OpenAI object and its
status), and the answer of every line that never became a request (refused at submission, expired
or cancelled before it was sent). The answers of lines that did become requests live in the
journal, found by their idempotency key, so a line is answered from one place only.

Every method is synchronous and takes a lock: safe from any thread. The front door calls the ones
that move file bytes through ``asyncio.to_thread``; the small updates are a few milliseconds and run
on the event loop. A commit is durable against a crash of the process (``synchronous=NORMAL`` in
WAL mode), or against power loss too (``full``), as the journal's setting says.

File bytes move in chunks of :data:`CHUNK_BYTES`, never whole: an upload is spooled to a temporary
file (:meth:`BatchStore.spool`) and copied in by :meth:`BatchStore.put_file_from`, one chunk row
per transaction (the lock is free between chunks: a large upload does not hold up the small updates
on the event loop), the file hidden until its last chunk is in; a batch's output is written the
same way as it is built (:meth:`BatchStore.new_file`) and shown with the batch's final state
(:meth:`BatchStore.finalize`); a file is read a chunk at a time through
:meth:`BatchStore.open_content`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from qlm_plugin.coordinator.file_lock import FileInUse, FolderNotWritable, lock_file, unlock_file

SCHEMA_VERSION: Final = 4
#: Statuses after which a batch changes no more.
FINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
#: File bytes read or written at a time: a transfer holds about one chunk in memory, and the lock
#: one chunk's read at a time (about a millisecond).
CHUNK_BYTES: Final = 1 << 20
#: Incremental blob I/O (Python 3.11's ``Connection.blobopen``), for the files written whole (a
#: batch's output). Without it (3.10) such a file is held whole while it is read; uploads are chunk
#: rows either way.
BLOB_IO: Final = hasattr(sqlite3.Connection, "blobopen")

#: An uploaded file's bytes, a chunk per row (a file written whole, such as a batch's output, keeps
#: its bytes in ``files.content``): a chunk at a time, an upload never rewrites what it stored.
_CHUNKS: Final = """CREATE TABLE file_chunks (
        file_rowid INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (file_rowid, seq)
    )"""

#: Where a deleted file stood in the listing's order, so that a page cursor naming it goes on from
#: there (a client deleting every file it lists pages on from the last one it deleted). Kept for
#: :data:`CURSOR_KEEP_S`.
_CURSORS: Final = """CREATE TABLE file_cursors (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        at_rowid INTEGER NOT NULL,
        deleted_at INTEGER NOT NULL
    )"""
#: How long a deleted file's id stays a valid page cursor.
CURSOR_KEEP_S: Final = 86_400

_SCHEMA: Final = (
    """CREATE TABLE files (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        content BLOB NOT NULL,
        complete INTEGER NOT NULL DEFAULT 1,
        expires_at INTEGER
    )""",
    "CREATE INDEX files_tenant ON files (tenant, created_at)",
    _CHUNKS,
    """CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX batches_tenant ON batches (tenant, seq)",
    """CREATE TABLE line_answers (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        answer TEXT NOT NULL,
        PRIMARY KEY (batch_id, line)
    )""",
    _CURSORS,
)


class StoreError(Exception):
    """Not a batch store, or a newer schema."""


class StoredBytesExceeded(Exception):
    """A file would take its tenant past its ``max_stored_bytes``; ``used``: what it stores now."""

    def __init__(self, used: int) -> None:
        super().__init__(f"the tenant stores {used} bytes")
        self.used = used


@dataclass(slots=True)
class FileRecord:
    """A stored file, without its bytes: OpenAI's ``file`` object and its owner."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None = None  # unix seconds; None: kept until deleted

    def expired(self, now: float) -> bool:
        """Gone for its owner (its bytes are removed by :meth:`BatchStore.sweep_expired`)."""
        return self.expires_at is not None and self.expires_at <= now

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass(slots=True)
class BatchRecord:
    """A batch as OpenAI's ``batch`` object holds it, with its owner and its deadline (unix seconds,
    not rounded: the end-to-end deadline of every one of its requests)."""

    id: str
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    window_s: float
    created_at: float
    status: str = "validating"
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    # why the batch is finalizing (the status it ends in): completed, expired or cancelled
    ending: str = field(default="completed")
    output_expires_after_s: int | None = None  # its output and error files' life (None: kept)

    @property
    def deadline(self) -> float:
        return self.created_at + self.window_s

    def to_openai(self) -> dict[str, Any]:
        def ts(t: float | None) -> int | None:
            return None if t is None else int(t)

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": ts(self.in_progress_at),
            "expires_at": int(self.deadline),
            "finalizing_at": ts(self.finalizing_at),
            "completed_at": ts(self.completed_at),
            "failed_at": ts(self.failed_at),
            "expired_at": ts(self.expired_at),
            "cancelling_at": ts(self.cancelling_at),
            "cancelled_at": ts(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
            "metadata": self.metadata,
        }


_FILE_COLUMNS: Final = "id, tenant, filename, purpose, bytes, created_at, expires_at"
_UNEXPIRED: Final = "(expires_at IS NULL OR expires_at > ?)"


def _record(tenant: str, filename: str, purpose: str, size: int, expires_after_s: int | None) -> FileRecord:
    now = int(time.time())
    expires_at = None if expires_after_s is None else now + expires_after_s
    return FileRecord(new_id("file-"), tenant, filename, purpose, size, now, expires_at)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class BatchStore:
    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        """``synchronous``: SQLite's, ``normal`` (a commit survives a crash of the process) or
        ``full`` (power loss too), as the journal's (it holds the batches' requests)."""
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        self.path = str(path)
        self._synchronous = synchronous.upper()
        self._lock = threading.Lock()
        try:
            memory = self.path == ":memory:"
            self._file_lock = None if memory else lock_file(Path(self.path), "the batch store")
        except (FileInUse, FolderNotWritable) as exc:
            raise StoreError(str(exc)) from None
        db: sqlite3.Connection | None = None
        try:
            db = self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._prepare()
        except BaseException as exc:
            if db is not None:
                db.close()
            unlock_file(self._file_lock)
            if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
                raise StoreError(
                    f"cannot write to the batch store {self.path}: {exc} (check that the file, its -wal "
                    "and -shm files and their folder are writable by this user)"
                ) from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(f"{self.path}: not a batch store: {exc}") from None
            raise

    @staticmethod
    def beside(journal_path: str) -> str:
        """The store's path for a journal's (``qlm-journal.db`` -> ``qlm-journal.batches.db``)."""
        if journal_path == ":memory:":
            return ":memory:"
        p = Path(journal_path)
        return str(p.with_name(f"{p.stem}.batches{p.suffix or '.db'}"))

    def _prepare(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreError(f"{self.path}: holds other tables: not a batch store")
            with self._transaction():
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema {version} is newer than this version's {SCHEMA_VERSION}")
        else:
            with self._transaction():
                if version == 1:  # files stored whole, in one transaction: every one is complete
                    db.execute("ALTER TABLE files ADD COLUMN complete INTEGER NOT NULL DEFAULT 1")
                    db.execute(_CHUNKS)
                if version <= 2:  # the files stored before expiry: kept until deleted, as they were
                    db.execute("ALTER TABLE files ADD COLUMN expires_at INTEGER")
                if version <= 3:
                    db.execute(_CURSORS)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        with self._transaction():  # uploads a crash cut short
            db.execute("DELETE FROM files WHERE complete = 0")
            db.execute("DELETE FROM file_chunks WHERE file_rowid NOT IN (SELECT rowid FROM files)")

    def _transaction(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind: Any, *_: Any) -> None:
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            unlock_file(self._file_lock)
            self._file_lock = None

    # ------------------------------------------------------------------ files
    def put_file(
        self, tenant: str, filename: str, purpose: str, content: bytes, *, expires_after_s: int | None = None
    ) -> FileRecord:
        """A small file in one transaction, its bytes in the file's row (as versions before stop 38
        wrote batch outputs, which stores keep): large ones go through :meth:`put_file_from` or
        :meth:`new_file`. ``expires_after_s``: its life from its creation (None: until deleted)."""
        rec = _record(tenant, filename, purpose, len(content), expires_after_s)
        with self._lock, self._transaction():
            self._insert_file(rec, content)
        return rec

    def spool(self) -> IO[bytes]:
        """A temporary file for an upload on its way in, beside the store (on its disk, not in a
        tmpfs that is memory); unnamed on Linux, so a crash leaves nothing behind."""
        folder = None if self.path == ":memory:" else str(Path(self.path).resolve().parent)
        return tempfile.TemporaryFile(dir=folder)

    def put_file_from(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        source: IO[bytes],
        size: int,
        *,
        max_stored_bytes: int | None = None,
        expires_after_s: int | None = None,
    ) -> FileRecord:
        """Store the ``size`` bytes of ``source`` (from its start) as a new file, a chunk row per
        transaction; the file is listed and read only once its last chunk is in. Raises
        :class:`StoredBytesExceeded` when the tenant would store more than ``max_stored_bytes``:
        checked in the transaction that adds the (hidden) file, whose bytes count from then on, so
        uploads at once cannot pass it together. On any error nothing is stored (a crash mid-copy:
        the next open removes what was copied)."""
        rec = _record(tenant, filename, purpose, size, expires_after_s)
        source.seek(0)
        # The row first, hidden (incomplete) but counted against the tenant's bytes, then its bytes
        # a chunk per transaction: between chunks the lock is free for other work.
        with self._lock, self._transaction():
            self._check_room(tenant, size, max_stored_bytes)
            rowid = self._insert_hidden(rec)
        try:
            done = seq = 0
            while done < size:
                chunk = source.read(min(CHUNK_BYTES, size - done))  # outside the lock
                if not chunk:
                    raise ValueError(f"the upload's spool holds {done} bytes, not {size}")
                self._append_chunk(rowid, seq, chunk)
                done += len(chunk)
                seq += 1
            with self._lock:
                self._db.execute("UPDATE files SET complete = 1 WHERE rowid = ?", (rowid,))
        except BaseException:
            with self._lock, self._transaction():
                self._delete(rowid)
            raise
        return rec

    def _check_room(self, tenant: str, size: int, max_stored_bytes: int | None) -> None:
        if max_stored_bytes is not None:
            used = self._tenant_bytes(tenant)
            if used + size > max_stored_bytes:
                raise StoredBytesExceeded(used)

    def _insert_hidden(self, rec: FileRecord) -> int:
        """A file's row without its bytes (its chunk rows follow), hidden until marked complete."""
        rowid = self._db.execute(
            "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at, content, complete,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, X'', 0, ?)",
            (rec.id, rec.tenant, rec.filename, rec.purpose, rec.bytes, rec.created_at, rec.expires_at),
        ).lastrowid
        assert rowid is not None
        return rowid

    def _insert_file(self, rec: FileRecord, content: bytes) -> None:
        self._db.execute(
            "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at, content, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.id,
                rec.tenant,
                rec.filename,
                rec.purpose,
                rec.bytes,
                rec.created_at,
                content,
                rec.expires_at,
            ),
        )

    def get_file(self, file_id: str) -> FileRecord | None:
        """The file, expired too until it is swept (its owner is told it is gone; a batch that
        reads it still may)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ? AND complete",
                (file_id,),
            ).fetchone()
        return None if row is None else FileRecord(*row)

    def file_content(self, file_id: str) -> bytes | None:
        """The whole file: for small ones; :meth:`open_content` reads one a chunk at a time."""
        reader = self.open_content(file_id)
        if reader is None:
            return None
        with reader:
            return reader.read(reader.size)

    def open_content(self, file_id: str) -> FileContent | None:
        """A reader of the file's bytes (None: no such file); close it when done."""
        with self._lock:
            row = self._db.execute(
                "SELECT rowid, bytes, length(content) FROM files WHERE id = ? AND complete", (file_id,)
            ).fetchone()
            if row is None:
                return None
            rowid, size, whole = row
            if whole or not size:  # written whole
                if not BLOB_IO:
                    content = self._db.execute(
                        "SELECT content FROM files WHERE rowid = ?", (rowid,)
                    ).fetchone()
                    return FileContent(self, io.BytesIO(content[0]), size)
                return FileContent(self, self._db.blobopen("files", "content", rowid, readonly=True), size)
            return FileContent(self, _Chunks(self._db, rowid, file_id), size)

    def file_lines(self, file_id: str) -> Iterator[bytes]:
        """The file's lines, split at ``\\n`` (which it leaves off), read a chunk at a time; a line
        is held whole. Raises :class:`KeyError` when there is no such file."""
        reader = self.open_content(file_id)
        if reader is None:
            raise KeyError(file_id)
        with reader:
            pending: list[bytes] = []  # a line's start, from earlier chunks
            while chunk := reader.read(CHUNK_BYTES):
                rows = chunk.split(b"\n")
                if len(rows) == 1:
                    pending.append(chunk)
                    continue
                yield b"".join([*pending, rows[0]])
                yield from rows[1:-1]
                pending = [rows[-1]]
            yield b"".join(pending)

    def list_files(
        self,
        tenant: str | None,
        *,
        purpose: str | None = None,
        limit: int = 10_000,
        newest_first: bool = True,
        after: str | None = None,
    ) -> list[FileRecord]:
        """In creation order (``newest_first``: reversed); ``after``: the id of the last file of
        the previous page, the page going on from where it stood if it was deleted since (an id
        never listed: an empty page). Expired files are left out."""
        where: list[str] = ["complete", _UNEXPIRED]
        args: list[Any] = [int(time.time())]
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        direction = "DESC" if newest_first else "ASC"
        if after is not None:
            # the cursor in SQL, on the listing's own order: every file is reachable by pages
            where.append(
                f"(created_at, rowid) {'<' if newest_first else '>'} "
                "(SELECT created_at, rowid FROM files WHERE id = ?"
                " UNION ALL SELECT created_at, at_rowid FROM file_cursors WHERE id = ? LIMIT 1)"
            )
            args += [after, after]
        sql = f"SELECT {_FILE_COLUMNS} FROM files"
        sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at {direction}, rowid {direction} LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [FileRecord(*r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._lock, self._transaction():
            row = self._db.execute("SELECT rowid FROM files WHERE id = ? AND complete", (file_id,)).fetchone()
            if row is None:
                return False
            self._delete(row[0])
            return True

    def _delete(self, rowid: int) -> None:
        now = int(time.time())
        self._db.execute("DELETE FROM file_cursors WHERE deleted_at < ?", (now - CURSOR_KEEP_S,))
        self._db.execute(
            "INSERT OR REPLACE INTO file_cursors"
            " SELECT id, created_at, rowid, ? FROM files WHERE rowid = ? AND complete",
            (now, rowid),
        )
        self._db.execute("DELETE FROM file_chunks WHERE file_rowid = ?", (rowid,))
        self._db.execute("DELETE FROM files WHERE rowid = ?", (rowid,))

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._tenant_bytes(tenant)

    def _tenant_bytes(self, tenant: str) -> int:
        """What the tenant stores: its expired files no longer count, swept or not."""
        row = self._db.execute(
            f"SELECT coalesce(sum(bytes), 0) FROM files WHERE tenant = ? AND {_UNEXPIRED}",
            (tenant, int(time.time())),
        )
        return int(row.fetchone()[0])

    def sweep_expired(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove the files expired by now, but those in ``keep`` (the inputs of unfinished
        batches, read again after a restart), a file per transaction; their ids."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (int(time.time()),),
            ).fetchall()
        swept = []
        for rowid, file_id in rows:
            if file_id not in keep:
                with self._lock, self._transaction():
                    self._delete(rowid)
                swept.append(file_id)
        return swept

    # ------------------------------------------------------------------ batches
    def put_batch(self, batch: BatchRecord) -> None:
        """Insert a new batch, or write a known one's current state."""
        with self._lock, self._transaction():
            self._write_batch(batch)

    def _write_batch(self, batch: BatchRecord) -> None:
        self._db.execute(
            "INSERT INTO batches (id, tenant, status, record) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET status = excluded.status, record = excluded.record",
            (batch.id, batch.tenant, batch.status, json.dumps(asdict(batch))),
        )

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else BatchRecord(**json.loads(row[0]))

    def list_batches(
        self, tenant: str | None, *, limit: int = 20, after: str | None = None
    ) -> list[BatchRecord]:
        """Newest first; ``after``: the id of the last batch of the previous page."""
        where, args = [], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if after is not None:
            where.append("seq < coalesce((SELECT seq FROM batches WHERE id = ?), -1)")
            args.append(after)
        sql = "SELECT record FROM batches"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [BatchRecord(**json.loads(r[0])) for r in rows]

    def unfinished_batches(self) -> list[BatchRecord]:
        finals = ", ".join(f"'{s}'" for s in sorted(FINAL))
        with self._lock:
            rows = self._db.execute(
                f"SELECT record FROM batches WHERE status NOT IN ({finals}) ORDER BY seq"
            ).fetchall()
        return [BatchRecord(**json.loads(r[0])) for r in rows]

    # ------------------------------------------------------------------ answers of lines never sent
    def answer_line(self, batch_id: str, line: int, answer: dict[str, Any]) -> None:
        """A line's answer when it never became a request; the first answer stands."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO line_answers (batch_id, line, answer) VALUES (?, ?, ?)",
                (batch_id, line, json.dumps(answer)),
            )

    def line_answers(self, batch_id: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT line, answer FROM line_answers WHERE batch_id = ?", (batch_id,)
            ).fetchall()
        return {int(line): json.loads(answer) for line, answer in rows}

    def new_file(
        self, tenant: str, filename: str, purpose: str, *, expires_after_s: int | None = None
    ) -> FileWriter:
        """A file to be written a chunk at a time (a batch's output), hidden until
        :meth:`finalize` shows it with the batch's final state."""
        rec = _record(tenant, filename, purpose, 0, expires_after_s)
        with self._lock:
            rowid = self._insert_hidden(rec)
        return FileWriter(self, rec, rowid)

    def finalize(self, batch: BatchRecord, files: Sequence[FileWriter]) -> None:
        """Show the batch's output files (written in full) and write its final state, in one
        transaction: after a crash either both are there or neither (the next open removes the
        hidden files, and finalizing runs again)."""
        with self._lock, self._transaction():
            for writer in files:
                self._db.execute(
                    "UPDATE files SET complete = 1, bytes = ? WHERE rowid = ?",
                    (writer.record.bytes, writer.rowid),
                )
            self._write_batch(batch)

    def _append_chunk(self, rowid: int, seq: int, data: bytes, writer: FileWriter | None = None) -> None:
        with self._lock:
            if writer is not None and writer.discarded:  # a write still running as its batch stopped
                return
            self._db.execute(
                "INSERT INTO file_chunks (file_rowid, seq, data) VALUES (?, ?, ?)", (rowid, seq, data)
            )

    def discard(self, writer: FileWriter) -> None:
        """Delete a file being written; a chunk its writer stores later is dropped (its rowid may
        belong to another file by then)."""
        with self._lock, self._transaction():
            writer.discarded = True
            self._delete(writer.rowid)


class FileWriter:
    """A hidden file written a chunk row at a time, each chunk its own transaction (the store's
    lock is free between them); from :meth:`BatchStore.new_file`. One thread at a time."""

    def __init__(self, store: BatchStore, record: FileRecord, rowid: int) -> None:
        self.record = record  # its ``bytes``: what was written so far
        self.rowid = rowid
        self.discarded = False
        self._store = store
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._seq = 0

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.record.bytes += len(data)
        if self._pending_bytes >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        """Store what is written and not stored yet (call once the last write is done)."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._store._append_chunk(self.rowid, self._seq, data, self)
        self._seq += 1


class _Chunks:
    """An uploaded file's chunk rows read in order, as a file is (``read(n)``). Called with the
    store's lock held."""

    def __init__(self, db: sqlite3.Connection, rowid: int, file_id: str) -> None:
        self._db = db
        self._rowid = rowid
        self._file_id = file_id  # a deleted file's rowid may be taken again
        self._seq = 0
        self._buffer = b""
        self._offset = 0

    def read(self, n: int) -> bytes:
        if not self._db.execute(
            "SELECT 1 FROM files WHERE rowid = ? AND id = ?", (self._rowid, self._file_id)
        ).fetchone():
            raise sqlite3.OperationalError("the file was deleted while it was read")
        parts: list[bytes] = []
        while n > 0:
            if self._offset == len(self._buffer):
                row = self._db.execute(
                    "SELECT data FROM file_chunks WHERE file_rowid = ? AND seq = ?", (self._rowid, self._seq)
                ).fetchone()
                if row is None:
                    break  # its end
                self._buffer, self._offset = bytes(row[0]), 0
                self._seq += 1
            part = self._buffer[self._offset : self._offset + n]
            self._offset += len(part)
            n -= len(part)
            parts.append(part)
        return b"".join(parts)

    def close(self) -> None:
        self._buffer = b""


class FileContent:
    """A stored file's bytes, read a chunk at a time (chunk rows, or an incremental blob handle on
    the store's connection): each read takes the store's lock, so other work goes on between reads.
    Deleting the file while it is read makes the next read raise :class:`sqlite3.OperationalError`."""

    def __init__(self, store: BatchStore, blob: sqlite3.Blob | io.BytesIO | _Chunks, size: int) -> None:
        self._store = store
        self._blob = blob
        self.size = size

    def read(self, n: int = CHUNK_BYTES) -> bytes:
        with self._store._lock:
            return self._blob.read(n)

    def close(self) -> None:
        with self._store._lock, contextlib.suppress(sqlite3.ProgrammingError):
            self._blob.close()  # the store closed first (shutdown): its connection closed the blob

    def __enter__(self) -> FileContent:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
