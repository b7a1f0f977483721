"""Simulator backend: discrete-event simulation of continuous-batching engines (vLLM V1-like)."""

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.fleet import SimFleet
from qlm_plugin.adapters.sim.plugin import SimBackend

__all__ = ["SimBackend", "SimFleet", "SimInstance"]
