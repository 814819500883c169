"""Hypothesis property tests of the Circuit-Merge kernel.

* Where every drop rate is 0, the result equals, element by element, a plain
  Python reference implementation of the spec (below, written from the spec).
* Wherever all variants equal the base, the result equals the base (any
  parameters, random path included).
* Chunk size never changes a single bit.
* Without rescale, every merged delta is 0 or lies between the smallest and the
  largest thresholded delta of that element (a convex combination), and with a
  single variant it is 0 or that delta.

Example counts are bounded so the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuit_merge_plugin.core.exact import same_bytes
from circuit_merge_plugin.core.kernel import circuit_merge
from circuit_merge_plugin.core.params import CircuitParams

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (1,), (2,), (7,), (3, 4), (2, 3, 2), (16,)]
# Exactly representable thresholds, so "|d| < threshold" means the same in
# float32 and float64.
THRESHOLDS = [0.0, 2.0**-20, 2.0**-8, 0.125, 0.5]
EXACT_TEMPERATURES = [0.0, 1.0]
DYADIC_TEMPERATURES = [0.25, 0.5, 0.75]
EPS_OF = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


pytestmark = pytest.mark.usefixtures("one_torch_thread", "implementation")


# ----------------------------------------------------------- reference ----


def f32(x: float) -> float:
    """Round a float64 to float32 (exact emulation of one float32 operation
    on float32 operands for +, -, *, /)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def reference_p0(base, variants, temperature, threshold):
    """Per-element spec of the merge when every drop rate is 0 (no MAGPRUNE).

    ``base`` and ``variants`` are lists of floats (already float32-representable);
    returns float32 values of B + acc.
    """
    out = []
    one_minus_t = f32(1.0 - temperature)
    t = f32(temperature)
    for j, b in enumerate(base):
        acc, count = 0.0, 0
        for variant in reversed(variants):  # lowest priority first
            d = f32(variant[j] - b)
            if abs(d) < threshold:
                d = 0.0
            if d == 0.0:
                continue  # zeros never contribute
            if count == 0 or (acc > 0) != (d > 0):
                acc, count = d, 1  # first contribution, or sign conflict: overwrite
            else:
                count += 1
                pairwise = f32(f32(one_minus_t * f32(acc + d)) / 2)
                true_mean = f32(f32(t * f32(f32(acc * (count - 1)) + d)) / count)
                acc = f32(pairwise + true_mean)
        out.append(f32(b + acc))
    return out


# ---------------------------------------------------------- strategies ----

finite32 = st.floats(min_value=-60.0, max_value=60.0, width=32, allow_subnormal=False)
small_steps = st.sampled_from([0.0, 2.0**-12, -(2.0**-12), 2.0**-9, 0.125, -0.125, 0.5, -1.0, 1.0, 3.0])


@st.composite
def merge_inputs(draw, max_variants=4, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from(SHAPES))
    numel = 1
    for size in shape:
        numel *= size
    n = draw(st.integers(1, max_variants))
    base_values = draw(st.lists(finite32, min_size=numel, max_size=numel))
    base = torch.tensor(base_values, dtype=torch.float32).to(dtype).reshape(shape)
    flat_base = base.float().reshape(-1).tolist()
    variants = []
    for _ in range(n):
        values = []
        for j in range(numel):
            kind = draw(st.integers(0, 3))
            if kind == 0:
                values.append(flat_base[j])  # unchanged
            elif kind == 1:
                values.append(flat_base[j] + draw(small_steps))  # small move
            elif kind == 2 and variants:
                values.append(variants[0][j])  # same value as another variant
            else:
                values.append(draw(finite32))
        variants.append(values)
    tensors = [torch.tensor(v, dtype=torch.float32).to(dtype).reshape(shape) for v in variants]
    return base, tensors


@st.composite
def random_params(draw, n):
    params = CircuitParams(
        temperature=draw(st.floats(0.0, 1.0)),
        base_droprate=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]) | st.floats(0.0, 0.99)),
        meaningful_change_threshold=draw(st.sampled_from(THRESHOLDS)),
        epsilon=draw(st.sampled_from([0.0, 0.1, 0.5, 0.99]) | st.floats(0.0, 0.99)),
        rescale=draw(st.booleans()),
        seed=draw(st.integers(-(2**40), 2**40)),
    )
    drop_rate = draw(
        st.none() | st.lists(st.none() | st.floats(0.0, 0.99), min_size=n, max_size=n)
    )
    return params, drop_rate


