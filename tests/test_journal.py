"""The coordinator's durable queue: roundtrips across reopen, transitions, duplicates in a batch, refusals,
WAL, a SIGKILL after acknowledgement, and an event loop that keeps running while accepts commit."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qlm_plugin.coordinator import journal as journal_module
from qlm_plugin.coordinator.batch_store import BatchStore, StoreError
from qlm_plugin.coordinator.journal import (
    SCHEMA_VERSION,
    TERMINAL,
    DuplicateRecord,
    JobRecord,
    Journal,
    JournalError,
)

ROOT = Path(__file__).resolve().parents[1]


def _rec(i: int, *, tenant: str = "t", key: str | None = None, at: float | None = None) -> JobRecord:
    spec: dict[str, Any] = {"model": "m", "prompt": f"p{i}", "max_tokens": 16, "slo": {"ttft": 1.5}}
    return JobRecord(f"r{i}", tenant, spec, float(i) if at is None else at, idempotency_key=key)


@contextmanager
def _journal(path: Path, **kw: Any) -> Iterator[Journal]:
    j = Journal(path, **kw)
    try:
        yield j
    finally:
        j.close_sync()


async def _accept_all(j: Journal, recs: list[JobRecord]) -> list[BaseException | None]:
    return await asyncio.gather(*(j.accept(r) for r in recs), return_exceptions=True)


async def _in_one_batch(j: Journal, recs: list[JobRecord]) -> list[BaseException | None]:
    """Accept ``recs`` as a single batch: the writer waits on its batch lock until all are queued."""
    with j._batch_lock:
        tasks = [asyncio.ensure_future(j.accept(r)) for r in recs]
        await asyncio.sleep(0)  # every task runs up to its await: all are queued
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_accept_then_recover_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "journal.db"  # parent folders are created
    # r2 and r3 share accepted_at: insertion order breaks the tie; r9 was accepted earliest.
    recs = [_rec(1), _rec(3, at=2.0), _rec(2, key="k"), _rec(9, at=0.5)]
    with _journal(path) as j:
        assert all(r is None for r in asyncio.run(_accept_all(j, recs)))
        assert j.get("r3") == recs[1]  # committed when accept returned: no flush needed
    with _journal(path) as j:
        assert j.recover() == [recs[3], recs[0], recs[1], recs[2]]
        assert j.get("nope") is None


def test_transitions_are_visible_after_flush_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def run(j: Journal) -> None:
        await _accept_all(j, [_rec(1), _rec(2), _rec(3)])
        j.dispatched("r1", 1, "i0")
        j.dispatched("r2", 1, "i1")
        j.requeued("r2", 1)
        j.dispatched("r3", 1, "i0")
        j.finished(
            "r1",
            state="finished",
            output="hello",
            output_tokens=2,
            first_token_at=10.5,
            finished_at=11.0,
            finish_reason="stop",
        )
        await j.flush()

    def check(j: Journal) -> None:
        r1, r2, r3 = j.get("r1"), j.get("r2"), j.get("r3")
        assert r1 is not None and r2 is not None and r3 is not None
        assert (r1.state, r1.attempt, r1.instance_id, r1.output, r1.output_tokens) == (
            "finished",
            1,
            "i0",
            "hello",
            2,
        )
        assert (r1.first_token_at, r1.finished_at, r1.finish_reason, r1.error) == (10.5, 11.0, "stop", "")
        assert (r2.state, r2.attempt, r2.instance_id) == ("queued", 1, None)  # attempt kept
        assert (r1.failures, r2.failures, r3.failures) == (0, 1, 0)  # towards max_attempts, kept
        assert (r3.state, r3.attempt, r3.instance_id) == ("dispatched", 1, "i0")
        assert [r.request_id for r in j.recover()] == ["r2", "r3"]

    with _journal(path) as j:
        asyncio.run(run(j))
        check(j)
    with _journal(path) as j:
        check(j)


def test_terminal_records_are_not_recovered_and_stay_final(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    async def run(j: Journal) -> None:
        await _accept_all(j, [_rec(i) for i in range(5)])
        for i, state in enumerate(sorted(TERMINAL)):
            j.finished(f"r{i}", state=state, output="", output_tokens=0, first_token_at=None, finished_at=9.0)
        j.finished("r0", state="failed", output="x", output_tokens=1, first_token_at=None, finished_at=9.5)
        j.dispatched("r1", 2, "late")  # a report after a cancel: ignored
        j.requeued("r2", 1)
        j.dispatched("r3", 1, "i0")
        j.requeued("unknown", 0)  # ignored too
        await j.flush()

    with _journal(path) as j:
        asyncio.run(run(j))
        assert j.counts() == {"cancelled": 1, "dispatched": 1, "failed": 1, "finished": 1, "queued": 1}
    with _journal(path) as j:
        assert [r.request_id for r in j.recover()] == ["r3", "r4"]
        r0, r1 = j.get("r0"), j.get("r1")
        assert r0 is not None and (r0.state, r0.output, r0.finished_at) == ("cancelled", "", 9.0)
        assert r1 is not None and (r1.state, r1.attempt, r1.instance_id) == ("failed", 0, None)


def test_duplicates_are_refused_without_breaking_their_batch(tmp_path: Path) -> None:
    recs = [
        _rec(1),
        _rec(1, at=5.0),  # duplicate request id
        _rec(2, key="k"),
        _rec(3, key="k"),  # duplicate (tenant, key)
        _rec(4, key="k", tenant="other"),  # the same key for another tenant is fine
        _rec(5),
        _rec(6),  # no key: never a collision
    ]
    with _journal(tmp_path / "j.db") as j:
        results = asyncio.run(_in_one_batch(j, recs))
        assert j._largest_batch == len(recs)  # all seven went through one transaction
        assert [type(r) for r in results] == [
            type(None),
            DuplicateRecord,  # the caller's mistake, not the journal's
            type(None),
            DuplicateRecord,
            type(None),
            type(None),
            type(None),
        ]
        assert "duplicate request id 'r1'" in str(results[1])
        assert "duplicate idempotency key 'k' for tenant 't'" in str(results[3])
        assert [r.request_id for r in j.recover()] == ["r1", "r2", "r4", "r5", "r6"]
        stored = j.get("r1")
        assert stored is not None and stored.accepted_at == 1.0  # the first one won
        assert j.find_idempotent("t", "k") == "r2"
        assert j.find_idempotent("other", "k") == "r4"
        assert j.find_idempotent("t", "none") is None
        # Against committed records, in a later batch, too.
        with pytest.raises(JournalError, match="duplicate request id"):
            asyncio.run(j.accept(_rec(5)))
        with pytest.raises(JournalError, match="duplicate idempotency key"):
            asyncio.run(j.accept(_rec(7, key="k")))
        asyncio.run(j.accept(_rec(8, key="k2")))
        assert j.counts()["queued"] == 6


def test_batches_are_bounded_by_batch_max(tmp_path: Path) -> None:
    with _journal(tmp_path / "j.db", batch_max=4) as j:
        results = asyncio.run(_in_one_batch(j, [_rec(i) for i in range(10)]))
        assert results == [None] * 10
        assert j._largest_batch == 4
        assert len(j.recover()) == 10


@pytest.mark.parametrize("name", [":memory:", ""])
def test_a_file_path_is_required(name: str) -> None:
    with pytest.raises(JournalError, match="durability"):
        Journal(name)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['full', 'normal'\].*'off'"):
        Journal(tmp_path / "j.db", synchronous="off")
    with pytest.raises(ValueError, match="batch_max"):
        Journal(tmp_path / "j.db", batch_max=0)
    with _journal(tmp_path / "j.db") as j:
        with pytest.raises(ValueError, match="terminal state"):
            j.finished("r1", state="queued", output="", output_tokens=0, first_token_at=None, finished_at=1.0)
        bad_state = _rec(1)
        bad_state.state = "done"
        with pytest.raises(ValueError, match="state must be one of"):
            asyncio.run(j.accept(bad_state))
        bad_spec = _rec(2)
        bad_spec.spec = {"x": object()}
        with pytest.raises(TypeError):
            asyncio.run(j.accept(bad_spec))
        assert j.recover() == []


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(
        JournalError, match=r"notes\.txt is not a usable journal database: file is not a database"
    ):
        Journal(path)
    assert path.read_bytes() == content


def test_a_foreign_database_and_a_newer_schema_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(JournalError, match="not a journal"):
        Journal(foreign)

    newer = tmp_path / "newer.db"
    Journal(newer).close_sync()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(JournalError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Journal(newer)


def test_a_version_1_journal_is_opened_with_its_records_and_counts_failures_from_then_on(
    tmp_path: Path,
) -> None:
    """Version 2 keeps each request's failed attempts (a restart gave a request that kept failing
    its engines a fresh budget of ``max_attempts``), version 3 an answer's tool calls; a journal
    written by version 1 is migrated in place: its records are kept, with no failure counted and
    no tool calls, and a request that finishes then keeps its calls."""
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,"
        " spec TEXT NOT NULL, accepted_at REAL NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,"
        " instance_id TEXT, idempotency_key TEXT, output TEXT NOT NULL, output_tokens INTEGER NOT NULL,"
        " first_token_at REAL, finished_at REAL, finish_reason TEXT NOT NULL, error TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX jobs_state ON jobs (state)")
    conn.execute(
        "INSERT INTO jobs VALUES"
        " (1, 'r1', '', '{}', 1.0, 'dispatched', 2, 'i0', NULL, '', 0, NULL, NULL, '', '')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with _journal(path) as j:
        (r1,) = j.recover()
        assert (r1.request_id, r1.state, r1.attempt, r1.failures) == ("r1", "dispatched", 2, 0)
        j.requeued("r1", 1)
        asyncio.run(j.flush())
    with _journal(path) as j:
        r1 = j.get("r1")
        assert r1 is not None and (r1.state, r1.failures, r1.tool_calls) == ("queued", 1, "")
        calls = '[{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]'
        j.finished(
            "r1",
            state="finished",
            output="",
            output_tokens=3,
            first_token_at=2.0,
            finished_at=3.0,
            finish_reason="tool_calls",
            tool_calls=calls,
        )
        asyncio.run(j.flush())
    with _journal(path) as j:
        r1 = j.get("r1")
        assert r1 is not None and (r1.state, r1.finish_reason, r1.tool_calls) == (
            "finished",
            "tool_calls",
            calls,
        )
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn.close()


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
def test_wal_mode_and_synchronous_level(tmp_path: Path, synchronous: str, level: int) -> None:
    path = tmp_path / "j.db"
    with _journal(path, synchronous=synchronous) as j:
        asyncio.run(j.accept(_rec(1)))
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        with j._batch_lock:  # the writer touches its connection only under this lock
            assert j._writer.execute("PRAGMA synchronous").fetchone()[0] == level


def test_the_wal_is_checkpointed_while_the_journal_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints run beside the writer, not inside its commits: what is committed reaches the
    database file while the journal is open, so the WAL does not grow for as long as it runs."""
    monkeypatch.setattr(journal_module, "CHECKPOINT_INTERVAL_S", 0.05)
    path = tmp_path / "j.db"
    with _journal(path) as j:
        with j._batch_lock:
            assert j._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        empty = path.stat().st_size
        asyncio.run(_accept_all(j, [_rec(i) for i in range(2000)]))
        asyncio.run(j.flush())
        deadline = time.monotonic() + 10
        while path.stat().st_size <= empty:  # the records are in the WAL until a checkpoint
            assert time.monotonic() < deadline, "no checkpoint while the journal was open"
            time.sleep(0.02)
        assert len(j.recover()) == 2000


