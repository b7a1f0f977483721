"""A concurrency limit learned from observed latency (additive increase, multiplicative decrease).

The limit grows by one while requests are saturating it and latency stays near the best seen, and
shrinks by a fifth when the time per token rises well above that best (the server is queueing or
thrashing). Thread safety: not thread-safe; the agent's event loop owns it.
"""

from __future__ import annotations

from collections import deque


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

    def free(self) -> int:
        return max(0, self.limit - self.in_flight)

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, seconds_per_token: float | None) -> None:
        """A request ended; ``seconds_per_token``: its time to finish over its tokens (None if it
        failed or was aborted: no signal)."""
        self.in_flight = max(0, self.in_flight - 1)
        if seconds_per_token is None or seconds_per_token <= 0:
            return
        # The best is forgotten slowly (1% per request), so a lasting shift (longer prompts) is learned.
        self.best = seconds_per_token if self.best is None else min(self.best * 1.01, seconds_per_token)
        self._recent.append(seconds_per_token)
        typical = sorted(self._recent)[len(self._recent) // 2]
        if typical > self.tolerance * self.best:
            self.limit = max(self.minimum, int(self.limit * 0.8))
            self._recent.clear()
        elif self.in_flight + 1 >= self.limit:  # it was saturated and latency held: try one more
            self.limit = min(self.maximum, self.limit + 1)
