"""`merge_method: circuit` under mergekit 0.1.4's MergeMethod/Task API (issue 5).

Selected by API: everything here skips when the installed mergekit is 0.1.5
(.ci/test runs the suite in both environments). The version-agnostic recipe
tests live in test_mergekit_plugin.py and run under 0.1.4 too; this file adds
what is specific to the 0.1.4 adapter: its real ``mergekit-yaml`` on generated
Llama and Qwen2 models with exact expectations (every drop rate 0), priority
recovered from the order of ``models:`` (base listed in the middle, or not at
all), mergekit 0.1.4's float-only recipe numbers (``rescale: false``, ``seed``),
dtype promotion and out_dtype, per-layer values, validation at planning time,
and the adapter's graph rules (optional weights, buffers) in process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from circuit_merge_plugin.kernel import circuit_merge
from circuit_merge_plugin.params import (
    GLOBAL_PARAMETERS,
    VARIANT_PARAMETERS,
    CircuitParams,
)
from conftest import load_tensors
from mergekit_runs import Runs, check

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _only_mergekit_014(api):
    if api != "0.1.4":
        pytest.skip(f"mergekit 0.1.4 API tests (installed mergekit has the {api} API)")


# ---------------------------------------------------------------------------
# The real mergekit-yaml: all merges start together (module fixture).

LLAMA_TEMPERATURE = [
    {"filter": "mlp", "value": 1.0},
    {"filter": "self_attn", "value": 0.5},
    {"value": 0.0},
]
LLAMA_THRESHOLD = [{"filter": "self_attn", "value": 0.005}, {"value": 1.0e-6}]


def llama_temperature(name):
    return 1.0 if "mlp" in name else 0.5 if "self_attn" in name else 0.0


def llama_threshold(name):
    return 0.005 if "self_attn" in name else 1.0e-6


def llama_recipe(family):
    """Per-layer values; base listed second; every variant's drop_rate 0."""
    v1, v2, v3 = (str(p) for p in family.variants)
    zero = {"drop_rate": 0.0}
    return {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": [
            {"model": v3, "parameters": zero},  # highest priority
            {"model": str(family.base)},
            {"model": v1, "parameters": zero},
            {"model": v2, "parameters": zero},  # lowest priority
        ],
        "parameters": {
            "temperature": LLAMA_TEMPERATURE,
            "meaningful_change_threshold": LLAMA_THRESHOLD,
            "rescale": False,
            "seed": 5,
        },
        "dtype": "float32",
        "tokenizer": {"source": "base"},
    }


def qwen_recipe(family):
    """temperature 1 + base_droprate 0: every computed drop rate is exactly 0."""
    v1, v2 = (str(p) for p in family.variants)
    return {
        "merge_method": "circuit",
        "base_model": str(family.base),  # not listed: mergekit appends it
        "models": [{"model": v2}, {"model": v1}],
        "parameters": {"temperature": 1.0, "base_droprate": 0.0},
        "dtype": "bfloat16",
        "out_dtype": "float32",
    }


def bad_recipe(family):
    """A value out of range for the mlp tensors only."""
    return {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": [{"model": str(p)} for p in family.variants],
        "parameters": {
            "base_droprate": [{"filter": "mlp", "value": 1.0}, {"value": 0.5}],
            "seed": 1,
        },
        "dtype": "float32",
    }


IMPORT_FIRST = """
import warnings
warnings.simplefilter("error", RuntimeWarning)
import circuit_merge_plugin.mergekit_014 as adapter
from mergekit import merge_methods
method = merge_methods.get("circuit")
assert isinstance(method, adapter.CircuitMerge014), method
print("registered", method.name())
"""


@pytest.fixture(scope="module")
def merges(api, request, tmp_path_factory):
    if api != "0.1.4":  # before the (session) model families are built
        pytest.skip("mergekit 0.1.4 only")
    llama_family = request.getfixturevalue("llama_family")
    qwen_family = request.getfixturevalue("qwen_family")
    root = tmp_path_factory.mktemp("mergekit014")
    runs = Runs()
    runs.mergekit_yaml("llama", BIN, llama_recipe(llama_family), root / "llama")
    runs.mergekit_yaml(
        "qwen", BIN, qwen_recipe(qwen_family), root / "qwen", "--random-seed", "7"
    )
    runs.mergekit_yaml("bad", BIN, bad_recipe(llama_family), root / "bad")
    runs.command("import_first", [sys.executable, "-c", IMPORT_FIRST], root)
    results = runs.wait()
    return root, results, llama_family, qwen_family


def assert_equal_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    bad = [
        name
        for name in expected
        if actual[name].dtype != expected[name].dtype
        or not torch.equal(actual[name], expected[name])
    ]
    assert not bad, f"{len(bad)} tensors differ from the kernel, e.g. {bad[:4]}"


