"""Worker processes for the tools' independent simulations (``qlm bench``, ``qlm plan-capacity``)."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor


def process_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` worker processes, forked while this process runs one thread (they start with
    everything imported). With other threads running (a pytest-xdist worker, a service that calls
    the tools) they come from a fork server instead: a child forked beside other threads can hang
    on a lock one of them held (a bench under pytest-xdist spun for minutes)."""
    method = "fork" if threading.active_count() == 1 else "forkserver"
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method))
