"""The ``circuit`` method object for whichever mergekit API is installed.

Chosen by the API that is present, never by parsing version strings: mergekit
0.1.5 has ``GroupMergeMethod``; 0.1.4 has ``MergeMethod.make_task``.
"""

from __future__ import annotations

from typing import Any


def circuit_method() -> Any:
    from mergekit.merge_methods import base

    if hasattr(base, "GroupMergeMethod"):
        from circuit_merge_plugin.adapters.mergekit_015 import CircuitMerge

        return CircuitMerge()
    from circuit_merge_plugin.adapters.mergekit_014 import CircuitMerge014

    return CircuitMerge014()
