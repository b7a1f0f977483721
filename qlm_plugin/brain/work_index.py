"""Queued work indexed by urgency: how many seat-seconds (and how much variance) wait ahead of a
given laxity, in O(log n), so an estimate at admission does not scan a 10,000-request queue."""

from __future__ import annotations

import math

#: Urgency resolution (seconds of laxity per bucket) and span; later laxities share the last bucket.
RESOLUTION_S = 0.1
BUCKETS = 1 << 17  # 3.6 hours at 0.1 s


class WorkIndex:
    """Fenwick trees of (count, seat-seconds, variance, prompt tokens) over absolute laxity, for one
    model."""

    def __init__(self, origin: float = 0.0) -> None:
        self.origin = origin
        self._n = [0.0] * (BUCKETS + 1)
        self._w = [0.0] * (BUCKETS + 1)
        self._v = [0.0] * (BUCKETS + 1)
        self._p = [0.0] * (BUCKETS + 1)
        self.count = 0
        self.work = 0.0

    def _bucket(self, laxity: float) -> int:
        if math.isinf(laxity) or math.isnan(laxity):
            return BUCKETS
        b = int((laxity - self.origin) / RESOLUTION_S) + 1
        return 1 if b < 1 else (BUCKETS if b > BUCKETS else b)

    def add(self, laxity: float, work: float, var: float, sign: int = 1, prompt: float = 0.0) -> None:
        i = self._bucket(laxity)
        n, w, v, p = self._n, self._w, self._v, self._p
        while i <= BUCKETS:
            n[i] += sign
            w[i] += sign * work
            v[i] += sign * var
            p[i] += sign * prompt
            i += i & -i
        self.count += sign
        self.work += sign * work

    def remove(self, laxity: float, work: float, var: float, prompt: float = 0.0) -> None:
        self.add(laxity, work, var, -1, prompt)

    def prompt_ahead(self, laxity: float) -> float:
        """Prompt tokens queued with urgency at or before ``laxity``."""
        i = self._bucket(laxity)
        total = 0.0
        p = self._p
        while i > 0:
            total += p[i]
            i -= i & -i
        return max(0.0, total)

    def ahead(self, laxity: float) -> tuple[int, float, float]:
        """(requests, seat-seconds, variance) queued with urgency at or before ``laxity``."""
        i = self._bucket(laxity)
        cnt = work = var = 0.0
        n, w, v = self._n, self._w, self._v
        while i > 0:
            cnt += n[i]
            work += w[i]
            var += v[i]
            i -= i & -i
        return round(cnt), max(0.0, work), max(0.0, var)
