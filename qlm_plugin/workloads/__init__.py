"""Workloads and scenarios: request trace files (Azure LLM inference, BurstGPT, Mooncake;
:mod:`.trace_files`), reshaping them, synthetic arrivals, assigning models and SLO classes
(:mod:`.records`), and the scenario files that put a fleet, its classes and a workload together
(:mod:`.scenario`)."""

from qlm_plugin.workloads.records import (
    Rejected,
    Share,
    assign,
    sample,
    scale_arrivals,
    synthetic,
    window,
)
from qlm_plugin.workloads.trace_files import (
    PACKAGED_TRACES,
    SCHEMAS,
    TraceError,
    TraceRecord,
    TraceSchema,
    load_azure_trace,
    load_trace,
    packaged_trace_path,
)

__all__ = [
    "PACKAGED_TRACES",
    "SCHEMAS",
    "Rejected",
    "Share",
    "TraceError",
    "TraceRecord",
    "TraceSchema",
    "assign",
    "load_azure_trace",
    "load_trace",
    "packaged_trace_path",
    "sample",
    "scale_arrivals",
    "synthetic",
    "window",
]
