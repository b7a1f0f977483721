"""Request groups (QLM): requests of one model and one SLO class whose first deadlines fall in the
same window. Planning over groups instead of requests keeps the optimisation small; the global queue
keeps each group's totals (:class:`qlm_plugin.brain.global_queue.GroupAgg`), and a plan's virtual
queue of an instance is the ordered list of the groups placed there."""

from __future__ import annotations

import math

from qlm_plugin.domain.request import Request

#: Requests whose first deadlines are within this many seconds of each other may share a group.
DEFAULT_GROUP_WINDOW_S = 5.0

GroupKey = tuple[str, str, int]  # (model, slo class, deadline bucket); bucket -1: no deadline


def group_key(request: Request, window_s: float = DEFAULT_GROUP_WINDOW_S) -> GroupKey:
    deadline = request.slo.first_deadline()
    bucket = -1 if math.isinf(deadline) else int(deadline // window_s)
    return (request.model, request.slo_class, bucket)
