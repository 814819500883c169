"""``circuit-merge analyze``: where variants change the base and where they fight.

    circuit-merge analyze BASE VARIANT1 [VARIANT2 ...] [--threshold X]
                          [--json FILE] [--html FILE] [--png-dir DIR] [--quiet]

Streams the floating tensors of BASE and every variant in element chunks (one
tensor name at a time, a row block of it per read, through safetensors
``safe_open``), so memory stays O(chunk x variants) whatever the model size.
Works on transformers model directories and on directories of bare
safetensors; the variants are listed in priority order, as for a merge.

Every number, with ``d = float32(V) - float32(B)`` per element and *changed*
meaning ``|d| >= threshold`` and ``d != 0`` (the merge's own test):

per variant (per layer group and in total)
    ``changed`` / ``changed_share``: changed elements, and their share of the
    floating elements; ``mean_abs``: mean ``|d|`` over the changed elements;
    ``max_abs``: largest ``|d|``; ``positive`` / ``negative``: changed elements
    with ``d > 0`` / ``d < 0``; ``balance = (positive - negative) / changed``
    (in [-1, 1], 0 = as many increases as decreases); ``abs_sum``: sum of
    ``|d|`` over the changed elements (the variant's |delta| mass).
per pair of variants i < j
    ``overlap``: elements both changed; ``overlap_share``: overlap / elements
    either changed (Jaccard index); ``agreement``: share of the overlap where
    the signs agree; ``mean_disagreement``: mean ``|d_i - d_j|`` over the
    overlap; ``conflicts``: overlap elements with opposite signs;
    ``conflict_mass_i`` / ``conflict_mass_j``: sum of ``|d_i|`` / ``|d_j|`` over
    the conflicts (what i / j loses under the sign rule when the other one has
    the higher priority).
priority orders
    Under the sign rule a variant's change of an element is overwritten when
    any higher-priority variant changed the same element with the opposite
    sign (agreeing changes are averaged, not lost). For an order, the
    overwritten mass is the sum over variants and elements of ``|d|`` of every
    change so overwritten (each change counted once however many variants
    above it disagree). It is computed before MAGPRUNE (random drops only make
    it smaller) from per-variant histograms of which other variants disagree,
    exactly for up to 16 variants; beyond that from the pairwise conflict
    masses (an upper bound). Every permutation is evaluated for up to 7
    variants, otherwise a greedy order improved by pairwise swaps. The order
    that overwrites least (``orders.suggested`` in the JSON document) has the
    least overwritten mass; ties (within 1e-9 of all |delta| mass) go to the
    order putting variants with more |delta| mass first, then to the listing
    order. It predicts sign conflicts, not merge quality: the quality
    benchmark found it no better than other orders; order by the variants'
    validated gain on their own task, or by evaluation (``circuit-merge search``).

Exit codes: 0 done; 2 refused (missing directory, mismatched models, bad
option; one line naming the path or tensor); 1 failed while reading; 130
interrupted.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click

from circuit_merge_plugin.core.params import parameter_info
from circuit_merge_plugin.errors import Refused, run_guarded
from circuit_merge_plugin.insight.render import (
    agreement_matrix,
    check_chart_options,
    check_output_file,
    fmt_count,
    fmt_float,
    fmt_share,
    group_sort_key,
    heatmap_png,
    html_image,
    html_page,
    html_paragraph,
    html_table,
    layer_group,
    run_click,
    text_table,
    variant_tags,
    write_outputs,
)

PROG = "circuit-merge analyze"
FORMAT = "circuit-merge-analysis"
VERSION = 1

#: Elements per chunk times (variants + 1): a chunk holds CHUNK_BUDGET // (n + 1)
#: elements of the base and of each of the n variants. The temporaries take
#: about 45 n + 70 bytes per chunk element, so about 100 MB whatever the
#: number of variants or the tensor sizes.
CHUNK_BUDGET = 1 << 21
#: Orders are enumerated exhaustively up to this many variants.
MAX_PERMUTED = 7
#: Overwritten mass is exact (disagreement-set histograms of 2**n bins) up to
#: this many variants, a pairwise upper bound beyond.
MAX_EXACT = 16
#: Orders whose overwritten mass differs by less than this share of all
#: |delta| mass are ties.
TIE_TOLERANCE = 1e-9


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


# ---------------------------------------------------------------- orders


class OrderCost:
    """Overwritten |delta| mass (and element count) of any priority order."""

    def __init__(self, total: _Stats, hist: Optional[_Histograms]):
        self.n = total.n
        self.abs_sum = [float(v) for v in total.abs_sum]
        self._subsets = hist is not None
        # one variant: nothing can overwrite it, the pairwise sums are exact
        self.exact = self._subsets or self.n == 1
        if self._subsets:
            # F[j][S] = sum of hist[j][O] over the sets O contained in S (a
            # zeta transform): the mass of j that only variants in S disagree
            # with, which j keeps when S is the set of variants below j.
            mass = hist.mass.numpy()[:, :-1].copy()  # without the unchanged bin
            elements = hist.elements.numpy()[:, :-1].copy()
            self._all_mass = mass.sum(1)
            self._all_elements = elements.sum(1)
            self._mass = self._zeta(mass)
            self._elements = self._zeta(elements)
        else:
            self._pair_mass = total.mass.numpy().copy()
            self._pair_elements = total.conflicts.numpy().copy()

    def _zeta(self, table):
        n = self.n
        for bit in range(n):
            view = table.reshape(n, -1, 2, 1 << bit)
            view[:, :, 1, :] += view[:, :, 0, :]
        return table

    def per_variant(self, order: Sequence[int]) -> List[Tuple[float, float]]:
        """(overwritten mass, overwritten elements) of each variant, listing order."""
        result: List[Tuple[float, float]] = [(0.0, 0.0)] * self.n
        below = 0
        for j in reversed(order):
            if self._subsets:
                mass = float(self._all_mass[j] - self._mass[j][below])
                elements = float(self._all_elements[j] - self._elements[j][below])
                scale = max(self.abs_sum[j], 1e-300)
                if mass < 1e-12 * scale:
                    mass = 0.0
                elements = float(round(elements))
            else:
                above = [k for k in range(self.n) if k != j and not below >> k & 1]
                mass = float(sum(self._pair_mass[j][k] for k in above))
                elements = float(sum(self._pair_elements[j][k] for k in above))
            result[j] = (max(mass, 0.0), max(elements, 0.0))
            below |= 1 << j
        return result

    def entry(self, order: Sequence[int]) -> dict:
        """What ``order`` (top priority first) overwrites; ``lost_*`` per variant
        in listing order, ``lost_share`` = share of the variant's own |delta| mass."""
        lost = self.per_variant(order)
        mass = sum(m for m, _ in lost)
        everything = sum(self.abs_sum)
        return {
            "order": list(order),
            "overwritten_mass": mass,
            "overwritten_share": mass / everything if everything > 0 else 0.0,
            "overwritten_elements": int(sum(e for _, e in lost)),
            "lost_mass": [m for m, _ in lost],
            "lost_elements": [int(e) for _, e in lost],
            "lost_share": [m / self.abs_sum[j] if self.abs_sum[j] > 0 else 0.0
                           for j, (m, _) in enumerate(lost)],
        }

    def rank_key(self, entry: dict):
        everything = sum(self.abs_sum) or 1.0
        quantized = round(entry["overwritten_mass"] / everything / TIE_TOLERANCE)
        return (quantized, tuple(-self.abs_sum[j] for j in entry["order"]), tuple(entry["order"]))

    def cost(self, order: Sequence[int]) -> float:
        return sum(m for m, _ in self.per_variant(order))


