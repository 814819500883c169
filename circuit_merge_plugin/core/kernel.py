"""The Circuit-Merge kernel: pure functions of tensors, no I/O, no mergekit.

Given a base tensor ``B`` and variants ``V1..Vn`` in listing order (``V1`` has the
highest priority), :func:`circuit_merge` returns ``B + lambda * acc`` (``lambda``
times ``acc`` in float32, then added to ``B`` in float32 and rounded once to the
base's dtype; ``lambda = 1`` skips the multiply) where ``acc`` is built
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
:mod:`circuit_merge_plugin.core.rng`, keyed by (seed, tensor name, variant listing
position), which makes results bit-identical across chunk sizes, processing
orders and devices.

Two implementations give the same bytes and the same counts: this module's
torch kernel (any device; the reference) and the fused numba kernel of
:mod:`circuit_merge_plugin.core.fused` (CPU tensors, by default). See
:func:`kernel_implementation` for the choice and ``docs/performance.md``.

Performance notes on the torch kernel (see benchmarks/): every step is a single elementwise torch
op writing into preallocated chunk buffers (``out=`` / in-place), with scalar
operands made once as 0-dim tensors. Selections use integer bit operations on
the float32 bit patterns instead of ``torch.where``/``masked_fill`` with
boolean masks (those cost ~10 ns per element on CPU against ~0.2 ns). On CPU
the default chunk (32768 elements) is at torch's intra-op grain size, so each
op runs on one thread: no OpenMP barrier per op, which on a busy machine costs
a scheduler time slice whenever a worker thread is preempted.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from circuit_merge_plugin.core.params import CircuitParams, check_parameter
from circuit_merge_plugin.core.rng import fill_uniform, stream_key
from circuit_merge_plugin.core.tally import Tally, TensorStats, stats_from_totals

#: The environment variable that overrides the choice of implementation.
KERNEL_ENV = "CIRCUIT_MERGE_KERNEL"
_KERNEL_CHOICES = ("auto", "torch", "fused")
_LOG = logging.getLogger("circuit_merge_plugin")
_LOGGED: set = set()
_FUSED_STATE: Dict[str, object] = {}

#: Elements per chunk on CPU: torch's intra-op grain size, so every op of the
#: chunk loop runs single-threaded (see the module notes); 8 chunk buffers of
#: 128 KiB stay in a core's L2 cache.
DEFAULT_CHUNK_SIZE = 1 << 15
#: Elements per chunk on accelerators, where each op is a kernel launch: big
#: enough to amortise launches (~8 buffers of 16 MiB).
ACCELERATOR_CHUNK_SIZE = 1 << 22


def default_chunk_size(device: torch.device) -> int:
    """The chunk size used when the caller gives none."""
    return DEFAULT_CHUNK_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_SIZE


def calculate_p(
    i: int, count: int, temperature: float = 0.0, base_droprate: float = 0.5
) -> float:
    """Drop rate of the variant at processing index ``i`` of ``count``.

    ``i = 1`` is the lowest priority (processed first), ``i = count`` the highest.
    The original script's formula, except that a single variant gets ``base_droprate``
    (the original script returned ``2 * base_droprate``, dropping everything at the default).
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
    chunk_size: Optional[int] = None,
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
        chunk_size: elements per chunk; changes memory and speed, never the
            result. Default: :func:`default_chunk_size` of the base's device.

    Non-floating bases are returned unmerged (a copy of the base).
    """
    options = MergeOptions.of(drop_rate, name, positions, labels, chunk_size, False)
    merged, _ = _merge(base, variants, params, options)
    return merged


def circuit_merge_with_stats(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    params: CircuitParams,
    *,
    drop_rate: Optional[Sequence[Optional[float]]] = None,
    name: str = "",
    positions: Optional[Sequence[int]] = None,
    labels: Optional[Sequence[str]] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, TensorStats]:
    """:func:`circuit_merge` (the same result, bit for bit) and what each variant contributed.

    Returns ``(merged, stats)``; see :mod:`circuit_merge_plugin.core.tally` for the
    counts. Costs a few vectorised ops per chunk and one more host sync per
    tensor; on accelerators the chunk is capped at :data:`COUNTING_CHUNK_SIZE`
    to bound the per-variant state rows.
    """
    if chunk_size is None and torch.device(base.device).type != "cpu":
        chunk_size = COUNTING_CHUNK_SIZE
    options = MergeOptions.of(drop_rate, name, positions, labels, chunk_size, True)
    return _merge(base, variants, params, options)


#: Accelerator chunk when counting: the tally keeps ~10 rows of a chunk per variant.
COUNTING_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class MergeOptions:
    """The per-call options of one tensor merge (the keyword arguments of
    :func:`circuit_merge`, plus whether to count for the report)."""

    drop_rate: Optional[Tuple[Optional[float], ...]] = None
    name: str = ""
    positions: Optional[Tuple[int, ...]] = None
    labels: Optional[Tuple[str, ...]] = None
    chunk_size: Optional[int] = None
    counting: bool = False

    @classmethod
    def of(cls, drop_rate, name, positions, labels, chunk_size, counting) -> "MergeOptions":
        def frozen(values):
            return None if values is None else tuple(values)

        return cls(frozen(drop_rate), name, frozen(positions), frozen(labels), chunk_size, counting)


def _requested_kernel() -> str:
    value = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if value not in _KERNEL_CHOICES:
        raise ValueError(
            f"{KERNEL_ENV} must be one of {', '.join(_KERNEL_CHOICES)}, "
            f"got {os.environ.get(KERNEL_ENV)!r}"
        )
    return value


def _fused_module():
    """The fused kernel module, or None where numba cannot be imported."""
    if "module" not in _FUSED_STATE:
        try:
            from circuit_merge_plugin.core import fused
        except ImportError as error:  # numba missing or broken
            _FUSED_STATE["error"] = f"{type(error).__name__}: {error}"
            fused = None
        _FUSED_STATE["module"] = fused
    return _FUSED_STATE["module"]


def kernel_implementation(device) -> str:
    """The implementation a merge of tensors on ``device`` uses: ``"fused"`` or ``"torch"``.

    CPU tensors use the fused (numba) kernel when numba imports, other devices
    the torch kernel. ``CIRCUIT_MERGE_KERNEL=torch`` forces the torch kernel,
    ``=fused`` requires the fused one on CPU (an error if numba is missing),
    ``=auto`` (the default) chooses as above. The choice is logged once per
    device type and implementation (logger ``circuit_merge_plugin``, INFO).
    """
    requested = _requested_kernel()
    device_type = torch.device(device).type
    chosen = "torch"
    if device_type == "cpu" and requested != "torch":
        if _fused_module() is not None:
            chosen = "fused"
        elif requested == "fused":
            raise RuntimeError(
                f"{KERNEL_ENV}=fused, but the fused kernel is unavailable "
                f"({_FUSED_STATE.get('error')})"
            )
    if (device_type, chosen) not in _LOGGED:
        _LOGGED.add((device_type, chosen))
        _LOG.info("Circuit-Merge kernel on %s tensors: %s", device_type, chosen)
    return chosen


def _thresholded(low: float, high: float, threshold: float) -> Tuple[float, float]:
    """Bounds of the thresholded |delta| from the raw ones: values below the
    threshold become 0, so a raw bound below it becomes 0."""
    return (low if low >= threshold else 0.0, high if high >= threshold else 0.0)


def _merge(base, variants, params: CircuitParams, options: MergeOptions):
    if params.seed is None:
        raise ValueError("seed must be set before merging (an integer)")
    chunk_size = options.chunk_size
    if chunk_size is None:
        chunk_size = default_chunk_size(base.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    name, labels, counting = options.name, options.labels, options.counting
    variants = list(variants)
    if not base.is_floating_point():
        if len(variants) < 1:
            raise ValueError("Circuit-Merge needs at least one variant")
        rates = drop_rates(
            len(variants), params.temperature, params.base_droprate, options.drop_rate
        )
        stats = TensorStats.unchanged(base.numel(), rates) if counting else None
        return base.clone(), stats
    _validate_inputs(base, variants, name, labels)
    count = len(variants)
    positions = options.positions
    if positions is None:
        positions = range(count)
    elif len(positions) != count:
        raise ValueError(
            f"positions needs one value per variant ({count}), got {len(positions)}"
        )
    rates = drop_rates(count, params.temperature, params.base_droprate, options.drop_rate)

    numel = base.numel()
    flat_base = base.reshape(-1)
    flat_variants = [v.reshape(-1) for v in variants]
    out = torch.empty_like(flat_base)
    if numel == 0:
        return out.reshape(base.shape), TensorStats.unchanged(0, rates) if counting else None

    fused = None
    if kernel_implementation(base.device) == "fused":
        fused = _fused_module()
        if not fused.supports(base, variants):
            fused = None  # mixed input dtypes: the torch kernel
    threshold = _float32(params.meaningful_change_threshold)
    if fused is not None:
        work = None
        lows, highs, finite = fused.magnitude_bounds(flat_base, flat_variants, chunk_size)
        bounds = [_thresholded(l, h, threshold) for l, h in zip(lows, highs)] if finite else None
    else:
        work = _Work(min(chunk_size, numel), base.device, base.dtype)
        bounds = _magnitude_bounds(flat_base, flat_variants, threshold, chunk_size, work)
    if bounds is None:  # one host sync per tensor, never inside the chunk loops
        _raise_non_finite(base, variants, name, labels)
    plans = [
        _Plan(rate, low, high, params.epsilon, params.rescale, work)
        for rate, (low, high) in zip(rates, bounds)
    ]
    keys = [stream_key(params.seed, name, position) for position in positions]
    fast = params.temperature == 0 and all(
        high < _FAST_MAGNITUDE_LIMIT for _, high in bounds
    )
    if fused is not None:
        totals = fused.merge(
            flat_base, flat_variants, out, [plan.row() for plan in plans], params.rescale,
            keys, threshold, fast, params.temperature, params.lambda_, chunk_size, counting,
        )
        stats = None
        if counting:
            counts, bins = totals
            stats = stats_from_totals(counts.tolist(), bins.tolist(), numel, rates)
        return out.reshape(base.shape), stats
    return out.reshape(base.shape), _torch_chunks(
        flat_base, flat_variants, out, params, plans, keys, threshold, fast, work,
        chunk_size, rates, counting,
    )


def _torch_chunks(flat_base, flat_variants, out, params, plans, keys, threshold, fast, work,
                  chunk_size, rates, counting):
    """The torch kernel's chunk loop: merges into ``out``; the stats when counting."""
    numel = flat_base.numel()
    count = len(flat_variants)
    # The kept-element test |d| >= threshold is an integer comparison of the
    # float32 bit patterns (monotone for non-negative floats); a threshold of 0
    # still drops exact zeros, which never contribute.
    threshold_bits = work.int32(max(_float32_bits(threshold), 1))
    # Processing order: lowest priority (last listed) first.
    order = list(range(count - 1, -1, -1))
    # lambda scales the merged delta in float32 before the add to the base;
    # at 1 the multiply is skipped (x * 1 == x exactly, so the bytes are the same).
    scale = None if params.lambda_ == 1.0 else work.float32(_float32(params.lambda_))
    tally = None
    if counting:
        tally = Tally(count, work.delta.numel(), flat_base.device, params.temperature, not fast)
    for start in range(0, numel, chunk_size):
        stop = min(start + chunk_size, numel)
        size = stop - start
        buf = work.views(size)
        base_chunk = buf.base_chunk(flat_base, start, stop)
        buf.acc.zero_()
        if not fast:
            buf.count.zero_()
        for step, index in enumerate(order):
            view = buf if tally is None else work.views(size, tally, step)
            drop = _pruned_delta(
                flat_variants[index][start:stop],
                base_chunk,
                plans[index],
                keys[index],
                start,
                threshold_bits,
                view,
            )
            if fast:
                _accumulate_t0(view, drop, work)
            else:
                if tally is not None:
                    tally.num[step, :size].copy_(buf.count)
                _accumulate(view, drop, params.temperature, work)
        if tally is not None:
            tally.finish_chunk(size)
        if scale is not None:
            buf.acc.mul_(scale)  # lambda * acc, in float32
        out_chunk = out[start:stop]
        if out_chunk.dtype == torch.float32:
            torch.add(buf.acc, base_chunk, out=out_chunk)
        else:
            out_chunk.copy_(buf.acc.add_(base_chunk))
    return None if tally is None else tally.result(numel, rates)


