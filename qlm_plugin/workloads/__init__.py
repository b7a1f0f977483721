"""Workloads and scenarios: request traces (Azure LLM inference 2023), reshaping them, synthetic
arrivals, assigning models and SLO classes (:mod:`.records`), and the scenario files that put a fleet,
its classes and a workload together (:mod:`.scenario`)."""

from qlm_plugin.workloads.records import (
    PACKAGED_TRACES,
    Rejected,
    Share,
    TraceError,
    TraceRecord,
    assign,
    load_azure_trace,
    packaged_trace_path,
    sample,
    scale_arrivals,
    synthetic,
    window,
)

__all__ = [
    "PACKAGED_TRACES",
    "Rejected",
    "Share",
    "TraceError",
    "TraceRecord",
    "assign",
    "load_azure_trace",
    "packaged_trace_path",
    "sample",
    "scale_arrivals",
    "synthetic",
    "window",
]
