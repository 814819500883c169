"""Analysis of the benchmark's scores, the markdown report and the charts.

Selection rules (never the test split):

* "best of grid (val)": per method and training seed, the grid point with the
  highest validation mean accuracy (averaged over merge seeds); its test
  scores are reported.
* circuit "recommended": the preset and the order rule fixed in
  :mod:`benchmarks.quality.plan` before the run; nothing is selected here.
* circuit "oracle order" rows are labelled as such: they pick on the test split
  and only show how much room the order leaves.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della")
#: An expert "gained" on its task when it beats the base by at least this much.
GAIN_MIN = 0.02


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def _skey(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _fmt_settings(settings: dict) -> str:
    shown = []
    for key, value in settings.items():
        if key == "weight" and value == 1.0:
            continue
        short = {"temperature": "T", "base_droprate": "bd", "density": "d",
                 "lambda": "λ", "weight": "w"}.get(key, key)
        shown.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(shown) or "-"


class Scorer:
    def __init__(self, references: Dict[int, dict], tasks: Sequence[str]):
        self.references = references
        self.tasks = list(tasks)

    def mean(self, scores: Dict[str, float]) -> float:
        return _mean([scores[t] for t in self.tasks])

    def gained_tasks(self, family: int) -> List[str]:
        ref = self.references[family]
        return [
            t
            for t in self.tasks
            if ref["experts"][t]["test"][t] - ref["base"]["test"][t] >= GAIN_MIN
        ]

    def gain_retained(self, family: int, scores: Dict[str, float]) -> float:
        ref = self.references[family]
        ratios = []
        for t in self.gained_tasks(family):
            expert = ref["experts"][t]["test"][t]
            base = ref["base"]["test"][t]
            ratios.append((scores[t] - base) / (expert - base))
        return _mean(ratios)


def _row(name: str, detail: str, runs: List[Tuple[int, dict]], scorer: Scorer, kind: str) -> dict:
    """Summary of test scores over runs [(family, {"val":..., "test":...})].

    Each training seed (family) weighs the same: its merge seeds are averaged
    first, then the families. ``std`` is over the families' means (training
    seeds), ``seed_std`` the mean over families of the std over merge seeds.
    """
    tasks = scorer.tasks
    by_family: Dict[int, List[dict]] = {}
    for f, r in runs:
        by_family.setdefault(f, []).append(r)
    fam = {}
    for f, rs in sorted(by_family.items()):
        means = [scorer.mean(r["test"]) for r in rs]
        fam[f] = {
            "mean": _mean(means),
            "seed_std": _std(means),
            "val_mean": _mean([scorer.mean(r["val"]) for r in rs]),
            "gain_retained": _mean([scorer.gain_retained(f, r["test"]) for r in rs]),
            "per_task": {t: _mean([r["test"][t] for r in rs]) for t in tasks},
            "n": len(rs),
        }
    means = [v["mean"] for v in fam.values()]
    gains = [v["gain_retained"] for v in fam.values()]
    return {
        "name": name,
        "detail": detail,
        "kind": kind,
        "n": len(runs),
        "families": sorted(fam),
        "by_family": fam,
        "per_task": {t: _mean([v["per_task"][t] for v in fam.values()]) for t in tasks},
        "mean": _mean(means),
        "std": _std(means),
        "seed_std": _mean([v["seed_std"] for v in fam.values()]),
        "gain_retained": _mean(gains),
        "gain_retained_std": _std(gains),
        "val_mean": _mean([v["val_mean"] for v in fam.values()]),
    }


def paired(row: dict, reference: dict) -> dict:
    """Mean over shared training seeds of (row - reference), and each seed's."""
    shared = [f for f in row["by_family"] if f in reference["by_family"]]
    diffs = {f: row["by_family"][f]["mean"] - reference["by_family"][f]["mean"] for f in shared}
    return {"mean": _mean(list(diffs.values())), "std": _std(list(diffs.values())),
            "per_family": diffs, "families": shared}


