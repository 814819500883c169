"""The Circuit-Merge kernel, tested against the spec (not the code).

Sections:
  * calculate_p / drop_rates: the original script's README formula (i=1 = lowest priority),
    single variant gets base_droprate (documented deviation), overrides;
  * paths where every drop rate is 0 (two variants with base_droprate=0, or
    temperature=1 with base_droprate=0, or per-variant drop_rate=0): exact
    values, chosen so that every float32 operation is exact;
  * the random path: survival fraction 1 - prob per priority, kept values
    d / (1 - prob) with rescale, d without, unbiased mean, overwrite and
    averaging probabilities under sign conflict / agreement. Statistical
    bounds are 6 standard deviations on >= 40k elements, stated per test: a
    correct kernel fails one with probability < 1e-8, while every formula
    slip we could think of moves the statistic by > 10 sd;
  * reproducibility: chunk sizes, processing order, threads, seeds, names,
    variant positions, and the exact tie to the counter-based generator;
  * bad input: ValueErrors that name the parameter / tensor and model.
"""

from __future__ import annotations

import math

import pytest
import torch

from circuit_merge_plugin.core.kernel import calculate_p, circuit_merge, drop_rates
from circuit_merge_plugin.core.exact import same_bytes
from circuit_merge_plugin.core.params import CircuitParams
from circuit_merge_plugin.core.rng import stream_key, uniform

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("one_torch_thread", "implementation")


# ------------------------------------------------------------- helpers ----


def seed_calculate_p(i, count, temperature=0.0, base_droprate=0.5):
    """Verbatim from the original script's README (i=1 is the LOWEST priority)."""
    if count == 1:
        return base_droprate * 2
    # calculate number of divisions
    if i == 1:
        i = 2
    divisions = (count - i) + 1
    # calculate our division basis multiplier
    final = 0.5**divisions
    # adjust final by double the inverse drop rate
    final = final * ((1 - base_droprate) * 2)
    # interpolate between geometric decay and equal drop rate at base_droprate
    final = ((1 - temperature) * final) + (temperature * (1 - base_droprate))
    # It's a fair cop.
    return 1.0 - final


def merge(base, variants, *, seed=1234, drop_rate=None, name="w", positions=None,
          labels=None, chunk_size=None, **params):
    kwargs = dict(drop_rate=drop_rate, name=name, positions=positions, labels=labels)
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return circuit_merge(base, variants, CircuitParams(seed=seed, **params), **kwargs)


def assert_rel_close(got: torch.Tensor, expected, rtol: float) -> None:
    """|got - expected| <= rtol * |expected| elementwise (float64 comparison)."""
    expected = torch.as_tensor(expected, dtype=torch.float64).expand(got.shape)
    error = (got.double() - expected).abs()
    worst = float((error - rtol * expected.abs()).max()) if got.numel() else -1.0
    assert worst <= 0.0, f"off by more than rtol={rtol}: max error {float(error.max())}"


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# Every configuration here gives drop rate 0 to every variant (spec, step 2):
# two variants with b=0 (any T); T=1 with b=0 (any n); one variant with b=0;
# per-variant drop_rate=0 overrides (any b, T).
def p0_config(n, temperature):
    if n == 2:
        return dict(base_droprate=0.0, temperature=temperature)
    if temperature == 1.0 or n == 1:
        return dict(base_droprate=0.0, temperature=temperature)
    return dict(base_droprate=0.5, temperature=temperature, drop_rate=[0.0] * n)


# ------------------------------------------------ calculate_p/drop_rates ----

TEMPERATURES = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
BASE_RATES = [0.0, 0.1, 0.5, 0.7, 0.99]


def test_calculate_p_is_the_seed_formula():
    for count in range(2, 9):
        for i in range(1, count + 1):
            for temperature in TEMPERATURES:
                for b in BASE_RATES:
                    assert calculate_p(i, count, temperature, b) == pytest.approx(
                        seed_calculate_p(i, count, temperature, b), rel=1e-12, abs=1e-15
                    ), (i, count, temperature, b)


def test_calculate_p_hand_values():
    # i=1 is the LOWEST priority: it drops more.
    assert calculate_p(2, 2, 0.0, 0.5) == pytest.approx(0.5)
    assert calculate_p(1, 2, 0.0, 0.5) == pytest.approx(0.5)
    assert calculate_p(3, 3, 0.0, 0.5) == pytest.approx(0.5)
    assert calculate_p(2, 3, 0.0, 0.5) == pytest.approx(0.75)
    assert calculate_p(1, 3, 0.0, 0.5) == pytest.approx(0.75)
    assert calculate_p(4, 4, 0.3, 0.2) == pytest.approx(0.2)
    assert calculate_p(3, 4, 0.3, 0.2) == pytest.approx(0.48)
    assert calculate_p(2, 4, 0.3, 0.2) == pytest.approx(0.62)
    assert calculate_p(1, 4, 0.3, 0.2) == pytest.approx(0.62)
    assert calculate_p(1, 5, 0.0, 0.0) == pytest.approx(1 - 0.5**3)


