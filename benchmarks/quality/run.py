"""Merge-quality benchmark: circuit vs mergekit's methods on the same experts.

Run from the repository root::

    .venv/bin/python -m benchmarks.quality.run            # default: ~17 min wall + ~22 min training (2 busy shared cores)
    .venv/bin/python -m benchmarks.quality.run --tiny     # end to end in ~2 minutes

Steps (all cached under ``benchmarks/quality/.cache``):

1. train a small Llama-style base on a mixture of four symbol tasks, and
   fine-tune one expert per task from it in two ways: ``replay`` (half of each
   batch replays the base's mixture) and ``forget`` (no replay, 3x the
   learning rate); one base and both expert families per training seed;
2. merge the four experts with the real ``mergekit-yaml`` (``merge_method:
   circuit`` comes from the installed plugin's entry point): every method over
   the same scale grid (circuit/ties/dare_ties/della ``lambda``,
   task_arithmetic ``weight``), densities for the sparsifying methods, and
   circuit's temperature x base_droprate grid; score each on validation;
3. select on validation only: each mergekit method's setting per family, and
   one circuit preset and one order rule across both families and all training
   seeds; then score the selected merges on the test split over every merge
   seed and write ``benchmarks/quality/results/`` (results.md, results.json,
   PNG charts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
DEFAULT_RESULTS = HERE / "results"


#: The expert families: how each kind fine-tunes its experts from the base.
KINDS = ("replay", "forget")


@dataclass(frozen=True)
class Profile:
    name: str
    train_seeds: Tuple[int, ...]
    #: merge seeds of the random methods; settings are selected on the first,
    #: the selected settings are scored on test over all of them.
    merge_seeds: Tuple[int, ...]
    val_examples: int
    test_examples: int
    kinds: Tuple[str, ...] = KINDS


FULL = Profile(
    name="default",
    train_seeds=(0, 1, 2),
    merge_seeds=(0, 1, 2),
    val_examples=200,
    test_examples=400,
)
TINY = Profile(
    name="tiny",
    train_seeds=(0,),
    merge_seeds=(0, 1),
    val_examples=40,
    test_examples=60,
)


def family_settings(tiny: bool):
    """Training settings per expert family (the base is the same for both).

    * ``replay``: 100 steps at lr 1e-4, half of each batch replaying the base's
      mixture (as SFT mixes in general data): experts forget little.
    * ``forget``: the same steps with no replay at 3x the learning rate (3e-4):
      experts overwrite more of what the base knew.
    """
    from benchmarks.quality.models import TrainSettings

    if tiny:
        replay = TrainSettings(
            hidden_size=32,
            layers=1,
            heads=2,
            kv_heads=1,
            intermediate_size=64,
            batch_size=16,
            base_steps=30,
            expert_steps=6,
        )
    else:
        replay = TrainSettings()
    return {"replay": replay, "forget": replace(replay, expert_replay=0.0, expert_lr=3e-4)}


class EvalCache:
    """Scores of merged models, keyed by family, recipe, split and set size."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.data: Dict[str, dict] = {}
        if enabled and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.data[entry["key"]] = entry["scores"]

    def get(self, key: str):
        return self.data.get(key) if self.enabled else None

    def put(self, key: str, scores) -> None:
        self.data[key] = scores
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"key": key, "scores": scores}) + "\n")


def delta_norms(family) -> Dict[str, float]:
    """L2 norm of (expert - base) over every floating-point weight."""
    import torch
    from safetensors.torch import load_file

    def load(directory):
        state = {}
        for path in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(str(path)))
        return state

    base = load(family.base)
    norms = {}
    for task, path in family.experts.items():
        expert = load(path)
        total = 0.0
        for name, tensor in base.items():
            if tensor.is_floating_point():
                total += float((expert[name].float() - tensor.float()).pow(2).sum())
        norms[task] = total**0.5
    return norms


