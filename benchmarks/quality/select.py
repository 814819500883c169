"""Selection on the validation split: one place for every choice the benchmark makes.

``records`` are the benchmark's scored merges: dicts with ``family`` (the
family id, ``kind-seed``), ``method``, ``settings``, ``order``, ``seed`` (the
merge seed), ``roles`` and the scores per split (``val``, ``test``: task ->
accuracy). Nothing here reads ``test``.
"""

from __future__ import annotations

import json
import statistics
from typing import Dict, List, Optional, Sequence

#: Rules in the order that breaks an exact tie on validation.
RULE_PREFERENCE = ("gain-desc", "delta-norm-desc", "as-listed", "gain-asc")


def mean_acc(scores: Dict[str, float], tasks: Sequence[str]) -> float:
    return statistics.fmean(scores[t] for t in tasks)


def skey(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _matches(record, family=None, method=None, settings=None, order=None, seed=None, role=None) -> bool:
    if family is not None and record["family"] != family:
        return False
    if method is not None and record["method"] != method:
        return False
    if settings is not None and skey(record["settings"]) != skey(settings):
        return False
    if order is not None and list(record["order"]) != list(order):
        return False
    if seed is not None and record["seed"] != seed:
        return False
    if role is not None and role not in record["roles"]:
        return False
    return True


def find(records: Sequence[dict], **where) -> List[dict]:
    return [r for r in records if _matches(r, **where)]


def best_point(records, family: str, method: str, seed: int, tasks, role: str = "grid") -> dict:
    """The grid setting of ``method`` with the best validation mean accuracy on
    ``family`` (merge seed ``seed``); an exact tie keeps the first in grid order."""
    best, best_score = None, None
    for r in find(records, family=family, method=method, seed=seed, role=role):
        score = mean_acc(r["val"], tasks)
        if best_score is None or score > best_score:
            best, best_score = r["settings"], score
    if best is None:
        raise ValueError(f"no validation scores for {method} on {family}")
    return dict(best)


def preset_table(records, families: Sequence[str], seed: int, tasks) -> List[dict]:
    """circuit's preset grid: validation mean per setting, per family and over
    all families (each family weighs the same), best first."""
    table: Dict[str, dict] = {}
    for r in find(records, method="circuit", seed=seed, role="circuit-grid"):
        entry = table.setdefault(skey(r["settings"]), {"settings": dict(r["settings"]), "val": {}})
        entry["val"][r["family"]] = mean_acc(r["val"], tasks)
    rows = [e for e in table.values() if all(f in e["val"] for f in families)]
    for e in rows:
        e["val_mean"] = statistics.fmean(e["val"][f] for f in families)
    # stable: an exact tie keeps grid order
    return sorted(rows, key=lambda e: -e["val_mean"])


def pick_preset(records, families, seed, tasks) -> dict:
    """The (temperature, base_droprate, lambda) with the best validation mean
    over every family (both kinds, all training seeds)."""
    table = preset_table(records, families, seed, tasks)
    if not table:
        raise ValueError("no complete circuit grid on validation")
    return table[0]["settings"]


def rule_table(records, families, preset: dict, orders: Dict[str, Dict[str, Sequence[str]]],
               seed: int, tasks) -> List[dict]:
    """Each rule at ``preset``: validation mean per family and over all."""
    names = [n for n in RULE_PREFERENCE if all(n in orders[f] for f in families)]
    names += sorted({n for f in families for n in orders[f]} - set(names))
    rows = []
    for name in names:
        val = {}
        for f in families:
            order = orders[f].get(name)
            found = find(records, family=f, method="circuit", settings=preset, order=order, seed=seed) if order else []
            if found:
                val[f] = mean_acc(found[0]["val"], tasks)
        if len(val) == len(families):
            rows.append({"rule": name, "val": val, "val_mean": statistics.fmean(val.values())})
    return sorted(rows, key=lambda e: -e["val_mean"])


def pick_rule(records, families, preset, orders, seed, tasks) -> Optional[str]:
    table = rule_table(records, families, preset, orders, seed, tasks)
    return table[0]["rule"] if table else None
