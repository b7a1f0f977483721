"""Hook specifications: the contract between the core, policies and backends.

Implement any of these in a plugin with the public :data:`qlm_plugin.hooks.hookimpl` marker and
register the plugin through the ``qlm`` entry-point group (or ``PluginManager.register``).

Two families:

* **policy hooks** the core calls and users may override. For ``firstresult`` hooks the first
  answer other than ``None`` wins, asked in this order: installed plugins (the ``qlm`` entry-point
  group; their policy hooks are ``tryfirst`` unless marked ``trylast``; among them, the one
  registered last), then the run's policy (``--policies``, ``policy:`` in a config), then the
  built-in fallbacks (``trylast``). So an installed plugin applies in every run: the simulator, the
  coordinator and a vLLM engine alike. Its policy hooks are guarded (:mod:`.guard`): one that
  raises or answers what its contract rules out is logged once, naming it, and the next
  implementation answers; one that is slow is logged once, and its answer used;
* **backend hooks** an adapter implements for the instances it owns. They are ``firstresult``: an
  adapter returns ``None`` for an ``instance_id`` that is not its own, and the core asks the next one.

Hooks are called on the core's event loop (or the simulator's) unless a docstring says otherwise; an
implementation must not block it for long. Times are seconds on the caller's clock (``now``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from qlm_plugin.domain.distributions import LengthDistribution, WaitEstimate
    from qlm_plugin.domain.instance import (
        EvictMode,
        EvictResult,
        InstanceInfo,
        InstanceState,
        LoadResult,
        RunningView,
    )
    from qlm_plugin.domain.outcome import Admission, RequestOutcome
    from qlm_plugin.domain.plan import Plan
    from qlm_plugin.domain.request import Request
    from qlm_plugin.policies.registry import PolicyRegistry

_hookspec = pluggy.HookspecMarker("qlm")

# ---------------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------------


@_hookspec
def qlm_add_policies(registry: PolicyRegistry) -> None:
    """Add named scheduling policies (``qlm simulate --policies NAME``).

    Called each time the policy registry is built (``policy_registry(pm)``), after all plugins are
    registered.

    :param registry: call ``registry.add(name, factory, description)``; ``factory(ctx)`` returns a
        plugin object implementing policy hooks, registered for the runs that use that policy
        (``ctx``: a :class:`~qlm_plugin.policies.registry.PolicyContext`, the run's cost models, SLO
        classes and clock). A name already taken is a ``ValueError``.

    All implementations are called; results are ignored.
    """


@_hookspec
def qlm_configure(pm: pluggy.PluginManager) -> None:
    """All plugins are registered: plugins that call hooks themselves (a queue manager dispatching,
    a planner issuing LSOs) keep ``pm``.

    Called once by whatever drives the plugin manager (the simulator's driver, the coordinator),
    before the first request. All implementations are called; results are ignored.
    """


#: How often a driver calls :func:`qlm_tick`, seconds: the coordinator's timer and the simulator's
#: clock alike, so a simulated run plans when a real one does.
TICK_S = 0.25


@_hookspec
def qlm_tick(now: float) -> bool | None:
    """Periodic wake-up (the driver's timer, every :data:`TICK_S`): replan and run LSOs that no
    arrival or completion triggered, e.g. a model swap for requests already queued.

    :return: True while the plugin still holds work that needs time to pass (a driver with nothing
        else to do keeps ticking while any implementation says so).

    All implementations are called; the driver looks at every result.
    """


@_hookspec
def qlm_stats() -> dict[str, float] | None:
    """Counters and figures a plugin wants reported with a run (LSOs issued, estimator accuracy).

    All implementations are called; the driver merges the dictionaries.
    """


# ---------------------------------------------------------------------------------------------------
# Request lifecycle
# ---------------------------------------------------------------------------------------------------


@_hookspec(firstresult=True)
def qlm_submit(request: Request, now: float) -> Admission | None:
    """A validated request arrived; a queue manager takes it into the global queue.

    :return: the admission decision (accepted, with the estimate, and whether its SLO can be met);
        ``None`` when no queue manager is present: the caller then routes the request at once
        (:func:`qlm_choose_instance`, :func:`qlm_dispatch`), as engines behind a plain load
        balancer do.

    firstresult: the first non-None answer is used.
    """


@_hookspec
def qlm_instance_ready(instance_id: str, free_slots: int, now: float) -> None:
    """An instance can take ``free_slots`` more requests now (request pulling): a queue manager
    dispatches from that instance's virtual queue. Called by backends between engine steps.

    All implementations are called; results are ignored.
    """


@_hookspec
def qlm_request_queued(request: Request, instance_id: str | None, now: float) -> None:
    """A request entered an instance's waiting queue: called by the backend that accepted its
    dispatch (the simulator's, the coordinator's for remote instances, the vLLM scheduler's), once
    per attempt. ``instance_id`` is that instance (``None`` is reserved for a backend without
    instance queues).

    All implementations are called; results are ignored.
    """


@_hookspec
def qlm_request_finished(outcome: RequestOutcome, now: float) -> None:
    """A request ended (finished, rejected or cancelled); ``outcome`` holds its measured times.

    Predictors learn from this hook. All implementations are called; results are ignored.
    """


# ---------------------------------------------------------------------------------------------------
# Fleet membership
# ---------------------------------------------------------------------------------------------------


@_hookspec
def qlm_instance_joined(info: InstanceInfo, now: float) -> None:
    """An instance joined the fleet after start-up (the coordinator: it registered over gRPC).

    Called before any request is dispatched to it; its state is available through
    :func:`qlm_instance_state` from then on. A queue manager starts planning for it.

    All implementations are called; results are ignored.
    """


@_hookspec
def qlm_instance_left(instance_id: str, now: float) -> None:
    """An instance left the fleet: it stopped heartbeating, its connection broke, or it was removed.

    The requests dispatched to it and not finished are back in the caller's hands: a queue manager
    that tracks them puts them back in its global queue (same deadlines; they are dispatched again,
    elsewhere). Backend hooks are not called for ``instance_id`` any more.

    All implementations are called; results are ignored.
    """


@_hookspec
def qlm_operation_failed(
    instance_id: str, operation: str, model: str | None, request_id: str | None, error: str, now: float
) -> None:
    """A serving operation ordered on ``instance_id`` failed there (the engine refused it or could
    not carry it out): ``operation`` is ``evict`` or ``load_model``;
    ``model`` or ``request_id`` names what it was about.

    A queue manager acts on it: it plans nothing that depends on the operation having happened
    (after a failed load, the model's groups are placed elsewhere and the load is not ordered there
    again for a while), so no request waits for an operation that will not happen.

    All implementations are called; results are ignored.
    """


# ---------------------------------------------------------------------------------------------------
# Policy hooks
# ---------------------------------------------------------------------------------------------------


@_hookspec(firstresult=True)
def qlm_predict_output_length(request: Request, generated_tokens: int) -> LengthDistribution | None:
    """Predict how many output tokens ``request`` still has to generate.

    Called when a request is queued, and again while it runs (``generated_tokens`` > 0) so a
    predictor can condition on progress.

    :return: a :class:`~qlm_plugin.domain.distributions.LengthDistribution` of the *remaining* tokens
        (never more than ``request.max_tokens - generated_tokens``).

    firstresult: the first non-None answer is used.
    """


@_hookspec(firstresult=True)
def qlm_estimate_wait(request: Request, now: float) -> WaitEstimate | None:
    """Estimate when ``request`` gets its first token and when it finishes, pooled over the instances
    that serve its model, behind the work queued ahead of it: the waiting-time estimator's role.

    Called on admission (the queue manager's own estimate goes through it, so a plugin replaces the
    estimator there) and by the coordinator for ``reject_if_late``.

    :return: a :class:`~qlm_plugin.domain.distributions.WaitEstimate` (times relative to ``now``)
        with the probability of meeting the request's SLOs; ``None`` if this plugin cannot estimate
        it (the next one is asked).

    firstresult: the first non-None answer is used.
    """


@_hookspec(firstresult=True)
def qlm_admit(request: Request, estimate: WaitEstimate, now: float) -> Admission | None:
    """Decide whether a new request is taken, given its waiting-time estimate: the admission role.

    Called once per arrival, after the estimate and before the request is queued: by a queue
    manager, and in a coordinator also by its front door, before the request is journaled, when a
    plugin other than the run's policy implements this hook (once accepted, a request is served).
    Not called where nothing estimates waits (no queue manager and no :func:`qlm_estimate_wait`).

    :return: an :class:`~qlm_plugin.domain.outcome.Admission`: ``accepted`` False refuses the
        request at once (with ``reason``; the front door answers 429/503 with the estimate);
        ``can_meet_slo`` False accepts it but flags it as unlikely to meet its SLO. ``None``: the
        queue manager's default (accept; flag below a 5% chance).

    firstresult: the first non-None answer is used.
    """


@_hookspec(firstresult=True)
def qlm_rank_key(request: Request, instance_id: str, now: float) -> Hashable | None:
    """The sort key that ranks ``request`` in a waiting queue: lower keys are served first.

    Called once each time a request enters a waiting queue (and, in the simulator, re-enters it
    after preemption); keys are not recomputed later. Keys computed at different ``now`` are
    compared with each other, so they must not drift with time (use absolute deadlines, not slack
    relative to ``now``). A key is a number, a string or a tuple of them (nested tuples too), not
    NaN, and all keys a plugin gives must compare with each other (one shape for every request:
    a plugin that answers ``None`` for some requests leaves them to the next implementation's
    keys, which must compare with its own). A coordinator sends a remote instance the key's leading
    numbers (the instance breaks ties by arrival).

    firstresult: the first non-None answer is used.
    """


@_hookspec(firstresult=True)
def qlm_select_victim(candidates: Sequence[RunningView], instance_id: str, now: float) -> RunningView | None:
    """Choose which running request to preempt when the instance runs out of KV cache, or, in a
    vLLM engine running QLM's scheduler, to free a seat for an urgent request that would miss its
    TTFT (each step under KV pressure, it is asked for the first few victims in order).

    Called by the engine, on the engine's clock: ``now`` and the candidates' times agree with each
    other, not necessarily with the coordinator's. An instance of ``qlm serve`` sees the request's
    SLO as deadlines on that clock, its class and priority; not the coordinator's rank.

    :param candidates: the running requests that may be preempted (never empty).
    :return: one element of ``candidates``.

    firstresult: the first non-None answer is used.
    """


@_hookspec(firstresult=True)
def qlm_choose_instance(request: Request, instances: Sequence[InstanceState], now: float) -> str | None:
    """Route ``request`` to one of ``instances`` (the healthy ones of the fleet).

    An instance that does not have the request's model loaded may be chosen if it can serve it
    (:meth:`InstanceState.can_serve`): the backend then loads it (a model swap) before serving.

    :return: an ``instance_id`` from ``instances``; ``None``: none of them can serve it now.

    firstresult: the first non-None answer is used.
    """


@_hookspec(firstresult=True)
def qlm_plan(queue: Sequence[Request], instances: Sequence[InstanceState], now: float) -> Plan | None:
    """Plan placement, order and serving operations for the global ``queue`` over ``instances``.

    Called on replanning events (arrival bursts, predicted SLO violations, instance changes).

    :return: a :class:`~qlm_plugin.domain.plan.Plan`; ``None`` keeps the current plan.

    firstresult: the first non-None answer is used.
    """


# ---------------------------------------------------------------------------------------------------
# Backend hooks (adapters)
# ---------------------------------------------------------------------------------------------------


@_hookspec
def qlm_list_instances() -> list[InstanceInfo]:  # type: ignore[empty-body]
    """The instances this adapter serves.

    All implementations are called; the core concatenates the lists. Instance ids are unique
    across adapters.
    """


@_hookspec(firstresult=True)
def qlm_instance_state(instance_id: str, detail: bool) -> InstanceState | None:
    """Report the state of ``instance_id``: models loaded and warm, queue and running counts, KV
    blocks used and free, recent step timings.

    :param detail: also fill the request-id tuples (costs a copy of the queues).
    :return: ``None`` if the instance is not this adapter's.

    firstresult: the adapter that owns ``instance_id`` answers; the others return None.
    """


@_hookspec(firstresult=True)
def qlm_dispatch(instance_id: str, request: Request) -> bool | None:
    """Hand ``request`` to ``instance_id`` to serve; the instance queues it in its own waiting queue.

    :return: True when accepted; False when the instance refuses it (full, draining, dead);
        ``None`` if the instance is not this adapter's.

    firstresult: the adapter that owns ``instance_id`` answers; the others return None.
    """


@_hookspec(firstresult=True)
def qlm_evict(
    instance_id: str, request_id: str, mode: EvictMode, for_request_id: str | None
) -> EvictResult | None:
    """Preempt a running request at the next step boundary.

    ``mode`` ``swap`` keeps its KV cache in host memory (the request resumes from it when a seat
    frees, before the requests queued after it); ``recompute`` drops it and requeues the request,
    which re-prefills its prompt and the tokens generated so far. An adapter without a host KV tier
    answers a swap with a recompute and says so in the result's ``mode``. ``for_request_id`` names
    the urgent request the seat is freed for (None: an operator's or a plan's eviction): an engine
    whose own policy already freed a seat for that request skips the order, so one urgent request
    costs one eviction.

    :return: what was done, or ``None`` if the instance is not this adapter's. Raises ``KeyError``
        if the request is not running there.

    firstresult: the adapter that owns ``instance_id`` answers; the others return None.
    """


@_hookspec(firstresult=True)
def qlm_load_model(instance_id: str, model: str, target: str) -> LoadResult | None:
    """Load ``model`` on ``instance_id``.

    :param target: ``"gpu"`` to serve it (from host memory when warm, else from disk; the model
        that was serving is unloaded, kept warm if host memory allows, once its running requests
        finish); ``"host"`` to stage its weights in host memory only (warm model start).
    :return: when it will be ready and whether the load is warm; ``None`` if the instance is not
        this adapter's.

    firstresult: the adapter that owns ``instance_id`` answers; the others return None.
    """
