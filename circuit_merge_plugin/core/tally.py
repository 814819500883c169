"""What each variant contributed to one merged tensor: the kernel's optional counting.

:func:`circuit_merge_plugin.core.kernel.circuit_merge_with_stats` merges exactly as
:func:`~circuit_merge_plugin.core.kernel.circuit_merge` does (same bytes) and also
returns a :class:`TensorStats`: per variant (listing order, first = highest
priority)

* ``changed``: elements with ``|delta| >= meaningful_change_threshold``;
* ``kept``: changed elements that survived MAGPRUNE; ``dropped = changed - kept``;
* ``taken``: kept elements written where nothing was accumulated yet;
* ``overwrote``: kept elements that replaced an accumulated value of the other
  sign (the sign conflict this higher-priority variant won);
* ``averaged``: kept elements averaged with an agreeing accumulated value
  (``taken + overwrote + averaged = kept``);
* ``overwritten``: kept elements of this variant that a later, higher-priority
  variant overwrote (its contribution there is gone from the result);
* ``final_share``: the variant's share of the tensor's final ``sum |delta|``.

The share is exact attribution, not an estimate: every merged element is a
positive combination of the kept deltas that survive there, ``acc = sum_v w_v d_v``
(all of one sign), so ``|acc| = sum_v w_v |d_v|`` and variant ``v`` holds
``w_v |d_v|`` of it. A take (first write or overwrite) sets its own weight to
1 and removes every earlier one; an agreeing average with new count ``c``
multiplies the earlier weights by ``alpha = (1-T)/2 + T(c-1)/c`` and gives the
new delta ``beta = (1-T)/2 + T/c`` (``alpha = beta = 1/2`` at T = 0), which is
the kernel's averaging rule ``(1-T)(acc+d)/2 + T(acc(c-1)+d)/c`` split by term.
Shares are normalised by the sum of the attributed magnitudes, so they sum to 1
exactly up to float rounding wherever the merge changed anything, and are all 0
where it changed nothing. The attributed magnitudes (float32, one per element
and variant) are summed exactly: each is split into its integer mantissa and
its exponent, the mantissas are added per exponent in int64 and the share is
the ratio of the exact integer totals, rounded once. The report's shares are
therefore the same bytes whatever the chunk size, thread count or
implementation (a float sum would depend on the summation order).

How it is counted: while merging a chunk, the kernel writes each variant
step's pruned delta, drop mask and take mask straight into that step's row of
``(variants, chunk)`` buffers (its own work buffers are those rows), and copies
the threshold test and, on the general path, the count there. After the chunk the rows
are classified together: int32 bit ops, a forward cumulative AND over the steps
("nothing accumulated before"), a reverse cumulative OR ("overwritten later")
and a reverse cumulative product (the weights); totals are folded in on the
device. No host sync until :meth:`Tally.result`, once per tensor. Memory: about
ten int32/float32 rows of one chunk per variant. Cost: some 25 elementwise ops
per element and variant (the merge itself needs ~40); see the README's "Cost of
the report".
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, Sequence, Tuple

import torch

#: Count columns of the device totals, in this order.
_COLUMNS = ("below", "kept", "taken", "take", "survived")
_ABS_BITS = 0x7FFFFFFF


@dataclass(frozen=True)
class VariantStats:
    """One variant's counts in one tensor (see the module docstring)."""

    changed: int = 0
    kept: int = 0
    dropped: int = 0
    taken: int = 0
    overwrote: int = 0
    averaged: int = 0
    overwritten: int = 0
    final_share: float = 0.0

    def as_dict(self) -> dict:
        return {
            "changed": self.changed,
            "kept": self.kept,
            "dropped": self.dropped,
            "taken": self.taken,
            "overwrote": self.overwrote,
            "averaged": self.averaged,
            "overwritten": self.overwritten,
            "final_share": self.final_share,
        }


@dataclass(frozen=True)
class TensorStats:
    """Counts of one merged tensor: one :class:`VariantStats` per variant, listing order."""

    numel: int
    drop_rates: Tuple[float, ...]
    variants: Tuple[VariantStats, ...]

    @classmethod
    def unchanged(cls, numel: int, drop_rates: Sequence[float]) -> "TensorStats":
        """Stats of a tensor the merge left as the base (nothing counted)."""
        return cls(numel, tuple(drop_rates), tuple(VariantStats() for _ in drop_rates))

    def as_dict(self) -> dict:
        """The tensor's entry of a ``circuit_merge_report.json`` (format version 1)."""
        return {
            "numel": self.numel,
            "drop_rates": list(self.drop_rates),
            "variants": [row.as_dict() for row in self.variants],
        }


