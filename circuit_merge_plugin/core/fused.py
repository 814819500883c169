"""The fused CPU implementation of the Circuit-Merge kernel (numba).

The same computation as the torch implementation in
:mod:`circuit_merge_plugin.core.kernel`, bit for bit, written as plain loops and
compiled with numba (``error_model="numpy"``: a float division by zero gives
inf or NaN as in torch, where the result is then never used, instead of
raising): per chunk, one pass over the elements per variant with
the chunk's accumulator in a small buffer (no temporary tensor per op), chunks
in parallel (``prange``) on ``torch.get_num_threads()`` threads. It reproduces
every float32 operation of the torch implementation in the same order with
the same float32 constants (no ``fastmath``, which would let the compiler
reassociate and contract them), and the random numbers of
:mod:`circuit_merge_plugin.core.rng` from the same counter-based hash.

Inputs are read in place through numpy views: float32 and float64 as they are,
bfloat16 and float16 as raw 16-bit patterns converted exactly (numba has no
bfloat16); the result is rounded to the base's dtype with round-to-nearest-even
(subnormals and overflow to infinity included), as torch rounds.

numba is imported when this module is, i.e. when the kernel first uses it
(``import circuit_merge_plugin`` stays cheap). Compiled code is cached on disk
(``cache=True``): the first use on a machine compiles for a few seconds per
input dtype, later processes load it.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from circuit_merge_plugin.core.rng import _block_key

_F32 = np.float32
_U64 = np.uint64
_S13 = _U64(13)
_S16 = _U64(16)
_S23 = _U64(23)
_TOP24 = _U64(0x800000)
_ONE_U = _U64(1)
_ZERO_U = _U64(0)
_TWO_POW_MINUS_24 = _F32(2.0**-24)
_HALF = _F32(0.5)
_ONE = _F32(1.0)
_ZERO = _F32(0.0)
#: Mass bins: one per float32 exponent field value.
BINS = 256  # tally.MASS_BINS
#: Stats columns, as in :mod:`circuit_merge_plugin.core.tally`.
COLUMNS = 5  # below, kept, taken, take, survived
#: Interleaved copies of the mass bins (element j adds to copy j % _LANES):
#: consecutive elements with the same exponent do not wait on each other's adds.
_LANES = 4
#: Elements per inner block (state buffers stay in L1/L2 whatever the chunk).
_BLOCK = 2048

#: Raw 16-bit input/output kinds.
KIND_BF16 = 0
KIND_F16 = 1


# ------------------------------------------------------------ bit casts ----


@intrinsic
def _bits(typingctx, x):
    """The IEEE bit pattern of a float32 (as uint32)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, x):
    """The float32 with bit pattern ``x`` (uint32)."""
    if x != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _pointer_like(typingctx, address, like):
    """The int64 ``address`` as a pointer to elements of ``like``'s dtype."""
    if address != types.int64 or not isinstance(like, types.Array):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like.dtype)(types.int64, like), codegen


@njit(cache=True, error_model="numpy")
def _variant(addresses, index, like, numel):
    """Variant ``index`` as an array (the caller keeps the arrays alive; one dtype for all)."""
    return numba.carray(_pointer_like(addresses[index], like), (numel,))


# -------------------------------------------------- 16-bit conversions ----


@njit(cache=True, error_model="numpy")
def _f16_to_f32(h):
    h = _U64(h)
    sign = (h & _U64(0x8000)) << _S16
    exponent = (h >> _U64(10)) & _U64(0x1F)
    mantissa = h & _U64(0x3FF)
    if exponent == _ZERO_U:  # zero or subnormal: mantissa * 2**-24, exact
        value = _F32(mantissa) * _TWO_POW_MINUS_24
        return -value if sign != _ZERO_U else value
    if exponent == _U64(31):
        bits = sign | _U64(0x7F800000) | (mantissa << _S13)
    else:
        bits = sign | ((exponent + _U64(112)) << _S23) | (mantissa << _S13)
    return _from_bits(np.uint32(bits))


