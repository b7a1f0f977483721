"""OpenTelemetry SDK set-up for ``--otlp-endpoint``: the only module that imports the SDK and exporters.

The library code (``qlm_plugin.telemetry.instruments``) uses the OpenTelemetry API only; an
application that wants its spans and metrics exported calls :func:`configure` once at start-up and
:func:`shutdown` at exit.
The SDK is an optional dependency: ``pip install 'qlm-plugin[otel]'``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from qlm_plugin import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["configure", "shutdown"]

log = logging.getLogger(__name__)

_MISSING = "the OpenTelemetry {what} is not installed: pip install 'qlm-plugin[otel]'"


def configure(
    *,
    otlp_endpoint: str | None,
    service_name: str = "qlm-coordinator",
    insecure: bool | None = None,
    set_global: bool = True,
) -> tuple[TracerProvider, MeterProvider]:
    """SDK tracer and meter providers for the coordinator, made the global ones, and returned.

    With ``otlp_endpoint`` (``host:port`` or ``http://host:port`` of an OTLP/gRPC collector) spans go
    through a batch processor and metrics through a periodic reader (``OTEL_METRIC_EXPORT_INTERVAL``,
    60 s by default) to that endpoint; without one the providers record but export nothing (a
    processor or reader can still be added to them). The resource carries ``service.version``,
    what ``OTEL_RESOURCE_ATTRIBUTES`` adds, and ``service.name``: ``OTEL_SERVICE_NAME`` or the one
    in ``OTEL_RESOURCE_ATTRIBUTES`` where the environment names one (so that coordinators can be
    told apart), else ``service_name``.

    ``insecure`` (None: as the environment says): an ``https://`` endpoint is TLS; else
    ``OTEL_EXPORTER_OTLP_INSECURE`` decides, and without it the endpoint is plaintext (``http://``
    or a bare ``host:port``), which a collector beside the coordinator usually is.

    OpenTelemetry lets the global providers be set once per process: a later call with ``set_global``
    leaves the first ones in place (the API logs a warning); pass the returned providers to
    ``Telemetry`` explicitly to be independent of that.
    """
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(_MISSING.format(what="SDK")) from exc

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):  # none named
        resource = resource.merge(Resource({"service.name": service_name}))
    if insecure is None and "OTEL_EXPORTER_OTLP_INSECURE" not in os.environ:
        insecure = not (otlp_endpoint or "").startswith("https://")
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(_MISSING.format(what="OTLP gRPC exporter")) from exc
        # The gRPC channel connects lazily: a collector that is not up yet costs nothing here.
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure))
        )
        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint, insecure=insecure))
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


def shutdown(providers: tuple[TracerProvider, MeterProvider], *, timeout_s: float = 5.0) -> None:
    """Export what is buffered and shut both providers down, within about ``timeout_s`` (at exit).

    The tracer provider's shutdown takes no timeout and, with an unreachable collector, retries for
    the exporter's whole timeout (10 s): it runs in a daemon thread, alongside the meter provider's
    shutdown, and is waited for until the deadline. Failures are logged, not raised.
    """
    tracer_provider, meter_provider = providers
    deadline = time.monotonic() + timeout_s
    worker = threading.Thread(target=tracer_provider.shutdown, name="qlm-otel-shutdown", daemon=True)
    worker.start()
    try:
        meter_provider.shutdown(timeout_millis=timeout_s * 1000)
    except Exception as exc:  # the SDK raises when a reader missed the deadline
        log.warning("OpenTelemetry metrics shutdown: %s", exc)
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        log.warning("OpenTelemetry spans not all exported within %.1f s", timeout_s)
