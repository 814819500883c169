"""The fused CPU kernel equals the torch kernel, bit for bit, and is chosen as documented.

* A hypothesis property: on random inputs and parameters (every input dtype,
  all-zero deltas, equal magnitudes (mx == mn), drop probabilities clamped at 0
  and 1, magnitudes above 2**100 (the general path at T = 0), threshold 0, one
  variant, 0-dim and empty tensors, lambda != 1, several chunk sizes and 1 or 2
  threads) both implementations return the same bytes and the same stats.
* The pieces the torch kernel gets from torch: float32 -> bfloat16 / float16
  rounding (subnormals, ties, overflow) and 16-bit -> float32 decoding.
* The generator past 2**31 and 2**32 elements (index arithmetic in int64 and the
  per-block keys), called directly.
* Selection: CIRCUIT_MERGE_KERNEL, kernel_implementation(), the log line.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuit_merge_plugin.core.kernel as kernel
from circuit_merge_plugin.core import fused
from circuit_merge_plugin.core.params import CircuitParams
from circuit_merge_plugin.core.rng import _block_key, stream_key, uniform

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(), (0,), (1,), (5,), (3, 7), (2, 0, 3), (257,), (33, 31)]


from circuit_merge_plugin.core.exact import tensor_bytes as _bytes


def _both(monkeypatch, base, variants, params, threads, **kwargs):
    results = {}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for name in ("torch", "fused"):
            monkeypatch.setenv(kernel.KERNEL_ENV, name)
            merged, stats = kernel.circuit_merge_with_stats(base, variants, params, **kwargs)
            plain = kernel.circuit_merge(base, variants, params, **kwargs)
            assert _bytes(plain) == _bytes(merged)
            results[name] = (merged, stats)
    finally:
        torch.set_num_threads(before)
    return results


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    count = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["normal", "sparse", "zero", "equal", "ints", "huge", "tiny"]))
    if kind == "huge" and dtype == torch.float16:
        kind = "normal"  # float16 tops out at 65504
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    variants = []
    for _ in range(count):
        if kind == "zero":
            delta = torch.zeros(shape)
        elif kind == "equal":
            delta = 0.25 * torch.sign(torch.randn(shape, generator=g))
        elif kind == "ints":
            delta = torch.randint(-2, 3, shape, generator=g).float()
        elif kind == "huge":
            delta = torch.randn(shape, generator=g) * 2.0**101
        elif kind == "tiny":
            delta = torch.randn(shape, generator=g) * 1e-6
        else:
            delta = torch.randn(shape, generator=g) * 0.05
            if kind == "sparse":
                delta = delta * (torch.rand(shape, generator=g) < 0.4)
        variants.append((base + delta).to(dtype))
    params = dict(
        seed=draw(st.integers(0, 2**40)),
        temperature=draw(st.sampled_from([0.0, 0.0, 0.3, 0.5, 1.0])),
        base_droprate=draw(st.sampled_from([0.0, 0.02, 0.5, 0.9])),
        epsilon=draw(st.sampled_from([0.0, 0.1, 0.5, 0.99])),
        meaningful_change_threshold=draw(st.sampled_from([0.0, 1e-5, 0.01, 0.1])),
        rescale=draw(st.booleans()),
        lambda_=draw(st.sampled_from([1.0, 1.0, 0.5, 1.7])),
    )
    overrides = None
    if draw(st.booleans()):
        overrides = [draw(st.sampled_from([None, 0.0, 0.3, 0.95])) for _ in range(count)]
    kwargs = dict(
        drop_rate=overrides,
        name=draw(st.sampled_from(["w", "model.layers.0.mlp.up_proj.weight"])),
        chunk_size=draw(st.sampled_from([1, 3, 64, 1000, 1 << 15])),
    )
    threads = draw(st.sampled_from([1, 2]))
    return base.to(dtype), variants, CircuitParams(**params), kwargs, threads


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_fused_equals_torch_bit_for_bit(monkeypatch, case):
    base, variants, params, kwargs, threads = case
    results = _both(monkeypatch, base, variants, params, threads, **kwargs)
    (a, stats_a), (b, stats_b) = results["torch"], results["fused"]
    assert a.dtype == b.dtype == base.dtype and a.shape == b.shape == base.shape
    assert _bytes(a) == _bytes(b)
    assert stats_a == stats_b


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_fused_equals_torch_on_a_large_tensor_split_over_threads(monkeypatch, temperature):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300_001, generator=g)
    variants = [base + torch.randn(300_001, generator=g) * 0.01 for _ in range(3)]
    params = CircuitParams(seed=2, temperature=temperature)
    results = _both(monkeypatch, base.bfloat16(), [v.bfloat16() for v in variants], params, 2,
                    name="big")
    assert _bytes(results["torch"][0]) == _bytes(results["fused"][0])
    assert results["torch"][1] == results["fused"][1]


def test_mixed_input_dtypes_fall_back_to_the_torch_kernel(monkeypatch):
    base = torch.randn(100)
    variants = [(base + 0.1).bfloat16(), base + 0.2]
    assert not fused.supports(base, variants)
    results = _both(monkeypatch, base, variants, CircuitParams(seed=1), 1)
    assert _bytes(results["torch"][0]) == _bytes(results["fused"][0])


# ----------------------------------------------------------- conversions ----


def _special_floats() -> torch.Tensor:
    """Values at and around every rounding boundary of bfloat16 and float16."""
    bits = []
    for exponent in range(0, 256, 1):
        for mantissa in (0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000,
                         0x8001, 0x17FFF, 0x18000, 0x7FFFFF, 0x7FF000, 0x7FE000):
            bits.append((exponent << 23) | mantissa)
    g = torch.Generator().manual_seed(0)
    bits += torch.randint(0, 2**31 - 1, (200_000,), generator=g).tolist()
    positive = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
    return torch.cat([positive, positive | torch.tensor(-(2**31), dtype=torch.int32)]).view(
        torch.float32)


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, fused.KIND_BF16),
                                        (torch.float16, fused.KIND_F16)])
def test_float32_rounding_to_16_bits_matches_torch(dtype, kind):
    values = _special_floats()
    finite = torch.isfinite(values)
    values = values[finite]  # NaN payloads never occur in a merge of finite inputs
    want = values.to(dtype).view(torch.int16).numpy().view(np.uint16)
    got = fused.convert_to_16(values.numpy(), kind)
    mismatch = np.nonzero(got != want)[0]
    assert mismatch.size == 0, [(float(values[i]), hex(got[i]), hex(want[i])) for i in mismatch[:5]]


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, fused.KIND_BF16),
                                        (torch.float16, fused.KIND_F16)])
def test_16_bit_decoding_matches_torch_for_every_pattern(dtype, kind):
    raw = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    want = raw.view(dtype).float()
    got = torch.from_numpy(fused.convert_from_16(raw.numpy().view(np.uint16), kind))
    finite = torch.isfinite(want)
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got) & (got > 0), torch.isinf(want) & (want > 0))


# ------------------------------------------------------- index arithmetic ----


@pytest.mark.parametrize("start", [2**31 - 5, 2**32 - 7, 3 * 2**32 - 2, 2**40 + 11])
def test_generator_past_2_31_and_2_32_elements(start):
    key = stream_key(123, "model.embed_tokens.weight", 2)
    blocks = (start + 64) // 2**32 + 1
    table = np.array([_block_key(key, block) for block in range(blocks)], dtype=np.uint64)
    got = fused.uniform_at(table, start, 64)
    want = uniform(key, start, 64).numpy()
    assert got.tobytes() == want.tobytes()


def test_stream_keys_cover_every_block():
    key = stream_key(1, "w", 0)
    table = fused._stream_keys([key], 2**33 + 1)
    assert table.shape == (1, 3, 2)
    assert [tuple(int(x) for x in row) for row in table[0]] == [
        _block_key(key, 0), _block_key(key, 1), _block_key(key, 2)]


# ------------------------------------------------------------- selection ----


def test_selection_by_environment_variable(monkeypatch):
    monkeypatch.delenv(kernel.KERNEL_ENV, raising=False)
    assert kernel.kernel_implementation("cpu") == "fused"
    assert kernel.kernel_implementation(torch.device("cpu")) == "fused"
    assert kernel.kernel_implementation("cuda") == "torch"
    assert kernel.kernel_implementation("meta") == "torch"
    for value, want in [("auto", "fused"), ("torch", "torch"), ("fused", "fused"),
                        (" Torch ", "torch"), ("", "fused")]:
        monkeypatch.setenv(kernel.KERNEL_ENV, value)
        assert kernel.kernel_implementation("cpu") == want, value
    monkeypatch.setenv(kernel.KERNEL_ENV, "fused")
    assert kernel.kernel_implementation("cuda") == "torch"  # fused is CPU only


def test_bad_environment_value_is_a_one_line_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(kernel.KERNEL_ENV, "numba")
    with pytest.raises(ValueError) as info:
        kernel.circuit_merge(torch.zeros(3), [torch.ones(3)], CircuitParams(seed=1))
    message = str(info.value)
    assert kernel.KERNEL_ENV in message and "'numba'" in message and "\n" not in message


def test_fused_required_but_unavailable_is_an_error(monkeypatch):
    monkeypatch.setenv(kernel.KERNEL_ENV, "fused")
    monkeypatch.setattr(kernel, "_FUSED_STATE", {"module": None, "error": "ImportError: x"})
    with pytest.raises(RuntimeError, match="CIRCUIT_MERGE_KERNEL=fused"):
        kernel.kernel_implementation("cpu")
    monkeypatch.setenv(kernel.KERNEL_ENV, "auto")  # auto falls back to torch
    assert kernel.kernel_implementation("cpu") == "torch"


def test_the_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(kernel, "_LOGGED", set())
    monkeypatch.delenv(kernel.KERNEL_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="circuit_merge_plugin"):
        for _ in range(3):
            kernel.circuit_merge(torch.zeros(3), [torch.ones(3)], CircuitParams(seed=1))
    lines = [r.getMessage() for r in caplog.records if r.name == "circuit_merge_plugin"]
    assert lines == ["Circuit-Merge kernel on cpu tensors: fused"]


def test_numba_is_imported_only_when_the_fused_kernel_is_first_used():
    import subprocess
    import sys

    code = (
        "import sys, circuit_merge_plugin\n"
        "assert 'numba' not in sys.modules and 'torch' not in sys.modules\n"
        "import torch\n"
        "from circuit_merge_plugin.core import kernel\n"
        "from circuit_merge_plugin.core.params import CircuitParams\n"
        "assert 'numba' not in sys.modules\n"
        "kernel.circuit_merge(torch.zeros(3), [torch.ones(3)], CircuitParams(seed=1))\n"
        "assert 'numba' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
