"""The recipe, the search space and the trial points of ``circuit-merge search``.

Pure Python (PyYAML): everything here is checked before Ray or torch starts, so
bad input costs nothing and leaves the output directory untouched.

* The recipe is an ordinary mergekit recipe with ``merge_method: circuit``,
  ``base_model`` and ``models:``; its non-base models are the variants to order
  (at least two), its parameters the starting point.
* The space: the order of the variants, and by default ``temperature`` in
  [0, 1], ``base_droprate`` in [0, 0.9] and ``lambda`` in [0.2, 1.5].
  ``--space NAME=LOW:HIGH`` or ``NAME=V1,V2,...`` adds or narrows any recipe
  parameter (``drop_rate`` gives each variant its own dimension, ``drop_rate.K``
  only the K-th variant of the recipe); ``--fix NAME=VALUE`` pins one. Every
  name, range and value is checked against the parameter table
  (:mod:`circuit_merge_plugin.core.params`).
* A space whose dimensions are all value lists and whose size (orders times
  value combinations) fits the trial budget is enumerated exhaustively; any
  other is searched (:mod:`.engine`).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from circuit_merge_plugin import METHOD_NAME
from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    VARIANT_PARAMETERS,
    ParameterInfo,
)

#: Searched by default unless fixed or narrowed: name -> (low, high).
DEFAULT_RANGES = {
    "temperature": (0.0, 1.0),
    "base_droprate": (0.0, 0.9),
    "lambda": (0.2, 1.5),
}
#: Parameters that only change what is written beside the model (never searched).
_NOT_SEARCHABLE = {"report": "it only says where a report is written"}
#: Recipe keys the in-memory trial cannot honour (the merged vocabulary would differ).
_UNSUPPORTED_KEYS = ("slices", "modules", "tokenizer_source", "tokenizer")

_GLOBALS = {p.name: p for p in GLOBAL_PARAMETERS}
_VARIANT = {p.name: p for p in VARIANT_PARAMETERS}
DROP_RATE = "drop_rate"


class SearchInputError(ValueError):
    """Bad input, found before any work: a one-line message naming the thing."""


@dataclass(frozen=True)
class Recipe:
    """A parsed ``merge_method: circuit`` recipe."""

    path: Path
    data: Dict[str, Any]
    base: str
    #: Variant labels (the ``model`` values as written), in the recipe's order.
    variants: Tuple[str, ...]
    #: The ``models:`` entry of each variant, by label.
    entries: Dict[str, Dict[str, Any]]
    #: ``models:`` entries that are the base model (kept first, unchanged).
    base_entries: Tuple[Dict[str, Any], ...]
    #: The recipe's global parameters.
    parameters: Dict[str, Any]

    def variant_parameter(self, label: str, name: str) -> Any:
        value = (self.entries[label].get("parameters") or {}).get(name)
        return value


def _model_label(entry: Any, where: str) -> str:
    if isinstance(entry, dict):
        model = entry.get("model")
    else:
        model = entry
    if not isinstance(model, str) or not model.strip():
        raise SearchInputError(f"{where}: each models: entry needs a model path (a string)")
    return model


def load_recipe(path: str) -> Recipe:
    """Read and check RECIPE.yaml (a mergekit recipe with ``merge_method: circuit``)."""
    recipe_path = Path(path)
    try:
        text = recipe_path.read_text(encoding="utf-8")
    except OSError as error:
        raise SearchInputError(f"{path}: cannot read the recipe ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0]
        raise SearchInputError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise SearchInputError(f"{path}: not a mergekit recipe (expected a mapping)")
    method = data.get("merge_method")
    if method != METHOD_NAME:
        raise SearchInputError(
            f"{path}: merge_method is {method!r}; search needs merge_method: {METHOD_NAME}"
        )
    for key in _UNSUPPORTED_KEYS:
        if data.get(key) is not None:
            raise SearchInputError(
                f"{path}: search does not support recipes with {key}: "
                "(use base_model and models: with one vocabulary)"
            )
    base = data.get("base_model")
    if not isinstance(base, str) or not base.strip():
        raise SearchInputError(f"{path}: base_model is missing (circuit needs a base model)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise SearchInputError(f"{path}: models: is missing or empty")
    variants: List[str] = []
    entries: Dict[str, Dict[str, Any]] = {}
    base_entries = []
    for index, raw in enumerate(models):
        label = _model_label(raw, f"{path}: models[{index}]")
        entry = dict(raw) if isinstance(raw, dict) else {"model": raw}
        if label == base:
            base_entries.append(entry)
            continue
        if label in entries:
            raise SearchInputError(f"{path}: model {label} is listed twice")
        variants.append(label)
        entries[label] = entry
    if len(variants) < 2:
        raise SearchInputError(
            f"{path}: search needs at least two variants to order, found {len(variants)}"
        )
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise SearchInputError(f"{path}: parameters: must be a mapping")
    for name in parameters:
        if name not in _GLOBALS and name not in _NOT_SEARCHABLE:
            raise SearchInputError(
                f"{path}: unknown circuit parameter {name!r}; expected one of: "
                f"{', '.join(sorted(list(_GLOBALS) + list(_NOT_SEARCHABLE)))}"
            )
    return Recipe(
        path=recipe_path,
        data=data,
        base=base,
        variants=tuple(variants),
        entries=entries,
        base_entries=tuple(base_entries),
        parameters=dict(parameters),
    )


# ---------------------------------------------------------------- the space


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a range (``low``..``high``) or a list of ``values``."""

    name: str  # "temperature", "drop_rate.2"
    parameter: str  # the parameter table's name
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[Tuple[Any, ...]] = None

    @property
    def discrete(self) -> bool:
        return self.values is not None

    def contains(self, value: Any) -> bool:
        if self.discrete:
            return value in self.values
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            self.low <= value <= self.high
        )

    def describe(self) -> str:
        if self.discrete:
            return ",".join(_text(v) for v in self.values)
        return f"{_text(self.low)}:{_text(self.high)}"


