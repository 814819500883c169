"""``circuit-merge check RECIPE.yaml``: the preflight of a mergekit recipe.

Each problem a user met with mergekit's own late or vague errors is built here
and must be reported naming the model as listed, the tensor, the parameter and
the value; a good recipe passes with a summary (exit 0). Headers only, so no
merge runs; ``--scan-values`` reads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from circuit_merge_plugin.cli import main as cli
from circuit_merge_plugin.cli.check import check_recipe, resolve_setting


def bare(directory: Path, tensors: dict, config: dict = None) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def tensors(vocab: int = 10, hidden: int = 4) -> dict:
    return {
        "model.embed_tokens.weight": torch.zeros(vocab, hidden),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(hidden, hidden),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(hidden, hidden),
        "model.norm.weight": torch.ones(hidden),
    }


@pytest.fixture
def models(tmp_path):
    """A base and two variants of bare tensors (a config.json naming vocab_size)."""
    config = {"vocab_size": 10}
    return [bare(tmp_path / name, tensors(), config) for name in ("base", "v1", "v2")]


def recipe(tmp_path: Path, base: str, variants, parameters=None, per_model=None, **extra) -> str:
    data = {
        "merge_method": "circuit",
        "base_model": base,
        "models": [{"model": v, **({"parameters": per_model[i]} if per_model and per_model[i]
                                   else {})} for i, v in enumerate(variants)],
        **({"parameters": parameters} if parameters is not None else {}),
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def problems_of(path: str, **options):
    return check_recipe(path, **options).problems


def test_a_good_recipe_passes_with_a_summary(tmp_path, models, capsys):
    path = recipe(tmp_path, models[0], models[1:], {"temperature": 0.0, "seed": 1})
    with pytest.raises(SystemExit) as stop:
        cli.main(["check", path])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    assert f"V1       {models[1]}  (drop rate 0.5)" in out
    assert f"V2       {models[2]}  (drop rate 0.5)" in out  # two variants: max(i, 2)
    assert "4 tensor(s) to merge" in out and "from 3 model(s)" in out
    assert "not read (--scan-values" in out


def test_unknown_parameter_names_get_a_did_you_mean(tmp_path, models):
    path = recipe(tmp_path, models[0], models[1:], {"temprature": 0.5},
                  per_model=[{"dropp_rate": 0.2}, {"temperature": 0.3}])
    problems = problems_of(path)
    assert "parameters: unknown parameter 'temprature'; did you mean 'temperature'?" in problems
    assert any(p.startswith(f"model 1 {models[1]}: unknown parameter 'dropp_rate'; did you mean "
                            "'drop_rate'?") for p in problems), problems
    assert any(p.startswith(f"model 2 {models[2]}: 'temperature' is a global parameter")
               for p in problems), problems


def test_resolved_values_out_of_range_name_parameter_model_tensor_and_value(tmp_path, models):
    path = recipe(
        tmp_path, models[0], models[1:],
        {"temperature": [{"filter": "mlp", "value": 1.5}, {"value": 0.0}]},
        per_model=[{"drop_rate": [{"filter": "self_attn", "value": 1.2}, {"value": 0.1}]}, None],
    )
    problems = problems_of(path)
    assert any(p.startswith("temperature = 1.5 for tensor 'model.layers.0.mlp.up_proj.weight' "
                            "(all models) is out of range") for p in problems), problems
    assert any(p.startswith(f"drop_rate = 1.2 for tensor 'model.layers.0.self_attn.q_proj.weight'"
                            f" (model 1 {models[1]}) is out of range") for p in problems), problems
    assert len(problems) == 2  # the fallbacks (0.0, 0.1) are in range


def test_filters_resolve_as_mergekit_does():
    setting = [{"filter": "mlp", "value": 1}, {"filter": "*", "value": 2}, {"value": 3}]
    assert resolve_setting(setting, "model.layers.0.mlp.up_proj") == (True, [1])
    assert resolve_setting(setting, "model.norm.weight") == (True, [2])  # first match wins
    assert resolve_setting([{"filter": "mlp", "value": 1}], "model.norm") == (False, [])
    assert resolve_setting([0.1, 0.5], "x") == (True, [0.1, 0.5])  # a gradient: end points
    assert resolve_setting(0.25, "x") == (True, [0.25])


def test_paths_pickles_shapes_and_missing_tensors(tmp_path, models):
    hub_like = "org/model"  # mergekit would ask the hub
    path = recipe(tmp_path, models[0], [str(tmp_path / "nowhere"), hub_like])
    problems = problems_of(path)
    assert problems[0] == f"model 1 {tmp_path / 'nowhere'}: no such directory"
    assert problems[1].startswith("model 2 org/model: no such directory (mergekit would ask the "
                                  "Hugging Face hub")

    (tmp_path / "pt").mkdir()
    torch.save(tensors(), str(tmp_path / "pt" / "pytorch_model.bin"))
    path = recipe(tmp_path, models[0], [str(tmp_path / "pt")])
    [problem] = problems_of(path)
    assert "pickled" in problem and "check --allow-pickle" in problem
    assert problems_of(path, allow_pickle=True) == []

    wrong = tensors()
    wrong["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 6)
    del wrong["model.norm.weight"]
    bad = bare(tmp_path / "bad", wrong, {"vocab_size": 10})
    path = recipe(tmp_path, models[0], [models[1], bad])
    assert problems_of(path) == [
        f"shape mismatch in tensor 'model.layers.0.mlp.up_proj.weight': model 2 {bad} has [4, 6], "
        f"base model {models[0]} has [4, 4]",
        f"tensor 'model.norm.weight' is missing from model 2 {bad}",
    ]


def test_vocabulary_difference_advises_tokenizer_source_union(tmp_path, models):
    more = bare(tmp_path / "more", tensors(vocab=12), {"vocab_size": 12})
    path = recipe(tmp_path, models[0], [models[1], more])
    [problem] = problems_of(path)
    assert problem.startswith(f"vocabulary: model 2 {more} has 12 tokens, base model "
                              f"{models[0]} 10")
    assert "tokenizer_source: union" in problem
    path = recipe(tmp_path, models[0], [models[1], more], tokenizer_source="union")
    assert problems_of(path) == []


def test_scan_values_reports_nan_by_tensor_and_model(tmp_path, models, capsys):
    poisoned = tensors()
    poisoned["model.norm.weight"][2] = float("nan")
    bad = bare(tmp_path / "nan", poisoned)
    path = recipe(tmp_path, models[0], [models[1], bad])
    assert problems_of(path) == []  # headers only
    assert problems_of(path, scan=True) == [f"NaN in tensor 'model.norm.weight' of model 2 {bad}"]
    with pytest.raises(SystemExit) as stop:
        cli.main(["check", path, "--scan-values"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "1 problem(s)" in captured.out and "NaN in tensor 'model.norm.weight'" in captured.out
    assert captured.err.startswith("circuit-merge check: error: ")
    assert len(captured.err.strip().splitlines()) == 1


def test_slices_recipes_and_layer_ranges(tmp_path, llama_family):
    base, v1, v2 = (str(p) for p in (llama_family.base, *llama_family.variants[:2]))
    data = {
        "merge_method": "circuit",
        "base_model": base,
        "slices": [{"sources": [{"model": v1, "layer_range": [0, 2]},
                                {"model": v2, "layer_range": [0, 2],
                                 "parameters": {"drop_rate": 0.2}},
                                {"model": base, "layer_range": [0, 2]}],
                    "parameters": {"base_droprate": 0.3}}],
    }
    path = tmp_path / "slices.yaml"
    path.write_text(yaml.safe_dump(data))
    result = check_recipe(str(path))
    assert result.problems == []
    assert any(line.endswith(f"{v1}  (drop rate 0.3)") for line in result.summary), result.summary
    assert any(line.endswith(f"{v2}  (drop rate 0.2)") for line in result.summary), result.summary
    data["slices"][0]["sources"][0]["layer_range"] = [0, 3]
    data["slices"][0]["sources"][1]["layer_range"] = [0, 3]
    path.write_text(yaml.safe_dump(data))
    problems = check_recipe(str(path)).problems
    assert f"slice 1 source 1 {v1}: layer_range [0, 3] goes past its 2 layers" in problems
    assert any("layer_range lengths differ" in p for p in problems), problems


def test_not_a_circuit_recipe_and_unreadable_files(tmp_path, models, capsys):
    path = recipe(tmp_path, models[0], models[1:])
    text = Path(path).read_text().replace("merge_method: circuit", "merge_method: ties")
    Path(path).write_text(text)
    assert problems_of(path)[0].startswith("merge_method is 'ties', not 'circuit'")
    with pytest.raises(SystemExit) as stop:
        cli.main(["check", str(tmp_path / "none.yaml")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuit-merge check: error: ") and "none.yaml: cannot read" in err