def rank_orders(cost: OrderCost, labels: Sequence[str]) -> dict:
    """Evaluate priority orders; the suggested one first (see the module docs)."""
    n = cost.n
    listing = list(range(n))
    if n <= MAX_PERMUTED:
        candidates = [list(p) for p in itertools.permutations(listing)]
        method = "all permutations"
    else:
        by_mass = sorted(listing, key=lambda j: (-cost.abs_sum[j], j))
        candidates = [listing, by_mass, _greedy(cost)]
        method = "greedy from the lowest priority, improved by pairwise swaps"
    entries, seen = [], set()
    for order in candidates:
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        entries.append(cost.entry(order))
    entries.sort(key=cost.rank_key)
    rank = next(index for index, e in enumerate(entries) if e["order"] == listing)

    def labelled(entry):
        return dict(entry, labels=[labels[j] for j in entry["order"]])

    return {
        "method": method,
        "exact": cost.exact,
        "evaluated": len(entries),
        "suggested": labelled(entries[0]),
        "listing": labelled(entries[rank]),
        "listing_rank": rank + 1,
        "orders": entries,
    }


def _greedy(cost: OrderCost) -> List[int]:
    """Fill positions from the lowest priority up, each time with the variant
    that loses the least to the ones not yet placed; then swap pairs while it helps."""
    n = cost.n
    remaining = list(range(n))
    bottom_up: List[int] = []
    while remaining:
        best = None
        for j in remaining:
            rest = [k for k in remaining if k != j]
            # j directly above what is placed, below everything remaining
            trial = rest + [j] + bottom_up[::-1]
            lost = cost.per_variant(trial)[j][0]
            key = (lost, cost.abs_sum[j], -j)
            if best is None or key < best[0]:
                best = (key, j)
        bottom_up.append(best[1])
        remaining.remove(best[1])
    order = bottom_up[::-1]
    current = cost.cost(order)
    for _ in range(4 * n * n):
        improved = None
        for a in range(n):
            for b in range(a + 1, n):
                trial = list(order)
                trial[a], trial[b] = trial[b], trial[a]
                value = cost.cost(trial)
                if value < current - 1e-12 * (sum(cost.abs_sum) or 1.0) and (
                    improved is None or value < improved[0]
                ):
                    improved = (value, trial)
        if improved is None:
            break
        current, order = improved
    return order