@dataclass(frozen=True)
class Point:
    """One trial's choice: the variants' order (labels, first = highest priority)
    and a value for every searched or fixed dimension (by dimension name)."""

    order: Tuple[str, ...]
    values: Dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Canonical text identifying the point (the resume check)."""
        return json.dumps([list(self.order), sorted(self.values.items())])


@dataclass(frozen=True)
class Space:
    variants: Tuple[str, ...]
    dimensions: Tuple[Dimension, ...]
    #: Pinned values by dimension name (``--fix``).
    fixed: Dict[str, Any]

    @property
    def discrete(self) -> bool:
        return all(d.discrete for d in self.dimensions)

    def size(self) -> Optional[int]:
        """Number of points, or None when a dimension is a range."""
        if not self.discrete:
            return None
        count = math.factorial(len(self.variants))
        for dimension in self.dimensions:
            count *= len(dimension.values)
        return count

    def points(self) -> Iterator[Point]:
        """Every point of a discrete space, orders outermost, deterministic."""
        names = [d.name for d in self.dimensions]
        for order in itertools.permutations(self.variants):
            for combo in itertools.product(*(d.values for d in self.dimensions)):
                yield Point(order, {**self.fixed, **dict(zip(names, combo))})

    def contains(self, point: Point) -> bool:
        if sorted(point.order) != sorted(self.variants):
            return False
        for dimension in self.dimensions:
            if dimension.name not in point.values or not dimension.contains(point.values[dimension.name]):
                return False
        return all(point.values.get(name) == value for name, value in self.fixed.items())

    def describe(self) -> List[str]:
        lines = [f"order of {len(self.variants)} variants ({math.factorial(len(self.variants))} orders)"]
        lines += [f"{d.name} = {d.describe()}" for d in self.dimensions]
        lines += [f"{name} fixed at {_text(value)}" for name, value in self.fixed.items()]
        return lines


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _split(option: str, text: str) -> Tuple[str, str]:
    if "=" not in text:
        shape = "NAME=VALUE" if option == "--fix" else "NAME=LOW:HIGH or NAME=V1,V2,..."
        raise SearchInputError(f"{option} {text!r}: expected {shape}")
    name, _, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not spec:
        raise SearchInputError(f"{option} {text!r}: no value after '='")
    return name, spec


def _dimension_names(option: str, name: str, variants: Sequence[str]) -> Tuple[ParameterInfo, List[str]]:
    """The parameter and the dimension name(s) ``name`` stands for."""
    base_name, dot, index = name.partition(".")
    if base_name in _VARIANT:
        info = _VARIANT[base_name]
        if not dot:
            return info, [f"{base_name}.{k}" for k in range(1, len(variants) + 1)]
        if not index.isdigit() or not 1 <= int(index) <= len(variants):
            raise SearchInputError(
                f"{option} {name}: {base_name}.K needs K in 1..{len(variants)} "
                f"(the recipe's variants in order)"
            )
        return info, [f"{base_name}.{int(index)}"]
    if name in _NOT_SEARCHABLE:
        raise SearchInputError(f"{option} {name}: not a searchable parameter ({_NOT_SEARCHABLE[name]})")
    info = _GLOBALS.get(name)
    if info is None:
        known = sorted(list(_GLOBALS) + [DROP_RATE, f"{DROP_RATE}.K"])
        raise SearchInputError(
            f"{option} {name}: unknown parameter {name!r}; expected one of: {', '.join(known)}"
        )
    return info, [name]


def _value(option: str, text: str, info: ParameterInfo, raw: str) -> Any:
    value: Any = raw
    if info.kind is bool:
        lowered = raw.lower()
        if lowered not in ("true", "false"):
            raise SearchInputError(f"{option} {text}: {info.name} must be true or false, got {raw!r}")
        value = lowered == "true"
    elif info.kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise SearchInputError(f"{option} {text}: {info.name} must be an integer, got {raw!r}") from None
    try:
        return info.check(value)
    except ValueError as error:
        raise SearchInputError(f"{option} {text}: {error}") from None


def build_space(recipe: Recipe, space_specs: Sequence[str] = (), fix_specs: Sequence[str] = ()) -> Space:
    """The search space from the defaults, ``--space`` and ``--fix`` (checked)."""
    variants = recipe.variants
    fixed: Dict[str, Any] = {}
    fixed_from: Dict[str, str] = {}
    for text in fix_specs:
        name, raw = _split("--fix", text)
        info, names = _dimension_names("--fix", name, variants)
        value = _value("--fix", text, info, raw)
        for dim in names:
            if dim in fixed:
                raise SearchInputError(f"--fix {text}: {dim} is fixed twice")
            fixed[dim] = value
            fixed_from[dim] = text
    searched: Dict[str, Dimension] = {}
    for text in space_specs:
        name, spec = _split("--space", text)
        info, names = _dimension_names("--space", name, variants)
        if ":" in spec and "," not in spec:
            if info.kind is not float:
                raise SearchInputError(
                    f"--space {text}: {info.name} takes a list of values (V1,V2,...), not a range"
                )
            low_text, _, high_text = spec.partition(":")
            low = _value("--space", text, info, low_text.strip())
            high = _value("--space", text, info, high_text.strip())
            if not low < high:
                raise SearchInputError(f"--space {text}: LOW must be below HIGH")
            make = lambda dim: Dimension(dim, info.name, low=low, high=high)  # noqa: E731
        else:
            values: List[Any] = []
            for raw in spec.split(","):
                value = _value("--space", text, info, raw.strip())
                if value not in values:
                    values.append(value)
            make = lambda dim: Dimension(dim, info.name, values=tuple(values))  # noqa: E731
        for dim in names:
            if dim in fixed:
                raise SearchInputError(f"--space {text}: {dim} is also pinned by --fix {fixed_from[dim]}")
            if dim in searched:
                raise SearchInputError(f"--space {text}: {dim} is given twice")
            searched[dim] = make(dim)
    dimensions: List[Dimension] = []
    for name, (low, high) in DEFAULT_RANGES.items():
        if name not in fixed and name not in searched:
            dimensions.append(Dimension(name, name, low=low, high=high))
    dimensions.extend(searched.values())
    return Space(variants=variants, dimensions=tuple(dimensions), fixed=fixed)


def starting_point(recipe: Recipe, space: Space) -> Optional[Point]:
    """The recipe's own order and parameters, if they are a point of the space."""
    values: Dict[str, Any] = dict(space.fixed)
    for dimension in space.dimensions:
        if dimension.parameter == DROP_RATE:
            index = int(dimension.name.split(".")[1])
            value = recipe.variant_parameter(recipe.variants[index - 1], DROP_RATE)
        else:
            info = _GLOBALS[dimension.parameter]
            value = recipe.parameters.get(dimension.parameter, info.default)
        if value is None or not dimension.contains(value):
            return None
        values[dimension.name] = value
    point = Point(tuple(recipe.variants), values)
    return point if space.contains(point) else None