@njit(cache=True, error_model="numpy")
def _f32_to_f16(value):
    """float32 -> float16 bits, round to nearest even (torch's conversion)."""
    x = _U64(_bits(value))
    sign = (x >> _S16) & _U64(0x8000)
    x = x & _U64(0x7FFFFFFF)
    if x >= _U64(0x7F800000):  # inf or NaN
        return np.uint16(sign | _U64(0x7C00) | (_U64(0x200) if x > _U64(0x7F800000) else _ZERO_U))
    if x >= _U64(0x477FF000):  # rounds past 65504
        return np.uint16(sign | _U64(0x7C00))
    if x >= _U64(0x38800000):  # normal float16
        y = x - _U64(0x38000000)
        y = y + _U64(0xFFF) + ((y >> _S13) & _ONE_U)
        return np.uint16(sign | (y >> _S13))
    if x < _U64(0x33000000):  # below half the smallest subnormal (ties to 0)
        return np.uint16(sign)
    exponent = x >> _S23
    mantissa = (x & _U64(0x7FFFFF)) | _TOP24
    shift = _U64(126) - exponent  # 14 .. 24
    q = mantissa >> shift
    r = mantissa & ((_ONE_U << shift) - _ONE_U)
    half = _ONE_U << (shift - _ONE_U)
    if r > half or (r == half and (q & _ONE_U) == _ONE_U):
        q = q + _ONE_U
    return np.uint16(sign | q)


@njit(cache=True, error_model="numpy")
def _f32_to_bf16(value):
    """float32 -> bfloat16 bits, round to nearest even (torch's conversion)."""
    if value != value:
        return np.uint16(0x7FC0)
    x = _U64(_bits(value))
    x = x + _U64(0x7FFF) + ((x >> _S16) & _ONE_U)
    return np.uint16((x >> _S16) & _U64(0xFFFF))


def _load(array, index, kind):
    pass


@overload(_load)
def _load_impl(array, index, kind):
    dtype = array.dtype
    if dtype == types.float32:
        return lambda array, index, kind: array[index]
    if dtype == types.float64:
        return lambda array, index, kind: np.float32(array[index])
    if dtype == types.uint16:

        def load16(array, index, kind):
            raw = array[index]
            if kind == KIND_BF16:
                return _from_bits(np.uint32(_U64(raw) << _S16))
            return _f16_to_f32(raw)

        return load16
    return None


def _store(array, index, value, kind):
    pass


@overload(_store)
def _store_impl(array, index, value, kind):
    dtype = array.dtype
    if dtype == types.float32:

        def store32(array, index, value, kind):
            array[index] = value

        return store32
    if dtype == types.float64:

        def store64(array, index, value, kind):
            array[index] = np.float64(value)

        return store64
    if dtype == types.uint16:

        def store16(array, index, value, kind):
            if kind == KIND_BF16:
                array[index] = _f32_to_bf16(value)
            else:
                array[index] = _f32_to_f16(value)

        return store16
    return None


# ----------------------------------------------------------- generator ----


_U32_MULT1 = np.uint32(0x21F0AAAD)
_U32_MULT2 = np.uint32(0x735A2D97)
_U32_8 = np.uint32(8)
_U32_15 = np.uint32(15)
_U32_16 = np.uint32(16)
_I32_TOP24 = np.int32(0x800000)