# ---------------------------------------------------------------- documents


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator > 0 else None


def _group_doc(name: str, stats: _Stats) -> dict:
    n = stats.n
    changed = stats.changed.tolist()
    positive = stats.positive.tolist()
    negative = stats.negative.tolist()
    abs_sum = stats.abs_sum.tolist()
    max_abs = stats.max_abs.tolist()
    overlap = stats.overlap.tolist()
    agreeing = stats.agreeing.tolist()
    conflicts = stats.conflicts.tolist()
    mass = stats.mass.tolist()
    absdiff = stats.absdiff.tolist()
    variants = []
    for k in range(n):
        variants.append({
            "changed": int(changed[k]),
            "changed_share": _ratio(changed[k], stats.numel) or 0.0,
            "positive": int(positive[k]),
            "negative": int(negative[k]),
            "balance": _ratio(positive[k] - negative[k], changed[k]),
            "abs_sum": abs_sum[k],
            "mean_abs": _ratio(abs_sum[k], changed[k]),
            "max_abs": max_abs[k],
        })
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            both = overlap[i][j]
            union = changed[i] + changed[j] - both
            pairs.append({
                "i": i,
                "j": j,
                "overlap": int(both),
                "union": int(union),
                "overlap_share": _ratio(both, union) or 0.0,
                "agreeing": int(agreeing[i][j]),
                "agreement": _ratio(agreeing[i][j], both),
                "mean_disagreement": _ratio(absdiff[i][j], both),
                "conflicts": int(conflicts[i][j]),
                "conflict_mass_i": mass[i][j],
                "conflict_mass_j": mass[j][i],
            })
    return {"name": name, "tensors": stats.tensors, "numel": stats.numel,
            "variants": variants, "pairs": pairs}


