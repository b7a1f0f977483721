"""Scenario files (qlm_plugin.workloads.scenario): the packaged default, error messages that name
file, line and key, cost-model overrides, trace paths, synthetic workloads, instance ids and context limits.

Fixture texts carry their 1-based line number as a YAML comment (``# 5``), so the expected line of
every error can be read off the text.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from qlm_plugin.cli import main
from qlm_plugin.domain.costmodel import GPUS, MODELS, cost_model, known_profiles
from qlm_plugin.tools.simulate import build_fleet, build_requests, run_policy
from qlm_plugin.workloads.scenario import (
    ClassEntry,
    EngineSpec,
    InstanceGroup,
    ModelEntry,
    Scenario,
    ScenarioError,
    SyntheticSpec,
    TenantEntry,
    WorkloadSpec,
    load_scenario,
)
from qlm_plugin.workloads.trace_files import load_azure_trace, packaged_trace_path

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"

# A small valid scenario; the broken variants below are spelled out in full so the lines are visible.
VALID = """\
seed: 3                          # 1
workload:                        # 2
  synthetic:                     # 3
    rate_rps: 20                 # 4
    duration_s: 10               # 5
models:                          # 6
  - name: m                      # 7
    profile: llama-3.1-8b        # 8
instances:                       # 9
  - gpu: h100                    # 10
    models: [m]                  # 11
classes:                         # 12
  - name: interactive            # 13
    share: 1                     # 14
    ttft_s: 1                    # 15
