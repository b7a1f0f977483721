"""Run a command as the leader of its own process group, and take the whole group down with it.

    python -m qlm_plugin.deploy.process_group [--tied] -- COMMAND [ARGS...]

A vLLM OpenAI server starts its engine core and workers as child processes; a server that ends
alone (a crash, a signal to it only, its parent's death) can leave them running, holding their
memory (seen: every Ray actor killed in a test left an engine core of 2 GB behind). This leader
runs the command in its group (start it with ``start_new_session=True``), passes SIGTERM and
SIGINT on to the whole group, and when the command ends, for whatever reason, stops what is left
of the group (SIGTERM, then SIGKILL after ``GRACE_S``). ``--tied``: the leader also gets SIGTERM
when its own parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``). It exits with the
command's status.

The leader itself may be killed by SIGKILL (Ray kills a dead actor's child processes so): a guard
process in the group, tied to the leader, then stops the group in its place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from qlm_plugin.deploy.child_process import die_with_parent, python_command

#: How long the rest of the group has to stop after SIGTERM before it is killed, seconds.
GRACE_S = 20.0


def others(pgid: int) -> list[int]:
    """The live processes of group ``pgid`` other than this one (Linux ``/proc``)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM the group but this process, then SIGKILL what is left after ``grace_s``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while others(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in others(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def guard(pgid: int) -> int:
    """Wait for the leader to die (SIGUSR1, by ``PR_SET_PDEATHSIG``), then stop the group. A
    SIGTERM or SIGINT to the group is the leader's to handle: while it lives, it stops the group."""
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGUSR1)
    while not stopping:
        signal.pause()
    stop_group(pgid)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--guard"]:
        return guard(int(argv[1]))
    tied = argv[:1] == ["--tied"]
    if tied:
        argv = argv[1:]
        die_with_parent()
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(
            "usage: python -m qlm_plugin.deploy.process_group [--tied] -- COMMAND [ARGS...]", file=sys.stderr
        )
        return 2
    pgid = os.getpgid(0)
    watcher = subprocess.Popen(python_command("qlm_plugin.deploy.process_group", "--guard", str(pgid)))
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # the group, the command among it, gets it; this leader stops the rest once it ends
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.killpg(pgid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    watcher.kill()  # with the leader alive the guard has nothing to do (and ignores SIGTERM)
    watcher.wait()
    stop_group(pgid)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
