"""Installed plugins' policy hooks, guarded: one broken plugin must not stop a simulation, strand a
coordinator's request or kill an engine.

An implementation of a policy hook from an entry-point plugin that raises or answers something the
hook's contract rules out (a NaN rank key, a victim that is not a candidate, a length past
``max_tokens``, another request's admission...) is logged once per process, plugin and hook, naming
both, and its answer counts as ``None``: the core asks the next implementation (the run's policy,
then the built-in fallback). One that takes long is logged once too, and its answer used. The same
guard serves the simulator, the coordinator and the vLLM scheduler, since all three load plugins
through :func:`~.manager.get_plugin_manager`.

Built-in and policy plugins are not guarded: their errors are bugs the tests must see.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

log = logging.getLogger("qlm_plugin.hooks")

#: A call of one implementation longer than this is reported (the hooks run on the core's event
#: loop or the engine's step: a slow one delays every request), seconds.
SLOW_CALL_S = 0.1

Check = Callable[[Any, Mapping[str, Any]], str | None]

#: (plugin, hook) pairs whose dropped answer or slowness was logged: once per process, though each
#: run (a simulation of three policies, every engine of a fleet) builds plugin managers of its own.
_logged_dropped: set[tuple[str, str]] = set()
_logged_slow: set[tuple[str, str]] = set()


def reset_logged() -> None:
    """Log each broken or slow plugin again, as a new process would (tests)."""
    _logged_dropped.clear()
    _logged_slow.clear()


def _number(x: Any) -> bool:
    """A real number, not NaN: ``int``, ``float``, ``bool``, numpy's scalars, ``Fraction``..."""
    return isinstance(x, numbers.Real) and not math.isnan(x)


def _ordered(key: Any) -> bool:
    if isinstance(key, tuple):
        return bool(key) and all(_ordered(part) for part in key)
    return _number(key) or isinstance(key, str)


def _rank_key(key: Any, _: Mapping[str, Any]) -> str | None:
    if not _ordered(key):
        return (
            f"rank key {key!r}: not a real number (NaN is not ordered), a string or a non-empty tuple of them"
        )
    return None


def _victim(victim: Any, args: Mapping[str, Any]) -> str | None:
    if not any(victim is c for c in args["candidates"]):
        return f"victim {victim!r} is not one of the {len(args['candidates'])} candidates"
    return None


def _length(dist: Any, args: Mapping[str, Any]) -> str | None:
    from qlm_plugin.domain.distributions import LengthDistribution

    if not isinstance(dist, LengthDistribution):
        return f"{type(dist).__name__} is not a LengthDistribution"
    values = [dist.mean, dist.var, *(v for _, v in dist.quantiles)]
    if not all(_number(v) and math.isfinite(v) and v >= 0 for v in values):
        return f"{dist!r}: mean, variance and quantiles must be finite and not negative"
    left = max(0, args["request"].max_tokens - args["generated_tokens"])  # the tokens it may still make
    if dist.mean > left + 1e-6:
        return f"a mean of {dist.mean:g} tokens still to come, past the {left} that max_tokens leaves"
    return None


def _wait(estimate: Any, _: Mapping[str, Any]) -> str | None:
    from qlm_plugin.domain.distributions import WaitEstimate

    if not isinstance(estimate, WaitEstimate):
        return f"{type(estimate).__name__} is not a WaitEstimate"
    times = (estimate.wait_mean_s, estimate.wait_std_s, estimate.completion_mean_s, estimate.completion_std_s)
    if not all(_number(t) and t >= 0 for t in times):
        return f"{estimate!r}: times must be numbers, not negative"
    if not (_number(estimate.p_meet) and 0.0 <= estimate.p_meet <= 1.0):
        return f"p_meet {estimate.p_meet!r} is not a probability"
    return None


def _admission(admission: Any, args: Mapping[str, Any]) -> str | None:
    from qlm_plugin.domain.outcome import Admission

    if not isinstance(admission, Admission):
        return f"{type(admission).__name__} is not an Admission"
    if admission.request_id != args["request"].id:
        return f"an admission of request {admission.request_id!r}, asked about {args['request'].id!r}"
    if admission.p_meet is not None and not (_number(admission.p_meet) and 0.0 <= admission.p_meet <= 1.0):
        return f"p_meet {admission.p_meet!r} is not a probability"
    return None


def _instance(choice: Any, args: Mapping[str, Any]) -> str | None:
    ids = {s.instance_id for s in args["instances"]}
    if choice not in ids:
        return f"instance {choice!r} is not one of the {len(ids)} offered"
    return None


def _plan(plan: Any, _: Mapping[str, Any]) -> str | None:
    from qlm_plugin.domain.plan import Plan

    return None if isinstance(plan, Plan) else f"{type(plan).__name__} is not a Plan"


def _flag(value: Any, _: Mapping[str, Any]) -> str | None:
    return None if isinstance(value, bool) else f"{value!r} is not a bool"


