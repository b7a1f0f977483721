"""The ``qlm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from qlm_plugin import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, not a usage dump.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _print_table(results: dict[str, object]) -> None:
    from qlm_plugin.tools.simulate import PolicyResult

    # as wide as the longest policy and class names (a plugin's may be long)
    pw = max([10, *(len(n) + 1 for n in results)])
    cw = max([12, *(len(c) for r in results.values() for c in getattr(r, "classes", {}))])
    header = (
        f"{'policy':<{pw}} {'class':<{cw}} {'reqs':>6} {'SLO met':>8} {'refused':>7} {'goodput':>8} "
        f"{'thrpt':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'E2E p50':>8} {'E2E p99':>8} {'busy':>5}"
    )
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        assert isinstance(res, PolicyResult)
        label = f"{name}*" if res.reference else name
        rows = [
            ("overall", res.overall, res.gpu_busy_fraction),
            *((c, m, None) for c, m in res.classes.items()),
        ]
        for cls, m, busy in rows:
            print(
                f"{label:<{pw}} {cls:<{cw}} {m.requests:>6} {m.slo_attainment * 100:>7.1f}% {m.rejected:>7} "
                f"{m.goodput_rps:>7.2f}/s {m.throughput_rps:>6.2f}/s {_fmt(m.ttft_p50_s, 's'):>9} "
                f"{_fmt(m.ttft_p99_s, 's'):>9} {_fmt(m.e2e_p50_s, 's', 1):>8} {_fmt(m.e2e_p99_s, 's', 1):>8} "
                f"{'' if busy is None else f'{busy * 100:.0f}%':>5}"
            )
            label = ""
    print(
        "refused: at validation (a request no instance can take: see above) or at admission (a class's "
        "refuse_below_p_meet); refused and unfinished count as missed"
    )
    if any(getattr(r, "reference", False) for r in results.values()):
        print("* reference: knows true output lengths; not a deployable policy")


#: Rejections at validation listed in ``qlm simulate --json`` (their count is whole).
MAX_LISTED_REJECTIONS = 20


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qlm_plugin.hooks import get_plugin_manager
    from qlm_plugin.policies.registry import policy_registry
    from qlm_plugin.tools.simulate import build_requests, empty_workload, run_policy
    from qlm_plugin.workloads.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    updates: dict[str, object] = {}
    if args.trace == "":  # it replayed the conversation sample, unsaid
        raise ValueError("--trace is empty: name a trace file or 'conv'/'code'")
    if args.trace is not None:
        # The scenario's reshaping (rate scale, window, sampling) was chosen for its own trace: a
        # trace named on the command line replays as recorded unless --rate-scale says otherwise.
        updates.update(
            trace=args.trace,
            synthetic=None,
            rate_scale=1.0,
            target_rps=None,
            start_s=0.0,
            duration_s=None,
            sample_fraction=None,
            max_requests=None,
        )
    if args.rate_scale is not None:
        if args.rate_scale <= 0:
            raise ValueError(f"--rate-scale must be > 0, got {args.rate_scale}")
        own_rps = scenario.workload.target_rps if args.trace is None else None
        if own_rps:  # the scenario's own rate, scaled (as qlm plan-capacity takes it)
            updates.update(target_rps=own_rps * args.rate_scale, rate_scale=1.0)
        else:  # the scenario's own compression, scaled (replaced, 2 on one compressed 110x ran at 2x)
            own = 1.0 if "rate_scale" in updates else scenario.workload.rate_scale  # (reset by --trace)
            updates.update(rate_scale=own * args.rate_scale, target_rps=None)
    if updates:
        scenario = scenario.model_copy(update={"workload": scenario.workload.model_copy(update=updates)})
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    registry = policy_registry(get_plugin_manager())
    names = (
        registry.names()
        if args.policies is None
        else list(dict.fromkeys(p.strip() for p in args.policies.split(",") if p.strip()))  # each once
    )
    if not names:
        raise ValueError(f"--policies names no policy; available: {', '.join(registry.names())}")
    for name in names:
        registry.get(name)  # fail before any work on an unknown name
    requests, rejected = build_requests(scenario)
    if not requests:
        raise ValueError(empty_workload(rejected))
    results = {}
    show = not args.json and not args.no_progress and sys.stderr.isatty()
    for name in names:
        with tqdm(
            total=len(requests), desc=f"{name:>9}", unit="req", delay=2.0, disable=not show, leave=False
        ) as bar:
            done = [0]

            def progress(i: int, bar: tqdm = bar, done: list[int] = done) -> None:
                bar.update(i - done[0])
                done[0] = i

            results[name] = run_policy(scenario, name, requests, rejected, on_progress=progress)
    span = requests[-1].arrival_time - requests[0].arrival_time
    # the mean rate as target_rps and qlm bench count it: (requests - 1) over the span
    rate = (len(requests) - 1) / span if span > 0 else None
    instances = len(scenario.instance_ids())
    if args.json:
        out = {
            "scenario": scenario.name,
            "seed": scenario.seed,
            "instances": instances,
            "requests": len(requests) + len(rejected),
            "span_s": span,
            "rate_rps": rate,
            "rejected_at_validation": len(rejected),
            "rejections": [
                {"index": r.index, "reason": str(r.error)} for r in rejected[:MAX_LISTED_REJECTIONS]
            ],
            "policies": {n: r.to_dict() for n, r in results.items()},
        }
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(
            f"scenario {scenario.name!r}: {len(requests)} requests over {span:.0f} s "
            f"({f'{rate:.2f} req/s' if rate is not None else 'all at once'}), "
            f"{instances} instance{'s' if instances != 1 else ''}, seed {scenario.seed}"
            + (f"; {len(rejected)} rejected at validation (first: {rejected[0].error})" if rejected else "")
        )
        _print_table(dict(results))
    return 0


def _batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated batch sizes, each a whole number above 0."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be whole numbers above 0, comma-separated, got {text!r}")
    return [int(p) for p in parts]


def cmd_cost_check(args: argparse.Namespace) -> int:
    from qlm_plugin.tools.costcheck import cost_check

    rows = cost_check(args.model, args.gpu, args.batches)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.model} on {args.gpu}: simulated pure-decode steps vs. b0 + b2*batch")
    print(
        f"{'batch':>6} {'TPOT sim':>10} {'TPOT model':>11} {'tok/s sim':>10} {'tok/s model':>12} {'err':>7}"
    )
    for r in rows:
        print(
            f"{r['batch']:>6} {r['tpot_sim_ms']:>8.3f}ms {r['tpot_model_ms']:>9.3f}ms "
            f"{r['tokens_per_s_sim']:>10.0f} {r['tokens_per_s_model']:>12.0f} {r['rel_error'] * 100:>6.2f}%"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlm_plugin.tools import bench

    def names(text: str | None) -> list[str] | None:
        return None if text is None else [n.strip() for n in text.split(",") if n.strip()]

    sweep: list[float] = []
    if not args.no_sweep:
        sweep = bench.parse_multipliers(args.sweep) if args.sweep is not None else list(bench.DEFAULT_SWEEP)
    if not 0.0 <= args.burst_at <= 1.0:
        raise ValueError(f"--burst-at must be a fraction in [0, 1], got {args.burst_at}")
    bench.require_matplotlib()  # before minutes of simulation, not after
    # --out checked before the runs: its problems were found only once every simulation had run
    if Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is a folder; name the Markdown file to write")
    if Path(args.out).exists():
        from qlm_plugin.tools import ablation

        marks = (
            (ablation.MARK_START, ablation.MARK_END) if args.ablation else (bench.MARK_START, bench.MARK_END)
        )
        try:
            bench.update_markdown(Path(args.out).read_text(), "", *marks)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--out: cannot read {args.out}: {exc}") from None
        except bench.BenchError as exc:
            raise ValueError(f"--out: {args.out}: {exc}") from None
    if args.seeds > 1 and args.no_sweep:
        raise ValueError(
            "--seeds averages the sweep's load points, and --no-sweep runs none: for the base load over "
            f"{args.seeds} seeds, give --sweep 1 --seeds {args.seeds}"
        )
    if args.scenarios is not None and not names(args.scenarios):
        raise ValueError(f"--scenarios names no scenario: {args.scenarios!r}")
    command = (
        "qlm bench"
        + "".join(
            f" {flag} {value}"
            for flag, value in (
                ("--scenarios", args.scenarios),
                ("--policies", args.policies),
                ("--sweep", args.sweep),
                ("--seed", args.seed),
                ("--seeds", None if args.seeds == 1 else args.seeds),
                ("--burst-at", None if args.burst_at == bench.DEFAULT_BURST_AT else args.burst_at),
            )
            if value is not None
        )
        + (" --no-sweep" if args.no_sweep else "")
        + (" --ablation" if args.ablation else "")
    )

    def progress(scenario: str, policy: str, multiplier: float, res: object) -> None:
        from qlm_plugin.tools.simulate import PolicyResult

        assert isinstance(res, PolicyResult)
        print(
            f"{scenario} {policy} x{multiplier:g}: SLO met {res.overall.slo_attainment * 100:.1f}%, "
            f"wall {res.wall_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def skipped(scenario: str, why: str) -> None:
        print(f"qlm bench: skipping scenario {scenario}: {why}", file=sys.stderr, flush=True)

    policies = names(args.policies)
    if args.ablation and policies is None:
        from qlm_plugin.tools import ablation

        policies = ablation.ablation_policies()
    elif (
        args.ablation
        and policies is not None
        and ("qlm" not in policies or not any(p.startswith("qlm-no-") for p in policies))
    ):
        raise ValueError(
            "--ablation compares qlm with qlm-no-<part>: --policies must name qlm and one of those at "
            "least (or leave --policies out for every part)"
        )
    result = bench.run_bench(
        names(args.scenarios),
        policies,
        sweep,
        args.seed,
        burst_at=args.burst_at,
        command=command,
        jobs=args.jobs,
        on_run=progress,
        on_skip=skipped,
        seeds=args.seeds,
    )
    if not result.scenarios:
        raise ValueError("no scenario could run (every one was skipped; see above)")
    if args.ablation:
        from qlm_plugin.tools import ablation

        written = ablation.write_report(result, Path(args.out))
    else:
        written = bench.write_report(result, Path(args.out))
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print("\n".join(bench.summary_lines(result)))
    print(f"qlm bench: wrote {', '.join(str(p) for p in written)} in {result.wall_s:.0f} s", file=sys.stderr)
    return 0


def cmd_plan_capacity(args: argparse.Namespace) -> int:
    from qlm_plugin.tools import capacity
    from qlm_plugin.workloads.scenario import load_scenario

    scenario = capacity.apply_workload_overrides(
        load_scenario(args.slo_config),
        trace=args.trace,
        rate_scale=args.rate_scale,
        target_rps=args.target_rps,
        seed=args.seed,
    )
    report = capacity.plan_capacity(
        scenario,
        policy=args.policy,
        targets=args.target,
        max_instances=args.max_instances,
        prices=args.price,
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print("\n".join(capacity.format_report(report)))
    if report.recommended is None:
        hopeless = all(kind.note for kind in report.kinds)  # more instances gained nothing anywhere
        advice = (
            "more instances meet no more SLOs: relax the SLOs in the file, or --target"
            if hopeless
            else "raise --max-instances or relax --target"
        )
        print(
            f"qlm plan-capacity: error: no instance kind meets the target within {args.max_instances} "
            f"instances ({advice})",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlm", description="SLO-aware queue management for LLM serving")
    parser.add_argument("--version", action="version", version=f"qlm-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="replay a trace through simulated instances under several policies")
    sim.add_argument(
        "--scenario", metavar="FILE", help="scenario YAML (default: the packaged default scenario)"
    )
    sim.add_argument(
        "--trace",
        metavar="PATH",
        help="a trace file (Azure or BurstGPT CSV, Mooncake JSON Lines) or 'conv'/'code' (packaged "
        "samples), replayed at its recorded rate "
        "(the scenario's rate scale, window and sampling do not apply to it)",
    )
    sim.add_argument(
        "--policies", metavar="A,B", help="comma-separated policy names (default: all available)"
    )
    sim.add_argument(
        "--rate-scale",
        type=float,
        metavar="X",
        help="X times the scenario's load: compress (X>1) or stretch (X<1) its arrivals",
    )
    sim.add_argument("--seed", type=int, help="override the scenario's seed")
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(func=cmd_simulate)

    cc = sub.add_parser("cost-check", help="check the simulator against its cost model (TPOT, throughput)")
    cc.add_argument("--model", default="llama-3.1-8b", help="model profile (default llama-3.1-8b)")
    cc.add_argument("--gpu", default="h100", help="GPU profile (default h100)")
    cc.add_argument(
        "--batches",
        type=_batch_sizes,
        default="1,32,256",
        metavar="B,B",
        help="decode batch sizes (default 1,32,256)",
    )
    cc.add_argument("--json", action="store_true", help="JSON instead of a table")
    cc.set_defaults(func=cmd_cost_check)

    bn = sub.add_parser(
        "bench",
        help="benchmark policies over the scenarios of scenarios/bench: tables, load sweeps, plots",
    )
    bn.add_argument(
        "--scenarios",
        metavar="A,B",
        help=(
            "scenario names (files of scenarios/bench; `default`: the packaged default scenario) "
            "or YAML paths (default: every scenario there)"
        ),
    )
    bn.add_argument("--policies", metavar="A,B", help="comma-separated policy names (default: all available)")
    sweep = bn.add_mutually_exclusive_group()
    sweep.add_argument(
        "--sweep", metavar="X,Y", help="load multipliers of the sweep (default: 0.5,1,1.5,2,2.5,3,4)"
    )
    sweep.add_argument("--no-sweep", action="store_true", help="base load only: no sweep, no plots")
    bn.add_argument("--seed", type=int, help="override every scenario's seed")
    bn.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="each sweep point is the mean over N seeds: the scenario's (or --seed) and the next N-1 "
        "(default 1); overloaded, one seed's point is one draw",
    )
    bn.add_argument(
        "--burst-at",
        type=float,
        default=0.3,
        metavar="F",
        help="where a scenario's burst (<NAME>_burst.yaml) starts, as a fraction of its span (default 0.3)",
    )
    bn.add_argument(
        "--out",
        default="qlm-bench.md",
        metavar="FILE",
        help="Markdown file whose generated section to rewrite (created if missing); plots go to its "
        "img/ folder (default: qlm-bench.md here; docs/benchmarks.md holds the published run)",
    )
    bn.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    bn.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="simulations run at once, one process each (default: the machine's cores)",
    )
    bn.add_argument(
        "--ablation",
        action="store_true",
        help="QLM whole and without each of its parts (qlm-no-<part>), beside the baselines; "
        "writes the ablation section of the report",
    )
    bn.set_defaults(func=cmd_bench)

    pc = sub.add_parser(
        "plan-capacity",
        help="how many instances of each GPU kind meet the SLOs at this load (docs/capacity.md)",
    )
    pc.add_argument(
        "--slo-config",
        required=True,
        metavar="FILE",
        help="scenario YAML: workload, models, SLO classes, engine; each instance group is a candidate kind",
    )
    pc.add_argument(
        "--trace",
        metavar="PATH",
        help="replace the workload: a trace file (Azure or BurstGPT CSV, Mooncake JSON Lines) or "
        "'conv'/'code'",
    )
    load = pc.add_mutually_exclusive_group()
    load.add_argument(
        "--rate-scale",
        type=float,
        metavar="X",
        help="X times the scenario's load: compress (X>1) or stretch (X<1) its arrivals",
    )
    load.add_argument("--target-rps", type=float, metavar="R", help="rescale arrivals to R requests/s")
    pc.add_argument("--policy", default="qlm", help="scheduling policy of the simulated fleets (default qlm)")
    pc.add_argument(
        "--target",
        metavar="T",
        help="SLO attainment every class must reach: 0.99 (default) or interactive=0.99,batch=0.95",
    )
    pc.add_argument("--max-instances", type=int, default=64, metavar="N", help="largest fleet to try (64)")
    pc.add_argument(
        "--price", metavar="K=P", help="price per GPU-hour, e.g. h100=4.0,a100-80=2.5: rank by cost"
    )
    pc.add_argument("--seed", type=int, help="override the scenario's seed")
    pc.add_argument(
        "--jobs", type=int, default=1, metavar="J", help="plan up to J kinds in parallel processes"
    )
    pc.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    pc.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    pc.set_defaults(func=cmd_plan_capacity)

    from qlm_plugin.coordinator.cli import add_parsers

    add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's documented default, which its logging no longer keeps to: without it every fork of a
    # child (instances, engines) logs a fork_posix.cc INFO line
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from qlm_plugin.coordinator.batch_store import StoreError
    from qlm_plugin.coordinator.config import ConfigError
    from qlm_plugin.coordinator.journal import JournalError
    from qlm_plugin.domain.costmodel import UnknownProfileError
    from qlm_plugin.policies.registry import UnknownPolicyError
    from qlm_plugin.workloads.scenario import ScenarioError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `qlm simulate | head`: the reader left; no error to report
        # Python's advice: point stdout at devnull, or the flush at exit fails again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (
        ConfigError,
        ScenarioError,
        UnknownPolicyError,
        UnknownProfileError,
        JournalError,
        StoreError,
        ValueError,
        OSError,
    ) as exc:
        print(f"qlm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