def analyze_order(family, tasks: Sequence[str], workdir: Path) -> Optional[Tuple[str, ...]]:
    """The order ``circuit-merge analyze`` suggests (least |delta| mass
    overwritten on sign conflicts), or None where that command is missing."""
    import subprocess

    binary = Path(sys.executable).parent / "circuit-merge"
    if not binary.exists():
        return None
    out = workdir / f"analyze-{family.root.name}.json"
    if not out.exists():
        result = subprocess.run(
            [str(binary), "analyze", "-q", "--json", str(out), str(family.base),
             *(str(family.experts[t]) for t in tasks)],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not out.exists():
            print(f"  (circuit-merge analyze unavailable: {result.stderr.strip()[-200:]})")
            return None
    suggested = json.loads(out.read_text())["orders"]["suggested"]["order"]
    return tuple(tasks[i] for i in suggested)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.run",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--tiny", action="store_true", help="very small end-to-end run")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/quality/results; tiny: <cache>/results-tiny)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder for models and scores")
    parser.add_argument("--engine", choices=("worker", "cli"), default="worker",
                        help="worker: one long-lived mergekit-yaml process (default); cli: a fresh mergekit-yaml per merge (slow)")
    parser.add_argument("--train-seeds", type=int, nargs="+", help="training seeds (one base and both expert families each)")
    parser.add_argument("--merge-seeds", type=int, nargs="+",
                        help="merge seeds for the random methods (the first is the one settings are selected on)")
    parser.add_argument("--kinds", nargs="+", choices=tuple(KINDS), help="expert families to run (default: all)")
    parser.add_argument("--analyze-order", action="store_true",
                        help="also compare the order `circuit-merge analyze` suggests (a subprocess per family)")
    parser.add_argument("--no-parity", action="store_true", help="skip the worker-vs-console-script check")
    parser.add_argument("--fresh", action="store_true", help="ignore cached scores (models stay cached)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    parser.add_argument("--machine", default=None, help="machine description written into results.md")
    args = parser.parse_args(argv)

    started = time.time()
    profile = TINY if args.tiny else FULL
    if args.train_seeds:
        profile = replace(profile, train_seeds=tuple(args.train_seeds))
    if args.merge_seeds:
        profile = replace(profile, merge_seeds=tuple(args.merge_seeds))
    if args.kinds:
        profile = replace(profile, kinds=tuple(k for k in KINDS if k in args.kinds))
    out = args.out or (args.cache / "results-tiny" if args.tiny else DEFAULT_RESULTS)
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from benchmarks.quality import plan as P
    from benchmarks.quality import results_page
    from benchmarks.quality import select as S
    from benchmarks.quality import tasks as T
    from benchmarks.quality.merging import Merger, Recipe, same_tensors
    from benchmarks.quality.models import Evaluator, build_family, load_weights, new_model

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    merger = Merger(cache / "merges", engine=args.engine)
    merger.start()  # its imports overlap with training and scoring here
    settings = family_settings(args.tiny)
    log(f"profile {profile.name}: families {profile.kinds}, training seeds {profile.train_seeds}, "
        f"merge seeds {profile.merge_seeds}")
    families = []
    t0 = time.time()
    for seed in profile.train_seeds:
        for kind in profile.kinds:
            families.append(build_family(cache, settings[kind], seed, log=log, kind=kind))
    train_seconds = time.time() - t0
    log(f"models ready ({train_seconds:.0f}s)")
    fids = [f.id for f in families]

    evaluators = {
        "val": Evaluator(T.eval_sets("val", profile.val_examples)),
        "test": Evaluator(T.eval_sets("test", profile.test_examples)),
    }
    sizes = {"val": profile.val_examples, "test": profile.test_examples}
    scores_cache = EvalCache(cache / "scores.jsonl", enabled=not args.fresh)
    template = new_model(settings[profile.kinds[0]], 0)
    tasks = list(T.TASKS)
    m0 = profile.merge_seeds[0]

    def score_dir(directory: Path, splits) -> dict:
        model = load_weights(template, directory)
        return {split: evaluators[split](model) for split in splits}

    records: Dict[Tuple[str, str], dict] = {}
    references: Dict[str, dict] = {}
    orders_by_family: Dict[str, Dict[str, Tuple[str, ...]]] = {}
    counts = {"evaluated": 0, "cached": 0}

    def run_recipe(family, recipe, role: str, splits=("val",)) -> dict:
        key = (family.id, recipe.key())
        record = records.get(key)
        if record is None:
            record = records[key] = {
                "family": family.id, "kind": family.kind, "train_seed": family.seed,
                "method": recipe.method, "settings": recipe.settings,
                "order": list(recipe.order), "seed": recipe.seed, "roles": [],
            }
        if role not in record["roles"]:
            record["roles"].append(role)
        missing = []
        for split in splits:
            if split in record:
                continue
            ckey = f"{family.root.name}/{recipe.key()}/{split}{sizes[split]}-{T.MAX_LEN}"
            cached = scores_cache.get(ckey)
            if cached is not None:
                record[split] = cached
                counts["cached"] += 1
            else:
                missing.append((split, ckey))
        if missing:
            out_dir = merger.merge(recipe, family.base, family.experts, cache / "merges" / "current")
            scored = score_dir(out_dir, [s for s, _ in missing])
            for split, ckey in missing:
                record[split] = scored[split]
                scores_cache.put(ckey, scored[split])
            counts["evaluated"] += 1
        return record

    base_scores: Dict[Path, dict] = {}
    parity = None
    try:
        # 1. every grid point on validation (merge seed m0) -----------------
        for family in families:
            t0 = time.time()
            if family.base not in base_scores:  # both families share the base
                base_scores[family.base] = score_dir(family.base, ("val", "test"))
            ref = {"base": base_scores[family.base], "experts": {}}
            for task, path in family.experts.items():
                ref["experts"][task] = score_dir(path, ("val", "test"))
            norms = delta_norms(family)
            gains = {t: ref["experts"][t]["val"][t] - ref["base"]["val"][t] for t in tasks}
            ref.update(delta_norms=norms, val_gains=gains, kind=family.kind, train_seed=family.seed)
            references[family.id] = ref
            orders = P.rule_orders(tasks, norms, gains)
            if args.analyze_order:
                suggested = analyze_order(family, tasks, cache)
                if suggested is not None:
                    orders["analyze"] = suggested
            orders_by_family[family.id] = orders
            log(f"{family.id}: gains " + ", ".join(f"{t}={100 * g:+.1f}" for t, g in gains.items())
                + f"; {P.GRID_RULE} order {' > '.join(orders[P.GRID_RULE])}")
            for method, points in P.mergekit_points(args.tiny).items():
                for point in points:
                    for recipe in P.recipes_for(point, tasks, [m0]):
                        run_recipe(family, recipe, "grid")
            for point in P.circuit_points(args.tiny):
                for recipe in P.recipes_for(point, orders[P.GRID_RULE], [m0]):
                    run_recipe(family, recipe, "circuit-grid")
            log(f"  {family.id}: validation grid done ({time.time() - t0:.0f}s)")

        rec_list = lambda: list(records.values())  # noqa: E731
        # 2. circuit preset across all families, then the order rule ---------
        preset = S.pick_preset(rec_list(), fids, m0, tasks)
        log(f"validation picks circuit preset {preset}")
        t0 = time.time()
        for family in families:
            for name, order in orders_by_family[family.id].items():
                for recipe in P.recipes_for(P.preset_point(preset), order, [m0]):
                    run_recipe(family, recipe, "rule", ("val", "test"))
        rule = S.pick_rule(rec_list(), fids, preset, orders_by_family, m0, tasks)
        log(f"validation picks order rule {rule} ({time.time() - t0:.0f}s)")

        # 3. the selected settings on test, every merge seed -----------------
        selected: Dict[str, Dict[str, dict]] = {}
        for family in families:
            t0 = time.time()
            selected[family.id] = {}
            for method, points in P.mergekit_points(args.tiny).items():
                best = S.best_point(rec_list(), family.id, method, m0, tasks)
                selected[family.id][method] = best
                point = next(p for p in points if p.settings == best)
                for recipe in P.recipes_for(point, tasks, profile.merge_seeds):
                    run_recipe(family, recipe, "selected", ("test",))
            # circuit tuned like the mergekit methods: its best grid point on
            # this family's validation (in the grid's order), for comparison.
            tuned = S.best_point(rec_list(), family.id, "circuit", m0, tasks, role="circuit-grid")
            selected[family.id]["circuit"] = tuned
            for recipe in P.recipes_for(P.preset_point(tuned), orders_by_family[family.id][P.GRID_RULE],
                                        profile.merge_seeds):
                run_recipe(family, recipe, "circuit-tuned", ("test",))
            order = orders_by_family[family.id][rule]
            for role, point in (("circuit-default", P.preset_point(P.CIRCUIT_DEFAULT)),
                                ("circuit-recommended", P.preset_point(preset))):
                for recipe in P.recipes_for(point, order, profile.merge_seeds):
                    run_recipe(family, recipe, role, ("test",))
            log(f"  {family.id}: test scores done ({time.time() - t0:.0f}s)")

        if not args.no_parity and not args.tiny:
            # The worker must write exactly what a fresh mergekit-yaml writes.
            family = families[0]
            checks = []
            for recipe in (
                Recipe("circuit", orders_by_family[family.id][rule], P.preset_point(preset).params, (), 0),
                Recipe("della", tuple(tasks), (("lambda", 0.5),), (("weight", 1.0), ("density", 0.5)), 0),
            ):
                a = merger.merge(recipe, family.base, family.experts, cache / "merges" / "parity-worker", engine="worker")
                b = merger.merge(recipe, family.base, family.experts, cache / "merges" / "parity-cli", engine="cli")
                checks.append({"method": recipe.method, "identical": same_tensors(a, b)})
            parity = checks
            log(f"  parity worker vs console script: {checks}")
    finally:
        merge_seconds = merger.seconds
        merges = merger.merges
        merger.close()
        shutil.rmtree(cache / "merges", ignore_errors=True)

    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    runtime = {
        "total_seconds": round(time.time() - started, 1),
        "cpu_seconds": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
        "training_seconds": round(train_seconds, 1),
        "merges_run": merges,
        "merge_seconds": round(merge_seconds, 1),
        "merged_models_evaluated": counts["evaluated"],
        "cached_scores_used": counts["cached"],
        "engine": args.engine,
    }
    context = {
        "profile": asdict(profile),
        "train_settings": {k: asdict(v) for k, v in settings.items() if k in profile.kinds},
        "tasks": tasks,
        "families": fids,
        "scales": list(P.scales(args.tiny)),
        "densities": list(P.TINY_DENSITIES if args.tiny else P.DENSITIES),
        "temperatures": list(P.TINY_TEMPERATURES if args.tiny else P.CIRCUIT_TEMPERATURES),
        "droprates": list(P.TINY_DROPRATES if args.tiny else P.CIRCUIT_DROPRATES),
        "circuit_default": P.CIRCUIT_DEFAULT,
        "circuit_recommended": P.CIRCUIT_RECOMMENDED,
        "recommended_rule": P.RECOMMENDED_RULE,
        "grid_rule": P.GRID_RULE,
        "gained_nothing": P.GAINED_NOTHING,
        "picked_preset": preset,
        "picked_rule": rule,
        "selected": selected,
        "orders": {f: {n: list(o) for n, o in v.items()} for f, v in orders_by_family.items()},
        "parity": parity,
        "runtime": runtime,
        "machine": args.machine or machine_description(),
        "command": " ".join(["python -m benchmarks.quality.run", *(argv if argv is not None else sys.argv[1:])]),
    }
    recs = list(records.values())
    analysis = results_page.analyse(recs, references, context)
    results_page.write(out, recs, references, analysis, context)
    log(f"wrote {out} ({time.time() - started:.0f}s total)")
    print(results_page.summary_text(analysis))
    return 0


def machine_description() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores ({platform.system()} {platform.release()})"


if __name__ == "__main__":
    sys.exit(main())
