"""Scheduling policies: contracts, baselines, and the registry of named policies."""

from __future__ import annotations

from qlm_plugin.policies.registry import PolicyContext, PolicyInfo, PolicyRegistry, UnknownPolicyError


def builtin_plugins() -> list[tuple[str, object]]:
    """The plugins every plugin manager registers before third-party ones."""
    from qlm_plugin.policies.baselines import BaselinePolicies
    from qlm_plugin.policies.defaults import Defaults

    return [("qlm-defaults", Defaults()), ("qlm-baselines", BaselinePolicies())]


__all__ = ["PolicyContext", "PolicyInfo", "PolicyRegistry", "UnknownPolicyError", "builtin_plugins"]