def _stats(value: Any, _: Mapping[str, Any]) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and _number(v) for k, v in value.items()):
        return f"{value!r} is not a dict of names to numbers"
    return None


def _anything(value: Any, _: Mapping[str, Any]) -> str | None:
    return None


#: The policy hooks, and what each answer must be (None always passes: "no opinion").
CHECKS: dict[str, Check] = {
    "qlm_rank_key": _rank_key,
    "qlm_select_victim": _victim,
    "qlm_predict_output_length": _length,
    "qlm_estimate_wait": _wait,
    "qlm_admit": _admission,
    "qlm_submit": _admission,
    "qlm_choose_instance": _instance,
    "qlm_plan": _plan,
    "qlm_tick": _flag,
    "qlm_stats": _stats,
    # notifications: their results are ignored, but a raise must not stop the other plugins
    "qlm_instance_ready": _anything,
    "qlm_request_queued": _anything,
    "qlm_request_finished": _anything,
    "qlm_instance_joined": _anything,
    "qlm_instance_left": _anything,
    "qlm_operation_failed": _anything,
}


#: Hooks guarded but not policy hooks (their implementations keep their place in the call order).
GUARDED_TOO: dict[str, Check] = {
    # a plugin that raises while it configures is logged and the run goes on without it (inside
    # vLLM, it stopped the engine at start)
    "qlm_configure": _anything,
    # nor while it adds its policies (one that raised, or added a name already taken, stopped every
    # command: each builds the registry)
    "qlm_add_policies": _anything,
}


class Guard:
    """Wraps the policy hook implementations of plugins as they are registered; counts what it
    caught (``failures``: (plugin, hook) -> calls whose answer was dropped; ``slow``: those that
    took longer than :data:`SLOW_CALL_S` at least once, their answers used)."""

    def __init__(self) -> None:
        self.failures: dict[tuple[str, str], int] = {}
        self.slow: set[tuple[str, str]] = set()

    def wrap(self, pm: pluggy.PluginManager, plugin: object) -> None:
        for caller in pm.get_hookcallers(plugin) or []:
            check = CHECKS.get(caller.name) or GUARDED_TOO.get(caller.name)
            if check is None:
                continue
            spec = caller.spec.argnames if caller.spec is not None else None
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    # pluggy calls ``impl.function`` with ``impl.argnames``: the one
                    # per-implementation seam it has (the plugin object stays the user's, as
                    # ``get_plugin`` returns it). The guard takes every argument of the spec, so its
                    # check sees the call whole, and passes the implementation those it names (it
                    # may take a subset).
                    own = impl.argnames
                    impl.function = self._guarded(  # type: ignore[misc]
                        impl.plugin_name, caller.name, spec or own, own, impl.function, check
                    )
                    if spec is not None:
                        impl.argnames = spec  # type: ignore[misc]

    def _guarded(
        self,
        plugin: str,
        hook: str,
        argnames: tuple[str, ...],
        own: tuple[str, ...],
        function: Callable[..., Any],
        check: Check,
    ) -> Callable[..., Any]:
        pick = None if own == argnames else [argnames.index(name) for name in own]

        def call(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                result = function(*args) if pick is None else function(*(args[i] for i in pick))
            except Exception as exc:
                self._dropped(plugin, hook, f"raised {type(exc).__name__}: {exc}", exc)
                return None
            took = time.perf_counter() - started
            if took > SLOW_CALL_S:
                self._slow(plugin, hook, took)
            if result is None:
                return None
            try:
                problem = check(result, dict(zip(argnames, args, strict=True)))
            except Exception as exc:  # an answer odd enough to break the check is not one to use
                problem = f"{result!r}, which could not be checked ({type(exc).__name__}: {exc})"
            if problem is not None:
                self._dropped(plugin, hook, f"answered {problem}", None)
                return None
            return result

        return call

    def _dropped(self, plugin: str, hook: str, what: str, exc: Exception | None) -> None:
        key = (plugin, hook)
        self.failures[key] = self.failures.get(key, 0) + 1
        if key not in _logged_dropped:
            _logged_dropped.add(key)
            log.error(
                "qlm plugin %r %s in %s; its answer is ignored and the next implementation asked "
                "(logged once; %s)",
                plugin,
                what,
                hook,
                "QLM_DISABLE_PLUGIN_AUTOLOAD=1 or QLM_PLUGINS turns it off",
                exc_info=exc,
            )

    def _slow(self, plugin: str, hook: str, took: float) -> None:
        if (plugin, hook) in self.slow:
            return
        self.slow.add((plugin, hook))
        if (plugin, hook) in _logged_slow:
            return
        _logged_slow.add((plugin, hook))
        log.warning(
            "qlm plugin %r took %.3f s in %s (logged once; its answer is used): hooks run on the "
            "scheduler's loop, and every request waits meanwhile",
            plugin,
            took,
            hook,
        )
