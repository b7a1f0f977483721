"""Pieces of a chaos test (``integration/test_chaos.py``): child processes killed with SIGKILL and
started again, a seeded kill schedule, the engines' own records of what they generated read as
they are written, the rule that says which repeated generation a kill explains, and the judge of
what one client saw of its answer across reconnects.

Times are seconds on one monotonic clock (:class:`Clock`), from the start of a run; each also
carries the wall time, to find it in the processes' logs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Child",
    "Clock",
    "Connection",
    "Explanation",
    "Generation",
    "Kill",
    "PlannedKill",
    "RecordTailer",
    "Verdict",
    "explain_generations",
    "judge_answer",
    "plan_kills",
    "report_deadline",
    "words",
]

_WORD = re.compile(r" [^ ]+")


def words(text: str) -> list[str]:
    """The synthetic tokens of a text (each a word with a leading space)."""
    return _WORD.findall(text)


class Clock:
    """Seconds since the run started (monotonic), and the wall time of such a moment."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wall(self, t: float) -> str:
        w = self.wall0 + t
        return time.strftime("%H:%M:%S", time.localtime(w)) + f".{int((w % 1) * 1000):03d}"


# ---------------------------------------------------------------------------------------- processes
@dataclass
class Child:
    """A child process in a process group of its own (so SIGKILL takes whatever it started too),
    its output appended to ``log`` with a line marking each start."""

    name: str
    kind: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, clock: Clock | None = None) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with open(self.log, "ab") as f:
            stamp = f" at t={clock.now():.3f}s" if clock is not None else ""
            f.write(f"===== {self.name}: start #{self.starts}{stamp} ({time.ctime()})\n".encode())
            self.proc = subprocess.Popen(
                self.argv,
                env=dict(self.env) if self.env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def kill(self) -> None:
        """SIGKILL to the whole process group, and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status (None if killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        # Gone already; its group may still hold something it started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------ the schedule
@dataclass(frozen=True, slots=True)
class PlannedKill:
    at: float  # seconds from the start of the run
    kind: str
    target: str
    restart_after: float  # seconds between the kill and the restart


@dataclass(slots=True)
class Kill:
    """A kill as it was carried out."""

    kind: str
    target: str
    planned_at: float
    killed_at: float
    pid: int
    restarted_at: float | None = None  # the process started again
    ready_at: float | None = None  # it serves again (where the caller checks; else None)


def plan_kills(
    seed: int,
    targets: Mapping[str, Sequence[str]],
    counts: Mapping[str, int],
    window: tuple[float, float],
    restart_after: tuple[float, float] = (0.2, 1.5),
) -> list[PlannedKill]:
    """A seeded schedule: ``counts[kind]`` kills of each kind, at uniform random times in
    ``window``, each of a random target of that kind, restarted after a uniform random delay.
    The same seed gives the same schedule."""
    rng = random.Random(seed)
    plan = []
    for kind in sorted(counts):
        for _ in range(counts[kind]):
            plan.append(
                PlannedKill(
                    round(rng.uniform(*window), 3),
                    kind,
                    rng.choice(list(targets[kind])),
                    round(rng.uniform(*restart_after), 3),
                )
            )
    return sorted(plan, key=lambda k: (k.at, k.kind, k.target))


# ------------------------------------------------------------------------------ the engines' records
@dataclass(frozen=True, slots=True)
class Generation:
    """One line of an engine's record: a generation it completed, seen at ``seen_at`` (within the
    tailer's polling interval of when it was written)."""

    request_id: str
    attempt: int
    generator: str
    seen_at: float


class RecordTailer:
    """Reads record files (``request_id attempt generator`` per line) as they grow, in a thread,
    noting when each line was first seen; a partial last line waits for its end. Poll it around a
    kill (:meth:`poll` with ``at``) so that what was written before the kill is dated before it,
    however slow the machine."""

    def __init__(self, paths: Iterable[Path], clock: Clock, interval_s: float = 0.05) -> None:
        self.paths = list(paths)
        self.clock = clock
        self.interval_s = interval_s
        self.generations: list[Generation] = []
        self.malformed: list[str] = []
        self._offsets = dict.fromkeys(self.paths, 0)
        self._partial = dict.fromkeys(self.paths, b"")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="record-tailer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[Generation]:
        """Stop, read what is left, and return every generation seen."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.poll()
        return list(self.generations)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Read what was written since the last read, dated now."""
        with self._lock:
            self._read(None)

    def around(self, action: Callable[[], None]) -> float:
        """Run ``action`` (a kill) between two reads, with nothing read meanwhile; returns the time
        taken just before it. What was written before the action is dated no later than that time,
        and what is written after it later, however slow the machine."""
        with self._lock:
            self._read(None)
            t = self.clock.now()
            action()
            self._read(t)
        return t

    def _read(self, at: float | None) -> None:
        new: list[tuple[Path, bytes]] = []
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[path])
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            self._offsets[path] += len(data)
            *lines, self._partial[path] = (self._partial[path] + data).split(b"\n")
            new += [(path, raw) for raw in lines]
        seen = self.clock.now() if at is None else at  # after the reads: no line is dated early
        for path, raw in new:
            parts = raw.decode(errors="replace").split()
            if len(parts) != 3 or not parts[1].isdigit():
                self.malformed.append(f"{path.name}: {raw!r}")
                continue
            self.generations.append(Generation(parts[0], int(parts[1]), parts[2], seen))


