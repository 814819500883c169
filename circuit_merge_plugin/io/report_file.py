"""The contribution report's file: its name, format, counts, path rule and atomic writes.

Shared by the merge side (:mod:`circuit_merge_plugin.adapters.recording`, which
writes it) and the reader (:mod:`circuit_merge_plugin.insight.report`). Standard
library only.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Optional, Union

REPORT_FILE = "circuit_merge_report.json"
FORMAT = "circuit-merge-report"
VERSION = 1
#: Integer counts of a tensor's variant row (and "final_share", a float).
COUNTS = ("changed", "kept", "dropped", "taken", "overwrote", "averaged", "overwritten")
#: Environment variable naming the report path when the recipe cannot.
REPORT_ENV = "CIRCUIT_MERGE_REPORT"

_umask_lock = threading.Lock()
_umask: Optional[int] = None


def report_file(target: str) -> Path:
    """The report file for a ``report`` value: PATH if it ends in .json, else PATH/REPORT_FILE."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"report must be a file or directory path, got {target!r}")
    path = Path(os.path.expanduser(target))
    if path.suffix.lower() != ".json":
        path = path / REPORT_FILE
    return path.absolute()


def natural_key(name: str):
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _process_umask() -> int:
    """The process umask, read once on first write (reading it means setting it back)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
        return _umask


def write_atomically(path: Path, data: Union[str, bytes]) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary
    file in the same directory.

    Readers see the old file or the new one, never a partial one; the file gets
    the permissions an ordinary ``open(path, "w")`` would give it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temp, 0o666 & ~_process_umask())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