@njit(cache=True, error_model="numpy")
def _fill_draws(keys, start, count, draws):
    """rng.py's uniforms of flat indices ``start .. start+count-1`` into ``draws``.

    ``keys[block]`` are the stream's key words of each 2**32-element block.
    Runs never cross a block; within one, every step is a 32-bit integer
    operation (each result cut back to uint32, which lets LLVM use 32-bit
    vector multiplies), exactly the unsigned arithmetic of rng.py.
    """
    done = 0
    while done < count:
        index = start + done
        high = index >> 32
        lo = index & 0xFFFFFFFF
        run = min(count - done, (np.int64(1) << 32) - lo)
        k0 = np.uint32(keys[high, 0])
        step = np.uint32(keys[high, 1] | _ONE_U)
        first = np.uint32(np.uint32(lo) * step + k0)
        for j in range(run):
            x = np.uint32(first + np.uint32(j) * step)
            x = np.uint32(x ^ (x >> _U32_16))
            x = np.uint32(x * _U32_MULT1)
            x = np.uint32(x ^ (x >> _U32_15))
            x = np.uint32(x * _U32_MULT2)
            x = np.uint32(x ^ (x >> _U32_15))
            draws[done + j] = np.float32(np.int32(x >> _U32_8) ^ _I32_TOP24) * _TWO_POW_MINUS_24
        done += run


@njit(cache=True, error_model="numpy")
def uniform_at(keys, start, count):
    """Uniforms of flat indices ``start .. start+count-1`` (the kernel's generator, for tests)."""
    out = np.empty(count, dtype=np.float32)
    _fill_draws(keys, np.int64(start), count, out)
    return out


@njit(cache=True, error_model="numpy")
def convert_to_16(values, kind):
    """float32 values rounded to bfloat16/float16 bit patterns (for tests)."""
    out = np.empty(values.size, dtype=np.uint16)
    for i in range(values.size):
        if kind == KIND_BF16:
            out[i] = _f32_to_bf16(values[i])
        else:
            out[i] = _f32_to_f16(values[i])
    return out


@njit(cache=True, error_model="numpy")
def convert_from_16(raw, kind):
    """bfloat16/float16 bit patterns as float32 (for tests)."""
    out = np.empty(raw.size, dtype=np.float32)
    for i in range(raw.size):
        out[i] = _load(raw, i, kind)
    return out


# ------------------------------------------------------------- kernels ----


@njit(cache=True, parallel=True, error_model="numpy")
def _bounds_kernel(base, variants, kind, numel, chunk, lows, highs, bad):
    """Per chunk and variant: min and max of |float32(V) - float32(B)|; bad[c] if not finite."""
    chunks = lows.shape[0]
    count = variants.shape[0]
    for c in prange(chunks):
        start = np.int64(c) * chunk
        stop = min(start + chunk, numel)
        base32 = np.empty(stop - start, dtype=np.float32)
        for i in range(start, stop):
            base32[i - start] = _load(base, i, kind)
        finite = True
        for v in range(count):
            variant = _variant(variants, v, base, numel)
            low = np.float32(np.inf)
            high = np.float32(0.0)
            for i in range(start, stop):
                magnitude = abs(_load(variant, i, kind) - base32[i - start])
                # NaN fails both comparisons: caught below
                low = min(low, magnitude)
                high = max(high, magnitude)
                if not magnitude <= np.float32(3.4028234663852886e38):
                    finite = False
            lows[c, v] = low
            highs[c, v] = high
        bad[c] = not finite


@njit(cache=True, error_model="numpy")
def _pruned(x, b, u, threshold, high, slope, offset, clamp, rescale):
    """One element of one variant: (delta, below, dropped), branch-free.

    delta = x - b in float32; below: |delta| < threshold, or delta == 0;
    prob = (|delta| - high) * slope + offset, clamped at 0 when ``clamp``
    (a constant-magnitude plan has slope 0 and offset p, a plan without
    MAGPRUNE slope 0 and offset 0: prob is then exactly p, or 0, which no
    uniform is below); dropped: below or u < prob; with ``rescale`` the delta
    is divided by 1 - prob (exactly 1 without MAGPRUNE).
    """
    delta = x - b
    magnitude = abs(delta)
    below = (magnitude < threshold) | (magnitude == _ZERO)
    prob = (magnitude - high) * slope + offset
    if clamp:
        prob = max(prob, _ZERO)
    dropped = below | (u < prob)
    if rescale:
        delta = delta / (_ONE - prob)
    return delta, below, dropped


