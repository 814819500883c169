"""The priority-order statistic of ``circuit-merge analyze``: the |delta| mass
each order would overwrite under the sign rule, and the order that overwrites
least (see :mod:`.analyze`'s docs for the definition). It predicts sign
conflicts, not merge quality.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

from circuit_merge_plugin.insight.analyze_stats import _Histograms, _Stats

#: Orders are enumerated exhaustively up to this many variants.
MAX_PERMUTED = 7
#: Orders whose overwritten mass differs by less than this share of all
#: |delta| mass are ties.
TIE_TOLERANCE = 1e-9

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
