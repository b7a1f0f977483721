"""A concurrency limit learned from observed latency (additive increase, multiplicative decrease).

The limit grows by one while requests are saturating it and latency stays near the best seen, and
shrinks by a fifth when the time per token of several requests rises well above that best (the
server is queueing or thrashing). After a decrease only requests started since count: those
already running at the old limit say nothing about the new one.
Thread safety: not thread-safe; the agent's event loop owns it.
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger(__name__)

#: Samples a decrease needs since the last change (one slow request is noise, not a trend).
SAMPLES_TO_DECREASE = 4


class ConcurrencyLimiter:
    def __init__(
        self, *, initial: int = 4, minimum: int = 1, maximum: int = 256, tolerance: float = 2.0
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}")
        self.limit = initial
        self.minimum = minimum
        self.maximum = maximum
        self.tolerance = tolerance  # latency above tolerance x the best seen means "too many"
        self.in_flight = 0
        self.best: float | None = None  # best time per token seen (seconds)
        self._recent: deque[float] = deque(maxlen=16)
        self._decreases = 0

    def free(self) -> int:
        return max(0, self.limit - self.in_flight)

    def started(self) -> int:
        """A request went to the server; returns the token to hand back to :meth:`finished`."""
        self.in_flight += 1
        return self._decreases

    def finished(self, seconds_per_token: float | None, token: int | None = None) -> None:
        """A request ended; ``seconds_per_token``: the pace of its tokens after the first (None if
        it failed, was aborted or made one token: no signal); ``token``: what :meth:`started`
        returned for it."""
        self.in_flight = max(0, self.in_flight - 1)
        if seconds_per_token is None or seconds_per_token <= 0:
            return
        if token is not None and token != self._decreases:
            return  # it ran at a limit since cut: its latency is about that one
        # The best is forgotten slowly (1% per request), so a lasting shift (longer prompts) is learned.
        self.best = seconds_per_token if self.best is None else min(self.best * 1.01, seconds_per_token)
        self._recent.append(seconds_per_token)
        typical = sorted(self._recent)[len(self._recent) // 2]
        before = self.limit
        slow = typical > self.tolerance * self.best
        if slow and len(self._recent) >= SAMPLES_TO_DECREASE:
            self.limit = max(self.minimum, int(self.limit * 0.8))
            self._recent.clear()
            self._decreases += 1
        elif (
            not slow and seconds_per_token <= self.tolerance * self.best and self.in_flight + 1 >= self.limit
        ):
            self.limit = min(self.maximum, self.limit + 1)  # saturated and latency held: one more
        if self.limit != before:
            log.info(
                "concurrency limit %d -> %d (typical %.1f ms/token, best %.1f)",
                before,
                self.limit,
                typical * 1e3,
                self.best * 1e3,
            )
