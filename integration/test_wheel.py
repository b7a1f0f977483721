"""Build the wheel, install it into a fresh virtual environment, and use it from there.

Proves the package-dir mapping (hooks/ -> qlm_plugin.hooks, adapters/<name> -> qlm_plugin.adapters.<name>)
outside the editable install, and that the packaged data (trace samples, default scenario) ships.
Offline: the wheel builds without isolation, and the venv reaches this interpreter's installed
dependencies through a .pth path entry (which does not run the editable install's finder).
"""

from __future__ import annotations

import json
import os
import shutil
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
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files as a fresh clone of them has them (tracked, and new files not ignored:
    what a commit would take), symlinks kept as links."""
    out = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src, dst = ROOT / rel, out / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return out


@pytest.fixture(scope="module")
def venv(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment where the README's ``pip install .`` ran inside the clone: a
    non-editable install (offline: no build isolation; the dependencies come from this
    interpreter's site-packages through a .pth path entry)."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    py = env / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "."],
        cwd=clone,
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]},  # setuptools for the build
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # this interpreter's site-packages, and those it reaches (a venv over the system's packages)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    deps |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
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


def test_installed_qlm_serve_answers_a_completion_run_inside_the_clone(venv: Path, clone: Path) -> None:
    """The README's main command, run inside the clone's own folder after a non-editable install:
    coordinator plus simulated instance processes, ready on /health, a completion through the
    front door, a clean stop on SIGTERM. (Its children once imported the clone's source tree, which
    lacked the installed sub-packages, and died: /health said "no instances" and a completion hung.)"""
    import signal
    import time
    import urllib.request

    from qlm_plugin.deploy.child_process import free_port

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
        cwd=clone,
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
    assert (clone / "qlm-journal.db").exists()  # the default journal, in the working folder


def test_child_processes_import_the_installed_package_not_the_clone(venv: Path, clone: Path) -> None:
    """Inside the clone, ``python -m`` would put the clone first on ``sys.path``; the product's
    children import ``qlm_plugin`` from where their parent did (here: the installed package)."""
    parent = (
        "import json, subprocess; from qlm_plugin.deploy.child_process import python_command;"
        "probe = python_command('qlm_plugin.deploy.child_process');"
        "print(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)"
    )
    # -I: the parent itself imports the installed package, as the `qlm` console script does
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", parent],
        capture_output=True,
        text=True,
        cwd=clone,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    child_root, child_path = json.loads(proc.stdout)
    assert child_root.startswith(str(venv)), f"the child imported qlm_plugin from {child_root}"
    assert str(clone) not in child_path and "" not in child_path
