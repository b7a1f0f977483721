"""``qlm bench`` (qlm_plugin.tools.bench): result structure, the highest-load interpolation, the Markdown
writer, plots, merging a burst into a scenario's requests, skipped scenarios and command-line errors.

Everything runs on tiny synthetic scenarios written to tmp_path (two policies, two load points).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlm_plugin.cli import main
from qlm_plugin.domain.request import Request, make_request
from qlm_plugin.tools import bench
from qlm_plugin.tools.simulate import PolicyResult
from qlm_plugin.workloads.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL = """\
name: small
description: A tiny synthetic scenario for the bench tests.
seed: 3
workload:
  synthetic:
    rate_rps: 20
    duration_s: 8
models:
  - name: m
    profile: llama-3.1-8b
instances:
  - gpu: h100
    models: [m]
classes:
  - name: interactive
    share: 0.7
    ttft_s: 0.5
  - name: batch
    share: 0.3
    e2e_s: 60
    priority: 1
"""

BURST = """\
seed: 1
workload:
  synthetic:
    rate_rps: 10
    duration_s: 1
    prompt_mean: 6000
models:
  - name: m
    profile: llama-3.1-8b
instances:
  - gpu: h100
    models: [m]
classes:
  - name: burst
    share: 1
    e2e_s: 60
    priority: 1
"""


def _folder(base: Path, burst: bool = True) -> Path:
    folder = base / "scenarios" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "S.yaml").write_text(SMALL)
    if burst:
        (folder / "S_burst.yaml").write_text(BURST)
    return folder


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> bench.BenchResult:
    folder = _folder(tmp_path_factory.mktemp("bench"))
    return bench.run_bench(["S"], ["fcfs", "edf"], [1.0, 2.0], folder=folder, date="2024-01-02")


# ------------------------------------------------------------------------------------------ structure


def test_result_has_every_policy_class_counter_and_sweep_point(result: bench.BenchResult) -> None:
    assert list(result.scenarios) == ["S"] and not result.skipped
    assert result.policies == ["fcfs", "edf"] and result.sweep == [1.0, 2.0]
    s = result.scenarios["S"]
    assert s.name == "small" and s.instances == 1
    assert s.classes == ["batch", "burst", "interactive"]  # the burst's class joins the scenario's
    assert s.burst_path is not None and s.burst_at_s is not None and s.burst_at_s > 0
    assert list(s.policies) == ["fcfs", "edf"]
    for pb in s.policies.values():
        base = pb.base
        assert isinstance(base, PolicyResult) and base.outcomes == []
        assert base.overall.requests == s.requests  # every policy saw the same requests
        assert set(base.classes) == set(s.classes)
        assert 0.0 <= base.overall.slo_attainment <= 1.0
        assert 0.0 <= base.gpu_busy_fraction <= 1.0
        assert {"preemptions", "swaps_out", "swaps_in", "wasted_tokens", "model_loads_cold"} <= set(
            base.counters
        )
        assert [p.multiplier for p in pb.sweep] == [1.0, 2.0]
        assert pb.sweep[0].slo_attainment == base.overall.slo_attainment  # the base run is the 1x point
        assert set(pb.sweep[1].classes) == set(s.classes)
        assert pb.highest in ("<min", ">max") or isinstance(pb.highest, float)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["scenarios"]["S"]["policies"]["edf"]["sweep"][1]["multiplier"] == 2.0
    assert "lso" in out["scenarios"]["S"]["policies"]["fcfs"]["base"]


def test_no_sweep_runs_the_base_load_only(tmp_path: Path) -> None:
    folder = _folder(tmp_path, burst=False)
    res = bench.run_bench(["S"], ["fcfs"], [], folder=folder)
    pb = res.scenarios["S"].policies["fcfs"]
    assert pb.sweep == [] and pb.highest is None
    section = bench.render_section(res)
    assert "base load only" in section and "Highest load" not in section


def test_each_sweep_point_is_the_mean_over_the_seeds(tmp_path: Path, result: bench.BenchResult) -> None:
    """``seeds=3``: each point holds its three seeds' attainments (the scenario's own seed first, the
    same run as with one seed) and their mean; the tables at base load are the first seed's."""
    folder = _folder(tmp_path)
    res = bench.run_bench(["S"], ["fcfs", "edf"], [1.0, 2.0], folder=folder, seeds=3)
    assert res.seeds == 3 and "mean over 3 seeds" in bench.render_section(res)
    for name, pb in res.scenarios["S"].policies.items():
        one = result.scenarios["S"].policies[name]
        assert pb.base.overall == one.base.overall
        for point, single in zip(pb.sweep, one.sweep, strict=True):
            assert len(point.by_seed) == 3 and point.by_seed[0] == single.slo_attainment
            assert point.slo_attainment == pytest.approx(sum(point.by_seed) / 3)
    # other seeds draw other requests (models, classes): some point differs from the first seed's
    assert any(len(set(p.by_seed)) > 1 for pb in res.scenarios["S"].policies.values() for p in pb.sweep)
    with pytest.raises(bench.BenchError, match="seeds must be at least 1"):
        bench.run_bench(["S"], ["fcfs"], [1.0], folder=folder, seeds=0)