_THRESHOLD = parameter_info("meaningful_change_threshold")


def analyze(base: str, variants: Sequence[str], *, threshold: float = _THRESHOLD.default,
            chunk_budget: int = CHUNK_BUDGET, progress: bool = False) -> dict:
    """The analysis document of BASE and VARIANTS (see the module docs)."""
    try:
        threshold = _THRESHOLD.check(threshold)
    except ValueError as error:
        raise Refused(f"--threshold: {error}") from None
    inputs = open_inputs(base, variants)
    groups, hist = collect(inputs, threshold, chunk_budget=chunk_budget, progress=progress)
    n = len(inputs.variants)
    total = _Stats(n)
    for stats in groups.values():
        total.add(stats)
    labels = [m.given for m in inputs.variants]
    ordered = sorted(groups, key=group_sort_key)
    cost = OrderCost(total, hist)
    mass = total.mass.tolist()
    conflicts = total.conflicts.tolist()
    abs_sum = total.abs_sum.tolist()
    ordered_pairs = [
        {
            "higher": hi,
            "lower": lo,
            "conflicts": int(conflicts[hi][lo]),
            "conflict_mass": mass[lo][hi],
            "share_of_lower": _ratio(mass[lo][hi], abs_sum[lo]) or 0.0,
        }
        for hi in range(n) for lo in range(n) if hi != lo
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "base": inputs.base.given,
        "variants": labels,
        "threshold": threshold,
        "tensors": len(inputs.names),
        "skipped_tensors": inputs.skipped,
        "groups": [_group_doc(g, groups[g]) for g in ordered],
        "total": _group_doc("total", total),
        "ordered_pairs": ordered_pairs,
        "orders": rank_orders(cost, labels),
    }


# ---------------------------------------------------------------- rendering


#: What the order statistic is, and what it is not.
LEAST_OVERWRITING = "Order that overwrites least"
CONFLICT_NOT_QUALITY = (
    "This statistic predicts sign conflicts, not merge quality. Order variants by their "
    "validated gain on their own task (highest first), or choose an order by evaluation "
    "with `circuit-merge search`."
)


def _order_text(order: Sequence[int]) -> str:
    return " ".join(f"V{j + 1}" for j in order)


def _variant_rows(group: dict, tags: Sequence[str]) -> List[List[str]]:
    rows = []
    for tag, v in zip(tags, group["variants"]):
        changed = v["changed"]
        rows.append([
            tag,
            f"{fmt_count(changed)} ({fmt_share(v['changed_share'])})",
            fmt_float(v["mean_abs"]),
            fmt_float(v["max_abs"]),
            fmt_share(_ratio(v["positive"], changed)),
            fmt_share(_ratio(v["negative"], changed)),
            "-" if v["balance"] is None else f"{v['balance']:+.3f}",
        ])
    return rows


VARIANT_HEADERS = ["variant", "changed", "mean |d|", "max |d|", "positive", "negative", "balance"]
PAIR_HEADERS = ["pair", "overlap", "agreement", "mean disagreement", "conflicts"]


def _pair_rows(group: dict) -> List[List[str]]:
    rows = []
    for p in group["pairs"]:
        rows.append([
            f"V{p['i'] + 1}-V{p['j'] + 1}",
            f"{fmt_count(p['overlap'])} ({fmt_share(p['overlap_share'])})",
            fmt_share(p["agreement"]),
            fmt_float(p["mean_disagreement"]),
            fmt_count(p["conflicts"]),
        ])
    return rows


def _conflict_rows(doc: dict) -> List[List[str]]:
    return [
        [
            f"V{e['higher'] + 1} > V{e['lower'] + 1}",
            fmt_count(e["conflicts"]),
            fmt_float(e["conflict_mass"]),
            fmt_share(e["share_of_lower"]),
        ]
        for e in doc["ordered_pairs"]
    ]


