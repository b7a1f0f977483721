"""Simulator backend: discrete-event simulation of continuous-batching engines (vLLM V1-like)."""

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.fleet import SimFleet
from qlm_plugin.adapters.sim.plugin import SimBackend
from qlm_plugin.adapters.sim.realtime import Progress, RealtimeFleet, RealtimeSim, synthetic_text

__all__ = [
    "Progress",
    "RealtimeFleet",
    "RealtimeSim",
    "SimBackend",
    "SimFleet",
    "SimInstance",
    "synthetic_text",
]