def test_a_closed_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    asyncio.run(j.accept(_rec(1)))
    j.dispatched("r1", 1, "i0")  # queued, not awaited: close commits it
    j.close_sync()
    j.close_sync()
    asyncio.run(j.close())
    with pytest.raises(JournalError, match="closed"):
        asyncio.run(j.accept(_rec(2)))
    with pytest.raises(JournalError, match="closed"):
        j.requeued("r1", 1)
    with pytest.raises(JournalError, match="closed"):
        j.get("r1")
    with _journal(path) as again:
        r1 = again.get("r1")
        assert r1 is not None and (r1.state, r1.instance_id) == ("dispatched", "i0")

    async def async_close() -> None:
        k = Journal(path)
        k.requeued("r1", 1)
        await k.close()
        await k.close()

    asyncio.run(async_close())
    with _journal(path) as again:
        r1 = again.get("r1")
        assert r1 is not None and (r1.state, r1.instance_id) == ("queued", None)


_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from qlm_plugin.coordinator.journal import JobRecord, Journal

    async def main() -> None:
        j = Journal(sys.argv[1], synchronous=sys.argv[2])
        recs = [JobRecord(f"r{i}", "t", {"i": i}, float(i)) for i in range(int(sys.argv[3]))]
        await asyncio.gather(*(j.accept(r) for r in recs))
        print("ready", flush=True)
        time.sleep(120)  # never closes: the parent kills it

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_acknowledged_accepts_survive_sigkill(tmp_path: Path, synchronous: str) -> None:
    n = 300
    path = tmp_path / "j.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), synchronous, str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 60.0)
        assert readable, "the child never acknowledged"
        line = proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        assert line == "ready\n", proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").exists()  # the commits sit in the WAL: reopening has to recover them
    with _journal(path) as j:
        recovered = j.recover()
    assert [r.request_id for r in recovered] == [f"r{i}" for i in range(n)]
    assert all(r.spec == {"i": i} for i, r in enumerate(recovered))


