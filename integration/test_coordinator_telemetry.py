"""What the coordinator records with OpenTelemetry: one span per request with its life as events,
spans for replanning and serving operations, metrics; read back with the SDK's in-memory exporter
and metric reader. Run with ``-s`` to print one request's trace."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from qlm_plugin.adapters.sim.process import SimEngineLink
from qlm_plugin.coordinator.instances import PendingCommand
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.telemetry.instruments import Telemetry
from qlm_plugin.testing.stack import local_stack
from qlm_plugin.transport.client import CoordinatorClient

MODEL = "llama-3.1-8b"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _points(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, str], float]:
    """The data points of one metric now: (model, slo class) -> value."""
    out: dict[tuple[str, str], float] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.data.data_points:
                        attrs = dict(p.attributes or {})
                        out[(str(attrs.get("gen_ai.request.model")), str(attrs.get("qlm.slo.class")))] = (
                            float(
                                p.value  # type: ignore[union-attr]
                            )
                        )
    return out


def test_a_request_life_is_one_span_with_its_events(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )

    async def main() -> str:
        async with local_stack(tmp_path, telemetry=telemetry, speed=20.0) as st:
            async with CoordinatorClient(st.grpc_target) as c:  # batch work, so the planner has a queue
                await c.submit_batch(
                    [
                        pb.RequestSpec(
                            model=MODEL, prompt="b" * 400, max_tokens=500, slo=pb.SLO(slo_class="batch")
                        )
                        for _ in range(600)
                    ]
                )
            st.coordinator.tick()
            queued_now.update(_points(reader, "qlm.queue.depth"))
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{st.http_url}/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hello"}],
                        "max_tokens": 6,
                        "qlm": {"ttft_ms": 2000},
                    },
                    headers={"traceparent": TRACEPARENT},
                ) as r,
            ):
                body = await r.json()
            return str(body["qlm"]["request_id"])

    queued_now: dict[tuple[str, str], float] = {}
    rid = asyncio.run(main())
    assert sum(queued_now.values()) > 0 and all(model == MODEL for model, _ in queued_now)
    spans = exporter.get_finished_spans()
    mine = [
        s
        for s in spans
        if s.attributes and s.attributes.get("qlm.request.id") == rid and s.name.startswith("chat")
    ]
    assert len(mine) == 1
    span = mine[0]
    print(
        f"\nspan {span.name!r} kind={span.kind.name} trace={span.context.trace_id:032x} "
        f"parent={span.parent.span_id:016x}"
        if span.parent
        else ""
    )
    for key, value in sorted((span.attributes or {}).items()):
        print(f"  {key} = {value}")
    assert span.start_time is not None
    for ev in span.events:
        print(f"  +{(ev.timestamp - span.start_time) / 1e6:8.3f} ms  {ev.name} {dict(ev.attributes or {})}")
    assert span.kind == SpanKind.SERVER
    assert span.name == f"chat {MODEL}"
    assert f"{span.context.trace_id:032x}" == TRACEPARENT.split("-")[1]  # the client's trace continues
    attrs = span.attributes or {}
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.usage.output_tokens"] == 6 and attrs["qlm.slo.met"] is True
    names = [ev.name for ev in span.events]
    assert names[0] == "qlm.queued" and "qlm.dispatched" in names and "qlm.first_token" in names
    assert names.index("qlm.dispatched") < names.index("qlm.first_token")
    assert any(s.name == "qlm.replan" for s in spans)
    metrics = {
        m.name
        for rm in reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {
        "qlm.requests.finished",
        "gen_ai.server.time_to_first_token",
        "qlm.planner.duration",
        "qlm.slo.attainment",
    } <= metrics
    assert telemetry.open_spans() == 0  # the stop ended every span still open


def test_a_requests_span_carries_the_slo_of_its_class_when_the_client_names_none(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=MeterProvider())

    async def main() -> list[str]:
        async with local_stack(tmp_path, telemetry=telemetry) as st, CoordinatorClient(st.grpc_target) as c:
            specs = [
                pb.RequestSpec(model=MODEL, prompt="x", max_tokens=2, slo=pb.SLO(slo_class=name))
                for name in ("interactive", "batch")
            ]
            ids = [r.request_id for r in await c.submit_batch(specs)]
            for rid in ids:
                await asyncio.wait_for(st.coordinator.jobs[rid].done.wait(), 30)
            return ids

    interactive, batch = asyncio.run(main())
    slos = {
        attrs["qlm.request.id"]: (attrs.get("qlm.slo.ttft_s"), attrs.get("qlm.slo.e2e_s"))
        for s in exporter.get_finished_spans()
        if (attrs := dict(s.attributes or {})).get("qlm.request.id") in (interactive, batch)
    }
    assert slos[interactive][0] == pytest.approx(1.0) and slos[interactive][1] is None  # the class's TTFT
    assert slos[batch][0] is None and slos[batch][1] == pytest.approx(600.0)  # the class's E2E


def test_grpc_callers_and_refused_requests_are_in_their_callers_trace(tmp_path: Path) -> None:
    """A gRPC Submit's ``traceparent`` metadata is its span's parent, as an HTTP header is (it
    was ignored: a trace of its own); a refused request, over either, has an ERROR span there
    too (it had none)."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=MeterProvider())
    trace_id = TRACEPARENT.split("-")[1]
    sent: list[dict[str, str]] = []  # the trace context each assignment carried to its instance
    start = SimEngineLink.start

    def recording(link: SimEngineLink, a: pb.Assignment, emit: Any) -> bool:
        sent.append(dict(a.trace_context))
        return start(link, a, emit)

    async def main() -> str:
        async with local_stack(tmp_path, telemetry=telemetry, speed=50.0) as st:
            async with CoordinatorClient(st.grpc_target) as c:
                c.metadata = [("traceparent", TRACEPARENT)]
                reply = await c.submit(pb.RequestSpec(model=MODEL, prompt="x", max_tokens=2))
                with pytest.raises(grpc.aio.AioRpcError):
                    await c.submit(pb.RequestSpec(model="no-such-model", prompt="x"))
                await asyncio.wait_for(st.coordinator.jobs[reply.request_id].done.wait(), 10)
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{st.http_url}/v1/completions",
                    json={"model": MODEL, "prompt": "x", "max_tokens": 10**6},
                    headers={"traceparent": TRACEPARENT},
                ) as r,
            ):
                assert r.status == 400
            return reply.request_id

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SimEngineLink, "start", recording)
        rid = asyncio.run(main())
    spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert {f"{s.context.trace_id:032x}" for s in spans} == {trace_id}, [s.name for s in spans]
    # and its instance got the request span's context, to pass on to its engine
    assert [c["traceparent"].split("-")[1] for c in sent] == [trace_id]
    served, *refused = sorted(spans, key=lambda s: s.status.status_code.value)
    assert (served.attributes or {})["qlm.request.id"] == rid
    assert served.status.status_code is StatusCode.UNSET
    reasons = sorted(str((s.attributes or {})["error.type"]) for s in refused)
    assert reasons == ["too_large", "unknown_model"], [s.attributes for s in refused]
    assert all(s.status.status_code is StatusCode.ERROR for s in refused)
    unknown = next(s for s in refused if (s.attributes or {})["error.type"] == "unknown_model")
    assert unknown.name == "text_completion unknown"  # no name a client made up


