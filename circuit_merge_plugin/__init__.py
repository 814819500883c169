"""Circuit-Merge! as a mergekit merge method (``merge_method: circuit``).

Importing this package is cheap (no torch, no mergekit): the public API below is
loaded on first use. Importing it also makes sure ``circuit`` is registered with
mergekit, now if mergekit's method registry is already loaded, otherwise as soon
as it is (see :mod:`circuit_merge_plugin.adapters.registration`).
"""

__version__ = "0.1.0"

METHOD_NAME = "circuit"
PRETTY_NAME = "Circuit-Merge"
REFERENCE_URL = "https://github.com/jsgreenawalt/ml-model-mergetools"
ENTRY_POINT_GROUP = "mergekit.merge_methods"

_LAZY = {
    "circuit_merge": "circuit_merge_plugin.core.kernel",
    "circuit_merge_with_stats": "circuit_merge_plugin.core.kernel",
    "TensorStats": "circuit_merge_plugin.core.tally",
    "calculate_p": "circuit_merge_plugin.core.kernel",
    "drop_rates": "circuit_merge_plugin.core.kernel",
    "CircuitParams": "circuit_merge_plugin.core.params",
}

__all__ = [
    "__version__",
    "METHOD_NAME",
    "CircuitParams",
    "calculate_p",
    "circuit_merge",
    "circuit_merge_with_stats",
    "drop_rates",
    "TensorStats",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def _install_registration() -> None:
    from circuit_merge_plugin.adapters import bootstrap as _bootstrap

    _bootstrap.install()


_install_registration()