def test_accept_does_not_block_the_event_loop(tmp_path: Path) -> None:
    n = 500

    async def run(j: Journal) -> int:
        pending = n
        ticks = 0  # passes of the ticker while some accept was still waiting

        async def accept(rec: JobRecord) -> None:
            nonlocal pending
            await j.accept(rec)
            pending -= 1

        async def ticker() -> None:
            nonlocal ticks
            while pending:
                ticks += 1
                await asyncio.sleep(0)

        # A journal writing on the loop thread would complete every accept within one pass of the loop:
        # the ticker would see them pending once at most.
        await asyncio.gather(ticker(), *(accept(_rec(i)) for i in range(n)))
        return ticks

    with _journal(tmp_path / "j.db", synchronous="full") as j:
        ticks = asyncio.run(run(j))
        assert ticks >= 5, ticks
        assert len(j.recover()) == n


def test_the_journal_copy_of_a_request_keeps_every_field_a_restart_rebuilds_it_from() -> None:
    """A recovered request is rebuilt from its journaled spec: a field left out (a chat request's
    messages were) changes how it is served after a coordinator restart."""
    from google.protobuf import json_format

    from qlm_plugin.coordinator.jobs import spec_to_dict
    from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

    spec = pb.RequestSpec(
        request_id="r1",
        model="m",
        prompt="user: hi\nassistant:",
        prompt_tokens=7,
        max_tokens=16,
        slo=pb.SLO(ttft_ms=500, e2e_ms=9000, slo_class="batch", priority=3),
        tenant="acme",
        reject_if_late=True,
        sampling={"temperature": "0.5"},
        idempotency_key="k1",
        true_output_tokens=12,
        operation="chat",
        prompt_token_ids=[1, 2, 3],
        chat_messages='[{"role": "user", "content": "hi"}]',
        service_tier="flex",
        response_echo='{"instructions": "be brief"}',
        choices=3,
        choice=1,
        prompt_only=True,
        from_http=True,
    )
    # every field is set here, so a field added to the protocol fails this test until it is journaled
    assert {f.name for f, _ in spec.ListFields()} == {f.name for f in pb.RequestSpec.DESCRIPTOR.fields}
    assert {f.name for f, _ in spec.slo.ListFields()} == {f.name for f in pb.SLO.DESCRIPTOR.fields}
    assert json_format.ParseDict(spec_to_dict(spec), pb.RequestSpec()) == spec


