"""The Circuit-Merge kernel: pure functions of tensors, no I/O, no mergekit.

Given a base tensor ``B`` and variants ``V1..Vn`` in listing order (``V1`` has the
highest priority), :func:`circuit_merge` returns ``B + acc`` where ``acc`` is built
by visiting the variants from the lowest priority to the highest:

1. ``d = V - B`` in float32, zeroed where ``|d| < meaningful_change_threshold``;
2. MAGPRUNE with the variant's drop rate ``p`` (skipped when ``p == 0``): each
   element is dropped with probability
   ``prob = clamp(p - eps/2 + eps * (1 - (|d| - mn) / (mx - mn)), 0, 1)``
   (``mn``/``mx`` over the whole tensor; ``prob = p`` when ``mx == mn``) and,
   with ``rescale``, kept elements are divided by ``1 - prob``;
3. nonzero deltas are accumulated: taken as is where nothing was accumulated
   yet or where the sign disagrees (higher priority wins, count resets to 1);
   averaged where the sign agrees:
   ``acc = (1-T)*(acc+d)/2 + T*(acc*(count-1)+d)/count`` with the new count.

Work is done in element chunks, in two passes per tensor (min/max, then merge),
so the memory used beyond the inputs and the output is O(chunk_size) whatever
the tensor size or the number of variants. Random numbers come from
:mod:`circuit_merge_plugin.rng`, keyed by (seed, tensor name, variant listing
position), which makes results bit-identical across chunk sizes, processing
orders and devices.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from circuit_merge_plugin.params import CircuitParams, check_parameter
from circuit_merge_plugin.rng import stream_key, uniform

#: Elements per chunk: large enough to amortise Python overhead, small enough
#: that the dozen float32 temporaries stay in cache-friendly sizes.
DEFAULT_CHUNK_SIZE = 1 << 18


def calculate_p(
    i: int, count: int, temperature: float = 0.0, base_droprate: float = 0.5
) -> float:
    """Drop rate of the variant at processing index ``i`` of ``count``.

    ``i = 1`` is the lowest priority (processed first), ``i = count`` the highest.
    The seed script's formula, except that a single variant gets ``base_droprate``
    (the seed returned ``2 * base_droprate``, dropping everything at the default).
    """
    if count < 1 or not 1 <= i <= count:
        raise ValueError(f"processing index i must be in [1, {count}], got {i}")
    if count == 1:
        return base_droprate
    if i == 1:
        i = 2
    divisions = (count - i) + 1
    final = 0.5**divisions
    final = final * ((1 - base_droprate) * 2)
    final = ((1 - temperature) * final) + (temperature * (1 - base_droprate))
    return 1.0 - final


def drop_rates(
    count: int,
    temperature: float,
    base_droprate: float,
    overrides: Optional[Sequence[Optional[float]]] = None,
) -> List[float]:
    """Drop rate of each variant, in listing order (first = highest priority)."""
    rates = [
        calculate_p(count - position, count, temperature, base_droprate)
        for position in range(count)
    ]
    if overrides is not None:
        if len(overrides) != count:
            raise ValueError(
                f"drop_rate needs one value per variant ({count}), got {len(overrides)}"
            )
        for position, value in enumerate(overrides):
            if value is not None:
                rates[position] = check_parameter("drop_rate", value)
    return rates


def _describe(labels: Optional[Sequence[str]], index: int, default: str) -> str:
    if labels is not None and index < len(labels):
        return f"{default} ({labels[index]})"
    return default


def _validate_inputs(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    name: str,
    labels: Optional[Sequence[str]],
) -> None:
    where = f" of tensor {name!r}" if name else ""
    if len(variants) < 1:
        raise ValueError(f"Circuit-Merge needs at least one variant{where}")
    for index, variant in enumerate(variants):
        who = _describe(labels, index + 1, f"variant {index + 1}")
        if variant.shape != base.shape:
            raise ValueError(
                f"shape mismatch{where}: {who} has {tuple(variant.shape)}, "
                f"base has {tuple(base.shape)}"
            )
        if variant.device != base.device:
            raise ValueError(
                f"device mismatch{where}: {who} is on {variant.device}, "
                f"base is on {base.device}"
            )
        if not variant.is_floating_point():
            raise ValueError(
                f"dtype mismatch{where}: {who} is {variant.dtype}, base is {base.dtype}"
            )


def _raise_non_finite(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    name: str,
    labels: Optional[Sequence[str]],
) -> None:
    where = f" in tensor {name!r}" if name else ""
    for index, tensor in enumerate((base, *variants)):
        if not bool(torch.isfinite(tensor).all()):
            who = _describe(labels, index, "base" if index == 0 else f"variant {index}")
            raise ValueError(f"NaN or Inf{where} of {who}; inputs must be finite")
    raise ValueError(
        f"delta overflows float32{where}; inputs must differ by less than 3.4e38"
    )


def circuit_merge(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    params: CircuitParams,
    *,
    drop_rate: Optional[Sequence[Optional[float]]] = None,
    name: str = "",
    positions: Optional[Sequence[int]] = None,
    labels: Optional[Sequence[str]] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Merge ``variants`` (listing order, first = highest priority) into ``base``.

    Args:
        base: the base tensor; the result has its shape, dtype and device.
        variants: one tensor per variant, each the same shape as ``base``.
        params: validated global parameters; ``params.seed`` must be set.
        drop_rate: optional per-variant overrides of the computed drop rate.
        name: tensor name; keys the random streams and names errors.
        positions: listing position of each variant (keys its random stream);
            defaults to ``0..n-1``. Front ends that merge a tensor from a subset
            of the variants pass the original positions here.
        labels: optional display names, base first, for error messages.
        chunk_size: elements per chunk; changes memory, never the result.

    Non-floating bases are returned unmerged (a copy of the base).
    """
    if params.seed is None:
        raise ValueError("seed must be set before merging (an integer)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    variants = list(variants)
    if not base.is_floating_point():
        if len(variants) < 1:
            raise ValueError("Circuit-Merge needs at least one variant")
        return base.clone()
    _validate_inputs(base, variants, name, labels)
    count = len(variants)
    if positions is None:
        positions = range(count)
    elif len(positions) != count:
        raise ValueError(
            f"positions needs one value per variant ({count}), got {len(positions)}"
        )
    rates = drop_rates(count, params.temperature, params.base_droprate, drop_rate)

    numel = base.numel()
    flat_base = base.reshape(-1)
    flat_variants = [v.reshape(-1) for v in variants]
    out = torch.empty_like(flat_base)
    if numel == 0:
        return out.reshape(base.shape)

    threshold = params.meaningful_change_threshold
    bounds = _magnitude_bounds(
        flat_base, flat_variants, rates, threshold, chunk_size
    )  # one host sync per tensor, never inside the chunk loops
    if bounds is None:
        _raise_non_finite(base, variants, name, labels)

    keys = [stream_key(params.seed, name, position) for position in positions]
    # Processing order: lowest priority (last listed) first.
    order = list(range(count - 1, -1, -1))
    for start in range(0, numel, chunk_size):
        stop = min(start + chunk_size, numel)
        base_chunk = flat_base[start:stop].float()
        acc = None
        num = None
        for index in order:
            delta = _pruned_delta(
                flat_variants[index][start:stop],
                base_chunk,
                threshold,
                rates[index],
                params.epsilon,
                params.rescale,
                bounds[index],
                keys[index],
                start,
            )
            if acc is None:
                acc = delta
                num = (delta != 0).float()
            else:
                acc, num = _accumulate(acc, num, delta, params.temperature)
        out[start:stop] = acc.add_(base_chunk)
    return out.reshape(base.shape)


def _delta(variant_chunk: torch.Tensor, base_chunk: torch.Tensor) -> torch.Tensor:
    """A fresh float32 ``variant - base``; the inputs are never modified."""
    delta = variant_chunk.to(torch.float32, copy=True)
    return delta.sub_(base_chunk)


def _magnitude_bounds(
    flat_base: torch.Tensor,
    flat_variants: Sequence[torch.Tensor],
    rates: Sequence[float],
    threshold: float,
    chunk_size: int,
):
    """Per variant (min, max) of the thresholded |delta| over the whole tensor.

    Returns None if any delta is not finite. Variants with rate 0 skip MAGPRUNE
    and need no bounds, but are still checked for finiteness.
    """
    numel = flat_base.numel()
    lows: List[Optional[torch.Tensor]] = [None] * len(flat_variants)
    highs: List[Optional[torch.Tensor]] = [None] * len(flat_variants)
    for start in range(0, numel, chunk_size):
        stop = min(start + chunk_size, numel)
        base_chunk = flat_base[start:stop].float()
        for index, variant in enumerate(flat_variants):
            magnitude = _delta(variant[start:stop], base_chunk).abs_()
            if threshold > 0:
                magnitude.masked_fill_(magnitude < threshold, 0.0)
            low, high = torch.aminmax(magnitude)
            lows[index] = low if lows[index] is None else torch.minimum(lows[index], low)
            highs[index] = (
                high if highs[index] is None else torch.maximum(highs[index], high)
            )
    values = torch.stack([torch.stack(lows), torch.stack(highs)]).tolist()
    if not all(torch.isfinite(torch.tensor(values)).reshape(-1).tolist()):
        return None
    return list(zip(values[0], values[1]))


def _pruned_delta(
    variant_chunk: torch.Tensor,
    base_chunk: torch.Tensor,
    threshold: float,
    rate: float,
    epsilon: float,
    rescale: bool,
    bounds,
    key,
    start: int,
) -> torch.Tensor:
    """Thresholded, MAGPRUNEd float32 delta of one variant over one chunk."""
    delta = _delta(variant_chunk, base_chunk)
    magnitude = delta.abs()
    if threshold > 0:
        delta.masked_fill_(magnitude < threshold, 0.0)
        magnitude.masked_fill_(magnitude < threshold, 0.0)
    if rate == 0:
        return delta
    low, high = bounds
    prob = magnitude  # reuse the buffer: |d| -> drop probability
    if high == low:
        prob.fill_(rate)
    else:
        # r = 1 - (a - mn) / (mx - mn);  prob = p - eps/2 + eps * r
        prob.sub_(low).div_(high - low)
        prob.neg_().add_(1.0)
        prob.mul_(epsilon).add_(rate - epsilon / 2).clamp_(0.0, 1.0)
    draw = uniform(key, start, prob.numel(), prob.device)
    keep = draw >= prob
    if rescale:
        # 1 - prob is 0 only where prob == 1, which is never kept.
        delta.div_(torch.neg(prob, out=draw).add_(1.0))
    delta.masked_fill_(~keep, 0.0)
    return delta


def _accumulate(acc, num, delta, temperature):
    """Fold one variant's pruned delta into (acc, count) by the sign rule."""
    nonzero = delta != 0
    disagree = (acc > 0) != (delta > 0)
    take = nonzero & ((num == 0) | disagree)
    agree = nonzero & ~take
    new_num = torch.where(take, 1.0, num + agree)
    if temperature == 0:
        averaged = (acc + delta) / 2
    elif temperature == 1:
        averaged = (acc * (new_num - 1) + delta) / new_num
    else:
        pairwise = (1 - temperature) * (acc + delta) / 2
        true_mean = temperature * (acc * (new_num - 1) + delta) / new_num
        averaged = pairwise + true_mean
    acc = torch.where(take, delta, torch.where(agree, averaged, acc))
    return acc, new_num

