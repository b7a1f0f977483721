"""``qlm plan-capacity`` (qlm_plugin.tools.capacity): the count search on a fake evaluator, the parsers of
``--target`` and ``--price``, an end-to-end plan whose answer is cross-checked (N meets, N-1 does not),
JSON output and one-line command-line errors.

The simulated scenarios are thinned: 300 requests of the packaged conversation sample, compressed so
that a few A100s are needed (each fleet simulates in well under a second).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qlm_plugin.cli import main
from qlm_plugin.tools import capacity
from qlm_plugin.tools.simulate import build_requests, run_policy
from qlm_plugin.workloads.scenario import load_scenario

SMALL = """\
name: small-capacity
seed: 1
workload: {trace: conv, rate_scale: 120, max_requests: 300}
models:
  - name: m
    profile: llama-3.1-8b
instances:
  - gpu: a100-80
    count: 4  # the search starts at the group's count: skip simulating an overloaded single instance
    models: [m]
classes:
  - name: interactive
    share: 0.7
    ttft_s: 1.0
  - name: batch
    share: 0.3
    e2e_s: 600
    priority: 1
"""

TWO_KINDS = SMALL.replace("instances:\n", "instances:\n  - gpu: h100\n    count: 4\n    models: [m]\n")


def _run(argv: list[str]) -> int:
    """``main``'s exit status, also for argparse's errors (which exit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


# ------------------------------------------------------------------------------------------------
# The search


@pytest.mark.parametrize("start", [1, 3, 16, 64])
def test_search_finds_the_minimum_in_log_steps(start: int) -> None:
    max_count = 64
    bound = 2 * math.ceil(math.log2(max_count)) + 2
    for answer in range(1, max_count + 1):
        calls: list[int] = []

        def meets(n: int, answer: int = answer, calls: list[int] = calls) -> bool:
            calls.append(n)
            return n >= answer

        assert capacity.find_min_count(meets, max_count=max_count, start=start) == answer
        assert len(calls) == len(set(calls)), f"a count simulated twice: {calls}"
        assert len(calls) <= bound, (answer, calls)
        # The cross-check is free: the fleet one smaller was simulated and missed.
        assert answer == 1 or answer - 1 in calls


def test_search_reports_none_when_the_largest_fleet_misses() -> None:
    calls: list[int] = []

    def never(n: int) -> bool:
        calls.append(n)
        return False

    assert capacity.find_min_count(never, max_count=40) is None
    assert calls == [1, 2, 4, 8, 16, 32, 40]
    assert capacity.find_min_count(lambda n: n >= 7, max_count=7, start=100) == 7
    with pytest.raises(ValueError, match="max_count"):
        capacity.find_min_count(lambda n: True, max_count=0)


# ------------------------------------------------------------------------------------------------
# Parsers


def test_parse_targets() -> None:
    classes = ["interactive", "batch"]
    assert capacity.parse_targets(None, classes) == {"interactive": 0.99, "batch": 0.99}
    assert capacity.parse_targets("0.9", classes) == {"interactive": 0.9, "batch": 0.9}
    assert capacity.parse_targets("batch=0.95", classes) == {"interactive": 0.99, "batch": 0.95}
    assert capacity.parse_targets("0.8, interactive=1", classes) == {"interactive": 1.0, "batch": 0.8}
    for bad, message in [
        ("0", r"in \(0, 1\]"),
        ("1.5", r"in \(0, 1\]"),
        ("99", "0.99 for 99%"),
        ("nan", r"in \(0, 1\]"),
        ("batch=x", "not a number"),
        ("bulk=0.9", "unknown class 'bulk'"),
        ("batch=0.9,batch=0.8", "twice"),
        ("0.99,0.5", r"the default \(a bare number\) twice"),  # the second silently won
        ("", "names no target"),  # it planned for 0.99 without a word
        (" , ", "names no target"),
    ]:
        with pytest.raises(ValueError, match=message):
            capacity.parse_targets(bad, classes)


def test_parse_prices_by_gpu_or_group_name(small: Path) -> None:
    groups = load_scenario(small).instances
    assert capacity.parse_prices("a100-80=2.5", groups) == {"a100-80": 2.5}
    assert capacity.parse_prices(None, groups) == {}
    for bad, message in [("h100=4", "unknown kind 'h100'"), ("a100-80=0", "> 0"), ("a100-80", "KIND=PRICE")]:
        with pytest.raises(ValueError, match=message):
            capacity.parse_prices(bad, groups)


# ------------------------------------------------------------------------------------------------
# End to end


def test_plan_answer_meets_and_one_fewer_misses(small: Path) -> None:
    scenario = load_scenario(small)
    report = capacity.plan_capacity(scenario, policy="qlm", prices="a100-80=2.5")
    (kind,) = report.kinds
    n = kind.instances
    assert n is not None and n >= 2, "the scenario must need more than one instance to test N-1"
    at_n, below = kind.at_n, kind.below
    assert at_n is not None and below is not None
    assert at_n.instances == n and below.instances == n - 1
    assert at_n.meets and all(a >= 0.99 for a in at_n.classes.values())
    assert not below.meets and min(below.classes.values()) < 0.99
    assert sorted(p.instances for p in kind.evaluations) == sorted({p.instances for p in kind.evaluations})
    assert kind.cost_per_hour == pytest.approx(n * 2.5) and report.recommended is kind
    # The figures are the simulator's own: simulating N-1 again gives the same attainment.
    requests, rejected = build_requests(scenario)
    again = run_policy(
        capacity.kind_scenario(scenario, scenario.instances[0], n - 1), "qlm", requests, rejected
    )
    assert {c: m.slo_attainment for c, m in again.classes.items()} == below.classes
    text = "\n".join(capacity.format_report(report))
    assert f"recommended: {n} x a100-80" in text and "interactive @N-1" in text


def test_cli_json_parses_and_parallel_kinds_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_KINDS)
    base = ["plan-capacity", "--slo-config", str(path), "--no-progress", "--json"]
    assert main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert [k["kind"] for k in out["kinds"]] == ["h100", "a100-80"]
    for k in out["kinds"]:
        assert k["at_n"]["instances"] == k["instances"] and k["at_n"]["meets"] is True
        if k["instances"] > 1:
            assert (
                k["at_n_minus_1"]["instances"] == k["instances"] - 1 and k["at_n_minus_1"]["meets"] is False
            )
    assert out["recommended"] == "h100" and out["ranked_by"] == "gpus"
    assert out["targets"] == {"interactive": 0.99, "batch": 0.99} and out["assumes_monotonic"] is True
    assert main([*base, "--jobs", "2"]) == 0
    parallel = json.loads(capsys.readouterr().out)
    assert [k["instances"] for k in parallel["kinds"]] == [k["instances"] for k in out["kinds"]]


