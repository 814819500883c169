"""``circuit-merge search`` trial throughput with 1 and 2 workers (a ratio, one run).

    python -m benchmarks.search.throughput [--rounds 2] [--trials 8] [--hidden 256] [--layers 4]

Builds a toy family (3 variants), then alternates, round by round, a search
with one worker (``--cpus-per-trial 2``) and one with two (``--cpus-per-trial
1``) on a local Ray with 2 CPUs, each an exhaustive grid of the same trials.
Throughput is counted from the driver's clock between finished trials after
each worker's first trial (its imports and first mapping of the inputs), so
Ray start-up and warm-up are excluded. Prints trials/s of each and the ratio
2 workers / 1 worker per round and as the median; writes
benchmarks/search/results/throughput.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"

EVAL = textwrap.dedent(
    '''
    import torch

    def score(model, tokenizer):
        ids = torch.arange(32).reshape(2, 16) % model.config.vocab_size
        with torch.no_grad():
            return -float(model(ids, labels=ids).loss)
    '''
)


def one_search(root: Path, recipe, space, eval_spec, cpus_per_trial: float, trials: int, tag: str):
    from circuit_merge_plugin.search import engine

    out = root / f"out-{tag}"
    settings = engine.Settings(out=str(out), trials=trials, seed=0, address=None,
                               cpus_per_trial=cpus_per_trial, gpus_per_trial=0, resume=False, quiet=True)
    stamps = []

    def echo(line: str) -> None:
        if line.startswith("["):
            stamps.append(time.perf_counter())

    records, interrupted = engine.run(recipe, space, eval_spec, settings, [], echo)
    assert not interrupted and all(r["score"] is not None for r in records), records
    workers = len({r["where"] for r in records})
    counted = stamps[workers - 1:]  # from the moment every worker has finished its first trial
    rate = (len(counted) - 1) / (counted[-1] - counted[0])
    return rate, workers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    from circuit_merge_plugin.demo.toymodels import build_family
    from circuit_merge_plugin.search import evaluation, space

    root = Path(tempfile.mkdtemp(prefix="search-throughput-"))
    family = build_family(root / "family", variants=3, hidden_size=args.hidden, layers=args.layers)
    (root / "evals.py").write_text(EVAL)
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "merge_method": "circuit", "base_model": str(family.base),
        "models": [{"model": str(v)} for v in family.variants]}))
    recipe = space.load_recipe(str(recipe_path))
    values = ",".join(str(round(i / (args.trials // 6 + 1), 3)) for i in range(args.trials // 6 + 1))
    search_space = space.build_space(recipe, [f"temperature={values}"], ["base_droprate=0.3", "lambda=1"])
    eval_spec = evaluation.parse_eval(f"{root / 'evals.py'}:score", None)
    trials = search_space.size()
    rows = []
    for round_ in range(args.rounds):
        one, w1 = one_search(root, recipe, search_space, eval_spec, 2.0, trials, f"{round_}-1")
        two, w2 = one_search(root, recipe, search_space, eval_spec, 1.0, trials, f"{round_}-2")
        rows.append((round_ + 1, one, two, two / one))
        print(f"round {round_ + 1}: 1 worker {one:.3f} trials/s, {w2} workers {two:.3f} trials/s, "
              f"ratio {two / one:.2f}", flush=True)
    median = statistics.median(r[3] for r in rows)
    print(f"median ratio 2 workers / 1 worker: {median:.2f} ({trials} trials per search)")
    RESULTS.mkdir(exist_ok=True)
    lines = ["# search throughput: 1 vs 2 workers", "",
             f"Toy family hidden {args.hidden}, {args.layers} layers, 3 variants; {trials} trials per "
             "search, local Ray with the machine's CPUs; trials/s after each worker's first trial.", "",
             "| round | 1 worker (trials/s) | 2 workers (trials/s) | ratio |", "|---|---|---|---|"]
    lines += [f"| {r} | {a:.3f} | {b:.3f} | {c:.2f} |" for r, a, b, c in rows]
    lines += ["", f"Median ratio: {median:.2f}.", ""]
    (RESULTS / "throughput.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
