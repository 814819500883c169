"""``lambda``: the scale of the merged delta, ``base + lambda * acc``.

The multiply is specified exactly: ``acc`` (the float32 merged delta) times
float32(lambda), in float32, then added to the base in float32 and rounded
once to the output dtype; lambda 1 skips it and gives the old bytes.
"""

from __future__ import annotations

import pytest
import torch

from circuit_merge_plugin import CircuitParams, circuit_merge, circuit_merge_with_stats
from circuit_merge_plugin.core.params import check_parameter, params_from_values

SETTINGS = [
    dict(seed=3),
    dict(seed=4, temperature=0.5, base_droprate=0.3, epsilon=0.2),
    dict(seed=5, temperature=1.0, rescale=False),
]


def _inputs(dtype=torch.float32, shape=(96, 50), count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    variants = [base + 0.02 * torch.randn(shape, generator=generator) for _ in range(count)]
    return base.to(dtype), [v.to(dtype) for v in variants]


def _acc(base, variants, params, name):
    """The float32 merged delta: the same merge on a zero base with the deltas as variants.

    The kernel's deltas are float32(V) - float32(B); on a zero base they are the
    variants themselves, with the same random streams and magnitude bounds.
    """
    deltas = [v.float() - base.float() for v in variants]
    zero = torch.zeros_like(deltas[0])
    return circuit_merge(zero, deltas, params, name=name)


def test_default_is_one_and_gives_the_old_bytes():
    assert CircuitParams().lambda_ == 1.0
    base, variants = _inputs()
    for setting in SETTINGS:
        plain = circuit_merge(base, variants, CircuitParams(**setting), name="w")
        one = circuit_merge(base, variants, CircuitParams(lambda_=1.0, **setting), name="w")
        assert torch.equal(plain.view(torch.int32), one.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.25, 0.4, 0.6, 1.5, 3.0])
def test_lambda_k_is_base_plus_k_times_acc_bit_for_bit(dtype, scale):
    base, variants = _inputs(dtype)
    for setting in SETTINGS:
        acc = _acc(base, variants, CircuitParams(**setting), "layers.0.w")
        k = torch.tensor(scale, dtype=torch.float32)
        want = (acc * k + base.float()).to(dtype)
        got = circuit_merge(base, variants, CircuitParams(lambda_=scale, **setting), name="layers.0.w")
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32)), setting


def test_counts_and_shares_do_not_depend_on_lambda():
    base, variants = _inputs()
    _, one = circuit_merge_with_stats(base, variants, CircuitParams(seed=2, temperature=0.5), name="w")
    merged, half = circuit_merge_with_stats(
        base, variants, CircuitParams(seed=2, temperature=0.5, lambda_=0.5), name="w")
    assert one.as_dict() == half.as_dict()
    assert torch.equal(merged, circuit_merge(
        base, variants, CircuitParams(seed=2, temperature=0.5, lambda_=0.5), name="w"))


@pytest.mark.parametrize("bad", [0, 0.0, -1, 10.5, float("nan"), float("inf"), "x", True])
def test_out_of_range_is_refused_naming_lambda(bad):
    with pytest.raises(ValueError, match=r"^lambda must be .*\(0, 10\]"):
        check_parameter("lambda", bad)


@pytest.mark.parametrize("good", [1e-6, 0.25, 1, "0.5", 10])
def test_in_range_is_accepted(good):
    assert check_parameter("lambda", good) == float(good)


def test_recipe_names_map_to_the_field():
    params = params_from_values({"lambda": 0.4, "seed": 1})
    assert params.lambda_ == 0.4
    assert params.as_dict()["lambda"] == 0.4 and "lambda_" not in params.as_dict()
    assert CircuitParams.from_parameters(params.as_dict()) == params


def test_merge_tensors_lambda_equals_kernel(api):
    if api != "0.1.5":
        pytest.skip("merge_tensors exists in mergekit 0.1.5 only")
    from mergekit.merge_methods import merge_tensors

    base, variants = _inputs()
    merged = merge_tensors([base, *variants], "circuit", base_index=0, name="w",
                           parameters={"seed": 4, "lambda": 0.5})
    assert torch.equal(merged, circuit_merge(base, variants, CircuitParams(seed=4, lambda_=0.5), name="w"))
    with pytest.raises(Exception, match=r"lambda must be in \(0, 10\]"):
        merge_tensors([base, *variants], "circuit", base_index=0, parameters={"lambda": 0})


# ------------------------------------------------ through the front ends (slow)

@pytest.mark.slow
def test_per_layer_lambda_through_mergekit_yaml_and_the_command(llama_family, tmp_path):
    """A per-layer ``lambda`` filter through mergekit-yaml, and ``--lambda`` / the
    original script's YAML ``parameters: {lambda: ...}`` through circuit-merge."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from conftest import load_tensors
    from mergekit_runs import Runs, check, subprocess_env

    bin_dir = Path(sys.executable).parent
    family = llama_family
    recipe = {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": [{"model": str(path)} for path in family.variants],
        "dtype": "float32",
        "parameters": {"seed": 3, "lambda": [{"filter": "mlp", "value": 0.5}, {"value": 0.8}]},
    }
    runs = Runs(max_parallel=2)
    runs.mergekit_yaml("per_layer", bin_dir, recipe, tmp_path / "per_layer")
    config = tmp_path / "original.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(family.base),
        "variant_models": [str(path) for path in family.variants],
        "output_dir": str(tmp_path / "config_out"),
        "parameters": {"seed": 3, "lambda": 0.8},
    }))
    runs.command("config", [bin_dir / "circuit-merge", "--config", config, "--quiet"], tmp_path)
    runs.command("flag", [bin_dir / "circuit-merge", str(family.base), *map(str, family.variants),
                          str(tmp_path / "flag_out"), "--seed", "3", "--lambda", "0.8", "--quiet"],
                 tmp_path)
    results = runs.wait()
    for label in ("per_layer", "config", "flag"):
        check(results[label], label)

    base = load_tensors(family.base)
    variants = [load_tensors(path) for path in family.variants]
    got = load_tensors(tmp_path / "per_layer")
    for name, tensor in base.items():
        scale = 0.5 if "mlp" in name else 0.8
        want = circuit_merge(tensor, [v[name] for v in variants],
                             CircuitParams(seed=3, lambda_=scale), name=name)
        assert torch.equal(got[name], want), name
    config_out, flag_out = load_tensors(tmp_path / "config_out"), load_tensors(tmp_path / "flag_out")
    for name, tensor in base.items():
        want = circuit_merge(tensor, [v[name] for v in variants],
                             CircuitParams(seed=3, lambda_=0.8), name=name)
        assert config_out[name].dtype == want.dtype and torch.equal(config_out[name], want), name
        assert torch.equal(flag_out[name], config_out[name]), name
    bad = subprocess.run(
        [bin_dir / "circuit-merge", str(family.base), str(family.variants[0]), str(tmp_path / "bad"),
         "--lambda", "0"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert bad.returncode == 2 and "lambda must be in (0, 10]" in bad.stderr
    assert not (tmp_path / "bad").exists()