def test_calculate_p_defaults_are_t0_b05():
    assert calculate_p(1, 3) == pytest.approx(0.75)
    assert calculate_p(3, 3) == pytest.approx(0.5)


@pytest.mark.parametrize("b", BASE_RATES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_single_variant_gets_base_droprate(temperature, b):
    # Documented deviation: the original script returns 2*b (everything dropped at b=0.5).
    assert calculate_p(1, 1, temperature, b) == pytest.approx(b)
    assert drop_rates(1, temperature, b) == [pytest.approx(b)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("b", BASE_RATES)
def test_drop_rates_in_listing_order(count, temperature, b):
    rates = drop_rates(count, temperature, b)
    assert len(rates) == count
    for position in range(count):  # position 0 = V1 = highest priority, i = count
        i = count - position
        expected = b if count == 1 else seed_calculate_p(i, count, temperature, b)
        assert rates[position] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # V1 gets b; lower priorities never drop less; T=1 gives everyone b.
    assert rates[0] == pytest.approx(b)
    assert all(rates[k] <= rates[k + 1] + 1e-12 for k in range(count - 1))
    if temperature == 1.0:
        assert rates == [pytest.approx(b)] * count
    for rate in rates:
        assert 0.0 <= rate < 1.0


def test_zero_drop_rate_configurations():
    assert drop_rates(2, 0.0, 0.0) == [0.0, 0.0]
    assert drop_rates(2, 0.7, 0.0) == [0.0, 0.0]
    assert drop_rates(5, 1.0, 0.0) == [0.0] * 5
    assert drop_rates(1, 0.0, 0.0) == [0.0]
    assert drop_rates(3, 0.0, 0.0) != [0.0] * 3  # lower priorities still drop


def test_drop_rate_overrides():
    assert drop_rates(3, 0.0, 0.5, [None, 0.1, None]) == [
        pytest.approx(0.5), pytest.approx(0.1), pytest.approx(0.75)
    ]
    assert drop_rates(3, 0.0, 0.5, [0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0]
    assert drop_rates(2, 0.0, 0.5, [None, None]) == [pytest.approx(0.5)] * 2
    assert drop_rates(1, 0.0, 0.5, [0.9]) == [pytest.approx(0.9)]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, math.nan, "high", True])
def test_drop_rate_override_out_of_range(bad):
    with pytest.raises(ValueError, match="drop_rate"):
        drop_rates(2, 0.0, 0.5, [None, bad])
    base = torch.zeros(4)
    with pytest.raises(ValueError, match="drop_rate"):
        merge(base, [base + 1, base + 2], drop_rate=[bad, None])


def test_drop_rate_override_wrong_length():
    with pytest.raises(ValueError, match="drop_rate"):
        drop_rates(3, 0.0, 0.5, [0.1, 0.2])
    base = torch.zeros(4)
    with pytest.raises(ValueError):
        merge(base, [base + 1, base + 2], drop_rate=[0.1])


# ------------------------------------------------ exact paths: all p = 0 ----


@pytest.mark.parametrize("temperature", [0.0, 0.25, 0.5, 1.0])
def test_two_variants_sign_conflict_higher_priority_wins(temperature):
    base = t([0.0, 1.0, -2.0, 0.5])
    v1 = t([1.0, -2.0, -2.5, 0.25])  # deltas: +1, -3, -0.5, -0.25 (highest priority)
    v2 = t([-2.0, 3.0, 0.0, 4.5])  # deltas: -2, +2, +2, +4
    out = merge(base, [v1, v2], base_droprate=0.0, temperature=temperature)
    assert torch.equal(out, v1)  # every element is a conflict: V1 overwrites


def test_sign_conflict_resets_the_count():
    # T=1, b=0, three variants (all p=0). Per element, processing V3, V2, V1.
    base = torch.zeros(3)
    v3 = t([1.0, -1.0, 1.0])
    v2 = t([-2.0, 2.0, 3.0])
    v1 = t([-4.0, 4.0, -1.0])
    out = merge(base, [v1, v2, v3], base_droprate=0.0, temperature=1.0)
    # e0: +1 -> -2 overwrites (count 1) -> -4 agrees: count 2, (-2*1 + -4)/2 = -3
    #     (a count not reset to 1 would give (-2*2 - 4)/3).
    # e1: mirror image: +3.  e2: +1, +3 agree (2), then -1 overwrites: -1.
    assert torch.equal(out, t([-3.0, 3.0, -1.0]))


def _agreement_expected(values_in_processing_order, temperature):
    acc, count = 0.0, 0
    for d in values_in_processing_order:
        if count == 0:
            acc, count = d, 1
        else:
            count += 1
            acc = (1 - temperature) * (acc + d) / 2 + temperature * (acc * (count - 1) + d) / count
    return acc


@pytest.mark.parametrize("temperature", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_agreement_averaging_temperature_formula(temperature, sign):
    # Values chosen so every float32 step is exact; all drop rates 0 via overrides.
    base = t([0.5, -1.0, 2.0])
    lists = [[1.0, 2.0, 3.0], [4.0, 2.0, 0.75], [3.0, 1.0, 2.0]]  # V3, V2, V1 deltas
    v3 = base + sign * t([row[0] for row in lists])
    v2 = base + sign * t([row[1] for row in lists])
    v1 = base + sign * t([row[2] for row in lists])
    out = merge(base, [v1, v2, v3], temperature=temperature, drop_rate=[0.0, 0.0, 0.0])
    expected = base + sign * t([_agreement_expected(row, temperature) for row in lists])
    assert torch.equal(out, expected)


def test_agreement_hand_values():
    base = torch.zeros(1)
    v3, v2, v1 = t([1.0]), t([2.0]), t([3.0])
    # T=0: pairwise, lowest priority first: (1+2)/2 = 1.5, (1.5+3)/2 = 2.25
    assert merge(base, [v1, v2, v3], drop_rate=[0, 0, 0]).item() == 2.25
    # T=1: true mean of the agreeing run: 2
    assert merge(base, [v1, v2, v3], base_droprate=0.0, temperature=1.0).item() == 2.0
    # T=0.5: 0.5*(1.5+3)/2 + 0.5*(1.5*2+3)/3 = 1.125 + 1 = 2.125
    assert merge(base, [v1, v2, v3], temperature=0.5, drop_rate=[0, 0, 0]).item() == 2.125
    # T=1, four variants 1, 2, 3, 6 (processing order) -> mean 3
    v4 = t([1.0])
    out = merge(base, [t([6.0]), v1, v2, v4], base_droprate=0.0, temperature=1.0)
    assert out.item() == 3.0
    # T=0, two variants, b=0: (V2 + V1)/2
    assert merge(base, [t([1.0]), t([4.0])], base_droprate=0.0).item() == 2.5


def test_threshold_zeroing():
    base = t([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    v1 = t([0.25, -0.25, 1.2490234375, 0.7509765625, 1e-30, -0.5])
    # deltas: 0.25 (== threshold: kept), -0.25 (kept), 0.2490234375 (< 0.25: zeroed),
    # -0.2490234375 (zeroed), tiny (zeroed), -0.5 (kept)
    out = merge(base, [v1], base_droprate=0.0, meaningful_change_threshold=0.25)
    assert torch.equal(out, t([0.25, -0.25, 1.0, 1.0, 0.0, -0.5]))


def test_threshold_default_and_zero():
    base = torch.zeros(4)
    v1 = t([1e-6, -1e-6, 1e-5, 1e-30])
    out = merge(base, [v1], base_droprate=0.0)  # default threshold 2e-6
    assert torch.equal(out, t([0.0, 0.0, 1e-5, 0.0]))
    out = merge(base, [v1], base_droprate=0.0, meaningful_change_threshold=0.0)
    assert torch.equal(out, v1)


def test_thresholded_delta_is_not_a_conflict_and_not_counted():
    base = torch.zeros(2)
    v2 = t([4.0, -4.0])
    v1 = t([-0.1, 0.1])  # below threshold 0.5: zeroed, so no overwrite, no averaging
    out = merge(base, [v1, v2], base_droprate=0.0, meaningful_change_threshold=0.5)
    assert torch.equal(out, t([4.0, -4.0]))


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_zeros_never_contribute(temperature):
    base = t([1.0, 1.0, 1.0, 1.0])
    v2 = t([5.0, -3.0, 1.0, 1.0])  # deltas +4, -4, 0, 0
    v1 = t([1.0, 1.0, 3.0, 1.0])  # deltas 0, 0, +2, 0
    out = merge(base, [v1, v2], base_droprate=0.0, temperature=temperature)
    assert torch.equal(out, t([5.0, -3.0, 3.0, 1.0]))


def test_zero_in_the_middle_does_not_count():
    # T=1, b=0: V3=+2, V2=0, V1=+4 -> count 2 after V1: (2*1 + 4)/2 = 3
    base = torch.zeros(1)
    out = merge(base, [t([4.0]), t([0.0]), t([2.0])], base_droprate=0.0, temperature=1.0)
    assert out.item() == 3.0


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_huge_magnitudes_follow_the_same_rules(temperature):
    # Deltas near 2**110 (finite float32, no overflow in any step).
    big = 2.0**110
    base = torch.zeros(4)
    v2 = t([1.0, -1.0, 3.0, 1.0]) * big
    v1 = t([3.0, 2.0, 1.0, 0.0]) * big
    out = merge(base, [v1, v2], base_droprate=0.0, temperature=temperature)
    # two agreeing deltas give (a + b)/2 at every T; conflicts give V1.
    assert torch.equal(out, t([2.0, 2.0, 2.0, 1.0]) * big)
    # random path: constant magnitude, prob = p = 0.5, kept values doubled
    out = merge(torch.zeros(4000), [torch.full((4000,), big)], seed=3)
    assert set(torch.unique(out).tolist()) == {0.0, 2 * big}


def test_subnormal_deltas_with_zero_threshold():
    tiny = 2.0**-149  # smallest float32 subnormal
    base = torch.zeros(3)
    v2 = t([4 * tiny, 2.0**-130, -6 * tiny])
    v1 = t([8 * tiny, 0.0, 2 * tiny])
    out = merge(base, [v1, v2], base_droprate=0.0, meaningful_change_threshold=0.0)
    assert torch.equal(out, t([6 * tiny, 2.0**-130, 2 * tiny]))
    # with the default threshold they are all below 2e-6
    out = merge(base, [v1, v2], base_droprate=0.0)
    assert torch.equal(out, base)


def test_variants_equal_to_base_return_base():
    base = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for config in [dict(base_droprate=0.0), dict(), dict(temperature=0.3, base_droprate=0.2)]:
        out = merge(base, [base.clone(), base.clone(), base.clone()], **config)
        assert torch.equal(out, base)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_result_dtype_is_base_dtype(dtype):
    base = t([1.0, 2.0, -1.5], dtype)
    v1 = t([1.5, 2.0, -1.0], dtype)
    v2 = t([2.0, 1.0, -1.25], dtype)
    out = merge(base, [v1, v2], base_droprate=0.0)
    assert out.dtype == dtype and out.shape == base.shape
    # e0: (1 + 0.5)/2 = 0.75; e1: -1 (V1 zero); e2: (0.25 + 0.5)/2 = 0.375
    assert torch.equal(out, t([1.75, 1.0, -1.125], dtype))
    # The random path keeps the dtype too.
    out = merge(base, [v1, v2])
    assert out.dtype == dtype


def test_result_dtype_float64():
    base = t([1.0, 2.0], torch.float64)
    out = merge(base, [t([2.0, 3.0], torch.float64)], base_droprate=0.0)
    assert out.dtype == torch.float64
    assert torch.equal(out, t([2.0, 3.0], torch.float64))


def test_bf16_result_is_float32_sum_rounded_to_bf16():
    base = t([1.0], torch.bfloat16)
    v1 = t([1.0078125], torch.bfloat16)  # 1 + 2**-7
    v2 = t([1.015625], torch.bfloat16)  # 1 + 2**-6
    out = merge(base, [v1, v2], base_droprate=0.0)
    # acc = 1.5 * 2**-7 in float32; 1 + acc is a bf16 tie -> rounds to even
    assert torch.equal(out, t([1.01171875]).to(torch.bfloat16))
    assert out.item() == 1.015625


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("config", [dict(), dict(base_droprate=0.0)])
def test_non_floating_base_is_returned_as_a_copy(dtype, config):
    base = torch.tensor([0, 1, 1, 0, 1], dtype=dtype)
    variants = [torch.tensor([1, 1, 0, 0, 1], dtype=dtype), torch.ones(5, dtype=dtype)]
    out = merge(base, variants, **config)
    assert out.dtype == dtype
    assert torch.equal(out, base)
    assert out.data_ptr() != base.data_ptr()
    out[0] = 1
    assert base[0] == 0


@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 3, 2)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config", [dict(), dict(base_droprate=0.0)])
def test_empty_tensors(shape, dtype, config):
    base = torch.zeros(shape, dtype=dtype)
    out = merge(base, [torch.zeros(shape, dtype=dtype)] * 2, **config)
    assert out.shape == shape and out.dtype == dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_dim_tensors(dtype):
    base = torch.tensor(1.0, dtype=dtype)
    out = merge(base, [torch.tensor(3.0, dtype=dtype)], base_droprate=0.0)
    assert out.shape == () and out.dtype == dtype and out.item() == 3.0
    out = merge(base, [torch.tensor(2.0, dtype=dtype), torch.tensor(4.0, dtype=dtype)],
                base_droprate=0.0)
    assert out.item() == 3.0  # (3 + 1)/2 + 1
    # Random path, single element: mx == mn so prob = p = 0.5; kept -> 2/(1-0.5)
    seen = set()
    for seed in range(40):
        out = merge(base, [torch.tensor(3.0, dtype=dtype)], seed=seed)
        assert out.shape == () and out.dtype == dtype
        seen.add(out.item())
    assert seen == {1.0, 5.0}  # P(one value missing in 40 draws) = 2 * 2**-40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(base_droprate=0.0), dict(), dict(rescale=False, epsilon=0.5)])
def test_inputs_are_never_modified(dtype, config):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 50, generator=g).to(dtype)
    variants = [base + 0.1 * torch.randn(6, 50, generator=g).to(dtype) for _ in range(2)]
    variants.append(base.clone())  # a variant identical to base
    variants[0][0, :5] = base[0, :5] + 1e-7  # below the threshold
    before = [base.clone()] + [v.clone() for v in variants]
    merge(base, variants, meaningful_change_threshold=1e-3, chunk_size=64, **config)
    for original, now in zip(before, [base] + variants):
        assert same_bytes(original, now)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(20, 30, generator=g)
    variants = [base + torch.randn(20, 30, generator=g) for _ in range(3)]
    expected = merge(base.t().contiguous(), [v.t().contiguous() for v in variants])
    out = merge(base.t(), [v.t() for v in variants])
    assert out.shape == (30, 20)
    assert same_bytes(out.contiguous(), expected)


def test_multidimensional_p0_is_elementwise():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, 5, generator=g)
    v1 = base + torch.randn(3, 4, 5, generator=g)
    v2 = base + torch.randn(3, 4, 5, generator=g)
    out = merge(base, [v1, v2], base_droprate=0.0)
    flat = merge(base.reshape(-1), [v1.reshape(-1), v2.reshape(-1)], base_droprate=0.0)
    assert out.shape == base.shape
    assert torch.equal(out.reshape(-1), flat)
    # element by element: conflict -> V1's delta, agreement -> mean of the deltas
    d1, d2 = v1 - base, v2 - base
    expected = torch.where((d1 > 0) == (d2 > 0), (d2 + d1) / 2, d1) + base
    assert torch.equal(out, expected)


# ------------------------------------------------- random path: formulas ----

N_CONST = 60_000


def six_sigma(prob, n):
    return 6.0 * math.sqrt(max(prob * (1.0 - prob), 0.0) / n)


def isolated(n, position, delta, base=None):
    """n variants; only the one at ``position`` differs from base."""
    base = torch.zeros_like(delta) if base is None else base
    return base, [base + delta if k == position else base.clone() for k in range(n)]


def random_signs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize(
    "n,temperature,b",
    [(1, 0.0, 0.5), (2, 0.0, 0.7), (3, 0.0, 0.5), (4, 0.3, 0.2)],
)
def test_survival_per_priority_constant_magnitude(n, temperature, b):
    # Constant |d| over the whole tensor: mx == mn, so prob = p of that variant.
    delta = 0.5 * random_signs(N_CONST)
    for position in range(n):
        p = b if n == 1 else seed_calculate_p(n - position, n, temperature, b)
        base, variants = isolated(n, position, delta)
        out = merge(base, variants, temperature=temperature, base_droprate=b)
        kept = out != 0
        frac = float(kept.double().mean())
        # Binomial(N, 1-p) fraction; bound 6 sd
        assert abs(frac - (1 - p)) < six_sigma(p, N_CONST), (position, frac, 1 - p)
        # kept values are d / (1 - p), with the sign of d
        assert_rel_close(out[kept], delta[kept] / (1 - p), 1e-6)
        assert torch.all(out[~kept] == 0)


def test_survival_without_rescale_keeps_values_as_is():
    delta = 0.5 * random_signs(N_CONST, seed=1)
    base, variants = isolated(3, 1, delta)
    out = merge(base, variants, rescale=False)  # p = 0.75 for V2 of 3
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    frac = float(kept.double().mean())
    assert abs(frac - 0.25) < six_sigma(0.75, N_CONST), frac


def test_override_drop_rate_on_random_path():
    delta = random_signs(N_CONST, seed=2)
    base, variants = isolated(2, 0, delta)
    out = merge(base, variants, drop_rate=[0.3, None])
    frac = float((out != 0).double().mean())
    assert abs(frac - 0.7) < six_sigma(0.3, N_CONST), frac
    assert_rel_close(out[out != 0], delta[out != 0] / 0.7, 1e-6)


LEVELS = [0.0, 1.0, 2.0, 3.0, 4.0]  # |d| levels; mn = 0, mx = 4 -> r = 1 - a/4
M = 40_000  # elements per level


def graded_delta(layout: str, seed=0):
    levels = torch.tensor(LEVELS)
    if layout == "interleaved":
        index = torch.arange(M * len(LEVELS)) % len(LEVELS)
    else:  # contiguous blocks of equal magnitude: chunks of them see no spread
        index = torch.arange(M * len(LEVELS)) // M
    return levels[index] * random_signs(M * len(LEVELS), seed), index


def expected_prob(a, p, eps, mn=0.0, mx=4.0):
    r = 1.0 - (a - mn) / (mx - mn)
    return min(max(p - eps / 2 + eps * r, 0.0), 1.0)


@pytest.mark.parametrize(
    "p,eps",
    [(0.5, 0.1), (0.5, 0.4), (0.95, 0.4), (0.1, 0.6), (0.5, 0.0), (0.3, 0.99)],
)
@pytest.mark.parametrize("layout,chunk_size", [("interleaved", None), ("blocks", 1000)])
def test_survival_graded_magnitudes(p, eps, layout, chunk_size):
    delta, level = graded_delta(layout)
    base = torch.zeros_like(delta)
    out = merge(base, [base + delta], base_droprate=p, epsilon=eps, chunk_size=chunk_size)
    assert torch.all(out[level == 0] == 0)  # zeros never contribute
    for k, a in enumerate(LEVELS[1:], start=1):
        prob = expected_prob(a, p, eps)
        group = out[level == k]
        kept = group != 0
        frac = float(kept.double().mean())
        if prob >= 1.0:
            assert frac == 0.0, (a, frac)  # u < 1 always: always dropped
        elif prob <= 0.0:
            assert frac == 1.0, (a, frac)  # u >= 0 always: always kept
        else:
            # Binomial(M, 1-prob) fraction; bound 6 sd (>= 0.0009 for prob >= 2**-20)
            assert abs(frac - (1 - prob)) < six_sigma(prob, M) + 1e-6, (a, frac, 1 - prob)
        if kept.any():
            d = delta[level == k][kept]
            assert_rel_close(group[kept], d / (1 - prob), 2e-6)


def test_min_max_are_taken_after_thresholding():
    # |d| = 0.4 is below the threshold 0.5: it becomes 0, so mn = 0 (not 0.4),
    # and the 0.4 elements never contribute.
    delta, level = graded_delta("interleaved", seed=3)
    delta = torch.where(level == 0, 0.4 * random_signs(delta.numel(), 4), delta)
    base = torch.zeros_like(delta)
    p, eps = 0.5, 0.9
    out = merge(base, [base + delta], base_droprate=p, epsilon=eps, meaningful_change_threshold=0.5)
    assert torch.all(out[level == 0] == 0)
    for k, a in enumerate(LEVELS[1:], start=1):
        prob = expected_prob(a, p, eps)  # mn = 0, mx = 4
        frac = float((out[level == k] != 0).double().mean())
        # 6 sd ~ 0.015; taking mn = 0.4 would shift level 1 by 0.9*(0.083) ~ 0.075
        assert abs(frac - (1 - prob)) < six_sigma(prob, M), (a, frac, 1 - prob)


def test_zeros_count_in_min_max():
    # Nonzero |d| all in {2, 4} plus exact zeros: mn = 0, so |d|=2 has r = 0.5
    # (excluding zeros would give mn = 2 and r = 1).
    n = 3 * M
    index = torch.arange(n) % 3
    delta = torch.tensor([0.0, 2.0, 4.0])[index] * random_signs(n, 5)
    base = torch.ones(n)
    p, eps = 0.5, 0.8
    out = merge(base, [base + delta], base_droprate=p, epsilon=eps)
    assert torch.all(out[index == 0] == 1.0)
    for k, a in [(1, 2.0), (2, 4.0)]:
        prob = expected_prob(a, p, eps)  # 0.5 and 0.1
        frac = float((out[index == k] != 1.0).double().mean())
        assert abs(frac - (1 - prob)) < six_sigma(prob, M), (a, frac, 1 - prob)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_rescale_is_unbiased(eps):
    # E[kept / (1 - prob)] = d. Per level: sample mean of M draws of X with
    # X = a/(1-q) w.p. 1-q, else 0: sd = a * sqrt(q / ((1-q) M)); bound 6 sd.
    delta, level = graded_delta("interleaved", seed=6)
    base = torch.zeros_like(delta)
    magnitude_out = merge(base, [base + delta.abs()], base_droprate=0.5, epsilon=eps)
    for k, a in enumerate(LEVELS[1:], start=1):
        q = expected_prob(a, 0.5, eps)
        mean = float(magnitude_out[level == k].double().mean())
        assert abs(mean - a) < 6 * a * math.sqrt(q / ((1 - q) * M)), (a, mean)


def test_rescale_is_unbiased_on_random_deltas():
    g = torch.Generator().manual_seed(7)
    n = 200_000
    base = torch.randn(n, generator=g)
    delta = torch.randn(n, generator=g).abs() * 0.01 + 0.001  # all positive
    variant = base + delta
    d = (variant - base).double()  # the float32 delta the kernel sees
    out = merge(base, [variant], base_droprate=0.6, epsilon=0.2)
    acc = (out - base).double()  # rounding: |error| < 2**-23 * (|base| + |acc|)
    a = d.abs()
    q = (0.6 - 0.1 + 0.2 * (1 - (a - a.min()) / (a.max() - a.min()))).clamp(0, 1)
    # sum of independent X_i with E = d_i, Var = d_i^2 q_i / (1 - q_i): bound 6 sd
    # plus the float32 rounding of base + acc (at most 2**-23 * |out| each).
    sd = math.sqrt(float((d * d * q / (1 - q)).sum()))
    rounding = float(out.double().abs().sum()) * 2**-23
    assert abs(float(acc.sum() - d.sum())) < 6 * sd + rounding


def test_kept_mask_follows_the_keyed_generator():
    # Spec: drop where u < prob, u from the stream keyed by (seed, tensor name,
    # listing position) at the element's flat index.
    delta = 0.25 * random_signs(5000, seed=8)
    for position in range(3):
        base, variants = isolated(3, position, delta)
        out = merge(base, variants, seed=77, name="layers.3.w", base_droprate=0.4)
        p = seed_calculate_p(3 - position, 3, 0.0, 0.4)
        u = uniform(stream_key(77, "layers.3.w", position), 0, 5000)
        prob = torch.tensor(p, dtype=torch.float32)
        assert torch.equal(out != 0, u >= prob), position
    # graded: prob per element from the formula
    delta, level = graded_delta("interleaved", seed=9)
    base = torch.zeros_like(delta)
    out = merge(base, [base + delta], seed=5, name="x", base_droprate=0.5, epsilon=0.4)
    u = uniform(stream_key(5, "x", 0), 0, delta.numel())
    prob = torch.tensor([expected_prob(a, 0.5, 0.4) for a in LEVELS])[level]
    assert torch.equal((out != 0)[level > 0], (u >= prob)[level > 0])


def test_overwrite_probabilities_under_sign_conflict():
    # V1 = +1, V2 = -1 (constant magnitudes), V3 = base; b = 0.5, T = 0:
    # p1 = 0.5, p2 = 0.75. Result: +1/(1-p1) = +2 if V1 survives (0.5);
    # else -1/(1-p2) = -4 if V2 survives (0.5*0.25); else 0 (0.375).
    n = N_CONST
    base = torch.zeros(n)
    out = merge(base, [base + 1.0, base - 1.0, base.clone()])
    values = set(torch.unique(out).tolist())
    assert values <= {2.0, -4.0, 0.0}, values
    for value, prob in [(2.0, 0.5), (-4.0, 0.125), (0.0, 0.375)]:
        frac = float((out == value).double().mean())
        assert abs(frac - prob) < six_sigma(prob, n), (value, frac, prob)


def test_overwrite_probabilities_two_variants_opposite_signs():
    # drop_rate overrides 0.3 (V1, +1.5) and 0.6 (V2, -1):
    # +1.5/0.7 w.p. 0.7; -1/0.4 = -2.5 w.p. 0.3*0.4 = 0.12; 0 w.p. 0.18.
    n = N_CONST
    base = torch.full((n,), 2.0)
    out = merge(base, [base + 1.5, base - 1.0], drop_rate=[0.3, 0.6]) - base
    high = out > 0
    assert_rel_close(out[high], 1.5 / 0.7, 1e-6)
    assert_rel_close(out[out < 0], -2.5, 1e-6)
    for mask, prob in [(high, 0.7), (out < 0, 0.12), (out == 0, 0.18)]:
        frac = float(mask.double().mean())
        assert abs(frac - prob) < six_sigma(prob, n), (frac, prob)


def test_three_variant_conflict_and_agreement_distribution():
    # V1 = +1 (p 0.5), V2 = -1 (p 0.75), V3 = +1 (p 0.75); b = 0.5, T = 0.
    # Processing V3, V2, V1 (kept values 4, -4, 2):
    #   V1 kept, V2 dropped, V3 kept: (4 + 2)/2 = 3    0.5*0.75*0.25 = 0.09375
    #   V1 kept otherwise: 2                             0.5 - 0.09375 = 0.40625
    #   V1 dropped, V2 kept: -4                          0.5*0.25      = 0.125
    #   V1, V2 dropped, V3 kept: 4                       0.5*0.75*0.25 = 0.09375
    #   all dropped: 0                                   0.5*0.75*0.75 = 0.28125
    n = N_CONST
    base = torch.zeros(n)
    out = merge(base, [base + 1.0, base - 1.0, base + 1.0])
    expected = {3.0: 0.09375, 2.0: 0.40625, -4.0: 0.125, 4.0: 0.09375, 0.0: 0.28125}
    assert set(torch.unique(out).tolist()) <= set(expected)
    for value, prob in expected.items():
        frac = float((out == value).double().mean())
        assert abs(frac - prob) < six_sigma(prob, n), (value, frac, prob)


def test_agreement_under_random_path_true_mean():
    # T = 1 and b = 0.5 with two agreeing variants: p = 0.5 both. Kept values
    # 2*1.0 (V1) and 2*3.0 (V2): both kept -> (6*1 + 2)/2 = 4 (w.p. 0.25);
    # only V1 -> 2 (0.25); only V2 -> 6 (0.25); none -> 0 (0.25).
    n = N_CONST
    base = torch.zeros(n)
    out = merge(base, [base + 1.0, base + 3.0], temperature=1.0)
    assert set(torch.unique(out).tolist()) <= {0.0, 2.0, 4.0, 6.0}
    for value in [0.0, 2.0, 4.0, 6.0]:
        frac = float((out == value).double().mean())
        assert abs(frac - 0.25) < six_sigma(0.25, n), (value, frac)


# ------------------------------------------------------ reproducibility ----


def _random_case(shape, n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    variants = []
    for k in range(n):
        v = base + 0.05 * torch.randn(shape, generator=g)
        v = torch.where(torch.rand(shape, generator=g) < 0.2, base, v)  # some zero deltas
        variants.append(v.to(dtype))
    return base.to(dtype), variants


CONFIGS = [
    dict(),
    dict(temperature=0.3, base_droprate=0.2, epsilon=0.5),
    dict(rescale=False, meaningful_change_threshold=0.01),
    dict(drop_rate=[0.0, 0.9, None]),
]


@pytest.mark.parametrize(
    "config,dtype",
    [(config, torch.float32) for config in CONFIGS]
    + [(CONFIGS[0], torch.bfloat16), (CONFIGS[1], torch.float16)],
)
def test_identical_bytes_across_chunk_sizes(config, dtype):
    small_base, small_variants = _random_case((5, 9), dtype=dtype)  # 45 elements
    reference = merge(small_base, small_variants, **config)
    for chunk in [1, 2, 7, 44]:
        assert same_bytes(merge(small_base, small_variants, chunk_size=chunk, **config), reference), chunk
    base, variants = _random_case((31, 33), seed=1, dtype=dtype)  # 1023 elements
    reference = merge(base, variants, **config)
    for chunk in [33, 1000, 1022, 1 << 20]:
        assert same_bytes(merge(base, variants, chunk_size=chunk, **config), reference), chunk


def test_identical_bytes_across_processing_order_and_global_state():
    cases = {name: _random_case((40, 30), seed=k) for k, name in enumerate(["a.w", "b.w", "c.w"])}
    forward = {name: merge(*cases[name], name=name, seed=9) for name in ["a.w", "b.w", "c.w"]}
    torch.manual_seed(12345)
    torch.rand(100)
    backward = {}
    for name in ["c.w", "b.w", "a.w"]:
        merge(*_random_case((10, 10), seed=99), name="other", seed=3)  # unrelated work in between
        backward[name] = merge(*cases[name], name=name, seed=9)
    for name in forward:
        assert same_bytes(forward[name], backward[name]), name


def test_identical_bytes_across_thread_counts():
    base, variants = _random_case((300, 300), seed=2)  # large enough to be split
    threads = torch.get_num_threads()
    results = []
    try:
        for count in [1, 2, 4]:
            torch.set_num_threads(count)
            results.append(merge(base, variants, name="t"))
    finally:
        torch.set_num_threads(threads)
    assert all(same_bytes(result, results[0]) for result in results[1:])


def test_same_seed_same_bytes_different_seed_or_name_differs():
    base, variants = _random_case((50, 40), seed=3)
    first = merge(base, variants, seed=5, name="w")
    assert same_bytes(merge(base, variants, seed=5, name="w"), first)
    for other in [merge(base, variants, seed=6, name="w"), merge(base, variants, seed=5, name="w2")]:
        # independent keep/drop decisions differ on a large share of elements
        assert float((other != first).double().mean()) > 0.2


def test_variant_stream_depends_on_its_listing_position_only():
    delta = random_signs(4000, seed=10)
    base = torch.zeros(4000)
    alone = merge(base, [base + delta], drop_rate=[0.5])
    # the same variant at position 0, next to a variant that contributes nothing
    assert same_bytes(merge(base, [base + delta, base.clone()], drop_rate=[0.5, 0.5]), alone)
    # the same variant at position 1: a different stream, different decisions
    moved = merge(base, [base.clone(), base + delta], drop_rate=[0.5, 0.5])
    assert float(((moved != 0) != (alone != 0)).double().mean()) > 0.3
    # explicit positions key the stream the same way
    assert same_bytes(merge(base, [base + delta], drop_rate=[0.5], positions=[1]), moved)


# ------------------------------------------------------------ bad input ----


def test_seed_none_is_refused():
    base = torch.zeros(3)
    with pytest.raises(ValueError, match="seed"):
        circuit_merge(base, [base + 1], CircuitParams())
    with pytest.raises(ValueError, match="seed"):
        circuit_merge(base, [base + 1], CircuitParams(seed=None, base_droprate=0.0))


def test_no_variants_is_refused():
    with pytest.raises(ValueError):
        merge(torch.zeros(3), [])


LABELS = ["base-model", "variant-alpha", "variant-beta"]


@pytest.mark.parametrize("bad_shape", [(3, 5), (4, 3), (12,), (3, 4, 1)])
@pytest.mark.parametrize("which", [1, 2])
def test_mismatched_shapes_name_tensor_and_model(bad_shape, which):
    base = torch.zeros(3, 4)
    variants = [torch.ones(3, 4), torch.ones(3, 4)]
    variants[which - 1] = torch.ones(bad_shape)
    with pytest.raises(ValueError) as info:
        merge(base, variants, name="model.layers.7.self_attn.q_proj.weight", labels=LABELS)
    message = str(info.value)
    assert "model.layers.7.self_attn.q_proj.weight" in message
    assert LABELS[which] in message
    assert LABELS[3 - which] not in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1, 2])  # 0 = base