def analyse(records: List[dict], references: Dict[int, dict], context: dict) -> dict:
    tasks = context["tasks"]
    scorer = Scorer(references, tasks)
    families = sorted(references)
    listed = list(tasks)

    def pick(family, method, settings=None, order=None, role=None):
        out = []
        for r in records:
            if r["family"] != family or r["method"] != method:
                continue
            if settings is not None and any(r["settings"].get(k) != v for k, v in settings.items()):
                continue
            if order is not None and list(r["order"]) != list(order):
                continue
            if role is not None and r["role"] != role:
                continue
            out.append(r)
        return _dedupe(out)

    def by_point(recs):
        groups: Dict[str, List[dict]] = {}
        for r in recs:
            groups.setdefault(_skey(r["settings"]), []).append(r)
        return groups

    def val_best(recs):
        """The settings group with the best mean validation accuracy."""
        groups = by_point(recs)
        best_key = max(groups, key=lambda k: _mean([scorer.mean(r["val"]) for r in groups[k]]))
        return best_key, groups[best_key]

    rows: List[dict] = []
    rows.append(_row("base", "the generalist base model", [(f, references[f]["base"]) for f in families], scorer, "reference"))
    expert_runs = []
    for f in families:
        own = {split: {t: references[f]["experts"][t][split][t] for t in tasks} for split in ("val", "test")}
        expert_runs.append((f, own))
    rows.append(_row("experts (each on its own task)", "upper reference, not a merge", expert_runs, scorer, "reference"))

    chosen: Dict[str, Dict[int, str]] = {}
    for method in MERGEKIT_METHODS:
        default_runs, best_runs = [], []
        chosen[method] = {}
        for f in families:
            recs = pick(f, method, order=listed)
            if not recs:
                continue
            defaults = [r for r in recs if r["role"] == "default"]
            default_runs += [(f, r) for r in defaults]
            key, group = val_best(recs)
            best_runs += [(f, r) for r in group]
            chosen[method][f] = _fmt_settings(json.loads(key))
        if not default_runs:
            continue
        detail = _fmt_settings(default_runs[0][1]["settings"])
        rows.append(_row(f"{method} (default)", detail, default_runs, scorer, "mergekit"))
        rows.append(_row(f"{method} (best of grid on val)", _per_seed(chosen[method]), best_runs, scorer, "mergekit"))

    orders = context["orders"]
    rule = context["recommended_rule"]
    default = context["circuit_default"]
    recommended = context["circuit_recommended"]
    same_preset = default == recommended

    def circuit_runs(settings, order_of):
        runs = []
        for f in families:
            order = order_of(f)
            runs += [(f, r) for r in pick(f, "circuit", settings=settings, order=order)]
        return runs

    rule_order = lambda f: orders[str(f)][rule]  # noqa: E731
    listed_order = lambda f: listed  # noqa: E731
    if same_preset:
        rows.append(_row("circuit default = recommended (rule order)", f"{_fmt_settings(default)}, order: {rule}",
                         circuit_runs(default, rule_order), scorer, "circuit-headline"))
    else:
        rows.append(_row("circuit default (rule order)", f"{_fmt_settings(default)}, order: {rule}",
                         circuit_runs(default, rule_order), scorer, "circuit"))
        rows.append(_row("circuit recommended (rule order)", f"{_fmt_settings(recommended)}, order: {rule}",
                         circuit_runs(recommended, rule_order), scorer, "circuit-headline"))
    listed_runs = circuit_runs(recommended, listed_order)
    if listed_runs:
        rows.append(_row("circuit recommended, listed order", f"{_fmt_settings(recommended)}, order as listed",
                         listed_runs, scorer, "circuit"))
    grid_best_runs, grid_choice = [], {}
    for f in families:
        recs = pick(f, "circuit", order=rule_order(f), role="circuit-grid")
        if recs:
            key, group = val_best(recs)
            grid_best_runs += [(f, r) for r in group]
            grid_choice[f] = _fmt_settings(json.loads(key))
    if grid_best_runs:
        rows.append(_row("circuit (best of grid on val, rule order)", _per_seed(grid_choice),
                         grid_best_runs, scorer, "circuit"))

    # --- priority order -------------------------------------------------------
    priority = {}
    presets = {"default": default} if same_preset else {"default": default, "recommended": recommended}
    for preset_name, settings in presets.items():
        per_family = {}
        for f in families:
            recs = pick(f, "circuit", settings=settings, role="circuit-orders")
            if not recs:
                continue
            groups: Dict[Tuple[str, ...], List[dict]] = {}
            for r in recs:
                groups.setdefault(tuple(r["order"]), []).append(r)
            table = []
            for order, group in groups.items():
                table.append({
                    "order": list(order),
                    "test_mean": _mean([scorer.mean(r["test"]) for r in group]),
                    "test_std_over_seeds": _std([scorer.mean(r["test"]) for r in group]),
                    "val_mean": _mean([scorer.mean(r["val"]) for r in group]),
                    "per_task": {t: _mean([r["test"][t] for r in group]) for t in tasks},
                    "n": len(group),
                })
            table.sort(key=lambda e: -e["test_mean"])
            for rank, entry in enumerate(table, 1):
                entry["test_rank"] = rank
            by_val = sorted(table, key=lambda e: -e["val_mean"])
            for rank, entry in enumerate(by_val, 1):
                entry["val_rank"] = rank
            rules = {}
            for name, order in orders[str(f)].items():
                match = [e for e in table if e["order"] == list(order)]
                if match:
                    rules[name] = {"order": list(order), **{k: match[0][k] for k in ("test_mean", "test_rank", "val_mean", "val_rank")}}
            top = {}
            for t in tasks:
                group = [e for e in table if e["order"][0] == t]
                if group:
                    top[t] = {
                        "mean": _mean([e["test_mean"] for e in group]),
                        "per_task": {u: _mean([e["per_task"][u] for e in group]) for u in tasks},
                        "n_orders": len(group),
                    }
            means = [e["test_mean"] for e in table]
            per_family[f] = {
                "orders": table,
                "rules": rules,
                "top_priority": top,
                "best": table[0],
                "worst": table[-1],
                "spread": max(means) - min(means),
                "std_over_orders": _std(means),
                "mean_over_orders": _mean(means),
                "seed_std": _mean([e["test_std_over_seeds"] for e in table]),
                "val_best_order": by_val[0]["order"],
                "val_best_order_test_mean": by_val[0]["test_mean"],
                "val_best_order_test_rank": by_val[0]["test_rank"],
            }
        if per_family:
            priority[preset_name] = per_family
    oracle_rows = []
    for preset_name, per_family in priority.items():
        settings = presets[preset_name]
        runs = []
        for f, info in per_family.items():
            best = info["best"]["order"]
            runs += [(f, r) for r in pick(f, "circuit", settings=settings, order=best)]
        if runs:
            oracle_rows.append(_row(f"circuit {preset_name}, oracle order (picked on test)",
                                    f"{_fmt_settings(settings)}, best of {len(per_family[next(iter(per_family))]['orders'])} orders",
                                    runs, scorer, "oracle"))
    rows += oracle_rows

    # --- the circuit grid -------------------------------------------------------
    grid = {}
    for f in families:
        for r in pick(f, "circuit", order=rule_order(f), role="circuit-grid"):
            cell = (r["settings"]["temperature"], r["settings"]["base_droprate"])
            grid.setdefault(cell, []).append((f, r))
    grid_cells = [
        {"temperature": t, "base_droprate": d,
         "test_mean": _mean([scorer.mean(r["test"]) for _, r in runs]),
         "test_std": _std([scorer.mean(r["test"]) for _, r in runs]),
         "val_mean": _mean([scorer.mean(r["val"]) for _, r in runs]),
         "n": len(runs), "families": sorted({f for f, _ in runs})}
        for (t, d), runs in sorted(grid.items())
    ]

    # --- rules, on every training seed (seeds without the full sweep are out of
    # sample for the rule choice) -------------------------------------------------
    rule_scores = {}
    for preset_name, settings in presets.items():
        per_rule = {}
        for name in sorted({n for f in families for n in orders[str(f)]}):
            tests, vals, per_family = [], [], {}
            for f in families:
                order = orders[str(f)].get(name)
                if order is None:
                    continue
                recs = pick(f, "circuit", settings=settings, order=order)
                if not recs:
                    continue
                t_mean = _mean([scorer.mean(r["test"]) for r in recs])
                per_family[f] = {"order": list(order), "test_mean": t_mean,
                                 "val_mean": _mean([scorer.mean(r["val"]) for r in recs])}
                tests.append(t_mean)
                vals.append(per_family[f]["val_mean"])
            if per_family:
                per_rule[name] = {"test_mean": _mean(tests), "val_mean": _mean(vals),
                                  "per_family": per_family}
        rule_scores[preset_name] = per_rule

    # --- target ---------------------------------------------------------------
    headline = next(r for r in rows if r["kind"] == "circuit-headline")
    mergekit_rows = [r for r in rows if r["kind"] == "mergekit"]
    full_rows = [r for r in mergekit_rows if r["families"] == headline["families"]] or mergekit_rows
    best_mk = max(full_rows, key=lambda r: r["mean"]) if full_rows else None
    # the single mergekit setting validation would pick across all methods
    val_pick_runs = []
    val_pick_label = {}
    for f in families:
        recs = [r for r in records if r["family"] == f and r["method"] in MERGEKIT_METHODS]
        if not recs:
            continue
        groups: Dict[str, List[dict]] = {}
        for r in _dedupe(recs):
            groups.setdefault(r["method"] + " " + _skey(r["settings"]), []).append(r)
        key = max(groups, key=lambda k: _mean([scorer.mean(r["val"]) for r in groups[k]]))
        val_pick_runs += [(f, r) for r in groups[key]]
        method, _, settings = key.partition(" ")
        val_pick_label[f] = f"{method} {_fmt_settings(json.loads(settings))}"
    val_pick = _row("mergekit, best method+setting on val", _per_seed(val_pick_label),
                    val_pick_runs, scorer, "mergekit-val-pick") if val_pick_runs else None
    vs_best = paired(headline, best_mk) if best_mk else None
    vs_pick = paired(headline, val_pick) if val_pick else None
    for r in rows:
        r["vs_headline"] = paired(r, headline)
    target = {
        "circuit": headline["name"],
        "circuit_mean": headline["mean"],
        "best_mergekit_row": best_mk["name"] if best_mk else None,
        "best_mergekit_mean": best_mk["mean"] if best_mk else float("nan"),
        "difference": vs_best["mean"] if vs_best else float("nan"),
        "difference_per_family": vs_best["per_family"] if vs_best else {},
        "val_pick": val_pick,
        "difference_vs_val_pick": vs_pick["mean"] if vs_pick else float("nan"),
        "difference_vs_val_pick_per_family": vs_pick["per_family"] if vs_pick else {},
    }
    target["met"] = bool(target["difference"] >= 0)
    return {
        "rows": rows,
        "chosen": chosen,
        "grid_choice": grid_choice,
        "priority": priority,
        "grid": grid_cells,
        "rule_scores": rule_scores,
        "target": target,
        "references": references,
        "gained_tasks": {f: scorer.gained_tasks(f) for f in families},
        "tasks": tasks,
    }


