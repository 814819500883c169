"""The seed of a merge run through mergekit, and saying where it came from.

The rule (one place: :func:`circuit_merge_plugin.core.params.params_from_values`):
the recipe's ``seed``, else ``torch.initial_seed()``, which is what
``mergekit-yaml --random-seed N`` sets (``transformers.set_seed``) and,
without that option, a seed torch drew at start-up. :func:`resolve` applies it
and says which case it was (the report's ``seed_source``):

* ``"recipe"``: the recipe's ``seed``;
* ``"random_seed option"``: mergekit's ``--random-seed`` (its ``MergeOptions``);
* ``"drawn"``: neither was given, so the run is only reproducible with the
  seed torch drew: it is printed once per process on stderr with how to
  reproduce the run;
* ``"torch.initial_seed"``: no ``MergeOptions`` on the call stack (e.g.
  mergekit's ``merge_tensors``), so the caller's torch seed was used and
  whether anyone set it is unknown; nothing is printed.

"Given" is read from mergekit's ``MergeOptions.random_seed``, found on the call
stack (:mod:`circuit_merge_plugin.adapters.mergekit_run`), not by parsing
``sys.argv``; its limitation is that module's.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Mapping, Set, Tuple

from circuit_merge_plugin.core.params import CircuitParams, params_from_values

RECIPE = "recipe"
OPTION = "random_seed option"
DRAWN = "drawn"
TORCH = "torch.initial_seed"

_lock = threading.Lock()
_announced: Set[int] = set()


def resolve(values: Mapping[str, Any]) -> Tuple[CircuitParams, str]:
    """CircuitParams from resolved recipe values, and where the seed came from."""
    params = params_from_values(dict(values))
    if values.get("seed") is not None:
        return params, RECIPE
    from circuit_merge_plugin.adapters.mergekit_run import merge_options

    options = merge_options()
    if options is None:
        return params, TORCH
    if getattr(options, "random_seed", None) is not None:
        return params, OPTION
    announce(params.seed)
    return params, DRAWN


def drawn_seed_message(seed: int) -> str:
    return (
        f"circuit: no seed given; drew seed {seed} (reproduce with `seed: {seed}` "
        f"in the recipe or mergekit-yaml --random-seed {seed})"
    )


def announce(seed: int) -> None:
    """Print the drawn-seed line on stderr, once per process (per seed value)."""
    with _lock:
        if seed in _announced:
            return
        _announced.add(seed)
    print(drawn_seed_message(seed), file=sys.stderr, flush=True)
