"""The search proof on the merge-quality benchmark: its choice of trial, its
starting recipe and its paired comparison (pure functions; no search runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.quality import plan as P
from benchmarks.quality import search_proof as S
from benchmarks.quality.models import Family


def _record(trial, score, status="ok"):
    return {"trial": trial, "status": status, "score": score if status == "ok" else None}


def test_best_trial_is_the_first_of_the_best_validation_scores_and_skips_failures():
    records = [_record(3, 70.0), _record(1, 72.5), _record(2, None, "failed"), _record(4, 72.5)]
    assert S.best_trial(records)["trial"] == 1
    with pytest.raises(SystemExit):
        S.best_trial([_record(1, None, "failed")])


def test_starting_recipe_is_the_recommended_preset_in_the_given_order(tmp_path):
    family = Family(seed=0, root=tmp_path, base=tmp_path / "base",
                    experts={t: tmp_path / f"expert-{t}" for t in ("rev", "sort", "inc", "rot")})
    path = tmp_path / "recipe.yaml"
    S.write_recipe(family, ["inc", "rev", "rot", "sort"], path)
    recipe = yaml.safe_load(path.read_text())
    assert recipe["merge_method"] == "circuit"
    assert [Path(m["model"]).name for m in recipe["models"]] == [
        "expert-inc", "expert-rev", "expert-rot", "expert-sort"]
    assert recipe["parameters"] == P.CIRCUIT_RECOMMENDED
    assert "seed" not in recipe["parameters"]  # the search's --seed is the merge seed
    assert recipe["dtype"] == "float32"


def _row(name, kind, means):
    return {"name": name, "kind": kind, "detail": "",
            "by_family": {f: {"mean": m / 100} for f, m in means.items()}}


def test_comparison_is_paired_per_training_seed_against_the_best_mergekit_mean():
    fams = ["replay-0", "replay-1"]
    quality = {"analysis": {"tables": {"replay": {"rows": [
        _row("base", "reference", {"replay-0": 60, "replay-1": 60}),
        _row("experts (each on its own task)", "reference", {"replay-0": 90, "replay-1": 90}),
        _row("ties (tuned on val)", "mergekit", {"replay-0": 70, "replay-1": 80}),
        _row("della (tuned on val)", "mergekit", {"replay-0": 76, "replay-1": 72}),
        _row("circuit recommended", "circuit-headline", {"replay-0": 69, "replay-1": 71}),
    ]}}}}
    chosen = {"replay-0": {"train_seed": 0, "test_mean": 77.0, "order": ["rev"],
                           "settings": {"temperature": 0.5, "base_droprate": 0.5, "lambda": 1.0}},
              "replay-1": {"train_seed": 1, "test_mean": 80.0, "order": ["rev"],
                           "settings": {"temperature": 0.5, "base_droprate": 0.5, "lambda": 1.0}}}
    table = S.compare(chosen, quality, ["replay"], [0, 1])["replay"]
    assert table["families"] == fams
    names = [r["name"] for r in table["rows"]]
    assert names[0] == S.SEARCH_ROW and "experts (each on its own task)" not in names
    assert table["best_mergekit"] == "ties (tuned on val)"  # mean 75 > 74
    assert table["vs_best_mergekit"]["per_seed"] == pytest.approx([7.0, 0.0])
    assert table["vs_best_mergekit"]["mean"] == pytest.approx(3.5)
    assert table["vs_recommended"]["mean"] == pytest.approx(8.5)
    assert table["target_met"] is True
    chosen["replay-1"]["test_mean"] = 76.0  # +1.5 required: 7 and -4 average to +1.5 exactly
    assert S.compare(chosen, quality, ["replay"], [0, 1])["replay"]["target_met"] is True
    chosen["replay-1"]["test_mean"] = 75.9
    assert S.compare(chosen, quality, ["replay"], [0, 1])["replay"]["target_met"] is False


def test_both_families_pairs_every_family_and_seed():
    comparison = {
        kind: {"rows": [
            {"name": S.SEARCH_ROW, "kind": "search", "mean": base + 2,
             "search_minus_this": {"per_seed": [0.0, 0.0]}},
            {"name": "ties (tuned on val)", "kind": "mergekit", "mean": base,
             "search_minus_this": {"per_seed": [1.0 + shift, 3.0 + shift]}},
        ]}
        for kind, base, shift in (("replay", 70.0, 0.0), ("forget", 60.0, -4.0))
    }
    both = S.both_families(comparison)
    ties = both["rows"][1]
    assert ties["by_kind"] == {"replay": 70.0, "forget": 60.0} and ties["mean"] == 65.0
    assert ties["search_minus_this"]["per_pair"] == [1.0, 3.0, -3.0, -1.0]
    assert ties["search_minus_this"]["mean"] == 0.0 and ties["search_minus_this"]["min"] == -3.0


def test_ceiling_takes_the_best_validation_trials_and_reports_the_best_on_test():
    records = [_record(1, 70.0), _record(2, 74.0), _record(3, None, "failed"), _record(4, 74.0),
               _record(5, 71.0)]
    assert [r["trial"] for r in S.top_by_validation(records, 3)] == [2, 4, 5]
    assert [r["trial"] for r in S.top_by_validation(records, 10)] == [2, 4, 5, 1]
    scored = [{"trial": 2, "val": 74.0, "test": 71.0}, {"trial": 4, "val": 74.0, "test": 73.5},
              {"trial": 5, "val": 71.0, "test": 73.5}]
    summary = S.summarize_ceiling(scored)
    assert (summary["best_test"], summary["best_trial"], summary["val_rank_of_best"]) == (73.5, 4, 2)
    assert summary["count"] == 3


def test_ceiling_section_subtracts_the_best_mergekit_method_per_family():
    rows = [{"name": "ties (tuned on val)", "kind": "mergekit", "by_family": {"replay-0": 78.0, "replay-1": 75.0}}]
    comparison = {"replay": {"rows": rows, "best_mergekit": "ties (tuned on val)"}}
    chosen = {f"replay-{s}": {"kind": "replay", "test": {"0": {"mean": 76.0 + s}},
                              "ceiling": {"count": 8, "best_test": best, "val_rank_of_best": rank}}
              for s, best, rank in ((0, 78.5, 3), (1, 74.0, 1))}
    lines = S.ceiling_section({"chosen": chosen, "comparison": comparison})
    assert lines[1] == "### Diagnosis: the 8 best trials on validation of each search, scored on test"
    chosen["replay-0"]["trials"] = chosen["replay-1"]["trials"] = 8
    assert S.ceiling_section({"chosen": chosen, "comparison": comparison})[1] == (
        "### Diagnosis: all 8 trials of each search, scored on test")
    table = [line for line in lines if line.startswith("| replay-")]
    assert table == ["| replay-0 | 78.0 (ties (tuned on val)) | 76.0 | 78.5 | 3 | +0.5 |",
                     "| replay-1 | 75.0 (ties (tuned on val)) | 77.0 | 74.0 | 1 | -1.0 |"]
    assert lines[-1] == "Bound minus the best mergekit method, mean over training seeds: replay -0.2."
    assert S.ceiling_section({"chosen": {"replay-0": {"kind": "replay"}}, "comparison": comparison}) == []


def test_checked_in_search_page_is_what_its_json_renders_to():
    results = Path(S.__file__).resolve().parent / "results"
    import json

    assert S.render(json.loads((results / "search.json").read_text())) == (results / "search.md").read_text()
