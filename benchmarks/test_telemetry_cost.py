"""Telemetry cost on the per-request hot path (pytest-benchmark). Run:

    python -m pytest benchmarks/test_telemetry_cost.py --benchmark-enable

One request's lifecycle: ``request_started``, three events (queued, dispatched, first token) and
``request_finished`` (counter, TTFT, duration and estimator-error histograms, SLO attainment), with
the Prometheus registry always on. Three set-ups: the OpenTelemetry API's no-op providers, the global
providers as a coordinator gets them when no SDK is configured (proxies to the no-op ones), and SDK
providers with an in-memory span exporter and metric reader. Target: a few microseconds without SDK.
"""

from __future__ import annotations

import itertools

import pytest
from opentelemetry import metrics, trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider
from opentelemetry.util.types import AttributeValue

from qlm_plugin.telemetry.instruments import Telemetry

ROUNDS = 5000


@pytest.mark.parametrize("providers", ["noop", "global", "sdk"])
def test_request_lifecycle(benchmark, providers: str) -> None:  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    if providers == "noop":
        tel = Telemetry(tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    elif providers == "global":
        if isinstance(trace.get_tracer_provider(), TracerProvider) or isinstance(
            metrics.get_meter_provider(), MeterProvider
        ):
            pytest.skip("an SDK provider is installed globally in this process")
        tel = Telemetry()
    else:
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        tel = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    ids = (f"r{i}" for i in itertools.count())
    queued: dict[str, AttributeValue] = {
        "qlm.estimate.wait_s": 0.4,
        "qlm.estimate.p_meet": 0.95,
        "qlm.instance.planned": "i3",
    }
    dispatched: dict[str, AttributeValue] = {"qlm.instance.id": "i3", "qlm.attempt": 1}

    def lifecycle() -> None:
        rid = next(ids)
        tel.request_started(
            rid,
            model="llama-3.1-8b",
            operation="chat",
            slo_class="interactive",
            tenant="acme",
            max_tokens=512,
            input_tokens=1800,
            ttft_slo_s=2.0,
            e2e_slo_s=None,
        )
        tel.request_event(rid, "qlm.queued", queued)
        tel.request_event(rid, "qlm.dispatched", dispatched)
        tel.request_event(rid, "qlm.first_token")
        tel.request_finished(
            rid,
            status="completed",
            slo_met=True,
            model="llama-3.1-8b",
            slo_class="interactive",
            ttft_s=0.6,
            e2e_s=7.5,
            output_tokens=300,
            finish_reason="stop",
            predicted_wait_s=0.4,
        )

    benchmark.group = "telemetry per request"
    benchmark.pedantic(lifecycle, rounds=ROUNDS, iterations=1, warmup_rounds=200)
    assert tel.open_spans() == 0
    if providers == "sdk":
        assert len(exporter.get_finished_spans()) == ROUNDS + 200
    benchmark.extra_info["us_per_request"] = round(benchmark.stats.stats.median * 1e6, 2)
