"""Run several ``mergekit-yaml`` console scripts at once (tests' helper).

Most of a small merge's time is the interpreter importing torch, transformers
and mergekit, so the 0.1.4 and cross-version tests start their merges together
and wait for all of them (each single-threaded, so they share the CPUs fairly).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import yaml


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def subprocess_env() -> Dict[str, str]:
    return dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )


class Runs:
    """Queue commands; ``wait()`` runs them, at most ``max_parallel`` at once,
    and collects every result (label -> Finished)."""

    def __init__(self, max_parallel: int = 8):
        self._queued = []
        self._started = {}
        self._max_parallel = max_parallel

    def command(
        self, label: str, argv: Sequence[str], workdir: Path, env: Optional[dict] = None
    ) -> None:
        """Queue ``argv``; ``env`` adds variables to :func:`subprocess_env`."""
        workdir.mkdir(parents=True, exist_ok=True)
        self._queued.append((label, [str(a) for a in argv], workdir, dict(env or {})))
        self._fill()

    def _fill(self) -> None:
        running = sum(p.poll() is None for p, _, _ in self._started.values())
        while self._queued and running < self._max_parallel:
            label, argv, workdir, env = self._queued.pop(0)
            out = open(workdir / f"{label}.stdout", "w")
            err = open(workdir / f"{label}.stderr", "w")
            process = subprocess.Popen(
                argv, stdout=out, stderr=err, env=dict(subprocess_env(), **env)
            )
            self._started[label] = (process, out, err)
            running += 1

    def mergekit_yaml(
        self, label: str, bin_dir: Path, config: dict, out: Path, *args: str,
        env: Optional[dict] = None,
    ) -> None:
        """Start ``bin_dir/mergekit-yaml`` on ``config``, writing to ``out``."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        recipe = out.parent / f"{out.name}.yaml"
        recipe.write_text(yaml.safe_dump(config, sort_keys=False))
        self.command(
            label, [Path(bin_dir) / "mergekit-yaml", recipe, out, *args], out.parent, env
        )

    def wait(self, timeout: float = 600) -> Dict[str, Finished]:
        results = {}
        deadline = time.monotonic() + timeout
        try:
            while self._queued:
                self._fill()
                time.sleep(0.2)
                if time.monotonic() > deadline:
                    raise TimeoutError("queued commands did not start in time")
            for label, (process, out, err) in self._started.items():
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
                out.close()
                err.close()
                results[label] = Finished(
                    process.returncode,
                    Path(out.name).read_text(),
                    Path(err.name).read_text(),
                )
        finally:
            for process, out, err in self._started.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
                out.close()
                err.close()
        return results


def check(result: Finished, what: str) -> None:
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-6000:]}"
        )


