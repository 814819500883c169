"""Writing ``circuit_merge_report.json`` while a merge runs.

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

After every merged tensor the whole report is rewritten atomically (a
temporary file in the same directory, then ``os.replace``), so the file is
always a complete, valid report of the tensors merged so far, and final as
soon as the last tensor is merged; tensors are listed in natural name order,
so the bytes do not depend on the order in which mergekit's executor ran them.
A process that merges to the same report path again starts a new report the
first time a tensor name repeats. Thread-safe. Importing it loads no torch (the
renderer, ``circuit-merge report``, uses its constants); :func:`merge_tensor`,
the adapters' one call, imports the kernel when first called.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

REPORT_FILE = "circuit_merge_report.json"
FORMAT = "circuit-merge-report"
VERSION = 1
#: Integer counts of a tensor's variant row (and "final_share", a float).
COUNTS = ("changed", "kept", "dropped", "taken", "overwrote", "averaged", "overwritten")
#: Environment variable naming the report path when the recipe cannot.
REPORT_ENV = "CIRCUIT_MERGE_REPORT"

_lock = threading.Lock()
_reports: Dict[Path, "_Report"] = {}
_default: Optional[tuple] = None  # (path, aliases) set by reporting_to
_UMASK = os.umask(0o022)  # read once (setting it back at once): files get 0666 & ~umask
os.umask(_UMASK)


def report_file(target: str) -> Path:
    """The report file for a ``report`` value: PATH if it ends in .json, else PATH/REPORT_FILE."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"report must be a file or directory path, got {target!r}")
    path = Path(os.path.expanduser(target))
    if path.suffix.lower() != ".json":
        path = path / REPORT_FILE
    return path.absolute()


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


def merge_tensor(base, variants, params, report: Optional[str], *, drop_rate, name: str,
                 labels: Sequence[str]):
    """The adapters' one kernel call: merge a tensor; count and record it when asked.

    ``report`` is the recipe's value (None if not given); :func:`target_for`
    decides. ``labels`` are base first, as the kernel takes them. Without a
    report this is :func:`~circuit_merge_plugin.kernel.circuit_merge` itself.
    """
    from circuit_merge_plugin.kernel import circuit_merge, circuit_merge_with_stats

    arguments = dict(drop_rate=drop_rate, name=name, labels=labels)
    target = target_for(report)
    if target is None:
        return circuit_merge(base, variants, params, **arguments)
    merged, stats = circuit_merge_with_stats(base, variants, params, **arguments)
    record(target, name, labels[1:], stats, params.as_dict())
    return merged


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
        _write_atomically(path, report.text())


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
            for name in sorted(self.texts, key=_natural_key)
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


def _natural_key(name: str):
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temp, 0o666 & ~_UMASK)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
