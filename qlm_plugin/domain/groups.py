"""Request groups and virtual queues (QLM).

A *request group* holds requests of one model and one SLO class whose first deadlines fall in the
same window; planning over groups instead of requests keeps the optimisation small. A *virtual
queue* is the ordered list of groups planned for one instance: its order is the execution order.

Not thread-safe: owned by the coordinator's event loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from qlm_plugin.domain.request import Request

#: Requests whose first deadlines are within this many seconds of each other may share a group.
DEFAULT_GROUP_WINDOW_S = 5.0

GroupKey = tuple[str, str, int]  # (model, slo class, deadline bucket); bucket -1: no deadline


def group_key(request: Request, window_s: float = DEFAULT_GROUP_WINDOW_S) -> GroupKey:
    deadline = request.slo.first_deadline()
    bucket = -1 if math.isinf(deadline) else int(deadline // window_s)
    return (request.model, request.slo_class, bucket)


@dataclass(slots=True)
class RequestGroup:
    """Requests of one model and SLO class with close deadlines, in first-deadline order."""

    key: GroupKey
    requests: list[Request] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.key[0]

    @property
    def slo_class(self) -> str:
        return self.key[1]

    @property
    def earliest_deadline(self) -> float:
        return min((r.slo.first_deadline() for r in self.requests), default=math.inf)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    def add(self, request: Request) -> None:
        # Insertion keeps deadline order; groups are small, so a linear scan from the back is cheap.
        deadline = request.slo.first_deadline()
        i = len(self.requests)
        while i > 0 and self.requests[i - 1].slo.first_deadline() > deadline:
            i -= 1
        self.requests.insert(i, request)

    def __len__(self) -> int:
        return len(self.requests)


class VirtualQueue:
    """The planned execution order of one instance: groups, each an ordered list of requests.

    New groups join at the end; :meth:`reorder` applies a planner's order. Pulling takes the first
    request of the first group.
    """

    def __init__(self, instance_id: str, window_s: float = DEFAULT_GROUP_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.instance_id = instance_id
        self.window_s = window_s
        self._groups: dict[GroupKey, RequestGroup] = {}  # insertion order is the queue order
        self._where: dict[str, GroupKey] = {}

    def add(self, request: Request) -> RequestGroup:
        if request.id in self._where:
            raise ValueError(f"request {request.id!r} is already in the virtual queue of {self.instance_id}")
        key = group_key(request, self.window_s)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = RequestGroup(key)
        group.add(request)
        self._where[request.id] = key
        return group

    def remove(self, request_id: str) -> Request:
        key = self._where.pop(request_id)  # KeyError names the id
        group = self._groups[key]
        for i, r in enumerate(group.requests):
            if r.id == request_id:
                del group.requests[i]
                break
        if not group.requests:
            del self._groups[key]
        return r

    def peek(self, model: str | None = None) -> Request | None:
        """The next request to pull (of ``model``, if given)."""
        for group in self._groups.values():
            if model is None or group.model == model:
                return group.requests[0]
        return None

    def pull(self, model: str | None = None) -> Request | None:
        request = self.peek(model)
        if request is not None:
            self.remove(request.id)
        return request

    def reorder(self, keys: Sequence[GroupKey]) -> None:
        """Put the groups in the order of ``keys``; groups not named keep their order, after them."""
        named = [k for k in keys if k in self._groups]
        if len(set(named)) != len(named):
            raise ValueError("reorder: a group key is named twice")
        rest = [k for k in self._groups if k not in set(named)]
        self._groups = {k: self._groups[k] for k in (*named, *rest)}

    @property
    def groups(self) -> list[RequestGroup]:
        return list(self._groups.values())

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._where

    def __iter__(self) -> Iterator[Request]:
        for group in self._groups.values():
            yield from group.requests

    def extend(self, requests: Iterable[Request]) -> None:
        for r in requests:
            self.add(r)
