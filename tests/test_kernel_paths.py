"""The kernel's two accumulation paths give the same bits.

At temperature 0 the kernel folds deltas with the identity ``(h + x) * 0.5``
on bit-selected float32 patterns (``_accumulate_t0``); every other case, and
tensors with |delta| >= 2**100, use the general formulation of the spec, a
count and the temperature average (``_accumulate``, also bit selects). Forcing
the general path on T = 0 inputs must not change a single bit, for any dtype,
threshold, drop rate, rescale setting or chunking.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import circuit_merge_plugin.core.kernel as kernel
from circuit_merge_plugin.core.exact import same_bytes
from circuit_merge_plugin.core.params import CircuitParams


def _inputs(kind, dtype, n, variants, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    out = []
    for _ in range(variants):
        if kind == "sparse":
            delta = torch.randn(n, generator=g) * 0.01 * (torch.rand(n, generator=g) < 0.5)
        elif kind == "ints":
            delta = torch.randint(-2, 3, (n,), generator=g).float()
        elif kind == "tiny":
            delta = torch.randn(n, generator=g) * 1e-6
        else:  # equal magnitudes, random signs: mx == mn
            delta = 0.5 * torch.sign(torch.randn(n, generator=g))
        out.append((base + delta).to(dtype))
    return base.to(dtype), out


pytestmark = pytest.mark.usefixtures("implementation")


CASES = list(itertools.product(
    ["sparse", "ints", "tiny", "signs"],
    [torch.float32, torch.bfloat16],
    [dict(), dict(meaningful_change_threshold=0.0), dict(meaningful_change_threshold=1e-3),
     dict(base_droprate=0.05, epsilon=0.5), dict(rescale=False, epsilon=0.9),
     dict(base_droprate=0.0)],
))


@pytest.mark.parametrize("kind,dtype,params", CASES)
def test_bit_select_path_equals_general_path(monkeypatch, kind, dtype, params):
    base, variants = _inputs(kind, dtype, 3001, 4, seed=zlib.crc32(f"{kind}{dtype}".encode()) % 1000)
    p = CircuitParams(seed=5, **params)
    fast = kernel.circuit_merge(base, variants, p, name="w", chunk_size=1000)
    monkeypatch.setattr(kernel, "_FAST_MAGNITUDE_LIMIT", 0.0)  # force the general path
    general = kernel.circuit_merge(base, variants, p, name="w", chunk_size=777)
    assert same_bytes(fast, general)


def test_drop_rate_overrides_and_positions_on_both_paths(monkeypatch):
    base, variants = _inputs("sparse", torch.float32, 5000, 3, seed=3)
    p = CircuitParams(seed=11)
    kwargs = dict(drop_rate=[0.9, None, 0.2], positions=[4, 0, 7], name="x")
    fast = kernel.circuit_merge(base, variants, p, **kwargs)
    monkeypatch.setattr(kernel, "_FAST_MAGNITUDE_LIMIT", 0.0)
    assert same_bytes(fast, kernel.circuit_merge(base, variants, p, **kwargs))


def test_default_chunk_size_depends_on_device_only():
    assert kernel.default_chunk_size(torch.device("cpu")) == kernel.DEFAULT_CHUNK_SIZE
    assert kernel.default_chunk_size("cuda") == kernel.ACCELERATOR_CHUNK_SIZE
