"""Circuit-Merge parameters: names, defaults, ranges and validation.

This is the single source of truth for every front end (mergekit 0.1.5, mergekit
0.1.4, the ``circuit-merge`` command line): they all validate through
:func:`check_parameter` and build a :class:`CircuitParams`. Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional


@dataclass(frozen=True)
class ParameterInfo:
    """One recipe parameter: its name, default, allowed range and meaning."""

    name: str
    kind: type
    default: Any
    range_text: str
    meaning: str
    low: Optional[float] = None
    high: Optional[float] = None
    high_inclusive: bool = True
    low_inclusive: bool = True

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to ``kind``, or raise a ValueError naming it."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"{self.name} must be true or false, got {value!r}")
        if self.kind is str:
            if isinstance(value, str) and value.strip():
                return value
            raise ValueError(f"{self.name} must be {self.range_text}, got {value!r}")
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            return value
        # float. PyYAML reads "1e-6" (no dot) as a string, as in the original script's own
        # example config, so numeric strings are accepted.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"{self.name} must be a number in {self.range_text}, got {value!r}"
            )
        value = float(value)
        in_range = math.isfinite(value)
        if in_range and self.low is not None:
            in_range = value >= self.low if self.low_inclusive else value > self.low
        if in_range and self.high is not None:
            in_range = value <= self.high if self.high_inclusive else value < self.high
        if not in_range:
            raise ValueError(f"{self.name} must be in {self.range_text}, got {value!r}")
        return value


#: Global (shared) parameters, in the order the README documents them.
GLOBAL_PARAMETERS = (
    ParameterInfo(
        "temperature",
        float,
        0.0,
        "[0, 1]",
        "Interpolates between priority-weighted (0) and equal (1) drop rates, "
        "and between pairwise (0) and true (1) averaging of agreeing deltas.",
        low=0.0,
        high=1.0,
    ),
    ParameterInfo(
        "base_droprate",
        float,
        0.5,
        "[0, 1)",
        "Drop rate of the highest-priority variant; lower priorities drop more.",
        low=0.0,
        high=1.0,
        high_inclusive=False,
    ),
    ParameterInfo(
        "meaningful_change_threshold",
        float,
        2e-6,
        "[0, inf)",
        "Deltas with |delta| below this are treated as unchanged (zero).",
        low=0.0,
    ),
    ParameterInfo(
        "epsilon",
        float,
        0.1,
        "[0, 1)",
        "MAGPRUNE spread: drop probabilities range over p - epsilon/2 .. "
        "p + epsilon/2, larger magnitudes getting the smaller ones.",
        low=0.0,
        high=1.0,
        high_inclusive=False,
    ),
    ParameterInfo(
        "lambda",
        float,
        1.0,
        "(0, 10]",
        "Scale of the merged delta: the output is base + lambda * (merged delta), "
        "multiplied in float32 before the add to the base. Values below 1 shrink "
        "the merge toward the base (helps fine-tunes that forget a lot).",
        low=0.0,
        high=10.0,
        low_inclusive=False,
    ),
    ParameterInfo(
        "rescale",
        bool,
        True,
        "true/false",
        "Divide each kept delta by (1 - its drop probability), keeping the "
        "expected delta unbiased.",
    ),
    ParameterInfo(
        "seed",
        int,
        None,
        "any integer",
        "Seed of the random drops (a counter-based generator): the same inputs "
        "and seed give the same bytes.",
    ),
)

#: Per-variant parameters.
VARIANT_PARAMETERS = (
    ParameterInfo(
        "drop_rate",
        float,
        None,
        "[0, 1)",
        "Overrides the computed drop rate of this variant.",
        low=0.0,
        high=1.0,
        high_inclusive=False,
    ),
)

#: Parameters that change what a merge writes beside the model, never the model.
OUTPUT_PARAMETERS = (
    ParameterInfo(
        "report",
        str,
        None,
        "a file or directory path (a string)",
        "Write circuit_merge_report.json (what each variant kept, dropped, "
        "overwrote and contributed) to this directory, or to this file if it "
        "ends in .json. Off when not given.",
    ),
)

#: The random seed when a merge does not give one: each front end's rule, stated
#: once here and applied by the functions below.
#:
#: * mergekit front ends (``mergekit-yaml``, ``mergekit-multi``, Python
#:   ``run_merge``; both adapters): the recipe's ``seed`` (global or per-layer),
#:   else ``torch.initial_seed()``, which is mergekit's ``--random-seed`` when
#:   given and otherwise a seed torch drew at random for the process
#:   (:func:`mergekit_seed`).
#: * ``circuit-merge`` (the original script's command line): ``--seed``, else
#:   the config file's ``seed``, else 0, the original script's default
#:   (:data:`ORIGINAL_SCRIPT_SEED`); so a circuit-merge run is reproducible
#:   without giving a seed.
SEED_RULES = {
    "mergekit": "When not given: the recipe's seed, else mergekit's --random-seed "
    "(torch.initial_seed(); drawn at random when that is not given either).",
    "circuit-merge": "When not given: the config's seed, else 0 (the original "
    "script's default).",
}

#: circuit-merge's seed when neither --seed nor the config gives one (the
#: original script's argparse default).
ORIGINAL_SCRIPT_SEED = 0


def mergekit_seed() -> int:
    """The seed of a mergekit merge whose recipe gives none (SEED_RULES["mergekit"]):
    ``torch.initial_seed()``, which mergekit's ``--random-seed`` sets."""
    import torch

    return torch.initial_seed()