def _per_seed(choice: Dict[int, str]) -> str:
    """'x' when every training seed chose x, else 'seed 0: x; seed 1: y'."""
    if len(set(choice.values())) <= 1:
        return next(iter(choice.values()), "-")
    return "; ".join(f"seed {f}: {c}" for f, c in sorted(choice.items()))


def _dedupe(records: List[dict]) -> List[dict]:
    """A merge can be requested by two experiments; keep one record of it."""
    seen, out = set(), []
    for r in records:
        key = (r["family"], r["method"], _skey(r["settings"]), tuple(r["order"]), r["seed"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ---------------------------------------------------------------------------
# Output


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _pm(mean: float, std: float) -> str:
    return f"{_pct(mean)} ± {_pct(std)}"


def write(out: Path, records, references, analysis: dict, context: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    charts = _charts(out, analysis)
    (out / "results.json").write_text(json.dumps(
        {"context": context, "analysis": {k: v for k, v in analysis.items() if k != "references"},
         "references": {str(k): v for k, v in references.items()}, "records": records},
        indent=1, default=str))
    (out / "results.md").write_text(_markdown(analysis, context, charts))


def _markdown(a: dict, context: dict, charts: List[str]) -> str:
    tasks = a["tasks"]
    prof = context["profile"]
    ts = context["train_settings"]
    rt = context["runtime"]
    lines = [
        "# Merge quality: circuit vs mergekit's methods on the same experts",
        "",
        f"Generated by `{context['command']}` (profile `{prof['name']}`) in "
        f"{rt['total_seconds']:.0f} s wall, {rt.get('cpu_seconds', float('nan')):.0f} s CPU "
        f"(this process and its children): {rt['merges_run']} merges through "
        f"mergekit-yaml (engine `{rt['engine']}`, {rt['merge_seconds']:.0f} s), "
        f"{rt['cached_scores_used']} requests answered from the score cache (a recipe "
        f"requested twice in a run is merged once; earlier runs' scores are reused), "
        f"training {rt['training_seconds']:.0f} s.",
        "",
        f"Setup: a Llama-style causal LM (hidden {ts['hidden_size']}, {ts['layers']} layers, "
        f"{ts['heads']} heads) trained {ts['base_steps']} steps at lr {ts['base_lr']:g} on a mixture "
        f"of four symbol-sequence tasks ({', '.join(tasks)}; each with its own 10 symbols, "
        f"inputs of 3..7 symbols, long ones (6..7) only {100 * ts['base_long_prob']:.0f}% of the "
        f"mixture), and one expert per task fine-tuned {ts['expert_steps']} steps at lr "
        f"{ts['expert_lr']:g} on its task at all lengths, with {100 * ts['expert_replay']:.0f}% of "
        f"each batch replaying the base's mixture. "
        f"Training seeds "
        f"{', '.join(map(str, prof['train_seeds']))} (one base + four experts each); merge seeds "
        f"{', '.join(map(str, prof['merge_seeds']))} for the random methods (circuit, dare_ties, della). "
        f"Scores: exact match (all answer tokens and the end token, i.e. greedy decoding "
        f"reproduces the answer) on {prof['test_examples']} held-out test inputs per task; "
        f"settings are selected on {prof['val_examples']} separate validation inputs per task. "
        f"Accuracies in %. Every training seed weighs the same (merge seeds are averaged "
        f"first); ± is the standard deviation over training seeds, which mostly reflects how "
        f"hard each seed's base finds the tasks, so compare methods by the paired column "
        f"(difference to the bold circuit row on the same training seeds); 'merge seeds' is "
        f"the spread over merge seeds within a training seed. "
        f"Gain retained = (merged - base) / (expert - base), averaged over the tasks whose "
        f"expert beat the base by at least {100 * GAIN_MIN:.0f} points.",
        "",
        "## Base and experts (test)",
        "",
        "| model | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    refs = a["references"]
    fams = sorted(refs)
    base_rows = [("base", [refs[f]["base"]["test"] for f in fams])]
    for t in tasks:
        base_rows.append((f"expert {t}", [refs[f]["experts"][t]["test"] for f in fams]))
    for name, runs in base_rows:
        per = {u: _mean([r[u] for r in runs]) for u in tasks}
        lines.append(f"| {name} | " + " | ".join(_pct(per[u]) for u in tasks) + f" | {_pct(_mean(list(per.values())))} |")
    lines += [
        "",
        "Each expert improves its own task and loses on the others: the interference a merge has to resolve. "
        f"Delta norms (|expert - base|, training seed {fams[0]}): "
        + ", ".join(f"{t} {refs[fams[0]]['delta_norms'][t]:.2f}" for t in tasks) + ".",
        "",
        "## Methods on the same experts (test)",
        "",
        "| method | settings | " + " | ".join(tasks)
        + " | mean acc | ± merge seeds | gain retained | vs bold row (paired) | training seeds |",
        "|---|---|" + "---:|" * (len(tasks) + 5),
    ]
    for r in a["rows"]:
        name = f"**{r['name']}**" if r["kind"] == "circuit-headline" else r["name"]
        vs = r.get("vs_headline") or {}
        vs_text = "" if r["kind"] == "circuit-headline" or not vs else f"{100 * vs['mean']:+.1f}"
        seeds = ", ".join(map(str, r["families"]))
        lines.append(
            f"| {name} | {r['detail']} | " + " | ".join(_pct(r["per_task"][t]) for t in tasks)
            + f" | {_pm(r['mean'], r['std'])} | {_pct(r['seed_std'])} | {_pm(r['gain_retained'], r['gain_retained_std'])}"
            + f" | {vs_text} | {seeds} |"
        )
    if len(fams) > 1:
        lines += ["", "### Mean accuracy by training seed (test)", "",
                  "| method | " + " | ".join(f"seed {f}" for f in fams) + " |", "|---|" + "---:|" * len(fams)]
        for r in a["rows"]:
            cells = [(_pct(r["by_family"][f]["mean"]) if f in r["by_family"] else "") for f in fams]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    tg = a["target"]
    lines += ["", "## Target", ""]
    verdict = "met" if tg["met"] else "not met"
    per = ", ".join(f"seed {f}: {100 * d:+.1f}" for f, d in sorted(tg["difference_per_family"].items()))
    lines.append(
        f"{tg['circuit']}: {_pct(tg['circuit_mean'])}% mean accuracy; best mergekit row "
        f"({tg['best_mergekit_row']}): {_pct(tg['best_mergekit_mean'])}%. Paired difference "
        f"{100 * tg['difference']:+.1f} points ({per}): target {verdict}."
    )
    if tg["val_pick"]:
        vp = tg["val_pick"]
        per = ", ".join(f"seed {f}: {100 * d:+.1f}" for f, d in sorted(tg["difference_vs_val_pick_per_family"].items()))
        lines.append("")
        lines.append(
            f"Against the one mergekit method and setting that validation picks per training seed "
            f"({vp['detail']}): {_pct(vp['mean'])}%; paired difference "
            f"{100 * tg['difference_vs_val_pick']:+.1f} points ({per})."
        )
    # grid
    if a["grid"]:
        lines += ["", "## Circuit's parameter grid (order by the recommended rule, test mean acc)", ""]
        temps = sorted({c["temperature"] for c in a["grid"]})
        drops = sorted({c["base_droprate"] for c in a["grid"]})
        cell = {(c["temperature"], c["base_droprate"]): c for c in a["grid"]}
        lines.append("| temperature \\ base_droprate | " + " | ".join(f"{d:g}" for d in drops) + " |")
        lines.append("|---|" + "---:|" * len(drops))
        for t in temps:
            lines.append(f"| {t:g} | " + " | ".join(
                f"{_pct(cell[(t, d)]['test_mean'])} (val {_pct(cell[(t, d)]['val_mean'])})" if (t, d) in cell else "" for d in drops) + " |")
        if a["grid_choice"]:
            lines.append("")
            lines.append("Validation picks: " + "; ".join(f"training seed {f}: {c}" for f, c in sorted(a["grid_choice"].items())) + ".")
    # priority
    for preset, per_family in a["priority"].items():
        lines += ["", f"## Priority order (circuit {preset}: {_fmt_settings(context['circuit_' + preset])})", ""]
        for f, info in per_family.items():
            n = len(info["orders"])
            lines.append(
                f"Training seed {f}, {n} orders x {info['orders'][0]['n']} merge seeds: test mean accuracy "
                f"ranges {_pct(info['worst']['test_mean'])} .. {_pct(info['best']['test_mean'])} "
                f"(spread {100 * info['spread']:.1f} points, std over orders {100 * info['std_over_orders']:.1f}; "
                f"merge-seed std within an order {100 * info['seed_std']:.1f}). "
                f"Best: {' > '.join(info['best']['order'])}; worst: {' > '.join(info['worst']['order'])}. "
                f"The order validation would pick ({' > '.join(info['val_best_order'])}) ranks "
                f"{info['val_best_order_test_rank']} of {n} on test."
            )
            lines += ["", "| rule | order (first = top priority) | test mean | rank of " + str(n) + " (test) | val mean |", "|---|---|---:|---:|---:|"]
            for name, r in info["rules"].items():
                lines.append(f"| {name} | {' > '.join(r['order'])} | {_pct(r['test_mean'])} | {r['test_rank']} | {_pct(r['val_mean'])} |")
            lines += ["", "| top priority | orders | " + " | ".join(tasks) + " | mean |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
            for t, g in info["top_priority"].items():
                lines.append(f"| {t} | {g['n_orders']} | " + " | ".join(_pct(g["per_task"][u]) for u in tasks) + f" | {_pct(g['mean'])} |")
            lines.append("")
    for preset, per_rule in a["rule_scores"].items():
        if not per_rule:
            continue
        fams = sorted({f for r in per_rule.values() for f in r["per_family"]})
        lines += ["", f"### Order rules on every training seed (circuit {preset}, test mean acc; val in brackets)", "",
                  "| rule | " + " | ".join(f"seed {f}" for f in fams) + " | mean |",
                  "|---|" + "---:|" * (len(fams) + 1)]
        for name, r in sorted(per_rule.items(), key=lambda kv: -kv[1]["test_mean"]):
            cells = []
            for f in fams:
                e = r["per_family"].get(f)
                cells.append(f"{_pct(e['test_mean'])} ({_pct(e['val_mean'])})" if e else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(r['test_mean'])} ({_pct(r['val_mean'])}) |")
        best_rule = max(per_rule.items(), key=lambda kv: kv[1]["val_mean"])
        lines += ["", f"Validation would pick the rule `{best_rule[0]}`; the recommended rule is "
                  f"`{context['recommended_rule']}` (fixed before this run)."]
    if context.get("parity"):
        lines += ["", "## Engine parity", "",
                  "The same recipe merged by the long-lived worker and by a fresh `mergekit-yaml` console-script "
                  "process: " + ", ".join(f"{c['method']}: {'identical tensors' if c['identical'] else 'DIFFERENT'}" for c in context["parity"]) + "."]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    else:
        lines += ["", "(charts skipped: matplotlib is not installed)"]
    return "\n".join(lines) + "\n"


def summary_text(a: dict) -> str:
    lines = ["", "mean test accuracy (%):"]
    for r in a["rows"]:
        vs = r.get("vs_headline") or {}
        lines.append(f"  {r['name']:<52} {_pm(r['mean'], r['std']):>14}   val {_pct(r['val_mean']):>5}   "
                     f"gain retained {_pct(r['gain_retained']):>6}   paired vs headline {100 * vs.get('mean', float('nan')):+5.1f}")
    tg = a["target"]
    lines.append(f"target: {tg['circuit']} - {tg['best_mergekit_row']} = {100 * tg['difference']:+.1f} points")
    return "\n".join(lines)


def _charts(out: Path, a: dict) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import numpy as np

    tasks = a["tasks"]
    written = []

    # 1. methods side by side
    rows = [r for r in a["rows"] if r["kind"] != "reference"]
    refs = [r for r in a["rows"] if r["kind"] == "reference"]
    rows = refs[:1] + rows + refs[1:]
    fig, ax = plt.subplots(figsize=(max(9, 0.62 * len(rows) + 3), 5.2))
    x = np.arange(len(rows))
    width = 0.8 / (len(tasks) + 1)
    colors = plt.cm.tab10.colors
    for i, t in enumerate(tasks):
        ax.bar(x + (i - len(tasks) / 2) * width, [100 * r["per_task"][t] for r in rows], width,
               label=t, color=colors[i], alpha=0.55)
    ax.bar(x + (len(tasks) / 2) * width, [100 * r["mean"] for r in rows], width,
           yerr=[100 * r["std"] for r in rows], label="mean (± std)", color="black", capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"].replace(" (", "\n(") for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Merging four task experts: per-task and mean accuracy")
    for i, r in enumerate(rows):
        if r["kind"] == "circuit-headline":
            ax.get_xticklabels()[i].set_fontweight("bold")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)
    written.append("methods.png")

    # 2. circuit grid heat map
    if a["grid"]:
        temps = sorted({c["temperature"] for c in a["grid"]})
        drops = sorted({c["base_droprate"] for c in a["grid"]})
        cell = {(c["temperature"], c["base_droprate"]): c["test_mean"] for c in a["grid"]}
        data = np.array([[100 * cell.get((t, d), float("nan")) for d in drops] for t in temps])
        fig, ax = plt.subplots(figsize=(1.3 * len(drops) + 2.5, 0.8 * len(temps) + 1.8))
        im = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(drops)))
        ax.set_xticklabels([f"{d:g}" for d in drops])
        ax.set_yticks(range(len(temps)))
        ax.set_yticklabels([f"{t:g}" for t in temps])
        ax.set_xlabel("base_droprate")
        ax.set_ylabel("temperature")
        for i in range(len(temps)):
            for j in range(len(drops)):
                if not math.isnan(data[i, j]):
                    bright = data[i, j] > np.nanmin(data) + 0.6 * (np.nanmax(data) - np.nanmin(data))
                    ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center",
                            color="black" if bright else "white", fontsize=8)
        fig.colorbar(im, ax=ax, label="test mean acc (%)")
        ax.set_title("circuit: temperature x base_droprate\n(order from the recommended rule)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "circuit_grid.png", dpi=110)
        plt.close(fig)
        written.append("circuit_grid.png")

    # 3. accuracy by which task has top priority
    if a["priority"]:
        presets = list(a["priority"])
        fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.4), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            per_family = a["priority"][preset]
            tops = {}
            for info in per_family.values():
                for t, g in info["top_priority"].items():
                    tops.setdefault(t, []).append(g)
            x = np.arange(len(tasks))
            width = 0.8 / (len(tasks) + 1)
            for i, u in enumerate(tasks):
                ax.bar(x + (i - len(tasks) / 2) * width,
                       [100 * _mean([g["per_task"][u] for g in tops.get(t, [])]) for t in tasks], width,
                       label=f"acc {u}", color=colors[i], alpha=0.6)
            ax.bar(x + (len(tasks) / 2) * width, [100 * _mean([g["mean"] for g in tops.get(t, [])]) for t in tasks],
                   width, color="black", label="mean")
            ax.set_xticks(x)
            ax.set_xticklabels([f"{t} first" for t in tasks])
            ax.set_ylim(0, 100)
            ax.set_ylabel("test exact match (%)")
            ax.set_title(f"circuit {preset}: accuracy by top-priority task\n(mean over the orders with that task first)", fontsize=9)
            ax.legend(fontsize=7, ncol=3)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "priority.png", dpi=110)
        plt.close(fig)
        written.append("priority.png")

        # 4. every order, sorted
        fig, ax = plt.subplots(figsize=(10, 4))
        for preset in presets:
            for f, info in a["priority"][preset].items():
                means = [100 * e["test_mean"] for e in info["orders"]]
                ax.plot(range(1, len(means) + 1), means, marker="o", ms=3, label=f"{preset}, training seed {f}")
                same: Dict[int, List[str]] = {}
                for name, r in info["rules"].items():
                    same.setdefault(r["test_rank"], []).append(name)
                for rank, names in same.items():
                    r = info["rules"][names[0]]
                    ax.annotate(" = ".join(names), (rank, 100 * r["test_mean"]), fontsize=6, rotation=45,
                                xytext=(2, 6), textcoords="offset points")
        ax.set_xlabel("order rank (test)")
        ax.set_ylabel("test mean acc (%)")
        ax.set_title("circuit: every priority order, best to worst; where each rule's order lands", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "orders.png", dpi=110)
        plt.close(fig)
        written.append("orders.png")
    return written
