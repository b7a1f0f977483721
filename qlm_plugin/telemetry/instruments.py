"""Traces and metrics of the coordinator: OpenTelemetry (API only) and Prometheus.

This module imports the OpenTelemetry *API* only: with no SDK installed or configured every span and
OTel instrument is a no-op and costs next to nothing. ``qlm_plugin.telemetry.sdk`` builds real SDK
providers (``--otlp-endpoint``); tests pass their own SDK providers to :class:`Telemetry`.

Prometheus metrics live in a :class:`prometheus_client.CollectorRegistry` owned by each
:class:`Telemetry`, so several coordinators in one process (tests) keep separate counts. They are
kept as plain numbers and turned into metric families at scrape time: prometheus_client's own
metric objects take a lock per update, which made up half of a request's telemetry cost.

Names follow the OpenTelemetry GenAI semantic conventions where they fit (spans
``"{gen_ai.operation.name} {gen_ai.request.model}"`` of kind SERVER, ``gen_ai.*`` attributes, the
``gen_ai.server.*`` histograms); everything of our own is under ``qlm.*``. The attribute names are
plain strings here, not taken from the semantic-conventions package, which is still unstable.
"""

from __future__ import annotations

import itertools
import logging
import time as _time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from qlm_plugin import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

__all__ = ["Telemetry"]

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "qlm_plugin"

# ---- GenAI semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/)
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
ERROR_TYPE = "error.type"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_SERVER_TTFT = "gen_ai.server.time_to_first_token"
GEN_AI_SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
#: ``gen_ai.provider.name``, required on GenAI spans and ``gen_ai.server.*`` metrics: no well-known
#: value names a self-hosted server (vLLM included), and the conventions allow a custom one.
PROVIDER = "qlm"
#: The events of ``qlm.instance.events`` (label ``event``).
INSTANCE_EVENTS_HELP = (
    "Serving instance sessions by event: registered, reconnected, left (its agent stopped), lost "
    "(no heartbeat, a broken stream), parked (stopped cold by its device)"
)
#: The response id an OpenAI client gets (the ``id`` of the body and of each chunk), per operation.
RESPONSE_ID_PREFIX = {"chat": "chatcmpl"}

# ---- our own attributes
QLM_REQUEST_ID = "qlm.request.id"
QLM_SLO_CLASS = "qlm.slo.class"
QLM_TENANT = "qlm.tenant"
QLM_SLO_TTFT_S = "qlm.slo.ttft_s"
QLM_SLO_E2E_S = "qlm.slo.e2e_s"
QLM_SLO_MET = "qlm.slo.met"
QLM_LATE = "qlm.late"
QLM_STATUS = "qlm.status"
QLM_TTFT_S = "qlm.ttft_s"
QLM_E2E_S = "qlm.e2e_s"
QLM_REASON = "qlm.reason"
QLM_ESTIMATE_WAIT_S = "qlm.estimate.wait_s"
QLM_ESTIMATE_P_MEET = "qlm.estimate.p_meet"
QLM_INSTANCE_PLANNED = "qlm.instance.planned"
QLM_INSTANCE_ID = "qlm.instance.id"
QLM_INSTANCE_EVENT = "qlm.instance.event"
QLM_ATTEMPT = "qlm.attempt"
QLM_EVICT_MODE = "qlm.evict.mode"
QLM_WASTED_TOKENS = "qlm.wasted_tokens"
QLM_PREEMPTIONS = "qlm.preemptions"
QLM_PLAN_SOLVER = "qlm.plan.solver"
QLM_PLAN_GROUPS = "qlm.plan.groups"
QLM_PLAN_ACTIONS = "qlm.plan.actions"
QLM_ESTIMATOR_DIRECTION = "qlm.estimator.direction"  # "over" (predicted >= actual) or "under"
QLM_LSO_OP = "qlm.lso.op"
QLM_LSO_OK = "qlm.lso.ok"
QLM_MODEL = "qlm.model"

# ---- event names used by the coordinator
EVENT_QUEUED = "qlm.queued"
EVENT_PLANNED = "qlm.planned"
EVENT_DISPATCHED = "qlm.dispatched"
EVENT_FIRST_TOKEN = "qlm.first_token"
EVENT_EVICTED = "qlm.evicted"
EVENT_SWAPPED_IN = "qlm.swapped_in"
EVENT_REQUEUED = "qlm.requeued"

