"""``qlm serve``, ``qlm coordinator`` and ``qlm instance``: the serving commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qlm_plugin import event_loop
from qlm_plugin.coordinator.config import (
    ConfigError,
    CoordinatorConfig,
    join_host_port,
    load_config,
    local_host,
    with_overrides,
)

log = logging.getLogger("qlm_plugin.serve")


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _workers(text: str) -> int | str:
    """An argparse type: a number of front-door workers, 0 to 64, or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected 0 to 64 workers, or auto, got {text!r}")
    return n


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    cfg = load_config(args.config)
    update: dict[str, Any] = {}
    host = args.host or None
    workers = getattr(args, "http_workers", None)
    if args.http_port is not None or host or workers is not None:
        update["http"] = {
            "host": host or cfg.http.host,
            "port": cfg.http.port if args.http_port is None else args.http_port,
            "workers": cfg.http.workers if workers is None else workers,
        }
    if args.grpc_port is not None or host:
        update["grpc"] = {
            "host": host or cfg.grpc.host,
            "port": cfg.grpc.port if args.grpc_port is None else args.grpc_port,
        }
    if args.journal:
        update["journal"] = {**cfg.journal.model_dump(), "path": args.journal}
    if args.policy:
        update["policy"] = args.policy
    if args.scenario:
        update["scenario"] = args.scenario
    cfg = with_overrides(cfg, update, "the command line") if update else cfg
    _check_policy(cfg.policy)
    return cfg


def _check_policy(name: str) -> None:
    """An unknown policy, refused before anything starts (it left a journal behind, and a stop
    line saying what it kept)."""
    from qlm_plugin.hooks import get_plugin_manager
    from qlm_plugin.policies.registry import policy_registry

    policy_registry(get_plugin_manager()).get(name)  # its error names the policies available