#: The T = 0 accumulation relies on (x + x) * 0.5 == x, which needs |x| < 2**127.
#: Kept deltas are at most max|d| * 2**24 (1 - prob >= 2**-24 when kept), so a
#: per-tensor max|d| below 2**100 guarantees it. Larger tensors (never seen in
#: practice) take the general path, which gives the same result without that
#: identity.
_FAST_MAGNITUDE_LIMIT = 2.0**100
_ABS_BITS = 0x7FFFFFFF


def _float32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (exactly representable)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _float32_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


class _Views:
    """The work buffers cut to one chunk length.

    When counting, each variant step gets its own views whose ``delta`` and
    ``mask`` (the drop mask) are that step's rows of the tally, and whose
    ``below`` and ``take`` receive the threshold test (a copy) and the take
    mask: the tally then reads the kernel's own buffers.
    """

    def __init__(self, work: "_Work", size: int, tally=None, step: int = 0) -> None:
        if tally is None:
            self.delta = work.delta[:size]
            self.mask = work.mask[:size]
            self.below = self.take = None
        else:
            self.delta = tally.delta[step, :size]
            self.mask = tally.drop[step, :size]
            self.below = tally.below[step, :size]
            self.take = tally.take[step, :size]
        self.magnitude = work.magnitude[:size]
        self.draw = work.draw[:size]
        self.acc = work.acc[:size]
        self.bits = work.bits[:size]
        self.counter = work.counter[:size]
        self.delta_bits = self.delta.view(torch.int32)
        self.magnitude_bits = self.magnitude.view(torch.int32)
        self.draw_bits = self.draw.view(torch.int32)
        self.acc_bits = self.acc.view(torch.int32)
        self.shift31 = work.shift31
        self._base = None if work.base is None else work.base[:size]
        self._work = work
        self._size = size
        self._count = None

    def base_chunk(self, flat_base: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self._base is None:
            return flat_base[start:stop]
        return self._base.copy_(flat_base[start:stop])

    @property
    def count(self) -> torch.Tensor:
        if self._count is None:  # the general path only
            work = self._work
            if work.count is None:
                work.count = torch.empty_like(work.acc)
                work.spare = torch.empty_like(work.acc)
                work.spare_bits = torch.empty_like(work.bits)
            self._count = work.count[: self._size]
            self.count_bits = self._count.view(torch.int32)
            self.spare = work.spare[: self._size]
            self.spare_bits = work.spare_bits[: self._size]
        return self._count


class _Work:
    """Chunk-sized work buffers and 0-dim scalar operands, made once per tensor.

    Memory: 8 float32/int32 buffers of one chunk (+1 for a non-float32 base, +3
    for the count and scratch on the general path): O(chunk), independent of the
    tensor size and the number of variants.
    """

    def __init__(self, size: int, device, dtype) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.device = device
        self.delta = torch.empty(size, **f32)
        self.magnitude = torch.empty(size, **f32)
        self.draw = torch.empty(size, **f32)
        self.acc = torch.empty(size, **f32)
        self.bits = torch.empty(size, **i32)
        self.mask = torch.empty(size, **i32)
        self.counter = torch.arange(size, **i32)
        self.base = None if dtype == torch.float32 else torch.empty(size, **f32)
        self.count: Optional[torch.Tensor] = None  # made on first use, with:
        self.spare: Optional[torch.Tensor] = None
        self.spare_bits: Optional[torch.Tensor] = None
        self._views: Dict[Tuple[int, int], _Views] = {}
        self._scalars: Dict[Tuple[float, torch.dtype], torch.Tensor] = {}
        self.abs_bits = self.int32(_ABS_BITS)
        self.one_i32 = self.int32(1)
        self.shift31 = self.int32(31)
        self.half = self.float32(0.5)
        self.one = self.float32(1.0)
        self.one_bits = self.int32(_float32_bits(1.0))

    def views(self, size: int, tally=None, step: int = -1) -> _Views:
        """Views of ``size`` elements; with a tally, those of variant step ``step``."""
        found = self._views.get((size, step))
        if found is None:
            found = self._views[(size, step)] = _Views(self, size, tally, step)
        return found

    def _scalar(self, value, dtype) -> torch.Tensor:
        key = (value, dtype)
        found = self._scalars.get(key)
        if found is None:
            found = self._scalars[key] = torch.tensor(value, dtype=dtype, device=self.device)
        return found

    def float32(self, value: float) -> torch.Tensor:
        """A 0-dim float32 operand (a float32 op with it rounds like a Python scalar)."""
        return self._scalar(float(value), torch.float32)

    def int32(self, value: int) -> torch.Tensor:
        return self._scalar(int(value), torch.int32)


def _delta_into(delta: torch.Tensor, variant_chunk: torch.Tensor, base_chunk: torch.Tensor):
    """``delta = float32(variant) - base`` (base chunk already float32)."""
    if variant_chunk.dtype in (torch.float32, torch.bfloat16, torch.float16):
        # Upcasting these to float32 is exact, so the mixed-dtype subtraction
        # (computed in float32) equals float32(V) - float32(B).
        torch.sub(variant_chunk, base_chunk, out=delta)
    else:
        delta.copy_(variant_chunk)  # e.g. float64: round to float32 first
        delta.sub_(base_chunk)
    return delta


#: Per-chunk minima/maxima are collected in a small ring and folded into the
#: running bounds every this many chunks: O(1) memory and ~1 extra op per ring.
_BOUNDS_RING = 256


def _magnitude_bounds(flat_base, flat_variants, threshold, chunk_size, work):
    """Per variant (min, max) of the thresholded |delta| over the whole tensor.

    Thresholding maps |d| < threshold to 0, so the thresholded minimum is 0 if
    the raw minimum is below the threshold and the raw minimum otherwise (the
    same for the maximum): one abs and one aminmax per chunk, no masking.
    Returns None if any delta is not finite.
    """
    numel = flat_base.numel()
    count = len(flat_variants)
    chunks = -(-numel // chunk_size)
    ring = min(chunks, _BOUNDS_RING)
    device = flat_base.device
    lows = torch.empty(count, ring, dtype=torch.float32, device=device)
    highs = torch.empty_like(lows)
    running = None  # (count, 2): min of lows, max of highs so far
    for chunk_index, start in enumerate(range(0, numel, chunk_size)):
        stop = min(start + chunk_size, numel)
        buf = work.views(stop - start)
        base_chunk = buf.base_chunk(flat_base, start, stop)
        slot = chunk_index % ring
        for index, variant in enumerate(flat_variants):
            _delta_into(buf.magnitude, variant[start:stop], base_chunk).abs_()
            torch.aminmax(buf.magnitude, out=(lows[index, slot], highs[index, slot]))
        if slot == ring - 1 or chunk_index == chunks - 1:
            filled = slot + 1
            folded = torch.stack([lows[:, :filled].amin(1), highs[:, :filled].amax(1)], 1)
            if running is not None:
                folded = torch.stack(
                    [torch.minimum(running[:, 0], folded[:, 0]),
                     torch.maximum(running[:, 1], folded[:, 1])], 1)
            running = folded
    bounds = []
    for low, high in running.tolist():
        if not (math.isfinite(low) and math.isfinite(high)):
            return None
        bounds.append(_thresholded(low, high, threshold))
    return bounds


class _Plan:
    """Per-variant MAGPRUNE constants, from the drop rate and the tensor's bounds.

    prob = p - eps/2 + eps * (1 - (a - mn) / (mx - mn)) is evaluated as
    ``(a - mx) * (-eps / (mx - mn)) + (p - eps/2)``: the same formula as three
    single float32 ops with float32 scalar operands, which every device rounds
    alike (a multiply: CUDA turns a division by a scalar into a multiply by its
    reciprocal, CPU does not). At a = mx it is exactly p - eps/2.
    """

    def __init__(self, rate, low, high, epsilon, rescale, work: Optional[_Work]):
        self.prune = rate > 0
        self.rescale = rescale
        self.constant = high == low
        self.rate_value = _float32(rate)
        self.keep_value = self.high_value = self.slope_value = self.offset_value = 0.0
        if self.constant:
            # prob = p everywhere; 1 - prob in float32 arithmetic:
            self.keep_value = float(1 - torch.tensor(rate, dtype=torch.float32))
            self.clamp_low = False
        else:
            self.high_value = high
            self.slope_value = _float32(-epsilon / (high - low))
            self.offset_value = _float32(rate - epsilon / 2)
            # The clamp to [0, 1]: prob >= offset always (the added term is
            # >= 0), so the lower clamp matters only when p < eps/2. The upper
            # clamp never changes a result: prob >= 1 is always dropped (u < 1),
            # and the rescale factor of a dropped element is never used.
            self.clamp_low = self.offset_value < 0
        self.keep_scale = self.keep_value
        if work is not None:  # 0-dim operands of the torch kernel
            self.rate = work.float32(self.rate_value)
            if not self.constant:
                self.high = work.float32(self.high_value)
                self.slope = work.float32(self.slope_value)
                self.offset = work.float32(self.offset_value)
            self.one = work.one

    def row(self) -> tuple:
        """The plan as the fused kernel's per-variant values (float32-exact floats)."""
        return (
            self.prune, self.constant, self.rate_value, self.keep_value,
            self.high_value, self.slope_value, self.offset_value, self.clamp_low,
        )


def _pruned_delta(variant_chunk, base_chunk, plan, key, start, threshold_bits, buf):
    """Fill ``buf.delta`` with the thresholded, MAGPRUNEd, rescaled delta.

    Returns the drop mask (int32: -1 where the element is dropped or below the
    threshold, 0 where it is kept); ``buf.delta`` holds garbage where dropped.
    When counting, ``buf.below`` receives the threshold test alone (int32, sign
    bit set where ``|d| < threshold``).
    """
    delta = _delta_into(buf.delta, variant_chunk, base_chunk)
    magnitude = torch.abs(delta, out=buf.magnitude)
    drop = buf.mask
    if plan.prune:
        # the generator uses drop/bits as its int32 scratch before they are set
        draw = fill_uniform(buf.draw, key, start, drop, buf.bits, buf.counter)
    # sign bit of drop: |d| < threshold (integer compare of non-negative floats)
    torch.sub(buf.magnitude_bits, threshold_bits, out=drop)
    if buf.below is not None:
        buf.below.copy_(drop)
    if plan.prune:
        if plan.constant:
            draw.sub_(plan.rate)  # u - prob: negative exactly when u < prob
            if plan.rescale:
                # a tensor divisor (not a scalar: see _Plan) holding 1 - p
                delta.div_(magnitude.fill_(plan.keep_scale))
        else:
            prob = magnitude.sub_(plan.high).mul_(plan.slope).add_(plan.offset)
            if plan.clamp_low:
                prob.clamp_min_(0.0)
            draw.sub_(prob)  # u - prob: negative exactly when u < prob
            if plan.rescale:
                # kept elements have 1 - prob >= 2**-24
                delta.div_(torch.sub(plan.one, prob, out=prob))
        # sign bit of drop: below the threshold, or u < prob
        drop.bitwise_or_(buf.draw_bits)
    return drop.bitwise_right_shift_(buf.shift31)  # -1 where dropped, 0 where kept


def _accumulate_t0(buf, drop, work):
    """T = 0 accumulation with bit selects (no torch.where, no boolean masks).

    With x = (dropped ? acc : delta) and h = (acc == 0 or sign(acc) != sign(x))
    ? x : acc, the new acc is (h + x) * 0.5, which is
      dropped:                   (acc + acc) / 2 = acc   (or 0 + 0 = 0);
      kept, empty acc:           (x + x) / 2 = x;
      kept, signs disagree:      (x + x) / 2 = x         (overwrite);
      kept, signs agree:         (acc + x) / 2           (pairwise average).
    Kept deltas are nonzero (|d| >= threshold > 0) and acc is never -0, so
    these are exact float32 identities. The take mask is computed into the
    drop mask's buffer, or into ``buf.take`` when counting (which keeps both);
    ``buf.delta`` keeps the kept deltas either way.
    """
    acc_bits, x_bits, scratch = buf.acc_bits, buf.delta_bits, buf.bits
    # x = dropped ? acc : delta  ==  delta ^ ((delta ^ acc) & drop)
    torch.bitwise_xor(x_bits, acc_bits, out=scratch)
    scratch.bitwise_and_(drop)
    x_bits.bitwise_xor_(scratch)
    # take = (acc == 0) | (sign(acc) != sign(x)), as the sign bit of
    # ((acc & 0x7fffffff) - 1) | (acc ^ x), spread to all bits.
    take = torch.bitwise_and(acc_bits, work.abs_bits, out=drop if buf.take is None else buf.take)
    take.sub_(work.one_i32)
    torch.bitwise_xor(acc_bits, x_bits, out=scratch)
    take.bitwise_or_(scratch).bitwise_right_shift_(work.shift31)
    # h = take ? x : acc  ==  acc ^ ((acc ^ x) & take), written into acc
    scratch.bitwise_and_(take)
    acc_bits.bitwise_xor_(scratch)
    buf.acc.add_(buf.delta).mul_(work.half)


def _accumulate(buf, drop, temperature, work):
    """General accumulation (any temperature): fold one pruned delta into (acc, count).

    The spec's rule, element by element, with c = count + 1:
      take  = kept and (count == 0 or (acc > 0) != (delta > 0)):  acc = delta, count = 1;
      agree = kept and not take:  count = c, acc = the average
              (1 - T) * (acc + delta) * 0.5 + T * (acc * (c - 1) + delta) / c
              (one term alone at T = 0 or 1), in exactly these float32 ops;
      dropped: unchanged.
    Masks are int32 -1/0 and the selections bit selects, as in _accumulate_t0
    (no torch.where, no boolean tensors). The average is computed everywhere
    and used only where agreeing; garbage elsewhere (dropped deltas) is never
    selected, only masked. The take mask goes to ``buf.take`` when counting.
    """
    acc, num, delta = buf.acc, buf.count, buf.delta
    acc_bits, num_bits, delta_bits = buf.acc_bits, buf.count_bits, buf.delta_bits
    either, kept = buf.bits, buf.magnitude_bits  # int32 scratch
    take = buf.take if buf.take is not None else buf.spare_bits
    # sign bit of `either`: count == 0 (count >= +0, so its bits - 1 < 0 iff 0)
    torch.sub(num_bits, work.one_i32, out=either)
    # sign bit of (acc_bits - 1) | acc_bits: acc is not > 0 (also for -0);
    # xor delta's sign bit (kept deltas are nonzero): the signs disagree
    torch.sub(acc_bits, work.one_i32, out=kept)
    kept.bitwise_or_(acc_bits).bitwise_xor_(delta_bits)
    either.bitwise_or_(kept)
    torch.bitwise_right_shift(either, work.shift31, out=take)
    torch.bitwise_not(drop, out=kept)
    take.bitwise_and_(kept)
    agree = kept.bitwise_xor_(take)  # kept and not taken

    new = torch.add(num, 1.0, out=buf.draw)  # c
    if temperature == 0:
        average = torch.add(acc, delta, out=buf.spare).mul_(0.5)
    else:
        true_mean = torch.sub(new, 1, out=either.view(torch.float32))
        true_mean.mul_(acc).add_(delta)
        if temperature == 1:
            average = true_mean.div_(new)
        else:
            average = torch.add(acc, delta, out=buf.spare)
            average.mul_(1 - temperature).mul_(0.5)
            average.add_(true_mean.mul_(temperature).div_(new))
    # int32 scratch: whichever of `either` and `spare` does not hold the average
    scratch = buf.spare.view(torch.int32) if temperature == 1 else either
    # acc = agree ? average : acc;  then  take ? delta : acc
    average_bits = average.view(torch.int32)
    average_bits.bitwise_xor_(acc_bits).bitwise_and_(agree)
    acc_bits.bitwise_xor_(average_bits)
    torch.bitwise_xor(acc_bits, delta_bits, out=scratch)
    acc_bits.bitwise_xor_(scratch.bitwise_and_(take))
    # count = agree ? c : count;  then  take ? 1 : count
    new_bits = new.view(torch.int32)
    num_bits.bitwise_xor_(new_bits.bitwise_xor_(num_bits).bitwise_and_(agree))
    torch.bitwise_xor(num_bits, work.one_bits, out=scratch)
    num_bits.bitwise_xor_(scratch.bitwise_and_(take))
