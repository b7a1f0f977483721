"""A coordinator and simulated instances as separate processes, for tests that kill them: the
coordinator restarts on the same journal (and batch store) and the instances keep serving."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from qlm_plugin.transport.client import CoordinatorClient


def coordinator_process(tmp: Path, http: int, grpc_port: int, *args: str) -> subprocess.Popen[bytes]:
    """``qlm coordinator`` with ``tmp/config.yaml``, the journal ``tmp/journal.db`` and ``args``;
    its log is appended to ``tmp/coordinator.log``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qlm_plugin.cli",
            "coordinator",
            "--config",
            str(tmp / "config.yaml"),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--journal",
            str(tmp / "journal.db"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp / "coordinator.log", "ab"),
    )


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
