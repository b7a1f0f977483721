"""Simulated instances in (scaled) real time, for instance processes that serve a coordinator.

:class:`RealtimeFleet` drives :class:`SimInstance` objects from the running asyncio loop instead of a
virtual clock; :class:`RealtimeSim` submits and aborts requests on them and streams each request's
synthetic tokens (:func:`synthetic_text`) as the simulation generates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.domain.outcome import RequestOutcome
from qlm_plugin.domain.request import Request

log = logging.getLogger(__name__)


class RealtimeFleet:
    """Drives instances on the running asyncio loop: simulated seconds = wall seconds x ``speed``
    since construction. Like :class:`SimFleet`, one live timer per instance; a new one supersedes."""

    def __init__(
        self,
        instances: Iterable[SimInstance],
        *,
        speed: float = 1.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.instances: dict[str, SimInstance] = {}
        for inst in instances:
            if inst.instance_id in self.instances:
                raise ValueError(f"instance ids must be unique: {inst.instance_id!r}")
            self.instances[inst.instance_id] = inst
            inst.fleet = self
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._last = 0.0  # the latest time handed out: the clock never goes back
        self._frozen: float | None = None  # set while an instance handles an event

    @property
    def now(self) -> float:
        if self._frozen is not None:
            return self._frozen  # one time for everything an event does, as in SimFleet
        t = (self.loop.time() - self.t0) * self.speed
        if t > self._last:
            self._last = t
        return self._last

    def schedule(self, inst: SimInstance, t: float) -> None:
        old = self._timers.pop(inst.instance_id, None)
        if old is not None:
            old.cancel()
        inst.next_event_t = t
        when = self.t0 + t / self.speed
        self._timers[inst.instance_id] = self.loop.call_at(when, self._fire, inst, t)

    def _fire(self, inst: SimInstance, t: float) -> None:
        self._timers.pop(inst.instance_id, None)
        # A late timer (busy loop) is handled at the time it fires, not the time it was set for: the
        # step just took longer, as a real engine's step does under load. Going back to t would let
        # `now` decrease for whoever read the clock meanwhile, and the simulated times stay what a
        # client measures. (asyncio may also fire up to its clock resolution early: never before t.)
        self._last = max(self._last, t)
        now = self.now
        self._frozen = now
        try:
            inst.on_event(now)
        finally:
            self._frozen = None

    def close(self) -> None:
        """Cancel every pending timer (the instances stop where they are)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


@dataclass(frozen=True, slots=True)
class Progress:
    """One streaming event of a request."""

    request_id: str
    kind: str  # "tokens" | "finished" | "cancelled"
    index: int  # tokens: output position of its first token; finished/cancelled: tokens sent in all
    count: int  # tokens in this event (0 for finished and cancelled)
    time: float  # unix seconds (wall clock) when it happened
    outcome: RequestOutcome


@dataclass(slots=True)
class _Stream:
    inst: SimInstance
    outcome: RequestOutcome
    on_progress: Callable[[Progress], None]
    sent: int = 0  # output tokens reported so far