"""


def _write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


_NUMBER = re.compile(r"\s+#\s*(\d+)\s*$")


def _unnumbered(text: str) -> str:
    """A fixture edited into another shape: its "# N" line comments no longer hold."""
    return "".join(_NUMBER.sub("", line) + "\n" for line in text.splitlines())


def _errors(path: Path) -> list[tuple[int, str, str]]:
    """Load ``path``, expect a ScenarioError, return its lines as (line, key path, message)."""
    for number, text in enumerate(path.read_text().splitlines(), 1):  # "# N" comments must tell the truth
        comment = _NUMBER.search(text)
        assert comment is None or int(comment.group(1)) == number, f"fixture line {number}: {text!r}"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    out = []
    for line in str(info.value).splitlines():
        prefix = f"{path}:"
        assert line.startswith(prefix), f"error line does not name the file {path}: {line!r}"
        number, key, message = line[len(prefix) :].split(": ", 2)
        out.append((int(number), key, message))
    return out


def _scenario(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Scenario:
    return load_scenario(_write(tmp_path, text, name))


# --------------------------------------------------------------------------------------------- default


def test_packaged_default_loads_and_builds_requests_of_both_classes() -> None:
    scenario = load_scenario(None)
    models = [m.name for m in scenario.models]
    assert models == ["llama-3.1-8b"]
    assert scenario.instance_ids() == ["h100-0", "h100-1"]
    requests, rejected = build_requests(scenario)
    assert requests, "the default scenario yields no requests"
    assert rejected == []
    assert {r.model for r in requests} == {"llama-3.1-8b"}
    by_class = Counter(r.slo_class for r in requests)
    assert set(by_class) == {"interactive", "batch"}
    # 70/30 split as configured, within sampling noise of ~2,400 draws
    assert 0.65 < by_class["interactive"] / len(requests) < 0.75
    interactive = next(r for r in requests if r.slo_class == "interactive")
    assert interactive.slo.ttft_deadline == pytest.approx(interactive.arrival_time + 1.0)
    assert interactive.slo.e2e_deadline is None


def test_valid_fixture_loads(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, VALID)
    assert scenario.source == str(tmp_path / "scenario.yaml")
    assert scenario.seed == 3


# --------------------------------------------------------------------------------------------- errors

# (id, text, line, key path, a fragment of the message)
BROKEN = [
    (
        "unknown top-level key",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instance:                        # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
instances:                       # 7
  - gpu: h100                    # 8
    models: [m]                  # 9
classes:                         # 10
  - name: interactive            # 11
    share: 1                     # 12
""",
        4,
        "instance",
        "unknown key",
    ),
    (
        "unknown nested key",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
    gpux: 2                      # 7
classes:                         # 8
  - name: interactive            # 9
    share: 1                     # 10
""",
        7,
        "instances[0].gpux",
        "unknown key",
    ),
    (
        "wrong type",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    count: two                   # 6
    models: [m]                  # 7
classes:                         # 8
  - name: interactive            # 9
    share: 1                     # 10
""",
        6,
        "instances[0].count",
        "valid integer",
    ),
    (
        "zero rate_scale",
        """\
seed: 1                          # 1
workload:                        # 2
  trace: code                    # 3
  rate_scale: 0                  # 4
models:                          # 5
  - name: m                      # 6
    profile: llama-3.1-8b        # 7
instances:                       # 8
  - gpu: h100                    # 9
    models: [m]                  # 10
classes:                         # 11
  - name: interactive            # 12
    share: 1                     # 13
""",
        4,
        "workload.rate_scale",
        "greater than 0",
    ),
    (
        "negative ttft_s",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
    ttft_s: -1                   # 10
""",
        10,
        "classes[0].ttft_s",
        "greater than or equal to 0.001",
    ),
    (
        "zero synthetic rate",
        """\
workload:                        # 1
  synthetic:                     # 2
    duration_s: 60               # 3
    rate_rps: 0                  # 4
models:                          # 5
  - name: m                      # 6
    profile: llama-3.1-8b        # 7
instances:                       # 8
  - gpu: h100                    # 9
    models: [m]                  # 10
classes:                         # 11
  - name: interactive            # 12
    share: 1                     # 13
""",
        4,
        "workload.synthetic.rate_rps",
        "greater than 0",
    ),
    (
        "bad enum",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
engine:                          # 10
  preemption: evict              # 11
""",
        11,
        "engine.preemption",
        "'recompute' or 'swap'",
    ),
    (
        "missing required key inside an item",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - count: 2                     # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
""",
        5,
        "instances[0].gpu",
        "Field required",
    ),
    (
        "unknown gpu",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - count: 2                     # 5
    gpu: h900                    # 6
    models: [m]                  # 7
classes:                         # 8
  - name: interactive            # 9
    share: 1                     # 10
""",
        6,
        "instances[0].gpu",
        "unknown gpu 'h900'; known: a100-80, h100",
    ),
    (
        "instance references an undefined model",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models:                      # 6
      - m                        # 7
      - phi                      # 8
classes:                         # 9
  - name: interactive            # 10
    share: 1                     # 11
""",
        8,
        "instances[0].models[1]",
        "unknown model 'phi'",
    ),
    (
        "model not on any instance",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
  - name: phi                    # 4
    profile: phi-4               # 5
instances:                       # 6
  - gpu: h100                    # 7
    models: [m]                  # 8
classes:                         # 9
  - name: interactive            # 10
    share: 1                     # 11
""",
        4,
        "models[1].name",
        "model 'phi' is not on any instance's models list",
    ),
    (
        "unknown cost profile",
        """\
models:                          # 1
  - name: m                      # 2
    profile: gpt-9               # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
""",
        6,
        "instances[0].models[0]",
        "no cost profile for model 'gpt-9' on gpu 'h100'",
    ),
    (
        "known model on a gpu the table lacks",
        """\
models:                          # 1
  - name: phi                    # 2
    profile: phi-4               # 3
instances:                       # 4
  - gpu: a100-80                 # 5
    models: [phi]                # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
""",
        6,
        "instances[0].models[0]",
        "no cost profile for model 'phi-4' on gpu 'a100-80'",
    ),
    (
        "e2e_s shorter than ttft_s",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
    ttft_s: 5                    # 10
    e2e_s: 2                     # 11
""",
        8,  # the class entry (a check across two keys); pointing at e2e_s (11) would be nicer
        "classes[0]",
        "e2e_s is shorter than ttft_s",
    ),
    (
        "both trace and synthetic",
        """\
workload:                        # 1
  trace: code                    # 2
  synthetic:                     # 3
    rate_rps: 5                  # 4
    duration_s: 60               # 5
models:                          # 6
  - name: m                      # 7
    profile: llama-3.1-8b        # 8
instances:                       # 9
  - gpu: h100                    # 10
    models: [m]                  # 11
classes:                         # 12
  - name: interactive            # 13
    share: 1                     # 14
""",
        1,
        "workload",
        "give either 'trace' or 'synthetic', not both",
    ),
    (
        "both rate_scale and target_rps",
        """\
seed: 0                          # 1
workload:                        # 2
  rate_scale: 4                  # 3
  target_rps: 30                 # 4
models:                          # 5
  - name: m                      # 6
    profile: llama-3.1-8b        # 7
instances:                       # 8
  - gpu: h100                    # 9
    models: [m]                  # 10
classes:                         # 11
  - name: interactive            # 12
    share: 1                     # 13
""",
        2,
        "workload",
        "give either 'rate_scale' or 'target_rps', not both",
    ),
    (
        "profile key without a gpu",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
profiles:                        # 10
  llama-3.1-8b:                  # 11
    b0_us: 5000                  # 12
""",
        11,
        "profiles.llama-3.1-8b",
        "profile keys are 'model/gpu'",
    ),
    (
        "profile value not a number",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 1                     # 9
profiles:                        # 10
  llama-3.1-8b/h100:             # 11
    b0_us: fast                  # 12
""",
        12,
        "profiles.llama-3.1-8b/h100.b0_us",
        "valid number",
    ),
    (
        "colliding instance names",
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - name: pool                   # 5
    gpu: h100                    # 6
    models: [m]                  # 7
  - name: pool                   # 8
    gpu: a100-80                 # 9
    models: [m]                  # 10
classes:                         # 11
  - name: interactive            # 12
    share: 1                     # 13
""",
        4,
        "instances",
        "instance names collide",
    ),
    (
        "section given as null",
        """\
workload:                        # 1
models:                          # 2
  - name: m                      # 3
    profile: llama-3.1-8b        # 4
instances:                       # 5
  - gpu: h100                    # 6
    models: [m]                  # 7
classes:                         # 8
  - name: interactive            # 9
    share: 1                     # 10
""",
        1,
        "workload",
        "valid dictionary",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_error_names_file_line_and_key(tmp_path: Path, text: str, line: int, key: str, fragment: str) -> None:
    errors = _errors(_write(tmp_path, text))
    assert len(errors) == 1, errors
    got_line, got_key, message = errors[0]
    assert (got_line, got_key) == (line, key), message
    assert fragment in message


def test_misspelt_required_key_reports_both_the_typo_and_the_missing_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
  - name: spare                  # 7
    gpu: h100                    # 8
    model: [m]                   # 9
classes:                         # 10
  - name: interactive            # 11
    share: 1                     # 12
""",
    )
    assert sorted(_errors(path)) == [
        (7, "instances[1].models", "Field required"),  # a missing key: the line of its list item
        (9, "instances[1].model", "unknown key"),
    ]


@pytest.mark.parametrize(
    ("text", "first_line", "second_line", "what"),
    [
        (
            """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
  - name: m                      # 4
    profile: phi-4               # 5
instances:                       # 6
  - gpu: h100                    # 7
    models: [m]                  # 8
classes:                         # 9
  - name: interactive            # 10
    share: 1                     # 11
""",
            2,
            4,
            "models",
        ),
        (
            """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m]                  # 6
