"""The counter-based uniform generator.

Uniforms are a pure function of the stream key (seed, tensor name, the variant's
listing position) and the element's flat index: float32 values in [0, 1), on
the 2**-24 grid, with the same values whatever the chunking. Quality checks use
2**18 draws and bounds of about 6 standard deviations (or a tail probability
below 1e-8), so a correct generator never fails them while a biased, correlated
or periodic one does.
"""

from __future__ import annotations

import math

import pytest
import torch

from circuit_merge_plugin.core.rng import stream_key, uniform

N = 1 << 18
SIX_SIGMA_CORR = 6.0 / math.sqrt(N)  # sd of a sample correlation of N iid pairs ~ 1/sqrt(N)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def draws(seed=1234, name="model.layers.0.mlp.up_proj.weight", position=0, start=0, count=N):
    return uniform(stream_key(seed, name, position), start, count, "cpu")


@pytest.fixture(scope="module")
def sample():
    return draws().double()


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    return float((x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum()))


# ---------------------------------------------------------------- keys ----


def test_stream_key_is_deterministic_and_distinct():
    key = stream_key(7, "a.weight", 0)
    assert stream_key(7, "a.weight", 0) == key
    others = {
        stream_key(8, "a.weight", 0),
        stream_key(7, "b.weight", 0),
        stream_key(7, "a.weight", 1),
        stream_key(-7, "a.weight", 0),
        stream_key(7, "a.weigh", 0),
        stream_key(7, "", 0),
    }
    assert key not in others
    assert len(others) == 6


def test_stream_key_does_not_confuse_name_and_position():
    # A naive "f'{name}{position}'" key would make these equal.
    assert stream_key(1, "w1", 0) != stream_key(1, "w", 10)
    assert stream_key(12, "w", 3) != stream_key(1, "2w", 3)


# ------------------------------------------------------------- values ----


def test_dtype_shape_range_and_grid(sample):
    u = draws()
    assert u.dtype == torch.float32
    assert u.shape == (N,)
    assert float(u.min()) >= 0.0
    assert float(u.max()) < 1.0
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.floor()), "values must be multiples of 2**-24"
    # The grid is actually used, not a coarser one: many distinct values.
    assert torch.unique(u).numel() > N * 0.95


def test_zero_count_and_device_argument():
    key = stream_key(1, "w", 0)
    assert uniform(key, 5, 0).numel() == 0
    assert torch.equal(uniform(key, 0, 100, torch.device("cpu")), uniform(key, 0, 100, "cpu"))


def test_out_buffer_gives_same_values():
    key = stream_key(3, "w", 2)
    buffer = torch.full((1000,), -1.0)
    got = uniform(key, 17, 1000, "cpu", out=buffer)
    assert torch.equal(buffer, uniform(key, 17, 1000, "cpu"))
    assert torch.equal(got, buffer)


def test_same_key_same_values_and_global_rng_ignored():
    torch.manual_seed(0)
    first = draws(count=4096)
    torch.manual_seed(999)
    torch.rand(10)
    assert torch.equal(first, draws(count=4096))


@pytest.mark.parametrize(
    "change",
    [dict(seed=1235), dict(name="model.layers.1.mlp.up_proj.weight"), dict(position=1)],
)
def test_different_seed_name_or_position_gives_a_different_stream(change):
    a = draws(count=4096)
    b = draws(count=4096, **change)
    # Independent streams agree on a given element with probability 2**-24.
    assert int((a == b).sum()) <= 2


# ------------------------------------------------------------ chunking ----


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000, 4099])
def test_chunked_generation_equals_one_shot(chunk):
    key = stream_key(11, "x", 4)
    total = 5000 if chunk > 1 else 300
    whole = uniform(key, 0, total)
    parts = [uniform(key, s, min(chunk, total - s)) for s in range(0, total, chunk)]
    assert torch.equal(torch.cat(parts), whole)


def test_any_start_matches_one_shot():
    key = stream_key(5, "y", 0)
    whole = uniform(key, 0, 3000)
    for start, count in [(0, 1), (1, 2), (999, 1001), (2999, 1), (1234, 567)]:
        assert torch.equal(uniform(key, start, count), whole[start : start + count])


@pytest.mark.parametrize("boundary", [1 << 32, 1 << 33, 3 << 32])
def test_chunked_generation_across_the_32_bit_boundary(boundary):
    key = stream_key(42, "big.weight", 3)
    start = boundary - 37
    whole = uniform(key, start, 100)
    # Chunks that end exactly at, straddle, and start after the boundary.
    for chunk in [1, 7, 37, 50]:
        parts = [uniform(key, s, min(chunk, start + 100 - s)) for s in range(start, start + 100, chunk)]
        assert torch.equal(torch.cat(parts), whole), chunk
    singles = torch.cat([uniform(key, i, 1) for i in range(start, start + 100)])
    assert torch.equal(singles, whole)
    assert float(whole.min()) >= 0.0 and float(whole.max()) < 1.0
    scaled = whole.double() * 2**24
    assert torch.equal(scaled, scaled.floor())


