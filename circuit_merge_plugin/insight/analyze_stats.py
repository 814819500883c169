"""Streaming per-tensor statistics of ``circuit-merge analyze``.

The inputs are checked from their headers (:mod:`circuit_merge_plugin.io.inputs`),
then every floating tensor of BASE and the variants is read in row blocks through
``safetensors.safe_open`` and reduced to sums per layer group (:class:`_Stats`)
and, for up to :data:`MAX_EXACT` variants, to per-variant histograms of which
other variants disagree in sign (:class:`_Histograms`), from which
:mod:`.orders` computes the overwritten mass of any priority order. Memory stays
O(chunk x variants). The statistics are defined in :mod:`.analyze`'s docs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from circuit_merge_plugin.errors import Refused
from circuit_merge_plugin.insight.render import layer_group

#: Elements per chunk times (variants + 1): a chunk holds CHUNK_BUDGET // (n + 1)
#: elements of the base and of each of the n variants. The temporaries take
#: about 45 n + 70 bytes per chunk element, so about 100 MB whatever the
#: number of variants or the tensor sizes.
CHUNK_BUDGET = 1 << 21
#: Overwritten mass is exact (disagreement-set histograms of 2**n bins) up to
#: this many variants, a pairwise upper bound beyond.
MAX_EXACT = 16

# ---------------------------------------------------------------- inputs


class Inputs:
    """Validated model directories and the floating tensors to compare."""

    def __init__(self, base, variants, names: List[str], skipped: List[str]):
        self.base = base
        self.variants = variants
        self.names = names
        self.skipped = skipped


def open_inputs(base: str, variants: Sequence[str]) -> Inputs:
    """Check directories and headers (nothing read yet); Refused naming what is wrong."""
    from circuit_merge_plugin.io.inputs import check_compatible, inspect_directory

    if not variants:
        raise Refused("give BASE and at least one VARIANT")
    models = []
    for index, given in enumerate([base, *variants]):
        role = "base model" if index == 0 else f"variant {index}"
        try:
            model = inspect_directory(str(given), role, allow_pickle=True)
        except ValueError as error:
            raise Refused(str(error)) from None
        if model.pickled:
            raise Refused(
                f"{role} {given}: only pickled checkpoints ({model.pickles[0].name}); "
                "analyze reads safetensors: convert it first"
            )
        models.append(model)
    base_model, variant_models = models[0], models[1:]
    for model in variant_models:
        missing = sorted(set(base_model.tensors) - set(model.tensors))
        if missing:
            raise Refused(
                f"tensor {missing[0]!r} is missing from {model.role} {model.given}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = sorted(set(model.tensors) - set(base_model.tensors))
        if extra:
            raise Refused(
                f"tensor {extra[0]!r} of {model.role} {model.given} is not in the "
                f"base model {base_model.given}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
    try:
        check_compatible(base_model, variant_models)
    except ValueError as error:
        raise Refused(str(error)) from None
    names, skipped = [], []
    for name, info in base_model.tensors.items():
        (names if info.is_float else skipped).append(name)
    # Read in the base's file order, for locality.
    names.sort(key=lambda n: (str(base_model.tensors[n].file), base_model.tensors[n].begin))
    return Inputs(base_model, variant_models, names, sorted(skipped))


class _Reader:
    """Row blocks of tensors through cached ``safe_open`` handles (memory-mapped)."""

    def __init__(self):
        self._handles = {}

    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
        return handle

    def read(self, header, block: tuple):
        """The part of a tensor selected by ``block`` (a tuple of slices; () = all)."""
        handle = self._handle(header.file)
        if not block:
            return handle.get_tensor(header.name)
        return handle.get_slice(header.name)[block]

    def close(self):
        self._handles.clear()


# ---------------------------------------------------------------- statistics


class _Stats:
    """Sums for one group of tensors (float64 torch tensors, n variants)."""

    def __init__(self, count: int):
        import torch

        f64 = dict(dtype=torch.float64)
        self.n = count
        self.tensors = 0
        self.numel = 0
        self.changed = torch.zeros(count, **f64)
        self.positive = torch.zeros(count, **f64)
        self.negative = torch.zeros(count, **f64)
        self.abs_sum = torch.zeros(count, **f64)
        self.max_abs = torch.zeros(count, **f64)
        self.overlap = torch.zeros(count, count, **f64)
        self.agreeing = torch.zeros(count, count, **f64)
        self.conflicts = torch.zeros(count, count, **f64)
        #: mass[i, j]: sum of |d_i| where i and j changed with opposite signs
        self.mass = torch.zeros(count, count, **f64)
        #: absdiff[i, j]: sum of |d_i - d_j| where both changed
        self.absdiff = torch.zeros(count, count, **f64)

    def add(self, other: "_Stats") -> None:
        import torch

        self.tensors += other.tensors
        self.numel += other.numel
        for name in ("changed", "positive", "negative", "abs_sum", "overlap",
                     "agreeing", "conflicts", "mass", "absdiff"):
            getattr(self, name).add_(getattr(other, name))
        torch.maximum(self.max_abs, other.max_abs, out=self.max_abs)


class _Histograms:
    """Per variant j: |d_j| mass and element count by the set of variants that
    changed the same element with the opposite sign (a bit mask, 2**n bins)."""

    def __init__(self, count: int):
        import torch

        self.n = count
        self.weights = torch.tensor([[float(1 << k) for k in range(count)]], dtype=torch.float64)
        # one spare bin at the end collects the elements the variant left unchanged
        self.mass = torch.zeros(count, (1 << count) + 1, dtype=torch.float64)
        self.elements = torch.zeros(count, (1 << count) + 1, dtype=torch.float64)


#: Below this many products a broadcast beats a BLAS call, whose thread
#: start-up costs milliseconds on a busy machine (norm vectors, biases).
_SMALL_GRAM = 1 << 20


def _gram(x, y):
    """``x @ y.T`` (float64, [n, size] each): sums over elements of products."""
    n, size = x.shape
    if n * n * size <= _SMALL_GRAM:
        return (x[:, None, :] * y[None, :, :]).sum(-1)
    return x @ y.T


def _chunk_stats(stats: _Stats, hist: Optional[_Histograms], base, variants,
                 threshold: float, name: str, labels: Sequence[str]) -> None:
    """Add one chunk (base + one same-sized chunk per variant) to ``stats``."""
    import torch

    b = base.reshape(-1).to(torch.float32)
    size = b.numel()
    n = len(variants)
    exact = (torch.float32, torch.bfloat16, torch.float16)
    delta = torch.empty((n, size), dtype=torch.float32)
    for k, v in enumerate(variants):
        v = v.reshape(-1)
        if v.dtype not in exact:
            v = v.to(torch.float32)  # as the kernel: round to float32, then subtract
        torch.sub(v, b, out=delta[k])
    positive = delta > 0
    negative = delta < 0
    magnitude = delta.abs_()
    peak = magnitude.amax(1) if size else torch.zeros(n)
    if not bool(torch.isfinite(peak).all()):
        _raise_non_finite(base, variants, name, labels)
    # changed: |d| >= threshold and d != 0 (a threshold of 0 still skips zeros)
    changed = magnitude >= threshold if threshold > 0 else magnitude > 0
    positive &= changed
    negative &= changed
    del changed

    # One Gram matrix gives every pairwise sum: the rows of z are, per
    # variant, the positive and negative masks, |d| on each, and a row of ones.
    z = torch.empty((4 * n + 1, size), dtype=torch.float64)
    pos, neg, a_pos, a_neg = (z[i * n:(i + 1) * n] for i in range(4))
    pos.copy_(positive)
    neg.copy_(negative)
    a_pos.copy_(magnitude).mul_(pos)
    a_neg.copy_(magnitude).mul_(neg)
    z[4 * n].fill_(1.0)
    gram = _gram(z, z)
    blocks = [[gram[r * n:(r + 1) * n, q * n:(q + 1) * n] for q in range(4)] for r in range(4)]
    sums = gram[4 * n]
    pp, pm, mp, mm = blocks[0][0], blocks[0][1], blocks[1][0], blocks[1][1]
    abs_sum = sums[2 * n:3 * n] + sums[3 * n:4 * n]
    stats.positive += sums[:n]
    stats.negative += sums[n:2 * n]
    stats.changed += sums[:n] + sums[n:2 * n]
    stats.abs_sum += abs_sum
    peak = peak.double()
    torch.maximum(stats.max_abs, torch.where(peak >= threshold, peak, 0.0), out=stats.max_abs)
    stats.overlap += pp + pm + mp + mm
    stats.agreeing += pp + mm
    stats.conflicts += pm + mp
    # mass[i, j]: |d_i| where i is positive and j negative, or the reverse
    stats.mass += blocks[2][1] + blocks[3][0]
    if n > 1:
        # sum over both-changed |d_i - d_j| = sum over all |x_i - x_j| minus the
        # parts where only one changed (x = d where changed, else 0).
        on_both = blocks[2][0] + blocks[2][1] + blocks[3][0] + blocks[3][1]  # |d_i| where j changed
        x = a_pos - a_neg
        l1 = torch.cdist(x, x, p=1)
        stats.absdiff += (l1 - (abs_sum[:, None] - on_both) - (abs_sum[None, :] - on_both.T)).clamp_(min=0)
    if hist is not None:
        # bit k of an element's code: variant k changed it upwards (pos_code)
        # or downwards (neg_code); small integers, exact in float64
        codes = torch.matmul(hist.weights, z[:2 * n].reshape(2, n, size)).to(torch.int64)
        pos_code, neg_code = codes[0, 0], codes[1, 0]
        unchanged = torch.full((), 1 << n, dtype=torch.int64)  # a spare last bin
        ones = z[4 * n]
        for j in range(n):
            # the set of variants that changed the element with the other sign
            code = torch.where(positive[j], neg_code, torch.where(negative[j], pos_code, unchanged))
            hist.mass[j].scatter_add_(0, code, a_pos[j] + a_neg[j])
            hist.elements[j].scatter_add_(0, code, ones)


def _raise_non_finite(base, variants, name: str, labels: Sequence[str]) -> None:
    import torch

    for index, tensor in enumerate((base, *variants)):
        if not bool(torch.isfinite(tensor.to(torch.float32)).all()):
            raise Refused(f"NaN or Inf in tensor {name!r} of {labels[index]}")
    raise Refused(f"delta of tensor {name!r} overflows float32")


def collect(inputs: Inputs, threshold: float, *, chunk_budget: int = CHUNK_BUDGET,
            progress: bool = True) -> Tuple[Dict[str, _Stats], Optional[_Histograms]]:
    """Stream every floating tensor; per-group statistics and, for up to
    MAX_EXACT variants, the disagreement histograms of the whole model."""
    import torch

    n = len(inputs.variants)
    per_chunk = max(1, chunk_budget // (n + 1))
    groups: Dict[str, _Stats] = {}
    hist = _Histograms(n) if 1 < n <= MAX_EXACT else None
    labels = [f"{m.role} {m.given}" for m in (inputs.base, *inputs.variants)]
    threshold32 = float(torch.tensor(threshold, dtype=torch.float32))
    total = 0
    for name in inputs.names:
        total += math.prod(inputs.base.tensors[name].shape)
    bar = _progress(total, enabled=progress)
    reader = _Reader()
    try:
        with torch.no_grad():
            for name in inputs.names:
                headers = [m.tensors[name] for m in (inputs.base, *inputs.variants)]
                shape = headers[0].shape
                numel = math.prod(shape)
                group = groups.setdefault(layer_group(name), _Stats(n))
                group.tensors += 1
                group.numel += numel
                if numel == 0:
                    continue
                for block in _blocks(shape, per_chunk):
                    chunks = [reader.read(h, block) for h in headers]
                    _chunk_stats(group, hist, chunks[0], chunks[1:], threshold32, name, labels)
                    bar.update(chunks[0].numel())
    finally:
        bar.close()
        reader.close()
    return groups, hist


def _blocks(shape: Sequence[int], size: int):
    """Slices covering a tensor of ``shape`` in blocks of about ``size`` elements:
    runs of rows, or of columns within a row when one row is larger than that.
    Every statistic is a sum or a maximum over elements, so the split never
    changes a result."""
    if len(shape) == 0:
        yield ()
        return
    rows = shape[0]
    row_size = math.prod(shape[1:])
    if row_size <= size or len(shape) == 1:
        step = max(1, size // max(row_size, 1))
        for start in range(0, rows, step):
            yield (slice(start, min(rows, start + step)),)
        return
    inner = math.prod(shape[2:])
    step = max(1, size // max(inner, 1))
    for row in range(rows):
        for start in range(0, shape[1], step):
            yield (slice(row, row + 1), slice(start, min(shape[1], start + step)))


def _progress(total: int, *, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with mergekit
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, _n):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, unit="param", unit_scale=True, desc="analyzing",
                file=sys.stderr, dynamic_ncols=True, leave=False)
