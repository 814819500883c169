"""Byte equality of tensors: what "the same bytes" means everywhere in this project.

Two tensors are the same when dtype, shape and every storage byte agree, so
``-0.0`` differs from ``0.0`` and NaN payloads count (``torch.equal`` would call
``-0.0 == 0.0`` equal). Tests, benchmarks and the GPU check all use these.
"""

from __future__ import annotations

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as raw bytes, in row-major order (CPU copy if needed)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat_a = a.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    flat_b = b.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(flat_a, flat_b)
