"""Scenario files: one YAML document that defines a simulation run (docs/scenarios.md).

Errors name the file, the line and the key: ``scenario.yaml:14: instances[0].gpu: unknown gpu 'h900'``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlm_plugin.domain.costmodel import BLOCK_SIZE, GPUS, CostModel, UnknownProfileError, cost_model
from qlm_plugin.domain.request import ModelSpec, SLOClass

DEFAULT_SCENARIO = "default_scenario.yaml"


#: The most instances one group of a scenario may have.
MAX_GROUP_COUNT = 4096


class ScenarioError(ValueError):
    """A scenario file is unreadable or invalid; the message names file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)


class SyntheticSpec(_Strict):
    rate_rps: float = Field(gt=0)
    duration_s: float = Field(gt=0)
    arrival: Literal["poisson", "gamma", "onoff"] = "poisson"
    cv: float = Field(default=1.0, gt=0)
    on_s: float = Field(default=10.0, gt=0)  # onoff: mean burst length
    off_s: float = Field(default=30.0, gt=0)  # onoff: mean quiet length
    off_rate_fraction: float = Field(default=0.1, ge=0, le=1)  # onoff: quiet rate / burst rate
    lengths_from: str | None = None  # resample prompt/output lengths from this trace (name or path)
    prompt_mean: float = Field(default=1024, gt=0)
    output_mean: float = Field(default=128, gt=0)
    length_sigma: float = Field(default=1.0, ge=0)  # log-sigma of the lognormal lengths

    @model_validator(mode="after")
    def _options_need_their_arrival(self) -> SyntheticSpec:
        if self.arrival != "gamma" and self.cv != 1.0:
            raise ValueError("cv applies to arrival: gamma only (Poisson arrivals have cv 1)")
        onoff = {"on_s", "off_s", "off_rate_fraction"} & self.model_fields_set
        if self.arrival != "onoff" and onoff:
            raise ValueError(f"{', '.join(sorted(onoff))} apply to arrival: onoff only")
        lognormal = {"length_sigma", "prompt_mean", "output_mean"} & self.model_fields_set
        if self.lengths_from is not None and lognormal:
            named = ", ".join(sorted(lognormal))
            raise ValueError(f"{named} apply to lognormal lengths, not with lengths_from")
        return self


class WorkloadSpec(_Strict):
    trace: str | None = (
        "conv"  # packaged sample name (conv, code) or a trace file's path (trace_files.SCHEMAS)
    )
    synthetic: SyntheticSpec | None = None
    rate_scale: float = Field(default=1.0, gt=0)
    target_rps: float | None = Field(default=None, gt=0)
    start_s: float = Field(default=0.0, ge=0)
    duration_s: float | None = Field(default=None, gt=0)
    sample_fraction: float | None = Field(default=None, gt=0, le=1)
    max_requests: int | None = Field(default=None, ge=1)
    max_tokens: int = Field(default=2048, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadSpec:
        if self.trace == "":  # it replayed the conversation sample, unsaid
            raise ValueError("trace is empty: name a trace file or 'conv'/'code' (or give 'synthetic')")
        if self.synthetic is not None and "trace" in self.model_fields_set and self.trace is not None:
            raise ValueError("give either 'trace' or 'synthetic', not both")
        if self.target_rps is not None and self.rate_scale != 1.0:
            raise ValueError("give either 'rate_scale' or 'target_rps', not both")
        return self


class ModelEntry(_Strict):
    name: str = Field(min_length=1)
    profile: str  # cost-model family, e.g. llama-3.1-8b
    share: float = Field(default=1.0, gt=0)
    context_len: int | None = Field(default=None, ge=2)
    # a folder or Hugging Face id (local files only) whose tokenizer counts this model's prompts at
    # the coordinator, chats through its chat template; default: estimated from their size
    tokenizer: str | None = None


class InstanceGroup(_Strict):
    name: str | None = None  # id prefix; default: the gpu name
    count: int = Field(default=1, ge=1, le=MAX_GROUP_COUNT)
    gpu: str
    models: list[str] = Field(min_length=1)  # first serves at start; the rest are warm in host memory
    host_mem_gb: float = Field(default=256.0, ge=0)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)


class ClassEntry(_Strict):
    name: str = Field(min_length=1)
    share: float = Field(gt=0)
    # at least a millisecond: a budget below one makes the deadline the arrival (every request refused)
    ttft_s: float | None = Field(default=None, ge=0.001)
    e2e_s: float | None = Field(default=None, ge=0.001)
    weight: float = Field(default=1.0, ge=0)
    priority: int = 0
    refuse_below_p_meet: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> ClassEntry:
        if self.ttft_s is not None and self.e2e_s is not None and self.e2e_s < self.ttft_s:
            raise ValueError("e2e_s is shorter than ttft_s")
        return self

    def slo_class(self) -> SLOClass:
        return SLOClass(
            self.name, self.ttft_s, self.e2e_s, self.weight, self.priority, self.refuse_below_p_meet
        )


class TenantEntry(_Strict):
    name: str = Field(min_length=1)
    share: float = Field(gt=0)