classes:                         # 7
  - name: interactive            # 8
    share: 0.5                   # 9
  - share: 0.5                   # 10
    name: interactive            # 11
""",
            8,
            11,
            "classes",
        ),
    ],
    ids=["model", "class"],
)
def test_duplicate_names_are_reported_at_both_entries(
    tmp_path: Path, text: str, first_line: int, second_line: int, what: str
) -> None:
    errors = _errors(_write(tmp_path, text))
    assert [(line, key) for line, key, _ in errors] == [
        (first_line, f"{what}[0].name"),
        (second_line, f"{what}[1].name"),
    ]
    assert all("duplicate" in message for _, _, message in errors)


def test_invalid_yaml_names_the_line_of_the_syntax_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100: big               # 5
    models: [m]                  # 6
""",
    )
    with pytest.raises(ScenarioError, match=rf"^{path}:5: not valid YAML: mapping values are not allowed"):
        load_scenario(path)


def test_unclosed_flow_list_is_reported_where_the_parser_notices(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances:                       # 4
  - gpu: h100                    # 5
    models: [m                   # 6
classes:                         # 7
""",
    )
    # YAML only sees the missing ']' at the next key
    with pytest.raises(ScenarioError, match=rf"^{path}:7: not valid YAML: "):
        load_scenario(path)


def test_an_alias_inside_the_node_it_names_is_an_error_not_a_recursion_traceback(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
instances: &all                  # 4
  - gpu: h100                    # 5
    models: *all                 # 6
""",
    )
    with pytest.raises(ScenarioError, match=rf"^{path}:4: not valid YAML: an alias names a node that holds"):
        load_scenario(path)
    shared = path.read_text().replace("models: *all", "models: &m [m]").replace("&all", "")
    path.write_text(shared + "classes: [{name: c, share: 1, ttft_s: 1}]\n")
    assert load_scenario(path).instances[0].models == ["m"]  # an alias elsewhere is fine


@pytest.mark.parametrize("text", ["- models\n- instances\n", "just a string\n", "", "# only a comment\n"])
def test_a_document_that_is_not_a_mapping_is_an_error_at_line_1(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError, match=rf"^{path}:1: a scenario is a YAML mapping"):
        load_scenario(path)


def test_unreadable_path_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "scenario.yaml"
    with pytest.raises(ScenarioError, match=rf"^{missing}: cannot read scenario: No such file"):
        load_scenario(missing)
    with pytest.raises(ScenarioError, match=rf"^{tmp_path}: cannot read scenario: "):
        load_scenario(tmp_path)  # a folder


def test_several_schema_errors_are_all_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
sed: 4                           # 1
workload:                        # 2
  rate_scale: -2                 # 3
models:                          # 4
  - name: m                      # 5
    profile: llama-3.1-8b        # 6
instances:                       # 7
  - gpu: h100                    # 8
    count: 0                     # 9
    models: [m]                  # 10
classes:                         # 11
  - name: interactive            # 12
    share: 1                     # 13
    ttft_s: -1                   # 14
    weight: heavy                # 15
""",
    )
    errors = _errors(path)
    assert sorted((line, key) for line, key, _ in errors) == [
        (1, "sed"),
        (3, "workload.rate_scale"),
        (9, "instances[0].count"),
        (14, "classes[0].ttft_s"),
        (15, "classes[0].weight"),
    ]


def test_several_semantic_errors_are_all_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
models:                          # 1
  - name: m                      # 2
    profile: llama-3.1-8b        # 3
  - name: lonely                 # 4
    profile: phi-4               # 5
instances:                       # 6
  - gpu: h900                    # 7
    models: [m]                  # 8
  - gpu: h100                    # 9
    models: [m, ghost]           # 10
classes:                         # 11
  - name: c                      # 12
    share: 1                     # 13
  - name: c                      # 14
    share: 1                     # 15
""",
    )
    errors = _errors(path)
    assert sorted((line, key) for line, key, _ in errors) == [
        (4, "models[1].name"),
        (7, "instances[0].gpu"),
        (10, "instances[1].models[1]"),
        (12, "classes[0].name"),
        (14, "classes[1].name"),
    ]


