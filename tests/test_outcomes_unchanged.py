"""Every policy's per-request outcomes on the packaged default scenario are the ones recorded in
``tests/data/outcomes.json`` (``python -m qlm_plugin.tools.outcomes record``): a change of behaviour
is deliberate, and is recorded again with it. ``python -m qlm_plugin.tools.outcomes check
tests/data/outcomes.json`` checks the bench scenarios A-D too (about a minute)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qlm_plugin.tools import outcomes
from qlm_plugin.tools.outcomes import POLICIES, rows
from qlm_plugin.tools.simulate import build_requests, run_policy
from qlm_plugin.workloads.scenario import load_scenario

RECORDED = json.loads((Path(__file__).parent / "data" / "outcomes.json").read_text())["default"]


@pytest.fixture(scope="module")
def requests() -> tuple[object, list, list]:  # type: ignore[type-arg]
    scenario = load_scenario(None)
    return (scenario, *build_requests(scenario))


@pytest.mark.parametrize("policy", POLICIES)
def test_outcomes_on_the_default_scenario_are_the_recorded_ones(requests: tuple, policy: str) -> None:  # type: ignore[type-arg]
    scenario, reqs, rejected = requests
    result = run_policy(scenario, policy, reqs, rejected, autoload=False)
    lines = rows(result.outcomes)
    assert len(lines) == RECORDED[policy]["requests"]
    assert round(result.overall.slo_attainment, 6) == RECORDED[policy]["slo_attainment"]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == RECORDED[policy]["digest"]


@pytest.mark.parametrize("args", [["check", "missing.json"], ["check", "list.json"], ["record", "no/x.json"]])
def test_the_tool_refuses_a_file_it_cannot_use_before_simulating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """It ran every simulation (almost two minutes) and then died with a traceback."""
    (tmp_path / "list.json").write_text("[1]")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outcomes, "run", lambda **_kw: pytest.fail("simulated before checking"))
    with pytest.raises(SystemExit) as exit_:
        outcomes.main(args)
    assert exit_.value.code == 2
