"""Recording the contribution report while a merge runs (an optional step).

The merge-method adapters (mergekit 0.1.5 and 0.1.4) see one tensor at a time
and never the output directory, so a report is addressed by its own path:

* the recipe parameter ``report: PATH`` (mergekit 0.1.5; 0.1.4's recipe schema
  holds only numbers);
* else the target set in-process by :func:`reporting_to` (what ``circuit-merge``
  uses to put the report in its output);
* else the environment variable ``CIRCUIT_MERGE_REPORT=PATH`` (either version).

``PATH`` ending in ``.json`` is the report file itself; any other path is a
directory that receives ``circuit_merge_report.json`` (so ``report: ./merged``
beside ``mergekit-yaml recipe.yaml ./merged`` puts it next to the model, where
``circuit-merge report ./merged`` looks). Missing parent directories are made.

After every merged tensor the whole report is rewritten atomically, so the file
is always a complete, valid report of the tensors merged so far, and final as
soon as the last tensor is merged; tensors are listed in natural name order,
so the bytes do not depend on the order in which mergekit's executor ran them.
A process that merges to the same report path again starts a new report the
first time a tensor name repeats. Thread-safe. No torch at import.
The file's format lives in :mod:`circuit_merge_plugin.io.report_file`.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

from circuit_merge_plugin.io.report_file import (
    COUNTS,
    FORMAT,
    REPORT_ENV,
    REPORT_FILE,
    VERSION,
    natural_key,
    report_file,
    write_atomically,
)

_lock = threading.Lock()
_reports: Dict[Path, "_Report"] = {}
_default: Optional[tuple] = None  # (path, aliases) set by reporting_to


def target_for(recipe_value: Optional[str]) -> Optional[tuple]:
    """(report file, label aliases) for a tensor merge, or None when no report is asked."""
    if recipe_value is not None:
        return report_file(recipe_value), {}
    if _default is not None:
        return _default
    from_env = os.environ.get(REPORT_ENV)
    return (report_file(from_env), {}) if from_env else None


@contextmanager
def reporting_to(target: str, aliases: Optional[Mapping[str, str]] = None) -> Iterator[Path]:
    """Report merges run inside the block to ``target`` (unless the recipe names another).

    ``aliases`` renames variant labels (mergekit's model references) in the file.
    """
    global _default
    path = report_file(target)
    with _lock:
        previous, _default = _default, (path, dict(aliases or {}))
        _reports.pop(path, None)  # a fresh report
    try:
        yield path
    finally:
        with _lock:
            _default = previous
            _reports.pop(path, None)


def record(
    target: tuple,
    name: str,
    labels: Sequence[str],
    stats,
    parameters: Mapping[str, object],
) -> None:
    """Add one merged tensor (variant ``labels`` in listing order) and rewrite the file."""
    path, aliases = target
    labels = [aliases.get(label, label) for label in labels]
    with _lock:
        report = _reports.get(path)
        if report is None or name in report.tensors:
            report = _reports[path] = _Report(dict(parameters))
        report.add(name, labels, stats)
        write_atomically(path, report.text())


class _Report:
    """One report being written: each tensor's JSON text is made once, when it
    arrives (again only if a new variant label appears), so rewriting the file
    after every tensor costs a string join and a write, not a re-serialisation."""

    def __init__(self, parameters: dict) -> None:
        self.parameters = parameters
        self.variants: List[str] = []
        self.tensors: Dict[str, tuple] = {}  # name -> (labels, stats)
        self.texts: Dict[str, str] = {}  # name -> its entry as JSON text

    def add(self, name: str, labels: Sequence[str], stats) -> None:
        known = len(self.variants)
        _merge_order(self.variants, labels)
        self.tensors[name] = (list(labels), stats)
        if len(self.variants) != known:  # rows are laid out by the variant list
            self.texts = {key: self._text(key) for key in self.tensors}
        else:
            self.texts[name] = self._text(name)

    def _text(self, name: str) -> str:
        labels, stats = self.tensors[name]
        entry = stats.as_dict()
        rows = dict(zip(labels, entry["variants"]))
        rates = dict(zip(labels, entry["drop_rates"]))
        # a variant that lacks this (optional) tensor: no rate, nothing counted
        absent = dict(dict.fromkeys(COUNTS, 0), final_share=0.0)
        entry["variants"] = [rows.get(label, absent) for label in self.variants]
        entry["drop_rates"] = [rates.get(label) for label in self.variants]
        return json.dumps(entry)

    def text(self) -> str:
        """The report as JSON: one line per tensor, tensors in natural name order."""
        head = json.dumps({
            "format": FORMAT,
            "version": VERSION,
            "variants": list(self.variants),
            "parameters": self.parameters,
        })
        body = ",\n".join(
            f" {json.dumps(name)}: {self.texts[name]}"
            for name in sorted(self.texts, key=natural_key)
        )
        return f"{head[:-1]},\n\"tensors\": {{\n{body}\n}}}}\n"


def _merge_order(known: List[str], labels: Sequence[str]) -> None:
    """Insert the new ``labels`` into ``known``, keeping both listing orders."""
    previous = None
    for label in labels:
        if label not in known:
            at = known.index(previous) + 1 if previous is not None else 0
            known.insert(at, label)
        previous = label