# ---- histogram buckets (seconds). LLM latencies run from a few ms (a TTFT on an idle engine) to
# tens of minutes (batch-class requests that wait behind interactive work).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
)  # fmt: skip
# The estimator error predicted - actual is signed, but OpenTelemetry histograms drop negative values
# and Prometheus ones lose their _sum: both record its size, the sign goes to a direction attribute.
ERROR_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
# The time per output token after the first: the GenAI conventions' buckets.
TOKEN_TIME_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
#: The ``error.type`` of a failed request, by its finish reason (any other: ``failed``).
FAILURE_TYPES = {"refused": "refused", "unserved": "unserved", "error": "attempts_exhausted"}
# A replanning is meant to take milliseconds (20 ms at p99 with 10k queued requests).
PLANNER_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


#: What the SLO attainment ratio counts (the Prometheus HELP and the OTel description).
ATTAINMENT_HELP = (
    "Requests that met their SLO / requests that ended, per SLO class; a failed request counts as a "
    "miss, one cancelled before its SLO was missed is left out"
)
#: What the refusal counter counts.
REJECTED_HELP = (
    "Requests refused at admission, by reason (its error code); model 'unknown' for a model not served"
)


def _ns(seconds: float | None) -> int | None:
    """Unix seconds -> the nanoseconds OpenTelemetry wants (None: let it take the current time)."""
    return None if seconds is None else int(seconds * 1e9)


def _missed(
    slos: tuple[float | None, float | None] | None, ttft_s: float | None, e2e_s: float | None
) -> bool:
    """Whether a request that ended ``e2e_s`` after its arrival (its first token after ``ttft_s``,
    None: none yet) had missed its SLO (``slos``: TTFT, E2E seconds) by then."""
    if slos is None or e2e_s is None:
        return False
    ttft_slo, e2e_slo = slos
    if ttft_slo is not None and (e2e_s if ttft_s is None else ttft_s) > ttft_slo:
        return True
    return e2e_slo is not None and e2e_s > e2e_slo


def _bool_label(value: bool) -> str:
    return "true" if value else "false"


class _PromCounter:
    """A Prometheus counter as plain numbers (one writer, the event loop: no lock needed)."""

    __slots__ = ("documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...]) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + 1.0

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):  # list(): one step, safe against the loop
            family.add_metric(labels, value)
        return family


class _PromSeries:
    """One labelled series of a histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bucket with value <= le
        self.sum += value


class _PromHistogram:
    """A Prometheus histogram as plain numbers, one :class:`_PromSeries` per label tuple."""

    __slots__ = ("bounds", "documentation", "labelnames", "les", "name", "series")

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = bounds
        self.les = [repr(float(b)) for b in bounds] + ["+Inf"]
        self.series: dict[tuple[str, ...], _PromSeries] = {}

    def labels(self, *values: str) -> _PromSeries:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _PromSeries(self.bounds)
        return series

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self.series.items()):
            cumulative = itertools.accumulate(list(series.counts))
            family.add_metric(labels, list(zip(self.les, cumulative, strict=True)), series.sum)
        return family


class _ModelSeries(NamedTuple):
    """What one request's latencies are recorded in, per (model, class, operation, status)."""

    attributes: Mapping[str, AttributeValue]
    ttft: _PromSeries
    token_time: _PromSeries
    duration: _PromSeries


class _PromCollector:
    """The Prometheus side of one :class:`Telemetry`, collected at scrape time."""

    def __init__(self, owner: Telemetry, instruments: list[_PromCounter | _PromHistogram]) -> None:
        self._owner = weakref.ref(owner)
        self._instruments = instruments

    def describe(self) -> Iterable[Metric]:
        # Declares the names, so the registry rejects a clash, without calling the depth callback.
        return [
            *(
                HistogramMetricFamily(m.name, "")
                if isinstance(m, _PromHistogram)
                else CounterMetricFamily(m.name, "")
                for m in self._instruments
            ),
            GaugeMetricFamily("qlm_queue_depth", ""),
            GaugeMetricFamily("qlm_slo_attainment", ""),
        ]

    def collect(self) -> Iterable[Metric]:
        families = [m.family() for m in self._instruments]
        depth = GaugeMetricFamily(
            "qlm_queue_depth", "Requests queued in the global queue", labels=["model", "slo_class"]
        )
        attainment = GaugeMetricFamily("qlm_slo_attainment", ATTAINMENT_HELP, labels=["slo_class"])
        owner = self._owner()
        if owner is not None:
            for (model, slo_class), n in owner._depth_snapshot():
                depth.add_metric([model, slo_class], n)
            for slo_class, ratio in owner._attainment_snapshot():
                attainment.add_metric([slo_class], ratio)
        return [*families, depth, attainment]