def test_scale_load_multiplies_rate_scale_or_target_rps(tmp_path: Path) -> None:
    sc = load_scenario(_folder(tmp_path) / "S.yaml")
    assert bench.scale_load(sc, 2.5).workload.rate_scale == 2.5
    sc = sc.model_copy(update={"workload": sc.workload.model_copy(update={"target_rps": 4.0})})
    scaled = bench.scale_load(sc, 3.0).workload
    assert scaled.target_rps == 12.0 and scaled.rate_scale == 1.0
    with pytest.raises(bench.BenchError):
        bench.scale_load(sc, 0.0)


# ------------------------------------------------------------------------------------------ highest load


def test_highest_rate_interpolates_the_last_crossing() -> None:
    pts = [(0.5, 1.0), (1.0, 0.95), (1.5, 0.85), (2.0, 0.5)]
    assert bench.highest_rate(pts) == pytest.approx(1.25)
    assert bench.highest_rate(list(reversed(pts))) == pytest.approx(1.25)  # order does not matter
    assert bench.highest_rate([(1.0, 0.9), (2.0, 0.1)]) == pytest.approx(1.0)  # exactly on target
    # Not monotone: the highest point still meeting the target counts.
    assert bench.highest_rate([(1, 0.95), (2, 0.8), (3, 0.92), (4, 0.5)]) == pytest.approx(3 + 0.02 / 0.42)
    assert bench.highest_rate(pts, target=0.6) == pytest.approx(1.5 + 0.25 / 0.35 * 0.5)


def test_highest_rate_outside_the_sweep() -> None:
    assert bench.highest_rate([(0.5, 1.0), (1.0, 0.97), (3.0, 0.91)]) == ">max"
    assert bench.highest_rate([(0.5, 0.89), (1.0, 0.5), (3.0, 0.0)]) == "<min"
    assert bench.highest_rate([(1.0, 0.95)]) == ">max"
    with pytest.raises(ValueError):
        bench.highest_rate([])
    assert bench.format_rate(">max", [0.5, 3.0]) == "> 3x"
    assert bench.format_rate("<min", [0.5, 3.0]) == "< 0.5x"
    assert bench.format_rate(1.234, [0.5, 3.0]) == "1.23x"
    assert bench.format_rate(None, []) == "-"


# ------------------------------------------------------------------------------------------ report


def test_markdown_update_keeps_the_text_around_the_markers() -> None:
    old = f"# Results\n\nHand-written intro.\n\n{bench.MARK_START}\nold table\n{bench.MARK_END}\n\nOutro.\n"
    new_section = f"{bench.MARK_START}\nnew table\n{bench.MARK_END}\n"
    text = bench.update_markdown(old, new_section)
    assert text == f"# Results\n\nHand-written intro.\n\n{new_section}\nOutro.\n"
    assert bench.update_markdown(text, new_section) == text  # idempotent
    appended = bench.update_markdown("# Mine\n", new_section)
    assert appended.startswith("# Mine\n") and appended.endswith(new_section)
    created = bench.update_markdown(None, new_section)
    assert created.startswith("# ") and created.endswith(new_section)
    for broken in (f"{bench.MARK_START}\nno end\n", f"{bench.MARK_END}\n{bench.MARK_START}\n"):
        with pytest.raises(bench.BenchError, match="unbalanced"):
            bench.update_markdown(broken, new_section)


