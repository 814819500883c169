"""``--eval lm-eval:TASK[,TASK...]``: lm-eval-harness tasks on the in-memory merged model.

Each TASK is a task or group name lm-eval knows, or the path of a task YAML
file (a local task: a ``.yaml``/``.yml`` path, or any entry with a ``/``).
The driver checks every entry before anything is written (:func:`parse`); the
workers wrap the merged transformers model in lm-eval's Hugging Face wrapper
(``HFLM``, no files written) and run ``lm_eval.simple_evaluate`` with fixed
seeds, ``limit`` examples per task and no bootstrap (:class:`LmEvalEval`).

The trial's score is the mean over the given tasks of each task's primary
metric, in the scale lm-eval reports (:func:`summarize`): ``acc_norm`` if the
task reports it, else ``acc``, else its first numeric metric in the order lm-eval
reports them (never a ``*_stderr``); of a metric reported under several
filters, the first. A group that reports no metric of its own counts as the mean of
its subtasks' primary metrics.

Tasks whose data are local (every entry a task YAML whose ``dataset_path`` is a
packaged ``datasets`` builder such as ``json`` or an existing path) run with
the Hugging Face hub offline, so a search over local tasks never reaches out.

lm_eval is imported only here, and only when such an eval is used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from circuit_merge_plugin.search.space import SearchInputError

PREFIX = "lm-eval:"
INSTALL = "pip install 'circuit-merge-plugin[lm-eval]'"
#: The first lm-eval with the task index and YAML loader used to check tasks.
MINIMUM = "0.4.12"
#: Requests per forward pass (fixed, so a trial scores the same everywhere).
BATCH_SIZE = 8
#: lm-eval's own default seeds, passed explicitly so every trial uses them.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
         "fewshot_random_seed": 1234}
#: Primary metric preference (then the first numeric metric reported).
PREFERRED = ("acc_norm", "acc")
#: ``datasets`` builders that read local files (no hub).
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class LmEvalTasks:
    """The checked task list (picklable; sent to the workers)."""

    #: What ``simple_evaluate`` gets: names, or absolute YAML paths.
    specs: Tuple[str, ...]
    #: The task or group name of each spec (its key in lm-eval's results).
    names: Tuple[str, ...]
    limit: Optional[int]
    #: Whether lm-eval's index of its built-in tasks is needed (a name, or a group YAML).
    registry: bool
    #: Whether every task's data are local files (then the hub is kept offline).
    offline: bool


def is_path(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or "/" in entry or os.sep in entry


_MANAGERS: Dict[bool, Any] = {}


def task_manager(registry: bool):
    """lm-eval's TaskManager, one per process (indexing the built-in tasks takes seconds)."""
    if registry not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[registry] = TaskManager(include_defaults=registry)
    return _MANAGERS[registry]


def _local_data(config: Dict[str, Any]) -> bool:
    source = config.get("dataset_path")
    return isinstance(source, str) and (source in LOCAL_BUILDERS or Path(source).expanduser().exists())


def parse(text: str, limit: Optional[int]) -> LmEvalTasks:
    """Check ``lm-eval:TASK[,TASK...]`` on the driver; SearchInputError naming the entry."""
    where = f"--eval {text}"
    if importlib.util.find_spec("lm_eval") is None:
        raise SearchInputError(f"{where}: lm-eval-harness is not installed ({INSTALL})")
    entries = [entry.strip() for entry in text[len(PREFIX):].split(",")]
    if not entries or not all(entries):
        raise SearchInputError(f"{where}: expected lm-eval:TASK[,TASK...] (task names or task YAML paths)")
    try:
        from lm_eval.tasks._index import TaskIndex
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise SearchInputError(f"{where}: lm-eval-harness is older than {MINIMUM} ({INSTALL})") from None

    specs: List[str] = []
    names: List[str] = []
    registry = False
    offline = True
    for entry in entries:
        if not is_path(entry):
            specs.append(entry)
            names.append(entry)
            registry, offline = True, False
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_file():
            raise SearchInputError(f"{where}: task file {entry}: no such file")
        try:
            config = load_yaml(path, resolve_func=False)
            kind = TaskIndex._kind_of(config).name
        except Exception as error:  # noqa: BLE001 - the user's YAML: one line
            raise SearchInputError(
                f"{where}: task file {entry}: not an lm-eval task YAML ({type(error).__name__}: {error})"
            ) from None
        name = config.get("task") if kind in ("TASK", "PY_TASK") else config.get("group")
        if not isinstance(name, str) or not name:
            raise SearchInputError(f"{where}: task file {entry}: has no task name")
        single = kind == "TASK"
        registry = registry or not single
        offline = offline and single and _local_data(config)
        specs.append(str(path))
        names.append(name)
    for name in names:
        if names.count(name) > 1:
            raise SearchInputError(f"{where}: task {name} is given twice")
    if registry:
        known = set(task_manager(True).all_tasks)
        for entry in entries:
            if not is_path(entry) and entry not in known:
                raise SearchInputError(f"{where}: lm-eval does not know a task named {entry!r}")
    return LmEvalTasks(specs=tuple(specs), names=tuple(names), limit=limit, registry=registry,
                       offline=offline)


