"""The `qlm` command line, run as a user runs it (the installed console script)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

QLM = shutil.which("qlm") or ""
pytestmark = pytest.mark.skipif(not QLM, reason="the qlm console script is not installed")
METRIC_KEYS = {
    "slo_attainment",
    "goodput_rps",
    "throughput_rps",
    "ttft_p50_s",
    "ttft_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "requests",
}


def qlm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QLM, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def default_run() -> dict[str, Any]:
    proc = qlm("simulate", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_simulate_json_has_every_policy_class_and_metric(default_run: dict[str, Any]) -> None:
    policies = default_run["policies"]
    assert list(policies)[:6] == ["fcfs", "edf", "edf-shed", "priority", "qlm", "oracle"]
    for name, result in policies.items():
        assert result["overall"].keys() >= METRIC_KEYS, name
        assert 0.0 <= result["overall"]["slo_attainment"] <= 1.0
        assert 0.0 <= result["overall"]["gpu_busy_fraction"] <= 1.0
        assert set(result["classes"]) == {"interactive", "batch"}
        for m in result["classes"].values():
            assert m.keys() >= METRIC_KEYS
        assert sum(m["requests"] for m in result["classes"].values()) == result["overall"]["requests"]
    assert policies["oracle"]["reference"] is True and policies["fcfs"]["reference"] is False


def test_default_scenario_shows_head_of_line_blocking_under_fcfs(default_run: dict[str, Any]) -> None:
    p = default_run["policies"]
    fcfs = p["fcfs"]["classes"]["interactive"]["slo_attainment"]
    edf = p["edf"]["classes"]["interactive"]["slo_attainment"]
    assert fcfs < 0.7, "the default load must be one where FCFS misses interactive SLOs"
    assert edf > fcfs + 0.2, "deadline-aware ordering serves interactive requests that FCFS blocks"


def test_simulate_is_deterministic(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = "\n".join(f"{i * 0.05:.3f},{200 + 37 * i % 900},{1 + 13 * i % 300}" for i in range(300))
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows + "\n")
    runs = []
    for _ in range(2):
        proc = qlm("simulate", "--json", "--trace", str(trace), "--policies", "fcfs,oracle")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        for res in out["policies"].values():
            res.pop("wall_s")
        runs.append(out)
    assert runs[0] == runs[1]
    assert runs[0]["requests"] == 300


def test_table_output_names_policies_and_classes() -> None:
    proc = qlm("simulate", "--policies", "fcfs,oracle", "--rate-scale", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "fcfs" in proc.stdout and "oracle*" in proc.stdout and "interactive" in proc.stdout
    assert "reference" in proc.stdout


def test_the_table_says_how_many_requests_a_class_refused(tmp_path: Path) -> None:
    """A policy's attainment can be low for its refusals: the table says so, not only --json."""
    scenario = tmp_path / "refuse.yaml"
    scenario.write_text(
        "name: refuse\n"
        "workload: {synthetic: {rate_rps: 40, duration_s: 20, prompt_mean: 800, output_mean: 200}}\n"
        "models: [{name: m, profile: llama-3.1-8b}]\ninstances: [{gpu: h100, models: [m]}]\n"
        "classes: [{name: chat, share: 1, ttft_s: 0.2, refuse_below_p_meet: 0.9}]\n"
    )
    proc = qlm("simulate", "--scenario", str(scenario), "--policies", "qlm", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    header, _, overall, *_ = proc.stdout.splitlines()[1:]
    assert header.split()[5] == "refused" and "1 instance," in proc.stdout.splitlines()[0]
    refused = int(overall.split()[4])
    as_json = json.loads(qlm("simulate", "--scenario", str(scenario), "--policies", "qlm", "--json").stdout)
    assert refused == as_json["policies"]["qlm"]["overall"]["rejected"] > 0


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["simulate", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["simulate", "--rate-scale", "fast"], 2, "invalid float value: 'fast'"),
        (["simulate", "--rate-scale", "-2"], 1, "--rate-scale must be > 0"),
        (["simulate", "--trace", "/no/such/trace.csv"], 1, "/no/such/trace.csv"),
        (
            ["simulate", "--policies", "fcfs,magic"],
            1,
            "unknown policy 'magic'; available: fcfs, edf, edf-shed, priority, qlm, oracle",
        ),
        (["simulate", "--scenario", "/no/such/scenario.yaml"], 1, "cannot read scenario"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["simulate", "--policies", ","], 1, "--policies names no policy"),  # it ran nothing, exit 0
        (["simulate", "--trace", ""], 1, "--trace is empty"),  # it replayed the conversation sample
        (["bench", "--scenarios", ",", "--no-sweep"], 1, "--scenarios names no scenario"),
        # found only after every simulation had run
        (["bench", "--scenarios", "default", "--no-sweep", "--out", "/"], 1, "--out: / is a folder"),
        # each ran on (restarting its instances for ever, a traceback, negative rates), now refused
        (["serve", "--speed", "0"], 2, "argument --speed: must be above 0"),
        # "auto" is one of the setting's values (the config's and $QLM_HTTP_WORKERS'): it was refused
        (["serve", "--http-workers", "65"], 2, "expected 0 to 64 workers, or auto, got '65'"),
        (["instance", "--coordinator", "127.0.0.1:70000"], 2, "port in 1-65535"),
        (["bench-batch", "--window", "5x"], 2, "argument --window: must be like '24h'"),
        (["loadtest", "--requests", "-1"], 2, "argument --requests: must be above 0"),
        (["loadtest", "--duration", "0"], 2, "argument --duration: must be above 0"),  # a table of NaN
        (["loadtest", "--instances", "0"], 2, "argument --instances: must be above 0"),  # "No such process"
        (["bench-batch", "--rate", "0"], 2, "argument --rate: must be above 0"),  # ZeroDivisionError
        # ZeroDivisionError after the whole benchmark, or an empty table
        (["bench-vllm", "--interactive", "0"], 2, "argument --interactive: must be above 0"),
        (["bench-vllm", "--rate", "0"], 2, "argument --rate: must be above 0"),
        (["bench-vllm", "--seeds", "0"], 2, "argument --seeds: must be above 0"),
        (
            ["coordinator", "--policy", "nosuch"],
            1,
            "unknown policy 'nosuch'; available: fcfs",
        ),  # before a journal
        (["cost-check", "--batches", "x"], 2, "argument --batches: must be whole numbers above 0"),
        (["instance", "--gpu", "h900"], 1, "--gpu 'h900': no model of the scenario has a cost model on it"),
        # each ran and failed every request, or dropped what it was given without a word
        (
            ["instance", "--backend", "openai", "--endpoint", "127.0.0.1:19000", "--model", "m"],
            1,
            "--endpoint must be an http:// or https:// URL, got '127.0.0.1:19000'",
        ),
        (
            ["instance", "--backend", "openai", "--endpoint", "http://h:1", "--model", "m", "--count", "2"],
            1,
            "--count must be 1",
        ),
        (["instance", "--tls-cert", "c.pem", "--tls-key", "k.pem"], 1, "need --tls-ca"),
        (
            ["instance", "--token-env", "QLM_TEST_NO_SUCH_TOKEN"],
            1,
            "QLM_TEST_NO_SUCH_TOKEN: the variable is unset",
        ),
    ],
)
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(args: list[str], code: int, needle: str) -> None:
    proc = qlm(*args)
    assert proc.returncode == code
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_malformed_trace_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10,5\n0.5,ten,5\n")
    proc = qlm("simulate", "--trace", str(bad))
    assert proc.returncode == 1
    assert f"{bad}:3" in proc.stderr and "ContextTokens" in proc.stderr