_BY_NAME = {p.name: p for p in GLOBAL_PARAMETERS + VARIANT_PARAMETERS + OUTPUT_PARAMETERS}


def parameter_info(name: str) -> ParameterInfo:
    """The table entry of a parameter (KeyError if there is none)."""
    return _BY_NAME[name]


def check_parameter(name: str, value: Any) -> Any:
    """Validate one parameter by name; ``None`` passes for optional ones."""
    info = _BY_NAME.get(name)
    if info is None:
        raise ValueError(
            f"unknown Circuit-Merge parameter {name!r}; "
            f"expected one of: {', '.join(sorted(_BY_NAME))}"
        )
    if value is None and info.default is None:
        return None
    return info.check(value)


@dataclass(frozen=True)
class CircuitParams:
    """Validated global parameters of one Circuit-Merge.

    ``seed`` must be set by the front end before merging (each front end has
    its own rule for the default); the kernel refuses ``None``.
    """

    temperature: float = 0.0
    base_droprate: float = 0.5
    meaningful_change_threshold: float = 2e-6
    epsilon: float = 0.1
    lambda_: float = 1.0
    rescale: bool = True
    seed: Optional[int] = None

    def __post_init__(self):
        for f in fields(self):
            name = _PARAMETER_OF.get(f.name, f.name)
            object.__setattr__(self, f.name, check_parameter(name, getattr(self, f.name)))

    @classmethod
    def from_parameters(cls, values: dict) -> "CircuitParams":
        """Build from recipe parameter names (``lambda``, not the field ``lambda_``)."""
        return cls(**{_FIELD_OF.get(name, name): value for name, value in values.items()})

    def as_dict(self) -> dict:
        """The parameters by their recipe names (``lambda``, not ``lambda_``)."""
        return {_PARAMETER_OF.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}


#: Recipe parameter names that are Python keywords, and their dataclass fields.
_FIELD_OF = {"lambda": "lambda_"}
_PARAMETER_OF = {field: name for name, field in _FIELD_OF.items()}


def params_from_values(values: dict) -> CircuitParams:
    """Build CircuitParams from resolved recipe values (missing ones default).

    A missing or null ``seed`` follows ``SEED_RULES["mergekit"]``
    (:func:`mergekit_seed`); the mergekit front ends call this per tensor.
    """
    known = {p.name for p in GLOBAL_PARAMETERS}
    chosen = {k: v for k, v in values.items() if k in known and v is not None}
    if chosen.get("seed") is None:
        chosen["seed"] = mergekit_seed()
    return CircuitParams.from_parameters(chosen)
