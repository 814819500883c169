"""Same recipe, same seed, same inputs: byte-identical tensors (and contribution
reports) under mergekit 0.1.4 and 0.1.5.

.ci/test runs the suite in both environments and sets CIRCUIT_OTHER_PYTHON to
the other environment's python; its ``mergekit-yaml`` sits next to it. This
test runs both console scripts (this environment's and the other's) on the same
stochastic recipes and compares every output tensor byte for byte. Without the
variable it skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuit_merge_plugin.core.kernel import circuit_merge
from circuit_merge_plugin.core.params import CircuitParams
from circuit_merge_plugin.insight.report import check_report, load_report
from conftest import load_tensors
from circuit_merge_plugin.core.exact import same_bytes
from mergekit_runs import Runs, check, subprocess_env

pytestmark = pytest.mark.slow

OTHER = os.environ.get("CIRCUIT_OTHER_PYTHON")


def mergekit_version(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
        timeout=120,
    ).stdout.strip()


def stochastic_llama(family):
    """Default drop rates (all > 0), per-layer epsilon, a drop_rate override,
    tokenizer from the base, float32, and no recipe seed (--random-seed)."""
    v1, v2, v3 = (str(p) for p in family.variants)
    return {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": [
            {"model": v2},
            {"model": v1, "parameters": {"drop_rate": 0.3}},
            {"model": v3},
        ],
        "parameters": {
            "temperature": 0.25,
            "epsilon": [{"filter": "mlp", "value": 0.3}, {"value": 0.1}],
        },
        "dtype": "float32",
        "tokenizer": {"source": "base"},
    }


def stochastic_qwen(family):
    """bfloat16 inputs, float16 output, recipe seed, base listed last."""
    v1, v2 = (str(p) for p in family.variants)
    return {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": [{"model": v1}, {"model": v2}, {"model": str(family.base)}],
        "parameters": {
            "base_droprate": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}],
            "rescale": True,
            "seed": 20260101,
        },
        "dtype": "bfloat16",
        "out_dtype": "float16",
    }


@pytest.mark.skipif(
    not OTHER,
    reason="CIRCUIT_OTHER_PYTHON is not set: it must point at the python of a venv "
    "with the other mergekit (0.1.4 vs 0.1.5); .ci/test sets it",
)
def test_byte_identical_across_mergekit_versions(llama_family, qwen_family, tmp_path):
    other_bin = Path(OTHER).parent
    assert (other_bin / "mergekit-yaml").exists(), (
        f"CIRCUIT_OTHER_PYTHON={OTHER}: no mergekit-yaml next to it"
    )
    here_bin = Path(sys.executable).parent
    versions = {"here": mergekit_version(Path(sys.executable)), "other": mergekit_version(Path(OTHER))}

    recipes = {
        "llama": (stochastic_llama(llama_family), ("--random-seed", "1234")),
        "qwen": (stochastic_qwen(qwen_family), ()),
    }
    runs = Runs()
    for side, bin_dir in (("here", here_bin), ("other", other_bin)):
        for name, (config, args) in recipes.items():
            runs.mergekit_yaml(
                f"{name}-{side}", bin_dir, config, tmp_path / side / name, *args,
                env={"CIRCUIT_MERGE_REPORT": str(tmp_path / side / f"{name}.report.json")},
            )
    results = runs.wait(timeout=1800)  # a busy 2-core machine takes minutes

    for name in recipes:
        for side in ("here", "other"):
            check(results[f"{name}-{side}"], f"mergekit {versions[side]} ({name})")
        here = load_tensors(tmp_path / "here" / name)
        other = load_tensors(tmp_path / "other" / name)
        assert sorted(here) == sorted(other), name
        different = [
            key
            for key in here
            if here[key].dtype != other[key].dtype
            or here[key].shape != other[key].shape
            or not same_bytes(here[key], other[key])
        ]
        assert not different, (
            f"{name}: mergekit {versions['here']} and {versions['other']} differ in "
            f"{len(different)} tensors, e.g. {different[:4]}"
        )
        if name == "qwen":
            assert {t.dtype for t in here.values()} == {torch.float16}
        # the contribution reports (CIRCUIT_MERGE_REPORT) are the same bytes too
        reports = [(tmp_path / side / f"{name}.report.json").read_bytes() for side in ("here", "other")]
        assert reports[0] == reports[1], f"{name}: the reports differ between mergekit versions"
        report = load_report(str(tmp_path / "here" / f"{name}.report.json"))
        assert check_report(report) == []
        # ... header included: finished, where the seed came from, the recipe's parameters
        assert report["finished"] is True
        assert report["tensors_merged"] == len(report["tensors"]) == len(here)
        assert report["seed_source"] == ("recipe" if name == "qwen" else "random_seed option")
        assert report["recipe_parameters"]["parameters"] == recipes[name][0]["parameters"]

    # The recipes are stochastic: the result is not the drop-free merge.
    key = "model.layers.0.mlp.down_proj.weight"
    base = load_tensors(llama_family.base)[key]
    variants = [load_tensors(p)[key] for p in llama_family.variants]
    drop_free = circuit_merge(
        base,
        [variants[1], variants[0], variants[2]],
        CircuitParams(temperature=0.25, epsilon=0.3, seed=1234),
        drop_rate=[0.0, 0.0, 0.0],
        name=key,
    )
    merged = load_tensors(tmp_path / "here" / "llama")[key]
    assert not torch.equal(merged, drop_free)