@pytest.mark.parametrize("config", [dict(), dict(base_droprate=0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_inputs_name_tensor_and_model(bad, where, config, dtype):
    tensors = [torch.zeros(10, 10, dtype=dtype), torch.ones(10, 10, dtype=dtype),
               torch.full((10, 10), -1.0, dtype=dtype)]
    tensors[where][9, 9] = bad  # in the last chunk
    with pytest.raises(ValueError) as info:
        merge(tensors[0], tensors[1:], name="lm_head.weight", labels=LABELS, chunk_size=7, **config)
    message = str(info.value)
    assert "lm_head.weight" in message
    assert LABELS[where] in message
    assert all(LABELS[k] not in message for k in range(3) if k != where)


def test_non_finite_without_labels_still_names_the_tensor():
    base = torch.zeros(5)
    bad = torch.ones(5)
    bad[2] = math.nan
    with pytest.raises(ValueError, match="embed_tokens"):
        merge(base, [base + 1, bad], name="embed_tokens")


@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.5), dict(base_droprate=1.0), dict(epsilon=-0.1),
     dict(meaningful_change_threshold=-1.0), dict(temperature="warm")],
)
def test_bad_parameters_refused_before_merging(params):
    name = next(iter(params))
    with pytest.raises(ValueError, match=name):
        merge(torch.zeros(3), [torch.ones(3)], **params)