def test_cli_prints_the_error_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, VALID.replace("gpu: h100      ", "gpu: h900      "))
    assert main(["simulate", "--scenario", str(path), "--policies", "fcfs", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:10: instances[0].gpu: unknown gpu 'h900'" in err


# --------------------------------------------------------------------------------------------- profiles

PROFILED = """\
models:
  - name: m
    profile: llama-3.1-8b
instances:
  - gpu: h100
    models: [m]
  - gpu: a100-80
    models: [m]
classes:
  - name: interactive
    share: 1
profiles:
"""


def test_profile_override_reaches_the_cost_model_of_that_gpu_only(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, PROFILED + "  llama-3.1-8b/h100: {b0_us: 4000, max_num_seqs: 64}\n")
    h100 = scenario.cost_models_for("h100")["m"]
    table = cost_model("llama-3.1-8b", "h100")
    assert h100.b0_us == 4000
    assert h100.max_num_seqs == 64
    assert (h100.b1_us, h100.b2_us, h100.kv_blocks, h100.tp) == (table.b1_us, table.b2_us, table.kv_blocks, 1)
    assert scenario.cost_models_for("a100-80")["m"].b0_us == cost_model("llama-3.1-8b", "a100-80").b0_us
    # the simulated fleet uses them
    fleet = build_fleet(scenario)
    assert fleet.instances["h100-0"].cost_models["m"].b0_us == 4000
    assert fleet.instances["a100-80-0"].cost_models["m"].b0_us == 16442


def test_override_by_model_name_wins_over_override_by_profile(tmp_path: Path) -> None:
    scenario = _scenario(
        tmp_path,
        PROFILED + "  llama-3.1-8b/h100: {b0_us: 4000, b1_us: 20}\n  m/h100: {b0_us: 3000}\n",
    )
    cm = scenario.cost_models_for("h100")["m"]
    assert (cm.b0_us, cm.b1_us) == (3000, 20)


def test_gpu_facts_override_changes_load_times(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, PROFILED + "  llama-3.1-8b/h100: {host_link_gbps: 10, cold_start_s: 5}\n")
    cm = scenario.cost_models_for("h100")["m"]
    weights = MODELS["llama-3.1-8b"].weights_gb
    assert cm.load_s(warm=True) == pytest.approx(0.5 + weights / 10)
    assert cm.load_s(warm=False) == pytest.approx(5 + weights / 2.0)


def test_unknown_cost_model_field_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, PROFILED + "  llama-3.1-8b/h100: {b0_uss: 4000}\n")
    errors = _errors(path)
    # reported where the pair is used (instances[0].models[0], line 6), naming the bad field
    assert errors == [(6, "instances[0].models[0]", "unknown cost-model field(s): b0_uss")]


def test_a_kv_cache_that_cannot_hold_one_context_is_an_error(tmp_path: Path) -> None:
    """vLLM refuses to start so; a simulation of it would hold its requests, never serve or refuse them."""
    errors = _errors(_write(tmp_path, PROFILED + "  llama-3.1-8b/h100: {kv_blocks: 20}\n"))
    assert len(errors) == 1 and errors[0][1] == "instances[0].models[0]"
    assert "a KV cache of 320 tokens cannot hold one request of its context (32768 tokens)" in errors[0][2]


PAIR_ABSENT = """\
seed: 2
workload:
  synthetic: {rate_rps: 10, duration_s: 10, prompt_mean: 500, output_mean: 50}
models:
  - name: phi
    profile: phi-4
instances:
  - gpu: a100-80
    models: [phi]
classes:
  - name: interactive
    share: 1
    ttft_s: 2
profiles:
"""


def test_pair_absent_from_the_table_works_with_a_full_fit(tmp_path: Path) -> None:
    scenario = _scenario(
        tmp_path, PAIR_ABSENT + "  phi-4/a100-80: {b0_us: 9000, b1_us: 90, b2_us: 40, kv_blocks: 12000}\n"
    )
    cm = scenario.cost_models_for("a100-80")["phi"]
    assert (cm.tp, cm.b0_us, cm.b1_us, cm.b2_us, cm.kv_blocks) == (1, 9000, 90, 40, 12000)
    assert cm.model == MODELS["phi-4"]  # model facts from the table
    assert cm.gpu.host_link_gbps == 25.0  # the a100-80 entry
    requests, rejected = build_requests(scenario)
    assert requests and not rejected
    result = run_policy(scenario, "fcfs", requests, rejected, autoload=False)
    assert result.overall.requests == len(requests)


def test_pair_absent_from_the_table_needs_all_four_fit_values(tmp_path: Path) -> None:
    path = _write(tmp_path, PAIR_ABSENT + "  phi-4/a100-80: {b0_us: 9000, b1_us: 90, b2_us: 40}\n")
    [(line, key, message)] = _errors(path)
    assert (line, key) == (9, "instances[0].models[0]")
    assert "no cost profile for model 'phi-4' on gpu 'a100-80'" in message
    assert "its own: b0_us, b1_us, b2_us and kv_blocks" in message


def test_unknown_gpu_is_allowed_when_a_profile_defines_it(tmp_path: Path) -> None:
    text = PAIR_ABSENT.replace("profile: phi-4", "profile: llama-3.1-8b").replace("a100-80", "b200")
    scenario = _scenario(
        tmp_path, text + "  llama-3.1-8b/b200: {b0_us: 3000, b1_us: 9, b2_us: 3, kv_blocks: 60000, tp: 1}\n"
    )
    assert scenario.instance_ids() == ["b200-0"]
    cm = scenario.cost_models_for("b200")["phi"]
    assert cm.gpu.name == "b200" and cm.gpu.host_link_gbps == 25.0  # default GPU facts
    assert cm.kv_blocks == 60000


UNKNOWN_PROFILE = """\
models:
  - name: q
    profile: qwen-7b
instances:
  - gpu: h100
    models: [q]
classes:
  - name: interactive
    share: 1
profiles:
  qwen-7b/h100:
    b0_us: 5000
    b1_us: 15
    b2_us: 5
    kv_blocks: 40000
"""


def test_unknown_profile_works_with_fit_and_model_facts(tmp_path: Path) -> None:
    facts = "    weights_gb: 15.2\n    kv_bytes_per_token: 57344\n    context_len: 32768\n"
    scenario = _scenario(tmp_path, UNKNOWN_PROFILE + facts)
    cm = scenario.cost_models_for("h100")["q"]
    assert (cm.b0_us, cm.b1_us, cm.b2_us, cm.kv_blocks) == (5000, 15, 5, 40000)
    assert (cm.model.weights_gb, cm.model.kv_bytes_per_token, cm.model.context_len) == (15.2, 57344, 32768)
    assert scenario.model_specs()["q"].context_len == 32768
    assert cm.load_s(warm=True) == pytest.approx(0.5 + 15.2 / 50)


def test_unknown_profile_without_model_facts_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, UNKNOWN_PROFILE + "    weights_gb: 15.2\n")
    [(line, key, message)] = _errors(path)
    assert (line, key) == (6, "instances[0].models[0]")
    assert "unknown model profile 'qwen-7b'" in message
    assert "weights_gb, kv_bytes_per_token and context_len" in message