def test_a_second_coordinator_cannot_open_a_journal_in_use(tmp_path: Path) -> None:
    """Two coordinators on one journal both recovered its requests and served every one twice
    (the default path is ./qlm-journal.db: a second `qlm serve` in the same folder)."""
    path = tmp_path / "j.db"
    busy = rf"in use by another process \(pid {os.getpid()}\)"
    link = tmp_path / "link.db"
    link.symlink_to(path)
    with _journal(path), pytest.raises(JournalError, match=busy):
        Journal(path)
    with _journal(path), pytest.raises(JournalError, match=busy):  # by another name, a symlink
        Journal(link)
    with _journal(path) as again:  # released on close (and by the kernel when a process dies)
        assert again.counts() is not None


def test_a_second_coordinator_cannot_open_a_batch_store_in_use(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = BatchStore(path)
    try:
        with pytest.raises(StoreError, match="in use by another process"):
            BatchStore(path)
    finally:
        store.close()
    BatchStore(path).close()


class _FullDisk:
    """The writer's connection, whose next COMMIT fails as on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.fail_next = True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_transition_not_committed_is_kept_and_committed_once_it_can_be(tmp_path: Path) -> None:
    """A full disk failed a commit: the finished transition nobody waited for was lost, and a
    restart served the finished request again. Kept, it goes first in the next commit; the flush
    that could not make it durable fails, and the next one succeeds."""
    with _journal(tmp_path / "j.db") as j:
        asyncio.run(j.accept(_rec(1)))
        real = j._writer
        j._writer = _FullDisk(real)  # type: ignore[assignment]

        async def finish_then_flush() -> None:
            j.finished(
                "r1", state="finished", output="ok", output_tokens=2, first_token_at=1.0, finished_at=2.0
            )
            with pytest.raises(JournalError, match="disk is full"):
                await j.flush()
            assert j.failure is not None and "disk is full" in j.failure  # readiness says so
            await j.flush()  # the kept write, committed first
            assert j.failure is None

        asyncio.run(finish_then_flush())
        record = j.get("r1")
        assert record is not None and (record.state, record.output) == ("finished", "ok")
        j._writer = real


def test_records_finished_before_their_retention_are_deleted_and_nothing_else(tmp_path: Path) -> None:
    """A journal that only grew took 65 GB a day at 1,000 requests/s."""
    with _journal(tmp_path / "j.db") as j:

        async def fill() -> None:
            for i in range(12):
                await j.accept(_rec(i, at=float(i)))
            for i in range(0, 12, 2):  # the even ones end at 100 + i, the odd ones stay live
                j.finished(
                    f"r{i}",
                    state="finished",
                    output="",
                    output_tokens=1,
                    first_token_at=None,
                    finished_at=100.0 + i,
                )
            await j.flush()

        asyncio.run(fill())
        conn = j._connect()
        try:
            assert j.prune(conn, before=105.0) == 3  # r0, r2, r4: ended before 105
            assert j.prune(conn, before=105.0) == 0
            assert j.get("r4") is None and j.get("r6") is not None
            assert {r.request_id for r in j.recover()} == {f"r{i}" for i in range(1, 12, 2)}
        finally:
            conn.close()


@contextmanager
def _read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing may write in: without permission, or (as root, whom permissions do not
    stop) a read-only tmpfs where mounting is allowed; else the test is skipped."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("no folder can be made read-only here (root, and mounting is not allowed)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_journal_or_batch_store_in_a_read_only_folder_says_so(tmp_path: Path) -> None:
    """Said "cannot create the journal's directory" of a folder that exists (the journal), or gave
    a bare errno (the batch store). Both now name the folder and why."""
    with _read_only_folder(tmp_path) as folder:
        with pytest.raises(
            JournalError, match=r"cannot write in the folder of the journal .*give it a writable"
        ):
            Journal(folder / "j.db")
        with pytest.raises(StoreError, match=r"cannot write in the folder of the batch store"):
            BatchStore(folder / "b.db")


def test_a_version_3_journal_gets_the_log_probabilities_column(tmp_path: Path) -> None:
    """Version 3 (tool calls) was written before log probabilities were kept: opened, its records
    are kept and a request that finishes then keeps its entries."""
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,"
        " spec TEXT NOT NULL, accepted_at REAL NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,"
        " instance_id TEXT, idempotency_key TEXT, output TEXT NOT NULL, output_tokens INTEGER NOT NULL,"
        " first_token_at REAL, finished_at REAL, finish_reason TEXT NOT NULL, error TEXT NOT NULL,"
        " failures INTEGER NOT NULL DEFAULT 0, tool_calls TEXT NOT NULL DEFAULT '')"
    )
    conn.execute(
        "INSERT INTO jobs VALUES"
        " (1, 'r1', '', '{}', 1.0, 'dispatched', 1, 'i0', NULL, '', 0, NULL, NULL, '', '', 0, '')"
    )
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    entries = '[{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]'
    with _journal(path) as j:
        (r1,) = j.recover()
        assert (r1.request_id, r1.logprobs) == ("r1", "")
        j.finished(
            "r1",
            state="finished",
            output="a",
            output_tokens=1,
            first_token_at=2.0,
            finished_at=3.0,
            logprobs=entries,
        )
        asyncio.run(j.flush())
    with _journal(path) as j:
        r1 = j.get("r1")
        assert r1 is not None and r1.logprobs == entries


def test_a_journal_file_this_user_cannot_write_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite opens a file it may not write read-only without a word: the coordinator started,
    said it was healthy, and refused every request. (As root permissions do not stop a write, so
    the read-only open SQLite falls back to is made here directly.)"""
    path = tmp_path / "j.db"
    with _journal(path):
        pass
    monkeypatch.setattr(
        Journal,
        "_connect",
        lambda self: sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None),
    )
    with pytest.raises(JournalError, match=r"cannot write to the journal .*j\.db: .*readonly.*writable"):
        Journal(path)
    store = tmp_path / "b.db"
    BatchStore(store).close()
    monkeypatch.setattr(
        journal_module.sqlite3,
        "connect",
        lambda name, **kw: sqlite3.Connection(f"file:{name}?mode=ro", uri=True, **kw),
    )
    with pytest.raises(StoreError, match=r"cannot write to the batch store .*b\.db: .*readonly.*writable"):
        BatchStore(store)  # it said "not a batch store"


