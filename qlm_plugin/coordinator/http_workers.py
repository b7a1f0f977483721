"""The HTTP front door in several processes (``qlm serve --http-workers N``).

The core process (the :class:`~qlm_plugin.coordinator.server.CoordinatorServer`) owns the queue,
the plan, the journal and the gRPC servers. It opens the public HTTP socket and hands it to N
worker processes (as vLLM's API server scale-out and pre-fork servers do), which all accept on it;
each worker reads, authenticates and checks the OpenAI requests, writes the answers and the token
streams, and reaches the core over one :mod:`~qlm_plugin.coordinator.relay` link. What the
workers do not serve themselves (health, metrics, models, the Batch API) they pass to the core's
own HTTP server on a private Unix socket, so it is answered exactly as without workers.

A worker that dies is started again (its clients' requests are cancelled, as for a client that
disconnects); a worker whose core is gone stops, so the port is free for the next start.

Run as ``python -m qlm_plugin.coordinator.http_workers`` by the core only: its settings come on
stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import aiohttp
from aiohttp import web

from qlm_plugin.coordinator.auth import Authenticator
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.http_api import (
    WRITE_STALL_S,
    FrontDoor,
    body_unreadable,
    error_response,
    front_door_timeouts,
    make_runner,
)
from qlm_plugin.coordinator.relay import RelayClient, RelayService
from qlm_plugin.deploy.child_process import die_with_parent, python_command

log = logging.getLogger("qlm_plugin.coordinator.http_workers")

#: Environment variable: the number of workers when neither the command line nor the config says.
WORKERS_ENV = "QLM_HTTP_WORKERS"
#: What the core sends a worker to stop it (SIGTERM may come to the whole group: the core decides).
STOP_SIGNAL = signal.SIGUSR1
#: Workers started again at most this often each (a worker that dies at start must not spin).
RESTART_EVERY_S = 1.0
READY_TIMEOUT_S = 60.0
#: Headers that belong to one hop, not passed on (RFC 9110, section 7.6.1).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


#: The most front-door workers (the config's bound).
MAX_WORKERS = 64


def auto_workers() -> int:
    """Enough workers to use the machine: one per core the process may run on, less the core's own;
    none on two cores or fewer, where a worker costs the core more than it takes off it (measured:
    docs/coordinator.md, "Performance")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(cores - 1, 16)


def resolve_workers(configured: int | str | None, env: dict[str, str] | None = None) -> int:
    """The config's (or command line's) number; else ``QLM_HTTP_WORKERS``; else :func:`auto_workers`
    (``auto`` in either)."""
    if configured == "auto":
        return auto_workers()
    if isinstance(configured, int):
        return configured
    value = (os.environ if env is None else env).get(WORKERS_ENV, "").strip()
    if value:
        if value == "auto":
            return auto_workers()
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={value!r}: expected a number of workers or 'auto'") from None
        if not 0 <= n <= MAX_WORKERS:  # as the config's and the command line's bound
            raise ValueError(f"{WORKERS_ENV}={value!r}: expected 0 to {MAX_WORKERS} workers, or 'auto'")
        return n
    return auto_workers()