#: Where ``qlm instance`` reads its token unless told another variable.
TOKEN_ENV_DEFAULT = "QLM_INSTANCE_TOKEN"


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` above 0 (else a usage error naming the value)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be above 0 (and finite), got {text}")
        return value

    return parse


def host_port(text: str) -> str:
    """An argparse type: ``HOST:PORT`` with a port in 1-65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1-65535, got {text!r}")
    return text


def completion_window(text: str) -> str:
    """An argparse type: a Batch API ``completion_window`` (``10m``, ``1h``, ``24h``)."""
    from qlm_plugin.coordinator.batches import parse_window
    from qlm_plugin.coordinator.config import BatchSettings
    from qlm_plugin.coordinator.openai_params import BadRequest

    try:
        parse_window(text, BatchSettings().min_window_s)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _telemetry_sdk(endpoint: str | None) -> Any:
    """The SDK's providers exporting to ``endpoint``, else to the standard environment's
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (unless ``OTEL_SDK_DISABLED``); None: nothing exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not endpoint:
        return None
    from qlm_plugin.telemetry import sdk as telemetry_sdk

    try:
        return telemetry_sdk.configure(otlp_endpoint=endpoint)
    except RuntimeError as exc:  # the otel extra is not installed
        raise ConfigError(f"cannot export to {endpoint}: {exc}") from None


def _add_coordinator_args(p: argparse.ArgumentParser, *, defaults_note: str) -> None:
    p.add_argument(
        "--config", metavar="FILE", help=f"coordinator settings (YAML; docs/coordinator.md). {defaults_note}"
    )
    p.add_argument("--host", help="address both servers bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, metavar="N", help="HTTP front door port (default 8000)")
    p.add_argument("--grpc-port", type=int, metavar="N", help="gRPC control plane port (default 50051)")
    p.add_argument(
        "--http-workers",
        type=_workers,
        metavar="N",
        help="HTTP front-door worker processes sharing the port, 0 to 64 or auto; 0: the core serves "
        "HTTP itself (default: the config's http.workers, else $QLM_HTTP_WORKERS, else auto: none "
        "on two cores or fewer, else one per core but the core's own, at most 16)",
    )
    p.add_argument(
        "--journal", metavar="PATH", help="SQLite journal of accepted requests (default qlm-journal.db)"
    )
    p.add_argument("--policy", help="scheduling policy (default qlm)")
    p.add_argument(
        "--scenario", metavar="FILE", help="fleet: models, SLO classes, instances (default: packaged)"
    )
    p.add_argument(
        "--otlp-endpoint", metavar="URL", help="export traces and metrics over OTLP/gRPC (otel extra)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_parsers(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="coordinator plus its engines (simulated, or vLLM): the whole system on one machine (:8000)",
        description="The coordinator and its engines. `qlm serve`: simulated instances. `qlm serve --engine "
        "vllm --model MODEL [--model MODEL2] [-- VLLM ARGS]`: one vLLM server per model (--instances N: N "
        "each) with the QLM scheduler, stopped with the coordinator.",
    )
    _add_coordinator_args(serve, defaults_note="Embedded defaults without one.")
    serve.add_argument(
        "--engine",
        choices=("sim", "vllm"),
        default="sim",
        help="sim: simulated instances (default); vllm: vLLM servers started and stopped with it",
    )
    serve.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="vllm: a model folder or Hugging Face id, or NAME=MODEL to serve it as NAME; repeat for more",
    )
    serve.add_argument(
        "--instances",
        type=int,
        metavar="N",
        help="sim: simulated instances (default: the scenario's); vllm: engines per model (default 1)",
    )
    serve.add_argument(
        "--max-awake",
        type=int,
        metavar="K",
        help="vllm: the engines share this machine's device, at most K awake at a time; the coordinator "
        "swaps models by sleeping one and waking another (config device_max_awake; default: all awake)",
    )
    serve.add_argument(
        "--sleep-level",
        type=int,
        choices=(1, 2),
        help="vllm, with --max-awake: a swapped-out engine's sleep, 1: weights to host memory (warm, "
        "default; paused on CPU), 2: dropped (cold; on CPU its server is stopped and started again); "
        "config device_sleep_level",
    )
    serve.add_argument(
        "--engine-logs",
        metavar="DIR",
        help="vllm: where each engine's output goes (default: qlm-engines beside the journal)",
    )
    serve.add_argument(
        "engine_args",
        nargs=argparse.REMAINDER,
        metavar="-- VLLM ARGS",
        help="vllm: arguments after -- go to every vLLM server as they are (e.g. -- --max-model-len 4096)",
    )
    serve.add_argument(
        "--speed", type=positive(float), default=1.0, help="simulated time runs this much faster (default 1)"
    )
    serve.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the instances as Ray actors: on the cluster at ADDRESS, or on a new local Ray instance",
    )
    serve.set_defaults(func=cmd_serve)

    coord = sub.add_parser("coordinator", help="the coordinator alone (instances connect over gRPC)")
    _add_coordinator_args(coord, defaults_note="Embedded defaults without one.")
    coord.set_defaults(func=cmd_coordinator)

    inst = sub.add_parser("instance", help="serving instances that connect to a coordinator")
    inst.add_argument(
        "--backend",
        choices=["sim", "openai"],
        default="sim",
        help="sim: simulated engines in real time; openai: an OpenAI-compatible server as a black box",
    )
    inst.add_argument("--endpoint", help="openai: the server's base URL, e.g. http://127.0.0.1:8000")
    inst.add_argument("--served-model", help="openai: the model name the server knows (default: --model)")
    inst.add_argument(
        "--max-concurrency", type=int, default=256, help="openai: upper bound of the learned limit"
    )
    inst.add_argument(
        "--load-command", default="", help="openai: shell command or 'POST <url>' to load the model"
    )
    inst.add_argument(
        "--unload-command", default="", help="openai: shell command or 'POST <url>' to unload it"
    )
    inst.add_argument(
        "--coordinator",
        type=host_port,
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="its gRPC address",
    )
    inst.add_argument("--count", type=int, default=1, help="instances in this process (default 1)")
    inst.add_argument(
        "--name",
        help="sim: instance id prefix (ids are NAME-0, NAME-1, ...; default sim); openai: the instance "
        "id (default openai)",
    )
    inst.add_argument(
        "--gpu", help="GPU kind of the cost model (default: the scenario's instance group's, --group)"
    )
    inst.add_argument(
        "--group",
        type=int,
        default=0,
        metavar="N",
        help="sim: the scenario's instance group (0: the first) whose GPU, models and engine limits "
        "these instances take",
    )
    inst.add_argument("--model", action="append", help="model served first (repeat: the others start warm)")
    inst.add_argument(
        "--device",
        default="",
        help="sim: a device shared with other instances, one awake at a time (each serves only its --model; "
        "the coordinator swaps them by sleeping one and waking another)",
    )
    inst.add_argument("--scenario", metavar="FILE", help="where models and cost-model overrides come from")
    inst.add_argument(
        "--speed", type=positive(float), default=1.0, help="simulated time runs this much faster (default 1)"
    )
    inst.add_argument("--token-env", default=TOKEN_ENV_DEFAULT, help="variable holding the instance token")
    inst.add_argument("--tls-ca", metavar="FILE", help="CA certificate of the coordinator (enables TLS)")
    inst.add_argument("--tls-cert", metavar="FILE", help="client certificate (with --tls-key)")
    inst.add_argument("--tls-key", metavar="FILE", help="client key")
    inst.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    inst.set_defaults(func=cmd_instance)

    sc = sub.add_parser(
        "scale",
        help="resize the instances of a model of a `qlm serve --ray` deployment",
        description="Resize the instances serving MODEL (first) of the `qlm serve --ray` that runs on "
        "the Ray cluster: instances like the model's own are added, the newest removed (their "
        "requests go back to the queue, none lost).",
    )
    sc.add_argument("model", help="a model the deployment serves")
    sc.add_argument("count", type=int, help="how many instances in all (not a change); 0 stops them")
    sc.add_argument(
        "--ray",
        default="auto",
        metavar="ADDRESS",
        help="the Ray cluster: HOST:PORT, ray://HOST:PORT or auto (RAY_ADDRESS, else the one "
        "`ray start` made on this machine; the default)",
    )
    sc.set_defaults(func=cmd_scale)

    lt = sub.add_parser("loadtest", help="submit throughput and front-door latency against a real qlm serve")
    lt.add_argument(
        "--requests", type=positive(int), default=5000, help="requests of the throughput test (default 5000)"
    )
    lt.add_argument(
        "--rates", default="100,250,1000", help="arrivals/s of the latency tests (default 100,250,1000)"
    )
    lt.add_argument(
        "--duration", type=positive(float), default=10.0, help="seconds of the latency test (default 10)"
    )
    lt.add_argument("--instances", type=positive(int), default=2, help="simulated instances (default 2)")
    lt.add_argument(
        "--http-workers",
        type=_workers,
        metavar="N",
        help="front-door workers of the qlm serve under test, 0 to 64 or auto (default: as qlm serve "
        "decides)",
    )
    lt.add_argument("--json", action="store_true", help="JSON instead of a table")
    lt.set_defaults(func=cmd_loadtest)

    bv = sub.add_parser(
        "bench-vllm", help="QLM's scheduler against vLLM FCFS and priority on a real vLLM engine"
    )
    bv.add_argument("--model", help="model folder (default: build the tiny random Llama)")
    bv.add_argument("--policies", help="comma-separated: fcfs,priority,qlm (default: all three)")
    bv.add_argument(
        "--workload",
        choices=("slo", "alise"),
        default="slo",
        help="slo: a batch backlog, then interactive requests with a TTFT SLO (default); alise: "
        "requests without SLOs of mixed lengths (latency against FCFS)",
    )
    bv.add_argument("--seeds", type=positive(int), default=3, help="repetitions, seeds 0..N-1 (default 3)")
    bv.add_argument("--batch", type=int, default=400, help="slo: batch requests sent first (default 400)")
    bv.add_argument(
        "--batch-tokens",
        type=positive(int),
        default=256,
        help="slo: output tokens of each batch request (default 256)",
    )
    bv.add_argument(
        "--interactive", type=positive(int), default=40, help="slo: interactive requests (default 40)"
    )
    bv.add_argument(
        "--rate",
        type=positive(float),
        default=2.0,
        help="slo: interactive arrivals per second, Poisson (default 2)",
    )
    bv.add_argument("--json", action="store_true", help="JSON instead of a table")
    bv.set_defaults(func=cmd_bench_vllm)

    bb = sub.add_parser(
        "bench-batch",
        help="a Batch API batch beside steady interactive traffic (simulated instances, real time), "
        "against the same work sent as plain requests under EDF and FCFS",
    )
    bb.add_argument("--runs", default="qlm,edf,fcfs", help="comma-separated: qlm,edf,fcfs (default: all)")
    bb.add_argument("--requests", type=positive(int), default=2000, help="lines of the batch (default 2000)")
    bb.add_argument(
        "--window", type=completion_window, default="10m", help="the batch's completion_window (default 10m)"
    )
    bb.add_argument(
        "--rate", type=positive(float), default=20.0, help="interactive requests per second (default 20)"
    )
    bb.add_argument(
        "--duration", type=positive(float), default=120.0, help="seconds of interactive traffic (default 120)"
    )
    bb.add_argument("--seed", type=int, default=0)
    bb.add_argument("--json", action="store_true", help="JSON instead of a table")
    bb.set_defaults(func=cmd_bench_batch)


