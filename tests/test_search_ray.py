"""``circuit-merge search`` on Ray (2 CPUs): the whole command in a subprocess.

One search per scenario, shared by the tests of this module (Ray start-up is
slow): an exhaustive grid over 3 variants with an eval that fails on some
merges, an Optuna TPE search with ``--eval-cmd``, a search whose every trial
fails, and an interrupted search resumed. Each trial's record is checked
against the same trial run in this process, and ``best.yaml`` through the real
``mergekit-yaml``.

The searches join one Ray head started for the module (``ray start --head``,
the ``ray_head`` fixture) with ``--address``, as on a cluster, instead of each
starting and stopping its own local Ray; the search whose every trial fails
starts its own local Ray (no ``--address``), so that path runs for real too.
The ``--address auto`` refusal runs first, before the head is up (``auto``
would find it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import pytest
import yaml

from circuit_merge_plugin.io.digest import digest_directory
from circuit_merge_plugin.search import evaluation, outputs, space
from circuit_merge_plugin.search.space import Point

from conftest import run_mergekit_yaml
from test_search import EVAL_SOURCE, write_recipe

pytestmark = pytest.mark.slow

GRID = ["--space", "temperature=0,1", "--fix", "base_droprate=0.3", "--fix", "lambda=1"]

#: --eval-cmd's program: the same corner sum as the ``score`` eval, read from the files.
SCORE_SCRIPT = """
import sys
from safetensors.torch import load_file
tensors = load_file(sys.argv[1] + "/model.safetensors")
print("loaded", len(tensors), "tensors")
print(repr(float(tensors["model.layers.0.mlp.up_proj.weight"][:4, :4].double().sum())))
"""


@dataclass(frozen=True)
class Head:
    """A running Ray head: its address and the variables a client needs (the token)."""

    address: str
    env: Dict[str, str]


def search(recipe: Path, out: Path, *args: str, head: Optional[Head] = None, timeout: float = 600,
           wait: bool = True):
    """The command in a subprocess; with ``head``, joined to it with ``--address``."""
    command = [sys.executable, "-m", "circuit_merge_plugin.search", str(recipe), "--out", str(out), *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if head is not None:
        command += ["--address", head.address]
        env.update(head.env)
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def read_records(out: Path):
    return [json.loads(line) for line in (out / outputs.TRIALS).read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_HEAD = {"started": False}


@pytest.fixture(scope="module")
def ray_head():
    """One local Ray head for the module's searches (a :class:`Head`).

    ``ray start --head --block`` in its own session (2 CPUs, the GPUs torch
    sees, the object store a local search uses), on free ports, with Ray's
    token authentication and a token of its own (given to the searches in
    ``RAY_AUTH_TOKEN``, so no ``~/.ray`` token is read or written); at teardown,
    also after a failure, that session's processes (the head and every worker
    it started) are stopped and its temp dir removed.
    """
    import torch

    from circuit_merge_plugin.search.engine import LOCAL_OBJECT_STORE

    _HEAD["started"] = True
    temp_dir = tempfile.mkdtemp(prefix="cm-rayhead-", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PYTHONWARNINGS="ignore", **auth)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               "--port", str(port), "--dashboard-agent-listen-port", str(free_port()),
               "--num-cpus", "2", "--num-gpus", str(torch.cuda.device_count()),
               "--object-store-memory", str(LOCAL_OBJECT_STORE), "--include-dashboard", "false",
               "--disable-usage-stats", "--temp-dir", temp_dir]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "Ray runtime started" not in log_path.read_text():
            assert process.poll() is None, f"ray start exited {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"ray start did not finish:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", auth)
    finally:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 30)):
            try:
                os.killpg(process.pid, sig)  # the session started above, nothing else
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_unreachable_auto_address_is_refused(workspace, llama_family, tmp_path):
    # auto also finds any running Ray: this must run before ray_head starts.
    assert not _HEAD["started"], "runs before the module's Ray head is started"
    recipe = write_recipe(workspace / "auto.yaml", llama_family)
    out = tmp_path / "never"
    done = search(recipe, out, "--eval", f"{workspace / 'evals.py'}:score", "--address", "auto")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "circuit-merge search: error: --address auto: cannot join a Ray cluster")
    assert not out.exists()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, llama_family):
    root = tmp_path_factory.mktemp("search")
    (root / "evals.py").write_text(EVAL_SOURCE)
    (root / "score.py").write_text(SCORE_SCRIPT)
    return root


@pytest.fixture(scope="module")
def runner():
    from circuit_merge_plugin.search.trial import TrialRunner

    return TrialRunner(evaluation.parse_eval(None, "unused {model}"), device="cpu", threads=1)


@pytest.fixture(scope="module")
def grid(workspace, llama_family, ray_head):
    recipe = write_recipe(workspace / "grid.yaml", llama_family)
    out = workspace / "grid"
    done = search(recipe, out, "--eval", f"{workspace / 'evals.py'}:picky", *GRID, head=ray_head)
    return recipe, out, done


def test_grid_runs_every_point_once_and_goes_on_after_failures(grid):
    recipe_path, out, done = grid
    assert done.returncode == 0, done.stderr
    recipe = space.load_recipe(str(recipe_path))
    built = space.build_space(recipe, GRID[1::4], GRID[3::4])
    records = read_records(out)
    assert sorted(r["key"] for r in records) == sorted(p.key() for p in built.points())
    assert sorted(r["trial"] for r in records) == list(range(1, 13))
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and len(failed) < len(records)  # the data give both outcomes
    for record in failed:
        assert record["score"] is None
        assert record["error"] == "eval raised RuntimeError: picky eval refuses this merge"
    for record in records:
        assert record["engine"] == "exhaustive grid" and record["seed"] == 0
        assert record["parameters"]["seed"] == 0 and len(record["digest"]) == 64
        assert record["wall_s"] > 0 and record["where"]
    assert "[12/12]" in done.stderr and "search: exhaustive grid, 12 trial(s)" in done.stderr


def test_each_trial_equals_the_same_trial_in_this_process(grid, workspace):
    from circuit_merge_plugin.search.trial import TrialRunner

    recipe_path, out, _ = grid
    recipe = space.load_recipe(str(recipe_path))
    local = TrialRunner(evaluation.parse_eval(f"{workspace / 'evals.py'}:picky", None),
                        device="cpu", threads=1)
    for record in read_records(out):
        point = Point(tuple(record["order"]), record["values"])
        result = local.run(space.trial_recipe(recipe, point, 0))
        assert result["digest"] == record["digest"]
        assert result.get("score") == record["score"]
        assert result.get("error") == record["error"]


def test_best_yaml_through_mergekit_yaml_writes_the_best_trial(grid, tmp_path):
    _, out, _ = grid
    records = read_records(out)
    best = max((r for r in records if r["score"] is not None), key=lambda r: r["score"])
    recipe = yaml.safe_load((out / outputs.BEST).read_text())
    assert [m["model"] for m in recipe["models"]] == best["order"]
    assert recipe["parameters"] == best["parameters"]
    run_mergekit_yaml(recipe, tmp_path / "best")
    assert digest_directory(tmp_path / "best") == best["digest"]


def test_leaderboard_html_and_charts(grid):
    _, out, _ = grid
    records = read_records(out)
    best = max((r for r in records if r["score"] is not None), key=lambda r: r["score"])
    board = (out / outputs.LEADERBOARD).read_text()
    assert f"Best: trial {best['trial']}, score {best['score']:.6g}" in board
    by_order = {}
    for record in records:
        if record["score"] is not None:
            key = tuple(record["order"])
            by_order[key] = max(by_order.get(key, record["score"]), record["score"])
    spread = max(by_order.values()) - min(by_order.values())
    assert f"orders (best trial of each) the score moves by {spread:.6g}" in board
    assert "## Failed trials" in board
    page = (out / outputs.HTML).read_text()
    for name in outputs.CHARTS:
        assert f'data-chart="{name}"' in page
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_resume_runs_nothing_new_and_a_second_search_is_refused(grid):
    recipe, out, _ = grid
    before = (out / outputs.TRIALS).read_bytes()
    again = search(recipe, out, "--eval", f"{out.parent / 'evals.py'}:picky", *GRID, "--resume")
    assert again.returncode == 0, again.stderr
    assert "nothing to run: 12 trial(s) already in" in again.stderr
    assert (out / outputs.TRIALS).read_bytes() == before
    refused = search(recipe, out, "--eval", f"{out.parent / 'evals.py'}:picky", *GRID)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"circuit-merge search: error: --out {out}: already holds a search (trials.jsonl); "
        "pass --resume to continue it"
    ]
    assert (out / outputs.TRIALS).read_bytes() == before


def test_tpe_with_eval_cmd_tries_the_recipe_first_and_scores_the_written_model(
        workspace, llama_family, runner, ray_head):
    recipe_path = write_recipe(workspace / "tpe.yaml", llama_family, variants=llama_family.variants[:2],
                               parameters={"temperature": 0.3})
    out = workspace / "tpe"
    command = f"{sys.executable} {workspace / 'score.py'} {{model}}"
    done = search(recipe_path, out, "--eval-cmd", command, "--trials", "3", "--seed", "1",
                  head=ray_head)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert len(records) == 3 and {r["engine"] for r in records} == {"Optuna TPE"}
    recipe = space.load_recipe(str(recipe_path))
    first = next(r for r in records if r["trial"] == 1)
    assert first["order"] == list(recipe.variants)
    assert first["values"] == {"temperature": 0.3, "base_droprate": 0.5, "lambda": 1.0}
    for record in records:
        assert record["seed"] == 1  # --seed: the merge seed when the recipe sets none
        point = Point(tuple(record["order"]), record["values"])
        tensors, _ = runner.merge(space.trial_recipe(recipe, point, record["seed"]))
        corner = tensors["model.layers.0.mlp.up_proj.weight"][:4, :4].double().sum()
        assert record["score"] == float(corner)
    again = search(recipe_path, out, "--eval-cmd", command, "--trials", "3", "--resume")
    assert again.returncode == 0 and "nothing to run" in again.stderr
    assert len(read_records(out)) == 3


def test_every_trial_failing_exits_1(workspace, llama_family):
    # no --address: this search starts (and stops) its own local Ray
    recipe = write_recipe(workspace / "fail.yaml", llama_family, variants=llama_family.variants[:2])
    out = workspace / "fail"
    done = search(recipe, out, "--eval", f"{workspace / 'evals.py'}:text", "--fix", "temperature=0",
                  "--fix", "base_droprate=0.3", "--fix", "lambda=1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"circuit-merge search: error: every trial failed (2); see {out}/leaderboard.md"
    )
    records = read_records(out)
    assert [r["error"] for r in records] == ["eval returned 'high', not a number"] * 2
    assert not (out / outputs.BEST).exists()


def test_interrupt_keeps_a_valid_log_and_resume_finishes(workspace, llama_family, ray_head):
    (workspace / "slow.py").write_text(EVAL_SOURCE + "\nimport time\n\ndef slow(model, tokenizer):\n"
                                       "    time.sleep(2)\n    return score(model, tokenizer)\n")
    recipe = write_recipe(workspace / "slow.yaml", llama_family, variants=llama_family.variants[:2])
    out = workspace / "slow"
    args = ["--eval", f"{workspace / 'slow.py'}:slow", "--space", "temperature=0,0.25,0.5,0.75,1",
            "--fix", "base_droprate=0.3", "--fix", "lambda=1"]
    process = search(recipe, out, *args, head=ray_head, wait=False)
    log = out / outputs.TRIALS
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.5)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "trials.jsonl is valid, continue with --resume" in stderr.strip().splitlines()[-1]
    first = read_records(out)
    assert 1 <= len(first) < 10
    assert all(r["status"] == "ok" for r in first)  # no trial is lost to the interrupt
    done = search(recipe, out, *args, "--resume", head=ray_head)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert records[: len(first)] == first
    assert len(records) == 10 and len({r["key"] for r in records}) == 10


def test_more_gpus_per_trial_than_the_machine_has_is_refused(workspace, llama_family, tmp_path,
                                                             ray_head):
    import torch

    recipe = write_recipe(workspace / "gpu.yaml", llama_family)
    out = tmp_path / "never"
    wanted = torch.cuda.device_count() + 1
    done = search(recipe, out, "--eval", f"{workspace / 'evals.py'}:score", "--gpus-per-trial", str(wanted),
                  head=ray_head)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"circuit-merge search: error: --gpus-per-trial {wanted}: the cluster has "
        f"{torch.cuda.device_count()} GPU(s)"
    ]
    assert not out.exists()