# ---------------------------------------------------------------- trial recipes


def merge_seed(recipe: Recipe, point: Point, seed: int) -> int:
    """A trial's merge seed: the point's (``--space``/``--fix seed``), else the
    recipe's ``seed``, else ``seed`` (``--seed``)."""
    for value in (point.values.get("seed"), recipe.parameters.get("seed")):
        if value is not None:
            return int(value)
    return int(seed)


def trial_parameters(recipe: Recipe, point: Point, seed: int) -> Dict[str, Any]:
    """The global parameters of a trial: the recipe's, then the point's, and the
    merge seed always explicit (so the recipe merges the same under any --random-seed)."""
    parameters = {k: v for k, v in recipe.parameters.items() if k != "report"}
    for name, value in point.values.items():
        if not name.startswith(DROP_RATE + "."):
            parameters[name] = value
    parameters["seed"] = merge_seed(recipe, point, seed)
    return parameters


def variant_drop_rates(recipe: Recipe, point: Point) -> Dict[str, Any]:
    """Per-variant ``drop_rate`` overrides of a trial, by label (recipe values, then the point's)."""
    rates: Dict[str, Any] = {}
    for index, label in enumerate(recipe.variants, 1):
        value = point.values.get(f"{DROP_RATE}.{index}", recipe.variant_parameter(label, DROP_RATE))
        if value is not None:
            rates[label] = value
    return rates


