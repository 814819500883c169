"""The kernel against the memory floor, in one process (``--parts floor``).

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.speed.run --parts floor
    .venv/bin/python -m benchmarks.speed.floor --elements 8M --variants 3 --threads 2 --rounds 5

The floor is the least any merge of these tensors can cost: the variants
summed into a copy of the base (``out = base.clone(); out += v`` per variant).
Against it, alternating in every round (the order rotates): the torch kernel
and the fused kernel, each at temperature 0 (the defaults), at temperature 0.5,
and at temperature 0 with counting (``circuit_merge_with_stats``, the report).
Reported: ns per element per variant (medians over the rounds) and ratios to
the floor (median of the per-round ratios, which cancels slow drifts of the
machine's load). Targets: fused within 3x of the floor at T = 0 and T = 0.5,
counting within 1.15x of the plain fused merge.

The first-call compile cost of the fused kernel is measured in child
processes: with an empty numba cache (compiles) and again with that cache
filled (loads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TARGETS = {"fused T=0 / floor": 3.0, "fused T=0.5 / floor": 3.0, "fused counting / fused T=0": 1.15}
CASES = ("floor", "torch T=0", "torch T=0.5", "torch counting",
         "fused T=0", "fused T=0.5", "fused counting")


def _parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _inputs(elements: int, variants: int):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(elements, generator=g)
    return base, [base + 0.01 * torch.randn(elements, generator=g) for _ in range(variants)]


def _runner(case: str, base, variants):
    from circuit_merge_plugin.core import kernel
    from circuit_merge_plugin.core.params import CircuitParams

    if case == "floor":
        def floor():
            out = base.clone()
            for v in variants:
                out.add_(v)
            return out
        return floor
    implementation, mode = case.split(" ", 1)
    params = CircuitParams(seed=1, temperature=0.5 if mode == "T=0.5" else 0.0)

    def merge():
        os.environ[kernel.KERNEL_ENV] = implementation
        if mode == "counting":
            return kernel.circuit_merge_with_stats(base, variants, params, name="w")
        return kernel.circuit_merge(base, variants, params, name="w")
    return merge


def measure(elements: int, variants: int, threads: int, rounds: int) -> Dict:
    torch.set_num_threads(threads)
    base, tensors = _inputs(elements, variants)
    runners = {case: _runner(case, base, tensors) for case in CASES}
    for run in runners.values():  # warm-up: compile (or load) the fused kernel, fault pages in
        run()
    times: Dict[str, List[float]] = {case: [] for case in CASES}
    for round_index in range(rounds):
        order = CASES[round_index % len(CASES):] + CASES[:round_index % len(CASES)]
        for case in order:
            started = time.perf_counter()
            runners[case]()
            times[case].append(time.perf_counter() - started)
    per = elements * variants
    ns = {case: statistics.median(t) / per * 1e9 for case, t in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {f"{case} / floor": ratio(case, "floor") for case in CASES[1:]}
    ratios["torch counting / torch T=0"] = ratio("torch counting", "torch T=0")
    ratios["fused counting / fused T=0"] = ratio("fused counting", "fused T=0")
    ratios["torch T=0 / fused T=0"] = ratio("torch T=0", "fused T=0")
    ratios["torch T=0.5 / fused T=0.5"] = ratio("torch T=0.5", "fused T=0.5")
    return {"elements": elements, "variants": variants, "threads": threads, "rounds": rounds,
            "seconds": times, "ns_per_element_variant": ns, "ratios": ratios}


_FIRST_CALL = r"""
import json, time
t0 = time.perf_counter()
import torch
from circuit_merge_plugin.core import kernel
from circuit_merge_plugin.core.params import CircuitParams
t1 = time.perf_counter()
base = torch.randn(4096); variants = [base + 0.01, base - 0.02, base + 0.03]
p = CircuitParams(seed=1)
kernel.circuit_merge(base, variants, p, name="w")
t2 = time.perf_counter()
kernel.circuit_merge_with_stats(base, variants, CircuitParams(seed=1, temperature=0.5), name="w")
t3 = time.perf_counter()
kernel.circuit_merge(base, variants, p, name="w")
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_merge_s": t2 - t1, "first_counting_s": t3 - t2,
                  "second_merge_s": t4 - t3}))
"""


def compile_cost() -> Dict:
    """First fused calls (float32) in fresh processes: empty numba cache, then filled."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, CIRCUIT_MERGE_KERNEL="fused",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for label in ("empty cache", "cache filled"):
            done = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, check=True,
                                  capture_output=True, text=True, cwd=ROOT)
            result[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def markdown(results: Dict) -> str:
    m = results["measure"]
    lines = [
        "# The kernel against the memory floor",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Load average at start / end: {results['load_start']} / {results['load_end']}  ",
        f"{m['elements']:,} float32 elements x {m['variants']} variants, {m['threads']} threads, "
        f"medians of {m['rounds']} alternating rounds (one process).",
        "",
        "<!-- --8<-- [start:speeds] -->",
        "",
        "| case | ns / element / variant | ratio to the floor |",
        "|---|---:|---:|",
    ]
    for case in CASES:
        ratio = "1" if case == "floor" else f"{m['ratios'][case + ' / floor']:.2f}"
        lines.append(f"| {case} | {m['ns_per_element_variant'][case]:.2f} | {ratio} |")
    lines += ["", "| ratio | measured | target |", "|---|---:|---:|"]
    for name, value in m["ratios"].items():
        if "/ floor" in name and name not in TARGETS:
            continue
        target = TARGETS.get(name)
        verdict = "" if target is None else (f"<= {target} " + ("(met)" if value <= target else "(missed)"))
        lines.append(f"| {name} | {value:.2f} | {verdict} |")
    lines += ["", "<!-- --8<-- [end:speeds] -->"]
    cost = results.get("compile")
    if cost:
        lines += ["", "<!-- --8<-- [start:compile] -->", "", "First calls of the fused kernel in a fresh process (float32; seconds):", "",
                  "| numba cache | import kernel | first merge | first counting merge (T=0.5) | second merge |",
                  "|---|---:|---:|---:|---:|"]
        for label, row in cost.items():
            lines.append(f"| {label} | {row['import_s']:.2f} | {row['first_merge_s']:.2f} | "
                         f"{row['first_counting_s']:.2f} | {row['second_merge_s']:.3f} |")
        lines += ["", "<!-- --8<-- [end:compile] -->"]
    return "\n".join(lines) + "\n"


def run(out: Path, name: str, elements: int, variants: int, threads: int, rounds: int,
        with_compile: bool, command: str) -> Dict:
    from benchmarks.speed import charts

    results = {"command": command, "machine": charts.machine_description(),
               "load_start": charts.load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results["measure"] = measure(elements, variants, threads, rounds)
    if with_compile:
        results["compile"] = compile_cost()
    results["load_end"] = charts.load_average()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (out / f"{name}.md").write_text(text)
    print(text)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--elements", default="8M")
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-cost children")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="floor")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.speed.floor " + " ".join(argv if argv is not None else sys.argv[1:])
    run(args.out, args.name, _parse_count(args.elements), args.variants, args.threads, args.rounds,
        not args.no_compile, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
