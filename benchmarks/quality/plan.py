"""What gets merged: the shared scale grid, each method's grid, circuit's
preset grid and the priority-order rules.

Everything here is fixed before any merged model is evaluated. Every method
gets the same scale grid (:data:`SCALES`, values below and above 1): circuit,
ties, dare_ties and della through their ``lambda`` (a multiplier of the merged
delta), task_arithmetic through its per-expert ``weight`` (the same thing for a
plain sum); linear (the normalized mean) has no free parameter. Settings are
selected on the validation split only (see :mod:`benchmarks.quality.select`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.quality.merging import RANDOM_METHODS, Recipe

#: The scale grid every method gets.
SCALES: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5)
#: Densities of the sparsifying methods (ties, dare_ties, della); 0.5 is the
#: value of mergekit's documented examples (the code default 1.0 switches
#: sparsification off).
DENSITIES: Tuple[float, ...] = (0.5, 0.8)
#: circuit's preset grid (each point also over :data:`SCALES`).
CIRCUIT_TEMPERATURES: Tuple[float, ...] = (0.0, 0.5, 1.0)
CIRCUIT_DROPRATES: Tuple[float, ...] = (0.25, 0.5)

TINY_SCALES: Tuple[float, ...] = (0.5, 1.0)
TINY_DENSITIES: Tuple[float, ...] = (0.5,)
TINY_TEMPERATURES: Tuple[float, ...] = (0.0, 1.0)
TINY_DROPRATES: Tuple[float, ...] = (0.5,)

#: The original script's defaults (kept as the plugin's defaults).
CIRCUIT_DEFAULT = {"temperature": 0.0, "base_droprate": 0.5, "lambda": 1.0}
#: The preset in configs/circuit-recommended.yaml: what validation picked in
#: the committed default run (mean validation accuracy over both families and
#: all training seeds; :func:`benchmarks.quality.select.pick_preset`). Every run
#: re-makes that pick from its own validation scores and reports whether it
#: still agrees with this constant.
CIRCUIT_RECOMMENDED = {"temperature": 1.0, "base_droprate": 0.5, "lambda": 0.5}
#: The order rule the committed default run's validation picked (see
#: :func:`rule_orders`); re-checked the same way.
RECOMMENDED_RULE = "gain-asc"
#: The order the preset grid is merged in (the rules are compared afterwards,
#: at the preset validation picks).
GRID_RULE = "gain-desc"
#: An expert "gained nothing" when it beat the base on its own task by less
#: than this (validation accuracy, as a fraction: 1 point = 2 of 200 inputs).
GAINED_NOTHING = 0.01


@dataclass(frozen=True)
class MethodPoint:
    """One setting of a method: global and per-expert parameters."""

    method: str
    params: Tuple[Tuple[str, object], ...] = ()
    model_params: Tuple[Tuple[str, object], ...] = ()
    is_default: bool = False

    @property
    def settings(self) -> Dict[str, object]:
        return {**dict(self.params), **dict(self.model_params)}


def scales(tiny: bool = False) -> Tuple[float, ...]:
    return TINY_SCALES if tiny else SCALES


def mergekit_points(tiny: bool = False) -> Dict[str, List[MethodPoint]]:
    """mergekit's methods over the scale grid (and densities where they have one).

    ``is_default`` marks mergekit's defaults plus what a recipe must or
    conventionally does set: ``weight: 1.0`` per expert (mergekit has no default
    weight), ``lambda`` 1 and ``density: 0.5`` for the sparsifying methods.
    """
    grid_scales = scales(tiny)
    densities = TINY_DENSITIES if tiny else DENSITIES
    points: Dict[str, List[MethodPoint]] = {
        # normalize: true (default) -> the plain average of the experts.
        "linear": [MethodPoint("linear", (), (("weight", 1.0),), True)],
        # base + weight * sum(deltas)
        "task_arithmetic": [
            MethodPoint("task_arithmetic", (), (("weight", s),), s == 1.0)
            for s in grid_scales
        ],
    }
    for method in ("ties", "dare_ties", "della"):
        points[method] = [
            MethodPoint(
                method,
                (("lambda", s),),
                (("weight", 1.0), ("density", d)),
                (d, s) == (0.5, 1.0),
            )
            for d, s in itertools.product(densities, grid_scales)
        ]
    return points


def circuit_point(temperature: float, base_droprate: float, lambda_: float = 1.0) -> MethodPoint:
    return MethodPoint(
        "circuit",
        (
            ("temperature", float(temperature)),
            ("base_droprate", float(base_droprate)),
            ("lambda", float(lambda_)),
        ),
    )


def preset_point(preset: Dict[str, float]) -> MethodPoint:
    return circuit_point(preset["temperature"], preset["base_droprate"], preset["lambda"])


def circuit_points(tiny: bool = False) -> List[MethodPoint]:
    """circuit's preset grid: temperature x base_droprate x scale."""
    temps = TINY_TEMPERATURES if tiny else CIRCUIT_TEMPERATURES
    drops = TINY_DROPRATES if tiny else CIRCUIT_DROPRATES
    return [
        circuit_point(t, d, s)
        for t, d, s in itertools.product(temps, drops, scales(tiny))
    ]


def recipes_for(
    point: MethodPoint, order: Sequence[str], seeds: Sequence[int]
) -> List[Recipe]:
    """One recipe per merge seed for random methods, one for deterministic ones."""
    used = seeds if point.method in RANDOM_METHODS else seeds[:1]
    return [
        Recipe(point.method, tuple(order), point.params, point.model_params, seed)
        for seed in used
    ]


# ---------------------------------------------------------------------------
# Priority-order rules: computable from the checkpoints, or from the experts'
# own validation scores, never from any merged model.


def gain_order(
    tasks: Sequence[str], gains: Dict[str, float], descending: bool = True
) -> Tuple[str, ...]:
    """The ``gain-desc`` rule (``gain-asc`` with ``descending=False``).

    1. An expert's gain is its own task's validation accuracy minus the base's.
    2. Experts that gained nothing (gain below :data:`GAINED_NOTHING`, 1 point)
       go last, whatever the direction: what they add is only interference, so
       they should lose every sign conflict.
    3. The others by gain in whole points (``floor(100 * gain)``), largest
       first (smallest first for ``gain-asc``).
    4. Ties (same whole point, or both gained nothing) keep the order the
       experts were listed in.
    """
    sign = -1 if descending else 1

    def key(item):
        index, task = item
        gain = gains[task]
        if gain < GAINED_NOTHING:
            return (1, 0, index)
        return (0, sign * math.floor(100 * gain + 1e-9), index)

    return tuple(t for _, t in sorted(enumerate(tasks), key=key))


def rule_orders(
    tasks: Sequence[str],
    delta_norms: Dict[str, float],
    expert_gains: Optional[Dict[str, float]] = None,
) -> Dict[str, Tuple[str, ...]]:
    """Candidate orders (first = highest priority) from each rule.

    * ``gain-desc`` / ``gain-asc``: :func:`gain_order` (needs each expert's own
      evaluation on its task, before any merge).
    * ``delta-norm-desc``: by the L2 norm of (expert - base) over all weights,
      largest first (ties: listed order). Needs only the checkpoints.
    * ``as-listed``: the tasks' fixed listing order (an arbitrary user order).
    """
    orders = {
        "delta-norm-desc": tuple(sorted(tasks, key=lambda t: -delta_norms[t])),
        "as-listed": tuple(tasks),
    }
    if expert_gains is not None:
        orders["gain-desc"] = gain_order(tasks, expert_gains, True)
        orders["gain-asc"] = gain_order(tasks, expert_gains, False)
    return orders
