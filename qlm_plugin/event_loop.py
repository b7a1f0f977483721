"""The event loop of the product's long-running processes (the coordinator, instance agents):
uvloop where it is installed (a dependency on Linux and macOS), else asyncio's own.

``QLM_EVENT_LOOP=asyncio`` forces asyncio's loop (to compare, or to debug with asyncio's tools).
uvloop cuts the loop's own overhead (callbacks, selector, socket writes), which is a third of the
coordinator's CPU under front-door load (docs/coordinator.md, "Performance").
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_kind() -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` uses here."""
    asked = os.environ.get("QLM_EVENT_LOOP", "").strip().lower()
    if asked not in ("", "uvloop", "asyncio"):  # a typo ran uvloop, silently
        raise ValueError(f"QLM_EVENT_LOOP={asked!r}: expected uvloop or asyncio")
    if asked == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_kind` names."""
    try:
        kind = loop_kind()
    except ValueError:
        main.close()  # never run: no "coroutine was never awaited" warning after the error
        raise
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def freeze_startup_heap() -> None:
    """Once a server has started: collect, then move every object alive now (modules, config, the
    scenario, the servers) out of the garbage collector's view. The oldest generation's collections
    then walk only what was allocated since, which cut the front door's p99 at 1,000 req/s from
    74-189 ms to 35-40 ms (docs/coordinator.md, "Performance"). For the CLI's own processes only:
    it is process-wide."""
    gc.collect()
    gc.freeze()
