"""One trial in memory: merge with mergekit's own planner, build the model, run the eval.

The merge is planned by mergekit's public ``MergePlanner.plan_to_disk()`` (the
planner ``mergekit-yaml`` uses) and only its tensor tasks are run by mergekit's
``Executor``, never its writer: the same tasks as ``mergekit-yaml`` (tensor names, aliases,
per-tensor parameters, input dtype promotion, ``dtype``/``out_dtype`` casts,
the registered ``circuit`` method and so the kernel), minus the writer. So a
trial's tensors are exactly what ``mergekit-yaml`` writes for the trial's
recipe, and their digest (computed in memory with the record scheme of
:mod:`circuit_merge_plugin.io.digest`) equals ``circuit-merge digest`` of the
written model. mergekit's loader cache keeps every input memory-mapped
(safetensors) for the life of the worker: each input is opened once, and a
trial reads its pages from the page cache.

The model is built from the configuration mergekit would write (the base's,
with ``dtype``/``out_dtype``) with its weights assigned from the merged tensors
(no copy), moved to the trial's device and handed to the eval with the base's
tokenizer (None when the base has no tokenizer files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from circuit_merge_plugin.adapters.methods import mergekit_version
from circuit_merge_plugin.io.digest import TORCH_DTYPE_CODES, combine, record_hash
from circuit_merge_plugin.search.evaluation import (
    TOKENIZER_FILES,
    EvalSpec,
    TrialFailed,
    has_tokenizer,
    load_function,
    run_command,
    score_of,
)


def tensors_digest(tensors: Dict[str, Any]) -> str:
    """``circuit-merge digest`` of a model made of ``tensors`` (name -> torch tensor)."""
    import torch

    digests = {}
    for name, tensor in tensors.items():
        code = TORCH_DTYPE_CODES.get(str(tensor.dtype))
        if code is None:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no safetensors code")
        record = record_hash(name, code, tuple(tensor.shape))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        record.update(memoryview(data.numpy()))
        digests[name] = record.digest().hex()
    return combine(digests)


#: ``plan_to_disk()`` needs an output path for its writer task; a trial never
#: runs that task, so nothing is ever written there.
UNWRITTEN = "(circuit-merge search: merged in memory, never written)"


class MergekitApiError(RuntimeError):
    """The installed mergekit lacks a call the search's trial merge needs."""


def _missing(what: str) -> MergekitApiError:
    return MergekitApiError(
        f"mergekit {mergekit_version()} has no {what}, which circuit-merge search needs "
        "for its in-memory trial merge; install mergekit 0.1.5 or 0.1.4"
    )


def check_mergekit() -> None:
    """One-line :class:`MergekitApiError` when the planner calls a trial uses are absent."""
    from mergekit import merge
    from mergekit.plan import MergePlanner

    if not callable(getattr(merge, "_model_out_config", None)):
        raise _missing("mergekit.merge._model_out_config")
    if not callable(getattr(MergePlanner, "plan_to_disk", None)):
        raise _missing("MergePlanner.plan_to_disk")


def out_model_config(config, arch_info):
    """The output model's configuration, as ``mergekit-yaml`` writes it.

    mergekit has no public call for it: this is the one use of a private
    mergekit function (``mergekit.merge._model_out_config``, the same in 0.1.4
    and 0.1.5), checked by :func:`check_mergekit`.
    """
    check_mergekit()
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=False)


def tensor_save_tasks(planner) -> List[Any]:
    """The recipe's ``SaveTensor`` tasks from the public ``plan_to_disk()``.

    Each holds what ``mergekit-yaml`` writes for one tensor: its name, the task
    computing it (``tensor_task``), whether it is ``optional``, and the
    ``dtype`` it is cast to. The writer task they point to is never run.
    (``plan_in_memory()`` would be the natural call, but in mergekit 0.1.5
    building its ``ReturnTensor`` tasks raises ``TypeError``.)
    """
    from mergekit.io.tasks import SaveTensor

    saves = [task for task in planner.plan_to_disk(out_path=UNWRITTEN) if isinstance(task, SaveTensor)]
    if not saves:
        raise MergekitApiError(
            f"mergekit {mergekit_version()}: MergePlanner.plan_to_disk() planned no SaveTensor "
            "task, which circuit-merge search needs for its in-memory trial merge; "
            "install mergekit 0.1.5 or 0.1.4"
        )
    return saves


def _no_init():
    """transformers' context that skips weight initialisation (both major versions)."""
    for module, name in (
        ("transformers.initialization", "no_init_weights"),
        ("transformers.modeling_utils", "no_init_weights"),
    ):
        try:
            return getattr(__import__(module, fromlist=[name]), name)()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build_model(config, tensors: Dict[str, Any], device: str):
    """A transformers model of ``config`` whose weights are ``tensors`` (assigned, not copied)."""
    import torch
    import transformers

    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    with _no_init():
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    missing, _unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if missing:
        loaded = {t.data_ptr() for t in tensors.values()}
        state = model.state_dict()
        untied = [k for k in missing if k in state and state[k].data_ptr() not in loaded]
        if untied:
            raise ValueError(
                f"the merged model lacks {len(untied)} weight(s) its class needs, e.g. {untied[0]}"
            )
    model.eval()
    with torch.no_grad():
        model.to(device)
    return model