def test_an_instance_that_leaves_is_counted_left_and_one_lost_fails_its_unacknowledged_operations(
    tmp_path: Path,
) -> None:
    """An operator alerts on lost instances: a clean leave (a rolling deploy) is not one. An
    operation sent to an instance that dies before acknowledging it ends its span as failed (it
    stayed open until the coordinator stopped) and counts as not ok."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(tracer_provider=tracer_provider)

    async def main() -> None:
        async with local_stack(tmp_path, telemetry=telemetry) as st:
            sessions = st.coordinator.fleet.sessions
            # an abort on its way to sim-1 when it dies
            telemetry.lso_started("c-unacked", op="abort", instance_id="sim-1")
            sessions["sim-1"].pending["c-unacked"] = PendingCommand("abort", None, None, time.time())
            await st.instances.pop("sim-0").shutdown()
            await st.crash("sim-1")
            while sessions:
                await asyncio.sleep(0.05)
            assert telemetry.open_spans() == 0
            text = telemetry.prometheus_text()[0].decode()
            assert 'qlm_instance_events_total{event="left"} 1.0' in text
            assert 'qlm_instance_events_total{event="lost"} 1.0' in text
            assert 'qlm_lso_total{ok="false",op="abort"} 1.0' in text

    asyncio.run(main())
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "qlm.lso.abort"]
    assert span.status.status_code == StatusCode.ERROR and "sim-1" in (span.status.description or "")
