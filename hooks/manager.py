"""The plugin manager: hook specs, built-in plugins, and third-party plugins from entry points."""

from __future__ import annotations

import importlib.metadata
import logging
import os

import pluggy

from qlm_plugin.hooks import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qlm"
#: Set to 1/true/yes to load no third-party plugin from entry points (built-ins still load).
DISABLE_AUTOLOAD_ENV = "QLM_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated allow-list of entry-point names to load (unset: all).
PLUGINS_ALLOWLIST_ENV = "QLM_PLUGINS"


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def load_entrypoint_plugins(pm: pluggy.PluginManager) -> list[str]:
    """Register every plugin of the ``qlm`` entry-point group; return the names registered.

    A plugin that fails to import or register is logged and skipped: one broken package must not
    take the scheduler down.
    """
    allow_raw = os.environ.get(PLUGINS_ALLOWLIST_ENV)
    allow = None if allow_raw is None else {n.strip() for n in allow_raw.split(",") if n.strip()}
    loaded: list[str] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            log.debug("qlm plugin %s not in %s; skipped", ep.name, PLUGINS_ALLOWLIST_ENV)
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception:
            # pluggy may have registered some hookimpls before validation failed: take them all back.
            if pm.has_plugin(ep.name):
                pm.unregister(name=ep.name)
            log.exception("qlm plugin %r (%s) failed to load; skipped", ep.name, ep.value)
            continue
        loaded.append(ep.name)
    return loaded


def get_plugin_manager(*, autoload: bool = True) -> pluggy.PluginManager:
    """A new plugin manager with the hook specs and the built-in policy plugins registered.

    With ``autoload`` (and unless ``QLM_DISABLE_PLUGIN_AUTOLOAD`` is set), third-party plugins from
    the ``qlm`` entry-point group are registered too, after the built-ins, so their firstresult
    implementations take precedence.
    """
    from qlm_plugin.policies import builtin_plugins  # lazy: policies import the hookimpl marker

    pm = pluggy.PluginManager("qlm")
    pm.add_hookspecs(hookspecs)
    for name, plugin in builtin_plugins():
        pm.register(plugin, name=name)
    if autoload and not _autoload_disabled():
        load_entrypoint_plugins(pm)
    return pm
