"""CPU vs CUDA: circuit must give the same bits on both.

Two checks, each printing one PASS/FAIL line per case and exiting non-zero on
any mismatch:

1. kernel: :func:`circuit_merge` on CPU with both implementations (the fused
   numba kernel and the torch kernel, chosen with ``CIRCUIT_MERGE_KERNEL``) and
   on CUDA (the torch kernel), for a set of inputs that
   exercise every path (the T = 0 bit-select path, the general path at T > 0,
   rescale off, threshold 0, p < eps/2 (the clamp), per-variant drop rates,
   float32 / bf16 / fp16 inputs, tensors spanning many chunks with the
   default chunk sizes, which differ between the devices, sizes that are not
   chunk multiples). The bytes of all three results must be equal, and so
   must the stats of ``circuit_merge_with_stats`` (fused CPU against CUDA).
2. mergekit-yaml: one circuit recipe on a generated family, merged with the
   real ``mergekit-yaml`` once on CPU and once with ``--cuda``, the same
   ``--random-seed``; the order-independent digests of the two outputs
   (``circuit-merge digest``) must be equal.

Usage: ``python -m benchmarks.gpu.device_digest [--size 35M] [--cache DIR] [--skip-mergekit]``.
Without CUDA it runs the CPU side only and says so (a dry run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List

import torch

from circuit_merge_plugin.core.kernel import (
    KERNEL_ENV,
    circuit_merge,
    circuit_merge_with_stats,
    kernel_implementation,
)
from circuit_merge_plugin.core.params import CircuitParams

CASES = [
    # name, dtype, numel, variants, params, drop_rate, delta kind
    ("t0-default-f32", torch.float32, 5_000_003, 3, {}, None, "sparse"),
    ("t0-bf16", torch.bfloat16, 1_234_567, 3, {}, None, "sparse"),
    ("t0-fp16", torch.float16, 777_777, 2, {}, None, "sparse"),
    ("t0-threshold0-eps0.5", torch.float32, 999_999, 4, dict(meaningful_change_threshold=0.0, epsilon=0.5), None, "ints"),
    ("t0-clamp-p-lt-eps/2", torch.float32, 500_001, 2, dict(base_droprate=0.04, epsilon=0.3), None, "sparse"),
    ("t0-no-rescale", torch.float32, 600_000, 3, dict(rescale=False), None, "sparse"),
    ("t0-drop-rates", torch.float32, 400_000, 3, {}, [0.2, None, 0.9], "sparse"),
    ("t0-constant-magnitude", torch.float32, 300_000, 3, {}, None, "signs"),
    ("t0.3-general", torch.float32, 2_000_000, 3, dict(temperature=0.3), None, "sparse"),
    ("t1-general-bf16", torch.bfloat16, 800_000, 5, dict(temperature=1.0), None, "sparse"),
    ("t0-eight-variants", torch.float32, 1_000_000, 8, {}, None, "sparse"),
    ("t0-small", torch.float32, 17, 3, {}, None, "sparse"),
]


def _inputs(dtype, numel, variants, kind, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    out = []
    for _ in range(variants):
        if kind == "ints":
            delta = torch.randint(-2, 3, (numel,), generator=g).float() * 0.01
        elif kind == "signs":
            delta = 0.01 * torch.sign(torch.randn(numel, generator=g))
        else:
            delta = 0.01 * torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) < 0.5)
        out.append((base + delta).to(dtype))
    return base.to(dtype), out


from circuit_merge_plugin.core.exact import same_bytes as _same_bytes


def _cpu_merge(implementation: str, *args, **kwargs):
    """circuit_merge on CPU with one implementation; (result, seconds)."""
    previous = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = implementation
    try:
        if kernel_implementation("cpu") != implementation:
            raise RuntimeError(f"the {implementation} kernel is not in use on CPU")
        start = time.perf_counter()
        result = circuit_merge(*args, **kwargs)
        return result, time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = previous


def kernel_check(cuda: bool) -> List[str]:
    failures = []
    for index, (name, dtype, numel, variants, params, drop_rate, kind) in enumerate(CASES):
        base, others = _inputs(dtype, numel, variants, kind, seed=index)
        p = CircuitParams(seed=1000 + index, **params)
        kwargs = dict(drop_rate=drop_rate, name=f"case.{name}")
        cpu, cpu_s = _cpu_merge("fused", base, others, p, **kwargs)
        reference, torch_s = _cpu_merge("torch", base, others, p, **kwargs)
        ok = _same_bytes(cpu, reference)  # the two CPU implementations
        # chunk independence on one device as well: an odd chunk size
        odd, _ = _cpu_merge("fused", base, others, p, chunk_size=12_345, **kwargs)
        ok = ok and _same_bytes(cpu, odd)
        line = f"kernel {name:<24} cpu fused {cpu_s:6.2f}s torch {torch_s:6.2f}s"
        if cuda:
            torch.cuda.synchronize()
            start = time.perf_counter()
            gpu = circuit_merge(base.cuda(), [o.cuda() for o in others], p, **kwargs)
            torch.cuda.synchronize()
            line += f"  cuda {time.perf_counter() - start:6.3f}s"
            ok = ok and _same_bytes(cpu, gpu.cpu())
            if index % 4 == 0:  # the counts (and exact shares) too, on some cases
                os.environ[KERNEL_ENV] = "fused"
                merged, stats = circuit_merge_with_stats(base, others, p, **kwargs)
                gpu_merged, gpu_stats = circuit_merge_with_stats(
                    base.cuda(), [o.cuda() for o in others], p, **kwargs)
                os.environ.pop(KERNEL_ENV, None)
                same_stats = stats == gpu_stats and _same_bytes(merged, gpu_merged.cpu())
                line += "  stats " + ("same" if same_stats else "DIFFER")
                ok = ok and same_stats
        print(("PASS " if ok else "FAIL ") + line, flush=True)
        if not ok:
            failures.append(name)
    return failures


def mergekit_check(cuda: bool, size: str, cache: Path, seed: int = 7) -> List[str]:
    from benchmarks.speed import workloads
    from benchmarks.speed.timing import run_merge
    from circuit_merge_plugin.io.digest import digest_directory, tensor_digests

    shape = workloads.shape_for(workloads.parse_size(size))
    family = workloads.build(cache, shape, 3, "bfloat16")
    work = cache / "digest"
    recipe = workloads.write_recipe(work / "circuit.yaml",
                                    workloads.recipe("circuit", family, 3, seed=seed))
    outputs = {}
    for device in ["cpu"] + (["cuda"] if cuda else []):
        out_dir = work / f"out-{device}"
        extra = ["--cuda"] if device == "cuda" else []
        m = run_merge("circuit", recipe, out_dir, work / f"{device}.log", extra_args=extra,
                      seed=seed, keep_output=True)
        if m.returncode != 0:
            print(f"FAIL mergekit-yaml on {device} exited {m.returncode}; log {work / (device + '.log')}")
            print((work / f"{device}.log").read_text(errors="replace")[-3000:])
            return [f"mergekit-{device}"]
        outputs[device] = out_dir
        print(f"     mergekit-yaml circuit on {device}: {m.wall_s:.1f}s, digest "
              f"{digest_directory(out_dir)}", flush=True)
    if not cuda:
        print("SKIP mergekit digest comparison: no CUDA device (dry run)")
        return []
    same = digest_directory(outputs["cpu"]) == digest_directory(outputs["cuda"])
    if not same:
        a, b = tensor_digests(outputs["cpu"]), tensor_digests(outputs["cuda"])
        differing = sorted(k for k in a if a.get(k) != b.get(k))
        print(f"FAIL mergekit digest: {len(differing)} tensors differ, e.g. {differing[:5]}")
        return ["mergekit-digest"]
    print(f"PASS mergekit-yaml digest CPU == CUDA ({family.shape.label()} params, bf16, seed {seed})")
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.device_digest")
    parser.add_argument("--size", default="35M", help="model size of the mergekit-yaml check")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-kernel", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda else 'NOT available (dry run: CPU side only)'}")
    failures = []
    if not args.skip_kernel:
        failures += kernel_check(cuda)
    if not args.skip_mergekit:
        failures += mergekit_check(cuda, args.size, args.cache)
    print("device digest check: " + ("FAILED " + ", ".join(failures) if failures else
                                     ("passed" if cuda else "dry run passed (no CUDA)")))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
