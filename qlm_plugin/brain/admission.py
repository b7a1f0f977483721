"""Admission: whether a new request is taken, given its waiting-time estimate (``qlm_admit``).

The default takes every request and flags the ones the estimator gives less than a 5% chance of
meeting their SLO (the client is told, with the estimate). A class configured with
``refuse_below_p_meet`` has a request refused instead when its chance is below that: the client
hears at once (HTTP 503 with the estimate and a ``Retry-After``) rather than waiting to be late. A
plugin implementing ``qlm_admit`` replaces this. Thread safety: stateless after construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from qlm_plugin.domain.distributions import WaitEstimate
from qlm_plugin.domain.outcome import Admission
from qlm_plugin.domain.request import Request, SLOClass
from qlm_plugin.hooks import hookimpl

#: A request whose probability of meeting its SLO falls below this is flagged at admission.
FLAG_BELOW_P = 0.05


def retry_after_s(estimate: WaitEstimate) -> float:
    """When a refused client may try again: once the wait it was told about has passed (1 s at
    least; 60 s where nothing serves the model now)."""
    wait = estimate.wait_mean_s
    return 60.0 if not math.isfinite(wait) else max(1.0, wait)


class AdmissionControl:
    def __init__(self, classes: Mapping[str, SLOClass] | None = None) -> None:
        self.classes = dict(classes or {})

    @hookimpl
    def qlm_admit(self, request: Request, estimate: WaitEstimate, now: float) -> Admission:
        cls = self.classes.get(request.slo_class)
        refuse_below = cls.refuse_below_p_meet if cls is not None else 0.0
        if estimate.p_meet < refuse_below:
            return Admission(
                request.id,
                False,
                False,
                wait_mean_s=estimate.wait_mean_s,
                p_meet=estimate.p_meet,
                reason=(
                    f"slo_unattainable: estimated wait {estimate.wait_mean_s:.2f} s, probability of "
                    f"meeting the SLO {estimate.p_meet:.2f}, below the {request.slo_class!r} class's "
                    f"{refuse_below:.2f}"
                ),
            )
        flagged = estimate.p_meet < FLAG_BELOW_P
        return Admission(
            request.id,
            True,
            not flagged,
            wait_mean_s=estimate.wait_mean_s,
            p_meet=estimate.p_meet,
            reason="SLO cannot be met at the current load" if flagged else "",
        )
