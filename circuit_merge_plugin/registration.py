"""Register every merge method declared in the ``mergekit.merge_methods`` group.

mergekit itself does not read entry points, so this module does it, for
whichever registry API the installed mergekit has: 0.1.5's ``register()`` or
0.1.4's ``REGISTERED_MERGE_METHODS`` dict. Registration is idempotent (a name
already registered is left alone) and a broken entry point only warns.

An entry point names either a merge method object or a zero-argument callable
returning one (ours: :func:`circuit_merge_plugin.methods.circuit_method`).
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any, Dict, List

from circuit_merge_plugin import ENTRY_POINT_GROUP


def _method_name(method: Any) -> str:
    spec = getattr(method, "spec", None)
    if spec is not None and hasattr(spec, "name"):
        return spec.name  # mergekit 0.1.5
    return method.name()  # mergekit 0.1.4


def _registry():
    """Return (registered names, add function) for the installed mergekit."""
    from mergekit.merge_methods import registry

    if hasattr(registry, "register") and hasattr(registry, "registered_methods"):
        names = {m.spec.name for m in registry.registered_methods()}
        return names, registry.register
    table: Dict[str, Any] = registry.REGISTERED_MERGE_METHODS

    def add(method: Any) -> None:
        table[_method_name(method)] = method

    return set(table), add


def register_entry_points(group: str = ENTRY_POINT_GROUP) -> List[str]:
    """Register all methods of ``group`` not yet registered; return their names."""
    names, add = _registry()
    added = []
    for entry_point in entry_points(group=group):
        try:
            method = entry_point.load()
            if callable(method) and not hasattr(method, "make_task") and not hasattr(
                method, "spec"
            ):
                method = method()
            name = _method_name(method)
            if name in names:
                continue
            add(method)
            names.add(name)
            added.append(name)
        except Exception as error:  # one broken plugin must not break the rest
            warnings.warn(
                f"merge method entry point {entry_point.name!r} "
                f"({entry_point.value}) failed to register: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return added