@contextlib.contextmanager
def hub_offline(on: bool):
    """The Hugging Face hub and ``datasets`` offline for the duration (restored after)."""
    if not on:
        yield
        return
    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update({key: "1" for key in _OFFLINE_ENV})
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read these at import; their checks read the module values.
    patched = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
               (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(module, name, getattr(module, name, None)) for module, name in patched]
    for module, name in patched:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _no_environment_report():
    """simple_evaluate's report of the environment (git hash, ``collect_env``: a dozen
    subprocesses, about a second per call) skipped: metadata, not part of any metric."""
    import lm_eval.evaluator as evaluator

    saved = {name: getattr(evaluator, name) for name in ("add_env_info", "get_git_commit_hash")
             if hasattr(evaluator, name)}
    if "add_env_info" in saved:
        evaluator.add_env_info = lambda results: None
    if "get_git_commit_hash" in saved:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(evaluator, name, value)


def evaluate(tasks: LmEvalTasks, model, tokenizer) -> Dict[str, Any]:
    """``lm_eval.simple_evaluate``'s results for ``model`` (HFLM on the in-memory model)."""
    if tokenizer is None:
        raise ValueError("lm-eval needs a tokenizer and the base model has none")
    with hub_offline(tasks.offline), _no_environment_report():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
        return lm_eval.simple_evaluate(
            model=wrapper, tasks=list(tasks.specs), limit=tasks.limit,
            task_manager=task_manager(tasks.registry), bootstrap_iters=0, log_samples=False,
            **SEEDS,
        )


def _metrics(row: Dict[str, Any]) -> List[Tuple[str, str, float]]:
    """``(metric, filter, value)`` of a results row, in lm-eval's order (no stderr)."""
    found = []
    for key, value in row.items():
        metric, comma, filter_name = str(key).partition(",")
        if not comma or metric.endswith("_stderr"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        found.append((metric, filter_name, float(value)))
    return found


def primary_metric(row: Dict[str, Any]) -> Optional[Tuple[str, str, float]]:
    """The primary ``(metric, filter, value)`` of a results row (module docstring's rule)."""
    found = _metrics(row)
    for wanted in PREFERRED:
        for item in found:
            if item[0] == wanted:
                return item
    return found[0] if found else None


def _label(metric: str, filter_name: str) -> str:
    return metric if filter_name in ("", "none") else f"{metric},{filter_name}"


def _primary_value(results: Dict[str, Any], name: str, seen=()) -> Tuple[str, float]:
    chosen = primary_metric(results["results"].get(name, {}))
    if chosen is not None:
        return _label(chosen[0], chosen[1]), chosen[2]
    subtasks = [s for s in (results.get("group_subtasks") or {}).get(name, []) if s not in seen]
    if not subtasks:
        raise ValueError(f"lm-eval reported no numeric metric for {name}")
    values = [_primary_value(results, sub, (*seen, name))[1] for sub in subtasks]
    return "mean of subtasks", math.fsum(values) / len(values)


def summarize(tasks: LmEvalTasks, results: Dict[str, Any]) -> Dict[str, Any]:
    """``{"score": mean primary metric, "<task>/<metric>": value, ...}`` of lm-eval's results."""
    summary: Dict[str, Any] = {}
    scores = []
    for name in tasks.names:
        label, value = _primary_value(results, name)
        scores.append(value)
        summary[f"{name}/primary"] = label
        for metric, filter_name, number in _metrics(results["results"].get(name, {})):
            summary[f"{name}/{_label(metric, filter_name)}"] = number
        samples = (results.get("n-samples") or {}).get(name)
        if isinstance(samples, dict) and "effective" in samples:
            summary[f"{name}/samples"] = samples["effective"]
    return {"score": math.fsum(scores) / len(scores), **summary}


class LmEvalEval:
    """The worker's eval for ``--eval lm-eval:...``: called as ``(model, tokenizer)``."""

    def __init__(self, tasks: LmEvalTasks):
        self.tasks = tasks

    def __call__(self, model, tokenizer) -> Dict[str, Any]:
        return summarize(self.tasks, evaluate(self.tasks, model, tokenizer))