# --------------------------------------------------------------------------------------------- traces


def test_relative_trace_path_is_resolved_against_the_scenario_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "tiny.csv").write_text(
        HEADER
        + "2023-11-16 18:00:00.0000000,100,10\n"
        + "2023-11-16 18:00:00.5000000,200,20\n"
        + "2023-11-16 18:00:02.0000000,300,30\n"
    )
    text = VALID.replace("  synthetic:                     # 3\n", "  trace: data/tiny.csv\n")
    text = text.replace("    rate_rps: 20                 # 4\n    duration_s: 10               # 5\n", "")
    path = _write(folder, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working folder must not matter
    scenario = load_scenario(path)
    assert Path(scenario.workload.trace or "") == folder / "data" / "tiny.csv"
    requests, rejected = build_requests(scenario)
    assert not rejected
    assert [(r.arrival_time, r.prompt_tokens, r.true_output_tokens) for r in requests] == [
        (0.0, 100, 10),
        (0.5, 200, 20),
        (2.0, 300, 30),
    ]


def test_absolute_trace_path_and_packaged_names_are_kept(tmp_path: Path) -> None:
    csv = tmp_path / "abs.csv"
    csv.write_text(HEADER + "0,10,1\n1,10,1\n")
    base = VALID.replace("  synthetic:                     # 3\n", "  trace: TRACE\n")
    base = base.replace("    rate_rps: 20                 # 4\n    duration_s: 10               # 5\n", "")
    sub = tmp_path / "sub"
    assert load_scenario(_write(sub, base.replace("TRACE", str(csv)))).workload.trace == str(csv)
    assert load_scenario(_write(sub, base.replace("TRACE", "code"))).workload.trace == "code"


def test_workload_reshaping_keys_apply_to_a_trace(tmp_path: Path) -> None:
    text = VALID.replace(
        "  synthetic:                     # 3\n    rate_rps: 20                 # 4\n"
        "    duration_s: 10               # 5\n",
        "  trace: code\n  start_s: 60\n  duration_s: 600\n  rate_scale: 10\n  max_requests: 50\n",
    )
    requests, _ = build_requests(_scenario(tmp_path, text))
    full = load_azure_trace(packaged_trace_path("code"))
    in_window = [r for r in full if 60 <= r.arrival_s < 660]
    assert len(requests) == min(50, len(in_window))
    assert requests[0].arrival_time == 0.0
    # arrivals are the window's, relative to its first, compressed 10x
    assert requests[-1].arrival_time == pytest.approx((in_window[49].arrival_s - in_window[0].arrival_s) / 10)
    assert [r.prompt_tokens for r in requests] == [r.prompt_tokens for r in in_window[:50]]


# --------------------------------------------------------------------------------------------- synthetic


def _synthetic(tmp_path: Path, seed: int, extra: str = "") -> list[tuple[float, int, int, str]]:
    text = VALID.replace("seed: 3      ", f"seed: {seed}      ").replace(
        "    duration_s: 10               # 5\n", "    duration_s: 100\n" + extra
    )
    requests, rejected = build_requests(_scenario(tmp_path, text, f"seed{seed}.yaml"))
    assert not rejected
    return [(r.arrival_time, r.prompt_tokens, r.max_tokens, r.model) for r in requests]


@pytest.mark.parametrize(
    "arrival",
    [
        "    arrival: poisson\n",
        "    arrival: gamma\n    cv: 2\n",
        "    arrival: onoff\n    on_s: 5\n    off_s: 5\n",
    ],
)
def test_synthetic_workload_is_deterministic_for_a_seed(tmp_path: Path, arrival: str) -> None:
    first = _synthetic(tmp_path, 7, arrival)
    again = _synthetic(tmp_path, 7, arrival)
    other = _synthetic(tmp_path, 8, arrival)
    assert first == again
    assert first != other
    arrivals = [a for a, *_ in first]
    assert arrivals[0] == 0.0 and all(0 <= a < 100 for a in arrivals)
    assert arrivals == sorted(arrivals)
    assert 1500 < len(first) < 2500  # 20 req/s for 100 s


def test_gamma_arrivals_are_burstier_than_poisson(tmp_path: Path) -> None:
    def gap_cv(rows: list[tuple[float, int, int, str]]) -> float:
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(rows)]
        return statistics.pstdev(gaps) / statistics.fmean(gaps)

    poisson = gap_cv(_synthetic(tmp_path, 1))
    gamma = gap_cv(_synthetic(tmp_path, 1, "    arrival: gamma\n    cv: 3\n"))
    assert 0.85 < poisson < 1.15
    assert gamma > 2.0


def test_synthetic_lengths_from_a_packaged_trace(tmp_path: Path) -> None:
    rows = _synthetic(tmp_path, 4, "    lengths_from: code\n")
    code = {(r.prompt_tokens, r.output_tokens) for r in load_azure_trace(packaged_trace_path("code"))}
    prompts = {p for p, _ in code}
    assert {p for _, p, _, _ in rows} <= prompts