def test_report_writes_plots_and_links_them(result: bench.BenchResult, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    out.parent.mkdir()
    out.write_text(f"# Benchmarks\n\nKeep me.\n\n{bench.MARK_START}\nstale\n{bench.MARK_END}\nAnd me.\n")
    written = bench.write_report(result, out)
    png = tmp_path / "docs" / "img" / "bench_S.png"
    assert png in written and out in written
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nKeep me.\n\n") and text.endswith("And me.\n")
    assert "stale" not in text
    assert "![S: SLO attainment against load](img/bench_S.png)" in text
    assert "Generated on 2024-01-02" in text and "qlm bench" in text
    assert "| fcfs |" in text and "| edf |" in text and "interactive" in text
    assert text.count(bench.MARK_START) == 1 and text.count(bench.MARK_END) == 1


# ------------------------------------------------------------------------------------------ merging


def _req(rid: str, t: float, e2e: float | None = None) -> Request:
    return make_request(rid, "m", 10, 5, t, ttft_s=None if e2e else 1.0, e2e_s=e2e)


def test_merge_keeps_every_request_once_with_unique_ids_in_arrival_order() -> None:
    main_stream = [_req(f"r{i}", i * 1.0) for i in range(6)]
    burst = [_req(f"r{i}", 100.0 + i * 0.1, e2e=30.0) for i in range(4)]
    merged = bench.merge_requests(main_stream, burst, at_s=2.5)
    assert len(merged) == 10 and len({r.id for r in merged}) == 10
    assert [r.arrival_time for r in merged] == sorted(r.arrival_time for r in merged)
    moved = [r for r in merged if r.id.startswith(bench.BURST_ID_PREFIX)]
    assert [r.id for r in moved] == ["burst-r0", "burst-r1", "burst-r2", "burst-r3"]
    assert moved[0].arrival_time == pytest.approx(2.5)
    for r in moved:  # the deadlines moved with the arrivals
        assert r.slo.e2e_deadline == pytest.approx(r.arrival_time + 30.0)
    assert {r.id for r in merged} - {r.id for r in moved} == {r.id for r in main_stream}
    assert burst[0].arrival_time == 100.0 and burst[0].id == "r0"  # inputs untouched
    assert bench.merge_requests(main_stream, [], at_s=1.0) == main_stream
    with pytest.raises(bench.BenchError, match="collide"):
        bench.merge_requests(main_stream, burst, at_s=0.0, prefix="")


def test_scenario_requests_merge_the_burst_into_the_span(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    sc, burst = load_scenario(folder / "S.yaml"), load_scenario(folder / "S_burst.yaml")
    alone, _ = bench.scenario_requests(sc)
    extra, _ = bench.scenario_requests(burst)
    merged, rejected = bench.scenario_requests(sc, burst, burst_at=0.5)
    assert len(merged) + len(rejected) == len(alone) + len(extra) and not rejected
    first = min(r.arrival_time for r in merged if r.id.startswith("burst-"))
    span = alone[-1].arrival_time - alone[0].arrival_time
    assert first == pytest.approx(alone[0].arrival_time + 0.5 * span)
    other = burst.model_copy(update={"models": [burst.models[0].model_copy(update={"name": "other"})]})
    with pytest.raises(bench.BenchError, match="not models of"):
        bench.scenario_requests(sc, other)


# ------------------------------------------------------------------------------------------ scenarios


def test_find_scenarios_skips_burst_companions(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "B.yaml").write_text(SMALL)
    found = bench.find_scenarios(None, folder)
    assert [s.key for s in found] == ["B", "S"]
    assert found[0].burst_path is None and found[1].burst_path == folder / "S_burst.yaml"
    with pytest.raises(bench.BenchError, match="unknown scenario 'Z'"):
        bench.find_scenarios(["Z"], folder)


def test_default_names_the_packaged_default_scenario_unless_the_folder_has_one(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (found,) = bench.find_scenarios(["default"], folder)
    assert found.path.is_file() and found.burst_path is None
    # what `qlm simulate` runs when given none
    assert load_scenario(found.path).model_dump() == load_scenario(None).model_dump()
    with pytest.raises(bench.BenchError, match="default: the packaged default scenario"):
        bench.find_scenarios(["Z"], folder)
    (folder / "default.yaml").write_text(SMALL)
    (own,) = bench.find_scenarios(["default"], folder)
    assert own.path == folder / "default.yaml"


def test_a_scenario_whose_trace_is_missing_is_skipped(tmp_path: Path) -> None:
    folder = _folder(tmp_path, burst=False)
    text = SMALL.replace("  synthetic:\n    rate_rps: 20\n    duration_s: 8\n", "  trace: ../nowhere.csv\n")
    (folder / "T.yaml").write_text(text)
    seen: list[tuple[str, str]] = []
    res = bench.run_bench(
        ["S", "T"], ["fcfs"], [], folder=folder, on_skip=lambda k, why: seen.append((k, why))
    )
    assert list(res.scenarios) == ["S"] and list(res.skipped) == ["T"]
    assert seen and seen[0][0] == "T" and "nowhere.csv" in seen[0][1]
    assert "- T: trace not found" in bench.render_section(res)


def test_versioned_bench_scenarios_are_valid() -> None:
    folder = ROOT / "scenarios" / "bench"
    found = {s.key: s for s in bench.find_scenarios(None, folder)}
    assert {"A", "B", "C", "D"} <= set(found)
    for s in found.values():
        sc = load_scenario(s.path)
        if s.burst_path is not None:
            burst = load_scenario(s.burst_path)
            assert {m.name for m in burst.models} <= {m.name for m in sc.models}
    assert found["D"].burst_path is not None
    b = load_scenario(found["B"].path)
    assert len(b.instance_ids()) < len(b.models)  # B forces model swapping


def test_the_probe_scenarios_are_valid_and_say_how_to_run_them() -> None:
    probes = sorted((ROOT / "scenarios" / "probes").glob("*.yaml"))
    assert len(probes) >= 5
    for path in probes:
        load_scenario(path)
        assert f"qlm bench --scenarios scenarios/probes/{path.name}" in path.read_text()


# ------------------------------------------------------------------------------------------ command line


def test_cli_writes_the_report_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--scenarios", "S", "--policies", "fcfs,edf", "--sweep", "1,2", "--json"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["command"] == "qlm bench --scenarios S --policies fcfs,edf --sweep 1,2"
    assert set(out["scenarios"]["S"]["policies"]) == {"fcfs", "edf"}
    assert "S fcfs x2: SLO met" in cap.err  # one progress line per run
    # here, not in docs/benchmarks.md: a run of one scenario replaced the published section of all
    assert (tmp_path / "qlm-bench.md").read_text().count("bench_S.png") == 1
    assert (tmp_path / "img" / "bench_S.png").stat().st_size > 0
    assert not (tmp_path / "docs").exists()
    assert out["sweep"] == [1.0, 2.0]


def test_cli_checks_its_out_file_and_options_before_any_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unbalanced --out was found after every simulation had run (the work lost); --seeds with
    --no-sweep ran one seed and recorded five; --ablation without its parts gave a table of -inf."""
    _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "mine.md"
    broken.write_text(f"{bench.MARK_START}\n{bench.MARK_START}\n")
    for argv, message in [
        (["--out", str(broken)], "markers"),
        (["--no-sweep", "--seeds", "5"], "give --sweep 1 --seeds 5"),
        (["--ablation", "--policies", "fcfs,qlm"], "must name qlm and one of those"),
    ]:
        assert main(["bench", "--scenarios", "S", "--policies", "fcfs", *argv]) != 0
        err = capsys.readouterr().err
        assert message in err and "SLO met" not in err, err  # refused before any run
    assert not (tmp_path / "img").exists()


def test_a_sweep_without_the_base_load_bounds_the_highest_load_by_the_loads_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base load always runs: `--sweep 2` where 1x already misses is "< 1x", not "< 2x"."""
    _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--scenarios", "S", "--policies", "fcfs", "--sweep", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sweep"] == [1.0, 2.0]
    result = bench.BenchResult(
        command="", date="", seed=None, sweep=[1.0, 2.0], target=0.9, burst_at=0.3, policies=[]
    )
    assert (
        bench.format_rate("<min", result.sweep) == "< 1x"
        and bench.format_rate(">max", result.sweep) == "> 2x"
    )


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--scenarios", "S", "--sweep", "1,x"], 1, "--sweep: 'x' is not a number"),
        (["--scenarios", "S", "--sweep", "0,1"], 1, "multipliers must be finite numbers > 0"),
        (["--scenarios", "S", "--no-sweep", "--policies", "fcfs,magic"], 1, "unknown policy 'magic'"),
        (["--scenarios", "Z", "--no-sweep"], 1, "unknown scenario 'Z'"),
        (["--scenarios", "S", "--no-sweep", "--burst-at", "2"], 1, "--burst-at must be a fraction"),
        (["--sweep", "1", "--no-sweep"], 2, "not allowed with argument"),
        (["--bogus"], 2, "unrecognized arguments: --bogus"),
    ],
)
def test_cli_errors_are_one_clear_line(
    args: list[str],
    code: int,
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["bench", *args])
    except SystemExit as exc:  # argparse errors exit from the parser
        rc = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    assert rc == code
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "docs").exists()  # nothing written


