"""The one-import-root layout: repo folders hooks/ and adapters/ install inside qlm_plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, prefix in (
        ("qlm_plugin", "qlm_plugin"),
        ("hooks", "qlm_plugin.hooks"),
        ("adapters", "qlm_plugin.adapters"),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([prefix, *rel.parts]) if rel.parts else prefix)
    return found


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    assert _packages_on_disk() == set(SETUPTOOLS["packages"])


def test_no_top_level_hooks_or_adapters_package() -> None:
    assert all(p == "qlm_plugin" or p.startswith("qlm_plugin.") for p in SETUPTOOLS["packages"])
    assert SETUPTOOLS["package-dir"] == {
        "qlm_plugin": "qlm_plugin",
        "qlm_plugin.hooks": "hooks",
        "qlm_plugin.adapters": "adapters",
    }


def test_extras_and_console_script() -> None:
    project = PYPROJECT["project"]
    assert {"vllm", "ray", "otel", "test"} <= set(project["optional-dependencies"])
    assert project["scripts"]["qlm"] == "qlm_plugin.cli:main"


def test_packaged_data_is_declared() -> None:
    data = SETUPTOOLS["package-data"]["qlm_plugin"]
    assert "py.typed" in data
    on_disk = {
        p.name for p in (ROOT / "qlm_plugin" / "data").iterdir() if p.suffix in (".csv", ".yaml", ".md")
    }
    assert {"azure_conv_sample.csv", "azure_code_sample.csv", "TRACES.md", "default_scenario.yaml"} <= on_disk
