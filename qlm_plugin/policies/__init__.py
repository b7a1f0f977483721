"""Scheduling policies: the registry of named policies, the baselines, and the fallbacks of the
policy hooks (the plugin manager registers ``defaults`` and ``baselines`` first)."""

from __future__ import annotations

from qlm_plugin.policies.registry import PolicyContext, PolicyInfo, PolicyRegistry, UnknownPolicyError

__all__ = ["PolicyContext", "PolicyInfo", "PolicyRegistry", "UnknownPolicyError"]
