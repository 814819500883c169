"""The demo and the recipes of ``configs/``, tried as a newcomer would.

The recipes work on bare checkpoints (no tokenizer files), the canonical one
does not pin a seed, every recipe passes ``circuit-merge check`` next to the
demo's models (where the demo writes copies of them), and the demo's closing
commands run exactly as printed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from circuit_merge_plugin.cli.check import check_recipe
from circuit_merge_plugin.demo.run import CONFIGS, write_recipes
from circuit_merge_plugin.demo.toymodels import build_family
from conftest import load_tensors
from mergekit_runs import subprocess_env

BIN = Path(sys.executable).parent
MINE = ("circuit.yaml", "circuit-bf16.yaml", "circuit-per-layer.yaml")


def test_recipes_work_on_bare_checkpoints_and_circuit_yaml_pins_no_seed():
    for name in MINE:
        recipe = yaml.safe_load((CONFIGS / name).read_text())
        assert "tokenizer" not in recipe and "tokenizer_source" not in recipe, name
        text = (CONFIGS / name).read_text()
        assert "# tokenizer:" in text or "tokenizer: block" in text, name  # says when to add it
        assert "circuit-merge search" in text and "conflict only" in text, name
    canonical = yaml.safe_load((CONFIGS / "circuit.yaml").read_text())
    assert "seed" not in canonical["parameters"]
    assert "# seed:" in (CONFIGS / "circuit.yaml").read_text()


def test_every_recipe_checks_next_to_the_demo_models(tmp_path, monkeypatch):
    build_family(tmp_path / "models", variants=3, seed=0)
    write_recipes(tmp_path)
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert set(MINE) <= set(names)
    monkeypatch.chdir(tmp_path)
    for name in names:
        assert (tmp_path / name).read_text() == (CONFIGS / name).read_text()
        assert check_recipe(name).problems == [], name


@pytest.mark.slow
def test_circuit_yaml_merges_a_checkpoint_without_tokenizer_files(tmp_path):
    family = build_family(tmp_path / "models", variants=3, seed=0)
    for model in (family.base, *family.variants):
        for path in Path(model).iterdir():
            if path.name.startswith(("tokenizer", "special_tokens")):
                path.unlink()
    write_recipes(tmp_path)
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), "circuit.yaml", "merged", "--random-seed", "1"],
        cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(load_tensors(tmp_path / "merged")) == set(load_tensors(family.base))


@pytest.mark.slow
def test_demo_runs_check_and_its_closing_commands_run_as_printed(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([str(BIN / "circuit-merge"), "demo", "--workdir", str(work)],
                            capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "circuit-merge check circuit.yaml" in out and "circuit.yaml: OK" in out
    for name in MINE:
        assert (work / name).is_file(), name
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Next ("))
    commands = [line.strip() for line in lines[start + 1:] if line.strip()]
    assert len(commands) == 3
    for command in commands:
        ran = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=tmp_path,
                             env=subprocess_env(), timeout=600)
        assert ran.returncode == 0, (command, ran.stderr[-2000:])
        assert shlex.split(command)[0].startswith(("/", "cd")), command  # full paths
    assert (work / "report.html").is_file()
    assert (work / "merged-per-layer" / "model.safetensors").is_file() or list(
        (work / "merged-per-layer").glob("*.safetensors"))
