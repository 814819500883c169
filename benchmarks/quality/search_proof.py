"""`circuit-merge search` on the merge-quality benchmark: validation as the eval, test after.

Run from the repository root::

    .venv/bin/python -m benchmarks.quality.search_proof             # search, score on test, write the table
    .venv/bin/python -m benchmarks.quality.search_proof --report    # rewrite the table from finished searches
    .venv/bin/python -m benchmarks.quality.search_proof --report --ceiling 64  # + the diagnosis (step 4)
    .venv/bin/python -m benchmarks.quality.search_proof --render    # search.md from search.json only

For every expert family (``replay``, ``forget``) and training seed (0, 1, 2)
of :mod:`benchmarks.quality` (models from ``benchmarks/quality/.cache``,
trained or reused exactly as ``benchmarks.quality.run`` does):

1. one ``circuit-merge search`` (the real command, a local Ray) over the order
   of the four experts, ``temperature``, ``base_droprate`` and ``lambda`` (in
   the benchmark's scale range 0.25..1.5) with :func:`score` as its eval:
   the benchmark's own :class:`~benchmarks.quality.models.Evaluator` on the
   200 validation inputs per task (mean exact match, in points). The recipe's
   starting point is circuit's recommended preset in the ``gain-asc`` order
   (what ``configs/circuit-recommended.yaml`` prescribes), so trial 1 is that
   preset; merge seed 0 for every trial, as the benchmark selects on.
2. the best trial on validation (the first of equal scores) is merged by the
   benchmark's own ``mergekit-yaml`` runner over merge seeds 0, 1, 2 and
   scored on the 400 test inputs per task, exactly as the benchmark scores
   its selected methods (merge seed 0 is also scored on validation: it must
   equal the search's score of that trial).
3. the table puts it next to the benchmark's rows from its ``results.json``
   (mergekit's methods tuned on the same validation split and scale grid,
   circuit's recommended preset with the order rule), paired over the
   training seeds: ``results/search.md`` and ``results/search.json``.

4. with ``--ceiling K``, after the choice: the K best trials on validation
   (all of them with K = the budget) each merged at its own merge seed and
   scored on test. A diagnosis only: their best on test bounds what any rule
   choosing among the trials could reach, i.e. whether the target lies inside
   the searched space at all. Nothing is selected with it.

Selection reads the test split only in step 2, for the one chosen setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_CACHE = HERE / ".cache"
DEFAULT_RESULTS = HERE / "results"
#: The benchmark's scale grid runs 0.25..1.5: the search's lambda range.
LAMBDA_SPACE = "lambda=0.25:1.5"
TARGET_POINTS = 1.5
VAL_EXAMPLES, TEST_EXAMPLES = 200, 400

_EVALUATORS: Dict[str, object] = {}


def _evaluator(split: str, count: int):
    key = f"{split}{count}"
    if key not in _EVALUATORS:
        from benchmarks.quality import tasks as T
        from benchmarks.quality.models import Evaluator

        _EVALUATORS[key] = Evaluator(T.eval_sets(split, count))
    return _EVALUATORS[key]


def score(model, tokenizer):
    """The search's eval: mean exact match (points) on the benchmark's validation split."""
    per_task = _evaluator("val", VAL_EXAMPLES)(model)
    return {"score": 100.0 * statistics.fmean(per_task.values()),
            **{task: 100.0 * value for task, value in per_task.items()}}


# ---------------------------------------------------------------- step 1


def families(cache: Path, kinds: Sequence[str], seeds: Sequence[int]):
    from benchmarks.quality.models import build_family
    from benchmarks.quality.run import family_settings

    settings = family_settings(False)
    return [build_family(cache, settings[kind], seed, kind=kind) for seed in seeds for kind in kinds]


def gain_asc_order(family) -> List[str]:
    """The ``gain-asc`` rule's order from the experts' own validation gains (no merge)."""
    from benchmarks.quality import plan as P
    from benchmarks.quality import tasks as T
    from benchmarks.quality.models import load_weights, new_model
    from benchmarks.quality.run import family_settings

    template = new_model(family_settings(False)[family.kind], 0)
    val = _evaluator("val", VAL_EXAMPLES)
    base = val(load_weights(template, family.base))
    gains = {t: val(load_weights(template, family.experts[t]))[t] - base[t] for t in T.TASKS}
    return list(P.gain_order(T.TASKS, gains, descending=False))


def write_recipe(family, order: Sequence[str], path: Path) -> None:
    from benchmarks.quality import plan as P

    preset = P.CIRCUIT_RECOMMENDED
    recipe = {
        "merge_method": "circuit",
        "base_model": str(family.base.resolve()),
        "models": [{"model": str(family.experts[t].resolve())} for t in order],
        "parameters": {"temperature": preset["temperature"],
                       "base_droprate": preset["base_droprate"],
                       "lambda": preset["lambda"]},
        "dtype": "float32",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def read_trials(directory: Path) -> List[dict]:
    path = directory / "trials.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_search(family, runs: Path, trials: int, cpus_per_trial: float, log) -> dict:
    directory = runs / family.id
    recipe = runs / f"{family.id}.yaml"
    if not recipe.exists():
        write_recipe(family, gain_asc_order(family), recipe)
    done = read_trials(directory)
    command = [sys.executable, "-m", "circuit_merge_plugin.search", str(recipe),
               "--eval", "benchmarks.quality.search_proof:score", "--out", str(directory),
               "--trials", str(trials), "--space", LAMBDA_SPACE, "--seed", "0",
               "--cpus-per-trial", f"{cpus_per_trial:g}", "--quiet"]
    if done:
        command.append("--resume")
    started = time.time()
    if len(done) < trials:
        log(f"{family.id}: searching ({len(done)} of {trials} trials done)")
        result = subprocess.run(command, cwd=str(ROOT), env=dict(os.environ, OMP_NUM_THREADS="1"))
        if result.returncode != 0:
            raise SystemExit(f"{family.id}: circuit-merge search exited {result.returncode}")
    wall = round(time.time() - started, 1)
    shown = " ".join(["python -m circuit_merge_plugin.search", f"<runs>/{family.id}.yaml",
                      *command[command.index("--eval"):]]).replace(str(directory), f"<runs>/{family.id}")
    log(f"{family.id}: {len(read_trials(directory))} trials ({wall:.0f}s)")
    return {"command": shown, "wall_s": wall}


def best_trial(records: List[dict]) -> dict:
    best = None
    for record in sorted(records, key=lambda r: r["trial"]):
        if record.get("status") == "ok" and (best is None or record["score"] > best["score"]):
            best = record
    if best is None:
        raise SystemExit("every trial failed")
    return best


# ---------------------------------------------------------------- step 2


def score_chosen(family, best: dict, merger, merge_seeds: Sequence[int], workdir: Path) -> dict:
    """The chosen setting through mergekit-yaml, scored like the benchmark's selected methods."""
    from benchmarks.quality.merging import Recipe
    from benchmarks.quality.models import load_weights, new_model
    from benchmarks.quality.run import family_settings

    task_of = {str(Path(p).resolve()): t for t, p in family.experts.items()}
    order = tuple(task_of[str(Path(p).resolve())] for p in best["order"])
    params = best["parameters"]
    settings = (("temperature", float(params["temperature"])),
                ("base_droprate", float(params["base_droprate"])),
                ("lambda", float(params["lambda"])))
    template = new_model(family_settings(False)[family.kind], 0)
    out = {"order": list(order), "settings": dict(settings), "test": {}, "val_check": None}
    for seed in merge_seeds:
        merged = merger.merge(Recipe("circuit", order, settings, (), seed), family.base,
                              family.experts, workdir / "current")
        model = load_weights(template, merged)
        test = _evaluator("test", TEST_EXAMPLES)(model)
        out["test"][str(seed)] = {"per_task": test, "mean": 100.0 * statistics.fmean(test.values())}
        if seed == best["seed"]:
            val = _evaluator("val", VAL_EXAMPLES)(model)
            out["val_check"] = 100.0 * statistics.fmean(val.values())
    out["test_mean"] = statistics.fmean(v["mean"] for v in out["test"].values())
    if out["val_check"] is None or abs(out["val_check"] - best["score"]) > 1e-6:
        raise SystemExit(f"{family.id}: mergekit-yaml's merge scores {out['val_check']} on validation, "
                         f"the search's trial {best['trial']} scored {best['score']}")
    return out