def test_high_index_bits_reach_the_output():
    # Element i and element i + 2**32 (and i + 2**33) are different elements.
    key = stream_key(42, "big.weight", 0)
    low = uniform(key, 0, 4096)
    for offset in [1 << 32, 1 << 33, (1 << 40) + (1 << 32)]:
        high = uniform(key, offset, 4096)
        assert int((low == high).sum()) <= 2, offset
    # and the high stream is itself well spread
    high = uniform(key, 1 << 32, 1 << 16).double()
    assert abs(float(high.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / (1 << 16))


# ------------------------------------------------------------- quality ----


def test_mean_and_variance(sample):
    # mean of N U(0,1): sd = sqrt(1/12/N); variance estimate: sd ~ sqrt(1/180/N)
    assert abs(float(sample.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / N)
    assert abs(float(sample.var()) - 1 / 12) < 6 * math.sqrt(1 / 180 / N)


def test_chi_square_uniformity(sample):
    bins = 256
    counts = torch.bincount((sample * bins).long(), minlength=bins).double()
    expected = N / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = bins - 1
    # chi2 with df=255 has mean 255 and sd sqrt(510) ~ 22.6: accept mean +- 6 sd
    # (a too-regular sequence is as suspicious as a too-irregular one).
    assert df - 6 * math.sqrt(2 * df) < chi2 < df + 6 * math.sqrt(2 * df), chi2


def test_kolmogorov_smirnov_uniformity(sample):
    sorted_u, _ = torch.sort(sample)
    n = sorted_u.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d_plus = float((ranks / n - sorted_u).max())
    d_minus = float((sorted_u - (ranks - 1) / n).max())
    d = max(d_plus, d_minus)
    # P(sqrt(n) * D > 2.6) ~ 2 exp(-2 * 2.6**2) ~ 2.7e-6
    assert math.sqrt(n) * d < 2.6, d


def test_every_bit_is_balanced():
    ints = (draws().double() * 2**24).long()
    for bit in range(24):
        ones = float(((ints >> bit) & 1).double().mean())
        # Binomial(N, 1/2) fraction: sd = 0.5/sqrt(N); bound 6 sd
        assert abs(ones - 0.5) < 6 * 0.5 / math.sqrt(N), (bit, ones)


@pytest.mark.parametrize("lag", [1, 2, 3, 8, 256, 4096])
def test_no_correlation_between_nearby_elements(sample, lag):
    r = correlation(sample[:-lag], sample[lag:])
    assert abs(r) < SIX_SIGMA_CORR, (lag, r)


def test_adjacent_pairs_fill_the_unit_square(sample):
    # 2-D chi-square on (u[2k], u[2k+1]) with 16x16 cells: df=255, bound 6 sd.
    pairs = sample.reshape(-1, 2)
    cells = (pairs[:, 0] * 16).long() * 16 + (pairs[:, 1] * 16).long()
    counts = torch.bincount(cells, minlength=256).double()
    expected = pairs.shape[0] / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert 255 - 6 * math.sqrt(510) < chi2 < 255 + 6 * math.sqrt(510), chi2


def test_adjacent_low_bits_not_correlated():
    # Low bits of consecutive values: xor of the lowest bit of neighbours must
    # be a fair coin (catches counter-like low-bit patterns).
    ints = (draws().double() * 2**24).long()
    for bit in [0, 1, 2]:
        b = (ints >> bit) & 1
        same = float((b[1:] == b[:-1]).double().mean())
        assert abs(same - 0.5) < 6 * 0.5 / math.sqrt(N - 1), (bit, same)


def test_no_correlation_between_variant_streams(sample):
    for position in [1, 2, 7]:
        other = draws(position=position).double()
        assert abs(correlation(sample, other)) < SIX_SIGMA_CORR, position
        # and nearby elements across streams
        assert abs(correlation(sample[:-1], other[1:])) < SIX_SIGMA_CORR, position
        # joint distribution of the two streams is uniform on the square
        cells = (sample * 16).long() * 16 + (other * 16).long()
        counts = torch.bincount(cells, minlength=256).double()
        expected = N / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert 255 - 6 * math.sqrt(510) < chi2 < 255 + 6 * math.sqrt(510), (position, chi2)


def test_no_correlation_between_seeds_and_tensor_names(sample):
    for kwargs in [dict(seed=1235), dict(seed=0), dict(name="model.layers.0.mlp.up_proj.bias")]:
        other = draws(**kwargs).double()
        assert abs(correlation(sample, other)) < SIX_SIGMA_CORR, kwargs


def test_seed_zero_and_empty_name_are_fine():
    u = uniform(stream_key(0, "", 0), 0, 1 << 16).double()
    assert abs(float(u.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / (1 << 16))
    assert abs(correlation(u[:-1], u[1:])) < 6 / math.sqrt(1 << 16)
