"""`merge_method: circuit` under mergekit 0.1.4's MergeMethod/Task API.

Selected by API: everything here skips when the installed mergekit is 0.1.5
(.ci/test runs the suite in both environments). The real ``mergekit-yaml``
recipe cases live in test_mergekit_plugin.py and run under 0.1.4 too (exact
expectations with every drop rate 0, priority from the order of ``models:``
with the base listed in the middle, per-layer values, bf16 inputs, bad values
stopping at planning). This file adds what is specific to the 0.1.4 adapter, in
process: registration into the 0.1.4 registry, importing the adapter first,
mergekit 0.1.4's float-only recipe numbers (``rescale``, ``seed``), validation
at make_task time, dtype promotion, and the graph rules (optional weights,
buffers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from circuit_merge_plugin.core.kernel import circuit_merge
from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    OUTPUT_PARAMETERS,
    VARIANT_PARAMETERS,
    CircuitParams,
)
from mergekit_runs import Runs, check

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _only_mergekit_014(api):
    if api != "0.1.4":
        pytest.skip(f"mergekit 0.1.4 API tests (installed mergekit has the {api} API)")


# ---------------------------------------------------------------------------
# The real 0.1.4 mergekit-yaml runs the version-agnostic cases of
# tests/test_mergekit_plugin.py (the same file runs under both APIs); here
# only what is specific to the 0.1.4 adapter.

IMPORT_FIRST = """
import warnings
warnings.simplefilter("error", RuntimeWarning)
import circuit_merge_plugin.adapters.mergekit_014 as adapter
from mergekit import merge_methods
method = merge_methods.get("circuit")
assert isinstance(method, adapter.CircuitMerge014), method
print("registered", method.name())
"""


@pytest.fixture(scope="module")
def merges(api, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit014")
    runs = Runs()
    runs.command("import_first", [sys.executable, "-c", IMPORT_FIRST], root)
    return root, runs.wait()


@pytest.mark.slow
def test_importing_the_adapter_first_still_registers(merges):
    results = merges[1]
    check(results["import_first"], "import circuit_merge_plugin.adapters.mergekit_014 first")
    assert "registered circuit" in results["import_first"].stdout


# ---------------------------------------------------------------------------
# The adapter in process: registration, parameters, make_task, execute.


def adapter():
    from circuit_merge_plugin.adapters import mergekit_014

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

    from circuit_merge_plugin.adapters.methods import circuit_method

    assert isinstance(circuit_method(), adapter().CircuitMerge014)


def test_same_parameter_names_and_defaults():
    method = adapter().CircuitMerge014()
    assert [(p.name, p.default_value, p.required) for p in method.parameters()] == [
        (info.name, info.default, False) for info in GLOBAL_PARAMETERS + OUTPUT_PARAMETERS
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
    # report: a path, which a 0.1.4 recipe cannot hold; the error says what to do
    assert check_014("report", "out/r.json") == "out/r.json"
    assert check_014("report", None) is None
    with pytest.raises(ValueError, match="report must be a path, got 1.0.*CIRCUIT_MERGE_REPORT"):
        check_014("report", 1.0)


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