def _addresses(cfg: CoordinatorConfig, server: Any, *, described: bool = False) -> str:
    """Where the servers listen, as a client names them (an IPv6 host in brackets)."""
    what = " (OpenAI API under /v1, /health, /metrics)" if described else ""
    scheme = "https" if cfg.tls is not None else "http"
    return (
        f"HTTP {scheme}://{join_host_port(cfg.http.host, server.http_port)}{what}, "
        f"gRPC {join_host_port(cfg.grpc.host, server.grpc_port)}"
    )


def cmd_coordinator(args: argparse.Namespace) -> int:
    from qlm_plugin.coordinator.server import CoordinatorServer, kept, serve_until_signal

    _logging(args.verbose)
    cfg = _config(args)
    providers = _telemetry_sdk(args.otlp_endpoint)
    server = CoordinatorServer(cfg)

    def ready() -> None:
        event_loop.freeze_startup_heap()
        print(
            f"qlm coordinator: {_addresses(cfg, server)}",
            flush=True,
        )

    left = event_loop.run(serve_until_signal(server, ready))
    if providers is not None:
        from qlm_plugin.telemetry import sdk as telemetry_sdk

        telemetry_sdk.shutdown(providers)
    print(f"qlm coordinator: stopped ({kept(left, cfg.journal.path)})")
    return 0


