"""Build the wheel, install it into a fresh virtual environment, and use it from there.

Proves the package-dir mapping (hooks/ -> qlm_plugin.hooks, adapters/<name> -> qlm_plugin.adapters.<name>)
outside the editable install, and that the packaged data (trace samples, default scenario) ships.
Offline: the wheel builds without isolation, and the venv reaches this interpreter's installed
dependencies through a .pth path entry (which does not run the editable install's finder).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("qlm_plugin-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    py = env / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "zz_outer_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return env


def test_wheel_holds_one_import_root(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names}
    assert roots == {"qlm_plugin", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for must in (
        "qlm_plugin/hooks/hookspecs.py",
        "qlm_plugin/hooks/manager.py",
        "qlm_plugin/adapters/sim/engine.py",
        "qlm_plugin/py.typed",
        "qlm_plugin/data/azure_conv_sample.csv",
        "qlm_plugin/data/TRACES.md",
        "qlm_plugin/data/default_scenario.yaml",
    ):
        assert must in names, must


def test_installed_wheel_imports_hooks_and_adapters_from_site_packages(venv: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, json, qlm_plugin, qlm_plugin.hooks, qlm_plugin.adapters.sim;"
        "print(json.dumps({'root': qlm_plugin.__file__, 'hooks': qlm_plugin.hooks.__file__,"
        "'sim': qlm_plugin.adapters.sim.__file__, 'top_hooks': importlib.util.find_spec('hooks') is not None,"
        "'top_adapters': importlib.util.find_spec('adapters') is not None}))"
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    for key in ("root", "hooks", "sim"):
        assert info[key].startswith(str(venv)), f"{key} imported from {info[key]}, not the wheel"
    assert not info["top_hooks"] and not info["top_adapters"]


def test_installed_console_script_runs_on_packaged_defaults(venv: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(venv / "bin" / "qlm"), "simulate", "--policies", "fcfs", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["policies"]["fcfs"]["overall"]["requests"] == out["requests"] > 2000


def test_installed_qlm_serve_answers_a_completion(venv: Path, tmp_path: Path) -> None:
    """The README's main command from the wheel: coordinator plus simulated instance processes,
    ready on /health, a completion through the front door, a clean stop on SIGTERM."""
    import signal
    import time
    import urllib.request

    from qlm_plugin.coordinator.loadtest import free_port

    http, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(venv / "bin" / "qlm"),
            "serve",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--speed",
            "20",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "qlm serve never became healthy"
            time.sleep(0.2)
        body = json.dumps({"model": "llama-3.1-8b", "prompt": "hello", "max_tokens": 5}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 5 and len(out["choices"][0]["text"].split()) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "loopback only" in stderr and "qlm serve: stopped" in stdout
    assert (tmp_path / "qlm-journal.db").exists()  # the default journal, in the working folder