def ceiling_on_test(family, records: List[dict], merger, count: int, workdir: Path) -> dict:
    """Diagnosis only, never selection: the ``count`` best trials on validation,
    each merged at its own merge seed and scored on test.

    The best of them on test is an optimistic bound on what any rule that picks
    one of these trials could reach; it says whether the target is within the
    searched space at all.
    """
    from benchmarks.quality.merging import Recipe
    from benchmarks.quality.models import load_weights, new_model
    from benchmarks.quality.run import family_settings

    task_of = {str(Path(p).resolve()): t for t, p in family.experts.items()}
    template = new_model(family_settings(False)[family.kind], 0)
    scored = []
    for record in top_by_validation(records, count):
        order = tuple(task_of[str(Path(p).resolve())] for p in record["order"])
        params = record["parameters"]
        settings = tuple((name, float(params[name])) for name in ("temperature", "base_droprate", "lambda"))
        merged = merger.merge(Recipe("circuit", order, settings, (), int(record["seed"])), family.base,
                              family.experts, workdir / "current")
        test = _evaluator("test", TEST_EXAMPLES)(load_weights(template, merged))
        scored.append({"trial": record["trial"], "val": record["score"],
                       "test": 100.0 * statistics.fmean(test.values())})
    return summarize_ceiling(scored)