def test_synthetic_length_sigma_widens_the_tail(tmp_path: Path) -> None:
    narrow = sorted(
        p for _, p, _, _ in _synthetic(tmp_path, 6, "    prompt_mean: 100\n    length_sigma: 0.3\n")
    )
    wide = sorted(
        p for _, p, _, _ in _synthetic(tmp_path, 6, "    prompt_mean: 100\n    length_sigma: 1.5\n")
    )
    assert wide[int(len(wide) * 0.99)] > 3 * narrow[int(len(narrow) * 0.99)]


def test_synthetic_prompt_mean_is_honoured(tmp_path: Path) -> None:
    rows = _synthetic(tmp_path, 5, "    prompt_mean: 300\n    output_mean: 40\n")
    mean_prompt = statistics.fmean(p for _, p, _, _ in rows)
    assert 250 < mean_prompt < 350


# --------------------------------------------------------------------------------------------- instances


def test_instance_ids_from_group_name_and_count(tmp_path: Path) -> None:
    text = VALID.replace(
        "  - gpu: h100                    # 10\n    models: [m]                  # 11\n",
        "  - name: fast\n    count: 3\n    gpu: h100\n    models: [m]\n"
        "  - count: 2\n    gpu: a100-80\n    models: [m]\n",
    )
    scenario = _scenario(tmp_path, text)
    expected = ["fast-0", "fast-1", "fast-2", "a100-80-0", "a100-80-1"]
    assert scenario.instance_ids() == expected
    fleet = build_fleet(scenario)
    assert list(fleet.instances) == expected
    assert fleet.instances["fast-2"].gpu == "h100"
    assert fleet.instances["a100-80-1"].cost_models["m"].b0_us == 16442


def test_unnamed_groups_on_the_same_gpu_collide(tmp_path: Path) -> None:
    text = VALID.replace(
        "  - gpu: h100                    # 10\n",
        "  - gpu: h100                    # 10\n    models: [m]                  # 11\n  - gpu: h100\n",
    )
    errors = _errors(_write(tmp_path, _unnumbered(text)))
    assert errors == [(9, "instances", "instance names collide; give each group a distinct 'name'")]


def test_warm_models_and_group_settings_reach_the_simulated_instances(tmp_path: Path) -> None:
    text = """\
models:
  - name: a
    profile: llama-3.1-8b
  - name: b
    profile: phi-4
instances:
  - name: mixed
    count: 2
    gpu: h100
    models: [a, b]
    host_mem_gb: 64
    max_num_seqs: 32
    max_num_batched_tokens: 4096
classes:
  - name: interactive
    share: 1
engine:
  preemption: swap
  max_model_residency_s: 30
"""
    fleet = build_fleet(_scenario(tmp_path, text))
    inst = fleet.instances["mixed-1"]
    assert inst.model == "a"
    assert list(inst.warm) == ["b"]
    assert (inst.max_num_seqs, inst.max_batched, inst.host_mem_gb) == (32, 4096, 64)
    assert inst.preemption_mode.value == "swap"
    assert inst.max_model_residency_s == 30


# --------------------------------------------------------------------------------------------- context


def _context_scenario(tmp_path: Path, model_extra: str, tail: str = "") -> Scenario:
    (tmp_path / "long.csv").write_text(
        HEADER
        + "0,100,10\n"  # fits
        + "1,3000,10\n"  # prompt longer than the context: rejected
        + "2,2040,100\n"  # prompt fits, but its true output does not fit beside it: rejected
        + "3,2000,10\n"  # fits; max_tokens clipped to the context
    )
    text = f"""\
workload:
  trace: long.csv
  max_tokens: 1000
models:
  - name: m
    profile: llama-3.1-8b
{model_extra}instances:
  - gpu: h100
    models: [m]
classes:
  - name: interactive
    share: 1
{tail}"""
    return _scenario(tmp_path, text)


def test_context_len_override_rejects_over_long_prompts_visibly(tmp_path: Path) -> None:
    scenario = _context_scenario(tmp_path, "    context_len: 2048\n")
    assert scenario.model_specs()["m"].context_len == 2048
    assert scenario.cost_models_for("h100")["m"].model.context_len == 2048
    requests, rejected = build_requests(scenario)
    assert [r.id for r in requests] == ["r0", "r3"]
    assert [(x.index, x.error.field) for x in rejected] == [(1, "prompt_tokens"), (2, "max_tokens")]
    assert "does not fit m's context of 2048" in str(rejected[0].error)
    assert requests[1].max_tokens == 48  # min(1000, 2048 - 2000)
    # without the override the table's 32768 applies and all four fit
    requests, rejected = build_requests(_context_scenario(tmp_path, ""))
    assert len(requests) == 4 and not rejected


