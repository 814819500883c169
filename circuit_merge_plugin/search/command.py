"""``circuit-merge search``: find the priority order and settings with the user's eval.

    circuit-merge search RECIPE.yaml --eval EVAL --out DIR [--trials N] [--eval-limit N]
        [--space NAME=SPEC ...] [--fix NAME=VALUE ...] [--address ADDRESS]
        [--cpus-per-trial C] [--gpus-per-trial G] [--resume] [--seed S]

Exit codes: 0 done; 2 refused (bad input: one line naming it, DIR untouched);
1 every trial failed; 130 interrupted (finished trials kept in DIR).
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import click

PROG = "circuit-merge search"
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    text = str(message).strip()
    first = text.splitlines()[0] if text else "error"
    click.echo(f"{PROG}: error: {first}", err=True)
    sys.exit(code)


@click.command(name="search", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", metavar="RECIPE.yaml")
@click.option("--eval", "eval_text", metavar="EVAL",
              help="path/to/file.py:function or package.module:function, called as "
                   "function(model, tokenizer); returns a number or a dict with 'score'. "
                   "Or lm-eval:TASK[,TASK...]: lm-eval-harness tasks (names, or paths of "
                   "task YAML files) on the in-memory model; the score is the mean of each "
                   "task's acc_norm, else acc, else first metric (extra: lm-eval).")
@click.option("--eval-cmd", metavar="COMMAND",
              help="Instead of --eval: a shell command with {model} (a temporary model "
                   "directory); the last line it prints is the score.")
@click.option("--eval-limit", type=click.IntRange(min=1), metavar="N",
              help="With --eval lm-eval:TASK: examples per task (default: all).")
@click.option("--out", "out", required=True, metavar="DIR",
              help="Output directory (trials.jsonl, leaderboard.md, best.yaml, search.html).")
@click.option("--trials", type=click.IntRange(min=1), default=64, show_default=True,
              help="Trial budget. A space of value lists that fits is enumerated exhaustively.")
@click.option("--space", "space", multiple=True, metavar="NAME=SPEC",
              help="Search a parameter: NAME=LOW:HIGH or NAME=V1,V2,... (drop_rate: every "
                   "variant; drop_rate.K: the recipe's K-th variant). Repeatable.")
@click.option("--fix", "fix", multiple=True, metavar="NAME=VALUE",
              help="Pin a parameter (e.g. --fix lambda=1). Repeatable.")
@click.option("--address", metavar="ADDRESS",
              help="Join a Ray cluster: auto or ray://HOST:PORT. Default: a local Ray "
                   "on this machine's CPUs and GPUs.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="CPUs per trial worker (also its torch threads).")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs per trial worker (the merge and the eval run on it).")
@click.option("--resume", is_flag=True, help="Continue the search in DIR without repeating trials.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the search and merge seed of the trials (unless the recipe sets seed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def search(recipe: str, eval_text: Optional[str], eval_cmd: Optional[str], eval_limit: Optional[int],
           out: str, trials: int,
           space: Tuple[str, ...], fix: Tuple[str, ...], address: Optional[str],
           cpus_per_trial: float, gpus_per_trial: float, resume: bool, seed: int, quiet: bool) -> None:
    """Search the priority order and parameters of a circuit RECIPE with your own eval."""
    from circuit_merge_plugin.search import engine, outputs
    from circuit_merge_plugin.search.evaluation import has_tokenizer, parse_eval
    from circuit_merge_plugin.search.space import (
        SearchInputError,
        build_space,
        check_local_models,
        load_recipe,
        resolve_model_paths,
    )

    def echo(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    try:
        parsed = load_recipe(recipe)
        check_local_models(parsed)
        search_space = build_space(parsed, space, fix)
        if eval_limit is not None and not (eval_text or "").startswith("lm-eval:"):
            raise SearchInputError("--eval-limit applies to --eval lm-eval:TASK only")
        eval_spec = parse_eval(eval_text, eval_cmd, eval_limit)
        if eval_spec.lm_eval is not None and not has_tokenizer(resolve_model_paths(parsed)(parsed.base)):
            raise SearchInputError(f"{recipe}: base_model {parsed.base}: no tokenizer files "
                                   "(--eval lm-eval needs a tokenizer)")
        from circuit_merge_plugin.insight.render import require_matplotlib

        require_matplotlib()
        previous = outputs.check_out(out, resume, parsed)
        settings = engine.Settings(out=out, trials=trials, seed=seed, address=address,
                                   cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                                   resume=resume, quiet=quiet)
        if address is not None:
            engine.check_reachable(address)
        records, interrupted = engine.run(parsed, search_space, eval_spec, settings, previous, echo)
    except SearchInputError as error:
        _fail(str(error), EXIT_REFUSED)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    if records:
        outputs.write_summary(out, parsed, records, settings, resolve_model_paths(parsed), charts=True)
    if interrupted:
        _fail(f"interrupted after {len(records)} trial(s); {out}/trials.jsonl is valid, "
              "continue with --resume", EXIT_INTERRUPTED)
    best = outputs.best_record(records)
    if best is None:
        _fail(f"every trial failed ({len(records)}); see {out}/leaderboard.md", EXIT_FAILED)
    echo(f"best: trial {best['trial']}, score {best['score']:.6g}; recipe {out}/best.yaml")
    echo(f"wrote {out}/trials.jsonl, leaderboard.md, best.yaml, search.html")


command = search
search_command = search