@njit(cache=True, error_model="numpy")
def _fold_t0(a, delta, dropped):
    """The T = 0 accumulation of one element: (new acc, take)."""
    take = (a == _ZERO) | ((a < _ZERO) != (delta < _ZERO))
    folded = delta if take else (a + delta) * _HALF
    return (a if dropped else folded), take


@njit(cache=True, error_model="numpy")
def _fold(a, count, delta, dropped, temperature, t, one_minus_t):
    """The general accumulation of one element: (new acc, new count, take)."""
    take = (count == _ZERO) | ((not (a > _ZERO)) != (delta < _ZERO))
    new = count + _ONE
    if temperature == 0.0:
        average = (a + delta) * _HALF
    elif temperature == 1.0:
        average = ((new - _ONE) * a + delta) / new
    else:
        average = ((a + delta) * one_minus_t) * _HALF
        average = average + (((new - _ONE) * a + delta) * t) / new
    folded = delta if take else average
    counted = _ONE if take else new
    return (a if dropped else folded), (count if dropped else counted), take


@njit(cache=True, parallel=True, error_model="numpy")
def _merge_kernel(
    base, variants, out, kind, numel, chunk, order, keys,
    prune, high, slope, offset, clamp_low, rescale,
    threshold, fast, temperature, scale, use_scale, counting, counts, bins,
):
    """Merge all chunks; with ``counting``, fill counts[c] and bins[c] per chunk.

    ``order`` lists the variants in processing order (lowest priority first);
    per-variant arrays are indexed by listing position, counts and bins by
    processing step.
    """
    chunks = counts.shape[0] if counting else -(-numel // chunk)
    steps = order.shape[0]
    t = np.float32(temperature)
    one_minus_t = np.float32(1.0 - temperature)
    t_plus_half = np.float32(temperature + (1.0 - temperature) / 2)
    half_one_minus_t = np.float32((1.0 - temperature) / 2)
    for c in prange(chunks):
        chunk_start = np.int64(c) * chunk
        chunk_stop = min(chunk_start + chunk, numel)
        size = min(chunk, _BLOCK)
        base32 = np.empty(size, dtype=np.float32)
        acc = np.empty(size, dtype=np.float32)
        num = np.empty(size, dtype=np.float32)
        rows = steps if counting else 1
        seen = np.empty(size, dtype=np.bool_)
        draws = np.empty(size, dtype=np.float32)
        code = np.empty((rows, size), dtype=np.int8)  # 0 dropped, 1 take, 2 average
        magnitude = np.empty((rows, size), dtype=np.float32)
        before = np.empty((rows, size), dtype=np.float32)  # count before the step
        local_counts = np.zeros((steps, COLUMNS), dtype=np.int64)
        local_bins = np.zeros((steps, _LANES, BINS), dtype=np.int64)
        for block_start in range(chunk_start, chunk_stop, size):
            n = min(size, chunk_stop - block_start)
            for j in range(n):
                base32[j] = _load(base, block_start + j, kind)
                acc[j] = _ZERO
                num[j] = _ZERO
                seen[j] = False
            for s in range(steps):
                index = order[s]
                variant = _variant(variants, index, base, numel)
                stream = keys[index]
                p_high = high[index]
                p_slope = slope[index]
                p_offset = offset[index]
                p_clamp = clamp_low[index]
                if prune[index]:
                    _fill_draws(stream, block_start, n, draws)
                else:  # prob is 0: no draw is below it
                    draws[:n] = _ONE
                if counting:
                    below_n = 0
                    kept_n = 0
                    taken_n = 0
                    take_n = 0
                    for j in range(n):
                        gi = block_start + j
                        delta, below, dropped = _pruned(
                            _load(variant, gi, kind), base32[j], draws[j],
                            threshold, p_high, p_slope, p_offset, p_clamp, rescale)
                        if fast:
                            acc[j], take = _fold_t0(acc[j], delta, dropped)
                        else:
                            before[s, j] = num[j]
                            acc[j], num[j], take = _fold(acc[j], num[j], delta, dropped,
                                                         temperature, t, one_minus_t)
                        kept = not dropped
                        take = take & kept
                        below_n += below
                        kept_n += kept
                        taken_n += kept & (not seen[j])
                        take_n += take
                        seen[j] = seen[j] | kept
                        code[s, j] = 1 if take else (2 if kept else 0)
                        magnitude[s, j] = abs(delta)
                    local_counts[s, 0] += below_n
                    local_counts[s, 1] += kept_n
                    local_counts[s, 2] += taken_n
                    local_counts[s, 3] += take_n
                elif fast:
                    for j in range(n):
                        gi = block_start + j
                        delta, below, dropped = _pruned(
                            _load(variant, gi, kind), base32[j], draws[j],
                            threshold, p_high, p_slope, p_offset, p_clamp, rescale)
                        acc[j], take = _fold_t0(acc[j], delta, dropped)
                else:
                    for j in range(n):
                        gi = block_start + j
                        delta, below, dropped = _pruned(
                            _load(variant, gi, kind), base32[j], draws[j],
                            threshold, p_high, p_slope, p_offset, p_clamp, rescale)
                        acc[j], num[j], take = _fold(acc[j], num[j], delta, dropped,
                                                     temperature, t, one_minus_t)
            if counting:
                _attribute(code, magnitude, before, n, steps, fast, t, t_plus_half,
                           half_one_minus_t, local_counts, local_bins)
            for j in range(n):
                a = acc[j]
                if use_scale:
                    a = a * scale
                _store(out, block_start + j, a + base32[j], kind)
        if counting:
            counts[c] = local_counts
            bins[c] = local_bins


@njit(cache=True, error_model="numpy")
def _attribute(code, magnitude, before, n, steps, fast, t, t_plus_half, half_one_minus_t,
               local_counts, local_bins):
    """The tally's backward pass over one block: survivors and the attributed mass.

    A kept delta survives unless a later (higher-priority) step took the
    element; its weight is the product of the later averages' factors times
    its own (tally.py's scale rows, in the same float32 order). The mass is
    accumulated exactly, as integer mantissas per float32 exponent.
    """
    for j in range(n):
        later_take = False
        weight_run = _ONE
        for s in range(steps - 1, -1, -1):
            state = code[s, j]
            averaged = state == 2
            if fast:
                weight_run = weight_run * (_HALF if averaged else _ONE)
                weight = weight_run
            else:
                own = _ONE
                factor = _ONE
                if averaged:
                    new = before[s, j] + _ONE
                    beta = (_ONE / new) * t
                    factor = t_plus_half - beta
                    own = beta + half_one_minus_t
                weight = weight_run * own
                weight_run = weight_run * factor
            if state != 0 and not later_take:
                local_counts[s, 4] += 1
                value = magnitude[s, j] * weight
                bits = _U64(_bits(value))
                exponent = bits >> _S23
                mantissa = bits & _U64(0x7FFFFF)
                if exponent != _ZERO_U:
                    mantissa = mantissa | _TOP24
                local_bins[s, j & (_LANES - 1), exponent] += np.int64(mantissa)
            if state == 1:
                later_take = True


# ------------------------------------------------------------ drivers ----

_KINDS = {
    torch.float32: (np.float32, 0),
    torch.float64: (np.float64, 0),
    torch.bfloat16: (np.uint16, KIND_BF16),
    torch.float16: (np.uint16, KIND_F16),
}


def supports(base: torch.Tensor, variants: Sequence[torch.Tensor]) -> bool:
    """Whether the fused kernel takes these inputs (CPU, one float dtype for all)."""
    if base.device.type != "cpu" or base.dtype not in _KINDS:
        return False
    return all(v.device.type == "cpu" and v.dtype == base.dtype for v in variants)


def _array(flat: torch.Tensor) -> np.ndarray:
    flat = flat.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    numpy_dtype, _ = _KINDS[flat.dtype]
    if numpy_dtype is np.uint16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _addresses(arrays: List[np.ndarray]) -> np.ndarray:
    """Data addresses of same-dtype contiguous arrays: the kernels read the
    variants through these (a numba typed list of arrays costs seconds to set
    up in every new process; a tuple compiles once per variant count)."""
    return np.array([a.ctypes.data for a in arrays], dtype=np.int64)


def _threads() -> None:
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)