def test_cost_check_agrees_with_the_coefficients() -> None:
    proc = qlm("cost-check", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["batch"] for r in rows] == [1, 32, 256]
    assert all(r["rel_error"] < 1e-9 for r in rows)


def test_version() -> None:
    proc = qlm("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("qlm-plugin ")


def test_module_entry_point_runs_too() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qlm_plugin.cli", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0


def test_a_trace_named_on_the_command_line_replays_at_its_recorded_rate(tmp_path: Path) -> None:
    # The default scenario compresses its own sample 110x; that must not leak onto another trace.
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{i}.0,100,10\n" for i in range(50))
    )
    proc = qlm("simulate", "--trace", str(trace), "--policies", "fcfs")
    assert proc.returncode == 0, proc.stderr
    assert "50 requests over 49 s" in proc.stdout
    proc = qlm("simulate", "--trace", str(trace), "--policies", "fcfs", "--rate-scale", "7")
    assert "50 requests over 7 s" in proc.stdout


def test_a_mooncake_trace_replays_in_milliseconds(tmp_path: Path) -> None:
    trace = tmp_path / "mooncake.jsonl"
    trace.write_text(
        "".join(
            f'{{"timestamp": {i * 500}, "input_length": 100, "output_length": 10, "hash_ids": [{i}]}}\n'
            for i in range(41)
        )
    )
    proc = qlm("simulate", "--trace", str(trace), "--policies", "fcfs")
    assert proc.returncode == 0, proc.stderr
    assert "41 requests over 20 s" in proc.stdout


def test_a_trace_whose_every_record_is_refused_says_why(tmp_path: Path) -> None:
    trace = tmp_path / "long.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,40000,10\n1,50000,20\n")
    proc = qlm("simulate", "--trace", str(trace))
    assert proc.returncode == 1
    assert "all 2 records were rejected at validation" in proc.stderr and "40000" in proc.stderr