class TrialRunner:
    """Runs trials in one process; keeps the inputs memory-mapped between trials."""

    def __init__(self, eval_spec: EvalSpec, *, device: Optional[str] = None, threads: Optional[int] = None):
        import torch

        import circuit_merge_plugin  # noqa: F401 - registers ``circuit`` with mergekit
        from circuit_merge_plugin.adapters.registration import register_entry_points

        register_entry_points()
        check_mergekit()  # a worker that cannot merge refuses to start, in one line
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.eval_spec = eval_spec
        self.function = None if eval_spec.needs_model_files else load_function(eval_spec)
        self._tokenizers: Dict[str, Any] = {}
        self.where = f"{socket.gethostname()}:{os.getpid()}:{device}"

    # -------------------------------------------------------------- merge

    def merge(self, recipe: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
        """``(tensors by name, output config)`` of the recipe, as mergekit-yaml computes them."""
        from mergekit.architecture import get_architecture_info
        from mergekit.common import dtype_from_name
        from mergekit.config import MergeConfiguration
        from mergekit.graph import Executor
        from mergekit.io.tasks import LoaderCache
        from mergekit.options import MergeOptions
        from mergekit.plan import MergePlanner

        config = MergeConfiguration.model_validate(recipe)
        options = MergeOptions(device=self.device, quiet=True, copy_tokenizer=False,
                               write_model_card=False)
        LoaderCache().setup(options=options)
        arch_info = get_architecture_info(config, options)
        out_config = out_model_config(config, arch_info)
        planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
        saves = tensor_save_tasks(planner)
        executor = Executor([save.tensor_task for save in saves], math_device=self.device,
                            storage_device=self.device)
        values = dict(executor.run(quiet=True))
        tensors = {}
        for save in saves:  # what SaveTensor.execute does, minus the writer
            value = values.get(save.tensor_task)
            if value is None:
                if not save.optional:
                    raise RuntimeError(f"no value for required tensor {save.tensor_name}")
                continue
            if save.dtype:
                value = value.to(dtype=dtype_from_name(save.dtype))
            tensors[save.tensor_name] = value
        return tensors, out_config

    def tokenizer(self, base: str):
        if base not in self._tokenizers:
            tokenizer = None
            if has_tokenizer(base):
                import transformers

                tokenizer = transformers.AutoTokenizer.from_pretrained(str(Path(base)))
            self._tokenizers[base] = tokenizer
        return self._tokenizers[base]

    # -------------------------------------------------------------- one trial

    def run(self, recipe: Dict[str, Any]) -> Dict[str, Any]:
        """Merge, digest and evaluate; a dict with ``score`` or ``error`` (never raises
        for a failing eval or merge: the search goes on)."""
        started = time.perf_counter()
        result: Dict[str, Any] = {"where": self.where}
        try:
            tensors, out_config = self.merge(recipe)
            result["digest"] = tensors_digest(tensors)
            result["merge_s"] = round(time.perf_counter() - started, 4)
            evaluated = time.perf_counter()
            if self.eval_spec.needs_model_files:
                score, extras = self._run_command(recipe, tensors, out_config), {}
            else:
                model = build_model(out_config, tensors, self.device)
                del tensors
                try:
                    raw = self.function(model, self.tokenizer(recipe["base_model"]))
                except Exception as error:  # noqa: BLE001 - the user's eval: recorded
                    raise TrialFailed(f"eval raised {type(error).__name__}: {error}") from None
                score, extras = score_of(raw)
            result["eval_s"] = round(time.perf_counter() - evaluated, 4)
            result["score"] = score
            result["extras"] = extras
        except TrialFailed as error:
            result["error"] = _one_line(str(error))
        except Exception as error:  # noqa: BLE001 - the merge itself failed: recorded
            tail = traceback.extract_tb(error.__traceback__)[-1:]
            where = f" ({Path(tail[0].filename).name}:{tail[0].lineno})" if tail else ""
            result["error"] = _one_line(f"merge failed: {type(error).__name__}: {error}{where}")
        result["wall_s"] = round(time.perf_counter() - started, 4)
        return result

    def _run_command(self, recipe, tensors, out_config) -> float:
        from safetensors.torch import save_file

        directory = tempfile.mkdtemp(prefix="circuit-search-model-")
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
            out_config.save_pretrained(directory)
            base = Path(recipe["base_model"])
            for name in TOKENIZER_FILES:
                if (base / name).is_file():
                    shutil.copy2(base / name, os.path.join(directory, name))
            return run_command(self.eval_spec.command, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _one_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else "failed"
