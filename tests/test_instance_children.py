"""The simulated instances `qlm serve` runs as child processes: own session, restarted with
backoff when one dies, stopped with the serve, and never left behind by it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qlm_plugin.deploy import instance_children
from qlm_plugin.deploy.instance_children import InstanceChildren


def _wait(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    return proc.wait(timeout_s)


def test_a_child_that_dies_is_started_again_with_growing_backoff() -> None:
    children = InstanceChildren([sys.executable, "-c", "import sys; sys.exit(3)"], ["a"])
    children.start()
    try:
        child = children.children[0]
        assert os.getsid(child.proc.pid) != os.getsid(0), "a terminal's Ctrl-C must reach the serve alone"
        first = child.proc
        _wait(first)
        t0 = child.started_at
        children.check(t0 + 0.1)  # died at once: a restart in FIRST_RESTART_S
        assert child.proc is first and child.restart_at == t0 + 0.1 + instance_children.FIRST_RESTART_S
        children.check(t0 + 0.1 + instance_children.FIRST_RESTART_S)
        second = child.proc
        assert second is not first
        _wait(second)
        children.check(child.started_at + 0.1)
        assert child.backoff_s == 2 * instance_children.FIRST_RESTART_S  # it died at once again
    finally:
        children.stop(timeout_s=2)
    assert child.proc.poll() is not None


def test_stop_terminates_every_child_and_a_stopped_set_starts_nothing() -> None:
    children = InstanceChildren([sys.executable, "-c", "import time; time.sleep(60)"], ["a", "b"])
    children.start()
    children.stop(timeout_s=5)
    assert all(c.proc.returncode == -signal.SIGTERM for c in children.children)
    pids = [c.proc.pid for c in children.children]
    children.check(time.monotonic() + 3600)
    assert [c.proc.pid for c in children.children] == pids


def test_a_serve_killed_by_sigkill_leaves_no_instance_behind(tmp_path: Path) -> None:
    """The instances are tied to the serve: after its SIGKILL they stopped trying to reach a
    coordinator that was gone, and fought a restarted one for their ids."""
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys, time\n"
        "from qlm_plugin.deploy.instance_children import InstanceChildren\n"
        "c = InstanceChildren([sys.executable, '-c', 'import time; time.sleep(60)'], ['a'])\n"
        "c.start()\n"
        "print(c.children[0].proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    serve = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert serve.stdout is not None
    child_pid = int(serve.stdout.readline())
    serve.kill()
    serve.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child_pid}").exists():
        status = Path(f"/proc/{child_pid}/status").read_text() if Path(f"/proc/{child_pid}").exists() else ""
        if "State:\tZ" in status:  # ended, waiting for init to reap it
            break
        assert time.monotonic() < deadline, "the instance outlived the serve"
        time.sleep(0.05)
