"""Command lines for the Python child processes the product starts (simulated instances, vLLM
servers, load generators).

``python -m module`` puts the current folder first on ``sys.path``. Run inside a clone of this
repository next to a non-editable install, the child would import the source tree's
``qlm_plugin`` instead of the installed one, and the two may differ. A child started with
:func:`python_command` imports ``qlm_plugin`` from where its parent did.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
from pathlib import Path

import qlm_plugin

#: The folder the running ``qlm_plugin`` was imported from (site-packages, or a source checkout).
IMPORT_ROOT = str(Path(qlm_plugin.__file__).resolve().parent.parent)

# ``-c`` puts "" (the current folder) first on sys.path: replace it by the parent's import root,
# or drop it when that root is on the path already.
_BOOTSTRAP = (
    "import os, runpy, sys; root, module = sys.argv.pop(1), sys.argv.pop(1); "
    "on_path = root in {os.path.realpath(p) for p in sys.path[1:] if p}; "
    "sys.path[0:1] = [] if on_path else [root]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def python_command(module: str, *args: str) -> list[str]:
    """``[python, ...]`` running ``module`` as ``python -m module args`` would, with this process's
    interpreter and this process's ``qlm_plugin``."""
    return [sys.executable, "-c", _BOOTSTRAP, IMPORT_ROOT, module, *args]


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: send this process ``signum`` when its parent dies, even by SIGKILL (elsewhere:
    nothing). Call it first thing in a child, or as a ``Popen`` ``preexec_fn``."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a child to bind (another process may take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":  # a probe: where a child imports qlm_plugin from (integration/test_wheel.py)
    import json

    print(json.dumps([qlm_plugin.__file__, sys.path]))
