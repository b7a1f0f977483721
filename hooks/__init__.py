"""Plugin system of qlm-plugin (installed as ``qlm_plugin.hooks``).

Write a plugin::

    from qlm_plugin.hooks import hookimpl

    class MyOrdering:
        @hookimpl
        def qlm_rank_key(self, request, instance_id, now):
            return (request.slo.first_deadline(), request.arrival_time)

and register it with ``get_plugin_manager().register(MyOrdering())``, or publish it through the
``qlm`` entry-point group. The hook specifications are in :mod:`qlm_plugin.hooks.hookspecs`.
"""

import pluggy

#: Marker for hook implementations.
hookimpl = pluggy.HookimplMarker("qlm")

from qlm_plugin.hooks.manager import (  # noqa: E402  (the marker must exist before built-ins import it)
    ADAPTERS_ENV,
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PLUGINS_ALLOWLIST_ENV,
    PluginManager,
    get_plugin_manager,
    list_instances,
)

__all__ = [
    "ADAPTERS_ENV",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ALLOWLIST_ENV",
    "PluginManager",
    "get_plugin_manager",
    "hookimpl",
    "list_instances",
]