def test_rejected_requests_are_counted_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _context_scenario(tmp_path, "    context_len: 2048\n")
    path = tmp_path / "scenario.yaml"
    assert main(["simulate", "--scenario", str(path), "--policies", "fcfs", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 4
    assert out["rejected_at_validation"] == 2
    assert out["policies"]["fcfs"]["overall"]["requests"] == 4


# --------------------------------------------------------------------------------------------- known bugs
# Each of these documents a defect in qlm_plugin/scenario.py; remove the marker when it is fixed.


def test_context_len_override_through_profiles_keeps_integers(tmp_path: Path) -> None:
    scenario = _context_scenario(tmp_path, "", "profiles:\n  llama-3.1-8b/h100: {context_len: 2048}\n")
    requests, rejected = build_requests(scenario)
    assert [r.id for r in requests] == ["r0", "r3"]
    assert [(x.index, x.error.field) for x in rejected] == [(1, "prompt_tokens"), (2, "max_tokens")]


def test_explicit_conv_trace_and_synthetic_is_an_error(tmp_path: Path) -> None:
    text = VALID.replace("  synthetic:                     # 3\n", "  trace: conv\n  synthetic:\n")
    assert [(line, key) for line, key, _ in _errors(_write(tmp_path, _unnumbered(text)))] == [(2, "workload")]


def test_cv_without_gamma_is_a_scenario_error(tmp_path: Path) -> None:
    text = VALID.replace("    duration_s: 10               # 5\n", "    duration_s: 10\n    cv: 2\n")
    errors = _errors(_write(tmp_path, _unnumbered(text)))
    assert [key for _, key, _ in errors] == ["workload.synthetic"]


@pytest.mark.parametrize(
    "extra",
    [
        "    on_s: 5\n",
        "    arrival: gamma\n    cv: 2\n    off_rate_fraction: 0.5\n",
        "    lengths_from: code\n    length_sigma: 2\n",
    ],
)
def test_an_option_without_its_arrival_or_lengths_is_a_scenario_error(tmp_path: Path, extra: str) -> None:
    text = VALID.replace("    duration_s: 10               # 5\n", "    duration_s: 10\n" + extra)
    errors = _errors(_write(tmp_path, _unnumbered(text)))
    assert [key for _, key, _ in errors] == ["workload.synthetic"]


def test_relative_lengths_from_is_resolved_against_the_scenario_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "lengths.csv").write_text(HEADER + "0,111,11\n1,222,22\n")
    text = VALID.replace(
        "    duration_s: 10               # 5\n", "    duration_s: 10\n    lengths_from: lengths.csv\n"
    )
    path = _write(folder, text)
    monkeypatch.chdir(tmp_path)
    requests, _ = build_requests(load_scenario(path))
    assert {r.prompt_tokens for r in requests} <= {111, 222}


def test_profile_key_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, PROFILED + "  llama-3.1-8b/h10: {b0_us: 4000}\n")
    errors = _errors(path)
    assert [(line, key) for line, key, _ in errors] == [(13, "profiles.llama-3.1-8b/h10")]


def test_non_positive_cost_model_facts_are_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, PROFILED + "  llama-3.1-8b/h100: {tp: 0}\n")
    errors = _errors(path)
    assert [key for _, key, _ in errors] == ["instances[0].models[0]"]


# --------------------------------------------------------------------------------------------- docs
# docs/scenarios.md is the user's reference: its key tables, catalogue and examples must match the code.

DOC = Path(__file__).resolve().parents[1] / "docs" / "scenarios.md"
SECTIONS = {
    "Top level": Scenario,
    "`workload`": WorkloadSpec,
    "`workload.synthetic`": SyntheticSpec,
    "`models`": ModelEntry,
    "`instances`": InstanceGroup,
    "`classes`": ClassEntry,
    "`tenants`": TenantEntry,
    "`engine`": EngineSpec,
}


def _doc_table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after the ``### heading`` of docs/scenarios.md."""
    text = DOC.read_text()
    start = text.index(f"\n### {heading}\n")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]  # without the header and the --- line


def _yaml_default(value: object) -> str:
    if value is None:
        return "`null`"
    if value == "":
        return '`""`'
    return f"`{value}`"


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_doc_reference_lists_every_key_with_its_default(heading: str) -> None:
    model = SECTIONS[heading]
    fields = {name: info for name, info in model.model_fields.items() if name != "source"}
    rows = _doc_table(heading)
    assert [row[0] for row in rows] == [f"`{name}`" for name in fields]
    for (_, _, default, _), (name, info) in zip(rows, fields.items(), strict=True):
        if info.is_required():
            assert default == "required", name
        elif isinstance(info.default, (str, int, float, type(None))) and (model, name) != (
            InstanceGroup,
            "name",
        ):
            assert default == _yaml_default(info.default), name


def test_doc_catalogue_matches_the_cost_models() -> None:
    rows = _doc_table("`profiles`")  # the field table
    documented = {f.strip("` ") for row in rows for f in row[0].split(",")}
    assert documented == {
        "tp", "b0_us", "b1_us", "b2_us", "kv_blocks", "max_num_seqs", "max_num_batched_tokens",
        "weights_gb", "kv_bytes_per_token", "context_len",
        "host_link_gbps", "cold_load_gbps", "cold_start_s", "warm_start_s",
    }  # fmt: skip
    text = DOC.read_text()
    table = text[text.index("\n## Cost-model catalogue\n") : text.index("\n### Model facts\n")]
    pairs = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if not line.startswith("|") or cells[0] in ("model", "---"):
            continue
        model, gpu, tp, b0, b1, b2, blocks, tokens, warm, cold = cells
        cm = cost_model(model, gpu)
        pairs.append(f"{model}/{gpu}")
        assert (int(tp), float(b0), float(b1), float(b2), int(blocks)) == (
            cm.tp, cm.b0_us, cm.b1_us, cm.b2_us, cm.kv_blocks
        ), model  # fmt: skip
        assert int(tokens.replace(",", "")) == cm.kv_blocks * 16
        assert (warm, cold) == (f"{cm.load_s(warm=True):.2f}", f"{cm.load_s(warm=False):.2f}")
        assert (cm.max_num_seqs, cm.max_num_batched_tokens) == (256, 8192)
    assert sorted(pairs) == known_profiles()
    facts = {row[0]: row[1:] for row in _doc_table("Model facts")}
    assert set(facts) == set(MODELS)
    for name, (weights, kv, context) in facts.items():
        m = MODELS[name]
        assert (float(weights), int(kv.split()[0]), int(context)) == (
            m.weights_gb,
            m.kv_bytes_per_token,
            m.context_len,
        )
    gpus = {row[0]: [float(x) for x in row[1:]] for row in _doc_table("GPU facts")}
    for name, spec in GPUS.items():
        assert gpus[name] == [spec.host_link_gbps, spec.cold_load_gbps, spec.cold_start_s, spec.warm_start_s]