def _instances(args: argparse.Namespace) -> list[Any]:
    from qlm_plugin.adapters.sim.engine import SimInstance
    from qlm_plugin.domain.instance import EvictMode
    from qlm_plugin.workloads.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    if not 0 <= args.group < len(scenario.instances):
        raise ValueError(
            f"--group {args.group}: the scenario has {len(scenario.instances)} instance group(s), 0 to "
            f"{len(scenario.instances) - 1}"
        )
    group = scenario.instances[args.group]
    gpu = args.gpu or group.gpu
    models = args.model or group.models
    costs = scenario.cost_models_for(gpu)
    unknown = [m for m in models if m not in costs]
    if unknown:
        if not costs:  # the GPU is what is unknown
            known = ", ".join(sorted({g.gpu for g in scenario.instances}))
            raise ValueError(
                f"--gpu {gpu!r}: no model of the scenario has a cost model on it (its GPUs: {known})"
            )
        raise ValueError(
            f"no cost model for {', '.join(unknown)} on {gpu} (scenario models: {', '.join(costs)})"
        )
    if args.device:  # an engine of one model, sharing its device: it serves that model only
        if len(models) != 1:
            raise ValueError("--device: give exactly one --model (an engine per model)")
        costs = {models[0]: costs[models[0]]}
    return [
        SimInstance(
            f"{args.name}-{i}",
            gpu,
            costs,
            initial_model=models[0],
            warm_models=tuple(models[1:]),
            host_mem_gb=group.host_mem_gb,
            max_num_seqs=group.max_num_seqs,
            max_num_batched_tokens=group.max_num_batched_tokens,
            device=args.device,
            # the scenario's engine, as the simulator runs it (its residency rules were dropped)
            preemption_mode=EvictMode(scenario.engine.preemption),
            max_model_residency_s=scenario.engine.max_model_residency_s,
            min_model_residency_s=scenario.engine.min_model_residency_s,
        )
        for i in range(args.count)
    ]


def cmd_instance(args: argparse.Namespace) -> int:
    from qlm_plugin.transport.agent import AgentRefused

    try:
        return _instance(args)
    except AgentRefused as exc:  # no retry mends it: say so and stop
        print(f"qlm instance: error: {exc}", file=sys.stderr)
        return 1


