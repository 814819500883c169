"""``circuit-merge report``: aggregation, consistency checks, outputs, bad input.

Reports are built by hand here, in the version-1 schema the merge writes,
for the cases the kernel's semantics pin down (no drops: kept == changed):
disjoint variants contribute only their own layers; under a sign conflict
the higher priority overwrites exactly its kept elements and the lower
priority's contribution is overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuit_merge_plugin.insight import report as report_module
from circuit_merge_plugin.insight.report import aggregate, check_report
from conftest import assert_refused
from html_probe import find_chromium, probe_charts

PARAMETERS = {"temperature": 0.0, "base_droprate": 0.5, "meaningful_change_threshold": 2e-6,
              "epsilon": 0.1, "rescale": True, "seed": 0}


def row(changed=0, kept=None, taken=0, overwrote=0, averaged=0, overwritten=0, share=0.0):
    kept = taken + overwrote + averaged if kept is None else kept
    return {"changed": changed, "kept": kept, "dropped": changed - kept, "taken": taken,
            "overwrote": overwrote, "averaged": averaged, "overwritten": overwritten,
            "final_share": share}


def make_report(tensors, variants=("./v1", "./v2"), rates=(0.5, 0.75)):
    return {
        "format": "circuit-merge-report", "version": 1, "variants": list(variants),
        "parameters": dict(PARAMETERS),
        "tensors": {name: {"numel": numel, "drop_rates": list(rates), "variants": rows}
                    for name, (numel, rows) in tensors.items()},
    }


def write_report(directory: Path, report: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "circuit_merge_report.json").write_text(json.dumps(report))
    return directory


def disjoint_report():
    """V1 changed only layers.0, V2 only layers.1 (16 elements each, p = 0)."""
    return make_report({
        "model.layers.0.w": (16, [row(16, taken=16, share=1.0), row()]),
        "model.layers.1.w": (16, [row(), row(16, taken=16, share=1.0)]),
        "model.norm.weight": (4, [row(), row()]),
    }, rates=(0.0, 0.0))


def opposite_report():
    """V1 = +, V2 = - on the same 8 elements, no drops: V2 taken, V1 overwrites it."""
    return make_report({
        "model.layers.0.w": (16, [row(8, overwrote=8, share=1.0),
                                  row(8, taken=8, overwritten=8)]),
    }, rates=(0.0, 0.0))


def mixed_report():
    return make_report({
        "model.embed_tokens.weight": (100, [row(40, kept=20, taken=15, overwrote=5, share=0.8),
                                            row(40, kept=10, taken=10, overwritten=5, share=0.2)]),
        "model.layers.0.mlp.weight": (50, [row(), row(50, kept=12, taken=12, share=1.0)]),
        "model.layers.0.norm.weight": (8, [row(), row()]),
        "model.layers.1.attn.weight": (30, [row(10, kept=6, taken=2, averaged=4, share=0.75),
                                            row(12, kept=6, taken=2, averaged=4, share=0.25)]),
        "lm_head.weight": (100, [row(5, kept=5, taken=5, share=1.0), row()]),
    })


# ---------------------------------------------------------------- aggregation


def test_disjoint_variants_contribute_only_their_own_layers():
    result = aggregate(disjoint_report())
    layers = {g["name"]: g for g in result["layers"]}
    assert list(layers) == ["layers.0", "layers.1", "other"]
    assert [v["share"] for v in layers["layers.0"]["variants"]] == [1.0, 0.0]
    assert [v["share"] for v in layers["layers.1"]["variants"]] == [0.0, 1.0]
    assert [v["share"] for v in layers["other"]["variants"]] == [0.0, 0.0]
    assert layers["other"]["final_changed"] == 0
    total = result["total"]
    assert [v["share"] for v in total["variants"]] == [0.5, 0.5]
    assert [v["kept"] for v in total["variants"]] == [16, 16]
    assert all(v["overwrote"] == v["overwritten"] == v["averaged"] == 0 for v in total["variants"])
    assert total["numel"] == 36 and total["tensors"] == 3 and total["final_changed"] == 32


def test_opposite_signs_overwrite_exactly_the_kept_elements_of_the_higher_priority():
    report = opposite_report()
    assert check_report(report) == []
    total = aggregate(report)["total"]
    high, low = total["variants"]
    assert high["overwrote"] == high["kept"] == 8 and high["taken"] == 0
    assert low["overwritten"] == high["kept"] and low["taken"] == 8
    assert (high["share"], low["share"]) == (1.0, 0.0)


def test_aggregate_weights_tensors_by_their_final_changed_elements():
    result = aggregate(mixed_report())
    assert result["variants"] == ["./v1", "./v2"]
    layers = {g["name"]: g for g in result["layers"]}
    assert list(layers) == ["embeddings", "layers.0", "layers.1", "head"]
    assert layers["embeddings"]["final_changed"] == 25
    assert [v["share"] for v in layers["embeddings"]["variants"]] == pytest.approx([0.8, 0.2])
    # the unchanged norm (weight 0) does not dilute the mlp's shares
    assert [v["share"] for v in layers["layers.0"]["variants"]] == [0.0, 1.0]
    assert layers["layers.0"]["numel"] == 58 and layers["layers.0"]["tensors"] == 2
    assert [v["share"] for v in layers["layers.1"]["variants"]] == [0.75, 0.25]
    total = result["total"]
    # weights 25 (embeddings), 12 (mlp), 4 (attn), 5 (head): 46 in all
    assert total["final_changed"] == 46
    expected_v1 = (25 * 0.8 + 4 * 0.75 + 5 * 1.0) / 46
    assert total["variants"][0]["share"] == pytest.approx(expected_v1)
    assert total["variants"][1]["share"] == pytest.approx(1 - expected_v1)
    for key, value in (("changed", [55, 102]), ("kept", [31, 28]), ("dropped", [24, 74]),
                       ("taken", [22, 24]), ("overwrote", [5, 0]), ("averaged", [4, 4]),
                       ("overwritten", [0, 5])):
        assert [v[key] for v in total["variants"]] == value, key


def test_consistency_shares_sum_to_one_where_the_delta_is_nonzero():
    for report in (disjoint_report(), opposite_report(), mixed_report()):
        assert check_report(report) == []
        for entry in report["tensors"].values():
            shares = sum(v["final_share"] for v in entry["variants"])
            nonzero = sum(v["taken"] for v in entry["variants"]) > 0
            assert shares == pytest.approx(1.0 if nonzero else 0.0)
        result = aggregate(report)
        for group in result["layers"] + [result["total"]]:
            shares = sum(v["share"] for v in group["variants"])
            assert shares == pytest.approx(1.0 if group["final_changed"] else 0.0)


def test_check_report_names_each_inconsistency():
    report = mixed_report()
    rows = report["tensors"]["model.embed_tokens.weight"]["variants"]
    rows[0]["averaged"] = 3  # taken + overwrote + averaged != kept
    rows[1]["final_share"] = 0.1  # shares sum to 0.9
    report["tensors"]["lm_head.weight"]["variants"][0]["overwritten"] = 1
    report["tensors"]["model.layers.0.norm.weight"]["variants"][0]["final_share"] = 0.5
    report["tensors"]["model.layers.0.norm.weight"]["variants"][1]["final_share"] = 0.5
    report["tensors"]["model.layers.0.mlp.weight"]["variants"][1]["dropped"] = 1
    problems = check_report(report)
    assert problems == [
        "tensor 'model.embed_tokens.weight' variant 1: taken + overwrote + averaged != kept",
        "tensor 'model.embed_tokens.weight': final shares sum to 0.9, not 1",
        "tensor 'model.layers.0.mlp.weight' variant 2: dropped != changed - kept",
        "tensor 'model.layers.0.norm.weight': final shares are nonzero but nothing was taken",
        "tensor 'lm_head.weight' variant 1: the highest priority cannot be overwritten",
    ]


# ---------------------------------------------------------------- command line


def test_text_table(tmp_path, capsys):
    directory = write_report(tmp_path / "merged", mixed_report())
    assert report_module.main([str(directory)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    text = out.out
    assert "temperature 0, base_droprate 0.5, threshold 2e-06, epsilon 0.1, rescale on, seed 0" in text
    assert "V1 = ./v1  (drop rate 0.5)" in text and "V2 = ./v2  (drop rate 0.75)" in text
    lines = text.splitlines()
    v1 = next(line for line in lines if line.startswith("V1  "))
    assert v1.split() == ["V1", "55", "31", "24", "22", "5", "4", "0", f"{100 * 28 / 46:.1f}%"]
    embed = [line for line in lines if line.startswith("embeddings")]
    assert embed[0].split() == ["embeddings", "25", "80.0%", "20.0%"]
    assert embed[1].split() == ["embeddings", "20/20/5/0", "10/30/0/0"]
    assert "Sign agreement" not in text


def test_json_summary_and_report_file_path(tmp_path, capsys):
    directory = write_report(tmp_path / "merged", mixed_report())
    assert report_module.main([str(directory / "circuit_merge_report.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "circuit-merge-report-summary" and doc["version"] == 1
    assert doc["problems"] == [] and doc["agreement"] is None
    assert doc["drop_rates"] == [{"min": 0.5, "max": 0.5}, {"min": 0.75, "max": 0.75}]
    expected = aggregate(mixed_report())
    assert doc["layers"] == expected["layers"] and doc["total"] == expected["total"]


def test_inconsistent_report_warns_but_renders(tmp_path, capsys):
    report = opposite_report()
    report["tensors"]["model.layers.0.w"]["variants"][0]["final_share"] = 0.5
    directory = write_report(tmp_path / "merged", report)
    assert report_module.main([str(directory)]) == 0
    out = capsys.readouterr()
    assert "1 inconsistency in the report:" in out.out
    assert out.err.startswith("circuit-merge report: warning: 1 inconsistencies")


def _analysis(count=2, agreement=0.25):
    return {"format": "circuit-merge-analysis", "version": 1,
            "variants": [f"./v{k + 1}" for k in range(count)],
            "total": {"pairs": [{"i": 0, "j": 1, "agreement": agreement}] if count > 1 else []}}


def test_agreement_from_embedded_or_given_analysis(tmp_path, capsys):
    report = mixed_report()
    report["analysis"] = _analysis(agreement=0.25)
    directory = write_report(tmp_path / "merged", report)
    assert report_module.main([str(directory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agreement"] == [[1.0, 0.25], [0.25, 1.0]]
    given = tmp_path / "analysis.json"
    given.write_text(json.dumps(_analysis(agreement=0.5)))
    assert report_module.main([str(directory), "--analysis", str(given)]) == 0
    text = capsys.readouterr().out
    assert "Sign agreement on the overlap (from the analysis)" in text
    assert "V1  100%   50%" in text


@pytest.mark.parametrize("case", [
    "missing_dir", "no_report", "bad_json", "wrong_format", "version", "short_variants",
    "negative", "share_type", "analysis_count", "html_dir",
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    report = mixed_report()
    directory = tmp_path / "merged"
    extra = []
    expect = []
    if case == "missing_dir":
        directory = tmp_path / "nowhere"
        expect = ["nowhere: no such directory"]
    elif case == "no_report":
        directory.mkdir()
        expect = ["no circuit_merge_report.json"]
    elif case == "bad_json":
        directory.mkdir()
        (directory / "circuit_merge_report.json").write_text("{not json")
        expect = ["circuit_merge_report.json: not valid JSON"]
    elif case == "wrong_format":
        report["format"] = "something-else"
        expect = ["not a Circuit-Merge report"]
    elif case == "version":
        report["version"] = 2
        expect = ["report version 2 is not supported"]
    elif case == "short_variants":
        report["tensors"]["lm_head.weight"]["variants"].pop()
        expect = ["tensor 'lm_head.weight'", "'variants' must hold 2 entries"]
    elif case == "negative":
        report["tensors"]["lm_head.weight"]["variants"][1]["kept"] = -1
        expect = ["tensor 'lm_head.weight': variant 2 'kept' must be a non-negative integer"]
    elif case == "share_type":
        report["tensors"]["lm_head.weight"]["variants"][0]["final_share"] = "1"
        expect = ["variant 1 'final_share' must be a number"]
    elif case == "analysis_count":
        given = tmp_path / "analysis.json"
        given.write_text(json.dumps(_analysis(count=3)))
        extra = ["--analysis", str(given)]
        expect = ["--analysis", "covers 3 variants, the report 2"]
    elif case == "html_dir":
        extra = ["--html", str(tmp_path / "no" / "page.html")]
        expect = ["--html", "no such directory"]
    if not directory.exists() and case not in ("missing_dir",):
        write_report(directory, report)
    code = report_module.main([str(directory), *extra])
    assert_refused(code, capsys.readouterr(), "circuit-merge report", expect)


def test_cli_subcommand(tmp_path, capsys):
    from circuit_merge_plugin.cli import main as cli

    directory = write_report(tmp_path / "merged", mixed_report())
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(directory)])
    assert stop.value.code == 0
    assert "Contribution share per layer" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(tmp_path / "nowhere")])
    assert stop.value.code == 2


def test_unfinished_merge_is_refused_unless_partial(tmp_path, capsys):
    report = mixed_report()
    report.update(finished=False, tensors_merged=3)
    directory = write_report(tmp_path / "merged", report)
    code = report_module.main([str(directory)])
    assert_refused(code, capsys.readouterr(), "circuit-merge report",
                   ["the merge did not finish", "covers only 3 tensor(s)", "--partial"])
    assert report_module.main([str(directory), "--partial"]) == 0
    captured = capsys.readouterr()
    assert "The merge did NOT finish: this report covers only the 3 tensor(s)" in captured.out
    assert "the report is partial" in captured.err
    assert report_module.main([str(directory), "--partial", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["finished"] is False and doc["tensors_merged"] == 3


def test_finished_merge_says_so_and_older_reports_say_nothing(tmp_path, capsys):
    report = mixed_report()
    report.update(finished=True, tensors_merged=5)
    assert report_module.main([str(write_report(tmp_path / "new", report))]) == 0
    text = capsys.readouterr().out
    assert "The merge finished (5 tensor(s) merged)" in text
    older = mixed_report()  # no "finished" key: an older version's report
    assert report_module.main([str(write_report(tmp_path / "old", older))]) == 0
    text = capsys.readouterr().out
    assert "The merge finished" not in text and "did NOT finish" not in text
    report["finished"] = "yes"
    code = report_module.main([str(write_report(tmp_path / "bad", report))])
    assert_refused(code, capsys.readouterr(), "circuit-merge report",
                   ["'finished' must be true or false"])


def test_header_shows_the_recipe_parameters_as_given(tmp_path, capsys):
    report = mixed_report()
    report["recipe_parameters"] = {
        "temperature": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}],
        "base_droprate": 0.5,
        "seed": 42,
    }
    assert report_module.main([str(write_report(tmp_path / "merged", report))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("recipe parameters as given: temperature = 1 (mlp), 0 (otherwise); "
            "base_droprate = 0.5; seed = 42") in lines[:6]
    # the merge side's form: the recipe's parts, per-model values named by model
    report["recipe_parameters"] = {
        "parameters": {"base_droprate": [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}]},
        "models": [{"model": "./v1", "parameters": {"drop_rate": 0.2}}, {"model": "./v2"}],
    }
    assert report_module.main([str(write_report(tmp_path / "parts", report))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("recipe parameters as given: base_droprate = 0.3 (self_attn), 0.5 (otherwise); "
            "./v1: drop_rate = 0.2") in lines[:6]
    report["recipe_parameters"] = None  # not known (a merge not run by mergekit's run_merge)
    assert report_module.main([str(write_report(tmp_path / "null", report))]) == 0
    assert "recipe parameters" not in capsys.readouterr().out


def test_text_table_ends_with_a_legend_of_its_columns(tmp_path, capsys):
    directory = write_report(tmp_path / "merged", mixed_report())
    assert report_module.main([str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["variant", "changed"])
    legend = next(line for line in lines[header + 1:] if not line.startswith(("V", "-")))
    for column in lines[header].split():
        if column != "variant":
            assert f"{column}:" in legend, column


# ---------------------------------------------------------------- charts and HTML


def test_png_charts_and_html_in_chromium(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = mixed_report()
    report["analysis"] = _analysis()
    directory = write_report(tmp_path / "merged", report)
    page, charts = tmp_path / "report.html", tmp_path / "charts"
    assert report_module.main([str(directory), "--html", str(page), "--png-dir", str(charts)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {page}" in err and "wrote 3 chart(s)" in err
    names = sorted(p.name for p in charts.iterdir())
    assert names == ["agreement.png", "contribution_share.png", "outcomes.png"]
    for name in names:
        assert (charts / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert html.count('<img class="chart"') == 3
    assert "Contribution share per layer" in html and "20/20/5/0" in html

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary (apt-get install -y chromium) to render the HTML")
    result = probe_charts(chromium, page, tmp_path)
    assert result["charts"] == "3/3", result
    assert set(result["decoded"]) == set(names)
    assert all(width > 100 for width in result["decoded"].values()), result
    assert result["control"] == 0, "the broken control image must not decode"
