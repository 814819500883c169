"""The demo: a complete Circuit-Merge with the unmodified ``mergekit-yaml``.

``python -m circuit_merge_plugin.demo.run [--workdir DIR] [--recipe FILE]``

1. builds a small Llama-style base and three "fine-tuned" variants, with a tiny
   word-level tokenizer, locally (no network) under ``DIR/models``;
2. runs ``mergekit-yaml`` (the console script installed next to this Python) on
   a recipe from ``configs/`` (default ``configs/circuit.yaml``), with
   ``CIRCUIT_MERGE_REPORT`` set so that the merge writes its contribution report;
3. loads the merged model with transformers and generates a few tokens;
4. prints the head of ``circuit-merge report`` on the merge;
5. prints where everything is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from circuit_merge_plugin.io.report_file import REPORT_ENV, REPORT_FILE
from circuit_merge_plugin.demo.toymodels import build_family

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = _REPO / "configs" / "circuit.yaml"

# Used when the package is installed without the repository's configs/.
_FALLBACK_RECIPE = """\
merge_method: circuit
base_model: ./models/base
models:
  - model: ./models/variant1
  - model: ./models/variant2
  - model: ./models/variant3
parameters:
  seed: 42
dtype: float32
tokenizer:
  source: base
"""


def run_demo(workdir: Path, recipe: Path | None = None, quiet: bool = False) -> Path:
    """Run the demo in ``workdir``; return the merged model's directory."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else print

    say(f"[1/5] building a base and 3 variants under {workdir / 'models'} ...")
    family = build_family(workdir / "models", variants=3, seed=0)

    recipe_text = (
        Path(recipe).read_text()
        if recipe is not None
        else DEFAULT_RECIPE.read_text()
        if DEFAULT_RECIPE.exists()
        else _FALLBACK_RECIPE
    )
    recipe_path = workdir / "circuit.yaml"
    recipe_path.write_text(recipe_text)
    out = workdir / "merged"
    if out.exists():
        shutil.rmtree(out)

    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    command = [str(mergekit_yaml), str(recipe_path), str(out)]
    say(f"[2/5] running: {' '.join(command)}  (in {workdir}),")
    say(f"      with {REPORT_ENV}={out} for the contribution report")
    env = dict(os.environ, **{REPORT_ENV: str(out)})
    subprocess.run(command, cwd=workdir, check=True, env=env)

    say("[3/5] loading the merged model with transformers and generating ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    prompt = "the quick brown fox"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    say(f"      prompt:    {prompt!r}")
    say(f"      generated: {text!r}  (random tiny weights: the words are noise)")

    say(f"[4/5] what each variant contributed (circuit-merge report {out}):")
    from circuit_merge_plugin.insight.report import load_report, render_text, summary

    text = render_text(summary(load_report(str(out))), str(out))
    for line in text.splitlines()[:13]:
        say(f"      {line}")

    say("[5/5] done. Everything is here:")
    say(f"      base model:   {family.base}")
    for index, path in enumerate(family.variants, 1):
        say(f"      variant {index}:    {path}")
    say(f"      recipe:       {recipe_path}")
    say(f"      merged model: {out}")
    say(f"      model card:   {out / 'README.md'}")
    say(f"      report:       {out / REPORT_FILE}  (circuit-merge report {out} --html page.html)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m circuit_merge_plugin.demo.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", default="demo-output", type=Path)
    parser.add_argument("--recipe", default=None, type=Path)
    args = parser.parse_args(argv)
    try:
        run_demo(args.workdir, args.recipe)
    except subprocess.CalledProcessError as error:
        print(f"error: mergekit-yaml failed with exit code {error.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
