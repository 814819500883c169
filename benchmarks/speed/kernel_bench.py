"""Kernel-only benchmarks, in process: no loading, no writing.

* :func:`kernel_times` — every tensor of a generated family merged by circuit
  and by mergekit's own della and ties ``merge_group`` (della: DELLA sparsify +
  sum consensus), alternating the methods per round, median per method.
* :func:`memory_growth` — extra peak memory of one tensor merge against the
  tensor's size, each size in a fresh child process (peak resident set from
  ``/proc/self/status``, reset with ``clear_refs``; glibc's mmap threshold is
  pinned to 64 KiB so that freed tensors leave the resident set instead of
  being reused from the heap unseen): circuit's chunked kernel stays flat,
  della's grows with the tensor.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.speed.workloads import Family


def _mergekit_parameters(method, ids: Sequence[str], values: Dict) -> Dict:
    """Full parameter dict for ``method.merge_group``: defaults + ``values``."""
    from mergekit.merge_methods.base import ParameterScope

    result = {}
    for spec in method.spec.parameters:
        if spec.scope == ParameterScope.SHARED:
            value = values.get(spec.name, None if spec.required else spec.default)
        else:
            default = values.get(spec.name, None if spec.required else spec.default)
            value = {key: default for key in ids}
        result[spec.name] = value
    return result


def load_family_tensors(family: Family, variants: int, device: str = "cpu"):
    """(name, [base, v1..vn]) for every floating tensor of the family."""
    from safetensors.torch import load_file

    def load(path: Path) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(file), device=device))
        return out

    base = load(family.base)
    others = [load(family.variant(k)) for k in range(variants)]
    return [
        (name, [tensor] + [o[name] for o in others])
        for name, tensor in base.items()
        if tensor.is_floating_point()
    ]


#: Settings of the report benchmark: name -> circuit parameters added to the seed.
REPORT_SETTINGS = {"T=0": {}, "T=0.5": {"temperature": 0.5}}


def report_method(setting: str, with_report: bool) -> str:
    """The :func:`_methods` name of circuit at ``setting``, with or without the report."""
    return f"circuit {setting}" + (" +report" if with_report else "")


def _methods(seed: int, report_dir: Optional[Path] = None):
    """Method name -> (merge method, parameters). With ``report_dir``, also
    circuit at each of :data:`REPORT_SETTINGS`, without and with the
    contribution report (:func:`report_method` names)."""
    from mergekit.merge_methods.registry import get

    from circuit_merge_plugin.adapters.mergekit_015 import CircuitMerge

    table = {
        "circuit": (CircuitMerge(), {"seed": seed}),
        "della": (get("della"), {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
        "ties": (get("ties"), {"weight": 1.0, "density": 0.5}),
    }
    if report_dir is not None:
        for setting, extra in REPORT_SETTINGS.items():
            table[report_method(setting, False)] = (CircuitMerge(), {"seed": seed, **extra})
            table[report_method(setting, True)] = (
                CircuitMerge(),
                {"seed": seed, **extra, "report": str(report_dir / f"{setting}.json")},
            )
    return table


def kernel_times(
    family: Family,
    variants: int,
    *,
    rounds: int = 3,
    device: str = "cpu",
    seed: int = 1,
    methods: Sequence[str] = ("circuit", "della", "ties"),
    report_dir: Optional[Path] = None,
) -> Dict[str, Dict]:
    """Median seconds per method to merge all tensors of ``family`` in process.

    Methods are those of :func:`_methods` (``+report`` ones need ``report_dir``).
    """
    from mergekit.merge_methods.base import TensorGroup

    tensors = load_family_tensors(family, variants, device)
    ids = ["base"] + [f"v{k + 1}" for k in range(variants)]
    table = _methods(seed, report_dir)
    prepared = {}
    for name in methods:
        method, values = table[name]
        prepared[name] = (method, _mergekit_parameters(method, ids[1:], values))
    elements = sum(group[0].numel() for _, group in tensors) * variants
    times: Dict[str, List[float]] = {name: [] for name in methods}

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def merge_all(name, groups):
        method, parameters = prepared[name]
        torch.manual_seed(seed)  # della/ties draw from torch's generator
        for tensor_name, group in groups:
            merged = method.merge_group(
                TensorGroup.from_tensors(group, ids=ids, base_index=0, name=tensor_name),
                **parameters,
            )
            del merged

    for name in methods:  # warm-up (imports, first allocations) on one tensor
        merge_all(name, tensors[:1])
    for _ in range(rounds):
        for name in methods:
            sync()
            start = time.perf_counter()
            merge_all(name, tensors)
            sync()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(values),
            "runs_s": values,
            "ns_per_element": statistics.median(values) / elements * 1e9,
        }
        for name, values in times.items()
    }


_MEMORY_PROBE = r"""
import json, sys, torch
torch.set_num_threads(1)
method, numel, variants = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

g = torch.Generator().manual_seed(0)
base = torch.randn(numel, generator=g).reshape(-1, 1024)
group = [base] + [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(variants)]
from mergekit.merge_methods.base import TensorGroup
from benchmarks.speed.kernel_bench import _methods, _mergekit_parameters
m, values = _methods(1)[method]
ids = ["base"] + [f"v{k+1}" for k in range(variants)]
params = _mergekit_parameters(m, ids[1:], values)
tg = TensorGroup.from_tensors(group, ids=ids, base_index=0, name="w")
small = TensorGroup.from_tensors([t[:2] for t in group], ids=ids, base_index=0, name="w")
m.merge_group(small, **params)  # import and warm everything up outside the window
torch.manual_seed(1)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
out = m.merge_group(tg, **params)
peak = status("VmHWM")
print(json.dumps({"extra_bytes": peak - before, "output_bytes": out.numel() * out.element_size()}))
"""


def memory_growth(
    sizes: Sequence[int], variants: int = 3, methods: Sequence[str] = ("circuit", "della")
) -> Dict[str, List[Dict]]:
    """Extra peak RSS of merging one float32 tensor of each size (fresh process each)."""
    results: Dict[str, List[Dict]] = {name: [] for name in methods}
    repo = Path(__file__).resolve().parent.parent
    for numel in sizes:
        numel = max(1024, numel // 1024 * 1024)
        for name in methods:
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, name, str(numel), str(variants)],
                capture_output=True, text=True, cwd=str(repo), timeout=1800,
                env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
                         PYTHONWARNINGS="ignore"),
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe failed for {name}:\n{proc.stderr[-3000:]}")
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            data["numel"] = numel
            data["input_bytes"] = numel * 4 * (variants + 1)
            # working memory beyond the unavoidable output tensor
            data["work_bytes"] = max(0, data["extra_bytes"] - data["output_bytes"])
            results[name].append(data)
    return results