CONFLICT_HEADERS = ["higher > lower", "conflicts", "|d| of lower lost", "share of lower's |d|"]


def _order_rows(doc: dict, limit: int) -> Tuple[List[str], List[List[str]]]:
    orders = doc["orders"]
    n = len(doc["variants"])
    per_variant = n <= 6
    headers = ["rank", "order", "overwritten |d|", "of all |d|", "elements"]
    if per_variant:
        headers += [f"V{k + 1} loses" for k in range(n)]
    shown = list(enumerate(orders["orders"][:limit], start=1))
    if orders["listing_rank"] > limit:
        shown.append((orders["listing_rank"], orders["listing"]))
    rows = []
    for rank, entry in shown:
        row = [
            str(rank),
            _order_text(entry["order"]) + (" (listing)" if entry["order"] == list(range(n)) else ""),
            fmt_float(entry["overwritten_mass"]),
            fmt_share(entry["overwritten_share"]),
            fmt_count(entry["overwritten_elements"]),
        ]
        if per_variant:
            row += [fmt_share(share) for share in entry["lost_share"]]
        rows.append(row)
    return headers, rows


def render_text(doc: dict, *, order_limit: int = 10) -> str:
    """The terminal report of an analysis document."""
    n = len(doc["variants"])
    tags = variant_tags(n)
    total = doc["total"]
    out = [
        f"Circuit-Merge analysis of {n} variant(s) against base {doc['base']}",
        f"threshold {doc['threshold']:g}; {fmt_count(total['numel'])} floating parameters "
        f"in {doc['tensors']} tensors, {len(doc['groups'])} groups"
        + (f"; {len(doc['skipped_tensors'])} non-floating tensor(s) skipped"
           if doc["skipped_tensors"] else ""),
    ]
    out += [f"  {tag} = {label}" for tag, label in zip(tags, doc["variants"])]
    out += ["", "Per variant (all layers)", text_table(VARIANT_HEADERS, _variant_rows(total, tags))]
    if n > 1:
        out += ["", "Per pair (all layers; overlap share = both / either changed)",
                text_table(PAIR_HEADERS, _pair_rows(total))]
        out += ["", "Sign conflicts: what the lower priority loses (before MAGPRUNE)",
                text_table(CONFLICT_HEADERS, _conflict_rows(doc))]
    layer_rows = []
    for group in doc["groups"] + [total]:
        layer_rows.append([group["name"], fmt_count(group["numel"])] + [
            fmt_share(v["changed_share"]) for v in group["variants"]
        ])
    out += ["", "Changed share per layer",
            text_table(["layer", "params"] + tags, layer_rows)]
    if 1 < n <= 4:
        pair_tags = [f"V{p['i'] + 1}-V{p['j'] + 1}" for p in total["pairs"]]
        rows = []
        for group in doc["groups"] + [total]:
            rows.append([group["name"]] + [
                f"{fmt_share(p['overlap_share'], 0)} / {fmt_share(p['agreement'], 0)}"
                for p in group["pairs"]
            ])
        out += ["", "Overlap / agreement per layer", text_table(["layer"] + pair_tags, rows)]
    orders = doc["orders"]
    if n > 1:
        headers, rows = _order_rows(doc, order_limit)
        exact = "" if orders["exact"] else ", pairwise upper bound"
        out += [
            "",
            f"Priority orders ({orders['method']}, {orders['evaluated']} evaluated{exact}): "
            "|d| mass each would overwrite under the sign rule, before MAGPRUNE",
            text_table(headers, rows, left=2),
        ]
    suggested = orders["suggested"]
    note = " (the listing order)" if suggested["order"] == list(range(n)) else (
        f"; the listing order overwrites {fmt_float(orders['listing']['overwritten_mass'])} "
        f"({fmt_share(orders['listing']['overwritten_share'])}), rank {orders['listing_rank']}"
    )
    out += [
        "",
        f"{LEAST_OVERWRITING}: {_order_text(suggested['order'])} = "
        + " ".join(suggested["labels"]),
        f"  overwrites {fmt_float(suggested['overwritten_mass'])} "
        f"({fmt_share(suggested['overwritten_share'])} of all |d|){note}",
        f"  {CONFLICT_NOT_QUALITY}",
    ]
    everything = sum(v["abs_sum"] for v in total["variants"])
    spread = orders["orders"][-1]["overwritten_mass"] - suggested["overwritten_mass"]
    if n > 1 and everything > 0 and spread < 0.01 * everything:
        out.append(f"  all {orders['evaluated']} orders evaluated overwrite within 1% of all |d| "
                   "of each other: for conflicts the order hardly matters here")
    return "\n".join(out) + "\n"


