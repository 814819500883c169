"""The merge-quality benchmark: its grids, its rules, its selection, and a tiny
end-to-end run.

The benchmark's numbers are measurements, not test assertions (see
benchmarks/quality/); what is asserted here is the protocol: every method gets
the same scale grid, the order rule does what it says, selection reads the
validation split only, and both expert families run end to end.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality import plan as P
from benchmarks.quality import select as S

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rev", "sort", "inc", "rot")


# --- the grids ---------------------------------------------------------------


@pytest.mark.parametrize("tiny", [False, True])
def test_every_scalable_method_gets_the_same_scale_grid(tiny):
    grid = set(P.scales(tiny))
    assert any(s < 1 for s in grid) and 1.0 in grid
    points = P.mergekit_points(tiny)
    assert set(points) == {"linear", "task_arithmetic", "ties", "dare_ties", "della"}
    assert {p.settings["weight"] for p in points["task_arithmetic"]} == grid
    for method in ("ties", "dare_ties", "della"):
        by_density = {}
        for p in points[method]:
            by_density.setdefault(p.settings["density"], set()).add(p.settings["lambda"])
        assert by_density and all(s == grid for s in by_density.values()), method
    circuit = P.circuit_points(tiny)
    per_cell = {}
    for p in circuit:
        s = p.settings
        per_cell.setdefault((s["temperature"], s["base_droprate"]), set()).add(s["lambda"])
    assert per_cell and all(s == grid for s in per_cell.values())


def test_defaults_are_marked_once_per_method_and_are_the_unscaled_points():
    for method, points in P.mergekit_points().items():
        defaults = [p for p in points if p.is_default]
        assert len(defaults) == 1, method
        s = defaults[0].settings
        assert s.get("lambda", s.get("weight")) == 1.0
        if method in ("ties", "dare_ties", "della"):
            assert s["density"] == 0.5


def test_recommended_preset_is_a_grid_point_and_defaults_are_the_plugins():
    assert P.preset_point(P.CIRCUIT_RECOMMENDED).params in {p.params for p in P.circuit_points()}
    assert P.CIRCUIT_DEFAULT == {"temperature": 0.0, "base_droprate": 0.5, "lambda": 1.0}
    assert P.RECOMMENDED_RULE in P.rule_orders(TASKS, dict.fromkeys(TASKS, 1.0), dict.fromkeys(TASKS, 0.1))


def test_recommended_config_matches_the_plan_and_pins_no_seed_or_tokenizer():
    import yaml

    text = (ROOT / "configs" / "circuit-recommended.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["merge_method"] == "circuit"
    params = config["parameters"]
    for key, value in P.CIRCUIT_RECOMMENDED.items():
        assert params[key] == value, key
    assert "seed" not in params  # a pinned seed would override --random-seed
    assert "tokenizer" not in config  # runs on a bare checkpoint
    assert "# seed:" in text and "# tokenizer:" in text  # both kept, commented, with when to set them


# --- the order rule -------------------------------------------------------------


def test_gain_desc_orders_by_gain_in_whole_points_ties_listed_nothing_last():
    gains = {"rev": 0.054, "sort": 0.0, "inc": 0.057, "rot": 0.20}
    # inc and rev both gained 5 whole points: listed order (rev before inc);
    # sort gained nothing: last.
    assert P.gain_order(TASKS, gains) == ("rot", "rev", "inc", "sort")
    assert P.gain_order(TASKS, gains, descending=False) == ("rev", "inc", "rot", "sort")


def test_gained_nothing_threshold_and_negative_gains_go_last_in_listed_order():
    gains = {"rev": -0.03, "sort": 0.005, "inc": 0.01, "rot": 0.02}
    # inc (exactly 1 point) counts as a gain; rev and sort gained nothing.
    assert P.gain_order(TASKS, gains) == ("rot", "inc", "rev", "sort")


def test_rule_orders_are_permutations():
    norms = {"rev": 0.5, "sort": 0.4, "inc": 0.3, "rot": 0.6}
    orders = P.rule_orders(TASKS, norms, {"rev": 0.1, "sort": 0.2, "inc": 0.0, "rot": 0.05})
    assert set(orders) == {"delta-norm-desc", "as-listed", "gain-desc", "gain-asc"}
    assert orders["delta-norm-desc"] == ("rot", "rev", "sort", "inc")
    assert orders["gain-desc"] == ("sort", "rev", "rot", "inc")
    for order in orders.values():
        assert sorted(order) == sorted(TASKS)


# --- selection reads validation only --------------------------------------------------


def _rec(family, method, settings, val, test, role="grid", order=TASKS, seed=0):
    return {"family": family, "method": method, "settings": settings, "order": list(order),
            "seed": seed, "roles": [role], "val": dict.fromkeys(TASKS, val),
            "test": dict.fromkeys(TASKS, test)}


def test_best_point_picks_on_validation_and_keeps_the_first_of_a_tie():
    records = [
        _rec("replay-0", "ties", {"lambda": 0.5}, 0.70, 0.99),
        _rec("replay-0", "ties", {"lambda": 1.0}, 0.80, 0.10),
        _rec("replay-0", "ties", {"lambda": 1.5}, 0.80, 0.50),
        _rec("replay-0", "ties", {"lambda": 0.25}, 0.95, 0.95, seed=1),  # another merge seed
        _rec("forget-0", "ties", {"lambda": 0.25}, 0.99, 0.99),  # another family
    ]
    assert S.best_point(records, "replay-0", "ties", 0, TASKS) == {"lambda": 1.0}


def test_preset_is_picked_on_the_mean_over_all_families_and_rule_at_that_preset():
    fams = ["replay-0", "forget-0"]
    a = {"temperature": 0.0, "base_droprate": 0.5, "lambda": 1.0}
    b = {"temperature": 1.0, "base_droprate": 0.25, "lambda": 0.5}
    records = [
        _rec("replay-0", "circuit", a, 0.90, 0.10, "circuit-grid"),
        _rec("forget-0", "circuit", a, 0.50, 0.10, "circuit-grid"),
        _rec("replay-0", "circuit", b, 0.80, 0.01, "circuit-grid"),
        _rec("forget-0", "circuit", b, 0.70, 0.01, "circuit-grid"),
    ]
    assert S.pick_preset(records, fams, 0, TASKS) == b  # 0.75 vs 0.70 on validation
    orders = {f: {"gain-desc": TASKS, "as-listed": TASKS[::-1]} for f in fams}
    records += [
        _rec("replay-0", "circuit", b, 0.85, 0.0, "rule", order=TASKS[::-1]),
        _rec("forget-0", "circuit", b, 0.70, 0.0, "rule", order=TASKS[::-1]),
    ]
    assert S.pick_rule(records, fams, b, orders, 0, TASKS) == "as-listed"
    # an exact tie on validation goes to the rule listed first in RULE_PREFERENCE
    records[-2]["val"] = dict.fromkeys(TASKS, 0.80)
    assert S.pick_rule(records, fams, b, orders, 0, TASKS) == "gain-desc"


def test_both_families_share_the_base_and_differ_only_in_the_experts():
    from benchmarks.quality.models import EXPERT_FIELDS
    from benchmarks.quality.run import KINDS, family_settings

    for tiny in (False, True):
        settings = family_settings(tiny)
        assert set(settings) == set(KINDS) == {"replay", "forget"}
        replay, forget = settings["replay"], settings["forget"]
        assert replay.base_key(0) == forget.base_key(0) != replay.base_key(1)
        assert replay.key(0) != forget.key(0)
        differ = {k for k in vars(replay) if getattr(replay, k) != getattr(forget, k)}
        assert differ and differ <= set(EXPERT_FIELDS)
        assert forget.expert_replay == 0.0 < replay.expert_replay
        assert forget.expert_lr > replay.expert_lr


# --- end to end ----------------------------------------------------------------------


@pytest.mark.slow
def test_quality_benchmark_tiny(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.run", "--tiny",
         "--cache", str(tmp_path / "cache"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    markdown = (out / "results.md").read_text()
    assert "| method | settings (picked on val) |" in markdown
    assert "Family `replay`" in markdown and "Family `forget`" in markdown
    data = json.loads((out / "results.json").read_text())
    records, context, analysis = data["records"], data["context"], data["analysis"]
    assert {r["kind"] for r in records} == {"replay", "forget"}
    methods = {r["method"] for r in records}
    assert {"circuit", "linear", "task_arithmetic", "ties", "dare_ties", "della"} <= methods
    # every scalable method was merged at every scale, in both families
    for kind in ("replay", "forget"):
        for method, key in (("circuit", "lambda"), ("ties", "lambda"), ("dare_ties", "lambda"),
                            ("della", "lambda"), ("task_arithmetic", "weight")):
            got = {r["settings"][key] for r in records if r["kind"] == kind and r["method"] == method}
            assert set(P.scales(True)) <= got, (kind, method)
    for record in records:
        for split in ("val", "test"):
            for value in record.get(split, {}).values():
                assert 0.0 <= value <= 1.0
    # the headline is the preset and rule validation picked, on every merge seed
    picked = context["picked_preset"]
    headline = [r for r in records if "circuit-recommended" in r["roles"]]
    assert headline and all(r["settings"] == picked and "test" in r for r in headline)
    assert {r["seed"] for r in headline} == set(context["profile"]["merge_seeds"])
    for kind in ("replay", "forget"):
        target = analysis["tables"][kind]["target"]
        assert not math.isnan(target["difference"])
        assert target["best_mergekit_row"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for chart in ("methods.png", "scale.png", "circuit_grid.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"