def test_requests_that_all_arrive_at_once_are_said_to(tmp_path: Path) -> None:
    trace = tmp_path / "once.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n5,100,10\n5,200,20\n")
    proc = qlm("simulate", "--trace", str(trace), "--policies", "fcfs")
    assert proc.returncode == 0, proc.stderr
    assert "2 requests over 0 s (all at once)" in proc.stdout


def test_event_loop_is_uvloop_unless_asyncio_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlm_plugin import event_loop

    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    monkeypatch.delenv("QLM_EVENT_LOOP", raising=False)
    assert event_loop.loop_kind() == "uvloop" and event_loop.run(kind()) == "uvloop"
    monkeypatch.setenv("QLM_EVENT_LOOP", "asyncio")
    assert event_loop.loop_kind() == "asyncio" and event_loop.run(kind()) == "asyncio"


def test_a_journal_that_is_no_database_is_a_one_line_error(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    journal.write_text("not sqlite\n")
    proc = qlm("coordinator", "--journal", str(journal), "--http-port", "0", "--grpc-port", "0")
    assert proc.returncode == 1
    assert f"qlm coordinator: error: {journal} is not a usable journal database" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_http_port_in_use_is_named_with_what_to_change(tmp_path: Path) -> None:
    """It was a bare "[Errno 98] ... ('127.0.0.1', port)" that named neither HTTP nor the flag."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = qlm(
            "coordinator", "--journal", str(tmp_path / "j.db"), "--http-port", str(port), "--grpc-port", "0"
        )
    assert proc.returncode == 1
    assert f"cannot bind HTTP to 127.0.0.1:{port}" in proc.stderr and "--http-port" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "coordinator stopped" not in proc.stderr  # "0 unfinished requests kept": it never started


def test_an_openai_endpoint_is_its_servers_base_url() -> None:
    from qlm_plugin.coordinator.cli import openai_base_url

    assert openai_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert openai_base_url("http://h:8000/v1/") == "http://h:8000"  # an OpenAI client's base URL
    assert openai_base_url("https://h/llm/v1") == "https://h/llm"


def test_a_trace_with_one_far_off_timestamp_simulates_without_ticking_through_the_gap(tmp_path: Path) -> None:
    """One stray row dated decades off (1e9 s) made a queue-manager policy tick through the gap a
    quarter second at a time: minutes for two requests."""
    import threading

    from qlm_plugin.tools.simulate import build_requests, run_policy
    from qlm_plugin.workloads.scenario import load_scenario

    trace = tmp_path / "stray.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,100,10\n1000000000.0,100,10\n")
    scenario = load_scenario()
    scenario = scenario.model_copy(
        update={
            "workload": scenario.workload.model_copy(
                update={"trace": str(trace), "rate_scale": 1.0, "target_rps": None, "duration_s": None}
            )
        }
    )
    requests, rejected = build_requests(scenario)
    finished: list[int] = []
    run = threading.Thread(
        target=lambda: finished.append(run_policy(scenario, "qlm", requests, rejected).overall.finished),
        daemon=True,
    )
    run.start()
    run.join(60)  # a hang guard, not a speed target: it took minutes
    assert finished == [2]


def test_rate_scale_multiplies_the_scenarios_own_and_json_says_the_load(tmp_path: Path) -> None:
    """`--rate-scale 2` replaced a scenario's own rate scale: on the default scenario, compressed
    110x, it ran at 2x, a fiftieth of the load, where qlm bench's 2x doubles it."""
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{i}.0,100,10\n" for i in range(50))
    )
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        f"name: s\nworkload: {{trace: {trace}, rate_scale: 7}}\n"
        "models: [{name: m, profile: llama-3.1-8b}]\ninstances: [{gpu: h100, models: [m]}]\n"
        "classes: [{name: chat, share: 1, ttft_s: 1}]\n"
    )
    for extra, span in (([], 7.0), (["--rate-scale", "2"], 3.5)):
        proc = qlm("simulate", "--scenario", str(scenario), "--policies", "fcfs", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["span_s"] == pytest.approx(span) and out["rate_rps"] == pytest.approx(49 / span)
        assert (out["seed"], out["instances"], out["rejections"]) == (0, 1, [])


def test_an_unknown_event_loop_is_an_error_not_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlm_plugin import event_loop

    monkeypatch.setenv("QLM_EVENT_LOOP", "asycnio")
    with pytest.raises(ValueError, match="QLM_EVENT_LOOP='asycnio': expected uvloop or asyncio"):
        event_loop.loop_kind()
    monkeypatch.setenv("QLM_EVENT_LOOP", "asyncio")
    assert event_loop.loop_kind() == "asyncio"
    from qlm_plugin.coordinator.cli import _workers

    assert _workers("auto") == "auto" and _workers("2") == 2