class Telemetry:
    """Spans and metrics of the coordinator.

    Not thread-safe: every method is meant to be called from the coordinator's one event loop. The
    collection side may run on other threads (a Prometheus scrape, the SDK's periodic metric
    reader): it only reads snapshots, and the ``queue_depth`` callback is called from there, so it
    must be safe to call from another thread (return a copy, built without awaiting).

    Request spans are never made current: requests interleave on one loop, so each span is kept by
    request id and ended explicitly. With no ``parent`` a request span takes the current context's
    span (e.g. an instrumented HTTP or gRPC server span) as parent, as OpenTelemetry does by default.

    The observable gauges are registered on the meter provider: give each :class:`Telemetry` its own
    meter provider (the SDK returns the first registration for a name, callbacks included).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        queue_depth: Callable[[], Mapping[tuple[str, str], int]] | None = None,
    ) -> None:
        # The global providers are looked up now, not at import: tests and telemetry_sdk.configure()
        # install theirs first. A global proxy also follows a provider installed later.
        tp = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        mp = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        self._tracer = tp.get_tracer(INSTRUMENTATION_NAME, __version__)
        meter = mp.get_meter(INSTRUMENTATION_NAME, __version__)
        self._queue_depth = queue_depth
        self._requests: dict[str, Span] = {}
        # request id -> its (TTFT, E2E) SLO in seconds from arrival: whether a cancelled request
        # had missed its SLO already (then it counts in the attainment ratio)
        self._slos: dict[str, tuple[float | None, float | None]] = {}
        self._lsos: dict[str, tuple[Span, str]] = {}
        # slo_class -> (met, finished); replaced whole so a reader on another thread sees a pair.
        self._attainment: dict[str, tuple[int, int]] = {}
        # Attribute dicts and Prometheus series per label set: building them costs more than
        # recording, and the label sets are few (models x classes x statuses).
        self._finished_cache: dict[
            tuple[str, str, str, bool], tuple[Mapping[str, AttributeValue], tuple[str, ...]]
        ] = {}
        self._model_cache: dict[tuple[str, str, str, str, str | None], _ModelSeries] = {}
        self._error_cache: dict[tuple[str, bool], tuple[Mapping[str, AttributeValue], _PromSeries]] = {}

        # ---- OpenTelemetry instruments
        self._otel_finished = meter.create_counter(
            "qlm.requests.finished", unit="{request}", description="Requests finished, by outcome"
        )
        self._otel_rejected = meter.create_counter(
            "qlm.requests.rejected", unit="{request}", description=REJECTED_HELP
        )
        self._otel_ttft = meter.create_histogram(
            GEN_AI_SERVER_TTFT,
            unit="s",
            description="Time to generate the first token of a successful response, queueing included",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._otel_token_time = meter.create_histogram(
            GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
            unit="s",
            description="Time per output token after the first, of a successful response",
            explicit_bucket_boundaries_advisory=TOKEN_TIME_BUCKETS,
        )
        self._otel_duration = meter.create_histogram(
            GEN_AI_SERVER_REQUEST_DURATION,
            unit="s",
            description="Time from arrival to the last token",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._otel_estimator_error = meter.create_histogram(
            "qlm.estimator.error",
            unit="s",
            description="|predicted waiting time - actual time to first token|, by direction (over, under)",
            explicit_bucket_boundaries_advisory=ERROR_BUCKETS,
        )
        self._otel_planner = meter.create_histogram(
            "qlm.planner.duration",
            unit="s",
            description="Time of one replanning",
            explicit_bucket_boundaries_advisory=PLANNER_BUCKETS,
        )
        self._otel_lso = meter.create_counter(
            "qlm.lso", unit="{operation}", description="LLM serving operations carried out"
        )
        self._otel_instance_events = meter.create_counter(
            "qlm.instance.events", unit="{event}", description=INSTANCE_EVENTS_HELP
        )
        # Weak references: the (global) meter keeps its callbacks for the life of the process.
        ref = weakref.ref(self)

        def observe_depth(options: CallbackOptions) -> Iterable[Observation]:
            owner = ref()
            if owner is None:
                return []
            return [
                Observation(n, {GEN_AI_REQUEST_MODEL: model, QLM_SLO_CLASS: slo_class})
                for (model, slo_class), n in owner._depth_snapshot()
            ]

        def observe_attainment(options: CallbackOptions) -> Iterable[Observation]:
            owner = ref()
            if owner is None:
                return []
            return [Observation(r, {QLM_SLO_CLASS: c}) for c, r in owner._attainment_snapshot()]

        meter.create_observable_gauge(
            "qlm.queue.depth", [observe_depth], unit="{request}", description="Requests queued"
        )
        meter.create_observable_gauge(
            "qlm.slo.attainment",
            [observe_attainment],
            unit="1",
            description=ATTAINMENT_HELP,
        )

        # ---- Prometheus, in a registry of our own
        self._prom_finished = _PromCounter(
            "qlm_requests_finished",
            "Requests finished, by outcome",
            ("model", "slo_class", "status", "slo_met"),
        )
        self._prom_rejected = _PromCounter(
            "qlm_requests_rejected", REJECTED_HELP, ("model", "slo_class", "reason")
        )
        self._prom_ttft = _PromHistogram(
            "qlm_time_to_first_token_seconds",
            "Time to first token of a successful response, queueing included",
            ("model", "slo_class"),
            LATENCY_BUCKETS,
        )
        self._prom_token_time = _PromHistogram(
            "qlm_time_per_output_token_seconds",
            "Time per output token after the first, of a successful response",
            ("model", "slo_class"),
            TOKEN_TIME_BUCKETS,
        )
        self._prom_duration = _PromHistogram(
            "qlm_request_duration_seconds",
            "Time from arrival to the last token, by status (finished, failed, cancelled)",
            ("model", "slo_class", "status"),
            LATENCY_BUCKETS,
        )
        self._prom_estimator_error = _PromHistogram(
            "qlm_estimator_error_seconds",
            "|predicted waiting time - actual time to first token|, by direction (over, under)",
            ("slo_class", "direction"),
            ERROR_BUCKETS,
        )
        self._prom_planner = _PromHistogram(
            "qlm_planner_duration_seconds", "Time of one replanning", ("solver",), PLANNER_BUCKETS
        )
        self._prom_lso = _PromCounter("qlm_lso", "LLM serving operations carried out", ("op", "ok"))
        self._prom_instance_events = _PromCounter("qlm_instance_events", INSTANCE_EVENTS_HELP, ("event",))
        self._registry = CollectorRegistry()
        self._registry.register(
            _PromCollector(
                self,
                [
                    self._prom_finished,
                    self._prom_rejected,
                    self._prom_ttft,
                    self._prom_token_time,
                    self._prom_duration,
                    self._prom_estimator_error,
                    self._prom_planner,
                    self._prom_lso,
                    self._prom_instance_events,
                ],
            )
        )

    # ------------------------------------------------------------------ requests

    def request_started(
        self,
        request_id: str,
        *,
        model: str,
        operation: str,
        slo_class: str,
        tenant: str,
        max_tokens: int,
        input_tokens: int,
        ttft_slo_s: float | None,
        e2e_slo_s: float | None,
        start_time: float | None = None,
        parent: Context | None = None,
    ) -> None:
        """Open the span of one request (``start_time``: unix seconds; ``parent``: an extracted
        W3C trace context, e.g. the client's ``traceparent``)."""
        attributes: dict[str, AttributeValue] = {
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: PROVIDER,
            GEN_AI_RESPONSE_ID: f"{RESPONSE_ID_PREFIX.get(operation, 'cmpl')}-{request_id}",
            GEN_AI_REQUEST_MODEL: model,
            GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
            GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
            QLM_REQUEST_ID: request_id,
            QLM_SLO_CLASS: slo_class,
            QLM_TENANT: tenant,
        }
        if ttft_slo_s is not None:
            attributes[QLM_SLO_TTFT_S] = ttft_slo_s
        if e2e_slo_s is not None:
            attributes[QLM_SLO_E2E_S] = e2e_slo_s
        if ttft_slo_s is not None or e2e_slo_s is not None:
            self._slos[request_id] = (ttft_slo_s, e2e_slo_s)
        span = self._tracer.start_span(
            f"{operation} {model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=_ns(start_time),
        )
        previous = self._requests.get(request_id)
        if previous is not None:  # started twice: close the first span rather than leak it
            previous.end()
        self._requests[request_id] = span

    def trace_context(self, request_id: str) -> dict[str, str]:
        """The W3C trace context (``traceparent``, ``tracestate``) of the request's span, for the
        call that serves it: an engine that traces (vLLM's ``--otlp-traces-endpoint``) puts its
        spans in the client's trace. Empty while nothing is traced."""
        span = self._requests.get(request_id)
        if span is None or not span.get_span_context().is_valid:
            return {}
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def request_event(
        self,
        request_id: str,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        time: float | None = None,
    ) -> None:
        """An event on the request's span (``time``: unix seconds). An unknown request id is ignored:
        the request may predate a restart of the coordinator."""
        span = self._requests.get(request_id)
        if span is not None:
            span.add_event(name, attributes, timestamp=_ns(time))

    def request_finished(
        self,
        request_id: str,
        *,
        status: str,
        slo_met: bool,
        model: str,
        slo_class: str,
        ttft_s: float | None,
        e2e_s: float | None,
        output_tokens: int,
        finish_reason: str,
        operation: str = "text_completion",
        predicted_wait_s: float | None = None,
        late: bool = False,
        error: str = "",
        end_time: float | None = None,
        preemptions: int = 0,
        wasted_tokens: int = 0,
    ) -> None:
        """End the request's span and record the request's metrics; the metrics are recorded even
        if :meth:`request_started` never ran. ``preemptions`` and ``wasted_tokens`` (the tokens
        computed again after them) go on the span: an engine that totals them at the end (the
        simulator) reports no ``qlm.evicted`` event. A failed request's span has ERROR status and an
        ``error.type`` saying why (:data:`FAILURE_TYPES`); a cancelled one's is not an error of the
        server's (the client's doing, as a 4xx) and says so in ``qlm.status``. The latency metrics
        keep both apart from successes: TTFT and time per token count successful responses only,
        as the GenAI conventions define them; the duration carries ``error.type``."""
        failure = FAILURE_TYPES.get(finish_reason, "failed") if status == "failed" else None
        error_type = failure or ("cancelled" if status == "cancelled" else None)
        span = self._requests.pop(request_id, None)
        if span is not None:
            if span.is_recording():  # skips building the attributes when tracing is off
                attributes: dict[str, AttributeValue] = {
                    QLM_STATUS: status,
                    QLM_SLO_MET: slo_met,
                    QLM_LATE: late,
                    GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
                }
                if failure is not None:
                    attributes[ERROR_TYPE] = failure
                if finish_reason:
                    attributes[GEN_AI_RESPONSE_FINISH_REASONS] = (finish_reason,)
                if ttft_s is not None:
                    attributes[QLM_TTFT_S] = ttft_s
                if e2e_s is not None:
                    attributes[QLM_E2E_S] = e2e_s
                if predicted_wait_s is not None:
                    attributes[QLM_ESTIMATE_WAIT_S] = predicted_wait_s
                if preemptions:
                    attributes[QLM_PREEMPTIONS] = preemptions
                    attributes[QLM_WASTED_TOKENS] = wasted_tokens
                span.set_attributes(attributes)
                if status == "failed":
                    span.set_status(Status(StatusCode.ERROR, error or "failed"))
            span.end(end_time=_ns(end_time))

        key = (model, slo_class, status, slo_met)
        try:
            finished_attrs, finished_labels = self._finished_cache[key]
        except KeyError:
            finished_attrs = {
                GEN_AI_REQUEST_MODEL: model,
                QLM_SLO_CLASS: slo_class,
                QLM_STATUS: status,
                QLM_SLO_MET: slo_met,
            }
            finished_labels = (model, slo_class, status, _bool_label(slo_met))
            self._finished_cache[key] = (finished_attrs, finished_labels)
        self._otel_finished.add(1, finished_attrs)
        self._prom_finished.inc(finished_labels)

        if ttft_s is not None or e2e_s is not None:
            entry = self._model_entry(model, slo_class, operation, status, error_type)
            if ttft_s is not None and error_type is None:
                self._otel_ttft.record(ttft_s, entry.attributes)
                entry.ttft.observe(ttft_s)
                if e2e_s is not None and output_tokens > 1:
                    per_token = max(0.0, e2e_s - ttft_s) / (output_tokens - 1)
                    self._otel_token_time.record(per_token, entry.attributes)
                    entry.token_time.observe(per_token)
            if e2e_s is not None:
                self._otel_duration.record(e2e_s, entry.attributes)
                entry.duration.observe(e2e_s)
        if predicted_wait_s is not None and ttft_s is not None:
            estimator_error = predicted_wait_s - ttft_s
            over = estimator_error >= 0.0
            error_attrs, error_series = self._error_entry(slo_class, over)
            size = estimator_error if over else -estimator_error
            self._otel_estimator_error.record(size, error_attrs)
            error_series.observe(size)

        slos = self._slos.pop(request_id, None)
        # A request the client cancelled says nothing of the SLO, unless it was missed already.
        if status != "cancelled" or _missed(slos, ttft_s, e2e_s):
            met, finished = self._attainment.get(slo_class, (0, 0))
            self._attainment[slo_class] = (met + 1 if slo_met else met, finished + 1)

    def request_rejected(
        self,
        *,
        model: str,
        slo_class: str,
        reason: str,
        operation: str = "text_completion",
        message: str = "",
        parent: Context | None = None,
        start_time: float | None = None,
    ) -> None:
        """A request refused at admission, counted by ``reason`` (its error code), and its span,
        from ``start_time`` (unix seconds) to now, with ERROR status, ``error.type`` the reason
        and the ``message`` the client got (``model`` and ``slo_class``: labels, names the
        deployment has)."""
        self._otel_rejected.add(
            1, {GEN_AI_REQUEST_MODEL: model, QLM_SLO_CLASS: slo_class, QLM_REASON: reason}
        )
        self._prom_rejected.inc((model, slo_class, reason))
        span = self._tracer.start_span(
            f"{operation} {model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_PROVIDER_NAME: PROVIDER,
                GEN_AI_REQUEST_MODEL: model,
                QLM_SLO_CLASS: slo_class,
                QLM_STATUS: "rejected",
                ERROR_TYPE: reason,
            },
            start_time=_ns(start_time),
        )
        span.set_status(Status(StatusCode.ERROR, message or reason))
        span.end()

    # ------------------------------------------------------------------ planning and serving operations

    def replan(
        self, *, duration_s: float, solver: str, groups: int, actions: int, start_time: float | None = None
    ) -> None:
        """One replanning, already done: the planner-duration histogram, and a ``qlm.replan`` span
        of ``duration_s`` starting at ``start_time`` (unix seconds; default: it ended now) where it
        planned anything (an idle coordinator replans every tick: a trace a second of nothing)."""
        self._otel_planner.record(duration_s, {QLM_PLAN_SOLVER: solver})
        self._prom_planner.labels(solver).observe(duration_s)
        if not groups and not actions:
            return
        if start_time is None:
            end_ns = _time.time_ns()
            start_ns = end_ns - int(duration_s * 1e9)
        else:
            start_ns = int(start_time * 1e9)
            end_ns = start_ns + int(duration_s * 1e9)
        span = self._tracer.start_span(
            "qlm.replan",
            kind=SpanKind.INTERNAL,
            attributes={QLM_PLAN_SOLVER: solver, QLM_PLAN_GROUPS: groups, QLM_PLAN_ACTIONS: actions},
            start_time=start_ns,
        )
        span.end(end_time=end_ns)

    def lso_started(
        self,
        command_id: str,
        *,
        op: str,
        instance_id: str,
        request_id: str | None = None,
        model: str | None = None,
    ) -> None:
        """Open the span ``qlm.lso.{op}`` of one LLM serving operation (evict, swap_in, load_model,
        unload_model, abort). An operation on a request whose span is open becomes its child, so an
        eviction shows inside the request's trace."""
        attributes: dict[str, AttributeValue] = {QLM_LSO_OP: op, QLM_INSTANCE_ID: instance_id}
        if request_id is not None:
            attributes[QLM_REQUEST_ID] = request_id
        if model is not None:
            attributes[QLM_MODEL] = model
        request_span = self._requests.get(request_id) if request_id is not None else None
        parent = trace.set_span_in_context(request_span) if request_span is not None else None
        span = self._tracer.start_span(
            f"qlm.lso.{op}", context=parent, kind=SpanKind.INTERNAL, attributes=attributes
        )
        previous = self._lsos.get(command_id)
        if previous is not None:
            previous[0].end()
        self._lsos[command_id] = (span, op)

    def lso_finished(
        self,
        command_id: str,
        *,
        ok: bool,
        error: str = "",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> None:
        """End an operation's span (ERROR status when not ``ok``) and count it; an unknown id is
        ignored."""
        entry = self._lsos.pop(command_id, None)
        if entry is None:
            return
        span, op = entry
        if span.is_recording():
            span.set_attribute(QLM_LSO_OK, ok)
            if attributes:
                span.set_attributes(attributes)
            if not ok:
                span.set_status(Status(StatusCode.ERROR, error or f"{op} failed"))
        span.end()
        self._otel_lso.add(1, {QLM_LSO_OP: op, QLM_LSO_OK: ok})
        self._prom_lso.inc((op, _bool_label(ok)))

    def instance_event(self, instance_id: str, event: str) -> None:
        """A serving instance's session event (:data:`INSTANCE_EVENTS_HELP`), counted by event,
        not by instance: instance ids would multiply the series."""
        self._otel_instance_events.add(1, {QLM_INSTANCE_EVENT: event})
        self._prom_instance_events.inc((event,))

    # ------------------------------------------------------------------ Prometheus and introspection

    @property
    def registry(self) -> CollectorRegistry:
        """This instance's Prometheus registry (to mount on an HTTP server of one's own)."""
        return self._registry

    def prometheus_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition of this instance's registry: (body, content type)."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def open_spans(self) -> int:
        """Requests whose span is still open (tests, leak checks)."""
        return len(self._requests)

    def close(self) -> None:
        """End every span still open, marked ``qlm.status`` ``interrupted`` (the coordinator
        stops: its requests stay in the journal, and a restart opens new spans for them; an
        unended span is never exported, so the trace up to the stop would be lost)."""
        for span in self._requests.values():
            span.set_attribute(QLM_STATUS, "interrupted")
            span.end()
        self._requests.clear()
        self._slos.clear()
        for span, _ in self._lsos.values():
            span.set_attribute(QLM_STATUS, "interrupted")
            span.end()
        self._lsos.clear()

    # ------------------------------------------------------------------ internals

    def _model_entry(
        self, model: str, slo_class: str, operation: str, status: str, error_type: str | None
    ) -> _ModelSeries:
        key = (model, slo_class, operation, status, error_type)
        try:
            return self._model_cache[key]
        except KeyError:
            # gen_ai.server.* histograms: the GenAI conventions require the operation's and the
            # provider's names, and error.type when the request ended in an error
            attrs: dict[str, AttributeValue] = {
                GEN_AI_REQUEST_MODEL: model,
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_PROVIDER_NAME: PROVIDER,
                QLM_SLO_CLASS: slo_class,
            }
            if error_type is not None:
                attrs[ERROR_TYPE] = error_type
            entry = _ModelSeries(
                attrs,
                self._prom_ttft.labels(model, slo_class),
                self._prom_token_time.labels(model, slo_class),
                self._prom_duration.labels(model, slo_class, status),
            )
            self._model_cache[key] = entry
            return entry

    def _error_entry(self, slo_class: str, over: bool) -> tuple[Mapping[str, AttributeValue], _PromSeries]:
        try:
            return self._error_cache[slo_class, over]
        except KeyError:
            direction = "over" if over else "under"
            entry = (
                {QLM_SLO_CLASS: slo_class, QLM_ESTIMATOR_DIRECTION: direction},
                self._prom_estimator_error.labels(slo_class, direction),
            )
            self._error_cache[slo_class, over] = entry
            return entry

    def set_queue_depth(self, queue_depth: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Name the queue-depth callback after construction (the coordinator that owns the queue
        is built after its telemetry)."""
        self._queue_depth = queue_depth

    def _depth_snapshot(self) -> Iterator[tuple[tuple[str, str], int]]:
        if self._queue_depth is None:
            return iter(())
        try:
            depth = dict(self._queue_depth())
        except Exception:  # a scrape must not fail because of the callback
            log.exception("queue_depth callback failed")
            return iter(())
        return iter(depth.items())

    def _attainment_snapshot(self) -> Iterator[tuple[str, float]]:
        # list(): one step under the GIL, safe against the loop adding a class meanwhile
        for slo_class, (met, finished) in list(self._attainment.items()):
            if finished:
                yield slo_class, met / finished