def charts(doc: dict) -> Dict[str, Tuple[str, bytes]]:
    """PNG charts: file name -> (caption, bytes)."""
    n = len(doc["variants"])
    tags = variant_tags(n)
    groups = doc["groups"] + [doc["total"]]
    rows = [g["name"] for g in groups]
    result = {
        "changed_share.png": (
            "Share of parameters changed beyond the threshold, per layer and variant",
            heatmap_png([[v["changed_share"] for v in g["variants"]] for g in groups],
                        rows, tags, title="Changed share", colorbar="changed share"),
        )
    }
    if n > 1:
        total = doc["total"]
        result["agreement.png"] = (
            "Directional agreement on the overlap, per pair of variants (all layers)",
            heatmap_png(agreement_matrix(total["pairs"], n), tags, tags,
                        title="Sign agreement on overlap", colorbar="agreement",
                        cmap="RdYlGn"),
        )
        overlap = [[1.0 if r == c else None for c in range(n)] for r in range(n)]
        for p in total["pairs"]:
            overlap[p["i"]][p["j"]] = overlap[p["j"]][p["i"]] = p["overlap_share"]
        result["overlap.png"] = (
            "Overlap of changed parameters (both / either changed), per pair",
            heatmap_png(overlap, tags, tags, title="Overlap (Jaccard)", colorbar="overlap"),
        )
        lost = [[None] * n for _ in range(n)]
        for e in doc["ordered_pairs"]:
            lost[e["higher"]][e["lower"]] = e["share_of_lower"]
        result["conflict_loss.png"] = (
            "Share of the column variant's |d| overwritten when the row variant has "
            "higher priority (sign conflicts, before MAGPRUNE)",
            heatmap_png(lost, [f"{t} higher" for t in tags], [f"{t} lower" for t in tags],
                        title="Loss to sign conflicts", colorbar="share of lower's |d|",
                        cmap="Reds"),
        )
    return result


