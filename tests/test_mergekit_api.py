"""mergekit 0.1.5's in-memory API: merge_tensors and merge_state_dicts by name."""

from __future__ import annotations

import pytest
import torch

from circuit_merge_plugin.core.kernel import circuit_merge
from circuit_merge_plugin.core.params import CircuitParams


@pytest.fixture(autouse=True)
def needs_015(api):
    if api != "0.1.5":
        pytest.skip("merge_tensors/merge_state_dicts exist in mergekit 0.1.5 only")


def _tensors(seed=0, shape=(64, 32)):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.01 * torch.randn(shape, generator=generator) for _ in range(3)]


def test_merge_tensors_by_name_equals_kernel():
    from mergekit.merge_methods import merge_tensors

    base, variants = _tensors()
    merged = merge_tensors(
        [base, *variants],
        "circuit",
        base_index=0,
        name="w",
        parameters={"seed": 4, "temperature": 0.5, "drop_rate": [0.2, None, 0.7]},
    )
    want = circuit_merge(
        base, variants, CircuitParams(seed=4, temperature=0.5), drop_rate=[0.2, None, 0.7], name="w"
    )
    assert torch.equal(merged, want)


def test_merge_state_dicts_by_name_equals_kernel():
    from mergekit.merge_methods import merge_state_dicts

    base, variants = _tensors(1)
    step = torch.tensor([3], dtype=torch.int64)
    models = {"base": {"w": base, "step": step}}
    models.update({f"v{i}": {"w": v, "step": step} for i, v in enumerate(variants)})
    merged = merge_state_dicts(models, "circuit", base="base", parameters={"seed": 8})
    assert torch.equal(merged["step"], step)  # non-floating buffers are copied
    assert torch.equal(merged["w"], circuit_merge(base, variants, CircuitParams(seed=8), name="w"))


def test_invalid_parameter_names_it():
    from mergekit.merge_methods import merge_tensors

    base, variants = _tensors()
    with pytest.raises(Exception, match=r"temperature must be in \[0, 1\]"):
        merge_tensors([base, *variants], "circuit", base_index=0, parameters={"temperature": 2})
    with pytest.raises(Exception, match=r"drop_rate must be in \[0, 1\)"):
        merge_tensors([base, *variants], "circuit", base_index=0, parameters={"drop_rate": 1})


def test_base_is_required():
    from mergekit.merge_methods import merge_tensors

    base, variants = _tensors()
    with pytest.raises(ValueError, match="base"):
        merge_tensors([base, *variants], "circuit", parameters={"seed": 1})


def test_merge_tensors_needs_the_name_to_match_mergekit_yaml():
    """The random streams are keyed by tensor name: without ``name=`` the group
    has no name and the bytes differ from mergekit-yaml's merge of that tensor."""
    from mergekit.merge_methods import merge_tensors

    base, variants = _tensors(2)
    params = CircuitParams(seed=42)
    named = merge_tensors([base, *variants], "circuit", base_index=0,
                          parameters={"seed": 42}, name="model.w")
    unnamed = merge_tensors([base, *variants], "circuit", base_index=0, parameters={"seed": 42})
    assert torch.equal(named, circuit_merge(base, variants, params, name="model.w"))
    assert torch.equal(unnamed, circuit_merge(base, variants, params, name=""))
    assert not torch.equal(named, unnamed)
