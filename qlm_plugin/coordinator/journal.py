"""The coordinator's durable queue: every accepted request in an embedded SQLite database (WAL mode).

:meth:`Journal.accept` returns once the record is committed, so the coordinator acknowledges a client
only for a request that survives a crash of the process; on restart :meth:`Journal.recover` hands back
every record that is not terminal, and the coordinator rebuilds its queue from them. Later transitions
(:meth:`~Journal.dispatched`, :meth:`~Journal.requeued`, :meth:`~Journal.finished`) are queued without
waiting: losing the last few of them in a crash only makes a request run again, never lose it
(at-least-once execution, every unfinished request recovered exactly once). A terminal record is final:
later transitions for it are ignored.

One writer thread owns the write connection and group-commits: it takes every pending write (up to
``batch_max``), runs them in one transaction, commits, and only then resolves the waiters, so the cost of
a commit (an fsync with ``synchronous="full"``) is shared by every write that arrived meanwhile. The
event loop never touches SQLite for writes: it enqueues and awaits a future that the writer resolves with
``call_soon_threadsafe``. Reads (:meth:`~Journal.get`, :meth:`~Journal.recover`, ...) use a second
connection, which WAL lets read committed data while the writer writes. Checkpoints (copying the WAL
back into the database, with its fsyncs) run on a third connection in a thread of their own, every
``CHECKPOINT_INTERVAL_S`` after writes: inside a commit, SQLite's automatic one held every waiter of
that commit (accept p99 2.6 ms against 0.3 ms without, at 1,000 requests/s). The same thread deletes
the records finished more than ``retain_finished_s`` ago (a journal that only grew took 65 GB a day at
1,000 requests/s), in chunks of ``PRUNE_CHUNK`` short enough not to hold the writer up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from qlm_plugin.coordinator.file_lock import FileInUse, FolderNotWritable, lock_file, unlock_file
from qlm_plugin.coordinator.json_codec import dumps

#: How often the checkpointer copies what was committed from the WAL into the database, seconds.
CHECKPOINT_INTERVAL_S: Final = 0.5
#: How often records past their retention are deleted, and how many per transaction.
PRUNE_EVERY_S: Final = 600.0
PRUNE_CHUNK: Final = 5000
#: Bytes the WAL is cut back to once a checkpoint has copied all of it (a burst grew it to 600 MB).
WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024

__all__ = ["SCHEMA_VERSION", "STATES", "TERMINAL", "JobRecord", "Journal", "JournalError"]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 4  # 2: failures; 3: tool_calls; 4: logprobs (an older journal gets what it lacks)
STATES: Final = frozenset({"queued", "dispatched", "finished", "cancelled", "failed"})
TERMINAL: Final = frozenset({"finished", "cancelled", "failed"})
_SYNCHRONOUS: Final = {"normal": "NORMAL", "full": "FULL"}


#: After a failed commit (a full disk), how soon the writes kept from it are tried again, seconds.
RETRY_S = 1.0
#: At the close, how long the writes a failed commit kept are tried again, seconds.
CLOSE_RETRY_S = 5.0


class JournalError(Exception):
    """The journal cannot do what was asked: not a journal database, a newer schema, a duplicate
    request id or idempotency key, a closed journal, or a failed commit."""


class DuplicateRecord(JournalError):
    """A new record's request id, or its tenant's idempotency key, is taken: the caller's mistake
    (any other :class:`JournalError` is the journal's). ``field``: the request field taken."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(slots=True)
class JobRecord:
    """One request as the journal keeps it. The field order is the column order of the table."""

    request_id: str
    tenant: str
    spec: dict[str, Any]  # the request as a JSON-able dict, opaque to the journal
    accepted_at: float  # unix seconds
    state: str = "queued"  # queued | dispatched | finished | cancelled | failed
    attempt: int = 0  # dispatches so far
    instance_id: str | None = None
    idempotency_key: str | None = None
    output: str = ""
    output_tokens: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str = ""
    error: str = ""
    failures: int = 0  # attempts that failed (towards max_attempts, across restarts)
    tool_calls: str = ""  # finished: the tool calls of its answer (JSON, as the stream merged them)
    logprobs: str = ""  # finished: its tokens' log probabilities, if asked for (JSON, OpenAI chat's entries)


_COLUMNS: Final = (
    "request_id",
    "tenant",
    "spec",
    "accepted_at",
    "state",
    "attempt",
    "instance_id",
    "idempotency_key",
    "output",
    "output_tokens",
    "first_token_at",
    "finished_at",
    "finish_reason",
    "error",
    "failures",
    "tool_calls",
    "logprobs",
)
_STATE_LIST: Final = ", ".join(f"'{s}'" for s in sorted(STATES))
_TERMINAL_LIST: Final = ", ".join(f"'{s}'" for s in sorted(TERMINAL))

# seq (the rowid) keeps insertion order, the tie-break of recovery; it only grows (deleted rows are
# the oldest: see prune). The UNIQUE index is partial: requests without an idempotency key never collide.
_SCHEMA: Final = (
    f"""CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        spec TEXT NOT NULL,
        accepted_at REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_STATE_LIST})),
        attempt INTEGER NOT NULL,
        instance_id TEXT,
        idempotency_key TEXT,
        output TEXT NOT NULL,
        output_tokens INTEGER NOT NULL,
        first_token_at REAL,
        finished_at REAL,
        finish_reason TEXT NOT NULL,
        error TEXT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        tool_calls TEXT NOT NULL DEFAULT '',
        logprobs TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX jobs_state ON jobs (state)",
    "CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
)
_PRUNE: Final = (
    f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE seq < ? AND state IN ({_TERMINAL_LIST})"
    f" AND finished_at < ? ORDER BY seq LIMIT {PRUNE_CHUNK})"
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_INSERT: Final = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_LIVE: Final = f"state NOT IN ({_TERMINAL_LIST})"
_DISPATCHED: Final = (
    f"UPDATE jobs SET state = 'dispatched', attempt = ?, instance_id = ? WHERE request_id = ? AND {_LIVE}"
)
_REQUEUED: Final = (
    f"UPDATE jobs SET state = 'queued', instance_id = NULL, failures = ? WHERE request_id = ? AND {_LIVE}"
)
_FORGET_KEY: Final = "UPDATE jobs SET idempotency_key = NULL WHERE request_id = ?"
_FIRST_TOKEN: Final = f"UPDATE jobs SET first_token_at = ? WHERE request_id = ? AND {_LIVE}"
_DELETE: Final = f"DELETE FROM jobs WHERE request_id = ? AND state IN ({_TERMINAL_LIST})"
#: What each older schema version lacks.
_UPGRADES: Final = {
    1: ("ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",),
    2: ("ALTER TABLE jobs ADD COLUMN tool_calls TEXT NOT NULL DEFAULT ''",),
    3: ("ALTER TABLE jobs ADD COLUMN logprobs TEXT NOT NULL DEFAULT ''",),
}
_FINISHED: Final = (
    "UPDATE jobs SET state = ?, output = ?, output_tokens = ?, first_token_at = ?, finished_at = ?,"
    f" finish_reason = ?, error = ?, tool_calls = ?, logprobs = ? WHERE request_id = ? AND {_LIVE}"
)


class _SyncWaiter:
    """What a thread that is not an event loop waits on (:meth:`Journal.close_sync`)."""

    __slots__ = ("_done", "error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    def wait(self) -> BaseException | None:
        self._done.wait()
        return self.error


class _Op(NamedTuple):
    kind: str  # accept | dispatched | requeued | forget_key | finished | flush | stop
    sql: str | None  # None: a marker, nothing to write
    params: tuple[Any, ...]
    waiter: asyncio.Future[None] | _SyncWaiter | None


def _settle(items: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    """Runs on the waiters' event loop: one call per loop and batch, not one per waiter."""
    for fut, error in items:
        if fut.done():  # the caller was cancelled; its write went ahead regardless
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class Journal:
    """The durable queue of accepted requests (module docstring). Writes are applied in call order."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "normal",
        batch_max: int = 512,
        retain_finished_s: float | None = None,
    ) -> None:
        """``retain_finished_s``: how long a finished record is kept (status, idempotent retries,
        a batch's answers after a restart); None: for ever."""
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, not {synchronous!r}")
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, not {batch_max}")
        name = os.fspath(path)
        if name in ("", ":memory:"):
            raise JournalError(f"the journal needs a file path, not {name!r}: the point is durability")
        self.path = Path(name)
        self.synchronous = synchronous
        self.retain_finished_s = retain_finished_s
        self._batch_max = batch_max
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal's directory {self.path.parent}: {exc}") from exc
        try:
            self._file_lock = lock_file(self.path, "the journal")
        except (FileInUse, FolderNotWritable) as exc:
            raise JournalError(str(exc)) from None
        try:
            self._writer = self._open_writer(_SYNCHRONOUS[synchronous])
            try:
                self._reader: sqlite3.Connection | None = self._connect()
            except BaseException:
                self._writer.close()
                raise
        except BaseException:
            unlock_file(self._file_lock)
            raise
        self._read_lock = threading.Lock()
        # Guards the closed flag together with the enqueue, so that nothing is queued behind the stop marker.
        self._lock = threading.Lock()
        self._closing = False
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._retry: list[_Op] = []  # writes of a failed commit, tried again first (writer thread)
        # Held while a batch is collected and committed; tests hold it to line several writes up in one batch.
        self._batch_lock = threading.Lock()
        self._batches = 0
        self._largest_batch = 0
        # Why the journal cannot keep what it is given now (None: it can); readiness reads it. Set by
        # the writer (a commit failed, cleared by the next that succeeds; the writer died) and by the
        # checkpointer (the file was deleted or replaced under it: what is written goes to a file
        # nobody opens again).
        self._commit_failure: str | None = None
        self._file_failure: str | None = None
        stat = os.stat(self.path)
        self._file_identity = (stat.st_dev, stat.st_ino)
        self._thread = threading.Thread(
            target=self._run, name=f"journal-writer:{self.path.name}", daemon=True
        )
        self._thread.start()
        self._written = False  # committed since the last checkpoint (a flag: races only delay one)
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name=f"journal-checkpoints:{self.path.name}", daemon=True
        )
        self._checkpointer.start()

    @property
    def failure(self) -> str | None:
        """Why the journal cannot keep new writes now, or None: a failing commit (the disk full, the
        file read-only or damaged) until one succeeds, a dead writer, or the file gone."""
        return self._file_failure or self._commit_failure

    # -- opening -------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            # Autocommit (isolation_level=None): the writer issues BEGIN/COMMIT itself. Both connections are
            # used from threads other than the one that opened them, each behind its own serialisation.
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from exc

    def _open_writer(self, synchronous: str) -> sqlite3.Connection:
        conn = self._connect()
        try:
            self._prepare(conn, synchronous)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(f"{self.path} is not a usable journal database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection, synchronous: str) -> None:
        # Reading the header first: a file that is not SQLite fails here ("file is not a database").
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path} has journal schema version {version}, newer than this version of qlm-plugin "
                f"understands ({SCHEMA_VERSION}); refusing to open it"
            )
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise JournalError(f"{self.path} is a SQLite database but not a journal (no schema version)")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            raise JournalError(f"{self.path}: cannot switch to WAL mode (journal_mode is {mode!r})")
        # In WAL mode NORMAL survives a crash of the process (a power loss may take the last commits);
        # FULL also fsyncs the WAL on every commit.
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer thread's (module docstring)
        # A WAL that a burst grew is cut back to this when a checkpoint lets it start over.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        # Always a write, even with the schema current: SQLite opens a file it may not write
        # read-only without a word, and every commit would fail while the coordinator looked healthy.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])  # under the lock
            statements = (
                _SCHEMA if version == 0 else [u for v in range(version, SCHEMA_VERSION) for u in _UPGRADES[v]]
            )
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            hint = (
                "another process holds it: an open sqlite3 session? (read it with sqlite3 -readonly)"
                if "locked" in str(exc)
                else "check that the file, its -wal and -shm files and their folder are writable by "
                "this user, and the disk has room"
            )
            raise JournalError(f"cannot write to the journal {self.path}: {exc} ({hint})") from exc
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    # -- writes (event-loop and caller side) -----------------------------------------------------------

    def _enqueue(self, op: _Op) -> None:
        with self._lock:
            if self._closing:
                raise JournalError(f"the journal {self.path} is closed")
            self._queue.put(op)

    async def accept(self, rec: JobRecord) -> None:
        """Write a new record; it is committed when this returns. A duplicate ``request_id``, or a
        duplicate ``(tenant, idempotency_key)`` with a key, raises :class:`JournalError`. If the caller
        is cancelled while waiting, the record may still be committed."""
        await self.accept_nowait(rec)

    def accept_nowait(self, rec: JobRecord) -> asyncio.Future[None]:
        """Queue a new record; the future is done when it is committed, or fails as :meth:`accept`
        does. The write goes ahead whatever happens to the future."""
        if rec.state not in STATES:
            raise ValueError(f"state must be one of {sorted(STATES)}, not {rec.state!r}")
        if self._file_failure is not None:
            raise JournalError(self._file_failure)
        # Encoded here, so that a spec that is not JSON-able fails in the caller (TypeError).
        spec = dumps(rec.spec).decode()
        params = (
            rec.request_id,
            rec.tenant,
            spec,
            rec.accepted_at,
            rec.state,
            rec.attempt,
            rec.instance_id,
            rec.idempotency_key,
            rec.output,
            rec.output_tokens,
            rec.first_token_at,
            rec.finished_at,
            rec.finish_reason,
            rec.error,
            rec.failures,
            rec.tool_calls,
            rec.logprobs,
        )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Op("accept", _INSERT, params, fut))
        return fut

    def dispatched(self, request_id: str, attempt: int, instance_id: str) -> None:
        """Queue: the request went to ``instance_id`` (its ``attempt``-th dispatch)."""
        self._enqueue(_Op("dispatched", _DISPATCHED, (attempt, instance_id, request_id), None))

    def requeued(self, request_id: str, failures: int) -> None:
        """Queue: the request is back in the queue, on no instance (its attempt count is kept),
        with ``failures`` attempts failed so far."""
        self._enqueue(_Op("requeued", _REQUEUED, (failures, request_id), None))

    def first_token(self, request_id: str, at: float) -> None:
        """Queue: an unfinished request's first token came at ``at`` (unix seconds): kept when the
        coordinator stops with it, so its TTFT survives the restart."""
        self._enqueue(_Op("first_token", _FIRST_TOKEN, (at, request_id), None))

    def forget_key(self, request_id: str) -> None:
        """Queue: the request no longer holds its idempotency key (a new request may take it)."""
        self._enqueue(_Op("forget_key", _FORGET_KEY, (request_id,), None))

    def delete(self, request_id: str) -> None:
        """Queue: forget an ended request, its prompt and its answer (its client deleted it)."""
        self._enqueue(_Op("delete", _DELETE, (request_id,), None))

    def finished(
        self,
        request_id: str,
        *,
        state: str,
        output: str,
        output_tokens: int,
        first_token_at: float | None,
        finished_at: float,
        finish_reason: str = "",
        error: str = "",
        tool_calls: str = "",
        logprobs: str = "",
    ) -> None:
        """Queue: the request ended in ``state`` (one of :data:`TERMINAL`); ``tool_calls`` and
        ``logprobs``: its answer's (JSON), if any."""
        if state not in TERMINAL:
            raise ValueError(f"finished() needs a terminal state, one of {sorted(TERMINAL)}, not {state!r}")
        params = (
            state,
            output,
            output_tokens,
            first_token_at,
            finished_at,
            finish_reason,
            error,
            tool_calls,
            logprobs,
            request_id,
        )
        self._enqueue(_Op("finished", _FINISHED, params, None))

    async def flush(self) -> None:
        """Return once every write queued before the call is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Op("flush", None, (), fut))
        await fut

    # -- the writer thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        batch: list[_Op] = []
        try:
            while True:
                try:  # writes kept from a failed commit are tried again, with or without new ones
                    first: _Op | None = self._queue.get(timeout=RETRY_S if self._retry else None)
                except queue.Empty:
                    first = None
                with self._batch_lock:
                    batch, self._retry = self._retry, []
                    if first is not None:
                        batch.append(first)
                    while len(batch) < self._batch_max:
                        try:
                            batch.append(self._queue.get_nowait())
                        except queue.Empty:
                            break
                    self._batches += 1
                    self._largest_batch = max(self._largest_batch, len(batch))
                    if self._commit(batch):
                        return
        except BaseException as exc:  # a bug: fail every waiter rather than leave one hanging forever
            log.exception("journal %s: the writer thread died", self.path)
            self._commit_failure = f"the journal {self.path}'s writer died ({exc!r}): restart the coordinator"
            with self._lock:
                self._closing = True
            error = JournalError(f"the journal {self.path} failed: {exc!r}")
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._settle_batch(batch, {}, error)
            with suppress(sqlite3.Error):
                self._writer.close()

    def _commit(self, batch: list[_Op]) -> bool:
        """Run one batch in one transaction and resolve its waiters; True when it held the stop marker.

        A failing write fails only its own waiter. Every write is a single SQL statement, and SQLite's
        default conflict resolution (ABORT) backs out just the failing statement and keeps the transaction
        open, which is what a SAVEPOINT per write would give, without its two extra statements. Any other
        error (disk full, I/O) rolls the whole batch back and fails all of it.
        """
        conn = self._writer
        errors: dict[int, BaseException] = {}
        batch_error: BaseException | None = None
        stop = any(op.kind == "stop" for op in batch)
        writes = sum(op.sql is not None for op in batch)
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
                for i, op in enumerate(batch):
                    if op.sql is None:
                        continue
                    try:
                        cursor = conn.execute(op.sql, op.params)
                    except sqlite3.IntegrityError as exc:
                        if not conn.in_transaction:  # not a plain statement abort: fail the batch
                            raise
                        errors[i] = self._integrity_error(op, exc)
                        if op.waiter is None:
                            log.error("journal %s: %s dropped: %s", self.path, op.kind, errors[i])
                    except (OverflowError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
                        # a value SQLite cannot bind (an integer past 64 bits): that write fails,
                        # not the writer thread (it failed every later write)
                        errors[i] = JournalError(f"{op.kind} not written: {exc}")
                        log.error("journal %s: %s not written: %s", self.path, op.kind, exc)
                    else:
                        if op.waiter is None and cursor.rowcount == 0:
                            # A transition for a terminal record (a report after a cancel) or an unknown id.
                            log.debug("journal %s: %s ignored for %r", self.path, op.kind, op.params[-1])
                conn.execute("COMMIT")
                self._written = True
                self._commit_failure = None
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            # Transitions nobody waits for (dispatched, finished, ...) are kept, in order, and
            # go first in the next commit: lost, a restart would serve a finished request again.
            # A new request's record fails its caller, who is told (unavailable) and may retry.
            self._retry = [op for op in batch if op.sql is not None and op.waiter is None]
            log.error(
                "journal %s: a batch of %d writes was not committed (%d kept to try again): %s",
                self.path,
                writes,
                len(self._retry),
                exc,
            )
            batch_error = JournalError(f"the journal {self.path} could not commit: {exc}")
            self._commit_failure = str(batch_error)
            if stop:  # no next commit: the kept writes get their last tries now
                self._last_tries()
        if stop:
            with suppress(sqlite3.Error):
                self._writer.close()
        self._settle_batch(batch, errors, batch_error)
        return stop

    def _last_tries(self) -> None:
        """At the close, the transitions a failed commit kept: tried again for up to
        :data:`CLOSE_RETRY_S` (a full disk may get room); what is still not committed then is
        logged by request id (a finished one of them would be served again after a restart)."""
        conn, kept, self._retry = self._writer, self._retry, []
        deadline = time.monotonic() + CLOSE_RETRY_S
        while kept and time.monotonic() < deadline:
            time.sleep(RETRY_S)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for op in kept:
                    with suppress(sqlite3.IntegrityError):
                        conn.execute(op.sql or "", op.params)
                conn.execute("COMMIT")
                kept = []
            except sqlite3.Error:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
        if kept:
            log.error(
                "journal %s: %d transitions could not be committed before the close and are lost: %s",
                self.path,
                len(kept),
                ", ".join(f"{op.kind} {op.params[-1]}" for op in kept),
            )

    @staticmethod
    def _integrity_error(op: _Op, exc: sqlite3.IntegrityError) -> JournalError:
        if op.kind == "accept":
            request_id, tenant, key = op.params[0], op.params[1], op.params[7]
            if "idempotency_key" in str(exc):
                return DuplicateRecord(
                    f"duplicate idempotency key {key!r} for tenant {tenant!r}", "idempotency_key"
                )
            if "request_id" in str(exc):
                return DuplicateRecord(f"duplicate request id {request_id!r}", "request_id")
        return JournalError(f"{op.kind} refused: {exc}")

    @staticmethod
    def _settle_batch(
        batch: list[_Op], errors: dict[int, BaseException], batch_error: BaseException | None
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]] = {}
        for i, op in enumerate(batch):
            waiter = op.waiter
            if waiter is None:
                continue
            error = batch_error if batch_error is not None else errors.get(i)
            if isinstance(waiter, _SyncWaiter):
                waiter.settle(error)
            else:
                by_loop.setdefault(waiter.get_loop(), []).append((waiter, error))
        for loop, items in by_loop.items():
            with suppress(RuntimeError):  # the loop is closed: nobody is left waiting on it
                loop.call_soon_threadsafe(_settle, items)

    def _checkpoints(self) -> None:
        """Copy the WAL back into the database while writes go on (PASSIVE: it waits for no one;
        what a reader still needs is copied by the next one). A failed checkpoint is logged and
        tried again: the WAL keeps every commit until then."""
        conn: sqlite3.Connection | None = None
        pruned_at = -math.inf  # the first prune at once: a coordinator restarted often pruned never
        failed_said_at = -math.inf
        try:
            while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL_S):
                if not self._check_file():
                    continue  # a connection opened now would make a new, empty file at the path
                if self.retain_finished_s is not None and time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    try:
                        conn = conn or self._connect()
                        self.prune(conn, time.time() - self.retain_finished_s)
                    except (sqlite3.Error, JournalError) as exc:
                        log.warning("journal %s: pruning failed (tried again later): %s", self.path, exc)
                if not self._written:
                    continue
                self._written = False
                try:
                    conn = conn or self._connect()
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except (sqlite3.Error, JournalError) as exc:
                    if time.monotonic() - failed_said_at >= 60.0:  # a full disk: every 0.5 s otherwise
                        failed_said_at = time.monotonic()
                        log.warning("journal %s: checkpoint failed (tried again): %s", self.path, exc)
                    self._written = True
        finally:
            if conn is not None:
                with suppress(sqlite3.Error):
                    conn.close()

    def _check_file(self) -> bool:
        """Whether the file open is still the journal's path: deleted or replaced (an operator, a
        cleanup job), every commit would go where no restart finds it."""
        try:
            stat = os.stat(self.path)
            same = (stat.st_dev, stat.st_ino) == self._file_identity
        except FileNotFoundError:
            same = False
        if not same and self._file_failure is None:
            self._file_failure = (
                f"the journal file {self.path} was deleted or replaced while open: new requests are "
                "refused, as a restart would lose them; what it held is in the open file only (copy "
                f"it back from /proc/{os.getpid()}/fd before restarting)"
            )
            log.critical("journal %s", self._file_failure)
        return same

    def prune(self, conn: sqlite3.Connection, before: float) -> int:
        """Delete the records that ended before ``before`` (unix seconds); how many. Only the
        oldest part of the table is read: ``seq`` grows with acceptance, so the records accepted
        before ``before`` are a prefix of it, found by a binary search on the primary key."""
        low = conn.execute("SELECT min(seq) FROM jobs").fetchone()[0]
        high = conn.execute("SELECT max(seq) FROM jobs").fetchone()[0]
        if low is None:
            return 0
        high += 1
        while low < high:  # the first seq accepted at or after ``before``
            mid = (low + high) // 2
            row = conn.execute(
                "SELECT seq, accepted_at FROM jobs WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
            ).fetchone()
            if row is None or row[1] >= before:
                high = mid
            else:
                low = row[0] + 1
        deleted = 0
        while not self._stop_checkpoints.is_set():
            n = conn.execute(_PRUNE, (low, before)).rowcount
            deleted += n
            if n < PRUNE_CHUNK:
                break
        if deleted:
            log.info("journal %s: %d records finished before %.0f deleted", self.path, deleted, before)
        return deleted

    # -- reads (synchronous, committed data) -------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            if self._reader is None:
                raise JournalError(f"the journal {self.path} is closed")
            try:
                yield self._reader
            except sqlite3.DatabaseError as exc:  # a damaged file: say which, not a bare sqlite error
                raise JournalError(f"the journal {self.path} cannot be read: {exc}") from exc

    def _record(self, row: tuple[Any, ...]) -> JobRecord:
        try:
            spec = json.loads(row[2])
        except ValueError as exc:
            raise JournalError(
                f"the journal {self.path}: the record of request {row[0]!r} is damaged (its request is "
                f"not JSON: {exc}); restore the file from a backup, or delete that record"
            ) from exc
        return JobRecord(row[0], row[1], spec, *row[3:])

    def recover(self) -> list[JobRecord]:
        """Every record that is not terminal, by ``accepted_at`` then insertion order. For start-up: it
        reads committed data, so writes queued by this journal must be flushed first."""
        with self._read() as conn:
            rows = conn.execute(f"{_SELECT} WHERE {_LIVE} ORDER BY accepted_at, seq").fetchall()
        return [self._record(row) for row in rows]

    def get(self, request_id: str) -> JobRecord | None:
        """The committed record of ``request_id``, or None."""
        with self._read() as conn:
            row = conn.execute(f"{_SELECT} WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else self._record(row)

    def find_idempotent(self, tenant: str, key: str) -> str | None:
        """The request id of the committed request of ``tenant`` with idempotency key ``key``, or None."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT request_id FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, key)
            ).fetchone()
        return None if row is None else str(row[0])

    def counts(self) -> dict[str, int]:
        """Committed records per state; every state is present, with 0 when it has none."""
        with self._read() as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(sorted(STATES), 0)
        out.update({str(state): int(n) for state, n in rows})
        return out

    # -- closing -------------------------------------------------------------------------------------------

    def _begin_close(self, waiter: asyncio.Future[None] | _SyncWaiter) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._closing = True
            self._queue.put(_Op("stop", None, (), waiter))
            return True

    def _finish_close(self) -> None:
        self._thread.join()
        self._stop_checkpoints.set()
        self._checkpointer.join()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        unlock_file(self._file_lock)
        self._file_lock = None

    async def close(self) -> None:
        """Commit every queued write, stop the writer thread, close both connections. Idempotent."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            if self._begin_close(fut):
                await fut
            else:  # closed already, or another close is in flight
                await asyncio.to_thread(self._thread.join)
        finally:
            # The writer resolves the stop marker as its last act, so this join is at once.
            self._finish_close()

    def close_sync(self) -> None:
        """:meth:`close` for callers without an event loop (atexit, tests). Idempotent."""
        waiter = _SyncWaiter()
        error = waiter.wait() if self._begin_close(waiter) else None
        self._finish_close()
        if error is not None:
            raise error
