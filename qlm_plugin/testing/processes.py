"""A coordinator and simulated instances as separate processes, for tests that kill them: the
coordinator restarts on the same journal (and batch store) and the instances keep serving."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from qlm_plugin.transport.client import CoordinatorClient


def _cli(command: str, tmp: Path, http: int, grpc_port: int, *args: str) -> list[str]:
    """``qlm COMMAND`` on the ports, with the journal ``tmp/journal.db`` and ``args``."""
    return [
        sys.executable,
        "-m",
        "qlm_plugin.cli",
        command,
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc_port),
        "--journal",
        str(tmp / "journal.db"),
        *args,
    ]


def coordinator_process(tmp: Path, http: int, grpc_port: int, *args: str) -> subprocess.Popen[bytes]:
    """``qlm coordinator`` with ``tmp/config.yaml``, the journal ``tmp/journal.db`` and ``args``;
    its log is appended to ``tmp/coordinator.log``."""
    return subprocess.Popen(
        _cli("coordinator", tmp, http, grpc_port, "--config", str(tmp / "config.yaml"), *args),
        stdout=subprocess.PIPE,
        stderr=open(tmp / "coordinator.log", "ab"),
    )


def serve_process(
    tmp: Path,
    http: int,
    grpc_port: int,
    *args: str,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """``qlm serve`` on the ports with the journal ``tmp/journal.db`` and ``args``, its output in
    ``tmp/serve.log``; ``new_session``: the leader of its own process group, as a terminal's job."""
    with (tmp / "serve.log").open("ab") as out:
        return subprocess.Popen(
            _cli("serve", tmp, http, grpc_port, *args),
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def http_call(
    url: str, body: dict[str, Any] | None = None, token: str | None = None, timeout_s: float = 10
) -> tuple[int, bytes]:
    """(status, body) of a GET (no ``body``) or a JSON POST; status 0 when nothing answered."""
    headers = {"content-type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout_s) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    """Until ``url``'s /health answers 200 (an instance registered); fails with the log's end if
    the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while http_call(f"{url}/health", timeout_s=2)[0] != 200:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not healthy in {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(0.1)


def instance_process(tmp: Path, grpc_port: int, name: str, speed: float = 2.0) -> subprocess.Popen[bytes]:
    """One simulated instance; every request it finishes is recorded in ``tmp/NAME.done``."""
    env = {**os.environ, "QLM_SIM_RECORD": str(tmp / f"{name}.done")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qlm_plugin.cli",
            "instance",
            "--coordinator",
            f"127.0.0.1:{grpc_port}",
            "--name",
            name,
            "--speed",
            str(speed),
        ],
        env=env,
        stderr=open(tmp / f"{name}.log", "ab"),
    )


def served_counts(tmp: Path, names: tuple[str, ...]) -> dict[str, int]:
    """How many times each request id was finished by the instances ``names``."""
    counts: dict[str, int] = {}
    for name in names:
        path = tmp / f"{name}.done"
        for line in path.read_text().splitlines() if path.exists() else []:
            rid = line.split()[0]
            counts[rid] = counts.get(rid, 0) + 1
    return counts


async def wait_ready(target: str, instances: int, timeout_s: float = 30) -> None:
    """Until the coordinator at ``target`` answers and ``instances`` instances are registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with CoordinatorClient(target, timeout_s=2) as c:
                if len((await c.instances()).instances) == instances:
                    return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("coordinator and instances not ready")
        await asyncio.sleep(0.2)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