class Tally:
    """State rows of one chunk and device-side totals for one tensor merge.

    Rows are indexed by processing step ``s`` (0 = the lowest priority, i.e. the
    last listed variant, which the kernel processes first). The kernel writes
    into them directly (see ``kernel._Views``): per step the pruned delta
    (``delta``), the drop mask (``drop``: -1 dropped, 0 kept), the threshold
    test (``below``: sign bit set where ``|d| < threshold``), the take mask
    (``take``: -1 where it took, i.e. first write or sign conflict; only
    meaningful where kept) and, on the general path, the count before the step
    (``num``). Masks are int32 -1/0 so that classifying is integer bit ops and
    counting is an integer sum (boolean tensors cost ~10x more on CPU).
    """

    def __init__(
        self, count: int, size: int, device, temperature: float, general: bool
    ) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.count = count
        self.temperature = float(temperature)
        self.general = general  # the kernel's general path: always so when T > 0
        self.below = torch.empty(count, size, **i32)
        self.drop = torch.empty(count, size, **i32)
        self.take = torch.empty(count, size, **i32)
        self.delta = torch.empty(count, size, **f32)
        self.num = torch.empty(count, size, **f32) if self.general else None
        # scratch: the masks counted (below threshold, kept, taken, take, live), reused after
        self.masks = torch.empty(len(_COLUMNS), count, size, **i32)
        self.totals = torch.zeros(count, len(_COLUMNS), dtype=torch.int64, device=device)
        # mass: int64 sums of the float32 mantissas, per step and exponent field
        self.bins = torch.zeros(count, MASS_BINS, dtype=torch.int64, device=device)
        self._bin_offsets = torch.arange(count, dtype=torch.int32, device=device).mul_(
            MASS_BINS
        ).unsqueeze(1)
        self._abs = torch.tensor(_ABS_BITS, **i32)
        self._one = torch.tensor(1.0, **f32).view(torch.int32)
        self._half_flip = torch.tensor(0.5, **f32).view(torch.int32) ^ self._one
        self._31 = torch.tensor(31, **i32)
        self._views: Dict[int, SimpleNamespace] = {}

    def finish_chunk(self, size: int) -> None:
        """Classify the rows of a chunk of ``size`` elements; add to the totals."""
        v = self._views.get(size) or self._make_views(size)
        last = self.count - 1
        below, kept, taken, take, live = v.masks
        torch.bitwise_right_shift(v.below, self._31, out=below)
        torch.bitwise_not(v.drop, out=kept)
        # "nothing accumulated before step s" = every earlier step dropped (an
        # accumulated value never returns to 0): a forward cumulative AND
        v.taken[0].fill_(-1)
        for step in range(1, self.count):
            torch.bitwise_and(v.taken[step - 1], v.drop_rows[step - 1], out=v.taken[step])
        taken.bitwise_and_(kept)
        torch.bitwise_and(v.take_raw, kept, out=take)
        # live: kept and not taken by a later (higher-priority) step, i.e. an
        # exclusive reverse cumulative OR of take, inverted
        v.live[last].zero_()
        for step in range(last - 1, -1, -1):
            torch.bitwise_or(v.live[step + 1], v.take[step + 1], out=v.live[step])
        live.bitwise_not_().bitwise_and_(kept)
        self.totals.sub_(v.all_masks.sum(2, dtype=torch.int32).T)

        averaged = torch.bitwise_xor(kept, take, out=v.take_raw)
        factor_bits, magnitude_bits = below, kept  # reused
        # weight of step s: own_s times the alphas of the later averages
        scale = v.scale
        if self.general:
            alpha, beta = self._alpha_beta(size)
            own = _select_bits(averaged, beta, self._one)
            factor = _select_bits(averaged, alpha, self._one, out=factor_bits)
            v.scale_rows[last].fill_(1.0)
            for step in range(last - 1, -1, -1):
                torch.mul(v.scale_rows[step + 1], factor[step + 1], out=v.scale_rows[step])
            scale.mul_(own)
        else:  # T = 0: alpha = beta = 1/2, so the weight is a product over steps >= s
            torch.bitwise_and(averaged, self._half_flip, out=factor_bits)
            factor = factor_bits.bitwise_xor_(self._one).view(torch.float32)
            v.scale_rows[last].copy_(factor[last])
            for step in range(last - 1, -1, -1):
                torch.mul(v.scale_rows[step + 1], factor[step], out=v.scale_rows[step])
        # |delta| where live (garbage where dropped is masked bitwise, never multiplied)
        torch.bitwise_and(v.delta_bits, self._abs, out=magnitude_bits)
        magnitude = magnitude_bits.bitwise_and_(live).view(torch.float32).mul_(scale)
        self._add_mass(magnitude.view(torch.int32))

    def _add_mass(self, bits: torch.Tensor) -> None:
        """Add non-negative float32 values (rows of bit patterns) exactly to the bins.

        Per exponent field, the sum of the integer mantissas (implicit bit
        included). ``bincount`` sums them as float64, exact while a call's sum
        stays below 2**53: at most 2**28 values of < 2**24 per call.
        """
        exponent = torch.bitwise_right_shift(bits, 23)
        mantissa = torch.bitwise_and(bits, 0x7FFFFF)
        mantissa.bitwise_or_(exponent.clamp(max=1).bitwise_left_shift_(23))
        index = exponent.add_(self._bin_offsets).view(-1)
        mantissa = mantissa.view(-1)
        flat_bins = self.bins.view(-1)
        if self.bins.device.type == "mps":  # no float64 there: integer scatter
            flat_bins.index_add_(0, index.long(), mantissa.long())
            return
        for start in range(0, index.numel(), 1 << 28):
            counted = torch.bincount(
                index[start : start + (1 << 28)],
                weights=mantissa[start : start + (1 << 28)].double(),
                minlength=flat_bins.numel(),
            )
            flat_bins.add_(counted.long())

    def _make_views(self, size: int) -> SimpleNamespace:
        """The buffers cut to ``size`` columns, and their rows (made once per size)."""
        masks = self.masks[:, :, :size]
        _, _, taken, take, live = masks
        scale = taken.view(torch.float32)  # taken is free once counted
        v = SimpleNamespace(
            all_masks=masks,
            masks=tuple(masks),
            below=self.below[:, :size],
            drop=self.drop[:, :size],
            drop_rows=tuple(self.drop[:, :size]),
            take_raw=self.take[:, :size],
            delta_bits=self.delta[:, :size].view(torch.int32),
            taken=tuple(taken),
            take=tuple(take),
            live=tuple(live),
            scale=scale,
            scale_rows=tuple(scale),
        )
        self._views[size] = v
        return v

    def _alpha_beta(self, size: int):
        """Per element: alpha (the earlier weights' factor) and beta (the new
        delta's weight) of an average made at each step, from the count before it."""
        t = self.temperature
        new = self.num[:, :size] + 1  # the count after an average
        half = (1 - t) / 2
        beta = torch.reciprocal(new).mul_(t)
        alpha = torch.sub(t + half, beta)  # (1-T)/2 + T(c-1)/c
        return alpha, beta.add_(half)

    def result(self, numel: int, drop_rates: Sequence[float]) -> TensorStats:
        """The totals as :class:`TensorStats` in listing order (one host sync)."""
        return stats_from_totals(self.totals.tolist(), self.bins.tolist(), numel, drop_rates)


