"""ruff and mypy (strict) over the code, as configured in pyproject.toml.

mypy checks a staged copy of ``qlm_plugin`` (its ``hooks`` and ``adapters`` links followed), laid
out as the wheel lays it out.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


def test_ruff_is_clean() -> None:
    proc = subprocess.run(
        [_tool("ruff"), "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    _tool("mypy")
    stage = tmp_path / "qlm_plugin"
    ignore = shutil.ignore_patterns("__pycache__", "*.csv")
    shutil.copytree(ROOT / "qlm_plugin", stage, ignore=ignore)  # follows the hooks/adapters links
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "-p",
            "qlm_plugin",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout.replace(str(tmp_path) + "/", "") + proc.stderr