def top_by_validation(records: List[dict], count: int) -> List[dict]:
    """The ``count`` best finished trials on validation, best first (ties: earlier trial first)."""
    ok = [r for r in records if r.get("status") == "ok"]
    return sorted(ok, key=lambda r: (-r["score"], r["trial"]))[:count]


def summarize_ceiling(scored: List[dict]) -> dict:
    """``scored``: the trials in validation order with their test scores; the
    best on test (the first of equal scores) and its validation rank (1-based)."""
    best = max(scored, key=lambda s: s["test"])
    return {"count": len(scored), "trials": scored, "best_test": best["test"], "best_trial": best["trial"],
            "val_rank_of_best": scored.index(best) + 1}


# ---------------------------------------------------------------- step 3

SEARCH_ROW = "circuit search (best of the trials on val)"


def compare(chosen: Dict[str, dict], quality: dict, kinds, seeds) -> dict:
    """Rows per family: the search and the benchmark's rows, test means per training seed."""
    tables = quality["analysis"]["tables"]
    out = {}
    for kind in kinds:
        fids = [f"{kind}-{s}" for s in seeds]
        rows = [{"name": SEARCH_ROW, "kind": "search",
                 "detail": "; ".join(f"seed {chosen[f]['train_seed']}: {describe(chosen[f])}" for f in fids),
                 "by_family": {f: chosen[f]["test_mean"] for f in fids}}]
        for row in tables[kind]["rows"]:
            if row["kind"] == "reference" and not row["name"].startswith("base"):
                continue
            rows.append({"name": row["name"], "kind": row["kind"], "detail": row.get("detail", ""),
                         "by_family": {f: 100.0 * row["by_family"][f]["mean"] for f in fids}})
        for row in rows:
            row["mean"] = statistics.fmean(row["by_family"][f] for f in fids)
            diffs = [rows[0]["by_family"][f] - row["by_family"][f] for f in fids]
            row["search_minus_this"] = {"mean": statistics.fmean(diffs), "per_seed": diffs,
                                        "min": min(diffs)}
        mergekit = [r for r in rows if r["kind"] == "mergekit"]
        best_mk = max(mergekit, key=lambda r: r["mean"])
        recommended = next(r for r in rows if r["name"] == "circuit recommended")
        out[kind] = {
            "families": fids, "rows": rows,
            "best_mergekit": best_mk["name"],
            "vs_best_mergekit": best_mk["search_minus_this"],
            "vs_recommended": recommended["search_minus_this"],
            "target_met": best_mk["search_minus_this"]["mean"] >= TARGET_POINTS
                          and recommended["search_minus_this"]["mean"] > 0,
        }
    return out


