"""Counter-based uniform random numbers from plain integer tensor ops.

Each uniform is a pure function of ``(key, flat element index)``: there is no
generator state, so a tensor's random numbers do not depend on chunk size, thread
count, the order tensors are processed in, or the device. Only exact integer
operations on int64 values kept below 2**32 are used (products stay below 2**63),
so every device computes the same bits.

The mixing function is the well-studied 32-bit integer hash with multiplier
0x45D9F3B (three xor-shifts, two multiplies), applied in two keyed rounds so the
high half of the index and both key words reach every output bit.
"""

from __future__ import annotations

import hashlib
from typing import Tuple

import torch

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B
_TWO_POW_MINUS_24 = 1.0 / (1 << 24)


def stream_key(seed: int, tensor_name: str, position: int) -> Tuple[int, int]:
    """Derive the two 32-bit key words of one (seed, tensor, variant) stream."""
    digest = hashlib.blake2b(
        f"circuit-merge\0{int(seed)}\0{tensor_name}\0{int(position)}".encode(),
        digest_size=8,
    ).digest()
    return (
        int.from_bytes(digest[:4], "little"),
        int.from_bytes(digest[4:], "little"),
    )


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """In place: x <- hash32(x) for int64 x in [0, 2**32)."""
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=scratch)
        x.bitwise_xor_(scratch)
        x.mul_(_MULT)
        x.bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 16, out=scratch)
    x.bitwise_xor_(scratch)


def uniform(
    key: Tuple[int, int],
    start: int,
    count: int,
    device: torch.device | str = "cpu",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniforms in [0, 1) as float32 for flat indices ``start .. start+count-1``.

    Values are multiples of 2**-24, so the float32 result is exact.
    ``out`` (float32, ``count`` elements) may be supplied to avoid an allocation.
    """
    k0, k1 = key
    x = torch.arange(start, start + count, dtype=torch.int64, device=device)
    scratch = torch.empty_like(x)
    if start + count <= 1 << 32:
        high: torch.Tensor | int = k1  # every index has high half 0
    else:
        high = torch.bitwise_right_shift(x, 32).bitwise_xor_(k1)
        x.bitwise_and_(_MASK32)
    x.bitwise_xor_(k0)
    _mix32_(x, scratch)
    x.bitwise_xor_(high)
    _mix32_(x, scratch)
    x.bitwise_right_shift_(8)
    if out is None:
        out = torch.empty(count, dtype=torch.float32, device=device)
    out.copy_(x)
    out.mul_(_TWO_POW_MINUS_24)
    return out
