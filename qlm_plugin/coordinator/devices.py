"""Engines that share a device, shown to the queue manager as one instance that swaps models.

vLLM serves one model per engine. Several engines on one GPU cannot all hold their weights and KV
cache: one is awake, the others sleep (level 1: weights in host memory, a warm swap; level 2:
weights dropped, a cold one; paused on CPU, where sleep mode does not exist). Each such engine
reports the ``device`` it shares; the coordinator then presents the device to the queue manager as
one instance whose loaded model is the awake engine's and whose warm models are the sleeping
engines', the instance the planner and the simulator already know how to plan swaps for. A load the
planner orders there is carried out as a switch:

1. drain: no new request goes to the device; the awake engine finishes what it runs;
2. sleep the awake engine (``unload_model``, kept warm unless the device's engines sleep cold);
3. wake the target model's engine (``load_model``); the device serves that model from then on.

One switch runs at a time per device: a load of another model ordered meanwhile is accepted and
asked again after it (by the planner's next plan, or the request still parked), so requests of two
models arriving in turns cannot make the device swap back and forth inside a switch. A step that
fails ends the switch and reports the load as failed (the planner places the model's
work elsewhere for a while). At start all engines are awake: every engine but one (the one holding
work) is put to sleep as soon as it holds no request. Not thread-safe: the coordinator's event
loop owns it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

from qlm_plugin.domain.instance import InstanceInfo, InstanceState
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb


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


log = logging.getLogger("qlm_plugin.coordinator")

Session = TypeVar("Session", bound=Member)

#: How long an acknowledged sleep or wake outranks the engine's reports, seconds (a report made
#: before the command can arrive after its acknowledgement).
EXPECT_S = 5.0
#: How long a start-up sleep that failed waits before it is tried again, seconds.
SETTLE_RETRY_S = 2.0


@dataclass
class Switch:
    """A device swapping to ``model``; ``waiting``: the command ids of the step under way."""

    model: str
    started_at: float
    phase: str = "draining"  # draining -> sleeping -> waking
    waiting: set[str] = field(default_factory=set)


def awake(s: Session) -> bool:
    return s.report is not None and bool(s.report.models_loaded)


class Devices(Generic[Session]):
    """The device groups among ``sessions`` (instance id -> live session)."""

    def __init__(
        self,
        sessions: dict[str, Session],
        send: Callable[[Session, str, str, bool], str],
        *,
        keep_warm: bool = True,
    ) -> None:
        self.sessions = sessions
        self.send = send
        self.keep_warm = keep_warm
        self.switches: dict[str, Switch] = {}
        self.switches_done = 0  # completed switches, all devices
        self.settling: set[str] = set()  # sleep commands of the start-up settling, by command id
        self._settle_after: dict[str, float] = {}  # instance id -> no settling sleep before (monotonic)
        self._expected: dict[str, tuple[bool, bool, float]] = {}  # id -> (awake, warm, until) acknowledged
        #: A switch failed: (device, model, error); the coordinator tells the queue manager.
        self.on_failed: Callable[[str, str, str], None] = lambda device, model, error: None
        #: A device's serving model changed: the coordinator refreshes the queue manager's view.
        self.on_changed: Callable[[str], None] = lambda device: None

    # ------------------------------------------------------------------ membership
    @staticmethod
    def device_of(s: Session) -> str:
        return s.report.device if s.report is not None else ""

    def members(self, device: str) -> list[Session]:
        return sorted(
            (s for s in self.sessions.values() if s.alive and self.device_of(s) == device),
            key=lambda s: s.instance_id,
        )

    def names(self) -> list[str]:
        return sorted({d for s in self.sessions.values() if s.alive and (d := self.device_of(s))})

    def brain_id(self, instance_id: str) -> str:
        """The id the queue manager knows an instance by: its device's, if it shares one."""
        s = self.sessions.get(instance_id)
        return (self.device_of(s) or instance_id) if s is not None else instance_id

    def info(self, device: str) -> InstanceInfo | None:
        members = self.members(device)
        if not members:
            return None
        first = members[0]
        return InstanceInfo(
            device, first.backend, first.gpu, frozenset.intersection(*(m.capabilities for m in members))
        )

    def member_for(self, device: str, request_id: str) -> Session | None:
        return next((s for s in self.members(device) if request_id in s.assigned), None)

    # ------------------------------------------------------------------ the queue manager's view
    def state(
        self, device: str, member_state: Callable[[Session], InstanceState | None]
    ) -> InstanceState | None:
        """The device as one instance: the awake engine's state (its counts, its step timings),
        the sleeping engines' models as warm ones, the switch's target as the model loading."""
        members = self.members(device)
        if not members:
            return None
        switch = self.switches.get(device)
        up = [s for s in members if awake(s)]
        serving = self._keeper(up)
        base = member_state(serving) if serving is not None else member_state(members[0])
        if base is None:
            return None
        loaded: tuple[str, ...] = (
            serving.report.models_loaded[:1] if serving is not None and serving.report else ()
        )
        if switch is not None and switch.phase != "draining":
            loaded = ()  # its engine is going to sleep
        warm = tuple(
            m for s in members if s is not serving for m in (s.report.models_warm if s.report else ())
        )
        servable = tuple(m for s in members for m in (s.report.models_servable if s.report else ()))
        # engines still awake beside it (settling at start) finish their requests: counted
        others = [st for s in up if s is not serving and (st := member_state(s)) is not None]
        return replace(
            base,
            instance_id=device,
            models_loaded=loaded,
            models_warm=warm,
            models_servable=servable,
            loading_model=switch.model if switch is not None else None,
            num_running=base.num_running + sum(o.num_running + o.num_waiting for o in others),
            healthy=any(s.report is not None and s.report.healthy for s in members),
        )

    def target(self, device: str, model: str) -> Session | None:
        """The member a request of ``model`` goes to now: the awake engine serving it, unless the
        device is switching."""
        if device in self.switches:
            return None
        for s in self.members(device):
            if awake(s) and s.report is not None and model in s.report.models_loaded:
                return s
        return None

    @staticmethod
    def _keeper(up: Iterable[Session]) -> Session | None:
        """Of the awake engines, the one that stays awake: the one holding most work."""
        return max(up, key=lambda s: (len(s.assigned), s.instance_id), default=None)

    # ------------------------------------------------------------------ switching
    def load(self, device: str, model: str) -> bool:
        """Start switching ``device`` to ``model`` (False: no engine of it serves that model)."""
        members = self.members(device)
        if not any(s.report is not None and model in s.report.models_servable for s in members):
            return False
        if device in self.switches:
            return True  # one switch at a time: a load of another model is asked again after it
        if self.target(device, model) is not None:
            return True  # serving it already
        self.switches[device] = Switch(model, time.time())
        log.info("device %s: switching to %s", device, model)
        self.step(device)
        return True

    def step(self, device: str) -> None:
        """Move the device's switch (or its start-up settling) on as far as it can go now."""
        members = self.members(device)
        switch = self.switches.get(device)
        up = [s for s in members if awake(s)]
        if switch is None:
            keeper = self._keeper(up)
            now = time.monotonic()
            for s in up:
                if s is keeper or s.assigned or self._pending_sleep(s):
                    continue
                if now < self._settle_after.get(s.instance_id, 0.0):
                    continue
                self._settle_after[s.instance_id] = now + SETTLE_RETRY_S
                self.settling.add(self.send(s, "unload_model", self._model(s), self.keep_warm))
            return
        if switch.phase != "draining":
            return
        engine = next(
            (s for s in members if s.report is not None and switch.model in s.report.models_servable), None
        )
        if engine is None:
            self._fail(device, switch, "no engine of the device serves it any more")
            return
        others = [s for s in up if s is not engine]
        if any(s.assigned for s in others):
            return  # the awake engine finishes its requests first
        if others:
            switch.phase = "sleeping"
            switch.waiting = {self.send(s, "unload_model", self._model(s), self.keep_warm) for s in others}
        else:
            self._wake(device, switch, engine)

    def _wake(self, device: str, switch: Switch, engine: Session) -> None:
        if awake(engine):
            self._done(device, switch, switched=False)  # nothing to wake: its engine is up
            return
        switch.phase = "waking"
        switch.waiting = {self.send(engine, "load_model", switch.model, False)}

    def on_ack(self, s: Session, command_id: str, op: str, ack: pb.CommandAck) -> bool:
        """An engine acknowledged a command; True if it was one of a device's switch (handled)."""
        device = self.device_of(s)
        if not device:
            return False
        if command_id in self.settling:
            self.settling.discard(command_id)
            if ack.ok:
                self._mark(s, awake=False, warm=self.keep_warm)
            else:  # an engine registers before its HTTP server is up: tried again shortly
                log.info("device %s: %s did not go to sleep yet: %s", device, s.instance_id, ack.error)
            self.on_changed(device)
            return True
        switch = self.switches.get(device)
        if switch is None or command_id not in switch.waiting:
            return False
        switch.waiting.discard(command_id)
        if not ack.ok:
            self._fail(device, switch, f"{op} on {s.instance_id}: {ack.error}")
            return True
        self._mark(s, awake=op == "load_model", warm=self.keep_warm)
        if switch.waiting:
            return True
        if switch.phase == "sleeping":
            engine = next(
                (
                    m
                    for m in self.members(device)
                    if m.report is not None and switch.model in m.report.models_servable
                ),
                None,
            )
            if engine is None:
                self._fail(device, switch, "its engine left")
            else:
                self._wake(device, switch, engine)
        elif switch.phase == "waking":
            self._done(device, switch)
        return True

    def left(self, s: Session) -> None:
        """A member left: a switch waiting on it cannot finish."""
        device = self.device_of(s)
        switch = self.switches.get(device)
        if switch is not None and switch.phase != "draining":
            self._fail(device, switch, f"{s.instance_id} left")

    def _pending_sleep(self, s: Session) -> bool:
        return any(cid in self.settling for cid in s.pending)

    @staticmethod
    def _model(s: Session) -> str:
        rep = s.report
        return (rep.models_loaded or rep.models_servable or ("",))[0] if rep is not None else ""

    def _mark(self, s: Session, *, awake: bool, warm: bool) -> None:
        """What the engine's next report will say, at once (the switch goes on without waiting for it);
        a report made before the command, arriving after it, does not undo it (:meth:`reported`)."""
        rep = s.report
        if rep is None:
            return
        model = (rep.models_loaded or rep.models_warm or rep.models_servable or ("",))[0]
        asleep = (model,) if warm else ()
        s.report = replace(rep, models_loaded=(model,) if awake else (), models_warm=() if awake else asleep)
        self._expected[s.instance_id] = (awake, warm, time.monotonic() + EXPECT_S)

    def reported(self, s: Session) -> None:
        """An engine's state report arrived: one that contradicts a command it acknowledged lately
        was made before that command, and is corrected."""
        expected = self._expected.get(s.instance_id)
        if expected is None or s.report is None:
            return
        want_awake, warm, until = expected
        if awake(s) == want_awake or time.monotonic() > until:
            del self._expected[s.instance_id]  # confirmed (or too old to hold against the engine)
            return
        self._mark(s, awake=want_awake, warm=warm)
        self._expected[s.instance_id] = expected

    def _done(self, device: str, switch: Switch, *, switched: bool = True) -> None:
        self.switches.pop(device, None)
        self.switches_done += switched
        log.info(
            "device %s: serving %s (switched in %.3f s)",
            device,
            switch.model,
            time.time() - switch.started_at,
        )
        self.on_changed(device)

    def _fail(self, device: str, switch: Switch, error: str) -> None:
        self.switches.pop(device, None)
        log.warning("device %s: switch to %s failed: %s", device, switch.model, error)
        self.on_failed(device, switch.model, error)
        self.on_changed(device)
