"""`merge_method: circuit` through the real, unmodified ``mergekit-yaml``.

These tests run under whichever mergekit the environment has (0.1.5 or 0.1.4):
the recipe language and the expected results are the same for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuit_merge_plugin.kernel import circuit_merge
from circuit_merge_plugin.params import CircuitParams
from conftest import load_tensors, run_mergekit_yaml

pytestmark = pytest.mark.slow


def recipe(family, parameters=None, model_parameters=None, **extra):
    models = []
    for index, path in enumerate(family.variants):
        entry = {"model": str(path)}
        if model_parameters and model_parameters.get(index) is not None:
            entry["parameters"] = model_parameters[index]
        models.append(entry)
    config = {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": models,
        "dtype": "float32",
    }
    if parameters is not None:
        config["parameters"] = parameters
    config.update(extra)
    return config


def expected_tensors(family, params_for, drop_rate=None):
    """Apply the kernel directly to every tensor of the family."""
    base = load_tensors(family.base)
    variants = [load_tensors(path) for path in family.variants]
    expected = {}
    for name, tensor in base.items():
        expected[name] = circuit_merge(
            tensor,
            [v[name] for v in variants],
            params_for(name),
            drop_rate=drop_rate,
            name=name,
        )
    return expected


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    mismatched = [
        name
        for name in expected
        if actual[name].dtype != expected[name].dtype
        or not torch.equal(actual[name], expected[name])
    ]
    assert not mismatched, f"tensors differ from the kernel: {mismatched[:5]}"


@pytest.mark.parametrize("family_name", ["llama_family", "qwen_family"])
def test_every_tensor_equals_the_kernel(request, tmp_path, family_name):
    family = request.getfixturevalue(family_name)
    parameters = {"temperature": 0.3, "base_droprate": 0.4, "epsilon": 0.2, "seed": 7}
    out = tmp_path / "merged"
    run_mergekit_yaml(recipe(family, parameters), out)
    params = CircuitParams(**parameters)
    assert_same_tensors(load_tensors(out), expected_tensors(family, lambda _: params))


def test_output_is_a_complete_model(llama_family, tmp_path):
    out = tmp_path / "merged"
    run_mergekit_yaml(recipe(llama_family, {"seed": 1}), out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").exists() or (out / "tokenizer.model").exists()
    card = (out / "README.md").read_text()
    assert "Circuit-Merge" in card
    assert "jsgreenawalt/ml-model-mergetools" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the quick brown fox", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


def test_all_drop_rates_zero_is_exact_sign_rule(llama_family, tmp_path):
    """Two variants, base_droprate 0: nothing random, the result is the sign rule."""
    family = type(llama_family)(base=llama_family.base, variants=llama_family.variants[:2])
    out = tmp_path / "merged"
    run_mergekit_yaml(recipe(family, {"base_droprate": 0.0, "seed": 3}), out)
    merged = load_tensors(out)
    base = load_tensors(family.base)
    high, low = (load_tensors(p) for p in family.variants)
    threshold = 2e-6
    for name in base:
        d_high = high[name] - base[name]
        d_low = low[name] - base[name]
        d_high = torch.where(d_high.abs() < threshold, 0.0, d_high)
        d_low = torch.where(d_low.abs() < threshold, 0.0, d_low)
        agree = (d_high != 0) & (d_low != 0) & ((d_high > 0) == (d_low > 0))
        delta = torch.where(d_high != 0, d_high, d_low)
        delta = torch.where(agree, (d_low + d_high) / 2, delta)
        assert torch.equal(merged[name], base[name] + delta), name


def test_random_seed_option_gives_determinism(llama_family, tmp_path):
    config = recipe(llama_family)  # no seed in the recipe
    outputs = {}
    for label, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / label
        run_mergekit_yaml(config, out, "--random-seed", str(seed))
        outputs[label] = load_tensors(out)
    assert_same_tensors(outputs["a"], outputs["b"])
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(outputs["a"][name], outputs["c"][name])
    # --random-seed 5 means seed 5: the kernel with seed=5 gives the same bytes.
    expected = expected_tensors(llama_family, lambda _: CircuitParams(seed=5))
    assert_same_tensors(outputs["a"], expected)


def test_recipe_seed_wins_over_random_seed(llama_family, tmp_path):
    config = recipe(llama_family, {"seed": 11})
    run_mergekit_yaml(config, tmp_path / "a", "--random-seed", "1")
    run_mergekit_yaml(config, tmp_path / "b", "--random-seed", "2")
    assert_same_tensors(load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b"))


def test_per_layer_and_per_model_parameters(llama_family, tmp_path):
    parameters = {
        "temperature": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}],
        "base_droprate": [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}],
        "rescale": [{"filter": "embed", "value": False}, {"value": True}],
        "seed": 9,
    }
    model_parameters = {0: {"drop_rate": 0.1}}
    out = tmp_path / "merged"
    run_mergekit_yaml(recipe(llama_family, parameters, model_parameters), out)

    def params_for(name):
        return CircuitParams(
            temperature=1.0 if "mlp" in name else 0.0,
            base_droprate=0.2 if "self_attn" in name else 0.6,
            rescale="embed" not in name,
            seed=9,
        )

    expected = expected_tensors(llama_family, params_for, drop_rate=[0.1, None, None])
    assert_same_tensors(load_tensors(out), expected)


def test_bf16_with_out_dtype(llama_family, tmp_path):
    config = recipe(llama_family, {"seed": 2})
    config["dtype"] = "bfloat16"
    config["out_dtype"] = "float16"
    out = tmp_path / "merged"
    run_mergekit_yaml(config, out)
    merged = load_tensors(out)
    assert {t.dtype for t in merged.values()} == {torch.float16}
    # The kernel sees bf16 inputs (mergekit's dtype) and its bf16 result is cast.
    base = {k: v.bfloat16() for k, v in load_tensors(llama_family.base).items()}
    variants = [
        {k: v.bfloat16() for k, v in load_tensors(p).items()} for p in llama_family.variants
    ]
    for name in ("model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
        want = circuit_merge(
            base[name], [v[name] for v in variants], CircuitParams(seed=2), name=name
        ).to(torch.float16)
        assert torch.equal(merged[name], want), name


@pytest.mark.parametrize(
    "parameters, per_model, needle",
    [
        ({"temperature": 1.5}, None, "temperature"),
        ({"meaningful_change_threshold": "lots"}, None, "meaningful_change_threshold"),
        ({}, {1: {"drop_rate": 2}}, "drop_rate"),
    ],
)
def test_bad_parameter_stops_the_merge(llama_family, tmp_path, parameters, per_model, needle):
    out = tmp_path / "merged"
    result = run_mergekit_yaml(recipe(llama_family, parameters, per_model), out, check=False)
    assert result.returncode != 0
    assert needle in result.stderr
    assert not list(out.glob("*.safetensors"))


def test_base_model_is_required(llama_family, tmp_path):
    config = recipe(llama_family, {"seed": 1})
    del config["base_model"]
    result = run_mergekit_yaml(config, tmp_path / "merged", check=False)
    assert result.returncode != 0
    assert "base" in result.stderr.lower()