def test_no_kind_meets_within_max_instances(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan-capacity", "--slo-config", str(small), "--no-progress", "--max-instances", "1"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "a100-80" in out and ">1" in out  # the table still shows what the largest fleet reached
    assert err.count("\n") == 1 and "no instance kind meets the target within 1 instances" in err


# ------------------------------------------------------------------------------------------------
# Command-line errors: one line on stderr, nothing simulated


@pytest.mark.parametrize(
    ("extra", "rc", "message"),
    [
        (["--policy", "nope"], 1, "unknown policy 'nope'"),
        (["--target", "1.5"], 1, r"must be in (0, 1]"),
        (["--target", "0"], 1, r"must be in (0, 1]"),
        (["--trace", "/nonexistent/trace.csv"], 1, "/nonexistent/trace.csv"),
        (["--max-instances", "0"], 1, "--max-instances must be in 1..4096"),
        (["--max-instances", "100000"], 1, "--max-instances must be in 1..4096"),  # ran for minutes
        (["--trace", ""], 1, "--trace is empty"),  # it planned on the conversation sample
        (["--rate-scale", "inf"], 1, "--rate-scale must be > 0 and finite, got inf"),
        (["--price", "tpu=1"], 1, "unknown kind 'tpu'"),
        (["--rate-scale", "2", "--target-rps", "5"], 2, "not allowed with argument"),
        (["--max-instances", "many"], 2, "invalid int value"),
    ],
)
def test_bad_inputs_give_one_line_errors(
    small: Path, capsys: pytest.CaptureFixture[str], extra: list[str], rc: int, message: str
) -> None:
    code = _run(["plan-capacity", "--slo-config", str(small), "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert code == rc
    assert out == ""
    assert err.startswith("qlm plan-capacity: error:") and err.count("\n") == 1 and message in err, err


def test_unreadable_config_and_group_missing_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan-capacity", "--slo-config", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read scenario" in capsys.readouterr().err
    path = tmp_path / "partial.yaml"
    # Two models, and a group that serves only one of them: it is no candidate fleet on its own.
    path.write_text(
        SMALL.replace("  - name: m\n", "  - name: n\n    profile: llama-3.1-8b\n  - name: m\n").replace(
            "instances:\n",
            "instances:\n  - {gpu: h100, models: [n, m]}\n  - {name: only-n, gpu: a100-80, models: [n]}\n",
        )
    )
    assert main(["plan-capacity", "--slo-config", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'only-n' does not list model(s) m" in err, err


def test_rate_scale_scales_a_scenario_that_sets_its_own_rate(small: Path) -> None:
    """--rate-scale on a scenario with target_rps dropped that rate: 1.2x of 72 req/s planned for
    0.8 req/s, and more load came back as fewer GPUs."""
    sc = load_scenario(small)
    paced = sc.model_copy(update={"workload": sc.workload.model_copy(update={"target_rps": 72.0})})
    assert capacity.apply_workload_overrides(paced, rate_scale=1.2).workload.target_rps == pytest.approx(86.4)
    plain = capacity.apply_workload_overrides(sc, rate_scale=2.0).workload
    assert (plain.rate_scale, plain.target_rps) == (2.0 * sc.workload.rate_scale, None)  # compressed more
    dense = sc.model_copy(update={"workload": sc.workload.model_copy(update={"rate_scale": 110.0})})
    assert capacity.apply_workload_overrides(dense, rate_scale=2.0).workload.rate_scale == 220.0


def test_a_kind_that_refuses_requests_is_no_answer_and_one_that_takes_none_no_error(tmp_path: Path) -> None:
    """A kind whose context fits fewer requests "met" the SLO on what it took (1,422 of 2,421
    refused) and was recommended; one that fit none stopped the whole command."""
    path = tmp_path / "ctx.yaml"
    path.write_text(TWO_KINDS.replace("classes:", "profiles: {m/a100-80: {context_len: 256}}\nclasses:", 1))
    report = capacity.plan_capacity(load_scenario(path), max_instances=16)
    small_ctx = next(k for k in report.kinds if k.kind == "a100-80")
    assert small_ctx.rejected_at_validation > 0 and small_ctx.instances is None
    assert "refuses" in small_ctx.note and report.recommended is not None
    assert report.recommended.kind == "h100"
    path.write_text(TWO_KINDS.replace("classes:", "profiles: {m/a100-80: {context_len: 2}}\nclasses:", 1))
    report = capacity.plan_capacity(load_scenario(path), max_instances=16)
    none_fit = next(k for k in report.kinds if k.kind == "a100-80")
    assert none_fit.instances is None and none_fit.note.startswith("serves none of the workload")
    assert report.recommended is not None and report.recommended.kind == "h100"
    assert any(line.startswith("  a100-80: serves none") for line in capacity.format_report(report))


def test_an_slo_more_instances_cannot_meet_stops_the_search(small: Path) -> None:
    """A TTFT below one engine step doubled the fleet up to --max-instances (minutes at 100,000)."""
    sc = load_scenario(small)
    tight = [c.model_copy(update={"ttft_s": 0.001}) if c.ttft_s else c for c in sc.classes]
    report = capacity.plan_capacity(sc.model_copy(update={"classes": tight}), max_instances=64)
    (kind,) = report.kinds
    assert kind.instances is None and "more will not help" in kind.note
    assert len(kind.evaluations) == 2  # 4 and 8 (the group's count, then twice it)


def test_an_slo_no_fleet_can_meet_is_told_to_relax_the_slo_not_to_add_instances(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = small.read_text()
    assert "ttft_s: 1.0" in text
    tight = tmp_path / "tight.yaml"
    tight.write_text(text.replace("ttft_s: 1.0", "ttft_s: 0.001"))
    rc = main(["plan-capacity", "--slo-config", str(tight), "--no-progress", "--max-instances", "64"])
    err = capsys.readouterr().err
    assert rc == 1 and "relax the SLOs in the file" in err and "raise --max-instances" not in err


def test_a_share_that_rounds_onto_its_target_is_shown_on_its_side() -> None:
    """98.99% against a 99% target was shown as 99.0% beside "misses"."""
    assert capacity._pct(0.98989, 0.99) == "98.99%"
    assert capacity._pct(0.99004, 0.99) == "99.0%"
    assert capacity._pct(0.99, 0.99) == "99.0%"
    assert capacity._pct(0.5, 0.99) == "50.0%" and capacity._pct(None) == "-"


def test_a_fleet_that_falls_behind_a_short_trace_is_flagged(tmp_path: Path) -> None:
    """A 3.5 s burst at 692 req/s: one GPU met a 600 s SLO by working an extra minute after it, and
    was recommended for that rate without a word."""
    path = tmp_path / "burst.yaml"
    path.write_text(
        SMALL.replace("rate_scale: 120", "rate_scale: 20000")
        .replace("    count: 4  # the search", "    count: 1  # the search")
        .replace("    ttft_s: 1.0\n", "    e2e_s: 600\n")
    )
    report = capacity.plan_capacity(load_scenario(path), max_instances=4)
    text = "\n".join(capacity.format_report(report))
    assert report.recommended is not None and report.recommended.instances == 1
    assert "warning: 1 x a100-80 ends the trace's requests" in text and "falls behind" in text
