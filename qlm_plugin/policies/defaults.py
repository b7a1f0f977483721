"""Fallback implementations of the policy hooks, used when no named policy or plugin answers.

All are ``trylast`` so any other plugin's implementation is asked first.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from qlm_plugin.domain.instance import InstanceState, RunningView
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl


class Defaults:
    @hookimpl(trylast=True)
    def qlm_rank_key(self, request: Request, instance_id: str, now: float) -> Hashable:
        return (request.arrival_time, request.id)

    @hookimpl(trylast=True)
    def qlm_select_victim(
        self, candidates: Sequence[RunningView], instance_id: str, now: float
    ) -> RunningView:
        return max(candidates, key=lambda c: (c.admitted_at, c.request.arrival_time, c.request.id))

    @hookimpl(trylast=True)
    def qlm_choose_instance(
        self, request: Request, instances: Sequence[InstanceState], now: float
    ) -> str | None:
        """Join the shortest queue (outstanding tokens) among instances serving the model, else among
        all (the chosen one swaps the model in)."""
        if not instances:
            return None
        serving = [
            i for i in instances if request.model in i.models_loaded or i.loading_model == request.model
        ]
        pool = serving or [i for i in instances if i.can_serve(request.model)]
        if not pool:
            return None
        return min(
            pool, key=lambda i: (i.queued_tokens, i.num_running + i.num_waiting, i.instance_id)
        ).instance_id
