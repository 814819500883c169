"""The merge-quality benchmark runs end to end at its tiny size.

Only sanity is checked (files written, scores are fractions): the benchmark's
numbers are measurements, not test assertions (see benchmarks/quality/).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_tiny(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.quality.run",
            "--tiny",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    markdown = (out / "results.md").read_text()
    assert "| method | settings |" in markdown
    assert "circuit" in markdown and "dare_ties" in markdown and "della" in markdown
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    methods = {r["method"] for r in records}
    assert {"circuit", "linear", "task_arithmetic", "ties", "dare_ties", "della"} <= methods
    for record in records:
        for split in ("val", "test"):
            for value in record[split].values():
                assert 0.0 <= value <= 1.0
    for row in data["analysis"]["rows"]:
        assert 0.0 <= row["mean"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in row["per_task"].values())
        assert row["gain_retained"] is None or isinstance(row["gain_retained"], float)
    assert not math.isnan(data["analysis"]["target"]["circuit_mean"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for chart in ("methods.png", "circuit_grid.png", "priority.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"
