"""``circuit-merge analyze``: exact statistics on constructed models, the order
rule against a brute-force simulation of the sign rule, streaming, outputs and
bad input.

Constructed deltas use dyadic values (multiples of 1/4 on a base of multiples
of 1/4), so every delta, sum and mean below is exact in float32 and float64.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from circuit_merge_plugin.insight import analyze
from circuit_merge_plugin.insight.analyze import analyze as run_analysis
from circuit_merge_plugin.insight.render import layer_group
from conftest import assert_refused
from html_probe import find_chromium, probe_charts


def write_model(directory: Path, tensors: dict, shards: int = 1) -> Path:
    """A bare safetensors directory (``shards`` files, tensors split by name)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for index in range(shards):
        part = {n: tensors[n].contiguous() for n in names[index::shards]}
        save_file(part, str(directory / f"model-{index:05d}.safetensors"))
    return directory


def dyadic_base(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.w": torch.randint(-8, 8, (4, 4), generator=g).float() / 4,
        "model.layers.1.w": torch.randint(-8, 8, (4, 4), generator=g).float() / 4,
        "model.norm.weight": torch.ones(4),
    }


def with_delta(base: dict, **deltas) -> dict:
    """``base`` plus ``deltas`` (keyword = tensor name with dots as '__')."""
    out = {name: t.clone() for name, t in base.items()}
    for key, delta in deltas.items():
        name = key.replace("__", ".")
        out[name] = out[name] + delta
    return out


def by_name(doc: dict) -> dict:
    return {g["name"]: g for g in doc["groups"]}


# ---------------------------------------------------------------- exact cases


def test_disjoint_variants_change_only_their_own_layer(tmp_path):
    base = dyadic_base()
    half = torch.zeros(4, 4)
    half[:2] = -1.0  # 8 of 16 elements
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "v1", with_delta(base, model__layers__0__w=torch.full((4, 4), 0.5)))
    write_model(tmp_path / "v2", with_delta(base, model__layers__1__w=half))

    doc = run_analysis(str(tmp_path / "base"), [str(tmp_path / "v1"), str(tmp_path / "v2")])

    groups = by_name(doc)
    assert [g["name"] for g in doc["groups"]] == ["layers.0", "layers.1", "other"]
    layer0, layer1 = groups["layers.0"], groups["layers.1"]
    assert layer0["variants"][0] == {
        "changed": 16, "changed_share": 1.0, "positive": 16, "negative": 0, "balance": 1.0,
        "abs_sum": 8.0, "mean_abs": 0.5, "max_abs": 0.5,
    }
    assert layer0["variants"][1]["changed"] == 0
    assert layer0["variants"][1]["mean_abs"] is None and layer0["variants"][1]["balance"] is None
    assert layer1["variants"][0]["changed"] == 0
    assert layer1["variants"][1] == {
        "changed": 8, "changed_share": 0.5, "positive": 0, "negative": 8, "balance": -1.0,
        "abs_sum": 8.0, "mean_abs": 1.0, "max_abs": 1.0,
    }
    assert groups["other"]["variants"][0]["changed"] == groups["other"]["variants"][1]["changed"] == 0
    total = doc["total"]
    assert total["numel"] == 36 and doc["tensors"] == 3
    assert total["variants"][0]["changed_share"] == pytest.approx(16 / 36)
    for group in doc["groups"] + [total]:
        (pair,) = group["pairs"]
        assert pair["overlap"] == 0 and pair["overlap_share"] == 0.0 and pair["conflicts"] == 0
        assert pair["agreement"] is None and pair["mean_disagreement"] is None
    assert total["pairs"][0]["union"] == 24
    # Nothing conflicts: every order overwrites nothing; the tie goes to the
    # order with more |delta| mass first (equal here: 8 and 8), then listing.
    orders = doc["orders"]
    assert [e["overwritten_mass"] for e in orders["orders"]] == [0.0, 0.0]
    assert orders["suggested"]["order"] == [0, 1] and orders["listing_rank"] == 1


