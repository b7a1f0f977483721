"""Compatibility: these types now live in :mod:`qlm_plugin.domain.instance` and
:mod:`qlm_plugin.domain.outcome` (adapters written against earlier releases import them from here)."""

from qlm_plugin.domain.instance import (
    EvictMode,
    EvictResult,
    InstanceInfo,
    InstanceState,
    LoadResult,
    RunningView,
    StepTiming,
)
from qlm_plugin.domain.outcome import Admission, RequestOutcome, Status

__all__ = [
    "Admission",
    "EvictMode",
    "EvictResult",
    "InstanceInfo",
    "InstanceState",
    "LoadResult",
    "RequestOutcome",
    "RunningView",
    "Status",
    "StepTiming",
]
