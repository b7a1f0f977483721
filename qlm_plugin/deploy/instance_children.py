"""The simulated instances ``qlm serve`` runs as child processes.

Each runs in a session of its own, so a terminal's Ctrl-C reaches the coordinator alone, which
drains first (requests in flight finish on the instances) and then stops them; each is tied to
this process, so none outlives it, even after a SIGKILL; and one that dies is started again, with
backoff (an instance that crashes at once does not spin), and logged. Not thread-safe: the event
loop's thread owns it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from dataclasses import dataclass

from qlm_plugin.deploy.child_process import die_with_parent

log = logging.getLogger("qlm_plugin.deploy.instance_children")

#: Backoff between restarts of one instance: doubling from the first to the last, seconds.
FIRST_RESTART_S = 1.0
MAX_RESTART_S = 30.0
#: An instance that ran this long before it died starts again at once (its backoff resets).
STABLE_S = 60.0
#: How often the children are checked, seconds.
POLL_S = 0.5


@dataclass(slots=True)
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    started_at: float
    backoff_s: float = 0.0
    restart_at: float | None = None


class InstanceChildren:
    """``command`` plus ``--name NAME``, one child per name."""

    def __init__(self, command: list[str], names: list[str]) -> None:
        self.command = command
        self.names = names
        self.children: list[_Child] = []
        self.stopping = False

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        # die_with_parent runs in the child before exec: PR_SET_PDEATHSIG survives the exec
        return subprocess.Popen(
            [*self.command, "--name", name], start_new_session=True, preexec_fn=die_with_parent
        )

    def start(self) -> None:
        now = time.monotonic()
        self.children = [_Child(n, self._spawn(n), now) for n in self.names]

    async def supervise(self) -> None:
        """Start again each child that dies, until :meth:`stop`."""
        while not self.stopping:
            await asyncio.sleep(POLL_S)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        for child in self.children:
            if self.stopping:
                return
            status = child.proc.poll()
            if status is None:
                continue
            if child.restart_at is None:
                ran_s = now - child.started_at
                child.backoff_s = (
                    0.0
                    if ran_s >= STABLE_S
                    else min(MAX_RESTART_S, max(FIRST_RESTART_S, 2 * child.backoff_s))
                )
                child.restart_at = now + child.backoff_s
                log.warning(
                    "instance %s exited with status %s after %.0f s; starting it again in %.0f s",
                    child.name,
                    status,
                    ran_s,
                    child.backoff_s,
                )
            if now >= child.restart_at:
                child.proc, child.started_at, child.restart_at = self._spawn(child.name), now, None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to each child, SIGKILL to those still running after ``timeout_s``."""
        self.stopping = True
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