class RealtimeSim:
    """Runs simulated instances in real time (``speed`` x faster) and streams their tokens.

    Each submitted request reports a "tokens" event for its first token when it is generated, then
    every ``stream_interval_s`` wall seconds the tokens generated since, then at its finish the rest
    and a "finished" event; or a "cancelled" event when aborted, and nothing after. Requests'
    arrival times and SLO deadlines are on the simulated clock (:attr:`now`). It sets the instances'
    ``on_first_token`` and ``on_finished`` callbacks, calling the ones they had after its own.
    """

    def __init__(
        self, instances: Sequence[SimInstance], *, speed: float = 1.0, stream_interval_s: float = 0.05
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if not stream_interval_s > 0:
            raise ValueError(f"stream_interval_s must be > 0, got {stream_interval_s}")
        self.speed = speed
        self.stream_interval_s = stream_interval_s
        self._instances = {inst.instance_id: inst for inst in instances}
        if len(self._instances) != len(instances):
            raise ValueError("instance ids must be unique")
        self._fleet: RealtimeFleet | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._unix_t0 = 0.0
        self._streams: dict[tuple[str, str], _Stream] = {}
        for inst in instances:
            self._hook(inst)

    def _hook(self, inst: SimInstance) -> None:
        first_prev, finished_prev = inst.on_first_token, inst.on_finished

        def on_first_token(outcome: RequestOutcome) -> None:
            self._first_token(inst, outcome)
            first_prev(outcome)

        def on_finished(outcome: RequestOutcome) -> None:
            self._finished(inst, outcome)
            finished_prev(outcome)

        inst.on_first_token = on_first_token
        inst.on_finished = on_finished

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the clock and the streaming ticker; call on the running loop."""
        if self._fleet is not None:
            raise RuntimeError("already started")
        fleet = self._fleet = RealtimeFleet(self._instances.values(), speed=self.speed)
        self._unix_t0 = time.time() - (fleet.loop.time() - fleet.t0)
        self._ticker = fleet.loop.create_task(self._tick())

    async def stop(self) -> None:
        """Stop streaming and the instances' timers; live requests report nothing more."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._fleet is not None:
            self._fleet.close()

    @property
    def now(self) -> float:
        """The simulated time, in seconds."""
        if self._fleet is None:
            raise RuntimeError("not started")
        return self._fleet.now

    def wall_time(self, sim_t: float) -> float:
        """Unix seconds of a simulated time."""
        return self._unix_t0 + sim_t / self.speed

    def instance(self, instance_id: str) -> SimInstance:
        return self._instances[instance_id]

    # ------------------------------------------------------------------ requests
    def submit(self, instance_id: str, request: Request, on_progress: Callable[[Progress], None]) -> bool:
        """Dispatch ``request`` to an instance; False if refused (unknown or unhealthy instance, a
        model it cannot serve, or the request is already live there)."""
        if self._fleet is None:
            raise RuntimeError("not started")
        inst = self._instances.get(instance_id)
        key = (instance_id, request.id)
        if inst is None or key in self._streams:
            return False
        outcome = RequestOutcome(request)
        if not inst.dispatch(request, outcome):
            return False
        self._streams[key] = _Stream(inst, outcome, on_progress)
        return True

    def abort(self, instance_id: str, request_id: str) -> bool:
        """Cancel a request: it frees the instance and reports "cancelled", then nothing more."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return False
        stream = self._streams.pop((instance_id, request_id), None)
        aborted = inst.abort(request_id)
        if stream is None:
            return aborted
        self._emit(stream, "cancelled", stream.sent, 0, self.wall_time(self.now))
        return True

    # ------------------------------------------------------------------ streaming
    def _live(self, inst: SimInstance, outcome: RequestOutcome) -> _Stream | None:
        stream = self._streams.get((inst.instance_id, outcome.request.id))
        return stream if stream is not None and stream.outcome is outcome else None

    def _first_token(self, inst: SimInstance, outcome: RequestOutcome) -> None:
        stream = self._live(inst, outcome)
        if stream is None or stream.sent > 0:
            return
        stream.sent = 1
        t = outcome.first_token_time if outcome.first_token_time is not None else self.now
        self._emit(stream, "tokens", 0, 1, self.wall_time(t))

    def _finished(self, inst: SimInstance, outcome: RequestOutcome) -> None:
        stream = self._live(inst, outcome)
        if stream is None:
            return
        del self._streams[(inst.instance_id, outcome.request.id)]
        t = self.wall_time(outcome.finish_time if outcome.finish_time is not None else self.now)
        total = outcome.output_tokens
        if total > stream.sent:
            self._emit(stream, "tokens", stream.sent, total - stream.sent, t)
        self._emit(stream, "finished", total, 0, t)

    def _flush(self) -> None:
        """Report the tokens each started request has generated since its last event."""
        t = self.wall_time(self.now)
        for key, stream in list(self._streams.items()):
            if stream.sent == 0 or self._streams.get(key) is not stream:
                continue  # no first token yet (it comes from on_first_token), or aborted meanwhile
            generated = stream.inst.generated_tokens(key[1])
            if generated is not None and generated > stream.sent:
                start, stream.sent = stream.sent, generated
                self._emit(stream, "tokens", start, generated - start, t)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.stream_interval_s)
            self._flush()

    def _emit(self, stream: _Stream, kind: str, index: int, count: int, t: float) -> None:
        event = Progress(stream.outcome.request.id, kind, index, count, t, stream.outcome)
        try:
            stream.on_progress(event)
        except Exception:
            # A failing consumer must not break the engine mid-event or stop everyone's streaming.
            log.exception("on_progress failed for request %s", event.request_id)


# Synthetic output: one word per token, so text for [0, n) == text for [0, k) + text for [k, n).
_SYLLABLES = ("ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "wo", "ya", "zu")
_MASK = (1 << 64) - 1


#: A chat answer's length when nothing bounds it: lognormal, the median of the Azure conversation
#: trace's outputs (129 tokens) and a log-sigma of 1.
NATURAL_MEDIAN_TOKENS = 129.0


def natural_length(request_id: str) -> int:
    """Where a chat model would end this request's answer by itself (deterministic per id)."""
    seed = int.from_bytes(
        hashlib.blake2b(request_id.encode(), digest_size=8, person=b"length").digest(), "little"
    )
    u = (seed + 0.5) / 2.0**64  # uniform in (0, 1)
    return max(1, round(NATURAL_MEDIAN_TOKENS * math.exp(statistics.NormalDist().inv_cdf(u))))


def synthetic_text(request_id: str, start: int, count: int) -> str:
    """Deterministic synthetic tokens ``start .. start+count-1`` of a request, each a word with a
    leading space: a request re-served elsewhere continues with exactly the same text."""
    # blake2b, not hash(): str hashes are salted per process, and processes must agree.
    seed = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")
    words = []
    for pos in range(start, start + count):
        z = (seed + (pos + 1) * 0x9E3779B97F4A7C15) & _MASK  # splitmix64 of (seed, position)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        words.append(f" {_SYLLABLES[z & 15]}{_SYLLABLES[(z >> 4) & 15]}")  # 256 two-syllable words
    return "".join(words)
