"""The one function both mergekit adapters call to merge a tensor.

Without a report it is the kernel's :func:`~circuit_merge_plugin.core.kernel.circuit_merge`
itself. When a report is asked for (recipe ``report:``, ``circuit-merge``'s
output, or ``CIRCUIT_MERGE_REPORT``), the counting kernel, which merges to the
same bytes, runs instead, and recording the counts is a separate step
(:mod:`circuit_merge_plugin.adapters.recording`).
"""

from __future__ import annotations

from typing import Optional, Sequence

from circuit_merge_plugin.adapters import recording
from circuit_merge_plugin.core.kernel import circuit_merge, circuit_merge_with_stats


def merge_tensor(base, variants, params, report: Optional[str], *, drop_rate, name: str,
                 labels: Sequence[str], seed_source: Optional[str] = None):
    """Merge one tensor; ``labels`` are base first, as the kernel takes them.

    ``report`` is the recipe's value (None if not given); the recording module
    decides where, if anywhere, the counts go. ``seed_source`` (from
    :func:`circuit_merge_plugin.adapters.seeds.resolve`) goes in the report's header.
    """
    arguments = dict(drop_rate=drop_rate, name=name, labels=labels)
    target = recording.target_for(report)
    if target is None:
        return circuit_merge(base, variants, params, **arguments)
    merged, stats = circuit_merge_with_stats(base, variants, params, **arguments)
    recording.record(target, name, labels[1:], stats, params.as_dict(),
                     {"seed_source": seed_source})
    return merged
