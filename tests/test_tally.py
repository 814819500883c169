"""The kernel's counting: ``circuit_merge_with_stats``.

Checked against the spec three ways:

* constructed cases with exact expectations (disjoint variants, opposite signs,
  agreeing deltas under both averaging rules, the threshold);
* a plain float64 reference of the merge rule with explicit per-variant weights,
  fed the kernel's own pruned deltas (obtained from one-variant merges onto a
  zero base, which prune identically), on random inputs with MAGPRUNE: every
  count must match exactly, shares to float32 rounding, and the weighted
  deltas must rebuild the merged delta;
* invariants: counting never changes the merged bytes; counts do not depend on
  the chunk size or on the accumulation path; reports built from them pass
  :func:`circuit_merge_plugin.insight.report.check_report`.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import circuit_merge_plugin.core.kernel as kernel
from circuit_merge_plugin.core.exact import same_bytes
from circuit_merge_plugin.core.kernel import circuit_merge, circuit_merge_with_stats, drop_rates
from circuit_merge_plugin.core.params import CircuitParams
from circuit_merge_plugin.insight.report import check_report
from circuit_merge_plugin.core.tally import TensorStats

#: No MAGPRUNE: zero drop rates for every variant (priority still orders them).
def _unpruned(count: int) -> dict:
    return dict(drop_rate=[0.0] * count)


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread, implementation):
    yield


def _report(stats: TensorStats, name: str = "w") -> dict:
    return {
        "format": "circuit-merge-report",
        "version": 1,
        "variants": [f"v{i + 1}" for i in range(len(stats.variants))],
        "parameters": {},
        "tensors": {name: stats.as_dict()},
    }


def _rows(stats: TensorStats):
    return [row.as_dict() for row in stats.variants]


# ---------------------------------------------------------------- constructed cases


def test_disjoint_variants_contribute_only_their_own_blocks():
    base = torch.zeros(4, 100)
    variants = []
    for block in range(3):
        v = base.clone()
        v[block] = float(block + 1)  # block i changed by variant i only, by i + 1
        variants.append(v)
    merged, stats = circuit_merge_with_stats(base, variants, CircuitParams(seed=1), **_unpruned(3))
    assert torch.equal(merged[:3], torch.tensor([1.0, 2.0, 3.0]).repeat_interleave(100).view(3, 100))
    magnitude = [100 * 1.0, 100 * 2.0, 100 * 3.0]
    for index, row in enumerate(stats.variants):
        assert (row.changed, row.kept, row.dropped) == (100, 100, 0)
        assert (row.taken, row.overwrote, row.averaged, row.overwritten) == (100, 0, 0, 0)
        assert row.final_share == pytest.approx(magnitude[index] / sum(magnitude), rel=1e-6)
    assert stats.numel == 400
    assert check_report(_report(stats)) == []


def test_opposite_signs_overwrite_exactly_the_higher_prioritys_kept_elements():
    base = torch.zeros(50_000)
    high, low = base + 0.5, base - 0.25  # V1 (highest priority) disagrees everywhere
    params = CircuitParams(seed=3)  # V1 is pruned by MAGPRUNE; V2 is not (override 0)
    merged, stats = circuit_merge_with_stats(base, [high, low], params, drop_rate=[None, 0.0])
    v1, v2 = stats.variants
    assert 0 < v1.kept < v1.changed == 50_000
    assert v1.overwrote == v1.kept and v1.taken == v1.averaged == 0
    assert (v2.kept, v2.taken, v2.overwrote, v2.averaged) == (50_000, 50_000, 0, 0)
    assert v2.overwritten == v1.kept and v1.overwritten == 0
    # where V1 won the result is V1's rescaled delta, elsewhere V2's delta
    won = int((merged > 0).sum())
    assert won == v1.kept
    mass_v1 = float(merged[merged > 0].abs().double().sum())
    mass_v2 = float(merged[merged < 0].abs().double().sum())
    assert v1.final_share == pytest.approx(mass_v1 / (mass_v1 + mass_v2), rel=1e-6)
    assert check_report(_report(stats)) == []


def test_agreeing_deltas_pairwise_average_shares():
    base = torch.zeros(1000)
    merged, stats = circuit_merge_with_stats(
        base, [base + 2.0, base + 1.0], CircuitParams(seed=1), **_unpruned(2)
    )
    assert torch.equal(merged, torch.full((1000,), 1.5))
    v1, v2 = _rows(stats)
    assert (v2["taken"], v2["averaged"], v2["overwritten"]) == (1000, 0, 0)
    assert (v1["taken"], v1["averaged"], v1["overwrote"]) == (0, 1000, 0)
    # 1.5 = 0.5 * 2 (V1) + 0.5 * 1 (V2)
    assert v1["final_share"] == pytest.approx(2 / 3, rel=1e-6)
    assert v2["final_share"] == pytest.approx(1 / 3, rel=1e-6)


def test_true_mean_weights_at_temperature_one():
    base = torch.zeros(999)
    variants = [base + 3.0, base + 2.0, base + 1.0]
    params = CircuitParams(seed=1, temperature=1.0)
    merged, stats = circuit_merge_with_stats(base, variants, params, **_unpruned(3))
    assert torch.allclose(merged, torch.full((999,), 2.0))  # the true mean
    shares = [row.final_share for row in stats.variants]
    assert shares == pytest.approx([3 / 6, 2 / 6, 1 / 6], rel=1e-6)
    assert [row.averaged for row in stats.variants] == [999, 999, 0]


def test_mixed_temperature_weights_rebuild_the_average():
    base = torch.zeros(10)
    t = 0.25
    params = CircuitParams(seed=1, temperature=t)
    merged, stats = circuit_merge_with_stats(
        base, [base + 4.0, base + 1.0, base + 2.0], params, **_unpruned(3)
    )
    # weights by the rule: V3 taken (1); V2 averaged at c=2: alpha=beta=1/2;
    # V1 averaged at c=3: alpha=(1-t)/2+2t/3, beta=(1-t)/2+t/3
    alpha, beta = (1 - t) / 2 + t * 2 / 3, (1 - t) / 2 + t / 3
    contributions = [beta * 4.0, alpha * 0.5 * 1.0, alpha * 0.5 * 2.0]
    assert float(merged[0]) == pytest.approx(sum(contributions), rel=1e-6)
    shares = [row.final_share for row in stats.variants]
    assert shares == pytest.approx([c / sum(contributions) for c in contributions], rel=1e-6)


def test_threshold_counts_only_meaningful_changes():
    base = torch.zeros(100)
    variant = base.clone()
    variant[:30] = 1e-3  # meaningful
    variant[30:60] = 1e-7  # below the default threshold 2e-6
    _, stats = circuit_merge_with_stats(base, [variant], CircuitParams(seed=1), **_unpruned(1))
    (row,) = stats.variants
    assert (row.changed, row.kept, row.taken, row.final_share) == (30, 30, 30, 1.0)


def test_a_merge_that_changes_nothing_has_zero_shares():
    base = torch.randn(100)
    _, stats = circuit_merge_with_stats(base, [base.clone(), base.clone()], CircuitParams(seed=1))
    assert all(row == type(row)() for row in stats.variants)
    assert check_report(_report(stats)) == []


def test_non_float_and_empty_tensors_count_nothing():
    params = CircuitParams(seed=1)
    ints = torch.arange(10)
    merged, stats = circuit_merge_with_stats(ints, [ints + 1, ints + 2], params)
    assert torch.equal(merged, ints)
    assert stats.numel == 10 and stats.drop_rates == tuple(drop_rates(2, 0.0, 0.5))
    assert all(row.changed == 0 and row.final_share == 0 for row in stats.variants)
    empty = torch.zeros(0, 4)
    merged, stats = circuit_merge_with_stats(empty, [empty, empty], params)
    assert merged.shape == (0, 4) and stats.numel == 0


# ---------------------------------------------------------------- against a reference


def _pruned_deltas(variants, params, rates, name):
    """Each variant's thresholded, MAGPRUNEd, rescaled delta from a zero base.

    A one-variant merge onto zeros with the same drop rate, position and name
    prunes exactly as the full merge does, and returns 0 + delta (kept) or 0.
    """
    zero = torch.zeros_like(variants[0])
    return [
        circuit_merge(zero, [v], params, drop_rate=[rate], name=name, positions=[position])
        for position, (v, rate) in enumerate(zip(variants, rates))
    ]


def _reference(deltas, temperature):
    """The merge rule in float64 with explicit weights; counts per variant."""
    n, size = len(deltas), deltas[0].numel()
    d = torch.stack([x.reshape(-1).double() for x in deltas])
    acc = torch.zeros(size, dtype=torch.float64)
    num = torch.zeros(size, dtype=torch.float64)
    weight = torch.zeros(n, size, dtype=torch.float64)
    alive = torch.zeros(n, size, dtype=torch.bool)
    counts = [dict() for _ in range(n)]
    for i in range(n - 1, -1, -1):  # lowest priority first
        kept = d[i] != 0
        empty = num == 0
        disagree = (acc > 0) != (d[i] > 0)
        take = kept & (empty | disagree)
        agree = kept & ~take
        c = num + 1
        alpha = (1 - temperature) / 2 + temperature * (c - 1) / c
        beta = (1 - temperature) / 2 + temperature / c
        weight[:, take] = 0
        alive[:, take] = False
        weight[:, agree] *= alpha[agree]
        weight[i, take] = 1
        weight[i, agree] = beta[agree]
        alive[i] = kept
        acc = torch.where(take, d[i], torch.where(agree, alpha * acc + beta * d[i], acc))
        num = torch.where(take, torch.ones_like(num), torch.where(agree, c, num))
        counts[i] = dict(
            kept=int(kept.sum()),
            taken=int((kept & empty).sum()),
            overwrote=int((take & ~empty).sum()),
            averaged=int(agree.sum()),
        )
    mass = (weight * d.abs()).sum(1)
    for i in range(n):
        counts[i]["overwritten"] = counts[i]["kept"] - int(alive[i].sum())
        counts[i]["final_share"] = float(mass[i] / mass.sum()) if mass.sum() > 0 else 0.0
    return counts, (weight * d).sum(0)


@pytest.mark.parametrize(
    "temperature,params",
    list(itertools.product(
        [0.0, 0.5, 1.0],
        [dict(), dict(base_droprate=0.2, epsilon=0.3), dict(rescale=False),
         dict(meaningful_change_threshold=0.02)],
    )),
)
def test_counts_match_a_float64_reference(temperature, params):
    g = torch.Generator().manual_seed(11)
    shape = (37, 53)
    base = torch.randn(shape, generator=g)
    # sparse, mixed-sign deltas so that every outcome occurs
    variants = [
        base + torch.randn(shape, generator=g) * 0.05 * (torch.rand(shape, generator=g) < 0.7)
        for _ in range(4)
    ]
    p = CircuitParams(seed=9, temperature=temperature, **params)
    merged, stats = circuit_merge_with_stats(base, variants, p, name="t", chunk_size=256)
    rates = drop_rates(4, p.temperature, p.base_droprate)
    # the same deltas on a zero base: the full merge of them must agree too
    zero = torch.zeros(shape)
    deltas = _pruned_deltas([v - base for v in variants], p, rates, "t")
    _, stats_zero = circuit_merge_with_stats(
        zero, [v - base for v in variants], p, name="t", chunk_size=256
    )
    for real, shifted in zip(stats.variants, stats_zero.variants):  # same deltas
        assert real.as_dict() | {"final_share": 0} == shifted.as_dict() | {"final_share": 0}
    expected, rebuilt = _reference(deltas, temperature)
    for index, (row, want) in enumerate(zip(stats_zero.variants, expected)):
        got = row.as_dict()
        for key in ("kept", "taken", "overwrote", "averaged", "overwritten"):
            assert got[key] == want[key], (index, key)
        assert got["final_share"] == pytest.approx(want["final_share"], rel=1e-5, abs=1e-7)
        assert got["changed"] == int(((variants[index] - base).abs() >= p.meaningful_change_threshold).sum())
    merged_zero = circuit_merge(zero, [v - base for v in variants], p, name="t")
    assert torch.allclose(rebuilt.float(), merged_zero.reshape(-1), rtol=1e-5, atol=1e-7)
    assert any(row.overwrote for row in stats_zero.variants)
    assert any(row.averaged for row in stats_zero.variants)
    assert any(row.overwritten for row in stats_zero.variants)
    assert check_report(_report(stats)) == []


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0])
def test_counting_never_changes_the_merged_bytes(dtype, temperature):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5000, generator=g)
    variants = [(base + torch.randn(5000, generator=g) * 0.01).to(dtype) for _ in range(3)]
    p = CircuitParams(seed=4, temperature=temperature)
    plain = circuit_merge(base.to(dtype), variants, p, name="x", chunk_size=999)
    counted, _ = circuit_merge_with_stats(base.to(dtype), variants, p, name="x", chunk_size=999)
    assert same_bytes(plain, counted)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_counts_do_not_depend_on_chunking_or_the_accumulation_path(monkeypatch, temperature):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3001, generator=g)
    variants = [base + torch.randn(3001, generator=g) * 0.02 for _ in range(5)]
    p = CircuitParams(seed=8, temperature=temperature)
    results = [
        circuit_merge_with_stats(base, variants, p, name="x", chunk_size=size)[1]
        for size in (7, 333, 4096, 1 << 20)
    ]
    monkeypatch.setattr(kernel, "_FAST_MAGNITUDE_LIMIT", 0.0)  # general path at T = 0 too
    results.append(circuit_merge_with_stats(base, variants, p, name="x", chunk_size=777)[1])
    first = results[0]
    for other in results[1:]:  # shares too: the attributed mass is summed exactly
        assert other == first
    assert sum(row.final_share for row in first.variants) == pytest.approx(1.0, abs=1e-12)
    assert first.drop_rates == tuple(drop_rates(5, temperature, 0.5))


def test_positions_and_overrides_reach_the_counts():
    base = torch.zeros(20_000)
    variants = [base + 1.0, base + 1.0]
    p = CircuitParams(seed=1)
    _, stats = circuit_merge_with_stats(base, variants, p, drop_rate=[0.0, 0.9])
    assert stats.drop_rates == (0.0, 0.9)
    assert stats.variants[0].kept == 20_000 and stats.variants[0].dropped == 0
    assert 0.85 * 20_000 < stats.variants[1].dropped < 0.95 * 20_000
    _, moved = circuit_merge_with_stats(base, variants, p, drop_rate=[0.0, 0.9], positions=[0, 5])
    assert moved.variants[1].kept != stats.variants[1].kept  # another random stream
