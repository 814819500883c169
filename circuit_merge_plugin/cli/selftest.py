"""``circuit-merge --test``: the original script's synthetic merge, run through the real pipeline.

Builds a small synthetic base (three random tensors) and two variants that
perturb a random half of its elements by -0.01, 0 or +0.01 (as the original script's
``perturb_model`` did), merges them with the given parameters exactly as a
normal ``circuit-merge`` run would (mergekit raw-tensor planning, atomic
output), and prints the original script's side-by-side view: base | variant 1 |
variant 2 | merged. Colours (the original script's scheme) only when stdout is a terminal
and ``NO_COLOR`` is unset. Everything lives in a temporary directory that is
removed afterwards. The synthetic data is drawn from ``--seed``, so the whole
output is reproducible.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

from circuit_merge_plugin.cli.request import MergeRequest

TENSORS = 3
ROWS = 6
COLUMNS = 6

RESET = "\033[0m"
GREEN, BLUE, YELLOW, MAGENTA, CYAN = (f"\033[{c}m" for c in (32, 34, 33, 35, 36))
COLUMN_COLOURS = (BLUE, YELLOW, MAGENTA, CYAN)


def synthetic_models(seed: int):
    """(base, variant1, variant2) state dicts drawn from ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    base = {
        f"tensor_{i}": torch.rand(ROWS, COLUMNS, generator=generator)
        for i in range(TENSORS)
    }

    def perturb() -> Dict[str, "torch.Tensor"]:
        out = {}
        for name, tensor in base.items():
            mask = torch.rand(tensor.shape, generator=generator) < 0.5
            step = torch.randint(0, 3, tensor.shape, generator=generator).float() - 1
            out[name] = tensor + mask * step * 0.01
        return out

    return base, perturb(), perturb()


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 5e-5 + 5e-5 * abs(b)


def colour_of(values: List[float], column: int) -> str:
    """The original script's colour scheme for one value of the (base, v1, v2, merged) row."""
    base, first, second, merged = values
    if all(_close(base, v) for v in (first, second, merged)):
        return GREEN  # unchanged everywhere
    if column == 0 or _close(base, values[column]):
        return BLUE  # same as the base
    if column == 3 and _close(merged, second):
        return MAGENTA  # merged took variant 2's value
    if column == 3 and _close(merged, first):
        return YELLOW  # merged took variant 1's value
    if column in (1, 2) and _close(first, second):
        return YELLOW  # both variants agree
    return COLUMN_COLOURS[column]


def render(models: List[Dict], colour: bool) -> str:
    """The side-by-side view of base, variant 1, variant 2 and merged."""
    width = COLUMNS * 8 - 1
    titles = ("Base Model:", "Variant 1:", "Variant 2:", "Merged Model:")
    lines = []
    for name in models[0]:
        paint = (lambda c, text: f"{c}{text}{RESET}") if colour else (lambda c, text: text)
        lines.append("")
        lines.append(paint(CYAN, f"Tensor: {name}"))
        lines.append(
            " | ".join(paint(COLUMN_COLOURS[i], t.ljust(width)) for i, t in enumerate(titles))
        )
        lines.append("-" * (4 * width + 9))
        rows = [m[name].tolist() for m in models]
        for r in range(len(rows[0])):
            blocks = []
            for column in range(4):
                cells = []
                for c in range(len(rows[0][r])):
                    values = [rows[k][r][c] for k in range(4)]
                    cells.append(paint(colour_of(values, column), f"{values[column]:7.4f}"))
                blocks.append(" ".join(cells))
            lines.append(" | ".join(blocks))
    if colour:
        lines.append("")
        lines.append(
            f"{GREEN}unchanged{RESET}  {BLUE}same as base{RESET}  "
            f"{YELLOW}from variant 1 / variants agree{RESET}  "
            f"{MAGENTA}from variant 2{RESET}  {CYAN}merged value{RESET}"
        )
    return "\n".join(lines)


def run_selftest(request: MergeRequest) -> int:
    """Run the synthetic merge with ``request``'s parameters and print the view."""
    from safetensors.torch import load_file, save_file

    from circuit_merge_plugin.io.digest import digest_directory
    from circuit_merge_plugin.cli.job import run_job

    models = list(synthetic_models(request.params.seed))
    with tempfile.TemporaryDirectory(prefix="circuit-merge-test-") as root:
        root = Path(root)
        paths = []
        for label, state in zip(("base", "variant1", "variant2"), models):
            (root / label).mkdir()
            save_file(state, str(root / label / "model.safetensors"))
            paths.append(str(root / label))
        job = replace(
            request,
            base=paths[0],
            variants=paths[1:],
            output=str(root / "output"),
            overwrite=False,
        )
        out, _mode, digest = run_job(job)
        merged = {}
        for shard in sorted(out.glob("*.safetensors")):
            merged.update(load_file(str(shard)))
        assert digest == digest_directory(out)
    models.append(merged)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    p = request.params
    print(
        f"Circuit-Merge self-test: temperature={p.temperature} "
        f"base_droprate={p.base_droprate} "
        f"meaningful_change_threshold={p.meaningful_change_threshold} "
        f"epsilon={p.epsilon} rescale={p.rescale} seed={p.seed}"
    )
    print(render(models, colour))
    print(f"\ndigest {digest}")
    return 0
