"""The brain inside vLLM's scheduler, through the hooks: a thin adapter between vLLM's request objects
and the roles the simulator and the coordinator run (:mod:`qlm_plugin.brain.local_policy`, the online
length predictor), called through the engine's own plugin manager.

The manager is built in the engine process as everywhere else (built-in plugins, then the ``qlm``
entry-point group, honouring ``QLM_PLUGINS`` and ``QLM_DISABLE_PLUGIN_AUTOLOAD``), with the engine's
roles registered before the third-party plugins, so a user's ``qlm_rank_key`` or
``qlm_predict_output_length`` overrides them. The predictor learns from the engine's own finished
requests (``qlm_request_finished``); until it is warm for a request's class, the coordinator's
prediction sent with the request (``qlm_predicted_tokens``, ``qlm_predicted_q90``) stands in.

Imports nothing from vLLM: tested on plain request objects with a fake clock. Thread safety: none;
the scheduler's thread calls it.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any, Protocol

from qlm_plugin.adapters.vllm.fields import QLMFields
from qlm_plugin.brain.local_policy import LocalPolicy, Rank, SeatEviction, before_first_token
from qlm_plugin.brain.predictor import SOURCE_BUCKET, SOURCE_CLASS, LengthPredictor, PredictorPlugin
from qlm_plugin.domain.distributions import LengthDistribution
from qlm_plugin.domain.instance import RunningView
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.hooks import get_plugin_manager, hookimpl

log = logging.getLogger("vllm.qlm_plugin")

#: How many requests a KV-pressure preemption may take in one step, chosen by ``qlm_select_victim``
#: one after the other; any further ones go least urgent first.
HOOK_VICTIMS = 2
_Z90 = 1.2815515655446004
#: The widest lognormal a hint gives (its 90th percentile 47 times its median): wider hints are
#: noise, and exp(sigma**2 / 2) overflows from sigma 37.
MAX_SIGMA = 3.0


class EngineRequest(Protocol):
    """What the adapter reads of a vLLM request."""

    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    max_tokens: int
    priority: int


class CoordinatorHint:
    """The coordinator's predicted length of a request (median and 90th percentile, sent with it),
    used while the engine's own predictor has too few finished requests of its class."""

    def __init__(self, predictor: LengthPredictor) -> None:
        self.predictor = predictor
        self.hints: dict[str, tuple[float, float]] = {}  # request id -> (median, q90)

    @hookimpl
    def qlm_predict_output_length(self, request: Request, generated_tokens: int) -> LengthDistribution | None:
        hint = self.hints.get(request.id)
        if hint is None or self.predictor.source(request, 0) in (SOURCE_BUCKET, SOURCE_CLASS):
            return None
        return hinted_length(hint[0], hint[1], generated_tokens, request.max_tokens)


def hinted_length(median: float, q90: float, generated: int, max_tokens: int) -> LengthDistribution:
    """A lognormal through the hint's median and 90th percentile, less what was generated, clipped to
    what is left of ``max_tokens``."""
    room = max(0, max_tokens - generated)
    if room == 0:
        return LengthDistribution.point(0.0)
    median = max(median, 1.0)
    sigma = min(max(math.log(max(q90, median) / median), 1e-3) / _Z90, MAX_SIGMA)
    mean = median * math.exp(sigma * sigma / 2)

    def left(x: float) -> float:
        return float(min(room, max(1.0, x - generated)))

    m = left(mean)
    spread = left(q90) - left(median)
    return LengthDistribution(
        m,
        (spread / _Z90) ** 2,
        ((0.5, left(median)), (0.9, left(q90)), (0.99, left(median * math.exp(2.326 * sigma)))),
    )