def both_families(comparison: dict) -> dict:
    """Every row present in every family: the mean of the families' means, and
    the search minus the row paired over every (family, training seed)."""
    kinds = list(comparison)
    names = [r["name"] for r in comparison[kinds[0]]["rows"]
             if all(any(x["name"] == r["name"] for x in comparison[k]["rows"]) for k in kinds)]
    rows = []
    for name in names:
        per_kind = {k: next(r for r in comparison[k]["rows"] if r["name"] == name) for k in kinds}
        diffs = [d for k in kinds for d in per_kind[k]["search_minus_this"]["per_seed"]]
        rows.append({"name": name, "kind": per_kind[kinds[0]]["kind"],
                     "by_kind": {k: per_kind[k]["mean"] for k in kinds},
                     "mean": statistics.fmean(per_kind[k]["mean"] for k in kinds),
                     "search_minus_this": {"mean": statistics.fmean(diffs), "per_pair": diffs,
                                           "min": min(diffs)}})
    return {"kinds": kinds, "rows": rows}


def describe(entry: dict) -> str:
    s = entry["settings"]
    return (f"{' > '.join(entry['order'])}, T={s['temperature']:.2f} bd={s['base_droprate']:.2f} "
            f"λ={s['lambda']:.2f}")


def method_table(columns: Sequence[str], rows: List[dict], values) -> List[str]:
    """One row per method: ``values(row)`` under ``columns``, its mean, and the
    search minus it (paired); the search's own row in bold, without a difference."""
    lines = ["| method | " + " | ".join(columns) + " | mean | search - this (paired) |",
             "|---|" + "---:|" * (len(columns) + 2)]
    for row in rows:
        search = row["kind"] == "search"
        name = f"**{row['name']}**" if search else row["name"]
        diff = "" if search else f"{row['search_minus_this']['mean']:+.1f}"
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values(row))
                     + f" | {row['mean']:.1f} | {diff} |")
    return lines