def test_llama_exact_per_layer_and_priority_order(merges):
    root, results, llama_family, _ = merges
    check(results["llama"], "mergekit-yaml (llama)")
    merged = load_tensors(root / "llama")
    base = load_tensors(llama_family.base)
    v1, v2, v3 = (load_tensors(p) for p in llama_family.variants)

    def expected(name, variants):
        params = CircuitParams(
            temperature=llama_temperature(name),
            meaningful_change_threshold=llama_threshold(name),
            rescale=False,
            seed=5,
        )
        return circuit_merge(
            base[name],
            [v[name] for v in variants],
            params,
            drop_rate=[0.0] * len(variants),
            name=name,
        )

    # Priority = order of models: (the base's place in the list does not count).
    assert_equal_tensors(merged, {n: expected(n, (v3, v1, v2)) for n in base})
    # The expectation is sensitive to that order and to the per-layer values.
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged[name], expected(name, (v1, v2, v3)))
    attn = "model.layers.1.self_attn.q_proj.weight"
    plain = circuit_merge(
        base[attn],
        [v3[attn], v1[attn], v2[attn]],
        CircuitParams(seed=5, rescale=False),
        drop_rate=[0.0] * 3,
        name=attn,
    )
    assert not torch.equal(merged[attn], plain)
    assert (root / "llama" / "tokenizer.json").exists()
    assert "Circuit-Merge" in (root / "llama" / "README.md").read_text()


def test_qwen_exact_with_bf16_inputs_and_float32_output(merges):
    root, results, _, qwen_family = merges
    check(results["qwen"], "mergekit-yaml (qwen2)")
    merged = load_tensors(root / "qwen")
    assert {t.dtype for t in merged.values()} == {torch.float32}
    base = load_tensors(qwen_family.base)
    v1, v2 = (load_tensors(p) for p in qwen_family.variants)
    params = CircuitParams(temperature=1.0, base_droprate=0.0, seed=7)
    expected = {
        name: circuit_merge(
            base[name].bfloat16(),
            [v2[name].bfloat16(), v1[name].bfloat16()],
            params,
            name=name,
        ).float()
        for name in base
    }
    assert_equal_tensors(merged, expected)
    assert any(name.endswith(".bias") for name in merged)  # Qwen2's q/k/v biases


def test_bad_per_layer_value_stops_before_any_tensor(merges):
    root, results, _, _ = merges
    result = results["bad"]
    assert result.returncode != 0
    assert "base_droprate must be in [0, 1), got 1.0" in result.stderr
    assert "mlp" in result.stderr  # names the tensor it was resolved for
    assert not list((root / "bad").glob("*.safetensors"))


def test_importing_the_adapter_first_still_registers(merges):
    results = merges[1]
    check(results["import_first"], "import circuit_merge_plugin.mergekit_014 first")
    assert "registered circuit" in results["import_first"].stdout


# ---------------------------------------------------------------------------
# The adapter in process: registration, parameters, make_task, execute.


def adapter():
    from circuit_merge_plugin import mergekit_014

    return mergekit_014


def ref(path):
    from mergekit.common import ModelReference

    return ModelReference.model_validate(path)


BASE, A, B, C = (ref(p) for p in ("/m/base", "/m/a", "/m/b", "/m/c"))


def make_task(
    models=(A, BASE, B),
    parameters=None,
    model_parameters=None,
    base_model=BASE,
    name="model.layers.0.mlp.up_proj.weight",
    optional=False,
):
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap
    from mergekit.io.tasks import GatherTensors

    weight = WeightInfo(name=name, optional=optional)
    model_parameters = model_parameters or {}
    return adapter().CircuitMerge014().make_task(
        output_weight=weight,
        tensors=GatherTensors(weight_info=ImmutableMap(data={m: weight for m in models})),
        parameters=ImmutableMap(data=dict(parameters or {})),
        tensor_parameters=ImmutableMap(
            data={m: ImmutableMap(data=model_parameters.get(m, {})) for m in models}
        ),
        base_model=base_model,
    )


def test_registered_in_the_014_registry():
    from mergekit import merge_methods
    from mergekit.merge_methods.registry import REGISTERED_MERGE_METHODS

    method = merge_methods.get("circuit")
    assert isinstance(method, adapter().CircuitMerge014)
    assert REGISTERED_MERGE_METHODS["circuit"] is method
    assert method.pretty_name() == "Circuit-Merge"
    assert "ml-model-mergetools" in method.reference_url()

    from circuit_merge_plugin.methods import circuit_method

    assert isinstance(circuit_method(), adapter().CircuitMerge014)


def test_same_parameter_names_and_defaults():
    method = adapter().CircuitMerge014()
    assert [(p.name, p.default_value, p.required) for p in method.parameters()] == [
        (info.name, info.default, False) for info in GLOBAL_PARAMETERS
    ]
    assert [(p.name, p.default_value) for p in method.tensor_parameters()] == [
        (info.name, info.default) for info in VARIANT_PARAMETERS
    ]


