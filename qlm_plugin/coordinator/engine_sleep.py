"""How one engine that shares a device goes to sleep and wakes up, for :mod:`.devices`.

A sleep is a serving operation sent to the engine (``unload_model``: vLLM's sleep at level 1 or 2,
or a pause on CPU), except a cold sleep of an engine without sleep mode (vLLM on CPU): an
:class:`EngineControl` (``qlm serve``'s supervisor) stops its server, and the engine is kept as
*parked*, its last session standing for it. A wake is ``load_model``, or for a parked engine its
server started again; it is awake once the server answers and its agent has registered again.

Each step is named by a token (a command's id, ``stop:ID``, ``start:ID``) that the caller waits on;
the step's end calls ``done(session, token, op, error)`` (error None: it succeeded), never from
inside the call that began it. What an acknowledged step changed is marked on the engine's report
at once, and a report made before the step, arriving after it, does not undo it. Not thread-safe:
the coordinator's event loop owns it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Generic, Protocol, TypeVar

from qlm_plugin.domain.instance import InstanceState

log = logging.getLogger("qlm_plugin.coordinator")

#: How long an acknowledged sleep or wake outranks the engine's reports, seconds (a report made
#: before the command can arrive after its acknowledgement).
EXPECT_S = 5.0


class Member(Protocol):
    """What a device reads of an engine's session (``instances.Session``, which holds the devices)."""

    instance_id: str
    backend: str
    gpu: str
    capabilities: frozenset[str]
    report: InstanceState | None
    alive: bool

    @property
    def assigned(self) -> Mapping[str, int]: ...  # request id -> attempt, not finished

    @property
    def pending(self) -> Mapping[str, object]: ...  # command id -> the command not acknowledged


class EngineControl(Protocol):
    """Stops and starts engines' servers, for a cold sleep where an engine has no sleep mode (vLLM on
    CPU). ``qlm serve``'s supervisor of its engines is one. Called on the coordinator's event loop."""

    def stop_engine(self, instance_id: str, done: Callable[[str | None], None]) -> bool:
        """Stop the engine's server; ``done(None)`` once it has exited, ``done(error)`` if it could
        not be stopped (later, never inside this call). False (and no call of ``done``): not an
        engine this control runs, or one that sleeps cold on its own (sleep mode): it is sent
        ``unload_model``."""
        ...

    def start_engine(self, instance_id: str, done: Callable[[str | None], None]) -> bool:
        """Start the stopped engine's server again under its instance id (its agent registers as
        any engine's does); ``done(None)`` once it answers requests, ``done(error)`` if it ends or
        fails first. False (and no call of ``done``): not an engine this control runs."""
        ...


Session = TypeVar("Session", bound=Member)
#: A step ended: (the engine's session, the step's token, its operation, the error or None); what
#: it returns is not used.
Done = Callable[[Session, str, str, "str | None"], object]


def awake(s: Member) -> bool:
    return s.report is not None and bool(s.report.models_loaded)


def device_of(s: Member) -> str:
    return s.report.device if s.report is not None else ""


