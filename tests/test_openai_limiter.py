"""The black-box adapter's concurrency limit, learned from latency (additive increase,
multiplicative decrease), driven with plain numbers."""

from __future__ import annotations

import pytest

from qlm_plugin.adapters.openai.limiter import SAMPLES_TO_DECREASE, ConcurrencyLimiter


def _round(limiter: ConcurrencyLimiter, seconds_per_token: float) -> None:
    """Fill the limit, then let every request finish at the given latency."""
    tokens = [limiter.started() for _ in range(limiter.free())]
    for token in tokens:
        limiter.finished(seconds_per_token, token)


def test_the_limit_grows_while_saturated_and_latency_holds() -> None:
    limiter = ConcurrencyLimiter(initial=4, maximum=10)
    for _ in range(10):
        _round(limiter, 0.01)
    assert limiter.limit == 10  # capped at the maximum
    assert limiter.in_flight == 0


def test_the_limit_does_not_grow_when_the_server_is_not_kept_full() -> None:
    limiter = ConcurrencyLimiter(initial=4)
    for _ in range(20):
        token = limiter.started()  # one request at a time: no evidence that more would fit
        limiter.finished(0.01, token)
    assert limiter.limit == 4


def test_a_latency_rise_cuts_the_limit_once_not_once_per_slow_request() -> None:
    limiter = ConcurrencyLimiter(initial=10)
    _round(limiter, 0.01)  # the best seen
    grown = limiter.limit
    tokens = [limiter.started() for _ in range(limiter.free())]
    for token in tokens:  # every request that ran at the old limit comes back slow
        limiter.finished(0.05, token)
    assert limiter.limit == int(grown * 0.8)  # one cut: they all ran before it
    # Requests started since the cut are the evidence about the new limit.
    slow = [limiter.started() for _ in range(SAMPLES_TO_DECREASE)]
    for token in slow:
        limiter.finished(0.05, token)
    assert limiter.limit == int(int(grown * 0.8) * 0.8)


def test_one_slow_request_is_noise() -> None:
    limiter = ConcurrencyLimiter(initial=4)
    _round(limiter, 0.01)
    before = limiter.limit
    token = limiter.started()
    limiter.finished(1.0, token)
    assert limiter.limit >= before


def test_the_limit_never_falls_below_the_minimum_and_failures_carry_no_signal() -> None:
    limiter = ConcurrencyLimiter(initial=2, minimum=1)
    _round(limiter, 0.01)
    for _ in range(10):
        tokens = [limiter.started() for _ in range(SAMPLES_TO_DECREASE)]
        for token in tokens:
            limiter.finished(1.0, token)
    assert limiter.limit == 1
    before = limiter.limit
    limiter.started()
    limiter.finished(None)  # failed or aborted: frees the slot, says nothing about latency
    assert limiter.limit == before and limiter.in_flight == 0


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="minimum <= initial <= maximum"):
        ConcurrencyLimiter(initial=8, maximum=4)
