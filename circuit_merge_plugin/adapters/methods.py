"""The ``circuit`` method object for whichever mergekit API is installed, and
:func:`mergekit_api`, the one probe of that API (adapters, registration,
tests and benchmarks all ask it), and :func:`mergekit_version` for messages.

Chosen by the API that is present, never by parsing version strings: mergekit
0.1.5 has ``GroupMergeMethod``; 0.1.4 has ``MergeMethod.make_task``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

API_015 = "0.1.5"
API_014 = "0.1.4"


@lru_cache(maxsize=None)
def mergekit_api() -> str:
    """``"0.1.5"`` (declarative specs, ``GroupMergeMethod``) or ``"0.1.4"``
    (``MergeMethod.make_task``), by the API the installed mergekit has."""
    from mergekit.merge_methods import base

    return API_015 if hasattr(base, "GroupMergeMethod") else API_014


def mergekit_version() -> str:
    """The installed mergekit distribution's version, for messages and records
    (``"unknown"`` without package metadata); never used to choose an API."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return "unknown"


def circuit_method() -> Any:
    if mergekit_api() == API_015:
        from circuit_merge_plugin.adapters.mergekit_015 import CircuitMerge

        return CircuitMerge()
    from circuit_merge_plugin.adapters.mergekit_014 import CircuitMerge014

    return CircuitMerge014()
