"""Per-request outcomes of every policy on the reference scenarios, as digests: a refactoring that
must not change behaviour is checked against the digests recorded before it.

``python -m qlm_plugin.tools.outcomes record FILE`` runs every built-in policy on the packaged default
scenario and on the bench scenarios A-D at base load (those whose trace is present), and writes, per
scenario and policy, a digest of every request's outcome (status, instance, start, first token,
finish, output tokens, preemptions; times to the microsecond) with the request count and the SLO
attainment. ``python -m qlm_plugin.tools.outcomes check FILE`` runs the same and compares; ``--rows DIR``
also writes each run's rows, to find where two runs part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from qlm_plugin.domain.outcome import RequestOutcome
from qlm_plugin.tools.simulate import build_requests, run_policy
from qlm_plugin.workloads.scenario import Scenario, ScenarioError, load_scenario

POLICIES = ("fcfs", "edf", "edf-shed", "priority", "qlm", "oracle")
BENCH = Path(__file__).resolve().parents[2] / "scenarios" / "bench"


def _time(t: float | None) -> str:
    return "-" if t is None else f"{t:.6f}"


def rows(outcomes: Iterable[RequestOutcome]) -> list[str]:
    """One line per request, sorted by request id."""
    return sorted(
        f"{o.request.id} {o.status.value} {o.instance_id or '-'} {_time(o.start_time)} "
        f"{_time(o.first_token_time)} {_time(o.finish_time)} {o.output_tokens} {o.preemptions}"
        for o in outcomes
    )


def scenarios() -> list[tuple[str, Scenario]]:
    """The packaged default, and each bench scenario whose trace is present."""
    out = [("default", load_scenario(None))]
    for name in ("A", "B", "C", "D"):
        try:
            out.append((name, load_scenario(BENCH / f"{name}.yaml")))
        except (ScenarioError, OSError) as exc:
            print(f"scenario {name} skipped: {exc}", file=sys.stderr)
    return out


def run(policies: Sequence[str] = POLICIES, rows_dir: Path | None = None) -> dict[str, dict[str, object]]:
    result: dict[str, dict[str, object]] = {}
    for name, scenario in scenarios():
        requests, rejected = build_requests(scenario)
        per_policy: dict[str, object] = {}
        for policy in policies:
            outcome = run_policy(scenario, policy, requests, rejected, autoload=False)
            lines = rows(outcome.outcomes)
            if rows_dir is not None:
                rows_dir.mkdir(parents=True, exist_ok=True)
                (rows_dir / f"{name}-{policy}.txt").write_text("\n".join(lines) + "\n")
            per_policy[policy] = {
                "digest": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
                "requests": len(lines),
                "slo_attainment": round(outcome.overall.slo_attainment, 6),
            }
            print(f"{name} {policy}: {per_policy[policy]}", file=sys.stderr)
        result[name] = per_policy
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlm_plugin.tools.outcomes", description=__doc__)
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--rows", type=Path, metavar="DIR", help="also write each run's rows here")
    args = parser.parse_args(argv)
    # The inputs checked before the minutes of simulation, not after them.
    recorded: dict[str, dict[str, object]] = {}
    if args.action == "check":
        try:
            recorded = json.loads(args.file.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read the recorded outcomes {args.file}: {exc}")
        if not isinstance(recorded, dict):
            parser.error(f"{args.file} holds no recorded outcomes (a JSON object by trace and policy)")
    elif not args.file.parent.is_dir():
        parser.error(f"cannot record into {args.file}: no folder {args.file.parent}")
    now = run(rows_dir=args.rows)
    if args.action == "record":
        args.file.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        return 0
    differ = [
        f"{name} {policy}"
        for name, policies in recorded.items()
        for policy, figures in policies.items()
        if name in now and now[name].get(policy) != figures
    ]
    missing = sorted(set(recorded) - set(now))
    for line in differ:
        print(f"DIFFERENT: {line}")
    if missing:
        print(f"not run (trace missing?): {', '.join(missing)}")
    print("identical" if not differ else f"{len(differ)} runs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