def _doc_examples() -> dict[str, str]:
    """The YAML blocks of docs/scenarios.md, by the file name on their first line."""
    out = {}
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S):
        named = re.match(r"# (\S+\.yaml)", block)
        assert named, f"a YAML example without its file name on the first line: {block[:60]!r}"
        out[named.group(1)] = block
    return out


def test_doc_examples_are_valid(tmp_path: Path) -> None:
    examples = _doc_examples()
    assert set(examples) == {"single.yaml", "two_models.yaml", "broken.yaml", "broken2.yaml"}
    for name in ("single.yaml", "two_models.yaml"):
        scenario = _scenario(tmp_path, examples[name], name)
        requests, _ = build_requests(scenario)
        assert requests, name
        assert {r.model for r in requests} == {m.name for m in scenario.models}
    fleet = build_fleet(_scenario(tmp_path, examples["two_models.yaml"], "two_models.yaml"))
    assert {i: (inst.model, list(inst.warm)) for i, inst in fleet.instances.items()} == {
        "a-0": ("chat", ["reason"]),
        "b-0": ("reason", ["chat"]),
    }


@pytest.mark.parametrize("name", ["broken.yaml", "broken2.yaml"])
def test_doc_error_examples_are_what_the_cli_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    _write(tmp_path, _doc_examples()[name], name)
    shown = re.search(rf"\$ qlm simulate --scenario {name}\n(.*?)```", DOC.read_text(), re.S)
    assert shown is not None
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--scenario", name]) == 1
    assert capsys.readouterr().err == shown.group(1)


def test_duplicate_keys_tenants_and_listed_twice_models_are_errors(tmp_path: Path) -> None:
    text = (
        "models:\n"  # 1
        "  - name: m\n"  # 2
        "    profile: llama-3.1-8b\n"  # 3
        "instances:\n"  # 4
        "  - gpu: h100\n"  # 5
        "    models: [m, m]\n"  # 6
        "classes:\n"  # 7
        "  - {name: c, share: 1}\n"  # 8
        "tenants:\n"  # 9
        "  - {name: t, share: 1}\n"  # 10
        "  - {name: t, share: 2}\n"  # 11
    )
    path = tmp_path / "dupes.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert f"{path}:11: tenants[1].name: duplicate tenant name 't'" in msg
    assert f"{path}:6: instances[0].models[1]: model 'm' is listed twice" in msg
    path.write_text("seed: 1\n" + text + "seed: 2\n")
    with pytest.raises(ScenarioError, match=r"dupes.yaml:13: seed: key given twice"):
        load_scenario(path)


def test_what_was_ignored_unsaid_is_an_error(tmp_path: Path) -> None:
    """A profile for a pair no instance runs (its values were never checked), lognormal means
    beside lengths_from, and an empty trace (it replayed the conversation sample)."""
    base = _unnumbered(VALID)
    two = base.replace(
        "  - name: m\n    profile: llama-3.1-8b\n",
        "  - name: m\n    profile: llama-3.1-8b\n  - name: n\n    profile: mistral-small-24b\n",
    ).replace(
        "    models: [m]\n", "    models: [m]\n    name: h\n  - gpu: a100-80\n    models: [n]\n    name: a\n"
    )
    assert _scenario(tmp_path, two).instance_ids()  # m runs on the H100 only, n on the A100
    with pytest.raises(ScenarioError, match=r"profiles\.m/a100-80"):
        _scenario(tmp_path, two + "profiles:\n  m/a100-80: {kv_blocks: -3}\n")
    means = base.replace(
        "    duration_s: 10\n", "    duration_s: 10\n    lengths_from: conv\n    prompt_mean: 3000\n"
    )
    with pytest.raises(ScenarioError, match="prompt_mean apply to lognormal lengths, not with lengths_from"):
        _scenario(tmp_path, means)
    empty = base.replace("  synthetic:\n    rate_rps: 20\n    duration_s: 10\n", '  trace: ""\n')
    with pytest.raises(ScenarioError, match="trace is empty"):
        _scenario(tmp_path, empty)
    path = tmp_path / "latin1.yaml"
    path.write_bytes(base.encode() + b"# caf\xe9\n")
    with pytest.raises(ScenarioError, match=rf"{path}: cannot read scenario: not UTF-8 text"):
        load_scenario(path)


def test_a_model_named_with_a_slash_takes_a_profile_override(tmp_path: Path) -> None:
    """A Hugging Face id holds '/': a 'name/gpu' key splits at its last one."""
    text = _unnumbered(VALID).replace("name: m\n", "name: meta-llama/Llama-3.1-8B-Instruct\n")
    text = text.replace("models: [m]", "models: [meta-llama/Llama-3.1-8B-Instruct]")
    text += "profiles:\n  meta-llama/Llama-3.1-8B-Instruct/h100: {kv_blocks: 40000}\n"
    scenario = _scenario(tmp_path, text)
    assert scenario.cost_models_for("h100")["meta-llama/Llama-3.1-8B-Instruct"].kv_blocks == 40000