class EngineSleep(Generic[Session]):
    """Sleeps and wakes the engines among ``sessions`` (instance id -> live session); ``send``
    sends a serving operation (session, op, model, keep warm) and returns its command id."""

    def __init__(
        self,
        sessions: dict[str, Session],
        send: Callable[[Session, str, str, bool], str],
        done: Done[Session],
    ) -> None:
        self.sessions = sessions
        self.send = send
        self.done = done
        self.keep_warm = True  # sleep level 1 (weights kept in host memory); False: cold
        #: stops and starts engines without sleep mode, to sleep them cold (None: they only pause)
        self.control: EngineControl | None = None
        self.parked: dict[str, Session] = {}  # instance id -> last session of an engine stopped cold
        self._stopping: set[str] = set()  # instance ids whose servers are being stopped
        self._starting: dict[str, bool] = {}  # parked engines being started -> their servers answer
        self._expected: dict[str, tuple[bool, bool, float]] = {}  # id -> (awake, warm, until)

    # ------------------------------------------------------------------ steps
    def sleep(self, s: Session) -> str:
        """Put ``s`` to sleep; the token of the step."""
        iid = s.instance_id
        token = f"stop:{iid}"
        stop = self.control.stop_engine if self.control is not None and not self.keep_warm else None
        if stop is not None and stop(iid, lambda error: self._stopped(s, token, error)):
            self._stopping.add(iid)
            return token
        return self.send(s, "unload_model", model_of(s), self.keep_warm)

    def wake(self, s: Session, model: str) -> str | None:
        """Wake ``s`` to serve ``model``; the token of the step, None if ``s`` is parked and its
        control cannot start it."""
        iid = s.instance_id
        if iid not in self.parked:
            return self.send(s, "load_model", model, False)
        token = f"start:{iid}"
        if self.control is None or not self.control.start_engine(
            iid, lambda error: self._started(iid, token, error)
        ):
            return None
        self._starting[iid] = False
        log.info("device %s: starting %s (stopped cold)", device_of(s), iid)
        return token

    def acknowledged(self, s: Session, op: str) -> None:
        """A sleep or wake of ``s`` succeeded: its report says so at once."""
        if op == "stop":
            return  # parked and marked already
        self.mark(s, awake=op in ("load_model", "start"), warm=self.keep_warm)

    def _stopped(self, s: Session, token: str, error: str | None) -> None:
        iid = s.instance_id
        self._stopping.discard(iid)
        if error is None:
            self.mark(s, awake=False, warm=False)
            self.parked[iid] = s
            log.info("device %s: %s stopped (cold)", device_of(s), iid)
        self.done(s, token, "stop", error)

    def _started(self, iid: str, token: str, error: str | None) -> None:
        if iid not in self._starting:
            return
        if error is None:
            self._starting[iid] = True
            self.check_started(iid)
            return
        del self._starting[iid]
        parked = self.parked.get(iid)
        if parked is not None:
            self.done(parked, token, "start", error)

    def check_started(self, iid: str) -> None:
        """A started engine is awake once its server answers and its agent has registered, awake
        (called as each of those happens: the control's word, a registration, a report)."""
        s = self.sessions.get(iid)
        if not self._starting.get(iid) or s is None or not s.alive or not awake(s):
            return
        del self._starting[iid]
        self.parked.pop(iid, None)
        self.done(s, f"start:{iid}", "start", None)

    # ------------------------------------------------------------------ what an engine is
    def asleep(self, iid: str) -> bool:
        """Whether the engine sleeps, or is stopped for a cold sleep."""
        s = self.sessions.get(iid)
        return iid in self.parked or (s is not None and s.alive and not awake(s))

    def stopped_cold(self, s: Member) -> bool:
        """Whether ``s``'s server was stopped (or is being stopped) to sleep it cold."""
        return s.instance_id in self.parked or s.instance_id in self._stopping

    def mark(self, s: Session, *, awake: bool, warm: bool) -> None:
        """What the engine's next report will say, at once (a switch goes on without waiting for
        it); a report made before the step, arriving after it, does not undo it (:meth:`reported`)."""
        rep = s.report
        if rep is None:
            return
        model = (rep.models_loaded or rep.models_warm or rep.models_servable or ("",))[0]
        asleep = (model,) if warm else ()
        s.report = replace(rep, models_loaded=(model,) if awake else (), models_warm=() if awake else asleep)
        self._expected[s.instance_id] = (awake, warm, time.monotonic() + EXPECT_S)

    def joined(self, s: Session) -> None:
        """``s`` registered: a new process (a restart) or a new connection, whose first report is
        made now. What a step acknowledged by the one before expected no longer holds against it: a
        restarted engine is awake, whatever its last session was told."""
        self._expected.pop(s.instance_id, None)
        self.check_started(s.instance_id)

    def reported(self, s: Session) -> None:
        """An engine's state report arrived: one that contradicts a step it acknowledged lately
        was made before that step, and is corrected."""
        expected = self._expected.get(s.instance_id)
        if expected is None or s.report is None:
            return
        want_awake, warm, until = expected
        if awake(s) == want_awake or time.monotonic() > until:
            del self._expected[s.instance_id]  # confirmed (or too old to hold against the engine)
            return
        self.mark(s, awake=want_awake, warm=warm)
        self._expected[s.instance_id] = expected


def model_of(s: Member) -> str:
    """The model an engine serves (one engine per model)."""
    rep = s.report
    return (rep.models_loaded or rep.models_servable or ("",))[0] if rep is not None else ""