def test_a_journal_file_deleted_while_open_refuses_new_requests_and_says_why(tmp_path: Path) -> None:
    """Deleted under a running coordinator, its commits went to a file no restart opens: accepted
    requests were lost at the next restart."""
    path = tmp_path / "j.db"
    with _journal(path) as j:
        asyncio.run(j.accept(_rec(1)))
        assert j.failure is None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        deadline = time.monotonic() + 5
        while j.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert j.failure is not None and "deleted or replaced" in j.failure
        with pytest.raises(JournalError, match="deleted or replaced"):
            asyncio.run(j.accept(_rec(2)))


def test_a_value_sqlite_cannot_bind_fails_its_own_write_not_the_journal(tmp_path: Path) -> None:
    """An integer past 64 bits killed the writer thread: every later write failed, for good."""
    with _journal(tmp_path / "j.db") as j:
        huge = _rec(1)
        huge.output_tokens = 2**64
        errors = asyncio.run(_accept_all(j, [huge]))
        assert isinstance(errors[0], JournalError) and "not written" in str(errors[0])
        asyncio.run(j.accept(_rec(2)))
        assert j.get("r2") is not None and j.get("r1") is None and j.failure is None


def test_a_damaged_record_is_an_error_naming_the_file_and_the_request(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with _journal(path) as j:
        asyncio.run(j.accept(_rec(1)))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE jobs SET spec = '{bad' WHERE request_id = 'r1'")
    conn.commit()
    conn.close()
    with (
        _journal(path) as j,
        pytest.raises(JournalError, match=r"j\.db: the record of request 'r1' is damaged"),
    ):
        j.recover()


def test_a_transition_whose_commit_fails_at_the_close_gets_its_last_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close's own commit failing (a full disk) dropped the finished transitions it held: the
    records stayed dispatched, and a restart served those requests again."""
    monkeypatch.setattr(journal_module, "RETRY_S", 0.05)
    path = tmp_path / "j.db"
    j = Journal(path)
    asyncio.run(j.accept(_rec(1)))
    j._writer = _FullDisk(j._writer)  # type: ignore[assignment]
    j.finished("r1", state="finished", output="ok", output_tokens=2, first_token_at=1.0, finished_at=2.0)
    with pytest.raises(JournalError, match="disk is full"):  # the close says its commit failed
        j.close_sync()
    with _journal(path) as again:
        record = again.get("r1")
        assert record is not None and (record.state, record.output) == ("finished", "ok")


def test_records_past_their_retention_are_pruned_soon_after_a_start(tmp_path: Path) -> None:
    """The first prune came ten minutes after the start: a coordinator restarted more often (a
    crash loop, frequent deploys) never pruned, and its journal only grew."""
    path = tmp_path / "j.db"
    with _journal(path) as j:

        async def fill() -> None:
            await j.accept(_rec(1, at=1.0))
            j.finished(
                "r1", state="finished", output="", output_tokens=1, first_token_at=None, finished_at=2.0
            )
            await j.accept(_rec(2, at=3.0))  # live: kept
            await j.flush()

        asyncio.run(fill())
    with _journal(path, retain_finished_s=3600.0) as j:
        deadline = time.monotonic() + 5
        while j.get("r1") is not None:
            assert time.monotonic() < deadline, "not pruned after the start"
            time.sleep(0.05)
        assert j.get("r2") is not None
