"""How ``qlm serve --engine vllm`` reads its models and vLLM's arguments and builds the
coordinator's scenario (no engine started here: ``integration/test_serve_vllm.py`` starts them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlm_plugin.cli import build_parser
from qlm_plugin.coordinator.cli import cmd_serve
from qlm_plugin.deploy.vllm_fleet import (
    EngineModel,
    context_len,
    engine_flag,
    fleet_scenario,
    parse_models,
    strip_separator,
)
from qlm_plugin.workloads.scenario import load_scenario


def test_a_model_is_served_under_the_name_given_else_its_folder_name_else_its_id(tmp_path: Path) -> None:
    folder = tmp_path / "llama-3.1-8b-instruct"
    folder.mkdir()
    assert EngineModel.parse(f"chat={folder}") == EngineModel("chat", str(folder))
    assert EngineModel.parse(str(folder)) == EngineModel("llama-3.1-8b-instruct", str(folder))
    assert EngineModel.parse("meta-llama/Llama-3.1-8B") == EngineModel(
        "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"
    )
    with pytest.raises(ValueError, match="NAME=SOURCE"):
        EngineModel.parse("name=")
    with pytest.raises(ValueError, match="given twice"):
        parse_models(["a=/x", "a=/y"])


def test_vllm_arguments_follow_the_separator_and_their_flags_are_read_in_both_forms() -> None:
    args = strip_separator(["--", "--max-model-len", "4096", "--dtype=bfloat16"])
    assert args == ["--max-model-len", "4096", "--dtype=bfloat16"]
    assert engine_flag(args, "--max-model-len") == "4096"
    assert engine_flag(args, "--dtype") == "bfloat16"
    assert engine_flag(args, "--max-num-seqs") is None


def test_the_context_is_the_engines_limit_else_the_models_own(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    model = EngineModel("m", str(tmp_path))
    assert context_len(model, ["--max-model-len", "512"]) == 512
    assert context_len(model, []) == 2048
    assert context_len(EngineModel("hub", "org/not-a-folder"), []) is None
    with pytest.raises(ValueError, match="whole number"):
        context_len(model, ["--max-model-len", "4k"])


def test_the_scenario_serves_the_models_given_with_the_base_scenarios_classes(tmp_path: Path) -> None:
    base = load_scenario()
    models = [EngineModel("tiny-a", str(tmp_path)), EngineModel("tiny-b", str(tmp_path))]
    sc = fleet_scenario(models, 2, base, ["--max-model-len", "512"])
    assert [m.name for m in sc.models] == ["tiny-a", "tiny-b"]
    assert {m.profile for m in sc.models} == {base.models[0].profile}
    assert [(g.name, g.count, g.models) for g in sc.instances] == [
        ("tiny-a", 2, ["tiny-a"]),
        ("tiny-b", 2, ["tiny-b"]),
    ]
    assert sc.slo_classes() == base.slo_classes()
    assert {spec.context_len for spec in sc.model_specs().values()} == {512}


def test_serve_refuses_engine_arguments_without_an_engine_and_an_engine_without_a_model() -> None:
    parser = build_parser()
    with pytest.raises(ValueError, match="--engine vllm needs --model"):
        cmd_serve(parser.parse_args(["serve", "--engine", "vllm"]))
    with pytest.raises(ValueError, match="go with --engine vllm"):
        cmd_serve(parser.parse_args(["serve", "--model", "x"]))
    with pytest.raises(ValueError, match="--instances must be >= 1"):
        cmd_serve(parser.parse_args(["serve", "--engine", "vllm", "--model", "x", "--instances", "0"]))
    with pytest.raises(ValueError, match="--max-awake must be >= 1"):
        cmd_serve(parser.parse_args(["serve", "--engine", "vllm", "--model", "x", "--max-awake", "0"]))
    with pytest.raises(ValueError, match="--sleep-level goes with --max-awake"):
        cmd_serve(parser.parse_args(["serve", "--engine", "vllm", "--model", "x", "--sleep-level", "2"]))
    with pytest.raises(ValueError, match="local processes, not with --ray"):
        cmd_serve(
            parser.parse_args(["serve", "--engine", "vllm", "--model", "x", "--ray", "--max-awake", "2"])
        )


def test_a_cpu_engine_runs_its_model_in_the_engine_core_unless_told_otherwise() -> None:
    """No worker process (one import of torch and vLLM less per engine start), its threads all
    CPUs but one; an explicit ``VLLM_ENABLE_V1_MULTIPROCESSING`` keeps vLLM's own setup whole."""
    import os

    from qlm_plugin.adapters.vllm.launch import cpu_env

    env = cpu_env({"PATH": "/bin"})
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) - 1))
    assert cpu_env({"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    deployed = cpu_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert deployed["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and "OMP_NUM_THREADS" not in deployed