def test_ties_prefer_more_delta_mass_first(tmp_path):
    base = dyadic_base()
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "small", with_delta(base, model__layers__0__w=torch.full((4, 4), 0.25)))
    write_model(tmp_path / "big", with_delta(base, model__layers__1__w=torch.full((4, 4), -1.0)))
    doc = run_analysis(str(tmp_path / "base"), [str(tmp_path / "small"), str(tmp_path / "big")])
    orders = doc["orders"]
    assert orders["suggested"]["order"] == [1, 0]
    assert orders["suggested"]["labels"] == [str(tmp_path / "big"), str(tmp_path / "small")]
    assert orders["listing_rank"] == 2 and orders["suggested"]["overwritten_mass"] == 0.0


def _opposite(tmp_path, first, second):
    base = dyadic_base(1)
    mask = torch.zeros(4, 4)
    mask[1:3, :] = 1.0  # 8 elements of layers.0
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "up", with_delta(base, model__layers__0__w=0.5 * mask))
    write_model(tmp_path / "down", with_delta(base, model__layers__0__w=-0.25 * mask))
    return run_analysis(str(tmp_path / "base"), [str(tmp_path / first), str(tmp_path / second)])


def test_opposite_signs_agreement_zero_and_exact_conflict_mass(tmp_path):
    doc = _opposite(tmp_path, "up", "down")
    for group in (by_name(doc)["layers.0"], doc["total"]):
        (pair,) = group["pairs"]
        assert pair == {
            "i": 0, "j": 1, "overlap": 8, "union": 8, "overlap_share": 1.0, "agreeing": 0,
            "agreement": 0.0, "mean_disagreement": 0.75, "conflicts": 8,
            "conflict_mass_i": 4.0, "conflict_mass_j": 2.0,
        }
    assert doc["ordered_pairs"] == [
        {"higher": 0, "lower": 1, "conflicts": 8, "conflict_mass": 2.0, "share_of_lower": 1.0},
        {"higher": 1, "lower": 0, "conflicts": 8, "conflict_mass": 4.0, "share_of_lower": 1.0},
    ]
    orders = doc["orders"]
    assert orders["method"] == "all permutations" and orders["exact"] and orders["evaluated"] == 2
    best, worst = orders["orders"]
    assert best["order"] == [0, 1] and best["overwritten_mass"] == 2.0
    assert best["overwritten_elements"] == 8 and best["overwritten_share"] == pytest.approx(2 / 6)
    assert best["lost_mass"] == [0.0, 2.0] and best["lost_elements"] == [0, 8]
    assert best["lost_share"] == [0.0, 1.0]
    assert worst["order"] == [1, 0] and worst["overwritten_mass"] == 4.0
    assert orders["suggested"]["order"] == [0, 1] and orders["listing_rank"] == 1


