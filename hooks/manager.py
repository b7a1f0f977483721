"""The plugin manager: hook specs, built-in plugins, and third-party plugins from entry points.

An installed adapter (an entry-point plugin that lists instances) is loaded into every run, but a
run serves with its instances only when it asks for it (``adapters=``, or ``QLM_ADAPTERS``): a
simulation or a coordinator must never hand work to engines that nothing in that run drives.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable

import pluggy

from qlm_plugin.domain.instance import InstanceInfo
from qlm_plugin.hooks import hookspecs
from qlm_plugin.hooks.guard import CHECKS as POLICY_HOOKS
from qlm_plugin.hooks.guard import Guard

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qlm"
#: Set to 1/true/yes to load no third-party plugin from entry points (built-ins still load).
DISABLE_AUTOLOAD_ENV = "QLM_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated allow-list of entry-point names to load (unset: all).
PLUGINS_ALLOWLIST_ENV = "QLM_PLUGINS"
#: Comma-separated entry-point names of installed adapters whose instances the run serves with.
ADAPTERS_ENV = "QLM_ADAPTERS"
#: The plugins every plugin manager registers before third-party ones: the fallbacks of the policy
#: hooks and the baseline policies. Named, not imported (as pytest names its own): they implement
#: these hooks, so the manager below them must not import them.
BUILTIN_PLUGINS = (
    ("qlm-defaults", "qlm_plugin.policies.defaults", "Defaults"),
    ("qlm-baselines", "qlm_plugin.policies.baselines", "BaselinePolicies"),
)


#: The name a run's own policy plugins are registered under: ``policy:NAME:N`` (the simulator's
#: and the coordinator's alike), so that other code can tell them from installed plugins.
POLICY_PREFIX = "policy:"
#: Entry points whose failure to load was logged (once per process, with its traceback: each plugin
#: manager loads them again, and a simulation of three policies has several).
_load_failures_logged: set[str] = set()


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager for project ``qlm``; it also knows which installed adapters the run
    leaves idle (their instances are not the run's), and guards the installed plugins' policy hooks
    (:mod:`.guard`)."""

    def __init__(self) -> None:
        super().__init__("qlm")
        self.idle_adapters: set[str] = set()
        self.guard = Guard()
        self._installed: set[int] = set()  # id() of the plugins registered from entry points

    def register_installed(self, plugin: object, name: str) -> None:
        """Register an entry-point plugin: its policy hooks are ``tryfirst`` (unless it marks them
        ``trylast``), so they come before the run's own policy, which is registered later, in every
        run (the simulator, the coordinator and the vLLM scheduler alike), and they are guarded."""
        self._installed.add(id(plugin))
        try:
            self.register(plugin, name=name)
        finally:
            self._installed.discard(id(plugin))
        self.guard.wrap(self, plugin)

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if (
            opts is not None
            and id(plugin) in self._installed
            and name in POLICY_HOOKS
            and not (opts.get("tryfirst") or opts.get("trylast"))
        ):
            opts = pluggy.HookimplOpts(**{**opts, "tryfirst": True})
        return opts


def list_instances(pm: pluggy.PluginManager) -> list[InstanceInfo]:
    """The instances a run serves with: what ``qlm_list_instances`` answers, except the instances
    of installed adapters the run did not ask for. Use this, not the hook, to discover instances."""
    idle = [pm.get_plugin(name) for name in getattr(pm, "idle_adapters", ())]
    idle = [plugin for plugin in idle if plugin is not None]
    caller = (
        pm.subset_hook_caller("qlm_list_instances", remove_plugins=idle)
        if idle
        else pm.hook.qlm_list_instances
    )
    return [info for listed in caller() for info in listed]


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks ``plugin`` implements that no spec declares (``optionalhook`` ones aside)."""
    return sorted(
        caller.name
        for caller in pm.get_hookcallers(plugin) or []
        if caller.spec is None
        and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
    )


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _names(value: str | None) -> set[str] | None:
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def load_entrypoint_plugins(pm: pluggy.PluginManager, adapters: Iterable[str] = ()) -> list[str]:
    """Register every plugin of the ``qlm`` entry-point group; return the names registered. An
    adapter among them that is not named in ``adapters`` (or ``QLM_ADAPTERS``) stays idle: see
    :func:`list_instances`.

    A plugin that fails to import or register is logged and skipped: one broken package must not
    take the scheduler down.
    """
    wanted = set(adapters) | (_names(os.environ.get(ADAPTERS_ENV)) or set())
    allow = _names(os.environ.get(PLUGINS_ALLOWLIST_ENV))
    loaded: list[str] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            log.debug("qlm plugin %s not in %s; skipped", ep.name, PLUGINS_ALLOWLIST_ENV)
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            if isinstance(plugin, type):  # the entry point names a class: its hooks are an instance's
                plugin = plugin()
            if isinstance(pm, PluginManager):
                pm.register_installed(plugin, ep.name)
            else:
                pm.register(plugin, name=ep.name)
            unknown = _unknown_hooks(pm, plugin)
            if unknown:  # a misspelled hook would never be called: say so, and load none of it
                pm.unregister(name=ep.name)
                first = ep.name not in _load_failures_logged
                _load_failures_logged.add(ep.name)
                log.log(
                    logging.ERROR if first else logging.DEBUG,
                    "qlm plugin %r (%s) implements hooks that do not exist: %s; skipped",
                    ep.name,
                    ep.value,
                    ", ".join(unknown),
                )
                continue
        except Exception:
            # pluggy may have registered some hookimpls before validation failed: take them all back.
            if pm.has_plugin(ep.name):
                pm.unregister(name=ep.name)
            first = ep.name not in _load_failures_logged
            _load_failures_logged.add(ep.name)
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "qlm plugin %r (%s) failed to load; skipped",
                ep.name,
                ep.value,
                exc_info=first,
            )
            continue
        loaded.append(ep.name)
        lists = any(impl.plugin is plugin for impl in pm.hook.qlm_list_instances.get_hookimpls())
        if lists and ep.name not in wanted and isinstance(pm, PluginManager):
            pm.idle_adapters.add(ep.name)
            log.debug(
                "qlm adapter %s is installed but not used here (%s=%s uses it)",
                ep.name,
                ADAPTERS_ENV,
                ep.name,
            )
    return loaded


def get_plugin_manager(
    *, autoload: bool = True, adapters: Iterable[str] = (), plugins: Iterable[tuple[str, object]] = ()
) -> PluginManager:
    """A new plugin manager with the hook specs and the built-in policy plugins registered.

    With ``autoload`` (and unless ``QLM_DISABLE_PLUGIN_AUTOLOAD`` is set), third-party plugins from
    the ``qlm`` entry-point group are registered too, after the built-ins, so their firstresult
    implementations take precedence. Installed adapters serve the run only if named in
    ``adapters`` or ``QLM_ADAPTERS``. ``plugins`` (name, plugin) are registered after the built-ins
    and before the third-party plugins, which so override them (an engine's own roles).
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name, module, factory in BUILTIN_PLUGINS:
        pm.register(getattr(importlib.import_module(module), factory)(), name=name)
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    if autoload and not _autoload_disabled():
        load_entrypoint_plugins(pm, adapters)
    return pm
