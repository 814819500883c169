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

Whether the merge finished
--------------------------
The header says ``"finished": false`` while tensors are recorded and ``true``
once the merge is complete, with ``"tensors_merged"``. The adapters never see
mergekit's plan, so "complete" is decided by who ran the merge:

* :func:`reporting_to`'s block ending without an exception (what
  ``circuit-merge`` wraps its merge in), or an explicit :func:`finish`;
* inside a click command such as ``mergekit-yaml``: the command's context
  closing with no exception in flight (or a zero exit), so a failure, Ctrl-C
  (click's "Aborted!") or any non-zero exit leaves ``false``;
* otherwise (a Python program): normal interpreter exit with no uncaught
  exception (``sys.last_value``).

A process killed by a signal runs none of these, so its report stays
``false``. Limitation: in the last two cases, "finished" means the command or
program ended normally after recording, not that mergekit wrote every file.

The header also holds what the run says about itself (see
:mod:`circuit_merge_plugin.adapters.mergekit_run`): ``"recipe_parameters"``,
the parameters as the recipe gave them (filters and per-model values), or null
when the merge was not started through mergekit's ``run_merge``; and
``"seed_source"`` (see :mod:`circuit_merge_plugin.adapters.seeds`).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

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
#: Reports recorded and not yet finished -> who finishes them: a click root
#: context, or None for interpreter exit.
_pending: Dict[Path, Any] = {}
_atexit_armed = False
_CLICK_KEY = "circuit_merge_plugin.recording"


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
    The report is marked finished when the block ends without an exception.
    """
    global _default
    path = report_file(target)
    with _lock:
        previous, _default = _default, (path, dict(aliases or {}))
        _reports.pop(path, None)  # a fresh report
    completed = False
    try:
        yield path
        completed = True
    finally:
        with _lock:
            _default = previous
            if completed:
                _finish_locked(path)
            _pending.pop(path, None)
            _reports.pop(path, None)


def record(
    target: tuple,
    name: str,
    labels: Sequence[str],
    stats,
    parameters: Mapping[str, object],
    header: Optional[Mapping[str, object]] = None,
) -> None:
    """Add one merged tensor (variant ``labels`` in listing order) and rewrite the file.

    ``header`` adds keys to a new report's header (the adapters pass
    ``seed_source``); the recipe's own parameters are looked up here, once per report.
    """
    path, aliases = target
    labels = [aliases.get(label, label) for label in labels]
    with _lock:
        report = _reports.get(path)
        if report is None or name in report.tensors or report.finished:
            head = {"recipe_parameters": _recipe_parameters(), **dict(header or {})}
            report = _reports[path] = _Report(dict(parameters), head)
            _arrange_finish(path)
        report.add(name, labels, stats)
        write_atomically(path, report.text())


def finish(target: Union[str, os.PathLike]) -> None:
    """Mark the report at ``target`` (a ``report`` value or the report file) finished.

    For a merge whose runner knows it completed (``circuit-merge``'s job after
    mergekit's run returns). Rewrites the file atomically; a report that does
    not exist is left alone.
    """
    path = report_file(os.fspath(target))
    with _lock:
        _finish_locked(path)
        _pending.pop(path, None)


def _finish_locked(path: Path) -> None:
    report = _reports.get(path)
    if report is not None:
        if not report.finished and path.exists():  # never re-create a removed report
            report.finished = True
            write_atomically(path, report.text())
        return
    try:  # recorded earlier in this process and no longer held: patch the header
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    first, newline, rest = text.partition("\n")
    try:
        head = json.loads(first[:-1] + "}")
    except ValueError:
        return
    if head.get("format") != FORMAT or head.get("finished") is not False:
        return
    head["finished"] = True
    write_atomically(path, json.dumps(head)[:-1] + "," + newline + rest)


def _recipe_parameters() -> Optional[dict]:
    try:
        from circuit_merge_plugin.adapters.mergekit_run import recipe_parameters

        return recipe_parameters()
    except Exception:  # noqa: BLE001 - the report must never break a merge
        return None


def _click_root() -> Any:
    """The root click context of the command running in this thread, if any."""
    click = sys.modules.get("click")
    if click is None:
        return None
    try:
        context = click.get_current_context(silent=True)
    except Exception:  # noqa: BLE001
        return None
    return context.find_root() if context is not None else None


def _arrange_finish(path: Path) -> None:
    """Who will mark ``path`` finished (see the module notes); called under the lock."""
    global _atexit_armed
    if _default is not None and _default[0] == path:
        return  # reporting_to's block finishes it
    root = _click_root()
    _pending[path] = root
    if root is not None:
        if not root.meta.get(_CLICK_KEY):
            root.meta[_CLICK_KEY] = True
            root.call_on_close(lambda: _command_closed(root))
    elif not _atexit_armed:
        _atexit_armed = True
        atexit.register(_interpreter_exit)


def _finish_pending(owner: Any, succeeded: bool) -> None:
    with _lock:
        for path in [p for p, o in _pending.items() if o is owner]:
            del _pending[path]
            if succeeded:
                _finish_locked(path)


def _command_closed(root: Any) -> None:
    """A click command's context closes: did the command end normally?"""
    error = sys.exc_info()[1]
    code = getattr(error, "exit_code", getattr(error, "code", None))
    succeeded = error is None or (
        isinstance(error, SystemExit) or type(error).__name__ == "Exit"
    ) and code in (0, None)
    _finish_pending(root, succeeded)


def _interpreter_exit() -> None:
    failed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
    _finish_pending(None, not failed)


class _Report:
    """One report being written: each tensor's JSON text is made once, when it
    arrives (again only if a new variant label appears), so rewriting the file
    after every tensor costs a string join and a write, not a re-serialisation."""

    def __init__(self, parameters: dict, head: Optional[dict] = None) -> None:
        self.parameters = parameters
        self.head = dict(head or {})
        self.finished = False
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
            "finished": self.finished,
            "tensors_merged": len(self.tensors),
            "variants": list(self.variants),
            "parameters": self.parameters,
            **self.head,
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
