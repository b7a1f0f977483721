"""The adapter authoring kit's example (integration/example_adapter, docs/adapters.md), installed for
real: its wheel built and installed into a fresh virtual environment, then used from there.

Offline, as integration/test_wheel.py: the wheel builds without build isolation, from a copy (an
in-tree setuptools build would leave build/ and *.egg-info in the repo), and is installed with
--no-index --no-deps. qlm-plugin itself and pytest come from this interpreter: the venv's .pth runs
``site.addsitedir`` on this interpreter's site-packages, which (unlike a bare path entry) also runs
their own .pth files, so an editable install of qlm-plugin is found too. The example's package
comes first on the venv's path, from its site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from qlm_plugin.testing.conformance import AdapterConformance

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "integration" / "example_adapter"
pytestmark = pytest.mark.slow


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QLM_PLUGINS", "QLM_DISABLE_PLUGIN_AUTOLOAD")}
    env.pop("PYTHONPATH", None)  # nothing but the venv's own path
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore", **overrides)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The built wheel, and the copy of the example it was built from."""
    work = tmp_path_factory.mktemp("example")
    src = work / "example_adapter"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".pytest_cache")
    shutil.copytree(EXAMPLE, src, ignore=skip)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*build, str(work / "dist"), str(src)], check=True, timeout=120, env=_env())
    (whl,) = (work / "dist").glob("qlm_example_adapter-*.whl")
    return whl, src


@pytest.fixture(scope="module")
def venv(wheel: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the example installed."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    lines = [f"import site; site.addsitedir({d!r})\n" for d in outer if Path(d).is_dir()]
    Path(purelib, "zz_outer_site.pth").write_text("".join(lines))
    # pip itself comes from this interpreter's site-packages (the venv has none of its own).
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel[0])],
        check=True,
        timeout=120,
        env=_env(),
    )
    shutil.rmtree(wheel[1] / "src")  # from here on only the installed package can be imported
    return py


def test_wheel_holds_one_import_root_and_the_entry_point(wheel: tuple[Path, Path]) -> None:
    names = zipfile.ZipFile(wheel[0]).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "qlm_example_adapter"
    }
    (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel[0]).read(eps).decode()
    assert "[qlm]" in text and "example = qlm_example_adapter.plugin:plugin" in text


_PROBE = """
import json, qlm_example_adapter, qlm_example_adapter.plugin as ep
from qlm_plugin.hooks import get_plugin_manager
pm = get_plugin_manager()
loaded = pm.get_plugin("example")
ids = [i.instance_id for lst in pm.hook.qlm_list_instances() for i in lst]
state = pm.hook.qlm_instance_state(instance_id="echo-1", detail=False)
print(json.dumps({
    "file": qlm_example_adapter.__file__,
    "loaded": loaded is not None,
    "is_entry_point_object": loaded is ep.plugin,
    "dispatch_impl": "example" in [i.plugin_name for i in pm.hook.qlm_dispatch.get_hookimpls()],
    "instances": ids,
    "state_backend": None if state is None else state.backend,
}))
"""


@pytest.mark.parametrize(
    ("overrides", "loaded"),
    [
        ({"QLM_EXAMPLE_INSTANCES": "2"}, True),
        ({"QLM_EXAMPLE_INSTANCES": "2", "QLM_PLUGINS": "other,example"}, True),
        ({"QLM_EXAMPLE_INSTANCES": "2", "QLM_PLUGINS": "other"}, False),
        ({"QLM_EXAMPLE_INSTANCES": "2", "QLM_DISABLE_PLUGIN_AUTOLOAD": "1"}, False),
        ({}, True),  # loaded, but with no instance by default
    ],
    ids=["autoload", "allow-listed", "not-allow-listed", "autoload-disabled", "no-instances"],
)
def test_plugin_manager_loads_it_from_the_qlm_entry_point_group(
    venv: Path, tmp_path: Path, overrides: dict[str, str], loaded: bool
) -> None:
    proc = subprocess.run(
        [str(venv), "-c", _PROBE], capture_output=True, text=True, cwd=tmp_path, env=_env(**overrides)
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["file"].startswith(str(venv.parents[1])), f"imported from {info['file']}, not the venv"
    assert info["loaded"] is loaded and info["is_entry_point_object"] is loaded
    assert info["dispatch_impl"] is loaded
    served = loaded and "QLM_EXAMPLE_INSTANCES" in overrides
    assert info["instances"] == (["echo-0", "echo-1"] if served else [])
    assert info["state_backend"] == ("echo" if served else None)


def test_conformance_suite_passes_on_the_installed_adapter(
    venv: Path, wheel: tuple[Path, Path], tmp_path: Path
) -> None:
    """The example's own tests/test_conformance.py (a subclass of AdapterConformance), run by the
    venv's pytest against the installed package: every test of the suite runs, and passes."""
    report = tmp_path / "junit.xml"
    proc = subprocess.run(
        [str(venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "tests"],
        capture_output=True,
        text=True,
        cwd=wheel[1],
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {c.get("name", ""): [child.tag for child in c] for c in cases}
    expected = {n for n in dir(AdapterConformance) if n.startswith("test_")}
    assert set(outcomes) == expected, f"ran {sorted(outcomes)}"
    not_passed = {n: tags for n, tags in outcomes.items() if {"failure", "error", "skipped"} & set(tags)}
    assert not not_passed, f"not passed: {not_passed}"
