"""Admission: whether a new request is taken, given its waiting-time estimate (``qlm_admit``).

The default takes every request and flags the ones the estimator gives less than a 5% chance of
meeting their SLO (the client is told, with the estimate); a plugin implementing ``qlm_admit``
replaces it. Thread safety: stateless.
"""

from __future__ import annotations

from qlm_plugin.domain.distributions import WaitEstimate
from qlm_plugin.domain.outcome import Admission
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl

#: A request whose probability of meeting its SLO falls below this is flagged at admission.
FLAG_BELOW_P = 0.05


class AdmissionControl:
    @hookimpl
    def qlm_admit(self, request: Request, estimate: WaitEstimate, now: float) -> Admission:
        flagged = estimate.p_meet < FLAG_BELOW_P
        return Admission(
            request.id,
            True,
            not flagged,
            wait_mean_s=estimate.wait_mean_s,
            p_meet=estimate.p_meet,
            reason="SLO cannot be met at the current load" if flagged else "",
        )
