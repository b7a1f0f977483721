"""Evictions the coordinator orders on an engine, as the scheduler carries them out: each order
waits for its request to run, is skipped when the urgent request it was for has a seat already, and
is dropped when its request never ran (:func:`order_action`). Pure Python, tested without an engine.
Thread safety: the agent's thread appends orders; the scheduler's thread reads them (a deque).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EvictionOrder:
    """A coordinator's order: evict ``victim`` (its coordinator id), to free a seat for
    ``for_request`` ("" for an operator's order); ``came``: when it reached the engine (monotonic)."""

    victim: str
    for_request: str
    came: float


class SeatsGiven:
    """The urgent requests (coordinator ids, or the engine's own ids for requests without one) a
    seat was freed for, by the engine's own policy or by a coordinator's order: one urgent request
    costs one eviction, whichever side acts first. A seat its request did not take is given back
    (:meth:`take_back`); a mark lasts ``memory_s``. Not thread-safe: the scheduler's thread."""

    def __init__(self, memory_s: float = 60.0) -> None:
        self.memory_s = memory_s
        self._given: dict[str, float] = {}

    def give(self, request: str, now: float) -> None:
        self._given[request] = now
        if len(self._given) > 1024:  # only recent ones can be ordered again
            self._given = {r: t for r, t in self._given.items() if now - t < self.memory_s}

    def given(self, request: str, now: float | None = None) -> bool:
        at = self._given.get(request)
        return at is not None and (now is None or now - at < self.memory_s)

    def take_back(self, request: str) -> None:
        """The step did not seat ``request``: a seat may be freed for it again."""
        self._given.pop(request, None)


def order_action(
    order: EvictionOrder,
    *,
    victim_running: bool,
    beneficiary_running: bool,
    seats: SeatsGiven,
    beneficiary_here: bool = True,
    now: float,
    wait_s: float,
) -> str:
    """What the scheduler does with a coordinator's eviction order before a step: ``skip`` it (the
    request it was for already has a seat: running, or given one by the engine's own policy),
    ``evict`` the victim, ``wait`` for the victim to run and for the request it is for to be here
    (the order overtook them: orders and requests travel apart; a seat freed before its request
    came went straight back to the victim, and its mark held the engine's own eviction off for a
    minute), or ``drop`` it (not both within ``wait_s``: the victim finished, or one never came)."""
    if order.for_request and (beneficiary_running or seats.given(order.for_request, now)):
        return "skip"
    if victim_running and (beneficiary_here or not order.for_request):
        return "evict"
    return "wait" if now - order.came < wait_s else "drop"
