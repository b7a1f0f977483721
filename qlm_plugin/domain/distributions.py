"""Distributions the policies exchange: output lengths and waiting times."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

#: The standard library's (exact to 1e-15 against scipy's, without scipy.stats' second of import).
_STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """A predicted number of output tokens still to generate.

    ``quantiles`` maps a probability to a token count (at least 0.5, 0.9 and 0.99 where the predictor
    knows them). ``mean`` and ``var`` feed the central-limit sums of the waiting-time estimator.
    """

    mean: float
    var: float
    quantiles: tuple[tuple[float, float], ...] = ()

    @classmethod
    def point(cls, tokens: float) -> LengthDistribution:
        """A certain length (the clairvoyant reference, or a request with max_tokens == 1)."""
        return cls(mean=tokens, var=0.0, quantiles=((0.5, tokens), (0.9, tokens), (0.99, tokens)))

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def quantile(self, p: float) -> float:
        for q, value in self.quantiles:
            if abs(q - p) < 1e-9:
                return value
        # Normal approximation where the predictor did not give that quantile.
        if self.var == 0.0:
            return max(0.0, self.mean)
        if not 0.0 < p < 1.0:
            return 0.0 if p <= 0.0 else math.inf
        return max(0.0, self.mean + _STANDARD_NORMAL.inv_cdf(p) * self.std)


@dataclass(frozen=True, slots=True)
class WaitEstimate:
    """Predicted waiting (until first token) and completion time of a request on one instance, seconds
    from now, as normal distributions; ``p_meet`` is the probability of meeting all its SLOs."""

    instance_id: str
    wait_mean_s: float
    wait_std_s: float
    completion_mean_s: float
    completion_std_s: float
    p_meet: float
