"""Merging directories of bare tensors with mergekit's raw-tensor planning.

The original script's own case: directories of safetensors files with arbitrary tensor
names and no ``config.json`` mergekit understands. The plan is built from the
same pieces as ``mergekit-pytorch`` (``mergekit.scripts.merge_raw_pytorch``):
its ``SimpleLoadTensor`` tasks and loader cache, the registered ``circuit``
merge method's own graph task, ``SaveTensor``/``TensorWriterTask``/
``FinalizeModel`` for sharded output, run by mergekit's ``Executor``.

Differences from ``mergekit-pytorch``, to keep the original script's semantics:

* inputs are directories (any number of shard files), not single files;
* a tensor missing from some variants is merged from those that have it (so
  drop rates are computed for that smaller count, as the original script did);
* a tensor missing from the base is merged with the first variant that has it
  standing in as the base, and the other variants that have it keep the drop
  rates the original script gave them (the stand-in counts as a variant with no delta);
  present in one input only, it is copied.

The merge task is built through whichever merge-method API the installed
mergekit has (0.1.5 ``ExecuteMergeMethodTask``, 0.1.4 ``make_task``), chosen by
the presence of the API, not by version strings.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from circuit_merge_plugin.io.inputs import ModelDir
from circuit_merge_plugin.core.kernel import drop_rates
from circuit_merge_plugin.core.params import CircuitParams
from circuit_merge_plugin.io.digest import TORCH_DTYPE_CODES
from circuit_merge_plugin.io.headers import FLOAT_DTYPES, TensorHeader


def load_pickle_headers(model: ModelDir) -> None:
    """Fill ``model.tensors`` of a pickled-only directory (``--allow-pickle``).

    Loads with ``map_location="meta"``: names, dtypes and shapes, no data.
    """
    import torch

    for path in model.pickles:
        try:
            state = torch.load(str(path), map_location="meta", weights_only=True)
        except Exception as error:  # noqa: BLE001 - reported as one line
            raise ValueError(f"{model.role} {path}: cannot load ({error})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{model.role} {path}: not a state dict of tensors")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            if name in model.tensors:
                raise ValueError(
                    f"{model.role} {model.given}: tensor {name!r} is in both "
                    f"{model.tensors[name].file.name} and {path.name}"
                )
            dtype = TORCH_DTYPE_CODES.get(str(tensor.dtype), str(tensor.dtype))
            model.tensors[name] = TensorHeader(path, name, dtype, tuple(tensor.shape), 0, 0)
    if not model.tensors:
        raise ValueError(f"{model.role} {model.given}: its checkpoints hold no tensors")


def tensor_plan(
    name: str, base: ModelDir, variants: Sequence[ModelDir], params: CircuitParams
) -> Tuple[ModelDir, List[ModelDir], Optional[List[float]]]:
    """(base stand-in, variants to merge, drop-rate overrides or None) for a tensor."""
    have = [v for v in variants if name in v.tensors]
    if name in base.tensors:
        return base, have, None
    # The original script's rule: the drop rates of all the variants that have the
    # tensor, the stand-in included (it counts as a variant with no delta).
    stand_in, others = have[0], have[1:]
    rates = drop_rates(len(have), params.temperature, params.base_droprate)[1:]
    return stand_in, others, rates


def _index_for(model: ModelDir):
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex, ShardInfo

    by_file: Dict[str, List[str]] = {}
    for name, info in model.tensors.items():
        by_file.setdefault(info.file.name, []).append(name)
    return ShardedTensorIndex(
        base_path=str(model.path),
        is_safetensors=not model.pickled,
        tensor_paths={name: info.file.name for name, info in model.tensors.items()},
        shards=[ShardInfo(file, names) for file, names in sorted(by_file.items())],
    )


def _merge_task(method, name, inputs, base_ref, variant_refs, params, overrides):
    """The circuit method's graph task for one tensor, for either mergekit API."""
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap

    from circuit_merge_plugin.adapters.methods import API_015, mergekit_api

    if mergekit_api() == API_015:
        from mergekit.merge_methods.task_adapter import (
            ExecuteMergeMethodTask,
            TensorDictWrapper,
        )
    else:  # mergekit 0.1.4: methods make their own tasks
        ExecuteMergeMethodTask = None
        from mergekit.merge_methods.base import TensorDictWrapper

    rates = overrides or [None] * len(variant_refs)
    per_model = {ref: {"drop_rate": rate} for ref, rate in zip(variant_refs, rates)}
    gathered = TensorDictWrapper(tensors=ImmutableMap(data=inputs))
    weight = WeightInfo(name=name)
    if ExecuteMergeMethodTask is not None:
        per_model[base_ref] = {}
        return ExecuteMergeMethodTask(
            method_name=method.spec.name,
            gather_tensors=gathered,
            model_order=tuple(inputs),
            base_model=base_ref,
            output_weight=weight,
            parameters=ImmutableMap(data=params.as_dict()),
            input_parameters=ImmutableMap(
                data={ref: ImmutableMap(data=values) for ref, values in per_model.items()}
            ),
        )
    return method.make_task(
        output_weight=weight,
        tensors=gathered,
        parameters=ImmutableMap(data=params.as_dict()),
        tensor_parameters=ImmutableMap(
            data={ref: ImmutableMap(data=values) for ref, values in per_model.items()}
        ),
        base_model=base_ref,
    )


def plan_raw_merge(
    base: ModelDir,
    variants: Sequence[ModelDir],
    out_path: str,
    params: CircuitParams,
    *,
    dtype: Optional[str] = None,
    out_dtype: Optional[str] = None,
    out_shard_size: int = 5_000_000_000,
) -> list:
    """mergekit tasks writing the merged tensors of ``base`` + ``variants``."""
    from mergekit import merge_methods
    from mergekit.common import ModelReference
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.io.tasks import FinalizeModel, SaveTensor, TensorWriterTask
    from mergekit.scripts.merge_raw_pytorch import SimpleLoaderCache, SimpleLoadTensor

    method = merge_methods.get("circuit")
    cache = SimpleLoaderCache()
    refs = {}
    for model in (base, *variants):
        cache.loaders[str(model.path)] = LazyTensorLoader(_index_for(model), lazy_unpickle=False)
        refs[model.role] = ModelReference.model_validate({"model": {"path": str(model.path)}})

    writer = TensorWriterTask(
        out_path=out_path, max_shard_size=out_shard_size, safe_serialization=True
    )
    names = set(base.tensors)
    for variant in variants:
        names.update(variant.tensors)
    saves = []
    for name in sorted(names):
        stand_in, merging, overrides = tensor_plan(name, base, variants, params)
        is_float = stand_in.tensors[name].dtype in FLOAT_DTYPES

        def load(model: ModelDir):
            return SimpleLoadTensor(
                model=str(model.path), tensor_name=name, dtype=dtype if is_float else None
            )

        if not merging:
            task = load(stand_in)
        else:
            inputs = {refs[v.role]: load(v) for v in merging}
            inputs[refs[stand_in.role]] = load(stand_in)
            task = _merge_task(
                method,
                name,
                inputs,
                refs[stand_in.role],
                [refs[v.role] for v in merging],
                params,
                overrides,
            )
        saves.append(
            SaveTensor(
                tensor_name=name,
                tensor_task=task,
                writer_task=writer,
                clone=False,
                dtype=out_dtype if is_float else None,
            )
        )
    return saves + [FinalizeModel(tensor_save_tasks=tuple(saves), writer_task=writer)]
