"""Engines that share a device, shown to the queue manager as instances that swap models.

vLLM serves one model per engine. Several engines on one GPU cannot all hold their weights and KV
cache: at most K are awake (the device's budget, config ``device_max_awake``), the others sleep
(level 1: weights in host memory, a warm swap; level 2: weights dropped, a cold one; on CPU, where
sleep mode does not exist, paused for a warm swap, its server stopped for a cold one: an
:class:`~.engine_sleep.EngineControl`, ``qlm serve``'s supervisor, stops and starts it: how one
engine sleeps and wakes is :mod:`.engine_sleep`). Each such engine reports the ``device`` it shares;
the coordinator presents the device to the queue manager as K **slots**, each an instance that holds
one model at a time: its loaded model is the awake engine's in it, its warm models are the sleeping
engines' (those no other slot is waking). The planner and the simulator already know how to plan
swaps for such instances. A slot is named as its device when K is 1, else ``DEVICE#j``. A load the
planner orders on a slot is carried out as a switch:

1. drain: no new request goes to the slot; its awake engine finishes what it runs;
2. sleep that engine (``unload_model``, kept warm unless the device's engines sleep cold; an engine
   without sleep mode sleeping cold is stopped, and kept as a *parked* member of its device);
3. wake the target model's engine (``load_model``; a parked one is started and serves once it has
   registered again); the slot serves that model from then on.

So a device never has more than K engines awake after start. One switch runs at a time per slot: a
load of another model ordered meanwhile is accepted and asked again after it (by the planner's next
plan, or the request still parked), so requests of two models arriving in turns cannot make a slot
swap back and forth inside a switch. A step that fails ends the switch and reports the load as
failed (the planner places the model's work elsewhere for a while). At start all engines are awake:
the K holding most work keep a slot each, every other one is put to sleep as soon as it holds no
request (``qlm serve`` may instead start them one after another, putting each to sleep before the
next starts: :meth:`Devices.sleep_engine`). Not thread-safe: the coordinator's event loop owns it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from qlm_plugin.coordinator.engine_sleep import EngineSleep, Member, awake, device_of
from qlm_plugin.domain.instance import InstanceInfo, InstanceState
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

log = logging.getLogger("qlm_plugin.coordinator")

Session = TypeVar("Session", bound=Member)

#: How long a start-up sleep that failed waits before it is tried again, seconds.
SETTLE_RETRY_S = 2.0
#: Between a device's name and a slot's number, when a device has more than one slot.
SLOT_SEP = "#"
#: A device's swap time is the median of its last switches (the first of an engine can be slow).
SWAP_SAMPLES = 5
#: How long a stopped engine has to start and register again before its switch fails, seconds.
START_TIMEOUT_S = 900.0
#: How long a sleep or wake step may go unanswered before its switch fails (the agent gives the
#: engine 600 s; an acknowledgement sent on a session that an agent's reconnect replaced is lost).
STEP_TIMEOUT_S = 660.0
#: After a failed switch to a model, how long a request of it waits before it may wake an engine
#: again (without a queue manager: each failure re-admitted its parked requests, which switched
#: again at once, 8,000 times in 6 s, putting the healthy model to sleep each time): doubling.
WAKE_BACKOFF_S = (5.0, 60.0)


@dataclass
class Switch:
    """A slot swapping to ``model`` by waking ``engine`` (an instance id, claimed: no other slot
    wakes it); ``waiting``: the command ids of the step under way."""

    model: str
    engine: str
    started_at: float
    phase: str = "draining"  # draining -> sleeping -> waking
    waiting: set[str] = field(default_factory=set)
    swap_started: float = 0.0  # monotonic, when it stopped draining: the swap proper
    deadline: float = 0.0  # monotonic: a stopped engine started for it must have registered by then
    step_deadline: float = 0.0  # monotonic: the sleep or wake under way must be answered by then


def serves(s: Member, model: str) -> bool:
    return s.report is not None and model in s.report.models_servable


class Devices(Generic[Session]):
    """The device groups among ``sessions`` (instance id -> live session)."""

    def __init__(
        self,
        sessions: dict[str, Session],
        send: Callable[[Session, str, str, bool], str],
        *,
        keep_warm: bool = True,
        max_awake: int = 1,
    ) -> None:
        self.sessions = sessions
        self.max_awake = max_awake  # K: engines awake at once on each device
        #: how an engine sleeps and wakes (its ``keep_warm``: the sleep level; its ``control``:
        #: stops and starts engines without sleep mode for a cold sleep)
        self.sleep: EngineSleep[Session] = EngineSleep(sessions, send, self._step_done)
        self.sleep.keep_warm = keep_warm
        self.switches: dict[str, Switch] = {}  # slot -> its switch under way
        self.occupant: dict[str, str] = {}  # slot -> instance id of the awake engine it holds
        self.switches_done = 0  # completed switches, all devices
        self.held: set[str] = set()  # devices whose switches wait: their engines are starting
        self.swap_times: dict[str, list[float]] = {}  # device -> its last switches' sleep + wake, s
        self.settling: set[str] = set()  # sleep commands of the start-up settling, by command id
        self._settle_after: dict[str, float] = {}  # instance id -> no settling sleep before (monotonic)
        #: engines asked to sleep while holding requests: unseated, they sleep once those finish
        self.retiring: dict[str, Session] = {}
        #: (device, model) -> (no wake for it before, the next backoff): after failed switches
        self._wake_backoff: dict[tuple[str, str], tuple[float, float]] = {}
        #: (device, model) -> the error of its last switch, while the switches to it fail
        self.failing_wakes: dict[tuple[str, str], str] = {}
        #: A switch failed: (slot, model, error); the coordinator tells the queue manager.
        self.on_failed: Callable[[str, str, str], None] = lambda slot, model, error: None
        #: A slot's serving model changed: the coordinator refreshes the queue manager's view.
        self.on_changed: Callable[[str], None] = lambda slot: None

    # ------------------------------------------------------------------ membership
    @property
    def parked(self) -> dict[str, Session]:
        """Engines stopped for a cold sleep: instance id -> the last session of each."""
        return self.sleep.parked

    @staticmethod
    def device_of(s: Member) -> str:
        return device_of(s)

    def members(self, device: str) -> list[Session]:
        """The device's engines: those connected, and those stopped cold (parked)."""
        found = {iid: s for iid, s in self.parked.items() if self.device_of(s) == device}
        for s in self.sessions.values():
            if s.alive and self.device_of(s) == device and s.instance_id not in found:
                found[s.instance_id] = s
        return [found[iid] for iid in sorted(found)]

    def names(self) -> list[str]:
        """The devices with a live or parked engine."""
        engines = [s for s in self.sessions.values() if s.alive] + list(self.parked.values())
        return sorted({d for s in engines if (d := self.device_of(s))})

    def slots_of(self, device: str) -> list[str]:
        if self.max_awake == 1:
            return [device]
        return [f"{device}{SLOT_SEP}{j}" for j in range(self.max_awake)]

    def slots(self) -> list[str]:
        """Every slot of every device: the instance ids the queue manager knows devices by."""
        return [slot for device in self.names() for slot in self.slots_of(device)]

    def is_slot(self, instance_id: str) -> bool:
        return self.device_of_slot(instance_id) in self.names()

    def device_of_slot(self, slot: str) -> str:
        return slot if self.max_awake == 1 else slot.rpartition(SLOT_SEP)[0]

    def brain_id(self, instance_id: str) -> str:
        """The id the queue manager knows an instance by: its slot's, if it shares a device."""
        s = self.sessions.get(instance_id)
        device = self.device_of(s) if s is not None else ""
        if not device:
            return instance_id
        for slot in self.slots_of(device):
            if self.occupant.get(slot) == instance_id:
                return slot
        return next(
            (slot for slot, sw in self.switches.items() if sw.engine == instance_id), self.slots_of(device)[0]
        )

    def info(self, slot: str) -> InstanceInfo | None:
        members = self.members(self.device_of_slot(slot))
        if not members:
            return None
        first = members[0]
        return InstanceInfo(
            slot, first.backend, first.gpu, frozenset.intersection(*(m.capabilities for m in members))
        )

    def member_for(self, slot: str, request_id: str) -> Session | None:
        return next((s for s in self.members(self.device_of_slot(slot)) if request_id in s.assigned), None)

    def switching(self, s: Member) -> bool:
        """Whether ``s`` is the engine being drained, put to sleep or woken by a switch."""
        return any(
            sw.engine == s.instance_id or self.occupant.get(slot) == s.instance_id
            for slot, sw in self.switches.items()
        )

    def wake_error(self, model: str) -> str | None:
        """While every device engine that can serve ``model`` sleeps and the last switch to it on
        each of their devices failed: the last error (its requests are then unserved, and fail past
        their deadline rather than wait for ever on retries that keep failing); else None."""
        if not self.failing_wakes:  # the usual case
            return None
        error = None
        for device in self.names():
            able = [s for s in self.members(device) if s.report is not None and s.report.can_serve(model)]
            if not able:
                continue
            if any(s.alive and model in s.report.models_loaded for s in able if s.report is not None):
                return None
            error = self.failing_wakes.get((device, model))
            if error is None:
                return None
        return error

    def takes_work(self, s: Session) -> bool:
        """Whether new requests may go to ``s`` (without a queue manager, which plans this): not an
        engine a switch is moving, being put to sleep, or asked to sleep once its requests end."""
        if not self.device_of(s):
            return True
        return not (self.switching(s) or s.instance_id in self.retiring or self._pending_sleep(s))

    # ------------------------------------------------------------------ slots
    def _assign(self, device: str) -> list[Session]:
        """Keep each slot's occupant current (a slot whose engine went to sleep or left is free; a free
        slot takes an awake engine without one, the one holding most work first); returns the awake
        engines left without a slot (to be put to sleep)."""
        members = self.members(device)
        up = {s.instance_id: s for s in members if awake(s) and not self._pending_sleep(s)}
        for rid, r in list(self.retiring.items()):
            if self.sessions.get(rid) is not r or not r.alive or not awake(r):
                del self.retiring[rid]  # asleep (or gone): seated again once woken
        slots = self.slots_of(device)
        for slot in slots:
            iid = self.occupant.get(slot)
            if iid is not None and (iid not in up or iid in self.retiring) and not self._going_to_sleep(slot):
                del self.occupant[slot]
        seated = set(self.occupant.values())
        claimed = {sw.engine for sw in self.switches.values()}  # a switch seats its engine itself
        loose = sorted(
            (s for iid, s in up.items() if iid not in seated),
            key=lambda s: (s.instance_id in claimed, -len(s.assigned), s.instance_id),
        )
        seatable = [s for s in loose if s.instance_id not in claimed and s.instance_id not in self.retiring]
        for slot in slots:
            free = slot not in self.occupant and slot not in self.switches
            if free and seatable:
                engine = seatable.pop(0)
                loose.remove(engine)
                self.occupant[slot] = engine.instance_id
        return loose

    def _going_to_sleep(self, slot: str) -> bool:
        sw = self.switches.get(slot)
        return sw is not None and sw.phase == "sleeping"

    def _occupant(self, slot: str) -> Session | None:
        iid = self.occupant.get(slot)
        s = self.sessions.get(iid) if iid is not None else None
        return s if s is not None and s.alive else None

    def _sleepers(self, slot: str) -> list[Session]:
        """The device's sleeping engines this slot may wake: those no other slot holds or wakes."""
        device = self.device_of_slot(slot)
        taken = set(self.occupant.values()) | {
            sw.engine for other, sw in self.switches.items() if other != slot
        }
        return [s for s in self.members(device) if not awake(s) and s.instance_id not in taken]

    # ------------------------------------------------------------------ the queue manager's view
    def state(
        self, slot: str, member_state: Callable[[Session], InstanceState | None]
    ) -> InstanceState | None:
        """The slot as one instance: its awake engine's state (its counts, its step timings), the
        sleeping engines' models as warm ones, the switch's target as the model loading."""
        device = self.device_of_slot(slot)
        members = self.members(device)
        if not members:
            return None
        loose = self._assign(device)
        switch = self.switches.get(slot)
        serving = self._occupant(slot)
        sleepers = self._sleepers(slot)
        base = member_state(serving) if serving is not None else member_state((sleepers or members)[0])
        if base is None:
            return None
        loaded: tuple[str, ...] = ()
        if serving is not None and serving.report is not None and awake(serving):
            loaded = serving.report.models_loaded[:1]
        if switch is not None and switch.phase != "draining":
            loaded = ()  # its engine is going to sleep
        warm = tuple(m for s in sleepers for m in (s.report.models_warm if s.report else ()))
        mine = ([serving] if serving is not None else []) + sleepers
        servable = tuple(m for s in mine for m in (s.report.models_servable if s.report else ()))
        # engines still awake without a slot (settling at start) finish their requests: counted
        # on the first slot
        others = (
            [st for s in loose if (st := member_state(s)) is not None]
            if slot == self.slots_of(device)[0]
            else []
        )
        return replace(
            base,
            instance_id=slot,
            models_loaded=loaded,
            models_warm=warm,
            models_servable=servable,
            loading_model=switch.model if switch is not None else None,
            num_running=base.num_running + sum(o.num_running + o.num_waiting for o in others),
            healthy=any(s.report is not None and s.report.healthy for s in members),
            device=device,
            swap_s=statistics.median(self.swap_times[device]) if self.swap_times.get(device) else 0.0,
        )

    def target(self, slot: str, model: str) -> Session | None:
        """The engine a request of ``model`` goes to now: the slot's awake engine, if it serves that
        model and the slot is not switching."""
        if slot in self.switches:
            return None
        self._assign(self.device_of_slot(slot))
        s = self._occupant(slot)
        if s is not None and awake(s) and s.report is not None and model in s.report.models_loaded:
            return s
        return None

    # ------------------------------------------------------------------ switching
    def load(self, slot: str, model: str) -> bool:
        """Start switching ``slot`` to ``model`` (False: no engine it holds or may wake serves it)."""
        self._assign(self.device_of_slot(slot))
        serving = self._occupant(slot)
        mine = ([serving] if serving is not None else []) + self._sleepers(slot)
        if not any(serves(s, model) for s in mine):
            return False
        if slot in self.switches:
            return True  # one switch at a time: a load of another model is asked again after it
        if self.device_of_slot(slot) in self.held:
            return True  # its engines are starting one by one: asked again once they have
        if self.target(slot, model) is not None:
            return True  # serving it already
        engine = next((s for s in mine if serves(s, model) and s is not serving), None)
        if engine is None:
            return False
        self.switches[slot] = Switch(model, engine.instance_id, time.time())
        log.info("device %s: switching to %s (%s)", slot, model, engine.instance_id)
        self.step(self.device_of_slot(slot))
        return True

    def wake_for(self, device: str, model: str) -> None:
        """Without a queue manager: a request of ``model`` waits; switch a slot of ``device`` to it,
        the one holding least work (an idle slot is free at once)."""
        slots = [slot for slot in self.slots_of(device) if slot not in self.switches]
        if any(self.target(slot, model) is not None for slot in self.slots_of(device)):
            return
        if time.monotonic() < self._wake_backoff.get((device, model), (0.0, 0.0))[0]:
            return  # its last switch failed: the tick asks again after the backoff
        if any(sw.model == model for slot, sw in self.switches.items() if slot in self.slots_of(device)):
            return  # already on its way
        for slot in sorted(slots, key=lambda slot: len(o.assigned) if (o := self._occupant(slot)) else -1):
            if self.load(slot, model):
                return

    def step(self, device: str) -> None:
        """Move the device's switches (and its start-up settling) on as far as they can go now."""
        loose = self._assign(device)
        now = time.monotonic()
        claimed = {sw.engine for sw in self.switches.values()}
        for s in loose:  # awake beyond the budget: to sleep once idle
            if s.instance_id in claimed or s.assigned or self._pending_sleep(s):
                continue
            if now < self._settle_after.get(s.instance_id, 0.0):
                continue
            self._settle_after[s.instance_id] = now + SETTLE_RETRY_S
            self.settling.add(self.sleep.sleep(s))
        for slot in self.slots_of(device):
            switch = self.switches.get(slot)
            if switch is not None and switch.phase == "draining":
                self._drain(slot, switch)

    def _drain(self, slot: str, switch: Switch) -> None:
        engine = self._engine(slot, switch)
        if engine is None:
            self._fail(slot, switch, "no engine of the device serves it any more")
            return
        serving = self._occupant(slot)
        if serving is None or serving is engine or not awake(serving):
            self._wake(slot, switch, engine)
        elif not serving.assigned:  # the awake engine finishes its requests first
            switch.phase = "sleeping"
            switch.swap_started = time.monotonic()
            switch.waiting = {self.sleep.sleep(serving)}
            switch.step_deadline = time.monotonic() + STEP_TIMEOUT_S

    def _engine(self, slot: str, switch: Switch) -> Session | None:
        """The switch's engine; if it left, another sleeping engine of the model, claimed instead."""
        s = self.parked.get(switch.engine) or self.sessions.get(switch.engine)
        if s is not None and (s.alive or s.instance_id in self.parked) and serves(s, switch.model):
            return s
        s = next((m for m in self._sleepers(slot) if serves(m, switch.model)), None)
        if s is not None:
            switch.engine = s.instance_id
        return s

    def _wake(self, slot: str, switch: Switch, engine: Session) -> None:
        if awake(engine):
            self._done(slot, switch, engine, switched=False)  # nothing to wake: its engine is up
            return
        switch.phase = "waking"
        switch.swap_started = switch.swap_started or time.monotonic()
        parked = engine.instance_id in self.parked
        token = self.sleep.wake(engine, switch.model)
        if token is None:
            self._fail(slot, switch, f"{engine.instance_id} is stopped and its control cannot start it")
            return
        switch.waiting = {token}
        if parked:
            switch.deadline = time.monotonic() + START_TIMEOUT_S
        else:
            switch.step_deadline = time.monotonic() + STEP_TIMEOUT_S

    def joined(self, s: Session) -> None:
        """An engine registered: one started for a switch (stopped cold before) may complete it,
        and its report is taken as it comes (:meth:`EngineSleep.joined`)."""
        self.sleep.joined(s)

    def reported(self, s: Session) -> None:
        """An engine's state report arrived (see :meth:`EngineSleep.reported`)."""
        self.sleep.reported(s)
        self.sleep.check_started(s.instance_id)

    def expire(self) -> None:
        """On the coordinator's timer: a stopped engine that has not registered in time fails its
        switch (the planner places its model elsewhere; the engine, if it comes, is settled)."""
        now = time.monotonic()
        for slot, switch in list(self.switches.items()):
            if switch.deadline and now > switch.deadline and f"start:{switch.engine}" in switch.waiting:
                self._fail(slot, switch, f"{switch.engine} did not start in {START_TIMEOUT_S:.0f} s")
            elif switch.step_deadline and now > switch.step_deadline and switch.waiting:
                # stuck for ever otherwise: the failed switch is planned again from the reports
                self._fail(slot, switch, f"its {switch.phase} step had no answer in {STEP_TIMEOUT_S:.0f} s")

    def on_ack(self, s: Session, command_id: str, op: str, ack: pb.CommandAck) -> bool:
        """An engine acknowledged a command; True if it was one of a device's switch (handled)."""
        if not self.device_of(s):
            return False
        return self._step_done(s, command_id, op, None if ack.ok else ack.error, ack.ready_at)

    def _step_done(self, s: Session, step: str, op: str, error: str | None, ready_at: float = 0.0) -> bool:
        """A step of a switch or of the start-up settling ended (``error`` None: done): the switch
        goes on, or fails. False: ``step`` is none of a device's."""
        device = self.device_of(s)
        if step in self.settling:
            self.settling.discard(step)
            if error is None:
                self.sleep.acknowledged(s, op)
            else:  # an engine registers before its HTTP server is up: tried again shortly
                log.info("device %s: %s did not go to sleep yet: %s", device, s.instance_id, error)
            for each in self.slots_of(device):
                self.on_changed(each)
            return True
        slot = next((x for x in self.slots_of(device) if step in self._waiting(x)), None)
        if slot is None:
            return False
        switch = self.switches[slot]
        switch.waiting.discard(step)
        if error is not None:
            self._fail(slot, switch, f"{op} on {s.instance_id}: {error}")
            return True
        self.sleep.acknowledged(s, op)
        if switch.waiting:
            return True
        if switch.phase == "sleeping":
            self.occupant.pop(slot, None)
            engine = self._engine(slot, switch)
            if engine is None:
                self._fail(slot, switch, "its engine left")
            else:
                self._wake(slot, switch, engine)
        elif switch.phase == "waking":
            self._done(slot, switch, self.sessions.get(s.instance_id) or s, ready_at=ready_at)
        return True

    def _waiting(self, slot: str) -> set[str]:
        sw = self.switches.get(slot)
        return sw.waiting if sw is not None else set()

    def left(self, s: Session) -> None:
        """A member left: a switch waiting on it cannot finish (unless it was stopped on purpose:
        parked, or being stopped)."""
        iid = s.instance_id
        for slot, switch in list(self.switches.items()):
            if self.stopped_cold(s) or f"start:{iid}" in switch.waiting:
                continue
            involved = switch.engine == iid or self.occupant.get(slot) == iid
            if involved and switch.phase != "draining":
                self._fail(slot, switch, f"{iid} left")
        for slot, iid in list(self.occupant.items()):
            if iid == s.instance_id:
                del self.occupant[slot]

    # ------------------------------------------------------------------ start-up, one by one
    def sleep_engine(self, instance_id: str) -> bool:
        """Put a registered, awake engine to sleep now (``qlm serve`` starting engines one after
        another, so that each may take the device's memory); False: not such an engine."""
        s = self.sessions.get(instance_id)
        if s is None or not s.alive or not self.device_of(s) or not awake(s):
            return False
        if s.assigned:
            # Unseated at once (_assign), so under steady traffic it does not keep taking requests:
            # it finishes those it holds, then sleeps as an engine awake beyond the budget (step).
            self.retiring[instance_id] = s
            self.step(self.device_of(s))
        elif not self._pending_sleep(s):
            self.settling.add(self.sleep.sleep(s))  # no longer seated (_assign): nothing more goes to it
        return True

    def hold_switches(self, device: str, held: bool) -> None:
        """While ``qlm serve`` starts a device's engines one by one, no switch starts on it (one
        waking an engine then could take the memory the next one starts with); the awake engines
        serve meanwhile, and the loads ordered are planned again once it is let go."""
        if held:
            self.held.add(device)
            return
        self.held.discard(device)
        for slot in self.slots_of(device):
            self.on_changed(slot)  # the loads refused meanwhile are planned again

    def engine_asleep(self, instance_id: str) -> bool:
        return self.sleep.asleep(instance_id)

    def stopped_cold(self, s: Member) -> bool:
        """Whether the device stopped ``s``'s server (or is stopping it) to sleep it cold."""
        return self.sleep.stopped_cold(s)

    def _pending_sleep(self, s: Session) -> bool:
        return f"stop:{s.instance_id}" in self.settling or any(cid in self.settling for cid in s.pending)

    def _done(
        self, slot: str, switch: Switch, engine: Session, *, switched: bool = True, ready_at: float = 0.0
    ) -> None:
        """The switch is done; ``ready_at`` (unix seconds, 0: now): when the engine said its model
        serves (an engine that acknowledges the wake at once and loads after: the swap lasts until
        then, not until the acknowledgement; measured so, swaps looked 500 times cheaper)."""
        self.switches.pop(slot, None)
        self._wake_backoff.pop((self.device_of_slot(slot), switch.model), None)
        self.failing_wakes.pop((self.device_of_slot(slot), switch.model), None)
        self.occupant[slot] = engine.instance_id
        self.switches_done += switched
        later = max(0.0, ready_at - time.time()) if ready_at else 0.0
        swap_s = time.monotonic() + later - switch.swap_started if switch.swap_started else 0.0
        if switched and swap_s:
            times = self.swap_times.setdefault(self.device_of_slot(slot), [])
            times.append(swap_s)
            del times[:-SWAP_SAMPLES]
        log.info(
            "device %s: serving %s (switched in %.3f s, the swap itself %.3f s)",
            slot,
            switch.model,
            time.time() - switch.started_at,
            swap_s,
        )
        self.on_changed(slot)

    def _fail(self, slot: str, switch: Switch, error: str) -> None:
        self.switches.pop(slot, None)
        key = (self.device_of_slot(slot), switch.model)
        delay = self._wake_backoff.get(key, (0.0, WAKE_BACKOFF_S[0]))[1]
        self._wake_backoff[key] = (time.monotonic() + delay, min(2 * delay, WAKE_BACKOFF_S[1]))
        self.failing_wakes[key] = error
        log.warning("device %s: switch to %s failed: %s", slot, switch.model, error)
        self.on_failed(slot, switch.model, error)
        self.on_changed(slot)
