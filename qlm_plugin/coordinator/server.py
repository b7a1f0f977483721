"""Start and stop the coordinator: gRPC (with health and reflection) and HTTP servers around one
:class:`Coordinator`, and the graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qlm_plugin.coordinator.auth import Authenticator, check_bind, grpc_server_credentials, http_ssl_context
from qlm_plugin.coordinator.batch_api import BatchAPI
from qlm_plugin.coordinator.batch_store import BatchStore
from qlm_plugin.coordinator.batches import BatchService
from qlm_plugin.coordinator.config import CoordinatorConfig, join_host_port
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.grpc_api import AdminService, AuthInterceptor, InstancesService, RequestsService
from qlm_plugin.coordinator.http_api import FrontDoor, make_runner
from qlm_plugin.coordinator.http_workers import WorkerPool, resolve_workers
from qlm_plugin.coordinator.journal import Journal, JournalError
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc
from qlm_plugin.telemetry.instruments import Telemetry
from qlm_plugin.workloads.scenario import Scenario, load_scenario

log = logging.getLogger("qlm_plugin.coordinator")

SERVICES = ("qlm.v1.Requests", "qlm.v1.Instances", "qlm.v1.Admin")
#: Its health follows ``/health``; "" and the others are SERVING while the process takes agents.
REQUESTS = SERVICES[0]
#: Connections the kernel completes for the HTTP socket before the server accepts them (uvicorn's
#: default, vLLM's API server's). aiohttp's 128 made a burst of connections arriving while the event
#: loop was busy wait for the client's SYN to be sent again: 156 of 600 took 1-2 s to connect
#: during a 2 s stall, none with 2,048 (the kernel caps it at ``net.core.somaxconn``).
LISTEN_BACKLOG = 2048
#: On stop, how long gRPC calls still in flight may go on (the report streams agents hold open
#: always use it all: it runs beside the HTTP servers' own grace).
GRPC_GRACE_S = 2.0
#: How long the requests a stop leaves unfinished have their clients told so, before connections
#: close, seconds (an answer each, through the relay to a worker's clients too).
HALT_GRACE_S = 0.3
#: gRPC keepalive: a dead peer is noticed within seconds even on an idle stream.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would bind too,
    # silently, and instances and clients would reach either at random
    ("grpc.so_reuseport", 0),
]


class CoordinatorServer:
    """One coordinator with its servers. ``start`` binds (port 0 picks a free port: see
    ``grpc_port`` and ``http_port``); ``stop`` drains."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        scenario: Scenario | None = None,
        *,
        telemetry: Telemetry | None = None,
        env: dict[str, str] | None = None,
        warn: Callable[[str], Any] = log.warning,
        own_instances_token: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.scenario = scenario or load_scenario(cfg.scenario)
        self.auth = Authenticator.from_config(cfg, env, own_instances_token)
        check_bind(cfg, self.auth, warn)
        self._telemetry = telemetry
        self.coordinator: Coordinator | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: Any = None
        self._runner: web.AppRunner | None = None
        self._front: FrontDoor | None = None
        self.http_workers = resolve_workers(cfg.http.workers)
        self.workers: WorkerPool | None = None
        self._listener: socket.socket | None = None
        self._health: Any = None
        self._ready_changed = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        self.batch_store: BatchStore | None = None
        self.batches: BatchService | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        raise_open_files_limit()
        cfg = self.cfg
        journal = Journal(
            cfg.journal.path,
            synchronous=cfg.journal.synchronous,
            retain_finished_s=cfg.journal.retain_finished_s,
        )
        coord = self.coordinator = Coordinator(cfg, self.scenario, journal, self._telemetry)
        await coord.start()
        store = self.batch_store = BatchStore(
            cfg.batches.path or BatchStore.beside(cfg.journal.path), synchronous=cfg.journal.synchronous
        )
        self.batches = BatchService(coord, store, cfg.batches)
        await self.batches.start()
        # No interceptor without tokens (they are fixed at start): it let every call through, at
        # about 5% of a unary Submit's CPU.
        interceptors = [AuthInterceptor(self.auth)] if self.auth.enabled else []
        server = self._grpc = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
        pb_grpc.add_RequestsServicer_to_server(RequestsService(coord, self.auth), server)  # type: ignore[no-untyped-call]  # generated stub
        pb_grpc.add_InstancesServicer_to_server(InstancesService(coord, self.auth), server)  # type: ignore[no-untyped-call]  # generated stub
        pb_grpc.add_AdminServicer_to_server(AdminService(coord), server)  # type: ignore[no-untyped-call]  # generated stub
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [pb.DESCRIPTOR.services_by_name[s.split(".")[-1]].full_name for s in SERVICES]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = join_host_port(cfg.grpc.host, cfg.grpc.port)
        creds = grpc_server_credentials(cfg)
        try:
            self.grpc_port = (
                server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
            )
        except RuntimeError as exc:  # grpcio >= 1.6x raises where it returned 0
            raise OSError(f"cannot bind gRPC to {address} (in use, or not an address here?): {exc}") from None
        if not self.grpc_port:
            raise OSError(f"cannot bind gRPC to {address} (in use, or not an address here?)")
        await server.start()
        for name in ("", *SERVICES[1:]):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        coord.on_ready = lambda _ready: self._ready_changed.set()
        self._health_task = asyncio.get_running_loop().create_task(self._follow_ready(coord))
        batch_api = BatchAPI(self.batches, store, self.auth, cfg)
        front = FrontDoor(
            coord,
            self.auth,
            metrics_public=cfg.metrics_public or not self.auth.enabled,
            extensions=[batch_api.add_routes],
        )
        self._front = front
        self._runner = make_runner(front)
        await self._runner.setup()
        try:
            if self.http_workers == 0:
                site = web.TCPSite(
                    self._runner,
                    cfg.http.host,
                    cfg.http.port,
                    ssl_context=http_ssl_context(cfg),
                    backlog=LISTEN_BACKLOG,
                )
                await site.start()
                self.http_port = self._runner.addresses[0][1]
                listener = None
            else:
                # The workers accept on the public socket; the core answers what they pass on.
                listener = self._listener = await _listen(cfg.http.host, cfg.http.port)
        except OSError as exc:  # named as the gRPC port's is: which server, and what to change
            raise OSError(
                f"cannot bind HTTP to {cfg.http.host}:{cfg.http.port} ({exc.strerror or exc}; "
                "another port with --http-port or http.port)"
            ) from None
        if listener is not None:
            self.http_port = listener.getsockname()[1]
            tls = cfg.tls.model_dump(include={"cert", "key", "client_ca"}) if cfg.tls is not None else None
            self.workers = WorkerPool(self.http_workers, coord, self.auth, tls)
            await self.workers.start(listener, self._runner)
        log.info(
            "coordinator ready: HTTP %s (%s), gRPC %s, policy %s, journal %s",
            join_host_port(cfg.http.host, self.http_port),
            f"{self.http_workers} front-door workers" if self.http_workers else "served by the core",
            join_host_port(cfg.grpc.host, self.grpc_port),
            cfg.policy,
            cfg.journal.path,
        )

    async def _follow_ready(self, coord: Coordinator) -> None:
        """The health of ``qlm.v1.Requests`` follows ``/health``: SERVING while work is accepted and
        an instance is connected, NOT_SERVING otherwise."""
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        while True:
            self._ready_changed.clear()
            await self._health.set(REQUESTS, serving if coord.ready else not_serving)
            await self._ready_changed.wait()

    async def stop(self, drain_timeout_s: float | None = None, *, started: bool = True) -> dict[str, int]:
        """Graceful drain: health NOT_SERVING, refuse new work, let dispatched requests finish (or
        leave them journaled for the next start), flush the journal, close the servers. Takes at
        most the drain's timeout plus about 2 s (the servers' grace for calls still open, HTTP and
        gRPC side by side)."""
        left: dict[str, int] = {}
        if self._health is not None:
            await self._health.enter_graceful_shutdown()  # NOT_SERVING from now on, whatever is set
        if self._health_task is not None:
            self._health_task.cancel()
        if self.coordinator is not None:
            left = await self.coordinator.drain(drain_timeout_s)
        if self.batches is not None:  # after the drain: requests that finished in it are counted
            await self.batches.close()
        if self._front is not None:
            self._front.closing = True  # first: a client told below and leaving cancels nothing
        if self.coordinator is not None and self.coordinator.halt_unfinished(left):
            await asyncio.sleep(HALT_GRACE_S)  # their clients (a worker's too) are told before the close
        grpc_stopped = (
            asyncio.ensure_future(self._grpc.stop(grace=GRPC_GRACE_S)) if self._grpc is not None else None
        )
        if self.workers is not None:  # before the core's HTTP: the workers pass requests to it
            await self.workers.stop()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if grpc_stopped is not None:
            await grpc_stopped
        if self.coordinator is not None:
            try:
                await self.coordinator.journal.close()
            except JournalError as exc:  # logged with what was lost; the rest of the stop goes on
                log.error("closing the journal: %s", exc)
        if self.batch_store is not None:
            self.batch_store.close()
        self.stopped.set()
        if started:  # a start that failed kept nothing (it may not have opened the journal)
            log.info("coordinator stopped: %s", kept(left, "the journal"))
        return left