@dataclass(frozen=True, slots=True)
class Explanation:
    """A generation that was done again (``wasted``, then ``again``), and the kill that explains it
    (None: nothing does)."""

    wasted: Generation
    again: Generation
    kill: Kill | None


def report_deadline(
    t: float, outages: Sequence[tuple[float, float | None]], report_s: float, reconnect_s: float
) -> float:
    """By when the report of something that happened at ``t`` on an engine is journaled, at the
    latest: ``report_s`` later, unless the coordinator is down meanwhile; every outage that begins
    before that time and ends after ``t`` moves it to ``reconnect_s`` after the coordinator serves
    again (an agent reconnects with backoff, then sends what it kept). ``outages``: (killed,
    serving again; None: not yet)."""
    deadline = t + report_s
    changed = True
    while changed:
        changed = False
        for down, up in outages:
            end = float("inf") if up is None else up
            if down <= deadline and end >= t and end + reconnect_s > deadline:
                deadline, changed = end + reconnect_s, True
    return deadline


def explain_generations(
    generations: Sequence[Generation],
    kills: Sequence[Kill],
    lead: Callable[[Kill, Generation], float | None],
    *,
    coordinator_kind: str = "coordinator",
    report_s: float = 2.0,
    reconnect_s: float = 8.0,
) -> list[Explanation]:
    """Every generation of a request that another generation of it followed, with the kill that
    explains it. A kill explains generation ``g`` (seen at ``t``), later done again as ``g2``, when

    - ``lead(kill, g)`` is not None: the kill can have made ``g`` count for nothing (the caller
      decides: the kill of the process that generated it, of the agent in front of that engine, of
      the coordinator), and it may precede ``t`` by that many seconds (0 for the process that wrote
      the record, which cannot write after its death; more for an agent, whose engine may finish a
      generation after the agent died);
    - it happened no later than ``g2`` was seen, and before the report of ``g`` must have been
      journaled (:func:`report_deadline`: ``report_s`` after ``t``, or ``reconnect_s`` after the
      coordinator serves again when it was down meanwhile).

    Of several such kills, the most specific (not the coordinator's), then the closest to ``t``.
    Records must be dated as :meth:`RecordTailer.around` dates them.
    """
    outages = [(k.killed_at, k.ready_at or k.restarted_at) for k in kills if k.kind == coordinator_kind]
    by_request: dict[str, list[Generation]] = {}
    for g in generations:
        by_request.setdefault(g.request_id, []).append(g)
    out = []
    for gens in by_request.values():
        if len(gens) < 2:
            continue
        gens.sort(key=lambda g: (g.seen_at, g.attempt))
        for g, g2 in itertools.pairwise(gens):
            latest = min(g2.seen_at, report_deadline(g.seen_at, outages, report_s, reconnect_s))
            candidates = []
            for k in kills:
                ahead = lead(k, g)
                if ahead is not None and g.seen_at - ahead <= k.killed_at <= latest:
                    candidates.append(k)
            best = min(
                candidates,
                key=lambda k: (k.kind == coordinator_kind, abs(k.killed_at - g.seen_at)),
                default=None,
            )
            out.append(Explanation(g, g2, best))
    return out


