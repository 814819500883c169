"""The user's evaluation: ``--eval FILE.py:function`` / ``package.module:function``,
``--eval lm-eval:TASK[,TASK...]`` (lm-eval-harness, :mod:`.lmeval`) or
``--eval-cmd "COMMAND {model}"``.

The function is called as ``function(model, tokenizer)`` and returns a number
(higher is better) or a dict with a ``score`` key (its other keys are recorded).
A file's source is read by the driver and sent to the workers, so a cluster's
nodes need not share a file system; a ``package.module`` must be importable on
every node. ``lm-eval:`` tasks are checked on the driver and run by
:class:`circuit_merge_plugin.search.lmeval.LmEvalEval` on the workers. The command gets the merged model's directory in place of
``{model}``; the last non-empty line of its standard output is the score.
Standard library only.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from circuit_merge_plugin.search import lmeval
from circuit_merge_plugin.search.space import SearchInputError

LM_EVAL_PREFIX = lmeval.PREFIX
MODEL_PLACEHOLDER = "{model}"

#: Files that make a tokenizer (any of them present in the base: load one).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def has_tokenizer(model: str) -> bool:
    """Whether ``model`` is a local directory with tokenizer files."""
    directory = Path(model).expanduser()
    return directory.is_dir() and any((directory / name).exists() for name in TOKENIZER_FILES)


class TrialFailed(Exception):
    """The eval of one trial raised or returned something that is not a score."""


@dataclass(frozen=True)
class EvalSpec:
    """What every worker needs to run the eval (picklable)."""

    text: str
    function: Optional[str] = None
    module: Optional[str] = None
    file: Optional[str] = None
    source: Optional[str] = None
    command: Optional[str] = None
    #: ``--eval lm-eval:...``: the checked tasks and ``--eval-limit``.
    lm_eval: Optional[lmeval.LmEvalTasks] = None
    #: The driver's working directory, put on the workers' import path.
    cwd: Optional[str] = None

    @property
    def needs_model_files(self) -> bool:
        return self.command is not None


def parse_eval(eval_text: Optional[str], eval_cmd: Optional[str],
               limit: Optional[int] = None) -> EvalSpec:
    """Check ``--eval``/``--eval-cmd`` (and ``--eval-limit``, lm-eval only) and load
    the function once (signature check)."""
    if (eval_text is None) == (eval_cmd is None):
        raise SearchInputError("give exactly one of --eval FUNCTION and --eval-cmd COMMAND")
    if eval_cmd is not None:
        if MODEL_PLACEHOLDER not in eval_cmd:
            raise SearchInputError(f"--eval-cmd {eval_cmd!r}: must contain {MODEL_PLACEHOLDER}")
        return EvalSpec(text=eval_cmd, command=eval_cmd)
    if eval_text.startswith(LM_EVAL_PREFIX):
        return EvalSpec(text=eval_text, lm_eval=lmeval.parse(eval_text, limit))
    target, sep, function = eval_text.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise SearchInputError(
            f"--eval {eval_text}: expected path/to/file.py:function or package.module:function"
        )
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser()
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as error:
            raise SearchInputError(f"--eval {eval_text}: cannot read {target} ({error.strerror or error})") from None
        spec = EvalSpec(text=eval_text, function=function, file=str(path.resolve()), source=source,
                        cwd=os.getcwd())
    else:
        spec = EvalSpec(text=eval_text, function=function, module=target, cwd=os.getcwd())
    load_function(spec)
    return spec


def _module_from_source(spec: EvalSpec) -> types.ModuleType:
    name = "circuit_merge_search_eval_" + hashlib.sha256(spec.file.encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__search_source__", None) == spec.source:
        return module
    module = types.ModuleType(name)
    module.__file__ = spec.file
    module.__search_source__ = spec.source
    sys.modules[name] = module
    directory = str(Path(spec.file).parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        exec(compile(spec.source, spec.file, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_function(spec: EvalSpec) -> Callable:
    """The eval function (driver and workers); SearchInputError naming the problem."""
    if spec.lm_eval is not None:
        return lmeval.LmEvalEval(spec.lm_eval)
    if spec.cwd and spec.cwd not in sys.path:
        sys.path.append(spec.cwd)
    try:
        if spec.file is not None:
            module = _module_from_source(spec)
        else:
            module = importlib.import_module(spec.module)
    except Exception as error:  # noqa: BLE001 - the user's module: one line
        raise SearchInputError(
            f"--eval {spec.text}: cannot import it ({type(error).__name__}: {error})"
        ) from None
    function = getattr(module, spec.function, None)
    if function is None:
        raise SearchInputError(f"--eval {spec.text}: no function {spec.function!r} in it")
    if not callable(function):
        raise SearchInputError(f"--eval {spec.text}: {spec.function} is not callable")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError:
        raise SearchInputError(
            f"--eval {spec.text}: {spec.function} must take (model, tokenizer)"
        ) from None
    except ValueError:  # no signature (a builtin): called and judged by its result
        pass
    return function


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        import numbers

        if isinstance(value, numbers.Real):
            return float(value)
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-dim tensor / array
            item = value.item()
            return float(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else None
    except (TypeError, ValueError):
        return None
    return None


def _recordable(value: Any) -> Any:
    number = _number(value)
    if number is not None:
        return number if math.isfinite(number) else str(number)
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_recordable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _recordable(v) for k, v in value.items()}
    return str(value)


def score_of(result: Any) -> Tuple[float, Dict[str, Any]]:
    """``(score, other keys)`` from an eval's return value; TrialFailed if it is not one."""
    extras: Dict[str, Any] = {}
    value = result
    if isinstance(result, dict):
        if "score" not in result:
            raise TrialFailed(f"eval returned a dict without a 'score' key ({sorted(map(str, result))})")
        value = result["score"]
        extras = {str(k): _recordable(v) for k, v in result.items() if k != "score"}
    score = _number(value)
    if score is None:
        raise TrialFailed(f"eval returned {value!r:.80}, not a number")
    if not math.isfinite(score):
        raise TrialFailed(f"eval returned {score}, not a finite number")
    return score, extras


def run_command(command: str, model_dir: str, timeout: Optional[float] = None) -> float:
    """Run ``--eval-cmd`` on a written model; the last output line is the score."""
    line = command.replace(MODEL_PLACEHOLDER, shlex.quote(model_dir))
    try:
        done = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TrialFailed(f"--eval-cmd timed out after {timeout} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise TrialFailed(
            f"--eval-cmd exited with {done.returncode}" + (f": {tail[-1][:200]}" if tail else "")
        )
    lines = [text.strip() for text in done.stdout.splitlines() if text.strip()]
    if not lines:
        raise TrialFailed("--eval-cmd printed nothing (its last line must be the score)")
    try:
        score = float(lines[-1])
    except ValueError:
        raise TrialFailed(f"--eval-cmd's last line {lines[-1][:80]!r} is not a number") from None
    if not math.isfinite(score):
        raise TrialFailed(f"--eval-cmd's score {lines[-1]!r} is not a finite number")
    return score