def render(result: dict) -> str:
    ctx = result["context"]
    lines = [
        f"Generated by `{ctx['command']}` on {ctx['machine']}: "
        f"{ctx['total_trials']} search trials in {ctx['search_wall_s']:.0f} s of search wall time "
        f"({ctx['workers']}); the benchmark's rows from `{ctx['quality_results']}` "
        f"(`{ctx['quality_command']}`).",
        "",
        f"For each expert family and training seed, `circuit-merge search` ran {ctx['trials']} trials "
        "(Optuna TPE) over the order of the four experts, `temperature` in [0, 1], `base_droprate` in "
        "[0, 0.9] and `lambda` in [0.25, 1.5] (the benchmark's scale range), merge seed 0, with the "
        "benchmark's validation split as its eval (mean exact match on 200 inputs per task); trial 1 is "
        "circuit's recommended preset in the `gain-asc` order. The best trial on validation was then "
        "merged by `mergekit-yaml` over merge seeds 0, 1, 2 and scored on the 400 test inputs per task, "
        "as the benchmark scores every selected method (its validation score through `mergekit-yaml` "
        "equals the search's). Test accuracy in %, mean over merge seeds; mergekit's methods were tuned "
        "on the same validation split over the same scale grid (and densities), per family and "
        "training seed. The test split was read for nothing else"
        + (" (except the diagnosis at the end, after the choice)." if any(
            "ceiling" in c for c in result["chosen"].values()) else "."),
        "",
    ]
    for kind, table in result["comparison"].items():
        seeds = [f.rsplit("-", 1)[1] for f in table["families"]]
        vm, vr = table["vs_best_mergekit"], table["vs_recommended"]
        verdict = "met" if table["target_met"] else "not met"
        lines += [
            f"### Family `{kind}`",
            "",
            f"Search vs the best mergekit method ({table['best_mergekit']}, the highest test mean of "
            f"the tuned methods): **{vm['mean']:+.1f}** points paired over the training seeds "
            f"({', '.join(f'seed {s}: {d:+.1f}' for s, d in zip(seeds, vm['per_seed']))}); vs circuit "
            f"recommended: **{vr['mean']:+.1f}** "
            f"({', '.join(f'seed {s}: {d:+.1f}' for s, d in zip(seeds, vr['per_seed']))}). "
            f"Target (>= +{TARGET_POINTS:g} over the best mergekit method and above the recommended "
            f"preset): {verdict}.",
            "",
        ]
        lines += method_table([f"seed {s}" for s in seeds], table["rows"],
                              lambda row: [row["by_family"][f] for f in table["families"]])
        lines.append("")
    both = result["both"]
    lines += [
        "### Both families",
        "",
        "Mean of the two families' means; the difference is paired over all six (family, training "
        "seed) pairs.",
        "",
    ]
    lines += method_table(both["kinds"], both["rows"], lambda row: [row["by_kind"][k] for k in both["kinds"]])
    lines.append("")
    lines += [
        "### The chosen settings (validation)",
        "",
        "| family | trials | chosen: order (first = highest priority), settings | val: chosen | "
        "val: trial 1 (recommended preset, gain-asc) | test: chosen (merge seeds 0, 1, 2) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for fid, entry in result["chosen"].items():
        lines.append(
            f"| {fid} | {entry['trials']} | {describe(entry)} (trial {entry['best_trial']}) | "
            f"{entry['val_score']:.1f} | {entry['val_trial_1']:.1f} | "
            + ", ".join(f"{v['mean']:.1f}" for v in entry["test"].values()) + " |")
    lines += ceiling_section(result)
    lines += ["", "Search command per family (`<runs>` = "
              f"`{ctx['runs']}`): `{next(iter(result['chosen'].values()))['command']}`", ""]
    return "\n".join(lines)


def ceiling_section(result: dict) -> List[str]:
    """The diagnosis table (``--ceiling``): is the target inside the searched space at all?"""
    entries = {f: c for f, c in result["chosen"].items() if "ceiling" in c}
    if not entries:
        return []
    count = next(iter(entries.values()))["ceiling"]["count"]
    every = all(e["ceiling"]["count"] == e.get("trials") for e in entries.values())
    which = f"all {count} trials" if every else f"the {count} best trials on validation"
    lines = [
        "",
        f"### Diagnosis: {which} of each search, scored on test",
        "",
        f"Read for diagnosis only, after the choice above: {which} of each family's search, "
        "merged at their own merge seed (0) and scored on test. The best of them on test "
        "is an optimistic bound (it picks with the test split) on what any rule choosing among the "
        "search's trials could reach. Chosen = the search's choice at merge seed 0.",
        "",
        "| family | best mergekit method (test) | search: chosen (test, merge seed 0) | "
        f"best of the top {count} on test | its validation rank | bound - best mergekit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_kind: Dict[str, List[float]] = {}
    for fid, entry in entries.items():
        table = result["comparison"][entry["kind"]]
        best_mk = next(r for r in table["rows"] if r["name"] == table["best_mergekit"])
        reference = best_mk["by_family"][fid]
        ceiling = entry["ceiling"]
        by_kind.setdefault(entry["kind"], []).append(ceiling["best_test"] - reference)
        lines.append(f"| {fid} | {reference:.1f} ({table['best_mergekit']}) | "
                     f"{entry['test']['0']['mean']:.1f} | {ceiling['best_test']:.1f} | "
                     f"{ceiling['val_rank_of_best']} | {ceiling['best_test'] - reference:+.1f} |")
    lines.append("")
    lines.append("Bound minus the best mergekit method, mean over training seeds: "
                 + "; ".join(f"{kind} {statistics.fmean(v):+.1f}" for kind, v in by_kind.items()) + ".")
    return lines


def machine_description() -> str:
    from benchmarks.quality.run import machine_description as describe_machine

    return describe_machine()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.search_proof",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the benchmark's cache (models)")
    parser.add_argument("--runs", type=Path, help="search output folders (default: <cache>/search-proof)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="where search.md and search.json go")
    parser.add_argument("--quality-results", type=Path, default=DEFAULT_RESULTS / "results.json",
                        help="the benchmark's results.json (mergekit's tuned methods, circuit recommended)")
    parser.add_argument("--kinds", nargs="+", default=["replay", "forget"])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--merge-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=64, help="trial budget per family and training seed")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--report", action="store_true", help="no new trials: score and write from finished searches")
    parser.add_argument("--ceiling", type=int, default=0, metavar="K",
                        help="diagnosis only: also score the K best trials on validation on test (their "
                             "best is an optimistic bound for any rule that picks among the trials)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite search.md from the search.json in --out (no merge, no scoring)")
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    if args.render:
        (args.out / "search.md").write_text(render(json.loads((args.out / "search.json").read_text())))
        print(f"wrote {args.out / 'search.md'}")
        return 0
    started = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    from benchmarks.quality.merging import Merger

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    cache = args.cache.resolve()
    runs = (args.runs or cache / "search-proof").resolve()
    fams = families(cache, args.kinds, args.train_seeds)
    searches = {}
    for family in fams:
        if args.report:
            searches[family.id] = {"command": None, "wall_s": 0.0}
        else:
            searches[family.id] = run_search(family, runs, args.trials, args.cpus_per_trial, log)
    previous = {}
    json_path = args.out / "search.json"
    if json_path.exists():
        previous = json.loads(json_path.read_text()).get("chosen", {})

    merger = Merger(runs / "merges")
    chosen = {}
    try:
        for family in fams:
            records = read_trials(runs / family.id)
            if not records:
                raise SystemExit(f"{family.id}: no search in {runs / family.id}")
            records = sorted(records, key=lambda r: r["trial"])[: args.trials]
            best = best_trial(records)
            scored = score_chosen(family, best, merger, args.merge_seeds, runs / "merges")
            first = records[0]
            wall = searches[family.id]["wall_s"] or previous.get(family.id, {}).get("search_wall_s", 0.0)
            command = searches[family.id]["command"] or previous.get(family.id, {}).get("command")
            chosen[family.id] = {
                "kind": family.kind, "train_seed": family.seed, "trials": len(records),
                "failed_trials": sum(1 for r in records if r.get("status") != "ok"),
                "best_trial": best["trial"], "val_score": best["score"], "digest": best.get("digest"),
                "val_trial_1": first["score"], "trial_1_parameters": first["parameters"],
                "search_wall_s": wall, "command": command, **scored,
            }
            log(f"{family.id}: chosen trial {best['trial']} val {best['score']:.2f}, "
                f"test {scored['test_mean']:.2f}")
            if args.ceiling:
                chosen[family.id]["ceiling"] = ceiling_on_test(family, records, merger, args.ceiling,
                                                               runs / "merges")
                log(f"{family.id}: best of the top {args.ceiling} on test: "
                    f"{chosen[family.id]['ceiling']['best_test']:.2f}")
    finally:
        merger.close()

    quality = json.loads(args.quality_results.read_text())
    comparison = compare(chosen, quality, args.kinds, args.train_seeds)
    shown_argv = list(argv if argv is not None else sys.argv[1:])
    try:
        shown_quality = str(args.quality_results.resolve().relative_to(ROOT))
    except ValueError:
        shown_quality = str(args.quality_results)
    result = {
        "context": {
            "command": " ".join(["python -m benchmarks.quality.search_proof", *shown_argv]),
            "machine": args.machine or machine_description(),
            "trials": args.trials, "total_trials": sum(c["trials"] for c in chosen.values()),
            "search_wall_s": sum(c["search_wall_s"] or 0.0 for c in chosen.values()),
            "workers": f"local Ray, {args.cpus_per_trial:g} CPU per trial worker",
            "runs": str(runs.relative_to(ROOT)) if runs.is_relative_to(ROOT) else str(runs),
            "quality_results": shown_quality,
            "quality_command": quality["context"].get("command"),
            "lambda_space": LAMBDA_SPACE, "merge_seeds": args.merge_seeds, "target_points": TARGET_POINTS,
        },
        "chosen": chosen,
        "comparison": comparison,
        "both": both_families(comparison),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "search.md").write_text(render(result))
    log(f"wrote {args.out / 'search.md'} and search.json")
    for kind, table in comparison.items():
        print(f"{kind}: search vs {table['best_mergekit']} {table['vs_best_mergekit']['mean']:+.2f}, "
              f"vs recommended {table['vs_recommended']['mean']:+.2f}, target met: {table['target_met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
