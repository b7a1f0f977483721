"""Telemetry: request, replan and LSO spans, OTel metrics, the Prometheus exposition, the SDK set-up.

Every test passes its own SDK providers (in-memory span exporter, in-memory metric reader) and never
touches the global ones; what needs the global providers runs in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families

from qlm_plugin.telemetry import sdk as telemetry_sdk
from qlm_plugin.telemetry.instruments import LATENCY_BUCKETS, Telemetry

NS = 1_000_000_000


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def telemetry(self, **kwargs: Any) -> Telemetry:
        return Telemetry(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **kwargs)

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.spans.get_finished_spans()

    def points(self, name: str) -> list[Any]:
        """The data points of one metric, [] if it has none."""
        data = self.reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        return list(metric.data.data_points)
        return []

    def point(self, name: str, **attributes: Any) -> Any:
        matches = [p for p in self.points(name) if dict(p.attributes) == attributes]
        assert len(matches) == 1, (name, attributes, [dict(p.attributes) for p in self.points(name)])
        return matches[0]


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(exporter, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def start(tel: Telemetry, request_id: str = "r1", **overrides: Any) -> None:
    kwargs: dict[str, Any] = dict(
        model="llama",
        operation="chat",
        slo_class="interactive",
        tenant="acme",
        max_tokens=256,
        input_tokens=1200,
        ttft_slo_s=2.0,
        e2e_slo_s=None,
    )
    kwargs.update(overrides)
    tel.request_started(request_id, **kwargs)


def finish(tel: Telemetry, request_id: str = "r1", **overrides: Any) -> None:
    kwargs: dict[str, Any] = dict(
        status="completed",
        slo_met=True,
        model="llama",
        slo_class="interactive",
        ttft_s=0.8,
        e2e_s=4.0,
        output_tokens=100,
        finish_reason="stop",
    )
    kwargs.update(overrides)
    tel.request_finished(request_id, **kwargs)


# ---------------------------------------------------------------- request spans


def test_request_lifecycle_makes_one_genai_server_span(otel: Otel) -> None:
    tel = otel.telemetry()
    start(tel, start_time=1000.0)
    assert tel.open_spans() == 1
    tel.request_event(
        "r1",
        "qlm.queued",
        {"qlm.estimate.wait_s": 0.5, "qlm.estimate.p_meet": 0.9, "qlm.instance.planned": "i0"},
        time=1000.01,
    )
    tel.request_event("r1", "qlm.planned", time=1000.2)
    tel.request_event("r1", "qlm.dispatched", {"qlm.instance.id": "i0", "qlm.attempt": 1}, time=1000.5)
    tel.request_event("r1", "qlm.first_token", time=1000.8)
    assert otel.finished() == ()  # still open
    finish(tel, predicted_wait_s=0.5, end_time=1004.0)
    assert tel.open_spans() == 0

    (span,) = otel.finished()
    assert span.name == "chat llama"
    assert span.kind is SpanKind.SERVER
    assert span.start_time == 1000 * NS
    assert span.end_time == 1004 * NS
    assert span.status.status_code is StatusCode.UNSET
    attrs = dict(span.attributes or {})
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "qlm",
        "gen_ai.response.id": "chatcmpl-r1",  # the id an OpenAI client gets
        "gen_ai.request.model": "llama",
        "gen_ai.request.max_tokens": 256,
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 100,
        "gen_ai.response.finish_reasons": ("stop",),
        "qlm.request.id": "r1",
        "qlm.slo.class": "interactive",
        "qlm.tenant": "acme",
        "qlm.slo.ttft_s": 2.0,
        "qlm.status": "completed",
        "qlm.slo.met": True,
        "qlm.late": False,
        "qlm.ttft_s": 0.8,
        "qlm.e2e_s": 4.0,
        "qlm.estimate.wait_s": 0.5,
    }
    assert [e.name for e in span.events] == ["qlm.queued", "qlm.planned", "qlm.dispatched", "qlm.first_token"]
    queued, planned, dispatched, first = span.events
    assert dict(queued.attributes or {}) == {
        "qlm.estimate.wait_s": 0.5,
        "qlm.estimate.p_meet": 0.9,
        "qlm.instance.planned": "i0",
    }
    assert dict(dispatched.attributes or {}) == {"qlm.instance.id": "i0", "qlm.attempt": 1}
    assert queued.timestamp == pytest.approx(1000.01 * NS, abs=1000)
    assert first.timestamp == pytest.approx(1000.8 * NS, abs=1000)
    assert queued.timestamp < planned.timestamp < dispatched.timestamp < first.timestamp


def test_evictions_and_requeues_are_events_too(otel: Otel) -> None:
    tel = otel.telemetry()
    start(tel, operation="text_completion", model="mistral")
    tel.request_event("r1", "qlm.evicted", {"qlm.evict.mode": "swap", "qlm.wasted_tokens": 0})
    tel.request_event("r1", "qlm.swapped_in")
    tel.request_event("r1", "qlm.requeued", {"qlm.reason": "instance_lost"})
    finish(tel, model="mistral")
    (span,) = otel.finished()
    assert span.name == "text_completion mistral"
    assert [e.name for e in span.events] == ["qlm.evicted", "qlm.swapped_in", "qlm.requeued"]
    assert dict(span.events[0].attributes or {}) == {"qlm.evict.mode": "swap", "qlm.wasted_tokens": 0}
    assert dict(span.events[2].attributes or {}) == {"qlm.reason": "instance_lost"}
    now_ns = time.time_ns()
    assert span.start_time is not None and span.end_time is not None
    assert now_ns - 60 * NS < span.start_time <= span.end_time <= now_ns  # default times: now


def test_a_preempted_requests_span_ends_with_its_preemptions_and_tokens_computed_again(otel: Otel) -> None:
    """The simulator totals preemptions at the end (no ``qlm.evicted`` event): the span still says."""
    tel = otel.telemetry()
    start(tel, request_id="r1")
    finish(tel, request_id="r1", preemptions=2, wasted_tokens=180)
    start(tel, request_id="r2")
    finish(tel, request_id="r2")
    preempted, plain = otel.finished()
    assert (preempted.attributes or {})["qlm.preemptions"] == 2
    assert (preempted.attributes or {})["qlm.wasted_tokens"] == 180
    assert "qlm.preemptions" not in (plain.attributes or {})


def test_failed_request_has_error_status(otel: Otel) -> None:
    tel = otel.telemetry()
    start(tel)
    finish(
        tel, status="failed", slo_met=False, ttft_s=None, e2e_s=None, finish_reason="", error="engine died"
    )
    (span,) = otel.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "engine died"
    attrs = dict(span.attributes or {})
    assert attrs["qlm.status"] == "failed"
    assert "gen_ai.response.finish_reasons" not in attrs
    assert "qlm.ttft_s" not in attrs


def test_failures_say_why_and_only_successes_count_in_the_token_latencies(otel: Otel) -> None:
    """A failed request's span is an ERROR whose ``error.type`` says why; a cancelled one's is the
    client's doing, not an error of the server's (``qlm.status`` says it). TTFT and time per token
    count successful responses only, as the GenAI conventions define them (a request cancelled
    after 120 s was in the TTFT histogram); the duration keeps the others apart by error.type."""
    tel = otel.telemetry()
    ends = [
        ("ok", "finished", "stop"),
        ("f", "failed", ""),
        ("gave-up", "failed", "error"),
        ("unserved", "failed", "unserved"),
        ("c", "cancelled", "cancelled"),
    ]
    for rid, status, reason in ends:
        start(tel, rid, operation="text_completion")
        finish(
            tel,
            rid,
            status=status,
            slo_met=status == "finished",
            operation="text_completion",
            finish_reason=reason,
            ttft_s=0.5,
            e2e_s=2.5,
            output_tokens=5,
        )
    spans = {dict(s.attributes or {})["qlm.request.id"]: s for s in otel.finished()}
    assert {rid: dict(span.attributes or {}).get("error.type") for rid, span in spans.items()} == {
        "ok": None,
        "f": "failed",
        "gave-up": "attempts_exhausted",
        "unserved": "unserved",
        "c": None,
    }
    assert {rid: span.status.status_code for rid, span in spans.items()} == {
        "ok": StatusCode.UNSET,
        "f": StatusCode.ERROR,
        "gave-up": StatusCode.ERROR,
        "unserved": StatusCode.ERROR,
        "c": StatusCode.UNSET,
    }
    assert dict(spans["c"].attributes or {})["qlm.status"] == "cancelled"
    assert {dict(s.attributes or {})["gen_ai.response.id"] for s in spans.values()} == {
        f"cmpl-{rid}" for rid, _, _ in ends
    }
    durations = {
        p.attributes.get("error.type"): p.count
        for p in otel.points("gen_ai.server.request.duration")
        if p.attributes["gen_ai.provider.name"] == "qlm"
    }
    assert durations == {None: 1, "failed": 1, "attempts_exhausted": 1, "unserved": 1, "cancelled": 1}
    (ttft,) = otel.points("gen_ai.server.time_to_first_token")
    assert ttft.count == 1 and "error.type" not in ttft.attributes
    (per_token,) = otel.points("gen_ai.server.time_per_output_token")
    assert (per_token.count, per_token.sum) == (1, pytest.approx(0.5))  # (2.5 - 0.5) s / 4 tokens
    s = prometheus_samples(tel)
    assert sample(s, "qlm_time_to_first_token_seconds_count", model="llama", slo_class="interactive") == 1
    assert sample(s, "qlm_time_per_output_token_seconds_sum", model="llama", slo_class="interactive") == 0.5
    for status, n in [("finished", 1), ("failed", 3), ("cancelled", 1)]:
        labels = {"model": "llama", "slo_class": "interactive", "status": status}
        assert sample(s, "qlm_request_duration_seconds_count", **labels) == n


def test_a_requests_trace_context_is_its_spans_for_the_engine(otel: Otel) -> None:
    tel = otel.telemetry()
    start(tel)
    context = tel.trace_context("r1")
    finish(tel)
    (span,) = otel.finished()
    assert span.context is not None
    assert context["traceparent"].startswith(f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-")
    assert tel.trace_context("r1") == {} and Telemetry().trace_context("x") == {}  # ended; no SDK


def test_a_refused_request_has_an_error_span_in_its_clients_trace(otel: Otel) -> None:
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    parent = TraceContextTextMapPropagator().extract({"traceparent": f"00-{trace_id}-{span_id}-01"})
    tel = otel.telemetry()
    tel.request_rejected(
        model="llama",
        slo_class="interactive",
        reason="limit",
        operation="chat",
        message="tenant acme has 8 requests queued, its limit",
        parent=parent,
        start_time=1000.0,
    )
    (span,) = otel.finished()
    assert (span.name, span.kind, span.start_time) == ("chat llama", SpanKind.SERVER, 1000 * NS)
    assert span.parent is not None and span.parent.span_id == int(span_id, 16)
    assert span.context is not None and span.context.trace_id == int(trace_id, 16)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "tenant acme has 8 requests queued, its limit"
    attrs = dict(span.attributes or {})
    assert (attrs["error.type"], attrs["qlm.status"], attrs["qlm.slo.class"]) == (
        "limit",
        "rejected",
        "interactive",
    )


def test_parent_context_joins_the_clients_trace(otel: Otel) -> None:
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    parent = TraceContextTextMapPropagator().extract({"traceparent": f"00-{trace_id}-{span_id}-01"})
    tel = otel.telemetry()
    start(tel, parent=parent)
    start(tel, "r2")  # no parent: a trace of its own
    finish(tel)
    finish(tel, "r2")
    child, root = otel.finished()
    assert child.context is not None and child.parent is not None
    assert child.context.trace_id == int(trace_id, 16)
    assert child.parent.span_id == int(span_id, 16)
    assert child.parent.is_remote
    assert root.parent is None
    assert root.context is not None and root.context.trace_id != int(trace_id, 16)


def test_unknown_requests_are_ignored_and_metrics_still_recorded(otel: Otel) -> None:
    tel = otel.telemetry()
    tel.request_event("ghost", "qlm.dispatched", {"qlm.instance.id": "i0"})
    finish(tel, "ghost")  # started before a restart: metrics, no span
    assert otel.finished() == ()
    assert tel.open_spans() == 0
    point = otel.point(
        "qlm.requests.finished",
        **{"gen_ai.request.model": "llama", "qlm.slo.class": "interactive", "qlm.status": "completed"},
        **{"qlm.slo.met": True},
    )
    assert point.value == 1


def test_starting_twice_closes_the_first_span(otel: Otel) -> None:
    tel = otel.telemetry()
    start(tel)
    start(tel)
    assert tel.open_spans() == 1
    finish(tel)
    assert len(otel.finished()) == 2
    assert tel.open_spans() == 0


def test_spans_still_open_when_the_coordinator_stops_are_ended_and_exported(otel: Otel) -> None:
    """An unended span is never exported: the trace of a request still queued at a stop was lost."""
    tel = otel.telemetry()
    start(tel, "r1")
    start(tel, "r2")
    tel.lso_started("c1", op="evict", instance_id="i0", request_id="r1")
    tel.close()
    assert tel.open_spans() == 0
    ended = {s.name: s for s in otel.finished()}
    assert len(otel.finished()) == 3 and "qlm.lso.evict" in ended
    assert all((s.attributes or {}).get("qlm.status") == "interrupted" for s in otel.finished())


# ---------------------------------------------------------------- replan and LSO spans


def test_replan_span_and_planner_histogram(otel: Otel) -> None:
    tel = otel.telemetry()
    tel.replan(duration_s=0.012, solver="plugin", groups=3, actions=5, start_time=2000.0)
    tel.replan(duration_s=0.002, solver="heuristic", groups=1, actions=0)
    tel.replan(duration_s=0.001, solver="heuristic", groups=0, actions=0)  # idle: no trace, timed
    plugin, heuristic = otel.finished()
    assert plugin.name == "qlm.replan"
    assert plugin.kind is SpanKind.INTERNAL
    assert plugin.start_time == 2000 * NS
    assert plugin.end_time == 2000 * NS + 12_000_000
    assert dict(plugin.attributes or {}) == {
        "qlm.plan.solver": "plugin",
        "qlm.plan.groups": 3,
        "qlm.plan.actions": 5,
    }
    assert heuristic.end_time is not None and heuristic.start_time is not None
    assert heuristic.end_time - heuristic.start_time == 2_000_000
    point = otel.point("qlm.planner.duration", **{"qlm.plan.solver": "plugin"})
    assert point.count == 1
    assert point.sum == pytest.approx(0.012)
    assert otel.point("qlm.planner.duration", **{"qlm.plan.solver": "heuristic"}).count == 2


def test_lso_spans_are_children_of_their_request_and_counted(otel: Otel) -> None:
    tel = otel.telemetry()
    start(tel)
    tel.lso_started("c1", op="evict", instance_id="i0", request_id="r1")
    tel.lso_finished("c1", ok=True, attributes={"qlm.evict.mode": "swap"})
    tel.lso_started("c2", op="load_model", instance_id="i1", model="mistral")
    tel.lso_finished("c2", ok=False, error="out of memory")
    tel.lso_finished("c3", ok=True)  # unknown: ignored
    finish(tel)
    evict, load, request = otel.finished()

    assert evict.name == "qlm.lso.evict"
    assert evict.parent is not None and request.context is not None and evict.context is not None
    assert evict.parent.span_id == request.context.span_id
    assert evict.context.trace_id == request.context.trace_id
    assert dict(evict.attributes or {}) == {
        "qlm.lso.op": "evict",
        "qlm.instance.id": "i0",
        "qlm.request.id": "r1",
        "qlm.lso.ok": True,
        "qlm.evict.mode": "swap",
    }
    assert evict.status.status_code is StatusCode.UNSET

    assert load.name == "qlm.lso.load_model"
    assert load.parent is None
    assert dict(load.attributes or {})["qlm.model"] == "mistral"
    assert load.status.status_code is StatusCode.ERROR
    assert load.status.description == "out of memory"

    assert otel.point("qlm.lso", **{"qlm.lso.op": "evict", "qlm.lso.ok": True}).value == 1
    assert otel.point("qlm.lso", **{"qlm.lso.op": "load_model", "qlm.lso.ok": False}).value == 1


# ---------------------------------------------------------------- metrics


def run_workload(tel: Telemetry) -> None:
    """Three interactive requests on llama (two meet their SLO), one batch on mistral, rejections,
    instance events."""
    for i, (met, ttft, predicted) in enumerate([(True, 0.5, 1.0), (True, 1.0, 0.75), (False, 3.0, None)]):
        start(tel, f"i{i}")
        finish(tel, f"i{i}", slo_met=met, ttft_s=ttft, e2e_s=ttft + 2.0, predicted_wait_s=predicted)
    start(tel, "b0", model="mistral", slo_class="batch")
    finish(tel, "b0", model="mistral", slo_class="batch", ttft_s=40.0, e2e_s=100.0)
    tel.request_rejected(model="llama", slo_class="interactive", reason="queue_full")
    tel.request_rejected(model="llama", slo_class="interactive", reason="queue_full")
    tel.instance_event("i0", "registered")
    tel.instance_event("i1", "registered")
    tel.instance_event("i1", "lost")


DEPTH: Mapping[tuple[str, str], int] = {("llama", "interactive"): 7, ("mistral", "batch"): 42}


def test_otel_metrics_carry_values_and_attributes(otel: Otel) -> None:
    tel = otel.telemetry(queue_depth=lambda: DEPTH)
    run_workload(tel)

    finished = {
        (
            p.attributes["gen_ai.request.model"],
            p.attributes["qlm.slo.class"],
            p.attributes["qlm.slo.met"],
        ): p.value
        for p in otel.points("qlm.requests.finished")
    }
    assert finished == {
        ("llama", "interactive", True): 2,
        ("llama", "interactive", False): 1,
        ("mistral", "batch", True): 1,
    }
    rejected = otel.point(
        "qlm.requests.rejected",
        **{"gen_ai.request.model": "llama", "qlm.slo.class": "interactive", "qlm.reason": "queue_full"},
    )
    assert rejected.value == 2

    # the GenAI conventions require the operation's and provider's names on the gen_ai.server.* histograms
    llama = {
        "gen_ai.request.model": "llama",
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "qlm",
        "qlm.slo.class": "interactive",
    }
    ttft = otel.point("gen_ai.server.time_to_first_token", **llama)
    assert (ttft.count, ttft.sum) == (3, pytest.approx(4.5))
    bounds = list(ttft.explicit_bounds)
    assert bounds == list(LATENCY_BUCKETS)  # the bucket advice is taken
    counts = dict(zip([*bounds, float("inf")], ttft.bucket_counts, strict=True))
    assert (counts[0.5], counts[1.0], counts[5.0], sum(counts.values())) == (1, 1, 1, 3)  # (lo, hi] buckets
    duration = otel.point(
        "gen_ai.server.request.duration",
        **{
            "gen_ai.request.model": "mistral",
            "gen_ai.operation.name": "text_completion",
            "gen_ai.provider.name": "qlm",
            "qlm.slo.class": "batch",
        },
    )
    assert (duration.count, duration.sum) == (1, pytest.approx(100.0))
    assert max(duration.explicit_bounds) >= 600  # buckets reach minutes

    # predicted - actual: +0.5 (over-estimate), -0.25 (under); the third request has no prediction
    over = otel.point(
        "qlm.estimator.error", **{"qlm.slo.class": "interactive", "qlm.estimator.direction": "over"}
    )
    under = otel.point(
        "qlm.estimator.error", **{"qlm.slo.class": "interactive", "qlm.estimator.direction": "under"}
    )
    assert (over.count, over.sum) == (1, pytest.approx(0.5))
    assert (under.count, under.sum) == (1, pytest.approx(0.25))
    assert len(otel.points("qlm.estimator.error")) == 2  # no batch point: no prediction

    depth = {
        (p.attributes["gen_ai.request.model"], p.attributes["qlm.slo.class"]): p.value
        for p in otel.points("qlm.queue.depth")
    }
    assert depth == DEPTH
    attainment = {p.attributes["qlm.slo.class"]: p.value for p in otel.points("qlm.slo.attainment")}
    assert attainment == {"interactive": pytest.approx(2 / 3), "batch": 1.0}

    events = {p.attributes["qlm.instance.event"]: p.value for p in otel.points("qlm.instance.events")}
    assert events == {"registered": 2, "lost": 1}


def test_a_request_cancelled_before_its_slo_was_missed_is_left_out_of_the_attainment(otel: Otel) -> None:
    """A client that leaves says nothing of the SLO: its request is out of the ratio, unless its
    SLO was missed by then (a batch whose window expired, a client that gave up late); a failed
    request is a miss."""
    tel = otel.telemetry()
    start(tel, "met")
    finish(tel, "met")
    start(tel, "failed")
    finish(tel, "failed", status="failed", slo_met=False, ttft_s=None, e2e_s=1.0)
    start(tel, "left-early")  # TTFT SLO 2 s: cancelled after 1 s, no token yet
    finish(tel, "left-early", status="cancelled", slo_met=False, ttft_s=None, e2e_s=1.0)
    start(tel, "left-late")  # cancelled after 3 s, no token yet: the TTFT SLO was missed
    finish(tel, "left-late", status="cancelled", slo_met=False, ttft_s=None, e2e_s=3.0)
    start(tel, "expired", slo_class="batch", ttft_slo_s=None, e2e_slo_s=60.0)  # its window passed
    finish(tel, "expired", slo_class="batch", status="cancelled", slo_met=False, ttft_s=5.0, e2e_s=61.0)
    start(tel, "batch-left", slo_class="batch", ttft_slo_s=None, e2e_slo_s=60.0)
    finish(tel, "batch-left", slo_class="batch", status="cancelled", slo_met=False, ttft_s=5.0, e2e_s=30.0)

    want = {"interactive": pytest.approx(1 / 3), "batch": 0.0}
    assert {p.attributes["qlm.slo.class"]: p.value for p in otel.points("qlm.slo.attainment")} == want
    s = prometheus_samples(tel)
    assert {c: sample(s, "qlm_slo_attainment", slo_class=c) for c in want} == want


def test_queue_depth_is_read_at_collection_time(otel: Otel) -> None:
    depth = {("llama", "interactive"): 1}
    tel = otel.telemetry(queue_depth=lambda: depth)
    assert (
        otel.point(
            "qlm.queue.depth", **{"gen_ai.request.model": "llama", "qlm.slo.class": "interactive"}
        ).value
        == 1
    )
    depth[("llama", "interactive")] = 5
    assert (
        otel.point(
            "qlm.queue.depth", **{"gen_ai.request.model": "llama", "qlm.slo.class": "interactive"}
        ).value
        == 5
    )
    assert tel.open_spans() == 0


# ---------------------------------------------------------------- Prometheus


def prometheus_samples(tel: Telemetry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = tel.prometheus_text()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_prometheus_text_parses_and_has_the_samples() -> None:
    tel = Telemetry(queue_depth=lambda: DEPTH)  # the no-op global OTel providers: Prometheus still counts
    run_workload(tel)
    tel.replan(duration_s=0.004, solver="plugin", groups=2, actions=1)
    tel.lso_started("c1", op="swap_in", instance_id="i0")
    tel.lso_finished("c1", ok=True)
    s = prometheus_samples(tel)

    labels = {"model": "llama", "slo_class": "interactive", "status": "completed"}
    assert sample(s, "qlm_requests_finished_total", **labels, slo_met="true") == 2
    assert sample(s, "qlm_requests_finished_total", **labels, slo_met="false") == 1
    assert (
        sample(s, "qlm_requests_rejected_total", model="llama", slo_class="interactive", reason="queue_full")
        == 2
    )
    assert sample(s, "qlm_queue_depth", model="mistral", slo_class="batch") == 42
    assert sample(s, "qlm_slo_attainment", slo_class="interactive") == pytest.approx(2 / 3)
    assert sample(s, "qlm_slo_attainment", slo_class="batch") == 1.0
    llama = {"model": "llama", "slo_class": "interactive"}
    assert sample(s, "qlm_time_to_first_token_seconds_count", **llama) == 3
    assert sample(s, "qlm_time_to_first_token_seconds_bucket", **llama, le="0.5") == 1
    assert sample(s, "qlm_time_to_first_token_seconds_bucket", **llama, le="1.0") == 2
    mistral = {"model": "mistral", "slo_class": "batch", "status": "completed"}
    assert sample(s, "qlm_request_duration_seconds_sum", **mistral) == pytest.approx(100.0)
    assert sample(s, "qlm_estimator_error_seconds_count", slo_class="interactive", direction="over") == 1
    assert sample(s, "qlm_estimator_error_seconds_sum", slo_class="interactive", direction="over") == 0.5
    assert (
        sample(s, "qlm_estimator_error_seconds_bucket", slo_class="interactive", direction="under", le="0.25")
        == 1
    )
    assert (
        sample(s, "qlm_estimator_error_seconds_bucket", slo_class="interactive", direction="under", le="0.1")
        == 0
    )
    assert sample(s, "qlm_planner_duration_seconds_count", solver="plugin") == 1
    assert sample(s, "qlm_planner_duration_seconds_bucket", solver="plugin", le="0.005") == 1
    assert sample(s, "qlm_lso_total", op="swap_in", ok="true") == 1
    assert sample(s, "qlm_instance_events_total", event="registered") == 2
    assert sample(s, "qlm_instance_events_total", event="lost") == 1


def test_a_failing_queue_depth_callback_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Mapping[tuple[str, str], int]:
        raise RuntimeError("queue gone")

    tel = Telemetry(queue_depth=broken)
    finish(tel)
    s = prometheus_samples(tel)
    assert sample(s, "qlm_slo_attainment", slo_class="interactive") == 1.0
    assert not any(name == "qlm_queue_depth" for name, _ in s)
    assert "queue_depth callback failed" in caplog.text


def test_two_instances_do_not_share_counts(otel: Otel) -> None:
    first = otel.telemetry()
    second_reader = InMemoryMetricReader()
    second_mp = MeterProvider(metric_readers=[second_reader])
    second = Telemetry(tracer_provider=otel.tracer_provider, meter_provider=second_mp)
    finish(first)
    finish(first)
    finish(second, slo_met=False)
    first_s, second_s = prometheus_samples(first), prometheus_samples(second)
    labels = {"model": "llama", "slo_class": "interactive", "status": "completed"}
    assert sample(first_s, "qlm_requests_finished_total", **labels, slo_met="true") == 2
    assert ("qlm_requests_finished_total", frozenset({**labels, "slo_met": "false"}.items())) not in first_s
    assert sample(second_s, "qlm_requests_finished_total", **labels, slo_met="false") == 1
    assert sample(first_s, "qlm_slo_attainment", slo_class="interactive") == 1.0
    assert sample(second_s, "qlm_slo_attainment", slo_class="interactive") == 0.0
    attainment = {p.attributes["qlm.slo.class"]: p.value for p in otel.points("qlm.slo.attainment")}
    assert attainment == {"interactive": 1.0}
    second_mp.shutdown()


# ---------------------------------------------------------------- the API / SDK split


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_library_module_does_not_import_the_sdk() -> None:
    run_python(
        """
        import sys
        import qlm_plugin.telemetry.instruments
        tel = qlm_plugin.telemetry.instruments.Telemetry()
        tel.request_started("r", model="m", operation="chat", slo_class="c", tenant="t", max_tokens=1,
                            input_tokens=1, ttft_slo_s=None, e2e_slo_s=None)
        tel.request_finished("r", status="completed", slo_met=True, model="m", slo_class="c", ttft_s=0.1,
                             e2e_s=0.2, output_tokens=1, finish_reason="stop")
        tel.prometheus_text()
        leaked = [m for m in sys.modules if m.startswith("opentelemetry.sdk")]
        assert not leaked, leaked
        """
    )


def test_configure_without_endpoint_returns_working_providers() -> None:
    tracer_provider, meter_provider = telemetry_sdk.configure(otlp_endpoint=None, set_global=False)
    try:
        exporter = InMemorySpanExporter()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        assert tracer_provider.resource.attributes["service.name"] == "qlm-coordinator"
        assert tracer_provider.resource.attributes["service.version"] == "0.1.0"
        tel = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
        start(tel)
        finish(tel)
        (span,) = exporter.get_finished_spans()
        assert span.name == "chat llama"
        assert span.resource.attributes["service.name"] == "qlm-coordinator"
    finally:
        telemetry_sdk.shutdown((tracer_provider, meter_provider), timeout_s=1.0)


def test_configure_sets_the_global_providers() -> None:
    run_python(
        """
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from qlm_plugin.telemetry import sdk as telemetry_sdk
        from qlm_plugin.telemetry.instruments import LATENCY_BUCKETS, Telemetry

        tp, mp = telemetry_sdk.configure(otlp_endpoint=None, service_name="qlm-test")
        assert trace.get_tracer_provider() is tp and metrics.get_meter_provider() is mp
        exporter = InMemorySpanExporter()
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        Telemetry().replan(duration_s=0.01, solver="heuristic", groups=1, actions=1)
        (span,) = exporter.get_finished_spans()
        assert span.resource.attributes["service.name"] == "qlm-test"
        telemetry_sdk.shutdown((tp, mp))
        """
    )


def test_configure_with_an_unreachable_endpoint_shuts_down_in_time() -> None:
    tracer_provider, meter_provider = telemetry_sdk.configure(otlp_endpoint="localhost:1", set_global=False)
    tel = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    start(tel)
    finish(tel)
    began = time.monotonic()
    telemetry_sdk.shutdown((tracer_provider, meter_provider), timeout_s=0.5)
    assert time.monotonic() - began < 3.0


def test_configure_without_the_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.metrics", None)
    with pytest.raises(RuntimeError, match=r"pip install 'qlm-plugin\[otel\]'"):
        telemetry_sdk.configure(otlp_endpoint=None)


def test_the_standard_environment_names_the_service_and_secures_the_exporter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) tells coordinators apart:
    it was overridden by the built-in name; OTEL_EXPORTER_OTLP_INSECURE=false was ignored for a
    bare host:port endpoint, exported in plaintext."""

    def configured(endpoint: str | None = None) -> tuple[str, bool | None]:
        tp, mp = telemetry_sdk.configure(otlp_endpoint=endpoint, set_global=False)
        try:
            name = str(tp.resource.attributes["service.name"])
            processors = tp._active_span_processor._span_processors  # the exporter's own setting
            return name, processors[0].span_exporter._insecure if processors else None  # type: ignore[attr-defined]
        finally:
            telemetry_sdk.shutdown((tp, mp), timeout_s=0.5)

    for variable in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_INSECURE"):
        monkeypatch.delenv(variable, raising=False)
    assert configured("localhost:1") == ("qlm-coordinator", True)  # a collector beside it
    assert configured("https://localhost:1")[1] is False
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=qlm-east,deployment.environment=prod")
    assert configured()[0] == "qlm-east"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "qlm-west")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "false")
    assert configured("localhost:1") == ("qlm-west", False)


def test_the_cli_exports_where_the_environment_says_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlm_plugin import cli
    from qlm_plugin.coordinator import cli as coordinator_cli

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:1")
    providers = coordinator_cli._telemetry_sdk(None)  # no --otlp-endpoint: the environment's
    assert providers is not None
    telemetry_sdk.shutdown(providers, timeout_s=0.5)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert coordinator_cli._telemetry_sdk("localhost:1") is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.metrics", None)  # the otel extra left out
    assert cli.main(["coordinator", "--otlp-endpoint", "localhost:1", "--grpc-port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qlm coordinator: error: cannot export to localhost:1: the OpenTelemetry SDK")
    assert "Traceback" not in err and "pip install 'qlm-plugin[otel]'" in err
