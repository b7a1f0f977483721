"""Telemetry: OpenTelemetry instruments on the API only, and Prometheus text (:mod:`.instruments`); the
SDK and exporters are set up by :mod:`.sdk` (the ``otel`` extra)."""

from qlm_plugin.telemetry.instruments import Telemetry

__all__ = ["Telemetry"]