def test_suggested_order_differs_from_listing_when_it_overwrites_less(tmp_path, capsys):
    doc = _opposite(tmp_path, "down", "up")  # the small change listed first
    orders = doc["orders"]
    assert orders["suggested"]["order"] == [1, 0]
    assert orders["suggested"]["overwritten_mass"] == 2.0
    assert orders["listing"]["overwritten_mass"] == 4.0 and orders["listing_rank"] == 2

    code = analyze.main([str(tmp_path / "base"), str(tmp_path / "down"), str(tmp_path / "up"), "-q"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert f"Order that overwrites least: V2 V1 = {tmp_path / 'up'} {tmp_path / 'down'}" in out.out
    # what the statistic measures, and where to choose an order by quality
    assert "predicts sign conflicts, not merge quality" in out.out
    assert "circuit-merge search" in out.out
    assert "Suggested" not in out.out
    assert "the listing order overwrites 4 (66.7%), rank 2" in out.out


def _simulate_sign_rule(deltas, order):
    """Kernel accumulation with no drops (processing lowest priority first):
    the |delta| mass and count of contributions later overwritten."""
    lost_mass, lost_count = 0.0, 0
    columns = list(zip(*[d.tolist() for d in deltas]))
    for values in columns:
        alive = []  # (variant, |d|) of the contributions in the accumulator
        sign = 0
        for j in reversed(order):
            d = values[j]
            if d == 0:
                continue
            s = 1 if d > 0 else -1
            if sign != 0 and s != sign:
                lost_mass += sum(m for _, m in alive)
                lost_count += len(alive)
                alive = []
            alive.append((j, abs(d)))
            sign = s
    return lost_mass, lost_count


@pytest.mark.parametrize("count,seed", [(3, 0), (4, 1)])
def test_overwritten_mass_matches_a_simulation_of_the_sign_rule(tmp_path, count, seed):
    g = torch.Generator().manual_seed(seed)
    base = {"model.layers.0.w": torch.randint(-8, 8, (6, 7), generator=g).float() / 4,
            "x.bias": torch.randint(-8, 8, (5,), generator=g).float() / 4}
    write_model(tmp_path / "base", base)
    paths, flat = [], []
    for k in range(count):
        variant = {}
        for name, tensor in base.items():
            sign = torch.randint(-1, 2, tensor.shape, generator=g).float()
            size = torch.randint(1, 5, tensor.shape, generator=g).float() / 4
            variant[name] = tensor + sign * size
        paths.append(str(write_model(tmp_path / f"v{k}", variant, shards=2)))
        flat.append(torch.cat([(variant[n] - base[n]).reshape(-1) for n in sorted(base)]))

    # a tiny chunk budget: several chunks per tensor, row blocks of one row
    doc = run_analysis(str(tmp_path / "base"), paths, chunk_budget=count * 7)
    orders = doc["orders"]
    assert orders["evaluated"] == math.factorial(count)
    for entry in orders["orders"]:
        mass, elements = _simulate_sign_rule(flat, entry["order"])
        assert entry["overwritten_mass"] == pytest.approx(mass, abs=1e-12)
        assert entry["overwritten_elements"] == elements
    best = min(_simulate_sign_rule(flat, list(p))[0] for p in itertools.permutations(range(count)))
    assert orders["suggested"]["overwritten_mass"] == pytest.approx(best, abs=1e-12)

    # pairwise statistics against direct computation
    total = doc["total"]
    for pair in total["pairs"]:
        a, b = flat[pair["i"]], flat[pair["j"]]
        both = (a != 0) & (b != 0)
        agree = both & (a * b > 0)
        assert pair["overlap"] == int(both.sum()) and pair["agreeing"] == int(agree.sum())
        assert pair["union"] == int(((a != 0) | (b != 0)).sum())
        assert pair["mean_disagreement"] == pytest.approx(float((a - b)[both].abs().mean()))
        assert pair["conflict_mass_i"] == pytest.approx(float(a[both & ~agree].abs().sum()))
    # the same numbers with one chunk per tensor
    again = run_analysis(str(tmp_path / "base"), paths)
    for mine, other in zip(again["total"]["pairs"] + again["total"]["variants"],
                           total["pairs"] + total["variants"]):
        assert mine == pytest.approx(other)
    assert [e["order"] for e in again["orders"]["orders"]] == [e["order"] for e in orders["orders"]]


def test_threshold_and_zero_deltas(tmp_path):
    base = {"w": torch.zeros(8)}
    write_model(tmp_path / "base", base)
    delta = torch.tensor([0.0, 1e-7, -1e-7, 2.5e-6, -3e-6, 0.25, 0.0, -0.5])
    write_model(tmp_path / "v", {"w": delta})
    doc = run_analysis(str(tmp_path / "base"), [str(tmp_path / "v")])
    (group,) = doc["groups"]
    assert group["name"] == "other"
    row = group["variants"][0]
    assert (row["changed"], row["positive"], row["negative"]) == (4, 2, 2)
    assert row["max_abs"] == 0.5
    assert doc["orders"]["suggested"]["order"] == [0]
    loose = run_analysis(str(tmp_path / "base"), [str(tmp_path / "v")], threshold=0.0)
    assert loose["groups"][0]["variants"][0]["changed"] == 6  # exact zeros never count
    strict = run_analysis(str(tmp_path / "base"), [str(tmp_path / "v")], threshold=0.3)
    assert strict["groups"][0]["variants"][0]["changed"] == 1


def test_layer_groups():
    assert layer_group("model.layers.12.mlp.up_proj.weight") == "layers.12"
    assert layer_group("transformer.h.3.attn.c_attn.weight") == "layers.3"
    assert layer_group("model.embed_tokens.weight") == "embeddings"
    assert layer_group("transformer.wte.weight") == "embeddings"
    assert layer_group("lm_head.weight") == "head"
    assert layer_group("model.norm.weight") == "other"
    assert layer_group("w") == "other"


def test_mixed_dtypes_shards_and_non_float_tensors(tmp_path):
    base = {"model.layers.0.w": torch.zeros(3, 5, dtype=torch.bfloat16),
            "model.embed_tokens.weight": torch.zeros(6, 2, dtype=torch.float16),
            "position_ids": torch.arange(4)}
    write_model(tmp_path / "base", base, shards=2)
    v = {"model.layers.0.w": torch.full((3, 5), 0.5, dtype=torch.float32),
         "model.embed_tokens.weight": torch.full((6, 2), -0.25, dtype=torch.float16),
         "position_ids": torch.arange(4) + 1}
    write_model(tmp_path / "v", v)
    doc = run_analysis(str(tmp_path / "base"), [str(tmp_path / "v")])
    assert doc["skipped_tensors"] == ["position_ids"]
    groups = by_name(doc)
    assert groups["layers.0"]["variants"][0]["abs_sum"] == 7.5
    assert groups["embeddings"]["variants"][0]["negative"] == 12


# ---------------------------------------------------------------- transformers dirs


def test_transformers_model_directories(llama_family):
    paths = [str(p) for p in llama_family.variants]
    doc = run_analysis(str(llama_family.base), paths)
    names = [g["name"] for g in doc["groups"]]
    assert names[0] == "embeddings" and names[-1] == "head"
    assert "layers.0" in names and "layers.1" in names and "other" in names
    total = doc["total"]
    assert total["numel"] == sum(g["numel"] for g in doc["groups"])
    for k in range(len(paths)):
        assert total["variants"][k]["changed"] == sum(g["variants"][k]["changed"] for g in doc["groups"])
        # build_family perturbs a random half of every weight
        assert 0.45 < total["variants"][k]["changed_share"] < 0.55
    for pair in total["pairs"]:
        assert 0.2 < pair["overlap_share"] < 0.45 and 0.4 < pair["agreement"] < 0.6
    assert doc["orders"]["evaluated"] == 6


# ---------------------------------------------------------------- command line


def _two_variants(tmp_path):
    base = dyadic_base()
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "a", with_delta(base, model__layers__0__w=torch.full((4, 4), 0.5)))
    write_model(tmp_path / "b", with_delta(base, model__layers__0__w=torch.full((4, 4), -0.25)))
    return [str(tmp_path / n) for n in ("base", "a", "b")]


def test_command_text_json_and_progress(tmp_path, capsys):
    paths = _two_variants(tmp_path)
    out_json = tmp_path / "analysis.json"
    assert analyze.main(paths + ["--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "analyzing" in captured.err and f"wrote {out_json}" in captured.err
    for text in ("Per variant (all layers)", "Per pair (all layers", "Changed share per layer",
                 "Priority orders (all permutations, 2 evaluated)",
                 f"Order that overwrites least: V1 V2 = {paths[1]} {paths[2]}"):
        assert text in captured.out
    doc = json.loads(out_json.read_text())
    assert doc["format"] == "circuit-merge-analysis" and doc["version"] == 1
    assert doc == json.loads(json.dumps(run_analysis(paths[0], paths[1:])))

    assert analyze.main(paths + ["--json", "-", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["variants"] == paths[1:]


@pytest.mark.parametrize("case", [
    "missing", "not_safetensors", "shape", "missing_tensor", "extra_tensor", "float_vs_int",
    "threshold", "one_path", "nan", "json_dir", "pickle",
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    paths = _two_variants(tmp_path)
    base = dyadic_base()
    extra = []
    expect = []
    if case == "missing":
        paths[2] = str(tmp_path / "nowhere")
        expect = ["variant 2", "nowhere", "no such directory"]
    elif case == "not_safetensors":
        (tmp_path / "empty").mkdir()
        paths[1] = str(tmp_path / "empty")
        expect = ["variant 1", "no .safetensors files"]
    elif case == "shape":
        bad = dict(base, **{"model.layers.1.w": torch.zeros(4, 5)})
        paths[2] = str(write_model(tmp_path / "c", bad))
        expect = ["shape mismatch", "'model.layers.1.w'", "variant 2", "[4, 5]"]
    elif case == "missing_tensor":
        bad = {k: v for k, v in base.items() if k != "model.norm.weight"}
        paths[1] = str(write_model(tmp_path / "c", bad))
        expect = ["'model.norm.weight' is missing from variant 1", str(tmp_path / "c")]
    elif case == "extra_tensor":
        bad = dict(base, **{"model.layers.9.w": torch.zeros(2)})
        paths[2] = str(write_model(tmp_path / "c", bad))
        expect = ["'model.layers.9.w' of variant 2", "not in the base model"]
    elif case == "float_vs_int":
        bad = dict(base, **{"model.norm.weight": torch.ones(4, dtype=torch.int32)})
        paths[1] = str(write_model(tmp_path / "c", bad))
        expect = ["dtype mismatch", "'model.norm.weight'"]
    elif case == "threshold":
        extra = ["--threshold", "-1"]
        expect = ["--threshold", "meaningful_change_threshold"]
    elif case == "one_path":
        paths = paths[:1]
        expect = ["at least one VARIANT"]
    elif case == "nan":
        bad = with_delta(base, model__layers__1__w=torch.full((4, 4), float("nan")))
        paths[2] = str(write_model(tmp_path / "c", bad))
        expect = ["NaN or Inf", "'model.layers.1.w'", "variant 2"]
    elif case == "json_dir":
        extra = ["--json", str(tmp_path / "no" / "such" / "dir.json")]
        expect = ["--json", "no such directory"]
    elif case == "pickle":
        (tmp_path / "pt").mkdir()
        torch.save(base, str(tmp_path / "pt" / "pytorch_model.bin"))
        paths[1] = str(tmp_path / "pt")
        expect = ["variant 1", "pickled", "convert it"]
    code = analyze.main(paths + extra + ["-q"])
    assert_refused(code, capsys.readouterr(), "circuit-merge analyze", expect)


def test_cli_subcommand(tmp_path, capsys):
    from circuit_merge_plugin.cli import main as cli

    paths = _two_variants(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main(["analyze", *paths, "-q"])
    assert stop.value.code == 0
    assert "Order that overwrites least" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["analyze", paths[0], str(tmp_path / "nowhere"), "-q"])
    assert stop.value.code == 2


# ---------------------------------------------------------------- charts and HTML


def test_png_charts_and_html_in_chromium(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = _two_variants(tmp_path)
    page, charts = tmp_path / "analysis.html", tmp_path / "charts"
    assert analyze.main(paths + ["--html", str(page), "--png-dir", str(charts), "-q"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in charts.iterdir())
    assert names == ["agreement.png", "changed_share.png", "conflict_loss.png", "overlap.png"]
    for name in names:
        assert (charts / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert html.count('<img class="chart"') == 4 and "src=\"http" not in html
    assert "Order that overwrites least: V1 V2" in html and "not merge quality" in html

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary (apt-get install -y chromium) to render the HTML")
    result = probe_charts(chromium, page, tmp_path)
    assert result["charts"] == "4/4", result
    assert set(result["decoded"]) == set(names)
    assert all(width > 100 for width in result["decoded"].values()), result
    assert result["control"] == 0, "the broken control image must not decode"


@pytest.mark.parametrize("count", [8, 17])
def test_many_variants_use_a_greedy_order(tmp_path, count):
    g = torch.Generator().manual_seed(count)
    base = {"model.layers.0.w": torch.zeros(3, 5)}
    write_model(tmp_path / "base", base)
    paths, flat = [], []
    for k in range(count):
        delta = torch.randint(-1, 2, (3, 5), generator=g).float() * (k + 1) / 4
        paths.append(str(write_model(tmp_path / f"v{k}", {"model.layers.0.w": delta})))
        flat.append(delta.reshape(-1))
    doc = run_analysis(str(tmp_path / "base"), paths)
    orders = doc["orders"]
    assert orders["method"].startswith("greedy") and orders["exact"] == (count <= 16)
    assert 2 <= orders["evaluated"] <= 3
    suggested, listing = orders["suggested"], orders["listing"]
    assert suggested["overwritten_mass"] <= listing["overwritten_mass"]
    if count <= 16:
        for entry in orders["orders"]:  # exact: equal to the simulation
            assert entry["overwritten_mass"] == pytest.approx(_simulate_sign_rule(flat, entry["order"])[0])
        # no swap of two variants improves the suggested order
        best = suggested["overwritten_mass"]
        order = suggested["order"]
        for a, b in itertools.combinations(range(count), 2):
            trial = list(order)
            trial[a], trial[b] = trial[b], trial[a]
            assert _simulate_sign_rule(flat, trial)[0] >= best - 1e-9
    else:  # pairwise: an upper bound of the simulated mass
        for entry in orders["orders"]:
            assert entry["overwritten_mass"] >= _simulate_sign_rule(flat, entry["order"])[0] - 1e-9