def trial_recipe(recipe: Recipe, point: Point, seed: int, *, resolve=None, keep_report: bool = False) -> Dict[str, Any]:
    """A mergekit recipe for one point: variants in the point's order, its parameters.

    ``resolve`` maps a model path as written to the one to use (absolute paths);
    ``keep_report`` keeps the recipe's ``report:`` (best.yaml), trials drop it.
    """
    resolve = resolve or (lambda model: model)
    data = {k: v for k, v in recipe.data.items() if k not in ("models", "parameters", "base_model")}
    rates = variant_drop_rates(recipe, point)
    models = []
    for entry in recipe.base_entries:
        models.append({**entry, "model": resolve(entry["model"])})
    for label in point.order:
        entry = dict(recipe.entries[label])
        entry["model"] = resolve(label)
        params = dict(entry.get("parameters") or {})
        if label in rates:
            params[DROP_RATE] = rates[label]
        if params:
            entry["parameters"] = params
        models.append(entry)
    parameters = trial_parameters(recipe, point, seed)
    if keep_report and "report" in recipe.parameters:
        parameters["report"] = recipe.parameters["report"]
    result = {"merge_method": METHOD_NAME, "base_model": resolve(recipe.base), "models": models}
    result["parameters"] = parameters
    result.update(data)
    return result


def resolve_model_paths(recipe: Recipe):
    """Map each model as written to an absolute path when it is a local directory
    (relative paths are taken from the current directory, as mergekit-yaml does)."""

    def resolve(model: str) -> str:
        candidate = Path(model).expanduser()
        if candidate.is_dir():
            return str(candidate.resolve())
        return model

    return resolve


def check_local_models(recipe: Recipe) -> None:
    """Refuse local-looking model paths that do not exist (before Ray starts)."""
    for label in (recipe.base, *recipe.variants):
        candidate = Path(label).expanduser()
        looks_local = label.startswith((".", "/", "~")) or candidate.exists()
        if looks_local and not (candidate / "config.json").is_file():
            role = "base_model" if label == recipe.base else "model"
            what = "no such directory" if not candidate.exists() else "no config.json there"
            raise SearchInputError(f"{recipe.path}: {role} {label}: {what}")