# ---------------------------------------------------------------------------------- the core's side
class WorkerPool:
    """The core's front-door workers: the relay server they talk to, their processes, their
    restarts. Used on the core's event loop."""

    def __init__(self, n: int, coord: Coordinator, auth: Authenticator, tls: dict[str, Any] | None) -> None:
        self.n = n
        self.coord = coord
        self.auth = auth
        self.tls = tls
        self._secret = secrets.token_urlsafe(32)
        self._dir = ""
        self._relay: RelayService | None = None
        self._settings: dict[str, Any] = {}
        self._fd = -1
        self._procs: list[asyncio.subprocess.Process | None] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.returncode is None]

    async def start(self, listener: socket.socket, core_http: web.AppRunner) -> None:
        """Serve the relay and ``core_http`` (the core's own front door) on private sockets, then
        start the workers on ``listener`` (the public one, listening) and wait until each accepts."""
        # A private folder for the sockets: only this user can connect.
        self._dir = tempfile.mkdtemp(prefix="qlm-front-")
        address = f"{self._dir}/relay.sock"
        await web.UnixSite(core_http, f"{self._dir}/http.sock").start()
        self._relay = RelayService(self.coord, self._secret)
        await self._relay.serve(address)
        self._fd = listener.fileno()
        self._settings = {
            "relay": address,
            "secret": self._secret,
            "core_http": f"{self._dir}/http.sock",
            "fd": self._fd,
            "auth": self.auth.export(),
            "tls": self.tls,
            "timeouts": front_door_timeouts(),
        }
        self._procs = [None] * self.n
        await asyncio.gather(*(self._spawn(i) for i in range(self.n)))
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(i)) for i in range(self.n)]

    async def _spawn(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *python_command(__name__),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            pass_fds=(self._fd,),
            # a terminal's Ctrl-C goes to the core only, which stops its workers: reaching a worker
            # still importing, it printed a KeyboardInterrupt traceback per worker
            start_new_session=True,
        )
        self._procs[index] = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({**self._settings, "index": index}).encode())
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"front-door worker {index} did not start (exit status {proc.returncode})")

    async def _watch(self, index: int) -> None:
        while not self._stopping:
            proc = self._procs[index]
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping or not self.coord.book.accepting:  # no new worker while the core drains
                return
            log.error(
                "front-door worker %d (pid %d) exited with %s: starting it again", index, proc.pid, code
            )
            await asyncio.sleep(max(0.0, RESTART_EVERY_S - (time.monotonic() - started)))
            try:
                await self._spawn(index)
            except (OSError, RuntimeError):
                log.exception("front-door worker %d could not be started again", index)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (each closes its connections, cancelling what its clients still wait
        for, through the relay), then the relay."""
        self._stopping = True
        if self._relay is not None:
            self._relay.closing = True
        for task in self._watchers:
            task.cancel()
        procs = [p for p in self._procs if p is not None and p.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(STOP_SIGNAL)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        if self._relay is not None:
            await self._relay.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


# ---------------------------------------------------------------------------------- a worker
class CoreProxy:
    """Passes what a worker does not serve itself to the core's HTTP server, streamed both ways."""

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self._session: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.Request, read: bytes | None = None) -> web.StreamResponse:
        """``request`` answered by the core (``read``: its body, where it was read already)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(self.unix_path, limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )
        # The body goes decoded, read or as it is read (aiohttp decodes a content-encoding): its
        # encoding and length are no longer its own (a gzip body reached the core as gzip, and it
        # answered 500, decoding it again)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-encoding", "content-length")
        }
        body: bytes | aiohttp.StreamReader | None = read
        if body is None and request.body_exists:
            body = request.content
        out: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method,
                "http://core" + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream:
                out = web.StreamResponse(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
                )
                await out.prepare(request)
                # each write bounded as the core's own (a client that stopped reading held the
                # worker's connection for as long as it stayed open)
                async for data in upstream.content.iter_any():
                    await asyncio.wait_for(out.write(data), WRITE_STALL_S)
                await asyncio.wait_for(out.write_eof(), WRITE_STALL_S)
                return out
        except TimeoutError:  # (only a write times out: the answer has begun)
            log.info(
                "%s %s: the client stopped reading for %g s: cut", request.method, request.path, WRITE_STALL_S
            )
            if request.transport is not None:
                request.transport.abort()
            assert out is not None
            return out
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            failed = request.content.exception() if body is request.content else None
            if out is None and isinstance(failed, web.RequestPayloadError):  # the client's body
                return body_unreadable(failed)
            return error_response(503, f"the coordinator core is unreachable: {exc}", code="unavailable")


async def _serve_worker(settings: dict[str, Any]) -> None:
    from qlm_plugin.event_loop import freeze_startup_heap

    core_pid = os.getppid()
    client = RelayClient(settings["relay"], settings["secret"])
    await client.start()
    proxy = CoreProxy(settings["core_http"])
    front = FrontDoor(
        None,
        Authenticator.from_export(settings["auth"]),
        core=client,
        extensions=[proxy.add_routes],
        timeouts=settings["timeouts"],
        pass_to_core=proxy.forward,
    )
    runner = make_runner(front)
    await runner.setup()
    ssl_context = None
    if settings["tls"]:
        from qlm_plugin.coordinator.auth import tls_server_context

        ssl_context = tls_server_context(**settings["tls"])
    listener = socket.socket(fileno=settings["fd"])
    site = web.SockSite(runner, listener, ssl_context=ssl_context)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(STOP_SIGNAL, stop.set)  # the core's, or its death (die_with_parent)
    # SIGTERM or Ctrl-C to the whole process group (systemd's KillMode=control-group, a terminal)
    # reaches the core too: it drains, its clients' streams still going through here, then stops us.
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    freeze_startup_heap()
    print("ready", flush=True)
    ended = loop.create_task(client.closed.wait())
    await asyncio.wait([loop.create_task(stop.wait()), ended], return_when=asyncio.FIRST_COMPLETED)
    front.closing = True
    await runner.cleanup()
    await client.close()
    if os.getppid() != core_pid:  # the core died without cleaning up: its private folder goes too
        shutil.rmtree(os.path.dirname(settings["core_http"]), ignore_errors=True)


def main() -> int:
    settings = json.loads(sys.stdin.read())
    die_with_parent(STOP_SIGNAL)  # the core's death, even by SIGKILL (its link's end is noticed too)
    logging.basicConfig(
        level=logging.WARNING, format=f"worker {settings['index']}: %(levelname)s %(name)s: %(message)s"
    )
    from qlm_plugin.event_loop import run

    try:
        run(_serve_worker(settings))
    except (OSError, TimeoutError) as exc:
        print(f"front-door worker {settings['index']}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