class EngineSpec(_Strict):
    preemption: Literal["recompute", "swap"] = "recompute"
    max_model_residency_s: float = Field(default=300.0, gt=0)
    min_model_residency_s: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _residency_order(self) -> EngineSpec:
        if self.min_model_residency_s > self.max_model_residency_s:
            raise ValueError("min_model_residency_s is longer than max_model_residency_s")
        return self


class Scenario(_Strict):
    name: str = "scenario"
    description: str = ""
    seed: int = 0
    workload: WorkloadSpec = WorkloadSpec()
    models: list[ModelEntry] = Field(min_length=1)
    instances: list[InstanceGroup] = Field(min_length=1)
    classes: list[ClassEntry] = Field(min_length=1)
    tenants: list[TenantEntry] = []
    engine: EngineSpec = EngineSpec()
    profiles: dict[str, dict[str, float]] = {}  # "model/gpu" -> cost-model field overrides
    source: str = Field(default="<memory>", exclude=True)

    # ---- derived views
    def model_specs(self) -> dict[str, ModelSpec]:
        return {
            m.name: ModelSpec(m.name, self._cost(m.name, self._any_gpu(m.name)).model.context_len)
            for m in self.models
        }

    def slo_classes(self) -> dict[str, SLOClass]:
        return {c.name: c.slo_class() for c in self.classes}

    def _any_gpu(self, model: str) -> str:
        for g in self.instances:
            if model in g.models:
                return g.gpu
        return self.instances[0].gpu

    def _cost(self, model: str, gpu: str) -> CostModel:
        entry = next(m for m in self.models if m.name == model)
        overrides: dict[str, Any] = dict(self.profiles.get(f"{entry.profile}/{gpu}", {}))
        overrides.update(self.profiles.get(f"{model}/{gpu}", {}))
        if entry.context_len is not None:
            overrides["context_len"] = entry.context_len
        return cost_model(entry.profile, gpu, overrides)

    def cost_models_for(self, gpu: str) -> dict[str, CostModel]:
        """Cost model of every model of the scenario on ``gpu`` (those with a known profile)."""
        out = {}
        for m in self.models:
            try:
                out[m.name] = self._cost(m.name, gpu)
            except (UnknownProfileError, ValueError):
                continue
        return out

    def reference_cost_models(self) -> dict[str, CostModel]:
        return {m.name: self._cost(m.name, self._any_gpu(m.name)) for m in self.models}

    def instance_ids(self) -> list[str]:
        return [f"{g.name or g.gpu}-{i}" for g in self.instances for i in range(g.count)]


# ------------------------------------------------------------------------------------------------
# Loading with line numbers


def _line_map(
    node: yaml.Node,
    path: tuple[Any, ...],
    out: dict[tuple[Any, ...], int],
    dupes: list[tuple[Any, ...]],
    within: frozenset[int] = frozenset(),
) -> None:
    """Raises :class:`yaml.YAMLError` for an alias inside the node it names (the value would be
    endless: validating it ended in a RecursionError traceback)."""
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in within:
        raise yaml.composer.ComposerError(
            None, None, "an alias names a node that holds it (the value would never end)", node.start_mark
        )
    within = within | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            if (*path, key) in out:
                dupes.append((*path, key))  # YAML would silently keep the last one
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), out, dupes, within)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out, dupes, within)