@st.composite
def p0_params(draw, n):
    """Parameters under which every drop rate is 0 (spec, step 2)."""
    modes = ["overrides"]
    if n == 2:
        modes.append("two_b0")
    if n == 1:
        modes.append("single_b0")
    modes.append("t1_b0")
    mode = draw(st.sampled_from(modes))
    temperature = draw(st.sampled_from(EXACT_TEMPERATURES + DYADIC_TEMPERATURES))
    drop_rate = None
    if mode == "t1_b0":
        temperature, b = 1.0, 0.0
    elif mode in ("two_b0", "single_b0"):
        b = 0.0
    else:
        b = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9]))
        drop_rate = [0.0] * n
    params = CircuitParams(
        temperature=temperature,
        base_droprate=b,
        meaningful_change_threshold=draw(st.sampled_from(THRESHOLDS)),
        # MAGPRUNE is skipped entirely when p == 0: these must not matter.
        epsilon=draw(st.sampled_from([0.0, 0.1, 0.9])),
        rescale=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
    )
    return params, drop_rate


# ---------------------------------------------------------- properties ----


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_all_p_zero_matches_reference(data):
    base, variants = data.draw(merge_inputs())
    params, drop_rate = data.draw(p0_params(len(variants)))
    out = circuit_merge(base, variants, params, drop_rate=drop_rate, name="p0")
    assert out.dtype == base.dtype and out.shape == base.shape

    flat_variants = [v.float().reshape(-1).tolist() for v in variants]
    flat_base = base.float().reshape(-1).tolist()
    expected32 = torch.tensor(
        reference_p0(flat_base, flat_variants, params.temperature, params.meaningful_change_threshold),
        dtype=torch.float32,
    )
    expected = expected32.to(base.dtype).reshape(base.shape)
    if params.temperature in EXACT_TEMPERATURES:
        # T in {0, 1}: the spec's formula fixes every float32 operation.
        assert torch.equal(out, expected), (out, expected)
    else:
        # Other T: the order in which the two terms are rounded is the
        # implementation's, so allow 64 float32 roundings of the largest delta
        # (~4e-6 relative: any formula slip is off by O(1) relative), plus one
        # ulp of the result dtype (the final rounding may then differ).
        largest = max(
            [abs(f32(v[j] - flat_base[j])) for v in flat_variants for j in range(len(flat_base))],
            default=0.0,
        )
        got = out.float().reshape(-1)
        tolerance = 64 * 2.0**-24 * largest + EPS_OF[base.dtype] * expected32.abs()
        error = (got - expected.float().reshape(-1)).abs()
        assert bool((error <= tolerance).all()), (got, expected32)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_result_is_base_where_all_variants_equal_base(data):
    base, variants = data.draw(merge_inputs())
    mask = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=base.numel(), max_size=base.numel())),
        dtype=torch.bool,
    ).reshape(base.shape)
    variants = [torch.where(mask, base, v) for v in variants]
    params, drop_rate = data.draw(random_params(len(variants)))
    out = circuit_merge(base, variants, params, drop_rate=drop_rate, name="same")
    assert torch.equal(out[mask], base[mask])


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_chunk_size_never_changes_a_bit(data):
    base, variants = data.draw(merge_inputs(max_variants=3))
    params, drop_rate = data.draw(random_params(len(variants)))
    name = data.draw(st.sampled_from(["", "w", "model.layers.0.mlp.down_proj.weight"]))
    reference = circuit_merge(base, variants, params, drop_rate=drop_rate, name=name)
    numel = max(base.numel(), 1)
    for chunk in {1, data.draw(st.integers(1, numel + 2)), numel}:
        out = circuit_merge(base, variants, params, drop_rate=drop_rate, name=name, chunk_size=chunk)
        assert out.dtype == reference.dtype and out.shape == reference.shape
        assert same_bytes(out, reference), chunk


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_without_rescale_merged_delta_is_a_convex_combination(data):
    base, variants = data.draw(merge_inputs(dtypes=[torch.float32]))
    params, drop_rate = data.draw(random_params(len(variants)))
    params = dataclasses.replace(params, rescale=False)
    out = circuit_merge(base, variants, params, drop_rate=drop_rate, name="convex")
    b = base.reshape(-1).double()
    deltas = torch.stack([(v.reshape(-1) - base.reshape(-1)).double() for v in variants])
    deltas = torch.where(deltas.abs() < params.meaningful_change_threshold, 0.0, deltas)
    got = out.reshape(-1).double() - b
    # rounding of B + acc in float32 and of the averaging steps: a few float32
    # ulps (2**-23 relative each); allow 32 of them
    slack = 2.0**-18 * (b.abs() + deltas.abs().max(dim=0).values)
    for j in range(b.numel()):
        nonzero = deltas[:, j][deltas[:, j] != 0]
        if got[j] == 0 or nonzero.numel() == 0:
            assert abs(float(got[j])) <= float(slack[j]), (j, got[j])
            continue
        low, high = float(nonzero.min()), float(nonzero.max())
        assert low - slack[j] <= got[j] <= high + slack[j], (j, got[j], nonzero)
        if len(variants) == 1:
            assert abs(float(got[j] - nonzero[0])) <= float(slack[j])
