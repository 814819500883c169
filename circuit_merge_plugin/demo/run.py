"""The demo: a complete Circuit-Merge with the unmodified ``mergekit-yaml``.

``circuit-merge demo [--workdir DIR] [--recipe FILE]`` (also
``python -m circuit_merge_plugin.demo``):

1. builds a small Llama-style base and three "fine-tuned" variants, with a tiny
   word-level tokenizer, locally (no network) under ``DIR/models``, and writes a
   copy of every recipe of ``configs/`` next to them (``DIR/*.yaml``: their
   ``./models/...`` paths resolve there);
2. runs ``circuit-merge check`` on the recipe (default ``circuit.yaml``);
3. runs ``mergekit-yaml`` (the console script installed next to this Python) on
   it, with ``CIRCUIT_MERGE_REPORT`` set so that the merge writes its
   contribution report;
4. loads the merged model with transformers and generates a few tokens;
5. prints the head of ``circuit-merge report`` on the merge;
6. prints where everything is, and commands to go on with, by their full paths
   (they run as printed, without activating the environment).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import click

from circuit_merge_plugin.demo.toymodels import build_family
from circuit_merge_plugin.errors import EXIT_FAILED, PROG, print_error
from circuit_merge_plugin.io.report_file import REPORT_ENV, REPORT_FILE

#: The repository's recipes (absent when the package is installed from a wheel).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_RECIPE_NAME = "circuit.yaml"

# Used when the package is installed without the repository's configs/.
_FALLBACK_RECIPE = """\
merge_method: circuit
base_model: ./models/base
models:
  - model: ./models/variant1
  - model: ./models/variant2
  - model: ./models/variant3
dtype: float32
"""


def write_recipes(workdir: Path, recipe: Optional[Path] = None) -> Path:
    """Copy every recipe of configs/ into ``workdir`` (next to ``models/``);
    return the path of the one to run (``recipe`` if given, else circuit.yaml)."""
    recipes: List[Path] = sorted(CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []
    for path in recipes:
        shutil.copyfile(path, workdir / path.name)
    target = workdir / DEFAULT_RECIPE_NAME
    if recipe is not None:
        target = workdir / Path(recipe).name
        if Path(recipe).resolve() != target.resolve():
            shutil.copyfile(recipe, target)
    elif not target.exists():
        target.write_text(_FALLBACK_RECIPE)
    return target


def run_demo(workdir: Path, recipe: Path | None = None, quiet: bool = False) -> Path:
    """Run the demo in ``workdir``; return the merged model's directory."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else print
    bin_dir = Path(sys.executable).parent

    say(f"[1/6] building a base and 3 variants under {workdir / 'models'} ...")
    family = build_family(workdir / "models", variants=3, seed=0)
    recipe_path = write_recipes(workdir, recipe)
    copies = sorted(p.name for p in workdir.glob("*.yaml"))
    say(f"      wrote the recipes {', '.join(copies)} next to them, in {workdir}")
    say("      (their ./models/... paths resolve there: run them from that directory)")
    out = workdir / "merged"
    if out.exists():
        shutil.rmtree(out)

    check = [str(bin_dir / PROG), "check", recipe_path.name]
    say(f"[2/6] checking the recipe: {' '.join(check)}  (in {workdir})")
    result = subprocess.run(check, cwd=workdir, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        say(f"      {line}")
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, check)

    mergekit_yaml = bin_dir / "mergekit-yaml"
    command = [str(mergekit_yaml), recipe_path.name, str(out)]
    say(f"[3/6] running: {' '.join(command)}  (in {workdir}),")
    say(f"      with {REPORT_ENV}={out} for the contribution report")
    env = dict(os.environ, **{REPORT_ENV: str(out)})
    subprocess.run(command, cwd=workdir, check=True, env=env)

    say("[4/6] loading the merged model with transformers and generating ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    prompt = "the quick brown fox"
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    say(f"      prompt:    {prompt!r}")
    say(f"      generated: {text!r}  (random tiny weights: the words are noise)")

    say(f"[5/6] what each variant contributed (circuit-merge report {out}):")
    from circuit_merge_plugin.insight.report import load_report, render_text, summary

    text = render_text(summary(load_report(str(out))), str(out))
    for line in text.splitlines()[:16]:
        say(f"      {line}")

    say("[6/6] done. Everything is here:")
    say(f"      base model:   {family.base}")
    for index, path in enumerate(family.variants, 1):
        say(f"      variant {index}:    {path}")
    say(f"      recipes:      {workdir}/*.yaml (ran {recipe_path.name})")
    say(f"      merged model: {out}")
    say(f"      model card:   {out / 'README.md'}")
    say(f"      report:       {out / REPORT_FILE}")
    for line in next_steps(workdir, out, bin_dir):
        say(line)
    return out


def next_steps(workdir: Path, out: Path, bin_dir: Path) -> List[str]:
    """Commands to go on with, by full paths so that they run as printed."""
    circuit_merge, mergekit_yaml = bin_dir / PROG, bin_dir / "mergekit-yaml"
    lines = [
        "      Next (these run as printed; after `source "
        f"{bin_dir / 'activate'}` plain `circuit-merge ...` works too):"
        if (bin_dir / "activate").is_file() else "      Next (these run as printed):",
        f"        {circuit_merge} report {out} --html {workdir / 'report.html'}",
        f"        {circuit_merge} analyze {workdir / 'models' / 'base'} "
        + " ".join(str(workdir / "models" / f"variant{i}") for i in (1, 2, 3)),
        f"        cd {workdir} && {circuit_merge} check circuit-per-layer.yaml "
        f"&& {mergekit_yaml} circuit-per-layer.yaml merged-per-layer",
    ]
    return lines


@click.command(name="demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", default="demo-output", type=click.Path(path_type=Path),
              show_default=True, help="Where the models, recipes and merge are written.")
@click.option("--recipe", default=None, type=click.Path(path_type=Path, exists=True),
              help="Recipe to merge with (its model paths relative to --workdir).  "
              "[default: configs/circuit.yaml]")
@click.pass_context
def demo_command(ctx, workdir: Path, recipe: Optional[Path]) -> None:
    """Build small models locally and merge them with mergekit-yaml (no network)."""
    try:
        run_demo(workdir, recipe)
    except subprocess.CalledProcessError as error:
        print_error(f"{Path(error.cmd[0]).name} failed with exit code {error.returncode}",
                    f"{PROG} demo")
        ctx.exit(EXIT_FAILED)
    ctx.exit(0)


def main(argv=None) -> int:
    """``python -m circuit_merge_plugin.demo`` entry point; returns the exit code."""
    return demo_command.main(args=argv, prog_name="python -m circuit_merge_plugin.demo")


if __name__ == "__main__":
    sys.exit(main())
