"""The fleet of ``qlm serve --ray`` on real Ray: a local Ray of its own stops cleanly on SIGTERM;
on a cluster, a scenario's groups (two of one model) start whole, ``qlm scale`` adds instances
like their group's and refuses what it cannot do at once and precisely, and a fleet manager that
dies is made again with its instances, leaving no placement group behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.processes import serve_process
from qlm_plugin.transport.client import CoordinatorClient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# the cluster's live placement groups and named actors, as a separate driver sees them
PROBE = """
import sys, ray
ray.init(address=sys.argv[1], namespace="qlm", log_to_driver=False, logging_level="ERROR")
if sys.argv[2:] == ["kill"]:
    ray.kill(ray.get_actor("qlm-fleet", namespace="qlm"), no_restart=False)
pgs = [v["state"] for v in ray.util.placement_group_table().values() if v["state"] != "REMOVED"]
print("PGS", " ".join(sorted(pgs)))
"""


def _env(ray_tmp: Path) -> dict[str, str]:
    # a loopback test cluster: no token authentication (Ray >= 2.5x asks for one when a token file exists)
    return {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }


async def _instances(
    target: str, n: int, new_since: dict[str, str] | None = None, timeout_s: float = 120
) -> dict[str, pb.InstanceSnapshot]:
    """The coordinator's instances once ``n`` are registered and alive (``new_since``: none in a
    session of those, instance id -> session)."""
    deadline = time.monotonic() + timeout_s
    old = set((new_since or {}).items())
    async with CoordinatorClient(target, timeout_s=10) as c:
        while True:
            try:
                listed = {i.instance_id: i for i in (await c.instances()).instances if i.healthy}
                if len(listed) == n and not old & {(k, i.state.session) for k, i in listed.items()}:
                    return listed
            except Exception:
                listed = {}
            assert time.monotonic() < deadline, f"{n} instances never registered: {sorted(listed)}"
            await asyncio.sleep(0.5)


def _stop(serve: subprocess.Popen[bytes]) -> int | None:
    serve.send_signal(signal.SIGTERM)
    try:
        return serve.wait(90)
    except subprocess.TimeoutExpired:
        serve.kill()
        serve.wait()
        return None


def test_a_serve_with_a_local_ray_of_its_own_stops_cleanly_on_sigterm(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Ray's local processes die with the thread that started them: the serve starts its Ray on
    the main thread (from an executor's thread they died as the loop ended, and the fleet's stop
    then aborted the process, exit 134)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ray_tmp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must fit 107 characters
    http, grpc_port = free_port(), free_port()
    serve = serve_process(tmp_path, http, grpc_port, "--ray", "--instances", "2", env=_env(ray_tmp))
    log = tmp_path / "serve.log"
    try:
        asyncio.run(_instances(f"127.0.0.1:{grpc_port}", 2))
    finally:
        rc = _stop(serve)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    assert "qlm serve: stopped" in log.read_text(errors="replace")
    deadline = time.monotonic() + 20  # and its Ray is gone with it
    while left := _processes_under(ray_tmp):
        assert time.monotonic() < deadline, left
        time.sleep(0.5)


def _processes_under(folder: Path) -> list[str]:
    """The command lines of this machine's processes that name ``folder`` (a Ray's session)."""
    found = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in line:
            found.append(line[:200])
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    env = _env(tmp_path_factory.mktemp("ray"))
    port = free_port()
    ray = shutil.which("ray") or "ray"
    try:
        subprocess.run(
            [ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"],
            check=True, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_scenario_groups_scale_like_their_group_bad_resizes_are_refused_and_a_dead_manager_is_remade(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = cluster
    http, grpc_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    serve = serve_process(
        tmp_path,
        http,
        grpc_port,
        "--ray",
        address,
        "--scenario",
        str(ROOT / "scenarios/bench/C.yaml"),
        env=env,
    )
    log = tmp_path / "serve.log"

    def qlm(*args: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "qlm_plugin.cli", *args, "--ray", address],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0

    def probe(*args: str) -> list[str]:
        r = subprocess.run(
            [sys.executable, "-c", PROBE, address, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        lines = [line for line in r.stdout.splitlines() if line.startswith("PGS")]
        assert lines, r.stderr[-2000:]
        return lines[0].split()[1:]

    def shape(listed: dict[str, pb.InstanceSnapshot]) -> list[tuple[str, str, list[str]]]:
        return sorted((i.state.models_loaded[0], i.gpu, list(i.state.models_warm)) for i in listed.values())

    try:
        # Scenario C: llama and phi, each on an H100 and an A100, the other model warm: four groups,
        # two per model (a group's start once set the model's total, and the second started nothing)
        listed = asyncio.run(_instances(target, 4))
        assert shape(listed) == [
            ("llama-3.1-8b", "a100-80", ["phi-4"]),
            ("llama-3.1-8b", "h100", ["phi-4"]),
            ("phi-4", "a100-80", ["llama-3.1-8b"]),
            ("phi-4", "h100", ["llama-3.1-8b"]),
        ]
        # one more llama joins its first group, like it (it came as an H100 without a warm model)
        rc, out, _ = qlm("scale", "llama-3.1-8b", "3")
        assert rc == 0, out
        first = set(listed)
        listed = asyncio.run(_instances(target, 5))
        assert shape({iid: listed[iid] for iid in set(listed) - first}) == [
            ("llama-3.1-8b", "h100", ["phi-4"])
        ]

        # refused, the cause alone (no Ray wrapping: colours, actor ids), and nothing started
        rc, out, _ = qlm("scale", "no-such-model", "1")
        assert rc == 1 and "model 'no-such-model' is not served here (served: llama-3.1-8b, phi-4)" in out, (
            out
        )
        assert "\x1b[" not in out and "actor_id" not in out and "Traceback" not in out, out
        # beyond the cluster (2 CPUs, a quarter each): refused at once, no placement group left pending
        rc, out, took = qlm("scale", "phi-4", "12")
        assert rc == 1 and "10 more instances of phi-4 need 2.5 CPU; the Ray cluster has" in out, out
        assert took < 60 and "Traceback" not in out, out
        assert probe() == ["CREATED"] * 5

        # the manager dies (its instances with it): the serve makes it again, with the same five
        before = {iid: i.state.session for iid, i in listed.items()}
        assert probe("kill") == ["CREATED"] * 5
        deadline = time.monotonic() + 90
        while "made them again" not in log.read_text(errors="replace"):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        again = asyncio.run(_instances(target, 5, new_since=before))  # new sessions
        assert shape(again) == shape(listed)
        assert probe() == ["CREATED"] * 5  # the dead manager's placement groups removed
        rc, out, _ = qlm("scale", "phi-4", "1")  # and qlm scale finds the new one
        assert rc == 0 and "phi-4 runs on 1 instances" in out, out
    finally:
        rc = _stop(serve)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    assert probe() == []
