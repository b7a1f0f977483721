"""The ``qlm`` policy and its ablations: QLM's brain with every part, or without one.

Each part named in :data:`PARTS` can be left out (``qlm-no-<part>``), so ``qlm bench --ablation``
measures what each one adds; the ``oracle`` reference is the whole brain fed true output lengths.
"""

from __future__ import annotations

from collections.abc import Iterable

from qlm_plugin.policies.registry import PolicyContext, PolicyRegistry

#: The parts of QLM's brain an ablation can leave out, and what is left without each.
PARTS: dict[str, str] = {
    "planner": "no global plan: placement by urgency only, engines swap models on their own rule",
    "eviction": "no eviction for urgent requests",
    "early-binding": "urgent requests wait in the global queue for a pull",
    "step-budget": "pulls bounded by seats and KV only, not by the engine's next step's token budget",
    "step-deadline": "prompts start together (pulled, or bound early)"
    " whatever their step does to their TTFT deadlines",
    "late-list": "requests past their deadline keep their place in urgency order",
    "predictor": "output length taken as max_tokens",
    "admission-estimate": "no waiting-time estimate at admission: no flag, refusal or eviction on arrival",
    "plan-on-arrival": "a request of a model no instance serves waits for the next tick's plan",
    "bind-waiting": "an arrival binds only itself early, not the request left waiting in the global queue",
    "give-up": "in overload, no model's work is given up for the arrivals expected over the next minute",
}


def build_qlm(ctx: PolicyContext, *, without: Iterable[str] = (), clairvoyant: bool = False) -> list[object]:
    """The plugins of QLM's brain for one run, without the parts named in ``without``."""
    from qlm_plugin.brain.admission import AdmissionControl
    from qlm_plugin.brain.planner import Planner
    from qlm_plugin.brain.predictor import LengthPredictor, PredictorPlugin
    from qlm_plugin.brain.queue_manager import QueueManager

    off = set(without)
    unknown = off - set(PARTS)
    if unknown:
        raise ValueError(f"unknown QLM parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
    qm = QueueManager(
        dict(ctx.cost_models),
        clairvoyant=clairvoyant,
        repredict_min_s=0.1 if ctx.wall_clock else 0.0,
        evict="eviction" not in off,
        early_binding="early-binding" not in off,
        late_list="late-list" not in off,
        step_budget="step-budget" not in off,
        step_deadline="step-deadline" not in off,
        length_prior="max_tokens" if "predictor" in off else "half",
        estimate_at_admission="admission-estimate" not in off,
        plan_on_arrival="plan-on-arrival" not in off,
        bind_waiting="bind-waiting" not in off,
        # On a wall clock (the coordinator) a refusal comes from the front door, before the request
        # is journaled (with this same qlm_admit): once accepted, it is never dropped.
        refuse_at_admission=not ctx.wall_clock,
    )
    plugins: list[object] = []
    if not clairvoyant and "predictor" not in off:
        plugins.append(PredictorPlugin(LengthPredictor()))
    plugins.append(qm)
    if "planner" not in off:
        plugins.append(Planner(qm.queue, qm.fleet, give_up="give-up" not in off))
    plugins.append(AdmissionControl(ctx.classes))
    return plugins


def build_engine_policy(ctx: PolicyContext) -> list[object]:
    """The roles vLLM's scheduler runs (:mod:`qlm_plugin.adapters.vllm.engine_brain`), without a
    queue manager: the simulator runs them in its engines as vLLM does."""
    from qlm_plugin.brain.local_policy import LocalPolicy
    from qlm_plugin.brain.predictor import LengthPredictor, PredictorPlugin

    return [PredictorPlugin(LengthPredictor()), LocalPolicy()]


def add_qlm_policies(registry: PolicyRegistry) -> None:
    registry.add("qlm", build_qlm, "QLM: global queue, predicted lengths, RWT estimates, planner, LSOs")
    registry.add(
        "oracle",
        lambda ctx: build_qlm(ctx, clairvoyant=True),
        "REFERENCE: the QLM planner fed true output lengths",
        reference=True,
    )
    registry.add(
        "qlm-engine",
        build_engine_policy,
        "QLM's engine-local roles alone (what runs inside vLLM without a coordinator): least laxity "
        "on predicted lengths, least-waste victims",
    )
    for part, what in PARTS.items():
        registry.add(
            f"qlm-no-{part}",
            lambda ctx, part=part: build_qlm(ctx, without=[part]),  # type: ignore[misc]
            f"ablation: QLM without its {part} ({what})",
            ablation=True,
        )