#: The soft limit of open files the server asks for (vLLM's servers ask for 65,535).
OPEN_FILES_TARGET = 65_536


def raise_open_files_limit() -> None:
    """The soft limit of open files raised towards the hard one, as vLLM's servers do at start: every
    HTTP connection, gRPC channel and instance link holds one, and under the usual soft limit of
    1,024 about 1,000 idle HTTP connections cut everyone else off, gRPC included."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # at most vLLM's 65,536: children inherit it, and some programs walk every possible fd
    target = min(hard, OPEN_FILES_TARGET) if hard != resource.RLIM_INFINITY else OPEN_FILES_TARGET
    if soft >= target:
        log.debug("open files limit: %d", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # macOS: an unlimited hard limit is above what it allows
        log.debug("open files limit: %d, not raised to %d (hard %d): %s", soft, target, hard, exc)
        return
    log.debug("open files limit: raised from %d to %d (hard %d)", soft, target, hard)


def kept(left: dict[str, int], journal: str) -> str:
    """What a stop left unfinished, in words: the queued requests and those still on instances
    (dispatched), all kept in the ``journal`` for the next start."""
    queued, dispatched = left.get("queued", 0), left.get("dispatched", 0)
    said = (
        f"{queued + dispatched} unfinished requests kept in {journal} for the next start "
        f"({queued} queued, {dispatched} dispatched)"
    )
    if left.get("not_kept"):
        said += f"; {left['not_kept']} cancelled (their clients were told to send them again)"
    return said


#: How long a restarted core waits for the port while the old core's workers let go of it.
BIND_WAIT_S = 10.0


async def _listen(host: str, port: int) -> socket.socket:
    """The public HTTP socket, listening, for the workers to accept on."""
    deadline = time.monotonic() + BIND_WAIT_S
    while True:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def serve_until_signal(
    server: CoordinatorServer, on_ready: Callable[[], Any] | None = None, stop: asyncio.Event | None = None
) -> dict[str, int]:
    """Run until SIGTERM or SIGINT (or ``stop`` is set), then drain."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    signals: list[int] = []

    def signalled() -> None:
        signals.append(1)
        if not stop.is_set():
            stop.set()
            return
        # a second one, as uvicorn and gunicorn take it: stop now, what is unfinished kept
        log.warning("second signal: stopping now; unfinished requests are kept in the journal")
        if server.coordinator is not None:
            server.coordinator.stop_waiting = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    try:
        await server.start()
    except BaseException:  # a port in use, a journal in use: what did start is closed cleanly
        with contextlib.suppress(Exception):
            await server.stop(drain_timeout_s=0, started=False)
        raise
    if on_ready is not None:
        on_ready()
    await stop.wait()
    if signals:  # (else a failure set it: whoever set it says why)
        log.info("signal received: draining (a second signal stops at once)")
    return await server.stop()
