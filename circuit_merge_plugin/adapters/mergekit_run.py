"""What the adapters can learn about the mergekit run that calls them.

A merge method sees one tensor at a time: resolved values, never the recipe,
the model it came from, or ``mergekit-yaml``'s options. mergekit's
``run_merge(merge_config, out_path, options, config_source)`` (0.1.4 and
0.1.5 alike, behind ``mergekit-yaml``, ``mergekit-multi`` and the Python API)
holds all of them while it plans and runs the merge, in the thread that calls
the merge method. The functions here look for them on the current thread's
call stack, by type (mergekit's ``MergeConfiguration`` and ``MergeOptions``),
in mergekit's own frames only:

* :func:`merge_options`: ``MergeOptions`` (``random_seed`` tells whether
  ``--random-seed`` was given; see :mod:`circuit_merge_plugin.adapters.seeds`);
* :func:`recipe_parameters`: the parameters as the recipe gave them, for the
  report header: from the recipe's YAML text (``config_source``) when mergekit
  has it, else from the parsed configuration (which mergekit 0.1.4 parsed into
  floats, and which mergekit's planner may already have rewritten from
  ``models:`` into ``modules``/``slices`` form);
* :func:`check_recipe`: every literal value of a Circuit-Merge parameter in the
  recipe, per model, so an out-of-range per-model ``drop_rate`` is refused
  while mergekit plans, naming the model as listed in the recipe.

Limitation: a merge not run through ``run_merge`` in the calling thread (a
planner driven by hand, a multi-GPU executor's worker thread, mergekit's
``merge_tensors``) has none of these: the functions return None and the
callers fall back (no drawn-seed note, ``recipe_parameters: null``, mergekit's
own validation message without the model).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    OUTPUT_PARAMETERS,
    VARIANT_PARAMETERS,
    check_parameter,
)

_OURS = frozenset(p.name for p in GLOBAL_PARAMETERS + VARIANT_PARAMETERS + OUTPUT_PARAMETERS)

#: Keys of a recipe (or of its modules, slices, sources) that hold parameters.
_PARAMETERS = "parameters"


def _on_stack(kind: type) -> Tuple[Any, Optional[dict]]:
    """The nearest instance of ``kind`` among mergekit frames' locals, and those locals."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("mergekit."):
            local = frame.f_locals
            for value in local.values():
                if isinstance(value, kind):
                    return value, local
        frame = frame.f_back
    return None, None


def merge_options() -> Any:
    """The ``MergeOptions`` of the mergekit run calling us, or None."""
    try:
        from mergekit.options import MergeOptions
    except ImportError:  # pragma: no cover - mergekit always has it
        return None
    return _on_stack(MergeOptions)[0]


def merge_config() -> Tuple[Any, Optional[str]]:
    """(the run's ``MergeConfiguration``, its YAML text or None), or (None, None)."""
    try:
        from mergekit.config import MergeConfiguration
    except ImportError:  # pragma: no cover
        return None, None
    config, local = _on_stack(MergeConfiguration)
    source = local.get("config_source") if local else None
    return config, source if isinstance(source, str) else None


# ---------------------------------------------------------------- recipe_parameters


def recipe_parameters() -> Optional[dict]:
    """The recipe's parameters as given: ``parameters`` (global), and the
    ``models``, ``slices`` or ``modules`` entries with their ``parameters``
    (models named as listed). None when no mergekit run is on the stack."""
    config, source = merge_config()
    if config is None:
        return None
    tree = None
    if source is not None:
        try:
            import yaml

            tree = yaml.safe_load(source)
        except Exception:  # noqa: BLE001 - fall back to the parsed configuration
            tree = None
    if not isinstance(tree, dict):
        tree = _plain(config)
    return _parameter_parts(tree)