def test_cli_fails_when_every_scenario_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path, burst=False)
    (folder / "S.yaml").write_text(
        SMALL.replace("  synthetic:\n    rate_rps: 20\n    duration_s: 8\n", "  trace: missing.csv\n")
    )
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--policies", "fcfs", "--no-sweep"]) == 1
    err = capsys.readouterr().err
    assert "skipping scenario S: trace not found" in err and "no scenario could run" in err


def test_queue_manager_table_lists_lsos_and_accuracy_only_for_queue_managers() -> None:
    from qlm_plugin.tools.bench import queue_manager_table

    scenario = {
        "policies": {
            "fcfs": {"base": {"lso": {"preemptions": 3}}},
            "qlm": {
                "base": {
                    "lso": {
                        "pulls": 10,
                        "evictions": 2,
                        "swaps_ordered": 1,
                        "est_mape_over_1s": 0.25,
                        "est_samples_over_1s": 40,
                        "est_p09_observed": 0.9,
                        "est_p09_samples": 12,
                        "pred_mae_tokens": 101.4,
                        "pred_coverage_q90": 0.91,
                    }
                }
            },
        }
    }
    lines = queue_manager_table(scenario, ["fcfs", "qlm"], {"fcfs": "fcfs", "qlm": "qlm"})
    rows = [line for line in lines if line.startswith("| qlm")]
    assert len(rows) == 1 and not any(line.startswith("| fcfs") for line in lines)
    assert "| 2 |" in rows[0] and "25% (40)" in rows[0] and "90% (12)" in rows[0] and "101 / 91%" in rows[0]
    assert queue_manager_table({"policies": {"fcfs": scenario["policies"]["fcfs"]}}, ["fcfs"], {}) == []


def test_estimator_table_reports_each_class_of_the_policies_that_estimate() -> None:
    from qlm_plugin.tools.bench import estimator_table

    told = {"n": 900.0, "n_long": 120.0, "mape": 0.42, "bias": -0.1, "calibration_gap": 0.031, "deciles": 4.0}
    scenario = {
        "policies": {
            "edf": {"base": {"estimates": {}}},
            "qlm": {
                "base": {"estimates": {"all": told, "batch": told, "interactive": {"n": 5.0, "n_long": 0.0}}}
            },
        }
    }
    lines = estimator_table(scenario, ["edf", "qlm"], {})
    rows = [line for line in lines if line.startswith("| qlm")]
    assert rows == [
        "| qlm | batch | 900 | 120 | 42% | -10% | 3.1 pt (4) |",
        "| qlm | interactive | 5 | 0 | - | - | - |",
    ]
    assert estimator_table({"policies": {"edf": scenario["policies"]["edf"]}}, ["edf"], {}) == []
