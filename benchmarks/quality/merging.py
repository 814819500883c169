"""Recipes for every method under test, and running them through mergekit-yaml.

Two engines run the same ``mergekit-yaml`` command line:

* ``worker`` (default): one long-lived subprocess that calls mergekit-yaml's
  click entry point per recipe (see :mod:`._mergekit_worker`); ~0.5 s a merge.
* ``cli``: a fresh ``mergekit-yaml`` console-script subprocess per recipe, as a
  user would type it; ~10 s of CPU a merge, almost all of it imports.

The benchmark checks that both engines write identical tensors (``parity``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

#: mergekit methods whose result depends on the random seed.
RANDOM_METHODS = {"circuit", "dare_ties", "della"}


@dataclass(frozen=True)
class Recipe:
    """One merge: a method, its settings and the order of the experts."""

    method: str
    order: Tuple[str, ...]  # task names, first = first in ``models:``
    params: Tuple[Tuple[str, object], ...] = ()  # global parameters
    model_params: Tuple[Tuple[str, object], ...] = ()  # same for every expert
    seed: int = 0

    @property
    def settings(self) -> Dict[str, object]:
        return {**dict(self.params), **dict(self.model_params)}

    def key(self) -> str:
        blob = json.dumps(
            [self.method, self.order, self.params, self.model_params, self.seed],
            default=str,
        )
        import hashlib

        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def config(self, base: Path, experts: Dict[str, Path]) -> dict:
        models = []
        for task in self.order:
            entry = {"model": str(Path(experts[task]).resolve())}
            if self.model_params:
                entry["parameters"] = dict(self.model_params)
            models.append(entry)
        config = {"merge_method": self.method}
        if self.method != "linear":
            # linear averages the models it is given: the experts only.
            config["base_model"] = str(Path(base).resolve())
        config.update(models=models, dtype="float32")
        if self.params:
            config["parameters"] = dict(self.params)
        return config


def argv(recipe_path: Path, out: Path, seed: int) -> List[str]:
    return [
        str(recipe_path),
        str(out),
        "--random-seed",
        str(seed),
        "--quiet",
    ]


def mergekit_yaml_binary() -> str:
    beside = Path(sys.executable).parent / "mergekit-yaml"
    if beside.exists():
        return str(beside)
    found = shutil.which("mergekit-yaml")
    if not found:
        raise RuntimeError("mergekit-yaml not found next to this Python or on PATH")
    return found


class MergeError(RuntimeError):
    pass


class Merger:
    """Writes recipe YAML files and runs mergekit-yaml on them."""

    def __init__(self, workdir: Path, engine: str = "worker", log_path=None):
        if engine not in ("worker", "cli"):
            raise ValueError(f"engine must be 'worker' or 'cli', got {engine!r}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.log_path = Path(log_path or self.workdir / "mergekit.log")
        self._log = open(self.log_path, "a")
        self._proc: Optional[subprocess.Popen] = None
        self.merges = 0
        self.seconds = 0.0

    def _env(self):
        # One thread: the benchmark runs one process at a time on shared cores.
        # (mergekit-yaml's --num-threads can be applied once per process only.)
        return dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            PYTHONWARNINGS="ignore",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )

    def start(self) -> None:
        """Start the worker now (its imports overlap with the caller's work)."""
        if self.engine == "worker" and self._proc is None:
            self._spawn()

    def _wait_ready(self) -> None:
        if getattr(self, "_ready", False):
            return
        ready = self._proc.stdout.readline()
        if not ready:
            raise MergeError(f"mergekit worker failed to start; see {self.log_path}")
        self._ready = True

    def _spawn(self) -> None:
        self._ready = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.quality._mergekit_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            cwd=str(Path(__file__).resolve().parents[2]),
            env=self._env(),
        )

    def write_recipe(self, recipe: Recipe, base: Path, experts, name: str) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe.config(base, experts), sort_keys=False))
        return path

    def merge(self, recipe: Recipe, base: Path, experts, out: Path, engine=None) -> Path:
        engine = engine or self.engine
        out = Path(out).resolve()
        shutil.rmtree(out, ignore_errors=True)
        recipe_path = self.write_recipe(recipe, base, experts, out.name)
        args = argv(recipe_path, out, recipe.seed)
        import time

        started = time.perf_counter()
        if engine == "cli":
            result = subprocess.run(
                [mergekit_yaml_binary(), *args],
                stdout=self._log,
                stderr=self._log,
                env=self._env(),
            )
            if result.returncode != 0:
                raise MergeError(
                    f"mergekit-yaml exited {result.returncode} on {recipe_path}; "
                    f"see {self.log_path}"
                )
        else:
            if self._proc is None or self._proc.poll() is not None:
                self._spawn()
            self._wait_ready()
            self._proc.stdin.write(json.dumps({"argv": args}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                raise MergeError(f"mergekit worker died; see {self.log_path}")
            reply = json.loads(line)
            if not reply.get("ok"):
                raise MergeError(
                    f"mergekit-yaml failed on {recipe_path}: {reply.get('error')}\n"
                    f"{reply.get('traceback', '')}"
                )
        self.merges += 1
        self.seconds += time.perf_counter() - started
        return out

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
        self._log.close()


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two model directories hold bit-identical tensors."""
    from safetensors.torch import load_file

    from circuit_merge_plugin.core.exact import same_bytes

    def load(directory):
        state = {}
        for path in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(str(path)))
        return state

    left, right = load(a), load(b)
    return left.keys() == right.keys() and all(
        same_bytes(left[k], right[k]) for k in left
    )