class EngineBrain:
    """The roles of one engine behind its plugin manager: ranks, seat evictions, KV victims, and
    learning from finished requests."""

    def __init__(
        self,
        model: str,
        instance_id: str,
        *,
        autoload: bool = True,
        plugins: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.model = model
        self.instance_id = instance_id
        self.predictor = LengthPredictor()
        self.policy = LocalPolicy()
        self.hint = CoordinatorHint(self.predictor)
        own = [
            ("qlm-engine-predictor", PredictorPlugin(self.predictor)),
            ("qlm-engine-policy", self.policy),
            ("qlm-engine-hint", self.hint),
            *plugins,
        ]
        self.pm = get_plugin_manager(autoload=autoload, plugins=own)
        self.hook = self.pm.hook
        self.hook.qlm_configure(pm=self.pm)
        self.failures: dict[str, int] = {}  # hook -> failures (the first one is logged)
        # the policy asks for lengths through a guard: a broken predictor gives its fallback length
        self.policy.qlm_configure(pm=SimpleNamespace(hook=_GuardedHooks(self)))
        self.requests: dict[str, Request] = {}
        self.fields: dict[str, QLMFields] = {}
        self.keys: dict[str, Hashable] = {}
        self.admitted_at: dict[str, float] = {}  # request id -> when first seen running (_views)
        # victims by the rank the engine's queue holds (a user's, and fixed at admission)
        self.policy.rank_of = lambda request: Rank(
            self.keys.get(request.id, (math.inf, request.arrival_time, request.id))
        )

    # ------------------------------------------------------------------ requests
    def admit(self, r: EngineRequest, fields: QLMFields, now: float) -> Hashable:
        """A request reached the engine: its QLM view, and its rank (kept for its whole life here:
        a preempted request keeps its place)."""
        request = Request(
            id=r.request_id,
            model=self.model,
            prompt_tokens=max(1, r.num_prompt_tokens),
            max_tokens=max(1, r.max_tokens),
            arrival_time=r.arrival_time,
            slo=SLO(fields.ttft_deadline, fields.e2e_deadline),
            slo_class=fields.slo_class or "default",
            priority=fields.priority,
            tenant=fields.tenant or "default",
        )
        self.requests[r.request_id] = request
        self.fields[r.request_id] = fields
        if fields.predicted_tokens is not None:
            q90 = fields.predicted_q90 if fields.predicted_q90 is not None else fields.predicted_tokens * 2
            self.hint.hints[r.request_id] = (fields.predicted_tokens, q90)
        self.call("qlm_request_queued", request=request, instance_id=self.instance_id, now=now)
        key: Hashable = self.call("qlm_rank_key", request=request, instance_id=self.instance_id, now=now)
        if key is None:  # a broken plugin (or none answered): arrival order
            key = (math.inf, r.arrival_time, r.request_id)
        self.keys[r.request_id] = key
        return key

    def key(self, r: EngineRequest) -> Hashable:
        key = self.keys.get(r.request_id)
        return key if key is not None else (math.inf, r.arrival_time, r.request_id)

    def finished(self, r: EngineRequest, completed: bool, now: float) -> None:
        """The request left the engine: the predictor learns its length if it completed."""
        request = self.requests.pop(r.request_id, None)
        self.fields.pop(r.request_id, None)
        self.keys.pop(r.request_id, None)
        self.admitted_at.pop(r.request_id, None)
        self.hint.hints.pop(r.request_id, None)
        if request is None:
            return
        outcome = RequestOutcome(
            request,
            Status.FINISHED if completed else Status.CANCELLED,
            instance_id=self.instance_id,
            finish_time=now,
            output_tokens=r.num_output_tokens,
        )
        if self.call("qlm_request_finished", outcome=outcome, now=now) is None:
            # a plugin raised (pluggy then runs no other): the engine's own roles forget it still
            self.policy.forget(r.request_id)
            self.predictor.forget(r.request_id)

    def call(self, name: str, **kwargs: Any) -> Any:
        """A hook call that never raises: a broken plugin must not take the engine down. It gives
        None (each caller's fallback); the first failure of each hook is logged, naming the plugin."""
        try:
            return getattr(self.hook, name)(**kwargs)
        except Exception as exc:
            n = self.failures[name] = self.failures.get(name, 0) + 1
            if n == 1:
                log.error(
                    "QLM: plugin %s failed in %s; falling back (logged once)",
                    _culprit(getattr(self.hook, name), exc),
                    name,
                    exc_info=exc,
                )
            return None

    def view(self, r: EngineRequest, admitted_at: float = 0.0) -> RunningView | None:
        request = self.requests.get(r.request_id)
        if request is None:
            return None
        return RunningView(request, r.num_output_tokens, r.num_computed_tokens, admitted_at)

    def _views(
        self, running: Iterable[EngineRequest], now: float
    ) -> tuple[list[RunningView], dict[str, Any]]:
        """The running requests as victim selection sees them. vLLM does not keep when a request was
        admitted, but keeps them in admission order (one resumed after a preemption goes last): a
        request's ``admitted_at`` is when this engine first saw it running, taken again when it
        shows up behind one seen later (it was admitted again)."""
        views, by_id = [], {}
        latest = -math.inf
        for r in running:
            if r.request_id not in self.requests:
                continue  # not admitted through this brain: none of its business
            at = self.admitted_at.get(r.request_id)
            if at is None or at < latest:
                at = self.admitted_at[r.request_id] = now
            latest = at
            v = self.view(r, at)
            assert v is not None
            views.append(v)
            by_id[r.request_id] = r
        return views, by_id

    def _select(self, now: float) -> Callable[[Sequence[RunningView]], RunningView | None]:
        def select(candidates: Sequence[RunningView]) -> RunningView | None:
            # None on failure: no seat eviction; under KV pressure, the least urgent first
            return self.call(  # type: ignore[no-any-return]
                "qlm_select_victim", candidates=candidates, instance_id=self.instance_id, now=now
            )

        return select

    # ------------------------------------------------------------------ preemption
    def seat_for(
        self,
        waiting: Sequence[EngineRequest],
        running: Sequence[EngineRequest],
        seats: int,
        now: float,
        given: Callable[[str], bool] = lambda request_id: False,
    ) -> tuple[Any, SeatEviction] | None:
        """The running request to preempt so that a waiting urgent request meets its TTFT when every
        seat is taken, or None (:meth:`LocalPolicy.seat_for`). ``waiting``: the first waiting
        requests in rank order; ``given``: whether a seat was freed for a request already."""
        queued = [
            q
            for r in waiting
            if r.num_output_tokens == 0
            and not given(r.request_id)
            and (q := self.requests.get(r.request_id)) is not None
        ]
        if not queued or all(q.slo.ttft_deadline is None for q in queued):
            return None
        views, by_id = self._views(running, now)

        def ranks_after(needy: Request, c: RunningView) -> bool:
            return Rank(self.keys.get(needy.id)) < Rank(self.keys.get(c.request.id))

        choice = self.policy.seat_for(queued, views, seats, now, self._select(now), ranks_after)
        if choice is None:
            return None
        return by_id[choice.victim.request.id], choice

    def kv_victim_order(self, running: Sequence[EngineRequest], now: float) -> list[Any]:
        """Running requests in the order KV pressure should preempt them: the first
        :data:`HOOK_VICTIMS` by ``qlm_select_victim``, then the least urgent first (an urgent request
        before its first token last)."""
        views, by_id = self._views(running, now)
        order: list[Any] = []
        select = self._select(now)
        for _ in range(min(HOOK_VICTIMS, len(views))):
            v = select(views)
            if v is None:
                break
            views.remove(v)
            order.append(by_id[v.request.id])
        # the rest as the rule orders them: the one served last first, an urgent request before its
        # first token after every other
        views.sort(
            key=lambda v: (not before_first_token(v), Rank(self.key(by_id[v.request.id]))), reverse=True
        )
        order.extend(by_id[v.request.id] for v in views)
        known = {r.request_id for r in order}
        order.extend(r for r in running if r.request_id not in known)  # not ours: last
        return order

    def observe_step(self, period_s: float, decode_tokens: int) -> None:
        self.policy.observe_step(period_s, decode_tokens)

    def observe_prefill(self, duration_s: float, prefill_tokens: int) -> None:
        self.policy.observe_prefill(duration_s, prefill_tokens)


class _GuardedHooks:
    """The plugin manager's hooks as :class:`LocalPolicy` sees them: through :meth:`EngineBrain.call`."""

    def __init__(self, brain: EngineBrain) -> None:
        self._brain = brain

    def __getattr__(self, name: str) -> Callable[..., Any]:
        call = functools.partial(self._brain.call, name)
        setattr(self, name, call)  # found directly from now on
        return call


def _culprit(hook: Any, exc: BaseException) -> str:
    """The name of the plugin whose implementation of ``hook`` raised ``exc`` ("?" if unknown)."""
    try:
        impls = {getattr(i.function, "__code__", None): i.plugin_name for i in hook.get_hookimpls()}
        tb = exc.__traceback__
        while tb is not None:
            name = impls.get(tb.tb_frame.f_code)
            if name is not None:
                return str(name)
            tb = tb.tb_next
    except Exception:  # only a name for the log
        pass
    return "?"


class RankedQueue:
    """vLLM's waiting queue (the ``RequestQueue`` interface), ordered by the ``qlm_rank_key`` each
    request got when it reached the engine; a preempted request goes back with the rank it had.
    Ties: first come first served. A request is in the queue at most once (as in vLLM). Removal is
    lazy: its entry stays in the heap until it comes up (rebuilding the heap took 8 ms per abort at
    20,000 waiting). ``flag``: the requests to count (:attr:`flagged`), decided as each is added."""

    def __init__(self, rank: Callable[[Any], Hashable], flag: Callable[[Any], bool] | None = None) -> None:
        self._rank = rank
        self._flag = flag
        self._heap: list[tuple[Rank, int, Any]] = []
        self._live: dict[int, tuple[int, bool]] = {}  # id(request) -> (its entry's seq, flagged)
        self._seq = itertools.count()
        self.flagged = 0

    def _alive(self, entry: tuple[Rank, int, Any]) -> bool:
        live = self._live.get(id(entry[2]))
        return live is not None and live[0] == entry[1]

    def _prune(self) -> None:
        while self._heap and not self._alive(self._heap[0]):
            heapq.heappop(self._heap)

    def add_request(self, request: Any) -> None:
        seq = next(self._seq)
        flag = bool(self._flag(request)) if self._flag is not None else False
        old = self._live.get(id(request))
        if old is not None:  # not vLLM's way; its entry goes
            self.flagged -= old[1]
        self._live[id(request)] = (seq, flag)
        self.flagged += flag
        heapq.heappush(self._heap, (Rank(self._rank(request)), seq, request))

    def pop_request(self) -> Any:
        self._prune()
        if not self._heap:
            raise IndexError("pop from empty queue")
        request = heapq.heappop(self._heap)[2]
        self.flagged -= self._live.pop(id(request))[1]
        return request

    def peek_request(self) -> Any:
        self._prune()
        if not self._heap:
            raise IndexError("peek from empty queue")
        return self._heap[0][2]

    def prepend_request(self, request: Any) -> None:
        self.add_request(request)  # its rank decides, as in vLLM's priority queue

    def prepend_requests(self, requests: Iterable[Any]) -> None:
        for r in requests:
            self.add_request(r)

    def remove_request(self, request: Any) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Any]) -> None:
        for r in requests:
            live = self._live.pop(id(r), None)
            if live is not None:
                self.flagged -= live[1]
        if len(self._heap) > 2 * len(self._live) + 64:  # mostly dead entries: rebuild
            self._heap = [e for e in self._heap if self._alive(e)]
            heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Any]:
        return (e[2] for e in sorted(e for e in self._heap if self._alive(e)))

    def first(
        self, count: int, where: Callable[[Any], bool] | None = None, scan: int | None = None
    ) -> list[Any]:
        """The first ``count`` requests in rank order that ``where`` accepts (looking at ``scan`` at
        most), walking the heap: O(count log count), not O(n)."""
        found: list[Any] = []
        frontier = [(self._heap[0], 0)] if self._heap else []
        left = len(self._heap) if scan is None else scan
        while frontier and len(found) < count and left > 0:
            entry, i = heapq.heappop(frontier)
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(self._heap):
                    heapq.heappush(frontier, (self._heap[child], child))
            if self._alive(entry):
                left -= 1
                if where is None or where(entry[2]):
                    found.append(entry[2])
        return found
