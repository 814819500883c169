"""The benchmark command runs end to end on a tiny size.

Benchmarks are never timed tests: nothing here asserts a duration or a ratio,
only that the command works and writes its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

workloads = pytest.importorskip("benchmarks.speed.workloads")


def test_size_parsing_and_shapes():
    assert workloads.parse_size("35M") == 35_000_000
    assert workloads.parse_size("1.5B") == 1_500_000_000
    assert workloads.parse_size("800k") == 800_000
    assert workloads.parse_size("1234") == 1234
    with pytest.raises(ValueError):
        workloads.parse_size("big")
    shape = workloads.shape_for(35_000_000)
    assert (shape.hidden, shape.layers, shape.intermediate) == (512, 12, 1376)
    assert abs(shape.params - 35e6) / 35e6 < 0.05
    big = workloads.shape_for(1_000_000_000)
    assert abs(big.params - 1e9) / 1e9 < 0.1


def test_recipes_read_the_same_inputs(tmp_path):
    family = workloads.Family(tmp_path, workloads.tiny_shape(), "float32", 3)
    for method in workloads.METHODS:
        config = workloads.recipe(method, family, 2)
        assert config["merge_method"] == method
        models = [m["model"] for m in config["models"]]
        # every method reads the base and the first two variants
        assert set(models) | {config.get("base_model")} >= {
            str(family.base), str(family.variant(0)), str(family.variant(1))
        }
        assert str(family.variant(2)) not in models
    assert workloads.recipe("circuit", family, 2, seed=9)["parameters"] == {"seed": 9}


@pytest.mark.slow
def test_benchmark_command_tiny_end_to_end(tmp_path, api):
    if api != "0.1.5":
        # The kernel part calls mergekit 0.1.5's della/ties merge_group in process.
        pytest.skip("the benchmarks run against mergekit 0.1.5 (its in-process API)")
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "benchmarks.speed.run", "--tiny",
        "--parts", "compare,kernel", "--methods", "circuit,linear",
        "--out", str(out), "--cache", str(tmp_path / "cache"), "--name", "tiny",
    ]
    result = subprocess.run(
        command, cwd=str(REPO), capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "tiny.json").read_text())
    summary = data["compare"]["summary"]
    assert set(summary) == {"circuit", "linear"}
    for row in summary.values():
        assert row["wall_s"] > 0 and row["rss_mib"] > 0
    assert "circuit/linear" in data["compare"]["ratios"]
    assert set(data["kernel"]["times"]) == {"circuit", "della", "ties"}
    markdown = (out / "tiny.md").read_text()
    assert "circuit/linear" in markdown and "Machine:" in markdown
    assert "Kernel only" in markdown
    if data.get("chart"):
        assert (out / "tiny.png").stat().st_size > 1000
