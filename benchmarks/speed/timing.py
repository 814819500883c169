"""Run one real ``mergekit-yaml`` merge in a child process and measure it.

Wall time comes from ``time.perf_counter`` around the child; peak RSS and CPU
time come from ``os.wait4`` on that child alone (Linux reports the child's
peak resident set, including any children it waited for), so measurements of
different merges never mix, unlike ``RUSAGE_CHILDREN`` maxima.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence


@dataclass
class Measurement:
    method: str
    wall_s: float
    peak_rss_mib: float
    cpu_s: float  # user + system time of the child
    returncode: int
    label: str = ""

    def as_dict(self):
        return asdict(self)


def mergekit_yaml_command() -> List[str]:
    """The installed ``mergekit-yaml`` console script beside this interpreter."""
    script = Path(sys.executable).parent / "mergekit-yaml"
    if script.exists():
        return [str(script)]
    found = shutil.which("mergekit-yaml")
    if found:
        return [found]
    return [sys.executable, "-m", "mergekit.scripts.run_yaml"]


def run_child(
    command: Sequence[str],
    log_path: Path,
    *,
    timeout: float = 3600.0,
    env: Optional[dict] = None,
) -> "tuple[float, float, float, int]":
    """Run ``command``; return (wall seconds, peak RSS MiB, CPU seconds, returncode)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        child = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, _kill_group, args=(child.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
    peak_mib = usage.ru_maxrss / 1024.0  # Linux: kilobytes
    return wall, peak_mib, usage.ru_utime + usage.ru_stime, child.returncode


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_merge(
    method: str,
    recipe_path: Path,
    out_dir: Path,
    log_path: Path,
    *,
    extra_args: Sequence[str] = (),
    seed: int = 1,
    timeout: float = 3600.0,
    label: str = "",
    keep_output: bool = False,
) -> Measurement:
    """One ``mergekit-yaml RECIPE OUT`` run (the output folder removed after,
    unless ``keep_output``)."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    command = mergekit_yaml_command() + [
        str(recipe_path), str(out_dir), "--quiet", "--random-seed", str(seed),
        "--no-write-model-card", *extra_args,
    ]
    wall, peak, cpu, code = run_child(command, log_path, timeout=timeout, env=env)
    if not keep_output:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Measurement(method, wall, peak, cpu, code, label)