# ----------------------------------------------------------------------------- what a client saw
@dataclass(slots=True)
class Connection:
    """One connection of a client to its request's output: the chunks in the order received
    (``index`` None where the protocol does not number them: the text is placed after what came
    before), and how it ended."""

    opened_at: float
    chunks: list[tuple[int | None, int, str]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    end_index: int | None = None  # where the end marker says the answer ends, if it says
    usage_tokens: int | None = None
    error: str = ""
    closed_at: float = 0.0


@dataclass(slots=True)
class Verdict:
    answered_once: bool
    duplicated: bool  # some position reached the client twice on one connection, or two answers
    incomplete: bool  # no connection delivered the whole answer
    problems: list[str]


def judge_answer(
    expected: Sequence[str],
    connections: Sequence[Connection],
    interruption_explained: Callable[[Connection], bool],
    finish_reasons: Iterable[str] = ("length", "stop"),
) -> Verdict:
    """Whether a client received its answer exactly once. A client holds the request's id; each
    (re)connection reads the output from position 0. It received the answer exactly once when

    - on every connection, each chunk starts where the one before ended (position 0 first) and
      carries exactly the expected tokens at its positions: no position twice, none skipped, no
      other text (so what two connections say of one position is the same);
    - exactly one connection ends with the end of the answer, it is the last one, at position
      ``len(expected)``, with a finish reason of ``finish_reasons`` (and its usage, when given,
      counts ``len(expected)`` tokens);
    - every connection before it broke off (an error, no end), and each break is one the caller
      explains (the coordinator was killed).
    """
    reasons = set(finish_reasons)
    n = len(expected)
    problems: list[str] = []
    duplicated = False
    whole = False  # some connection delivered the answer up to its end
    for ci, conn in enumerate(connections):
        pos = 0
        for index, tokens, text in conn.chunks:
            at = pos if index is None else index
            if at != pos:
                problems.append(f"connection {ci}: chunk at position {at}, expected {pos}")
                duplicated |= at < pos
            got = words(text)
            if len(got) != tokens:
                problems.append(
                    f"connection {ci}: chunk at {at} says {tokens} tokens, carries {len(got)} words"
                )
            if got != list(expected[at : at + len(got)]):
                earlier = any(
                    got == list(expected[q : q + len(got)]) for q in range(0, max(0, pos - len(got) + 1))
                )
                duplicated |= earlier and bool(got)
                problems.append(
                    f"connection {ci}: chunk at {at} is not the expected text"
                    + (" (it repeats text delivered before)" if earlier else "")
                    + f": {text[:60]!r}"
                )
            pos = max(pos, at) + len(got)
        if conn.finished:
            whole |= pos == n
            if ci != len(connections) - 1:
                problems.append(f"connection {ci} ended the answer, and the client connected again")
            if pos != n:
                problems.append(f"connection {ci} ended the answer at position {pos}, expected {n}")
            if conn.finish_reason not in reasons:
                problems.append(f"connection {ci} ended with finish reason {conn.finish_reason!r}")
            if conn.end_index is not None and conn.end_index != n:
                problems.append(
                    f"connection {ci}: the end marker is at position {conn.end_index}, expected {n}"
                )
            if conn.usage_tokens is not None and conn.usage_tokens != n:
                problems.append(f"connection {ci}: usage says {conn.usage_tokens} tokens, expected {n}")
        elif not conn.error:
            problems.append(f"connection {ci} ended without the end of the answer and without an error")
        elif not interruption_explained(conn):
            problems.append(
                f"connection {ci} broke off ({conn.error}) with no coordinator kill to explain it"
            )
    ends = sum(c.finished for c in connections)
    if ends > 1:
        duplicated = True
        problems.append(f"{ends} connections delivered an end of the answer")
    incomplete = not whole
    if ends == 0:
        problems.append("no connection delivered the end of the answer")
    return Verdict(not problems, duplicated, incomplete, problems)