def _instance(args: argparse.Namespace) -> int:
    from qlm_plugin.adapters.sim.process import run_instances
    from qlm_plugin.transport.agent import AgentSettings

    _logging(args.verbose)
    if args.count < 1:
        raise ValueError("--count must be >= 1")
    args.name = args.name or args.backend
    if not args.speed > 0:
        raise ValueError("--speed must be > 0")
    cert = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not args.tls_ca:  # they were read and dropped: the connection was plaintext
            raise ValueError(
                "--tls-cert and --tls-key need --tls-ca (the coordinator's CA): TLS is on with it"
            )
        cert = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
    token = os.environ.get(args.token_env, "").strip()
    if args.token_env != TOKEN_ENV_DEFAULT and not token:  # named, so meant: not a silent no token
        raise ValueError(f"--token-env {args.token_env}: the variable is unset or empty")
    settings = AgentSettings(
        args.coordinator,
        token=token or None,
        root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
        client_cert=cert,
    )
    if args.backend == "openai":
        return _run_openai(args, settings)
    instances = _instances(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # QLM_SIM_RECORD: append "request_id attempt instance_id" per completed generation (fault tests)
        path = os.environ.get("QLM_SIM_RECORD")
        with open(path, "a") if path else contextlib.nullcontext() as record:
            await run_instances(instances, settings, speed=args.speed, stop=stop, record=record)

    event_loop.run(main())
    return 0


def _own_instances_token(cfg: CoordinatorConfig) -> str | None:
    """With authentication on and no instance token that works in ``QLM_INSTANCE_TOKEN``, a new one
    for the instances ``qlm serve`` starts: they inherit it from this process's environment."""
    from qlm_plugin.coordinator.auth import own_instances_token

    token = own_instances_token(cfg, os.environ)
    if token is not None:
        os.environ["QLM_INSTANCE_TOKEN"] = token
    return token


def _own_instances_tls(cfg: CoordinatorConfig, how: str | None) -> None:
    """With ``tls``, the instances ``qlm serve`` starts itself must reach the coordinator over TLS:
    simulated ones trust ``tls.ca`` (else the server's own certificate, a self-signed one); client
    certificates, Ray actors and vLLM engines it cannot give them (they retried for ever)."""
    if cfg.tls is None:
        return
    if cfg.tls.client_ca is not None or how is not None:
        where = how or "its own instances"
        raise ConfigError(
            f"tls: qlm serve cannot give {where} what TLS needs here (client certificates, or a CA on "
            "other hosts): run `qlm coordinator` and start the instances with their own --tls-ca, "
            "--tls-cert and --tls-key"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from qlm_plugin.coordinator.server import CoordinatorServer, kept, serve_until_signal
    from qlm_plugin.deploy.child_process import python_command
    from qlm_plugin.deploy.instance_children import InstanceChildren

    _logging(args.verbose)
    cfg = _config(args)
    how = "vLLM engines" if args.engine == "vllm" else "Ray actors" if args.ray is not None else None
    _own_instances_tls(cfg, how)
    if args.engine == "vllm":
        return _serve_vllm(args, cfg)
    if args.model or args.engine_args or args.engine_logs or args.max_awake is not None or args.sleep_level:
        raise ValueError(
            "--model, --max-awake, --sleep-level, --engine-logs and vLLM arguments go with --engine vllm"
        )
    server = CoordinatorServer(
        cfg,
        warn=lambda msg: print(f"qlm serve: {msg}", file=sys.stderr, flush=True),
        own_instances_token=_own_instances_token(cfg),
    )
    _withhold_client_tokens(cfg)  # (read: the instances, and a local Ray, start without them)
    if args.ray is not None:
        ray_fleet = _ray_fleet()
        # here, on the main thread: a local Ray's processes die with the thread that started them
        # (started by an executor's thread, they died when the loop ended, before the fleet stopped)
        ray_fleet.connect(None if args.ray == "local" else args.ray)
    providers = _telemetry_sdk(args.otlp_endpoint)
    group = server.scenario.instances[0]
    count = args.instances if args.instances is not None else sum(g.count for g in server.scenario.instances)
    if count < 1:
        raise ValueError("--instances must be >= 1")
    stop = asyncio.Event()
    failures: list[str] = []
    children: list[InstanceChildren] = []
    supervisor: list[asyncio.Task[None]] = []  # held: the loop keeps only weak references to tasks
    fleet: list[Any] = []

    def ready_ray() -> None:
        from qlm_plugin.deploy import ray_fleet

        host = (
            cfg.grpc.host
            if cfg.grpc.host not in ("0.0.0.0", "::")
            else __import__("ray").util.get_node_ip_address()
        )
        groups = [
            (ray_fleet.Group(g.models[0], g.gpu, tuple(g.models[1:])), g.count)
            for g in server.scenario.instances
        ]
        if args.instances is not None:
            groups = [(ray_fleet.Group(group.models[0], group.gpu, tuple(group.models[1:])), count)]
        actors = ray_fleet.Fleet(
            f"{host}:{server.grpc_port}",
            groups,
            # the scenario itself: its path, relative to here, named no file in the raylet's folder
            # or on another node (the actors' engines never started, and nothing said so)
            scenario=server.scenario,
            speed=args.speed,
            token=os.environ.get("QLM_INSTANCE_TOKEN") or None,
            record=os.environ.get("QLM_SIM_RECORD"),
        )
        fleet.append(actors)  # stopped at the end, however far it got

        async def run() -> None:
            try:
                await asyncio.to_thread(actors.start)  # Ray calls block
            except Exception as exc:  # no instance would ever come: stop, saying why
                failures.append(f"the Ray fleet did not start: {type(exc).__name__}: {exc}")
                stop.set()
                return
            problem = await _registered(server, actors)
            if problem is not None:
                failures.append(problem)
                stop.set()
                return
            print(
                f"qlm serve: {actors.size} simulated instance{'s' if actors.size != 1 else ''} as Ray "
                f"actors ({args.ray if args.ray != 'local' else 'a local Ray instance'}); "
                f"{_addresses(cfg, server)}; `qlm scale MODEL N` to resize",
                flush=True,
            )
            try:
                await actors.watch(lambda note: print(f"qlm serve: {note}", file=sys.stderr, flush=True))
            except Exception as exc:  # its manager died and could not be made again
                failures.append(f"the Ray fleet failed: {type(exc).__name__}: {exc}")
                stop.set()

        supervisor.append(asyncio.get_running_loop().create_task(run()))

    def ready() -> None:
        event_loop.freeze_startup_heap()
        if args.ray is not None:
            ready_ray()
            return
        # one process per instance, each group's GPU, models and engine limits its own
        sized = (
            [(0, group, count)]
            if args.instances is not None  # --instances: that many of the first group
            else [(i, g, g.count) for i, g in enumerate(server.scenario.instances)]
        )
        first = 0
        for index, g, n in sized:
            cmd = python_command(
                "qlm_plugin.cli",
                "instance",
                "--backend",
                "sim",
                "--coordinator",
                join_host_port(local_host(cfg.grpc.host), server.grpc_port),
                "--count",
                "1",
                "--group",
                str(index),
                "--gpu",
                g.gpu,
                "--speed",
                str(args.speed),
            )
            for m in g.models:
                cmd += ["--model", m]
            if cfg.scenario or args.scenario:
                cmd += ["--scenario", str(args.scenario or cfg.scenario)]
            if cfg.tls is not None:  # they trust its CA, or its own certificate (_own_instances_tls)
                cmd += ["--tls-ca", cfg.tls.ca or cfg.tls.cert]
            sims = InstanceChildren(cmd, [f"sim{i}" for i in range(first, first + n)])
            first += n
            sims.start()
            children.append(sims)
            supervisor.append(asyncio.get_running_loop().create_task(sims.supervise()))
        what = "; ".join(f"{n} {g.gpu} serving {', '.join(g.models)}" for _, g, n in sized)
        print(
            f"qlm serve: {_addresses(cfg, server, described=True)}, {count} simulated "
            f"instance{'s' if count != 1 else ''} ({what}), policy {cfg.policy}; Ctrl-C to stop",
            flush=True,
        )

    try:
        left = event_loop.run(serve_until_signal(server, ready, stop))
    finally:
        if fleet:
            fleet[0].stop()
        for sims in children:
            sims.stop()
        if providers is not None:
            from qlm_plugin.telemetry import sdk as telemetry_sdk

            telemetry_sdk.shutdown(providers)
    if failures:
        print(f"qlm serve: error: {failures[0]}", file=sys.stderr)
        return 1
    print(f"qlm serve: stopped ({kept(left, cfg.journal.path)})")
    return 0


#: How long `qlm serve --ray` waits for its simulated instances to register, seconds.
RAY_REGISTER_WAIT_S = 120.0


async def _registered(server: Any, actors: Any) -> str | None:
    """Wait for the Ray fleet's instances to register; what is wrong when they do not (an engine
    that stopped says why; the others may not reach the coordinator's address), else None."""

    def joined() -> int:
        return sum(s.alive for s in server.coordinator.fleet.sessions.values())

    deadline = time.monotonic() + RAY_REGISTER_WAIT_S
    while time.monotonic() < deadline:
        if joined() >= actors.size:
            return None
        failed: dict[str, str] = await asyncio.to_thread(actors.call, "failures")
        if failed:
            iid, why = next(iter(failed.items()))
            return f"{len(failed)} Ray instance(s) stopped at start ({iid}: {why})"
        await asyncio.sleep(1.0)
    return (
        f"{joined()} of {actors.size} Ray instances registered in {RAY_REGISTER_WAIT_S:.0f} s: do the "
        f"cluster's nodes reach the coordinator at {actors.coordinator}? (--host: an address they "
        "reach, with tokens)"
    )


def _withhold_client_tokens(cfg: CoordinatorConfig) -> None:
    """Take the client and admin tokens out of this process's environment once the coordinator
    has read them: the engines and instances ``qlm serve`` starts (vLLM runs a model's code)
    inherit it, and held every tenant's and the operator's secrets. Instance tokens stay."""
    if cfg.tokens:
        keep = {t.token_env for t in cfg.tokens if t.token_env and "instance" in t.scopes}
        names = {t.token_env for t in cfg.tokens if t.token_env} - keep
    else:
        names = {"QLM_CLIENT_TOKEN", "QLM_ADMIN_TOKEN"}
    for name in names:
        os.environ.pop(name, None)


def _serve_vllm(args: argparse.Namespace, cfg: CoordinatorConfig) -> int:
    """``qlm serve --engine vllm``: the coordinator, then its engines; on a signal the coordinator
    drains (requests in flight finish on the engines), then the engines stop."""
    from qlm_plugin.coordinator.server import CoordinatorServer, kept, serve_until_signal
    from qlm_plugin.deploy.vllm_fleet import (
        FleetError,
        RayEngines,
        VLLMFleet,
        fleet_scenario,
        parse_models,
        strip_separator,
    )
    from qlm_plugin.workloads.scenario import load_scenario

    if not args.model:
        raise ValueError("--engine vllm needs --model MODEL (repeat it for more models)")
    if args.ray is not None and args.max_awake is not None:
        raise ValueError("--max-awake: engines sharing a device run as local processes, not with --ray")
    per_model = 1 if args.instances is None else args.instances
    if per_model < 1:
        raise ValueError("--instances must be >= 1")
    if args.max_awake is not None:
        if args.max_awake < 1:
            raise ValueError("--max-awake must be >= 1 (leave it out for every engine awake)")
        cfg = cfg.model_copy(update={"device_max_awake": args.max_awake})
    # the config's device_max_awake turns sharing on as --max-awake does (it was ignored without it)
    sharing = args.max_awake is not None or "device_max_awake" in cfg.model_fields_set
    if args.sleep_level:
        if not sharing:
            raise ValueError("--sleep-level goes with --max-awake (the engines that sleep share a device)")
        cfg = cfg.model_copy(update={"device_sleep_level": args.sleep_level})
    if args.ray is not None and sharing:
        raise ValueError("device_max_awake: engines sharing a device run as local processes, not with --ray")
    models = parse_models(args.model)
    engine_args = strip_separator(args.engine_args)
    scenario = fleet_scenario(models, per_model, load_scenario(args.scenario or cfg.scenario), engine_args)
    logs = (
        Path(args.engine_logs)
        if args.engine_logs
        else Path(cfg.journal.path).resolve().parent / "qlm-engines"
    )
    own_token = _own_instances_token(cfg)
    fleet: VLLMFleet | RayEngines
    try:
        if args.ray is not None:
            address = None if args.ray == "local" else args.ray
            token = os.environ.get("QLM_INSTANCE_TOKEN") or None
            fleet = RayEngines(models, per_model, "", engine_args, logs, address, token)
        else:
            device = f"{socket.gethostname()}/0" if sharing else ""
            fleet = VLLMFleet(
                models,
                per_model,
                "",
                engine_args,
                logs,
                device=device,
                max_awake=cfg.device_max_awake,
                sleep_level=cfg.device_sleep_level,
            )
    except FleetError as exc:
        print(f"qlm serve: error: {exc}", file=sys.stderr)
        return 1
    server = CoordinatorServer(
        cfg,
        scenario,
        warn=lambda msg: print(f"qlm serve: {msg}", file=sys.stderr, flush=True),
        own_instances_token=own_token,
    )
    _withhold_client_tokens(cfg)  # (read: the engines, and a local Ray, start without them)
    if isinstance(fleet, RayEngines):
        from qlm_plugin.deploy import ray_fleet

        # on the main thread: a local Ray's processes die with the thread that started them
        ray_fleet.connect(fleet.address)
    providers = _telemetry_sdk(args.otlp_endpoint)
    stop = asyncio.Event()
    failures: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    def registered(instance_id: str) -> bool:
        assert server.coordinator is not None
        s = server.coordinator.fleet.sessions.get(instance_id)
        return s is not None and s.alive

    async def watch() -> None:
        if isinstance(fleet, VLLMFleet) and fleet.device:
            assert server.coordinator is not None
            server.coordinator.fleet.devices.sleep.control = fleet  # cold sleeps on CPU: stop, start
            fleet.budget = server.coordinator.fleet.devices  # engines started one by one sleep
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, fleet.start)  # Ray calls block
            for line in fleet.describe():
                print(f"qlm serve:   {line}", flush=True)
            took = await fleet.wait_registered(registered)
        except Exception as exc:  # an engine that cannot start, or Ray that cannot place one
            failures.append(str(exc) if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}")
            stop.set()
            return
        print(
            f"qlm serve: {len(fleet.engines)} engines registered in {took:.0f} s; Ctrl-C to stop", flush=True
        )
        try:
            await fleet.supervise()
        except Exception as exc:
            if not isinstance(fleet, RayEngines):
                raise
            # Ray's fleet manager died and could not be made again
            failures.append(f"the Ray fleet failed: {type(exc).__name__}: {exc}")
            stop.set()

    def ready() -> None:
        event_loop.freeze_startup_heap()
        # Ray actors on other nodes reach the coordinator at the address it binds (--host)
        host = (
            cfg.grpc.host
            if args.ray is not None and cfg.grpc.host not in ("0.0.0.0", "::")
            else local_host(cfg.grpc.host)
        )
        if args.ray is not None and cfg.grpc.host in ("0.0.0.0", "::"):
            host = socket.gethostbyname(socket.gethostname())
        fleet.coordinator = join_host_port(host, server.grpc_port)
        where = " as Ray actors" if args.ray is not None else ""
        print(
            f"qlm serve: {_addresses(cfg, server, described=True)}, policy {cfg.policy}; starting "
            f"{len(models) * per_model} vLLM engines{where} ({'CPU' if fleet.cpu else 'GPU'}):",
            flush=True,
        )
        tasks.append(asyncio.get_running_loop().create_task(watch()))

    try:
        left = event_loop.run(serve_until_signal(server, ready, stop))
    finally:
        try:
            fleet.stop()
        except Exception as exc:  # the engines are stopped as far as they can be: say what was left
            print(f"qlm serve: stopping the engines: {type(exc).__name__}: {exc}", file=sys.stderr)
        if providers is not None:
            from qlm_plugin.telemetry import sdk as telemetry_sdk

            telemetry_sdk.shutdown(providers)
    if failures:
        print(f"qlm serve: error: {failures[0]}", file=sys.stderr)
        return 1
    print(f"qlm serve: stopped ({kept(left, cfg.journal.path)})")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from qlm_plugin.coordinator.loadtest import main

    return main(args)


def cmd_bench_batch(args: argparse.Namespace) -> int:
    from qlm_plugin.coordinator.batch_bench import report, run_bench, to_json

    results = run_bench(
        [r.strip() for r in args.runs.split(",") if r.strip()],
        requests=args.requests,
        window=args.window,
        rate=args.rate,
        duration_s=args.duration,
        seed=args.seed,
    )
    print(to_json(results) if args.json else report(results))
    return 0


def cmd_bench_vllm(args: argparse.Namespace) -> int:
    from qlm_plugin.adapters.vllm.bench import main

    return main(args)


def _run_openai(args: argparse.Namespace, settings: Any) -> int:
    from qlm_plugin.adapters.openai import OpenAIEngineLink, OpenAISettings
    from qlm_plugin.transport.agent import InstanceAgent

    if not args.endpoint or not args.model:
        raise ValueError("--backend openai needs --endpoint and --model")
    if args.count != 1:
        raise ValueError("--backend openai serves one server: --count must be 1 (start one per server)")
    if len(args.model) > 1:
        raise ValueError("--backend openai serves one model: give --model once (its server's)")
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    link = OpenAIEngineLink(
        OpenAISettings(
            instance_id=args.name,
            base_url=openai_base_url(args.endpoint),
            model=args.model[0],
            served_model=args.served_model or "",
            gpu=args.gpu or "h100",
            max_concurrency=args.max_concurrency,
            initial_concurrency=min(OpenAISettings.initial_concurrency, args.max_concurrency),
            load_command=args.load_command,
            unload_command=args.unload_command,
        )
    )
    agent = InstanceAgent(settings, link)
    link.on_room = agent.room
    link.on_state = agent.state_changed

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await agent.run(stop)
        finally:
            await link.close()

    event_loop.run(main())
    return 0


def openai_base_url(endpoint: str) -> str:
    """The server's base URL from ``--endpoint``: http(s) only (a bare ``host:port`` registered and
    failed every request), and without the ``/v1`` an OpenAI client's base URL ends with (the
    adapter adds the paths; with it, every request was a 404)."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--endpoint must be an http:// or https:// URL, got {endpoint!r}")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path.removesuffix('/v1')}"


def cmd_scale(args: argparse.Namespace) -> int:
    if args.count < 0:  # before Ray is asked anything
        raise ValueError(f"count must be >= 0 (0 stops the model's instances), got {args.count}")
    ray_fleet = _ray_fleet()
    import ray

    try:
        ids = ray_fleet.scale(args.ray, args.model, args.count)
    except ray_fleet.FleetError as exc:
        print(f"qlm scale: error: {exc}", file=sys.stderr)
        return 1
    except ray.exceptions.RayActorError:  # the manager died during the call
        print(
            "qlm scale: error: the fleet manager died during the resize; qlm serve makes it again "
            f"within {ray_fleet.WATCH_S:.0f} s: run qlm scale again",
            file=sys.stderr,
        )
        return 1
    print(
        f"qlm scale: {args.model} runs on {len(ids)} instance{'s' if len(ids) != 1 else ''}: "
        f"{', '.join(ids) or 'none'}"
    )
    return 0


def _ray_fleet() -> Any:
    """:mod:`qlm_plugin.deploy.ray_fleet`, or a clear error where Ray is not installed."""
    try:
        from qlm_plugin.deploy import ray_fleet
    except ModuleNotFoundError as exc:
        if exc.name != "ray" and not (exc.name or "").startswith("ray."):
            raise
        raise ValueError("Ray is not installed here: pip install 'qlm-plugin[ray]'") from None
    return ray_fleet