def render_html(doc: dict, pngs: Dict[str, Tuple[str, bytes]]) -> str:
    """A self-contained HTML page: tables and the charts as base64 PNG."""
    n = len(doc["variants"])
    tags = variant_tags(n)
    total = doc["total"]
    summary = [
        html_paragraph(
            f"Base {doc['base']}; threshold {doc['threshold']:g}; "
            f"{total['numel']:,} floating parameters in {doc['tensors']} tensors"
            + (f"; {len(doc['skipped_tensors'])} non-floating tensors skipped"
               if doc["skipped_tensors"] else "") + "."
        ),
        html_table(["variant", "directory"], [[t, l] for t, l in zip(tags, doc["variants"])]),
    ]
    sections = [("Inputs", summary),
                ("Per variant (all layers)", [html_table(VARIANT_HEADERS, _variant_rows(total, tags))])]
    if n > 1:
        suggested = doc["orders"]["suggested"]
        headers, rows = _order_rows(doc, 20)
        sections += [
            ("Per pair (all layers)", [html_table(PAIR_HEADERS, _pair_rows(total))]),
            ("Sign conflicts", [html_table(CONFLICT_HEADERS, _conflict_rows(doc))]),
            ("Priority orders", [
                html_paragraph(CONFLICT_NOT_QUALITY),
                html_paragraph(
                    f"{LEAST_OVERWRITING}: {_order_text(suggested['order'])} "
                    f"({', '.join(suggested['labels'])}), overwriting "
                    f"{fmt_float(suggested['overwritten_mass'])} of |d| "
                    f"({fmt_share(suggested['overwritten_share'])}). Overwritten mass: sum of "
                    "|d| of every change that a higher-priority variant changes with the "
                    "opposite sign, before MAGPRUNE."
                ),
                html_table(headers, rows, left=2),
            ]),
        ]
    sections.append(("Charts", [html_image(png, caption, name) + html_paragraph(caption)
                                for name, (caption, png) in pngs.items()]))
    per_layer = []
    for group in doc["groups"] + [total]:
        per_layer.append(html_paragraph(
            f"{group['name']}: {group['numel']:,} parameters in {group['tensors']} tensors", "l"))
        per_layer.append(html_table(VARIANT_HEADERS, _variant_rows(group, tags)))
        if n > 1:
            per_layer.append(html_table(PAIR_HEADERS, _pair_rows(group)))
    sections.append(("Per layer", per_layer))
    return html_page("Circuit-Merge analysis", sections)


# ---------------------------------------------------------------- command line


@click.command(name="analyze", context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.argument("paths", nargs=-1, metavar="BASE VARIANT1 [VARIANT2 ...]")
@click.option("--threshold", "--meaningful_change_threshold",
              "threshold", type=float, default=_THRESHOLD.default, show_default=True,
              metavar="X", help=f"{_THRESHOLD.range_text} {_THRESHOLD.meaning} (the merge's "
              "meaningful_change_threshold)")
@click.option("--json", "json_path", metavar="FILE", default=None,
              help="Write the full analysis as JSON to FILE ('-' for stdout, which "
              "replaces the text report).")
@click.option("--html", "html_path", metavar="FILE", default=None,
              help="Write a self-contained HTML page with tables and charts.")
@click.option("--png-dir", "--png_dir", "png_dir", metavar="DIR", default=None,
              help="Write the PNG charts into DIR (created if missing).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
@click.pass_context
def analyze_command(ctx, paths, threshold, json_path, html_path, png_dir, quiet):
    """Compare VARIANT1..N with BASE before merging them.

    Variants are in priority order (first = highest). Prints, per variant and
    layer, the share of parameters changed beyond the threshold, mean and max
    |delta| and the sign balance; per pair of variants the overlap of changed
    parameters, sign agreement and mean |d_i - d_j| on the overlap; and the
    |delta| mass each priority order would overwrite on sign conflicts, with
    the order that overwrites least (it predicts conflict, not quality: choose
    an order by evaluation with `circuit-merge search`). Tensors are streamed
    in chunks.
    """
    ctx.exit(run_guarded(
        lambda: _analyze_command(paths, threshold, json_path, html_path, png_dir, quiet), PROG))


def _analyze_command(paths, threshold, json_path, html_path, png_dir, quiet) -> int:
    if len(paths) < 2:
        raise Refused("give BASE and at least one VARIANT directory")
    check_output_file(json_path, "--json")
    check_chart_options(html_path, png_dir)
    doc = analyze(paths[0], list(paths[1:]), threshold=threshold, progress=not quiet)
    if json_path != "-":
        click.echo(render_text(doc), nl=False)
    write_outputs(doc, json_path=json_path, html_path=html_path, png_dir=png_dir, quiet=quiet,
                  render_charts=charts, render_page=render_html)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``circuit-merge analyze`` entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_click(analyze_command, argv, PROG)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
