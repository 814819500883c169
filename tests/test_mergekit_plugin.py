"""`merge_method: circuit` through the real, unmodified ``mergekit-yaml``.

These tests run under whichever mergekit the environment has (0.1.5 or 0.1.4):
the recipe language and the expected results are the same for both. Every
merge is started by one module fixture, a few at a time (most of a small
merge's time is the interpreter importing torch, transformers and mergekit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from circuit_merge_plugin.core.exact import same_bytes
from circuit_merge_plugin.core.kernel import circuit_merge
from circuit_merge_plugin.core.params import CircuitParams
from conftest import load_tensors
from mergekit_runs import Runs, check

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def recipe(family, parameters=None, model_parameters=None, **extra):
    models = []
    for index, path in enumerate(family.variants):
        entry = {"model": str(path)}
        if model_parameters and model_parameters.get(index) is not None:
            entry["parameters"] = model_parameters[index]
        models.append(entry)
    config = {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": models,
        "dtype": "float32",
    }
    if parameters is not None:
        config["parameters"] = parameters
    config.update(extra)
    return config


STOCHASTIC = {"temperature": 0.3, "base_droprate": 0.4, "epsilon": 0.2, "seed": 7}
PER_LAYER = {
    "temperature": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}],
    "base_droprate": [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}],
    "rescale": [{"filter": "embed", "value": False}, {"value": True}],
    "seed": 9,
}
LISTED_TEMPERATURE = [
    {"filter": "mlp", "value": 1.0},
    {"filter": "self_attn", "value": 0.5},
    {"value": 0.0},
]
LISTED_THRESHOLD = [{"filter": "self_attn", "value": 0.005}, {"value": 1.0e-6}]


def base_listed_recipe(family):
    """Base listed second in models:, per-layer values, every drop_rate 0."""
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
            "temperature": LISTED_TEMPERATURE,
            "meaningful_change_threshold": LISTED_THRESHOLD,
            "rescale": False,
            "seed": 5,
        },
        "dtype": "float32",
        "tokenizer": {"source": "base"},
    }


#: Per-layer values and no seed at all (neither `seed:` nor --random-seed).
DRAWN = {key: value for key, value in PER_LAYER.items() if key != "seed"}
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


def _family_with_nan(family, root):
    """The family with its last variant copied and one NaN put in NAN_TENSOR."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = root / "variant_nan"
    shutil.copytree(family.variants[-1], copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors[NAN_TENSOR][0, 0] = float("nan")
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return type(family)(base=family.base, variants=[*family.variants[:-1], copy])


BAD = {
    "bad_temperature": ({"temperature": 1.5}, None, "temperature must be in [0, 1]"),
    # mergekit 0.1.4's own recipe parser refuses non-numbers first, naming it.
    "bad_threshold": (
        {"meaningful_change_threshold": "lots"},
        None,
        "meaningful_change_threshold",
    ),
    "bad_drop_rate": ({}, {1: {"drop_rate": 2}}, "drop_rate must be in [0, 1)"),
    "bad_per_layer": (
        {"base_droprate": [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]},
        None,
        "base_droprate must be in [0, 1), got 1.0",
    ),
    "bad_report": ({"report": 5}, None, "report must be"),
}


#: ``records`` label -> the ``merges`` job that is the same merge (same recipe, same options).
RECORDS_FROM_MERGES = {"option_seed": "seed5a", "recipe_seed": "recipe_seed1",
                       "bad_drop_rate": "bad_drop_rate"}
RECORDS = {job: label for label, job in RECORDS_FROM_MERGES.items()}


@pytest.fixture(scope="module")
def merges(llama_family, qwen_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    pair = type(llama_family)(base=llama_family.base, variants=llama_family.variants[:2])
    no_base = recipe(llama_family, {"seed": 1})
    del no_base["base_model"]
    bf16 = recipe(llama_family, {"seed": 2}, dtype="bfloat16", out_dtype="float16")
    qwen_bf16 = recipe(
        qwen_family, {"temperature": 1.0, "base_droprate": 0.0}, dtype="bfloat16",
        out_dtype="float32",
    )
    jobs = {
        "llama": (recipe(llama_family, STOCHASTIC), ()),
        "qwen": (recipe(qwen_family, STOCHASTIC), ()),
        "sign_rule": (recipe(pair, {"base_droprate": 0.0, "seed": 3}), ()),
        "seed5a": (recipe(llama_family), ("--random-seed", "5")),
        "seed5b": (recipe(llama_family), ("--random-seed", "5")),
        "seed6": (recipe(llama_family), ("--random-seed", "6")),
        "recipe_seed1": (recipe(llama_family, {"seed": 11}), ("--random-seed", "1")),
        "recipe_seed2": (recipe(llama_family, {"seed": 11}), ("--random-seed", "2")),
        "per_layer": (recipe(llama_family, PER_LAYER, {0: {"drop_rate": 0.1}}), ()),
        "base_listed": (base_listed_recipe(llama_family), ()),
        "bf16": (bf16, ()),
        "qwen_bf16": (qwen_bf16, ("--random-seed", "7")),
        "no_base": (no_base, ()),
        # the contribution report: recipe parameter (0.1.5) into the output itself
        "report_recipe": (recipe(llama_family, dict(STOCHASTIC, report=str(root / "report_recipe"))), ()),
    }
    for label, (parameters, per_model, _) in BAD.items():
        jobs[label] = (recipe(llama_family, parameters, per_model), ())
    # The ``records`` merges (their stderr and report header are checked), in
    # the same batch: two of their own, and three that are merges above, run
    # once with the report written through CIRCUIT_MERGE_REPORT.
    jobs["drawn_seed"] = (recipe(llama_family, DRAWN, {0: {"drop_rate": 0.1}}), ())
    jobs["nan_midway"] = (recipe(_family_with_nan(llama_family, root / "nan_family")), ())
    runs = Runs(max_parallel=3)
    for label, (config, args) in jobs.items():
        reported = RECORDS.get(label, label if label in ("drawn_seed", "nan_midway") else None)
        env = {"CIRCUIT_MERGE_REPORT": str(root / f"{reported}-report.json")} if reported else None
        runs.mergekit_yaml(label, BIN, config, root / label, *args, env=env)
    # ... and the environment variable (either mergekit)
    runs.mergekit_yaml(
        "report_env", BIN, recipe(llama_family, STOCHASTIC), root / "report_env",
        env={"CIRCUIT_MERGE_REPORT": str(root / "env-report.json")},
    )
    results = runs.wait(timeout=1800)  # a busy 2-core machine takes minutes
    return root, results


def merged(merges, label):
    root, results = merges
    check(results[label], f"mergekit-yaml ({label})")
    return load_tensors(root / label)


def expected_tensors(family, params_for, drop_rate=None, order=None, cast=None):
    """Apply the kernel directly to every tensor of the family."""
    base = load_tensors(family.base)
    variants = [load_tensors(path) for path in family.variants]
    if order is not None:
        variants = [variants[i] for i in order]
    prepare = cast or (lambda t: t)
    expected = {}
    for name, tensor in base.items():
        expected[name] = circuit_merge(
            prepare(tensor),
            [prepare(v[name]) for v in variants],
            params_for(name),
            drop_rate=drop_rate,
            name=name,
        )
    return expected


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    mismatched = [
        name
        for name in expected
        if not same_bytes(actual[name], expected[name])
    ]
    assert not mismatched, f"tensors differ from the kernel: {mismatched[:5]}"


@pytest.mark.parametrize("label", ["llama", "qwen"])
def test_every_tensor_equals_the_kernel(merges, request, label):
    family = request.getfixturevalue(f"{label}_family")
    params = CircuitParams(**STOCHASTIC)
    assert_same_tensors(merged(merges, label), expected_tensors(family, lambda _: params))


def test_output_is_a_complete_model(merges):
    merged(merges, "llama")
    out = merges[0] / "llama"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").exists() or (out / "tokenizer.model").exists()
    card = (out / "README.md").read_text()
    assert "Circuit-Merge" in card
    assert "jsgreenawalt/ml-model-mergetools" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the quick brown fox", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


def test_all_drop_rates_zero_is_exact_sign_rule(merges, llama_family):
    """Two variants, base_droprate 0: nothing random, the result is the sign rule."""
    result = merged(merges, "sign_rule")
    base = load_tensors(llama_family.base)
    high, low = (load_tensors(p) for p in llama_family.variants[:2])
    threshold = 2e-6
    for name in base:
        d_high = high[name] - base[name]
        d_low = low[name] - base[name]
        d_high = torch.where(d_high.abs() < threshold, 0.0, d_high)
        d_low = torch.where(d_low.abs() < threshold, 0.0, d_low)
        agree = (d_high != 0) & (d_low != 0) & ((d_high > 0) == (d_low > 0))
        delta = torch.where(d_high != 0, d_high, d_low)
        delta = torch.where(agree, (d_low + d_high) / 2, delta)
        assert torch.equal(result[name], base[name] + delta), name


def test_random_seed_option_gives_determinism(merges, llama_family):
    a, b, c = (merged(merges, label) for label in ("seed5a", "seed5b", "seed6"))
    assert_same_tensors(a, b)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[name], c[name])
    # --random-seed 5 means seed 5: the kernel with seed=5 gives the same bytes.
    expected = expected_tensors(llama_family, lambda _: CircuitParams(seed=5))
    assert_same_tensors(a, expected)


def test_recipe_seed_wins_over_random_seed(merges, llama_family):
    first, second = merged(merges, "recipe_seed1"), merged(merges, "recipe_seed2")
    assert_same_tensors(first, second)
    assert_same_tensors(first, expected_tensors(llama_family, lambda _: CircuitParams(seed=11)))


def test_per_layer_and_per_model_parameters(merges, llama_family):
    def params_for(name):
        return CircuitParams(
            temperature=1.0 if "mlp" in name else 0.0,
            base_droprate=0.2 if "self_attn" in name else 0.6,
            rescale="embed" not in name,
            seed=9,
        )

    expected = expected_tensors(llama_family, params_for, drop_rate=[0.1, None, None])
    assert_same_tensors(merged(merges, "per_layer"), expected)


def test_priority_is_the_listing_order_with_the_base_listed(merges, llama_family):
    def params_for(name):
        return CircuitParams(
            temperature=1.0 if "mlp" in name else 0.5 if "self_attn" in name else 0.0,
            meaningful_change_threshold=0.005 if "self_attn" in name else 1.0e-6,
            rescale=False,
            seed=5,
        )

    result = merged(merges, "base_listed")
    listed = expected_tensors(llama_family, params_for, [0.0] * 3, order=(2, 0, 1))
    assert_same_tensors(result, listed)
    other = expected_tensors(llama_family, params_for, [0.0] * 3)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(result[name], other[name])  # the order matters


def test_bf16_with_out_dtype(merges, llama_family):
    result = merged(merges, "bf16")
    assert {t.dtype for t in result.values()} == {torch.float16}
    # The kernel sees bf16 inputs (mergekit's dtype); its bf16 result is cast.
    expected = expected_tensors(
        llama_family, lambda _: CircuitParams(seed=2), cast=lambda t: t.bfloat16()
    )
    assert_same_tensors(result, {k: v.to(torch.float16) for k, v in expected.items()})


def test_qwen_bf16_inputs_float32_output_random_seed(merges, qwen_family):
    result = merged(merges, "qwen_bf16")
    params = CircuitParams(temperature=1.0, base_droprate=0.0, seed=7)
    expected = expected_tensors(qwen_family, lambda _: params, cast=lambda t: t.bfloat16())
    assert_same_tensors(result, {k: v.float() for k, v in expected.items()})
    assert any(name.endswith(".bias") for name in result)  # Qwen2's q/k/v biases


@pytest.mark.parametrize("label", sorted(BAD))
def test_bad_parameter_stops_the_merge(merges, label):
    root, results = merges
    result = results[label]
    assert result.returncode != 0
    assert BAD[label][2] in result.stderr
    assert not list((root / label).glob("*.safetensors"))


def test_base_model_is_required(merges):
    result = merges[1]["no_base"]
    assert result.returncode != 0
    assert "base" in result.stderr.lower()


# ---------------------------------------------------------------- the report ---------


def _check_report_file(path, family, params, merged_tensors):
    """A complete, consistent report whose counts are the kernel's."""
    from circuit_merge_plugin.core.kernel import circuit_merge_with_stats
    from circuit_merge_plugin.insight.report import check_report, load_report

    report = load_report(str(path))
    assert check_report(report) == []
    assert report["variants"] == [str(p) for p in family.variants]
    assert report["parameters"] == CircuitParams(**params).as_dict()
    assert set(report["tensors"]) == set(merged_tensors)
    base = load_tensors(family.base)
    variants = [load_tensors(p) for p in family.variants]
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        _, stats = circuit_merge_with_stats(
            base[name], [v[name] for v in variants], CircuitParams(**params), name=name
        )
        assert report["tensors"][name] == stats.as_dict(), name
    return report


def test_report_from_the_environment_variable(merges, llama_family):
    """CIRCUIT_MERGE_REPORT=PATH (mergekit 0.1.4 and 0.1.5): same model bytes, a report."""
    with_report = merged(merges, "report_env")
    assert_same_tensors(with_report, merged(merges, "llama"))
    report = _check_report_file(merges[0] / "env-report.json", llama_family, STOCHASTIC, with_report)
    total = sum(row["kept"] for entry in report["tensors"].values() for row in entry["variants"])
    assert total > 0


def test_report_recipe_parameter(merges, llama_family, api):
    root, results = merges
    if api == "0.1.4":  # its recipe schema holds numbers only: refused by mergekit
        assert results["report_recipe"].returncode != 0
        assert "report" in results["report_recipe"].stderr
        assert not list((root / "report_recipe").glob("*.safetensors"))
        return
    with_report = merged(merges, "report_recipe")
    assert_same_tensors(with_report, merged(merges, "llama"))
    out = root / "report_recipe"
    _check_report_file(out / "circuit_merge_report.json", llama_family, STOCHASTIC, with_report)
    assert not list(out.glob(".*.tmp"))  # atomic rewrites leave no temporary file
    import subprocess

    shown = subprocess.run(
        [str(BIN / "circuit-merge"), "report", str(out)], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "V1 = " + str(llama_family.variants[0]) in shown.stdout


# ---------------------------------------------------------------- errors and records ---


@pytest.fixture(scope="module")
def records(merges):
    """Merges whose stderr and report header are checked, each writing its
    report through CIRCUIT_MERGE_REPORT (either mergekit): run by ``merges``
    (``drawn_seed``: no seed anywhere, the drawn seed is printed and recorded;
    ``nan_midway``: a NaN in one tensor of one model, the merge stops midway;
    ``option_seed``, ``recipe_seed``, ``bad_drop_rate``: the merges of
    :data:`RECORDS_FROM_MERGES`)."""
    root, results = merges
    view = {label: results[label] for label in ("drawn_seed", "nan_midway")}
    view.update({label: results[job] for label, job in RECORDS_FROM_MERGES.items()})
    return root, view


def _last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


def test_out_of_range_drop_rate_names_the_model(records, llama_family):
    """One clear line (the traceback's last) names the model as listed in the recipe,
    while mergekit plans: no tensor was merged, no report was started."""
    root, results = records
    result = results["bad_drop_rate"]
    assert result.returncode != 0
    line = _last_line(result.stderr)
    assert line.startswith("ValueError: drop_rate must be in [0, 1), got 2"), line
    assert f"(model {llama_family.variants[1]}" in line, line
    assert not (root / "bad_drop_rate-report.json").exists()
    assert not list((root / "bad_drop_rate").glob("*.safetensors"))


def _report_of(records, label):
    return json.loads((records[0] / f"{label}-report.json").read_text())


def test_drawn_seed_is_printed_once_and_recorded(records, llama_family):
    root, results = records
    result = results["drawn_seed"]
    check(result, "mergekit-yaml (drawn_seed)")
    lines = [line for line in result.stderr.splitlines() if "no seed given" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    seed = int(lines[0].split("drew seed ")[1].split()[0])
    assert lines[0].endswith(
        f"circuit: no seed given; drew seed {seed} (reproduce with `seed: {seed}` "
        f"in the recipe or mergekit-yaml --random-seed {seed})")
    report = _report_of(records, "drawn_seed")
    assert report["seed_source"] == "drawn"
    assert report["parameters"]["seed"] == seed
    # the printed seed is the one used: the kernel with it gives the same bytes

    def params_for(name):
        return CircuitParams(
            temperature=1.0 if "mlp" in name else 0.0,
            base_droprate=0.2 if "self_attn" in name else 0.6,
            rescale="embed" not in name,
            seed=seed,
        )

    expected = expected_tensors(llama_family, params_for, drop_rate=[0.1, None, None])
    assert_same_tensors(merged(records, "drawn_seed"), expected)


def test_a_given_seed_prints_nothing(records):
    for label, source, seed in (("option_seed", "random_seed option", 5), ("recipe_seed", "recipe", 11)):
        result = records[1][label]
        check(result, label)
        assert "no seed given" not in result.stderr
        report = _report_of(records, label)
        assert (report["seed_source"], report["parameters"]["seed"]) == (source, seed)
        assert report["finished"] is True


def test_a_finished_merge_says_so(records):
    report = _report_of(records, "drawn_seed")
    tensors = merged(records, "drawn_seed")
    assert report["finished"] is True
    assert report["tensors_merged"] == len(report["tensors"]) == len(tensors)


def test_a_merge_that_failed_midway_says_so(records):
    result = records[1]["nan_midway"]
    assert result.returncode != 0
    line = _last_line(result.stderr)
    assert "NaN or Inf" in line and NAN_TENSOR in line, line
    report = _report_of(records, "nan_midway")
    assert report["finished"] is False
    assert 0 < report["tensors_merged"] == len(report["tensors"]) < 21
    assert NAN_TENSOR not in report["tensors"]


def test_recipe_parameters_in_the_report(records, llama_family):
    """As the recipe gave them: per-layer filter lists and per-model values."""
    report = _report_of(records, "drawn_seed")
    v1, v2, v3 = (str(p) for p in llama_family.variants)
    assert report["recipe_parameters"] == {
        "parameters": DRAWN,
        "models": [{"model": v1, "parameters": {"drop_rate": 0.1}}, {"model": v2}, {"model": v3}],
    }