def test_float_parsed_recipe_values():
    """0.1.4 reads recipe numbers (and true/false) as floats."""
    check_014 = adapter().check_014
    assert check_014("rescale", 1.0) is True
    assert check_014("rescale", 0.0) is False
    assert check_014("rescale", True) is True
    assert check_014("seed", 42.0) == 42 and isinstance(check_014("seed", 42.0), int)
    assert check_014("seed", float(2**53)) == 2**53
    assert check_014("seed", 2**60 + 1) == 2**60 + 1  # a real int is exact
    assert check_014("seed", None) is None
    with pytest.raises(ValueError, match="rescale must be true or false"):
        check_014("rescale", 0.5)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*53"):
        check_014("seed", float(2**60))
    with pytest.raises(ValueError, match="seed must be an integer"):
        check_014("seed", 1.5)


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", 1.5),
        ("temperature", -0.1),
        ("base_droprate", 1.0),
        ("meaningful_change_threshold", -1.0),
        ("epsilon", 1.0),
        ("rescale", 0.5),
        ("seed", 2.5),
    ],
)
def test_make_task_refuses_bad_global_values(name, value):
    info = {p.name: p for p in GLOBAL_PARAMETERS}[name]
    with pytest.raises(ValueError) as error:
        make_task(parameters={name: value})
    message = str(error.value)
    assert message.startswith(name)
    if info.kind is float:
        assert info.range_text in message
    assert "model.layers.0.mlp.up_proj.weight" in message


def test_make_task_refuses_bad_drop_rate_naming_the_model():
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\).*/m/b"):
        make_task(model_parameters={B: {"drop_rate": 1.0}})
    # The base's drop_rate is never used, so never checked (as in 0.1.5).
    make_task(model_parameters={BASE: {"drop_rate": 7.0}})


def test_make_task_needs_base_and_a_variant():
    with pytest.raises(ValueError, match="requires a base"):
        make_task(base_model=None)
    with pytest.raises(ValueError, match="non-base"):
        make_task(models=(BASE,))
    with pytest.raises(ValueError, match="Base input is not present"):
        make_task(models=(A, B))


def test_priority_is_the_listing_order_whatever_the_tensor_order():
    task = make_task(models=(B, BASE, A), model_parameters={A: {"drop_rate": 0.25}})
    assert task.model_order == (B, BASE, A)
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(64, 8, generator=g) for _ in range(3))
    result = task.execute(tensors={A: a, BASE: base, B: b})  # dict order differs
    expected = circuit_merge(
        base,
        [b, a],
        CircuitParams(seed=torch.initial_seed()),
        drop_rate=[None, 0.25],
        name="model.layers.0.mlp.up_proj.weight",
    )
    assert torch.equal(result, expected)


def test_seed_defaults_to_torch_initial_seed():
    task = make_task(models=(A, BASE))
    g = torch.Generator().manual_seed(1)
    base, a = (torch.randn(256, generator=g) for _ in range(2))
    original = torch.initial_seed()
    try:
        torch.manual_seed(123)
        first = task.execute(tensors={A: a, BASE: base})
        torch.manual_seed(124)
        second = task.execute(tensors={A: a, BASE: base})
        explicit = make_task(models=(A, BASE), parameters={"seed": 123.0})
        third = explicit.execute(tensors={A: a, BASE: base})
    finally:
        torch.manual_seed(original)
    assert not torch.equal(first, second)
    assert torch.equal(first, third)


def test_inputs_are_promoted_to_a_common_dtype():
    task = make_task(models=(A, BASE, B), parameters={"seed": 3})
    g = torch.Generator().manual_seed(2)
    base, a, b = (torch.randn(32, 4, generator=g) for _ in range(3))
    result = task.execute(tensors={BASE: base.bfloat16(), A: a, B: b.half()})
    assert result.dtype == torch.float32
    expected = circuit_merge(
        base.bfloat16().float(),
        [a, b.half().float()],
        CircuitParams(seed=3),
        name="model.layers.0.mlp.up_proj.weight",
    )
    assert torch.equal(result, expected)


def test_optional_weight_only_in_the_base_passes_through():
    task = make_task(name="lm_head.weight", optional=True, parameters={"seed": 1})
    base = torch.randn(8, 4)
    assert task.execute(tensors={BASE: base}) is base
    with pytest.raises(ValueError, match="Base input is not present"):
        task.execute(tensors={A: base, B: base})


def test_non_floating_buffers_are_copied_when_they_agree():
    task = make_task(name="model.rotary.buffer", parameters={"seed": 1})
    buffer = torch.arange(6)
    result = task.execute(tensors={BASE: buffer, A: buffer.clone(), B: buffer.clone()})
    assert torch.equal(result, buffer) and result.data_ptr() != buffer.data_ptr()
    with pytest.raises(ValueError, match="differs between inputs"):
        task.execute(tensors={BASE: buffer, A: buffer + 1, B: buffer})


def test_shape_mismatch_names_the_tensor():
    task = make_task(parameters={"seed": 1})
    with pytest.raises(ValueError, match="size mismatch for model.layers.0.mlp"):
        task.execute(tensors={BASE: torch.zeros(4), A: torch.zeros(5), B: torch.zeros(4)})