def duplicate_keys(text: str) -> list[tuple[int, str]]:
    """The keys a YAML text gives twice in one mapping (YAML keeps only the last): (line, key path)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return []
    lines: dict[tuple[Any, ...], int] = {}
    dupes: list[tuple[Any, ...]] = []
    _line_map(node, (), lines, dupes)
    given = set(dupes)  # a key under one given twice is no more than that one
    return [(lines[p], _fmt_path(p)) for p in dupes if not any(p[:n] in given for n in range(1, len(p)))]


def _fmt_path(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top>"


def _line_of(lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> int:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return 1


def _semantic_errors(sc: Scenario) -> list[tuple[tuple[Any, ...], str]]:
    errors: list[tuple[tuple[Any, ...], str]] = []
    names = [m.name for m in sc.models]
    for i, m in enumerate(sc.models):
        if names.count(m.name) > 1:
            errors.append((("models", i, "name"), f"duplicate model name {m.name!r}"))
    for i, c in enumerate(sc.classes):
        if [x.name for x in sc.classes].count(c.name) > 1:
            errors.append((("classes", i, "name"), f"duplicate class name {c.name!r}"))
    for i, t in enumerate(sc.tenants):
        if [x.name for x in sc.tenants].count(t.name) > 1:
            errors.append((("tenants", i, "name"), f"duplicate tenant name {t.name!r}"))
    for gi, g in enumerate(sc.instances):
        for mi, model in enumerate(g.models):
            if g.models.index(model) != mi:
                errors.append((("instances", gi, "models", mi), f"model {model!r} is listed twice"))
    for gi, g in enumerate(sc.instances):
        if g.gpu.lower() not in GPUS and not any(k.endswith(f"/{g.gpu}") for k in sc.profiles):
            errors.append(
                (("instances", gi, "gpu"), f"unknown gpu {g.gpu!r}; known: {', '.join(sorted(GPUS))}")
            )
            continue
        for mi, model in enumerate(g.models):
            if model not in names:
                errors.append(
                    (("instances", gi, "models", mi), f"unknown model {model!r}; models: {', '.join(names)}")
                )
                continue
            try:
                cost = sc._cost(model, g.gpu)
            except (UnknownProfileError, ValueError) as exc:
                errors.append((("instances", gi, "models", mi), str(exc)))
                continue
            if cost.kv_blocks * BLOCK_SIZE < cost.model.context_len:  # vLLM refuses to start so
                errors.append(
                    (
                        ("instances", gi, "models", mi),
                        f"{model} on {g.gpu}: a KV cache of {cost.kv_blocks * BLOCK_SIZE} tokens cannot "
                        f"hold one request of its context ({cost.model.context_len} tokens): lower the "
                        "model's context_len or raise the profile's kv_blocks",
                    )
                )
    served = {m for g in sc.instances for m in g.models}
    for i, m in enumerate(sc.models):
        if m.name not in served:
            errors.append((("models", i, "name"), f"model {m.name!r} is not on any instance's models list"))
    ids = sc.instance_ids()
    if len(set(ids)) != len(ids):
        errors.append((("instances",), "instance names collide; give each group a distinct 'name'"))
    known_models = {m.name for m in sc.models} | {m.profile for m in sc.models}
    known_gpus = {g.gpu for g in sc.instances}
    for key in sc.profiles:
        model, _, gpu = key.rpartition("/")  # a model's name may hold '/' (a Hugging Face id)
        if not model or not gpu:
            errors.append((("profiles", key), "profile keys are 'model/gpu', e.g. 'llama-3.1-8b/h100'"))
        elif model not in known_models or gpu not in known_gpus:
            errors.append(
                (
                    ("profiles", key),
                    f"matches no model and gpu of this scenario (models or profiles: "
                    f"{', '.join(sorted(known_models))}; gpus: {', '.join(sorted(known_gpus))})",
                )
            )
        else:  # a pair no instance runs: its values are checked here (an instance's, at the instance)
            entries = [m for m in sc.models if model in (m.name, m.profile)]
            if not any(m.name in g.models and g.gpu == gpu for m in entries for g in sc.instances):
                try:
                    sc._cost(entries[0].name, gpu)
                except (UnknownProfileError, ValueError) as exc:
                    errors.append((("profiles", key), str(exc)))
    return errors


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    """Parse and validate a scenario from YAML text; raise :class:`ScenarioError` on any problem."""
    lines: dict[tuple[Any, ...], int] = {}
    dupes: list[tuple[Any, ...]] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _line_map(node, (), lines, dupes)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}" if mark is not None else "?"
        raise ScenarioError(f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or node is None:
        raise ScenarioError(f"{source}:1: a scenario is a YAML mapping (models, instances, classes, ...)")
    if dupes:
        raise ScenarioError(
            "\n".join(
                f"{source}:{lines[p]}: {_fmt_path(p)}: key given twice (YAML keeps only the last)"
                for p in dupes
            )
        )
    try:
        scenario = Scenario.model_validate({**data, "source": source})
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            # For unknown keys pydantic reports the key itself; for others the field.
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{source}:{_line_of(lines, loc)}: {_fmt_path(loc)}: {msg}")
        raise ScenarioError("\n".join(msgs)) from None
    errors = _semantic_errors(scenario)
    if errors:
        raise ScenarioError(
            "\n".join(f"{source}:{_line_of(lines, p)}: {_fmt_path(p)}: {m}" for p, m in errors)
        )
    return scenario


def load_scenario(path: str | os.PathLike[str] | None = None) -> Scenario:
    """Load a scenario file; ``None`` loads the packaged default. Relative trace paths in the file
    are resolved against the file's folder."""
    if path is None:
        text = importlib.resources.files("qlm_plugin.data").joinpath(DEFAULT_SCENARIO).read_text()
        return parse_scenario(text, f"<packaged {DEFAULT_SCENARIO}>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read scenario: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{p}: cannot read scenario: not UTF-8 text (byte {exc.start})") from None
    scenario = parse_scenario(text, str(p))
    return _resolve_paths(scenario, p.parent)


def _resolve(path: str | None, base: Path) -> str | None:
    if not path or path in ("conv", "code") or Path(path).is_absolute():
        return path
    return str(base / path)


def _resolve_paths(scenario: Scenario, base: Path) -> Scenario:
    """Trace paths in a file are relative to the file's folder, not to the working folder."""
    w = scenario.workload
    update: dict[str, Any] = {"trace": _resolve(w.trace, base)}
    if w.synthetic is not None:
        update["synthetic"] = w.synthetic.model_copy(
            update={"lengths_from": _resolve(w.synthetic.lengths_from, base)}
        )
    return scenario.model_copy(update={"workload": w.model_copy(update=update)})
