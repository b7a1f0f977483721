"""``qlm bench-vllm``'s report: medians over seeds per policy, ranges, ratios to FCFS, and the
engine metrics it reads (no engine: the integration tests and the command itself run one)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from qlm_plugin.adapters.vllm.bench import BenchResult, metrics, table


def _slo(policy: str, seed: int, met: float, makespan: float, failures: int = 0) -> BenchResult:
    return BenchResult(
        policy, "slo", seed, failures, 2.0, 100.0, met, 0.1, 0.9, makespan, qlm={"overhead_share": 0.01}
    )


def test_the_slo_table_gives_medians_ranges_and_makespan_against_fcfs() -> None:
    results = [
        _slo("fcfs", 0, 0.5, 100.0),
        _slo("fcfs", 1, 0.7, 110.0),
        _slo("fcfs", 2, 0.6, 120.0),
        _slo("qlm", 0, 1.0, 110.0),
        _slo("qlm", 1, 0.9, 121.0, failures=1),
        _slo("qlm", 2, 0.95, 132.0),
    ]
    rows = table(results).splitlines()
    qlm = next(r for r in rows if r.startswith("| qlm"))
    assert "95.0% (90.0-100.0)" in qlm and "121.0 s (+10%)" in qlm and "| 1 |" in qlm and "1.00%" in qlm
    assert next(r for r in rows if r.startswith("| fcfs")).count("60.0% (50.0-70.0)") == 1


def test_the_alise_table_compares_latency_with_fcfs() -> None:
    results = [
        BenchResult("fcfs", "alise", 0, 0, 0.0, 0.0, latency_mean_s=4.0, latency_p90_s=9.0),
        BenchResult("qlm", "alise", 0, 0, 0.0, 0.0, latency_mean_s=3.0, latency_p90_s=8.0),
    ]
    assert "3.00 s (-25%) | 8.00 s" in table(results)


@pytest.fixture
def engine_metrics() -> Iterator[str]:
    text = (
        b"# HELP vllm:num_requests_waiting waiting\n"
        b'vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0\n'
        b'vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 90.0\n'
        b'vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_cache_hit"} 10.0\n'
        b'vllm:iteration_tokens_total_sum{engine="0",model_name="tiny"} 300.0\n'
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_metrics_are_summed_over_labels_and_prompt_tokens_counted_where_computed(engine_metrics: str) -> None:
    m = metrics(engine_metrics)
    assert m["vllm:num_requests_waiting"] == 7.0
    assert m["vllm:prompt_tokens_by_source_total"] == 90.0  # cache hits are not recomputed work
    assert m["vllm:iteration_tokens_total_sum"] == 300.0