def _plain(value: Any) -> Any:
    """mergekit's parsed configuration as plain data, models as their recipe strings."""
    from mergekit.common import ModelReference
    from mergekit.config import ConditionalParameter

    if isinstance(value, ModelReference):
        return str(value)
    if isinstance(value, ConditionalParameter):
        plain = {"value": _plain(value.value)}
        return {"filter": value.filter, **plain} if value.filter is not None else plain
    fields = getattr(type(value), "model_fields", None)
    if fields is not None:
        return {
            name: _plain(getattr(value, name))
            for name in fields
            if getattr(value, name) is not None
        }
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _parameter_parts(tree: dict) -> dict:
    result: Dict[str, Any] = {}
    if tree.get(_PARAMETERS):
        result[_PARAMETERS] = tree[_PARAMETERS]
    for key in ("models", "slices"):
        if tree.get(key):
            result[key] = [_entry(item) for item in tree[key]]
    if tree.get("modules"):
        result["modules"] = {
            str(name): _parameter_parts(module if isinstance(module, dict) else {})
            for name, module in tree["modules"].items()
        }
    return result


def _entry(item: Any) -> Any:
    """A ``models:`` entry, a slice or a source, reduced to its model and parameters."""
    if not isinstance(item, dict):
        return item
    entry = {}
    for key in ("model", "layer_range", "base_model"):
        if item.get(key) is not None:
            entry[key] = item[key]
    if item.get("sources"):
        entry["sources"] = [_entry(source) for source in item["sources"]]
    if item.get(_PARAMETERS):
        entry[_PARAMETERS] = item[_PARAMETERS]
    return entry


# ---------------------------------------------------------------- check_recipe

_checked: List[Any] = []  # the configuration last checked (by identity)


def check_recipe() -> None:
    """Refuse an out-of-range literal value of a Circuit-Merge parameter in the
    recipe of the run on the stack, naming the model (as listed in the recipe)
    it was given for, and the filter. One check per configuration object."""
    config, _ = merge_config()
    if config is None or any(config is seen for seen in _checked):
        return
    for settings, where in _settings(config):
        for name, setting in settings.items():
            if name not in _OURS:
                continue  # not ours; mergekit or a preflight check reports it
            for value, filter_ in _literals(setting):
                try:
                    check_parameter(name, value)
                except ValueError as error:
                    places = [*where, *([f"filter {filter_!r}"] if filter_ else [])]
                    suffix = f" ({', '.join(places)})" if places else ""
                    raise ValueError(f"{error}{suffix}") from None
    _checked[:] = [config]


def _settings(config: Any) -> Iterable[Tuple[dict, List[str]]]:
    """Every ``parameters`` mapping of the configuration, with where it was given."""
    if config.parameters:
        yield config.parameters, []
    for model in config.models or ():
        if model.parameters:
            yield model.parameters, [f"model {model.model}"]
    yield from _slice_settings(config.slices or (), [])
    for name, module in (config.modules or {}).items():
        if module.parameters:
            yield module.parameters, [f"module {name}"]
        for model in module.models or ():
            if model.parameters:
                yield model.parameters, [f"model {model.model}"]
        yield from _slice_settings(module.slices or (), [])


def _slice_settings(slices, where: List[str]) -> Iterable[Tuple[dict, List[str]]]:
    for index, output in enumerate(slices):
        if output.parameters:
            yield output.parameters, [*where, f"slice {index}"]
        for source in output.sources:
            if source.parameters:
                yield source.parameters, [*where, f"model {source.model}"]


def _literals(setting: Any, filter_: Optional[str] = None) -> Iterable[Tuple[Any, Optional[str]]]:
    """The literal values of a parameter setting (scalar, gradient list,
    conditional or list of conditionals), each with its filter. Checking them
    all is enough: interpolation stays between a gradient's valid endpoints,
    and every range in the parameter table is an interval."""
    if isinstance(setting, (list, tuple)):
        for item in setting:
            yield from _literals(item, filter_)
    elif hasattr(setting, "value") and hasattr(setting, "filter"):  # ConditionalParameter
        yield from _literals(setting.value, setting.filter or filter_)
    else:
        yield setting, filter_