#: Mass bins per step: one per value of the float32 exponent field.
MASS_BINS = 256


def mass_integer(bins: Sequence[int]) -> int:
    """The exact sum of binned float32 values, in units of 2**-149.

    ``bins[e]`` is the sum of the integer mantissas (implicit bit included) of
    values with exponent field ``e``; such a value is mantissa * 2**(max(e, 1) - 150).
    """
    return sum(int(total) << (max(e, 1) - 1) for e, total in enumerate(bins) if total)


def stats_from_totals(
    totals: Sequence[Sequence[int]],
    bins: Sequence[Sequence[int]],
    numel: int,
    drop_rates: Sequence[float],
) -> TensorStats:
    """:class:`TensorStats` from per-step counts and mass bins (step 0 = processed first).

    ``totals[s]`` holds the step's (below, kept, taken, take, survived) counts,
    ``bins[s]`` its mass bins (see :func:`mass_integer`). Both implementations
    of the kernel report through here.
    """
    mass = [mass_integer(row) for row in bins]
    whole = sum(mass)
    rows = []
    for step in range(len(totals) - 1, -1, -1):  # listing order
        below, kept, taken, take, survived = (int(x) for x in totals[step])
        changed = numel - below
        rows.append(
            VariantStats(
                changed=changed,
                kept=kept,
                dropped=changed - kept,
                taken=taken,
                overwrote=take - taken,
                averaged=kept - take,
                overwritten=kept - survived,
                final_share=mass[step] / whole if whole > 0 else 0.0,
            )
        )
    return TensorStats(numel, tuple(drop_rates), tuple(rows))


def _select_bits(mask, value, one_bits, out=None) -> torch.Tensor:
    """Float32 ``value`` where the int32 ``mask`` is -1, ``1.0`` where it is 0."""
    bits = torch.bitwise_xor(value.view(torch.int32), one_bits, out=out)
    return bits.bitwise_and_(mask).bitwise_xor_(one_bits).view(torch.float32)
