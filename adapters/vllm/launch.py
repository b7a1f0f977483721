"""Start a vLLM OpenAI server in a child process (tests, benchmarks, the GPU script).

On a CPU-only machine the child gets ``cpu_compat`` on its ``PYTHONPATH`` (see its docstring),
``VLLM_CPU_KVCACHE_SPACE``, offline mode, and its model run in the engine core process (no worker
process: :func:`cpu_env`). ``python -m vllm.entrypoints.openai.api_server`` is used
because the ``vllm`` command looks up the distribution named ``vllm``, absent under ``vllm-cpu``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qlm_plugin.deploy.child_process import python_command

CPU_COMPAT = Path(__file__).parent / "cpu_compat"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 20.0) -> None:
        self.terminate()
        self.wait_or_kill(timeout_s)

    def terminate(self) -> None:
        """SIGTERM the server's whole process group (its engine core and workers too)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def wait_or_kill(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_COMPAT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_SERVER_DEV_MODE", "1")  # /pause, /resume, /sleep, /wake_up
    if "VLLM_ENABLE_V1_MULTIPROCESSING" not in env:
        # The model runs in the engine core process, as on a GPU with one device: vLLM-CPU otherwise
        # starts a worker process too (about 10 s more per engine start here, one more import of
        # torch) and the core busy-waits on it through every step. Its threads are then ours to
        # set: all CPUs but one for the server, as vLLM's own binding of a worker would take.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) - 1)))
    return env


def cpu_shares(count: int) -> list[str]:
    """``count`` disjoint sets of this process's CPUs, one per engine, as vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND`` writes them ("0,1"). vLLM's automatic binding assumes one engine
    per machine and pins every engine's worker to the same last core, where one busy engine starved
    another's runnable worker for 5-12 s at a time here. With fewer CPUs than engines they wrap
    around (engines then share, as they must)."""
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // count)
    shares = []
    for i in range(count):
        start = (i * per) % len(cpus)
        group = cpus[start : start + per]
        shares.append(",".join(str(c) for c in group))
    return shares


def cpu_ids(cpus: str) -> set[int]:
    """The CPU ids of a list in vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` form ("0-3,6")."""
    ids: set[int] = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


_built_tiny_model: Path | None = None


def build_tiny_model(folder: Path) -> Path:
    """The tiny random Llama (``qlm_plugin.testing.tiny_model``) in ``folder/tiny-llama``: built once
    per process in a child process with :func:`cpu_env` (importing transformers here would need the
    same shims; about 7 s), then copied (under 1 MB; the build is deterministic)."""
    global _built_tiny_model
    model = folder / "tiny-llama"
    if _built_tiny_model is None or not (_built_tiny_model / "config.json").is_file():
        built = Path(tempfile.mkdtemp(prefix="qlm-tiny-model-")) / "tiny-llama"
        atexit.register(shutil.rmtree, built.parent, True)
        subprocess.run(
            python_command("qlm_plugin.testing.tiny_model", str(built)),
            check=True,
            env=cpu_env(),
            capture_output=True,
            timeout=300,
        )
        _built_tiny_model = built
    shutil.copytree(_built_tiny_model, model, dirs_exist_ok=True)
    return model


#: Tool calls on the tiny model, which has no tool format of its own: a named or required
#: ``tool_choice`` is made by the grammar backend, and vLLM wants a tool parser named for those too
#: (any one that takes the tokenizer); no free whitespace in a grammar's JSON, which a random model
#: would pad past any ``max_tokens``. A real model names its own parser (vLLM's tool calling docs).
TINY_TOOL_ARGS = (
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "pythonic",
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
)


def start_server(
    model: str | Path,
    port: int,
    log: Path,
    *,
    served_name: str = "tiny",
    max_num_seqs: int = 8,
    max_model_len: int = 512,
    scheduler: bool = True,
    policy: str = "fcfs",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    cpus: str | None = None,
) -> Server:
    """A CPU engine as the tests and benchmarks run it (the tiny model's settings); see
    :func:`start_engine`."""
    args = [
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(max_num_seqs),
        "--enforce-eager",
        "--scheduling-policy",
        policy,
        *extra_args,
        *shlex.split(os.environ.get("QLM_EXTRA_VLLM_ARGS", "")),  # e.g. --kv-offloading-size 32
    ]
    return start_engine(
        model, port, log, served_name=served_name, args=args, scheduler=scheduler, env=cpu_env(env), cpus=cpus
    )


def start_engine(
    model: str | Path,
    port: int,
    log: Path,
    *,
    served_name: str,
    args: Sequence[str] = (),
    scheduler: bool = True,
    env: dict[str, str] | None = None,
    cpus: str | None = None,
    host: str = "127.0.0.1",
    tied: bool = False,
    grouped: bool = False,
) -> Server:
    """Start a vLLM OpenAI server serving ``model`` as ``served_name`` on ``host:port``, its output
    appended to ``log``; ``scheduler`` turns QLM on (``--scheduler-cls``), ``args`` go to vLLM as
    they are, ``env`` is the whole environment (:func:`cpu_env` on a CPU machine); ``cpus`` (CPU
    engines only) runs the whole server on those CPUs and binds its worker there, from
    :func:`cpu_shares` when several engines share a machine. ``grouped``: the server runs under a
    process-group leader (``qlm_plugin.deploy.process_group``) that stops its engine core and
    workers whenever the server ends (a server that ends alone can leave them running); ``tied``
    (implies ``grouped``): and the whole group stops when this process dies, even by SIGKILL (a Ray
    actor's server must not outlive it). Returns at once: call :func:`wait_ready`."""
    cmd = [
        *python_command("vllm.entrypoints.openai.api_server"),
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if scheduler:
        cmd += ["--scheduler-cls", "qlm_plugin.adapters.vllm.QLMScheduler"]
    cmd += list(args)
    if grouped or tied:
        cmd = [*python_command("qlm_plugin.deploy.process_group", *(["--tied"] if tied else []), "--"), *cmd]
    child_env = dict(os.environ if env is None else env)
    if cpus is not None:
        child_env["VLLM_CPU_OMP_THREADS_BIND"] = cpus  # the worker's, where vLLM starts one
        if child_env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            child_env["OMP_NUM_THREADS"] = str(len(cpu_ids(cpus)))  # the engine core computes
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        cmd,
        env=child_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    if cpus is not None:
        # The whole server, not only its worker: the engine's core process spins while its worker
        # computes, and on another engine's CPU it slowed that engine tenfold. Set before the server
        # starts its engine processes (seconds later), which inherit it.
        os.sched_setaffinity(proc.pid, cpu_ids(cpus))
    return Server(proc, port, log)


def wait_ready(servers: Sequence[Server], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.process.poll() is not None:
                tail = s.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"vLLM server on port {s.port} exited with {s.process.returncode}:\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"{s.url}/health", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(s)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM servers not ready after {timeout_s} s: {[s.port for s in pending]}")
        time.sleep(0.5)