def magnitude_bounds(flat_base, flat_variants, chunk_size) -> Tuple[List[float], List[float], bool]:
    """Per variant min and max of |delta| over the tensor; False if a delta is not finite."""
    _threads()
    numel = flat_base.numel()
    chunk = max(1, min(chunk_size, numel))
    chunks = -(-numel // chunk)
    count = len(flat_variants)
    lows = np.empty((chunks, count), dtype=np.float32)
    highs = np.empty((chunks, count), dtype=np.float32)
    bad = np.zeros(chunks, dtype=np.bool_)
    _, kind = _KINDS[flat_base.dtype]
    arrays = [_array(v) for v in flat_variants]  # alive until the kernel returns
    _bounds_kernel(_array(flat_base), _addresses(arrays), kind, numel, chunk, lows, highs, bad)
    if bad.any():
        return [], [], False
    return [float(x) for x in lows.min(0)], [float(x) for x in highs.max(0)], True


def _stream_keys(keys: Sequence[Tuple[int, int]], numel: int) -> np.ndarray:
    """Block keys of every stream for every 2**32-element block the tensor spans."""
    blocks = max(1, -(-numel // (1 << 32)))
    table = np.empty((len(keys), blocks, 2), dtype=np.uint64)
    for v, key in enumerate(keys):
        for block in range(blocks):
            table[v, block] = _block_key(key, block)
    return table


def merge(flat_base, flat_variants, out, plans, rescale, keys, threshold, fast, temperature,
          lambda_, chunk_size, counting):
    """Merge into ``out`` (flat, base dtype); with ``counting`` return (counts, mass bins).

    ``plans`` are the kernel's per-variant plans (listing order) as tuples
    ``(prune, constant, rate, keep, high, slope, offset, clamp_low)`` of Python
    values already rounded to float32.
    """
    _threads()
    numel = flat_base.numel()
    count = len(flat_variants)
    chunk = max(1, min(chunk_size, numel))
    chunks = -(-numel // chunk)
    _, kind = _KINDS[flat_base.dtype]
    rows = []
    for prune, constant, rate, _keep, high, slope, offset, clamp_low in plans:
        if not prune:  # prob = 0: nothing dropped but the threshold, 1 - prob = 1
            rows.append((0.0, 0.0, 0.0, False))
        elif constant:  # prob = p everywhere; 1 - p is the plan's keep value
            rows.append((0.0, 0.0, rate, False))
        else:
            rows.append((high, slope, offset, clamp_low))
    highs, slopes, offsets, clamps = (np.array(column) for column in zip(*rows))
    prunes = np.array([plan[0] for plan in plans], dtype=np.bool_)
    order = np.arange(count - 1, -1, -1, dtype=np.int64)
    shape = (chunks, count) if counting else (1, count)
    counts = np.zeros(shape + (COLUMNS,), dtype=np.int64)
    bins = np.zeros(shape + (_LANES, BINS), dtype=np.int64)
    arrays = [_array(v) for v in flat_variants]  # alive until the kernel returns
    _merge_kernel(
        _array(flat_base), _addresses(arrays), _array(out), kind,
        numel, chunk, order, _stream_keys(keys, numel), prunes,
        highs.astype(np.float32), slopes.astype(np.float32), offsets.astype(np.float32),
        clamps.astype(np.bool_), bool(rescale),
        np.float32(threshold), bool(fast), float(temperature),
        np.float32(lambda_), lambda_ != 1.0, bool(counting), counts, bins,
    )
    if not counting:
        return None
    return counts.sum(0), bins.sum(axis=(0, 2))


__all__ = ["supports", "magnitude_bounds", "merge", "uniform_at"]
