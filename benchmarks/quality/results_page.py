"""Analysis of the benchmark's scores, the markdown report and the charts.

Every choice is made on the validation split (:mod:`benchmarks.quality.select`):

* each mergekit method's setting (scale, density) per family, on merge seed 0;
* circuit's preset (temperature, base_droprate, lambda) and its order rule,
  once, across both expert families and every training seed.

The test split is only read to report the selected settings (over every merge
seed) and the order rules at the selected preset.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from benchmarks.quality import select as S

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della")
#: Gain retained is averaged over the tasks whose expert beat the base by at
#: least this much on test.
GAIN_MIN = 0.02
#: The target: circuit at least this far above the best mergekit method.
TARGET_MARGIN = 0.01


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt_settings(settings: dict) -> str:
    shown = []
    for key, value in settings.items():
        if key == "weight" and value == 1.0:
            continue
        short = {"temperature": "T", "base_droprate": "bd", "density": "d",
                 "lambda": "λ", "weight": "w"}.get(key, key)
        shown.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(shown) or "-"


def _per_seed(choice: Dict[str, str]) -> str:
    """'x' when every family chose x, else 'seed 0: x; seed 1: y'."""
    if len(set(choice.values())) <= 1:
        return next(iter(choice.values()), "-")
    return "; ".join(f"seed {f.rsplit('-', 1)[1]}: {c}" for f, c in choice.items())


class Scorer:
    def __init__(self, references: Dict[str, dict], tasks: Sequence[str]):
        self.references = references
        self.tasks = list(tasks)

    def mean(self, scores: Dict[str, float]) -> float:
        return _mean([scores[t] for t in self.tasks])

    def gained_tasks(self, family: str) -> List[str]:
        ref = self.references[family]
        return [t for t in self.tasks
                if ref["experts"][t]["test"][t] - ref["base"]["test"][t] >= GAIN_MIN]

    def gain_retained(self, family: str, scores: Dict[str, float]) -> float:
        ref = self.references[family]
        return _mean([
            (scores[t] - ref["base"]["test"][t]) / (ref["experts"][t]["test"][t] - ref["base"]["test"][t])
            for t in self.gained_tasks(family)
        ])


def _row(name: str, detail: str, runs: List[tuple], scorer: Scorer, kind: str) -> dict:
    """Test summary over runs [(family, {"test": ...})]: each family (training
    seed) weighs the same, its merge seeds averaged first; ``std`` is over
    training seeds, ``seed_std`` the mean std over merge seeds."""
    tasks = scorer.tasks
    grouped: Dict[str, List[dict]] = {}
    for f, r in runs:
        grouped.setdefault(f, []).append(r)
    fam = {}
    for f, rs in grouped.items():
        means = [scorer.mean(r["test"]) for r in rs]
        fam[f] = {
            "mean": _mean(means),
            "seed_std": _std(means),
            "gain_retained": _mean([scorer.gain_retained(f, r["test"]) for r in rs]),
            "per_task": {t: _mean([r["test"][t] for r in rs]) for t in tasks},
            "n": len(rs),
        }
    means = [v["mean"] for v in fam.values()]
    gains = [v["gain_retained"] for v in fam.values()]
    return {
        "name": name, "detail": detail, "kind": kind, "families": list(fam), "by_family": fam,
        "per_task": {t: _mean([v["per_task"][t] for v in fam.values()]) for t in tasks},
        "mean": _mean(means), "std": _std(means),
        "seed_std": _mean([v["seed_std"] for v in fam.values()]),
        "gain_retained": _mean(gains), "gain_retained_std": _std(gains),
    }


def paired(row: dict, reference: dict) -> dict:
    """Mean over shared families (training seeds) of (row - reference)."""
    shared = [f for f in row["by_family"] if f in reference["by_family"]]
    diffs = {f: row["by_family"][f]["mean"] - reference["by_family"][f]["mean"] for f in shared}
    return {"mean": _mean(list(diffs.values())), "std": _std(list(diffs.values())),
            "per_family": diffs, "families": shared}


def analyse(records: List[dict], references: Dict[str, dict], context: dict) -> dict:
    tasks = context["tasks"]
    fids = context["families"]
    m0 = context["profile"]["merge_seeds"][0]
    scorer = Scorer(references, tasks)
    kinds = [k for k in context["profile"]["kinds"] if any(references[f]["kind"] == k for f in fids)]
    by_kind = {k: [f for f in fids if references[f]["kind"] == k] for k in kinds}
    preset = context["picked_preset"]
    rule = context["picked_rule"]
    orders = context["orders"]
    selected = context["selected"]

    tables = {}
    for kind, fams in by_kind.items():
        rows = [
            _row("base", "the generalist base model",
                 [(f, references[f]["base"]) for f in fams], scorer, "reference"),
            _row("experts (each on its own task)", "upper reference, not a merge",
                 [(f, {"test": {t: references[f]["experts"][t]["test"][t] for t in tasks}}) for f in fams],
                 scorer, "reference"),
        ]
        for method in MERGEKIT_METHODS:
            runs, choice = [], {}
            for f in fams:
                settings = selected[f][method]
                choice[f] = _fmt_settings(settings)
                runs += [(f, r) for r in S.find(records, family=f, method=method, settings=settings)
                         if "test" in r and "selected" in r["roles"]]
            rows.append(_row(method + (" (tuned on val)" if method != "linear" else ""),
                             _per_seed(choice), runs, scorer, "mergekit"))
        runs = [(f, r) for f in fams for r in S.find(records, family=f, role="circuit-default") if "test" in r]
        rows.append(_row("circuit defaults", f"{_fmt_settings(context['circuit_default'])}, order: {rule}",
                         runs, scorer, "circuit"))
        runs = [(f, r) for f in fams for r in S.find(records, family=f, role="circuit-tuned") if "test" in r]
        choice = {f: _fmt_settings(selected[f]["circuit"]) for f in fams if "circuit" in selected[f]}
        if runs:
            rows.append(_row("circuit (tuned on val per family)",
                             f"{_per_seed(choice)}; order: {context['grid_rule']}", runs, scorer, "circuit-tuned"))
        runs = [(f, r) for f in fams for r in S.find(records, family=f, role="circuit-recommended") if "test" in r]
        rows.append(_row("circuit recommended", f"{_fmt_settings(preset)}, order: {rule}",
                         runs, scorer, "circuit-headline"))
        headline = rows[-1]
        for r in rows:
            r["vs_headline"] = paired(r, headline)
        mergekit_rows = [r for r in rows if r["kind"] == "mergekit"]
        best = max(mergekit_rows, key=lambda r: r["mean"])
        vs = paired(headline, best)
        tuned_row = next((r for r in rows if r["kind"] == "circuit-tuned"), None)
        vs_tuned = paired(tuned_row, best) if tuned_row else None
        tables[kind] = {
            "families": fams,
            "rows": rows,
            "target": {
                "circuit_mean": headline["mean"],
                "best_mergekit_row": best["name"],
                "best_mergekit_mean": best["mean"],
                "difference": vs["mean"],
                "difference_per_family": vs["per_family"],
                "met": bool(vs["mean"] >= TARGET_MARGIN),
                "tuned_circuit_mean": tuned_row["mean"] if tuned_row else float("nan"),
                "tuned_difference": vs_tuned["mean"] if vs_tuned else float("nan"),
                "tuned_difference_per_family": vs_tuned["per_family"] if vs_tuned else {},
            },
            "scale_curves": _scale_curves(records, fams, m0, scorer, context),
        }

    # both families together: the mean of the kinds' means; paired over all
    both_rows = []
    for i, row in enumerate(tables[kinds[0]]["rows"]):
        same = [tables[k]["rows"][i] for k in kinds]
        merged_fam = {f: v for r in same for f, v in r["by_family"].items()}
        both_rows.append({"name": row["name"], "kind": row["kind"],
                          "by_kind": {k: r["mean"] for k, r in zip(kinds, same)},
                          "mean": _mean([r["mean"] for r in same]),
                          "by_family": merged_fam})
    head_both = both_rows[-1]
    for r in both_rows:
        r["vs_headline"] = paired(r, head_both)

    # the preset and rule choices (validation), with test where it exists
    presets = S.preset_table(records, fids, m0, tasks)
    for e in presets:
        e["val_by_kind"] = {k: _mean([e["val"][f] for f in fams]) for k, fams in by_kind.items()}
    default_entry = next((e for e in presets if S.skey(e["settings"]) == S.skey(context["circuit_default"])), None)
    rules = S.rule_table(records, fids, preset, orders, m0, tasks)
    for e in rules:
        e["val_by_kind"] = {k: _mean([e["val"][f] for f in fams]) for k, fams in by_kind.items()}
        tests = {}
        for f in fids:
            found = S.find(records, family=f, method="circuit", settings=preset, order=orders[f][e["rule"]], seed=m0)
            if found and "test" in found[0]:
                tests[f] = scorer.mean(found[0]["test"])
        e["test_by_kind"] = {k: _mean([tests[f] for f in fams if f in tests]) for k, fams in by_kind.items()}
        e["test_mean"] = _mean(list(e["test_by_kind"].values()))
    return {
        "tasks": tasks,
        "kinds": kinds,
        "tables": tables,
        "both": both_rows,
        "presets": presets,
        "default_preset": default_entry,
        "rules": rules,
        "gained_tasks": {f: scorer.gained_tasks(f) for f in fids},
        "references": references,
    }


def _scale_curves(records, fams, m0, scorer, context) -> Dict[str, Dict[str, float]]:
    """Validation mean accuracy at each scale (merge seed m0, mean over the
    kind's training seeds), the best over each method's other settings."""
    curves: Dict[str, Dict[str, float]] = {}
    scale_of = {"task_arithmetic": "weight"}
    preset = context["picked_preset"]
    fixed = {
        "circuit (picked T, bd)": {k: preset[k] for k in ("temperature", "base_droprate")},
        "circuit defaults (T, bd)": {k: context["circuit_default"][k] for k in ("temperature", "base_droprate")},
        "circuit (best T, bd)": None,
    }
    for method in (*MERGEKIT_METHODS[1:], *fixed):
        real = "circuit" if method.startswith("circuit") else method
        curve = {}
        for scale in context["scales"]:
            key = scale_of.get(real, "lambda")
            best = None
            for f_settings in {S.skey(r["settings"]) for r in S.find(records, method=real, seed=m0)
                               if r["family"] in fams and r["settings"].get(key) == scale
                               and "val" in r and ({"grid", "circuit-grid"} & set(r["roles"]))}:
                settings = json.loads(f_settings)
                cond = fixed.get(method) if real == "circuit" else None
                if cond and any(settings[k] != v for k, v in cond.items()):
                    continue
                vals = [scorer.mean(r["val"]) for f in fams for r in S.find(records, family=f, method=real, settings=settings, seed=m0)
                        if "val" in r and ({"grid", "circuit-grid"} & set(r["roles"]))]
                if len(vals) == len(fams):
                    v = _mean(vals)
                    best = v if best is None else max(best, v)
            if best is not None:
                curve[f"{scale:g}"] = best
        curves[method] = curve
    linear = [scorer.mean(r["val"]) for f in fams for r in S.find(records, family=f, method="linear", seed=m0) if "val" in r]
    curves["linear"] = {f"{s:g}": _mean(linear) for s in context["scales"]}
    return curves


# ---------------------------------------------------------------------------
# Output


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _pm(mean: float, std: float) -> str:
    return f"{_pct(mean)} ± {_pct(std)}"


def write(out: Path, records, references, analysis: dict, context: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    charts = _charts(out, analysis, context)
    (out / "results.json").write_text(json.dumps(
        {"context": context, "analysis": {k: v for k, v in analysis.items() if k != "references"},
         "references": references, "records": records},
        indent=1, default=str))
    (out / "results.md").write_text(_markdown(analysis, context, charts))


KIND_TEXT = {
    "replay": "replay (experts fine-tuned with half of each batch replaying the base's mixture: they forget little)",
    "forget": "forget (experts fine-tuned on their task only, at 3x the learning rate: they forget more)",
}


def _markdown(a: dict, context: dict, charts: List[str]) -> str:
    tasks = a["tasks"]
    prof = context["profile"]
    rt = context["runtime"]
    ts = next(iter(context["train_settings"].values()))
    kinds = a["kinds"]
    scales = ", ".join(f"{s:g}" for s in context["scales"])
    lines = [
        "# Merge quality: circuit vs mergekit's methods on the same experts",
        "",
        # docs/quality.md includes this section (pymdownx.snippets); the charts
        # below it are left out there, their paths being relative to this folder.
        "<!-- --8<-- [start:tables] -->",
        "",
        f"Generated by `{context['command']}` (profile `{prof['name']}`) on {context['machine']}, "
        f"shared with other jobs: {rt['total_seconds']:.0f} s wall, {rt['cpu_seconds']:.0f} s CPU "
        f"(this process and its children); {rt['merges_run']} merges through mergekit-yaml "
        f"(engine `{rt['engine']}`, {rt['merge_seconds']:.0f} s), {rt['merged_models_evaluated']} "
        f"merged models scored, {rt['cached_scores_used']} scores taken from the cache, training "
        f"{rt['training_seconds']:.0f} s.",
        "",
        f"Setup: a Llama-style causal LM (hidden {ts['hidden_size']}, {ts['layers']} layers) trained "
        f"{ts['base_steps']} steps at lr {ts['base_lr']:g} on a mixture of four symbol-sequence tasks "
        f"({', '.join(tasks)}; inputs of 3..7 symbols, long ones rare in the base's mixture). From each "
        f"base, two expert families, one expert per task, {ts['expert_steps']} steps each: "
        + "; ".join(
            f"**{k}** (lr {context['train_settings'][k]['expert_lr']:g}, "
            f"{100 * context['train_settings'][k]['expert_replay']:.0f}% of each batch replaying the base's mixture)"
            for k in kinds)
        + f". Training seeds {', '.join(map(str, prof['train_seeds']))} (one base and both families each); "
        f"merge seeds {', '.join(map(str, prof['merge_seeds']))} for the random methods (circuit, dare_ties, della). "
        f"Scores: exact match (greedy decoding reproduces the whole answer) on {prof['test_examples']} "
        f"test inputs per task; every choice is made on {prof['val_examples']} separate validation "
        f"inputs per task (merge seed {prof['merge_seeds'][0]}), the test split is read only for the "
        f"selected settings. Accuracies in %.",
        "",
        f"**Scale grid, the same for every method:** {scales} (circuit, ties, dare_ties and della: "
        f"`lambda`; task_arithmetic: `weight`; linear, the normalized mean, has none). Densities "
        f"(ties, dare_ties, della): {', '.join(f'{d:g}' for d in context.get('densities', []))}. "
        f"circuit's preset grid: temperature {', '.join(f'{t:g}' for t in context.get('temperatures', []))} "
        f"x base_droprate {', '.join(f'{d:g}' for d in context.get('droprates', []))} x the scale grid, "
        f"merged in the `{context['grid_rule']}` order.",
        "",
    ]
    # --- the choices ------------------------------------------------------------
    preset = context["picked_preset"]
    rule = context["picked_rule"]
    same = (S.skey(preset) == S.skey(context["circuit_recommended"])
            and rule == context["recommended_rule"])
    lines += [
        "## Circuit's recommended preset and order rule (chosen on validation)",
        "",
        f"Validation (mean over both families and every training seed) picks **{_fmt_settings(preset)}** "
        f"and the order rule **`{rule}`**. "
        + ("This is the preset and rule in `configs/circuit-recommended.yaml` and `plan.py`."
           if same else
           f"NOTE: `plan.py` / `configs/circuit-recommended.yaml` say {_fmt_settings(context['circuit_recommended'])}, "
           f"`{context['recommended_rule']}`; update them to this run's pick."),
        "",
        "Best presets on validation (mean exact match; test is not read for this table):",
        "",
        "| preset | " + " | ".join(f"val {k}" for k in kinds) + " | val mean |",
        "|---|" + "---:|" * (len(kinds) + 1),
    ]
    shown = a["presets"][:8]
    if a["default_preset"] is not None and a["default_preset"] not in shown:
        shown = shown + [a["default_preset"]]
    for e in shown:
        label = _fmt_settings(e["settings"]) + (" (the defaults)" if e is a["default_preset"] else "")
        lines.append(f"| {label} | " + " | ".join(_pct(e["val_by_kind"][k]) for k in kinds)
                     + f" | {_pct(e['val_mean'])} |")
    lines += [
        "",
        f"Order rules at that preset (merge seed {prof['merge_seeds'][0]}; validation picks, test shown after the fact):",
        "",
        "| rule | " + " | ".join(f"val {k}" for k in kinds) + " | val mean | "
        + " | ".join(f"test {k}" for k in kinds) + " | test mean |",
        "|---|" + "---:|" * (2 * len(kinds) + 2),
    ]
    for e in a["rules"]:
        lines.append(f"| {e['rule']} | " + " | ".join(_pct(e["val_by_kind"][k]) for k in kinds)
                     + f" | {_pct(e['val_mean'])} | " + " | ".join(_pct(e["test_by_kind"][k]) for k in kinds)
                     + f" | {_pct(e['test_mean'])} |")
    lines += [
        "",
        f"The `gain-desc` rule: the expert that gained most on its own task over the base (validation, "
        f"before any merge) first; gains compared in whole points; ties keep the listed order; experts "
        f"that gained less than {100 * context['gained_nothing']:.0f} point go last. `gain-asc`: the same "
        f"with the smallest gain first (experts that gained nothing still last). `delta-norm-desc`: the "
        f"largest |expert - base| first. `as-listed`: the order the tasks are listed in.",
        "",
    ]
    # --- headline ---------------------------------------------------------------
    lines += ["## Target: circuit (preset + rule) vs the best mergekit method, test", ""]
    for kind in kinds:
        tg = a["tables"][kind]["target"]
        per = ", ".join(f"seed {f.rsplit('-', 1)[1]}: {100 * d:+.1f}" for f, d in tg["difference_per_family"].items())
        lines.append(
            f"- **{kind}**: circuit recommended {_pct(tg['circuit_mean'])}%, best mergekit method "
            f"({tg['best_mergekit_row']}) {_pct(tg['best_mergekit_mean'])}%: paired difference "
            f"**{100 * tg['difference']:+.1f}** points ({per}); target (>= +{100 * TARGET_MARGIN:.0f}) "
            f"{'met' if tg['met'] else 'not met'}"
            + ("." if tg["met"] else f", short by {100 * (TARGET_MARGIN - tg['difference']):.1f} points.")
            + (f" circuit tuned on this family's validation like the mergekit methods: "
               f"{_pct(tg['tuned_circuit_mean'])}%, paired difference {100 * tg['tuned_difference']:+.1f}."
               if not math.isnan(tg.get("tuned_difference", float("nan"))) else ""))
    lines += ["", "The best mergekit method is the one with the highest test mean after each method was tuned on "
              "validation (picking the method on test favours mergekit).", ""]
    lines += ["### Both families (mean of the two families' means; paired over all training seeds)", "",
              "| method | " + " | ".join(kinds) + " | mean | vs bold row (paired) |",
              "|---|" + "---:|" * (len(kinds) + 2)]
    for r in a["both"]:
        name = f"**{r['name']}**" if r["kind"] == "circuit-headline" else r["name"]
        vs = "" if r["kind"] == "circuit-headline" else f"{100 * r['vs_headline']['mean']:+.1f}"
        lines.append(f"| {name} | " + " | ".join(_pct(r["by_kind"][k]) for k in kinds)
                     + f" | {_pct(r['mean'])} | {vs} |")
    # --- per family tables -----------------------------------------------------------
    for kind in kinds:
        table = a["tables"][kind]
        refs = a["references"]
        lines += ["", f"## Family `{kind}`: {KIND_TEXT.get(kind, kind)}", "",
                  "| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
        fams = table["families"]
        base = {t: _mean([refs[f]["base"]["test"][t] for f in fams]) for t in tasks}
        lines.append("| base | " + " | ".join(_pct(base[t]) for t in tasks) + f" | {_pct(_mean(list(base.values())))} |")
        for t in tasks:
            per = {u: _mean([refs[f]["experts"][t]["test"][u] for f in fams]) for u in tasks}
            lines.append(f"| expert {t} | " + " | ".join(_pct(per[u]) for u in tasks)
                         + f" | {_pct(_mean(list(per.values())))} |")
        lines += ["", "Validation gains of each expert on its own task (points): " + "; ".join(
            f"seed {f.rsplit('-', 1)[1]}: " + ", ".join(f"{t} {100 * refs[f]['val_gains'][t]:+.1f}" for t in tasks)
            for f in fams) + ".", ""]
        lines += ["| method | settings (picked on val) | " + " | ".join(tasks)
                  + " | mean acc ± training seeds | ± merge seeds | gain retained | vs bold row (paired) | "
                  + " | ".join(f"seed {f.rsplit('-', 1)[1]}" for f in fams) + " |",
                  "|---|---|" + "---:|" * (len(tasks) + 4 + len(fams))]
        for r in table["rows"]:
            name = f"**{r['name']}**" if r["kind"] == "circuit-headline" else r["name"]
            vs = "" if r["kind"] == "circuit-headline" else f"{100 * r['vs_headline']['mean']:+.1f}"
            lines.append(
                f"| {name} | {r['detail']} | " + " | ".join(_pct(r["per_task"][t]) for t in tasks)
                + f" | {_pm(r['mean'], r['std'])} | {_pct(r['seed_std'])} | "
                f"{_pm(r['gain_retained'], r['gain_retained_std'])} | {vs} | "
                + " | ".join(_pct(r["by_family"][f]["mean"]) if f in r["by_family"] else "" for f in fams) + " |")
        curves = table["scale_curves"]
        sc = [f"{s:g}" for s in context["scales"]]
        lines += ["", f"Validation mean accuracy by scale (`{kind}`, mean over training seeds; at each scale the "
                  "best of the method's other settings):", "",
                  "| method | " + " | ".join(f"scale {s}" for s in sc) + " |", "|---|" + "---:|" * len(sc)]
        for method, curve in curves.items():
            lines.append(f"| {method} | " + " | ".join(_pct(curve.get(s, float('nan'))) for s in sc) + " |")
    if context.get("parity"):
        lines += ["", "## Engine parity", "",
                  "The same recipe merged by the long-lived worker and by a fresh `mergekit-yaml` console-script "
                  "process: " + ", ".join(f"{c['method']}: {'identical tensors' if c['identical'] else 'DIFFERENT'}"
                                          for c in context["parity"]) + "."]
    lines += ["", "<!-- --8<-- [end:tables] -->"]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    else:
        lines += ["", "(charts skipped: matplotlib is not installed)"]
    return "\n".join(lines) + "\n"


def summary_text(a: dict) -> str:
    lines = ["", "mean test accuracy (%), both families:"]
    for r in a["both"]:
        lines.append(f"  {r['name']:<36} " + "  ".join(f"{k} {_pct(v):>5}" for k, v in r["by_kind"].items())
                     + f"   mean {_pct(r['mean']):>5}   paired vs headline {100 * r['vs_headline']['mean']:+5.1f}")
    for kind, table in a["tables"].items():
        tg = table["target"]
        lines.append(f"target {kind}: circuit recommended - {tg['best_mergekit_row']} = "
                     f"{100 * tg['difference']:+.1f} points ({'met' if tg['met'] else 'not met'})")
    return "\n".join(lines)


def _charts(out: Path, a: dict, context: dict) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import numpy as np

    kinds = a["kinds"]
    written = []

    # 1. methods side by side, one panel per family
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = a["tables"][kind]["rows"]
        x = np.arange(len(rows))
        colors = ["0.6" if r["kind"] == "reference" else ("tab:red" if r["kind"].startswith("circuit") else "tab:blue")
                  for r in rows]
        ax.bar(x, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], color=colors, capsize=2)
        for i, r in enumerate(rows):
            ax.text(i, 100 * r["mean"] + 1, f"{100 * r['mean']:.1f}", ha="center", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([r["name"].replace(" (", "\n(") for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("test mean exact match (%)")
        lo = min(100 * r["mean"] for r in rows)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_title(f"family {kind}: settings picked on validation", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)
    written.append("methods.png")

    # 2. validation accuracy vs scale, one panel per family
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for method, curve in a["tables"][kind]["scale_curves"].items():
            xs = [float(s) for s in curve]
            style = "-" if method.startswith("circuit") else "--"
            ax.plot(xs, [100 * v for v in curve.values()], style, marker="o", ms=3, label=method)
        ax.set_xlabel("scale (lambda; task_arithmetic: weight)")
        ax.set_ylabel("validation mean exact match (%)")
        ax.set_title(f"family {kind}: every method over the same scale grid", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)
    written.append("scale.png")

    # 3. circuit: temperature x base_droprate (best lambda per cell), validation
    cells: Dict[tuple, dict] = {}
    for e in a["presets"]:
        key = (e["settings"]["temperature"], e["settings"]["base_droprate"])
        if key not in cells or e["val_mean"] > cells[key]["val_mean"]:
            cells[key] = e
    if cells:
        temps = sorted({k[0] for k in cells})
        drops = sorted({k[1] for k in cells})
        data = np.array([[100 * cells[(t, d)]["val_mean"] if (t, d) in cells else np.nan for d in drops] for t in temps])
        fig, ax = plt.subplots(figsize=(1.6 * len(drops) + 2.8, 0.8 * len(temps) + 1.9))
        im = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(drops)))
        ax.set_xticklabels([f"{d:g}" for d in drops])
        ax.set_yticks(range(len(temps)))
        ax.set_yticklabels([f"{t:g}" for t in temps])
        ax.set_xlabel("base_droprate")
        ax.set_ylabel("temperature")
        for i, t in enumerate(temps):
            for j, d in enumerate(drops):
                if (t, d) in cells:
                    bright = data[i, j] > np.nanmin(data) + 0.6 * (np.nanmax(data) - np.nanmin(data))
                    ax.text(j, i, f"{data[i, j]:.1f}\nλ={cells[(t, d)]['settings']['lambda']:g}", ha="center",
                            va="center", color="black" if bright else "white", fontsize=8)
        fig.colorbar(im, ax=ax, label="validation mean acc (%)")
        ax.set_title("circuit: best lambda per cell, both families (validation)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "circuit_grid.png", dpi=110)
        plt.close(fig)
        written.append("circuit_grid.png")
    return written


def rerender(folder: Path) -> None:
    """Rewrite results.md and the charts from ``folder/results.json`` (no merge,
    no scoring), with the preset and rule ``plan.py`` recommends now: for a
    change of the report, or after ``plan.py`` is updated to a run's pick."""
    from benchmarks.quality import plan as P

    folder = Path(folder)
    data = json.loads((folder / "results.json").read_text())
    context = data["context"]
    context["circuit_recommended"] = P.CIRCUIT_RECOMMENDED
    context["recommended_rule"] = P.RECOMMENDED_RULE
    analysis = analyse(data["records"], data["references"], context)
    write(folder, data["records"], data["references"], analysis, context)
    print(summary_text(analysis))


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")
