"""Register every merge method declared in the ``mergekit.merge_methods`` group.

mergekit itself does not read entry points, so this module does it, for
whichever registry API the installed mergekit has: 0.1.5's ``register()`` or
0.1.4's ``REGISTERED_MERGE_METHODS`` dict. Registration is idempotent (a name
already registered is left alone) and a broken entry point only warns.

An entry point names either a merge method object or a zero-argument callable
returning one (ours: :func:`circuit_merge_plugin.adapters.methods.circuit_method`).
"""

from __future__ import annotations

import sys
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

    from circuit_merge_plugin.adapters.methods import API_015, mergekit_api

    if mergekit_api() == API_015:
        names = {m.spec.name for m in registry.registered_methods()}
        return names, registry.register
    table: Dict[str, Any] = registry.REGISTERED_MERGE_METHODS

    def add(method: Any) -> None:
        table[_method_name(method)] = method

    return set(table), add


def _initializing(package: str) -> bool:
    """Whether a module of ``package`` is being imported right now.

    If an adapter module imports mergekit before mergekit's registry was
    loaded, the start-up hook runs while that adapter is half-initialised and
    its entry point cannot load yet. That is not a failure: the adapter calls
    :func:`register_after_import` at its end.
    """
    prefix = package + "."
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name == package or name.startswith(prefix)
    )


def register_after_import() -> None:
    """Called at the end of each adapter module: finish a deferred registration."""
    if "mergekit.merge_methods" in sys.modules:
        register_entry_points()


_ACTIVE = False


def register_entry_points(group: str = ENTRY_POINT_GROUP) -> List[str]:
    """Register all methods of ``group`` not yet registered; return their names.

    Re-entrant calls (loading an entry point can import an adapter that asks
    for registration again) return at once; the outer call finishes the work.
    """
    global _ACTIVE
    if _ACTIVE:
        return []
    _ACTIVE = True
    try:
        return _register_group(group)
    finally:
        _ACTIVE = False


def _register_group(group: str) -> List[str]:
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
            if isinstance(error, ImportError) and _initializing(
                entry_point.value.split(".")[0].split(":")[0]
            ):
                continue  # deferred: see _initializing
            warnings.warn(
                f"merge method entry point {entry_point.name!r} "
                f"({entry_point.value}) failed to register: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return added
