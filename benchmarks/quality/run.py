"""Merge-quality benchmark: circuit vs mergekit's methods on the same experts.

Run from the repository root::

    .venv/bin/python -m benchmarks.quality.run            # default, ~20 min on 2 cores
    .venv/bin/python -m benchmarks.quality.run --tiny     # end to end in < 1 min

Steps (all cached under ``benchmarks/quality/.cache``):

1. train a small Llama-style base on a mixture of four digit tasks (inputs of at
   most 5 digits), and fine-tune one expert per task from it (3..7 digits);
   one such family per training seed;
2. merge the four experts with the real ``mergekit-yaml`` (``merge_method:
   circuit`` comes from the installed plugin's entry point): circuit over a
   grid of temperature x base_droprate and over all 24 priority orders, and
   mergekit's linear, task_arithmetic, ties, dare_ties and della at their
   defaults plus a small grid, each random method over three merge seeds;
3. score every merged model by exact match on held-out validation and test
   inputs, select settings on validation only, and write
   ``benchmarks/quality/results/`` (results.md, results.json, PNG charts).
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
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
DEFAULT_RESULTS = HERE / "results"


@dataclass(frozen=True)
class Profile:
    name: str
    train_seeds: Tuple[int, ...]
    merge_seeds: Tuple[int, ...]
    #: families (by index in train_seeds) that get the full circuit grid and
    #: the all-orders sweep; the others get the headline comparison only.
    full_families: int
    val_examples: int
    test_examples: int
    all_orders: bool  # every permutation, else the rotations (each task on top once)


FULL = Profile(
    name="default",
    train_seeds=(0, 1, 2),
    merge_seeds=(0, 1, 2),
    full_families=1,
    val_examples=200,
    test_examples=400,
    all_orders=True,
)
TINY = Profile(
    name="tiny",
    train_seeds=(0,),
    merge_seeds=(0, 1),
    full_families=1,
    val_examples=40,
    test_examples=60,
    all_orders=False,
)


def train_settings(tiny: bool):
    from benchmarks.quality.models import TrainSettings

    if tiny:
        return TrainSettings(
            hidden_size=32,
            layers=1,
            heads=2,
            kv_heads=1,
            intermediate_size=64,
            batch_size=16,
            base_steps=30,
            expert_steps=6,
        )
    return TrainSettings()


class EvalCache:
    """Scores of merged models, keyed by family, recipe and evaluation sets."""

    def __init__(self, path: Path, signature: str, enabled: bool = True):
        self.path = path
        self.signature = signature
        self.enabled = enabled
        self.data: Dict[str, dict] = {}
        if enabled and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.data[entry["key"]] = entry["scores"]

    def key(self, family, recipe) -> str:
        return f"{family.root.name}/{recipe.key()}/{self.signature}"

    def get(self, family, recipe):
        return self.data.get(self.key(family, recipe)) if self.enabled else None

    def put(self, family, recipe, scores) -> None:
        key = self.key(family, recipe)
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
    parser.add_argument("--tiny", action="store_true", help="very small end-to-end run (< 1 min)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/quality/results; tiny: <cache>/results-tiny)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder for models and scores")
    parser.add_argument("--engine", choices=("worker", "cli"), default="worker",
                        help="worker: one long-lived mergekit-yaml process (default); cli: a fresh mergekit-yaml per merge (slow)")
    parser.add_argument("--train-seeds", type=int, nargs="+", help="training seeds (one model family each)")
    parser.add_argument("--merge-seeds", type=int, nargs="+", help="merge seeds for the random methods")
    parser.add_argument("--full-families", type=int, help="how many families get the circuit grid and order sweep")
    parser.add_argument("--no-parity", action="store_true", help="skip the worker-vs-console-script check")
    parser.add_argument("--fresh", action="store_true", help="ignore cached scores (models stay cached)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    parser.add_argument("--extra-order", action="append", default=[], metavar="NAME=t1,t2,t3,t4",
                        help="also rank this priority order (e.g. from `circuit-merge analyze`)")
    args = parser.parse_args(argv)

    started = time.time()
    profile = TINY if args.tiny else FULL
    if args.train_seeds:
        profile = replace(profile, train_seeds=tuple(args.train_seeds))
    if args.merge_seeds:
        profile = replace(profile, merge_seeds=tuple(args.merge_seeds))
    if args.full_families is not None:
        profile = replace(profile, full_families=args.full_families)
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
    from benchmarks.quality import tasks as T
    from benchmarks.quality.merging import Merger, same_tensors
    from benchmarks.quality.models import (
        Evaluator,
        build_family,
        load_weights,
        new_model,
    )

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    merger = Merger(cache / "merges", engine=args.engine)
    merger.start()  # its imports overlap with training and scoring here
    settings = train_settings(args.tiny)
    log(f"profile {profile.name}: training seeds {profile.train_seeds}, merge seeds {profile.merge_seeds}")
    families = []
    train_seconds = 0.0
    for seed in profile.train_seeds:
        t0 = time.time()
        families.append(build_family(cache, settings, seed, log=log))
        train_seconds += time.time() - t0
    log(f"models ready ({train_seconds:.0f}s)")

    val = Evaluator(T.eval_sets("val", profile.val_examples))
    test = Evaluator(T.eval_sets("test", profile.test_examples))
    signature = f"v{profile.val_examples}-t{profile.test_examples}-{T.MAX_LEN}"
    scores_cache = EvalCache(cache / "scores.jsonl", signature, enabled=not args.fresh)
    template = new_model(settings, 0)

    def score_dir(directory: Path) -> dict:
        model = load_weights(template, directory)
        return {"val": val(model), "test": test(model)}

    records: List[dict] = []
    references: Dict[int, dict] = {}
    orders_by_family: Dict[int, Dict[str, Tuple[str, ...]]] = {}
    merge_seconds = 0.0
    evaluated = 0

    def run_recipe(family, recipe, role: str) -> dict:
        nonlocal evaluated
        scores = scores_cache.get(family, recipe)
        if scores is None:
            out_dir = merger.merge(recipe, family.base, family.experts, cache / "merges" / "current")
            scores = score_dir(out_dir)
            scores_cache.put(family, recipe, scores)
            evaluated += 1
        record = {
            "family": family.seed,
            "method": recipe.method,
            "settings": recipe.settings,
            "order": list(recipe.order),
            "seed": recipe.seed,
            "role": role,
            **scores,
        }
        records.append(record)
        return record

    try:
        for index, family in enumerate(families):
            full = index < profile.full_families
            log(f"family seed {family.seed}: evaluating base and experts")
            ref = {"base": score_dir(family.base), "experts": {}}
            for task, path in family.experts.items():
                ref["experts"][task] = score_dir(path)
            norms = delta_norms(family)
            gains = {
                t: ref["experts"][t]["val"][t] - ref["base"]["val"][t] for t in T.TASKS
            }
            ref["delta_norms"] = norms
            references[family.seed] = ref
            orders = P.rule_orders(T.TASKS, norms, gains)
            suggested = None if args.tiny else analyze_order(family, T.TASKS, cache)
            if suggested is not None:
                orders["analyze"] = suggested
            for spec in args.extra_order:
                name, _, listed = spec.partition("=")
                order = tuple(x.strip() for x in listed.split(","))
                if sorted(order) != sorted(T.TASKS):
                    raise SystemExit(f"--extra-order {spec!r}: must list {', '.join(T.TASKS)}")
                orders[name] = order
            orders_by_family[family.seed] = orders
            rule_order = orders[P.RECOMMENDED_RULE]
            log(f"  delta norms {', '.join(f'{t}={v:.2f}' for t, v in norms.items())}; "
                f"{P.RECOMMENDED_RULE} order: {' > '.join(rule_order)}")

            t0 = time.time()
            # mergekit methods: order does not matter to them; listed order.
            for method, points in P.mergekit_points(args.tiny).items():
                for point in points:
                    role = "default" if point.is_default else "grid"
                    for recipe in P.recipes_for(point, T.TASKS, profile.merge_seeds):
                        run_recipe(family, recipe, role)
            log(f"  mergekit methods done ({time.time() - t0:.0f}s)")

            # circuit: defaults and preset on the rule order (every family).
            t0 = time.time()
            headline = [P.circuit_point(**P.CIRCUIT_DEFAULT), P.circuit_point(**P.CIRCUIT_RECOMMENDED)]
            temps, drops = P.circuit_grid(args.tiny)
            grid = [P.circuit_point(t, d) for t in temps for d in drops] if full else []
            for point in headline:
                for recipe in P.recipes_for(point, rule_order, profile.merge_seeds):
                    run_recipe(family, recipe, "circuit-rule-order")
            for point in grid:
                for recipe in P.recipes_for(point, rule_order, profile.merge_seeds):
                    run_recipe(family, recipe, "circuit-grid")
            log(f"  circuit {'grid' if full else 'presets'} on the rule order done ({time.time() - t0:.0f}s)")
            t0 = time.time()
            if full:
                sweep = P.all_orders(T.TASKS) if profile.all_orders else P.rotations(T.TASKS)
            else:
                sweep = []  # only the rules' orders: out-of-sample evidence for them
            for extra in orders.values():
                if extra not in sweep:
                    sweep.append(extra)
            if sweep:
                for point in {p.params: p for p in headline}.values():
                    for order in sweep:
                        for recipe in P.recipes_for(point, order, profile.merge_seeds):
                            run_recipe(family, recipe, "circuit-orders" if full else "circuit-rules")
                log(f"  circuit order sweep done ({len(sweep)} orders, {time.time() - t0:.0f}s)")

        parity = None
        if not args.no_parity and not args.tiny:
            # The worker must write exactly what a fresh mergekit-yaml writes.
            from benchmarks.quality.merging import Recipe

            family = families[0]
            checks = []
            for recipe in (
                Recipe("circuit", orders_by_family[family.seed][P.RECOMMENDED_RULE],
                       P.circuit_point(**P.CIRCUIT_RECOMMENDED).params, (), 0),
                Recipe("della", T.TASKS, (), (("weight", 1.0), ("density", 0.5)), 0),
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
        "merged_models_evaluated": evaluated,
        "engine": args.engine,
        "cached_scores_used": len(records) - evaluated,
    }
    context = {
        "profile": asdict(profile),
        "train_settings": asdict(settings),
        "tasks": list(T.TASKS),
        "circuit_default": P.CIRCUIT_DEFAULT,
        "circuit_recommended": P.CIRCUIT_RECOMMENDED,
        "recommended_rule": P.RECOMMENDED_RULE,
        "orders": {str(k): {n: list(o) for n, o in v.items()} for k, v in orders_by_family.items()},
        "parity": parity,
        "runtime": runtime,
        "command": " ".join(["python -m benchmarks.quality.run", *(argv if argv is not None else sys.argv[1:])]),
    }
    analysis = results_page.analyse(records, references, context)
    results_page.write(out, records, references, analysis, context)
    runtime["total_seconds"] = round(time.time() - started, 1)
    log(f"wrote {out} ({runtime['total_seconds']:.0f}s total)")
    print(results_page.summary_text(analysis))
    return 0


if __name__ == "__main__":
    sys.exit(main())
