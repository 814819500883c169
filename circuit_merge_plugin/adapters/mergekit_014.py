"""Circuit-Merge as a mergekit 0.1.4 ``MergeMethod``.

A thin adapter over the same kernel as :mod:`circuit_merge_plugin.adapters.mergekit_015`,
built to give byte-identical output tensors for the same recipe, seed and inputs:

* the same parameter names and defaults (from :mod:`circuit_merge_plugin.core.params`),
  validated through :func:`~circuit_merge_plugin.core.params.check_parameter` in
  :meth:`CircuitMerge014.make_task`, i.e. while mergekit plans the merge and
  before any tensor is loaded or merged;
* variants in the order of ``models:`` (first listed = highest priority), the
  output weight name as the tensor name, model names as error labels;
* the seed rule: the recipe's ``seed``, else ``torch.initial_seed()`` (what
  ``mergekit-yaml --random-seed`` sets), resolved when the tensor is merged;
* 0.1.5's graph-adapter rules, replayed in :meth:`CircuitMergeTask.execute`:
  inputs promoted to a common dtype (``torch.promote_types``) before the kernel,
  autocast off, non-floating buffers copied when all inputs agree, an optional
  weight present only in the base passed through, the result left in the
  compute dtype for mergekit's ``SaveTensor`` to cast to ``out_dtype``.

mergekit 0.1.4 parses every recipe number as a float (its parameter type is
``float | list[float]``, so ``true`` arrives as ``1.0`` and ``42`` as
``42.0``). :func:`check_014` undoes that for ``rescale`` (``1.0``/``0.0`` are
the parsed ``true``/``false``) and ``seed`` (an integral float), and refuses
seeds beyond 2**53, which the float parse cannot have kept exact.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.base import (
    ConfigParameterDef,
    MergeMethod,
    MergeTensorInput,
)

from circuit_merge_plugin import METHOD_NAME, PRETTY_NAME, REFERENCE_URL
from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    OUTPUT_PARAMETERS,
    VARIANT_PARAMETERS,
    check_parameter,
)
from circuit_merge_plugin.adapters import seeds
from circuit_merge_plugin.adapters.dispatch import merge_tensor
from circuit_merge_plugin.io.report_file import REPORT_ENV

#: Largest seed magnitude a float64 (mergekit 0.1.4's parsed recipe number)
#: represents exactly together with all its neighbours.
MAX_EXACT_SEED = 2**53


def check_014(name: str, value: Any) -> Any:
    """:func:`check_parameter` for values that went through 0.1.4's float parse."""
    if name == "report" and value is not None and not isinstance(value, str):
        raise ValueError(
            f"report must be a path, got {value!r}: mergekit 0.1.4 reads recipe "
            f"values as numbers, so set the environment variable {REPORT_ENV}=PATH instead"
        )
    if name == "rescale" and isinstance(value, float) and value in (0.0, 1.0):
        value = value == 1.0
    elif name == "seed" and isinstance(value, float):
        if value.is_integer() and abs(value) > MAX_EXACT_SEED:
            raise ValueError(
                f"seed must be an integer in [-2**53, 2**53] under mergekit 0.1.4, "
                f"which reads recipe numbers as floats; got {value!r}"
            )
    return check_parameter(name, value)


def _ordered_keys(mapping: Any) -> Optional[List[Any]]:
    """Keys of an insertion-ordered mapping (or ImmutableMap over one), else None."""
    data = getattr(mapping, "data", mapping)
    if isinstance(data, dict):
        return list(data.keys())
    return None


def _input_mapping(tensors: Any) -> Any:
    """The model-keyed map behind a 0.1.4 ``MergeTensorInput``, if there is one."""
    for attribute in ("weight_info", "tensors"):  # GatherTensors, TensorDictWrapper
        if hasattr(tensors, attribute):
            return getattr(tensors, attribute)
    inner = getattr(tensors, "gather_tensors", None)  # PermutedEmbeddings
    return _input_mapping(inner) if inner is not None else None


def _model_order(tensors: Any, tensor_parameters: Any) -> Tuple[ModelReference, ...]:
    """Input models in recipe order.

    mergekit 0.1.4's planner builds ``tensor_parameters`` (and the inputs' weight
    map) from plain dicts in the order of the slice sources, i.e. the order of
    ``models:`` with an unlisted base appended, and wraps them unchanged, so
    their key order is the recipe's priority order.
    """
    order = _ordered_keys(tensor_parameters)
    inputs = _ordered_keys(_input_mapping(tensors))
    if order is None:
        order = inputs
    if order is None:
        raise RuntimeError(
            "circuit: cannot tell the order of the input models (priority) from "
            "what mergekit passed to make_task"
        )
    order = list(order)
    for model in inputs or ():
        if model not in order:
            order.append(model)
    return tuple(order)


class CircuitMergeTask(Task[torch.Tensor]):
    """Merges one output tensor; receives the gathered tensors per model."""

    gather_tensors: MergeTensorInput
    weight_info: WeightInfo
    base_model: ModelReference
    model_order: Tuple[ModelReference, ...]
    #: Validated global parameters as (name, value) pairs; seed may be None.
    global_values: Tuple[Tuple[str, Any], ...]
    #: Validated drop_rate override per non-base model (None = computed).
    drop_rates: Tuple[Tuple[ModelReference, Optional[float]], ...]
    #: The ``report`` path (never from a 0.1.4 recipe, which holds only numbers).
    report: Optional[str] = None

    def arguments(self) -> Dict[str, Task]:
        return {"tensors": self.gather_tensors}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> Optional[str]:
        return self.gather_tensors.group_label()

    def execute(
        self, tensors: Dict[ModelReference, torch.Tensor], **_kwargs
    ) -> torch.Tensor:
        name = self.weight_info.name
        present = [
            (model, tensor)
            for model in self.model_order
            if (tensor := tensors.get(model)) is not None
        ]
        if (
            self.weight_info.optional
            and len(present) == 1
            and len(present) < len(self.model_order)
            and present[0][0] == self.base_model
        ):
            return present[0][1]  # optional weight only the base has: passthrough
        models = [model for model, _ in present]
        if self.base_model not in models:
            raise ValueError(f"Base input is not present in merge inputs for {name}")
        variants = [(m, t) for m, t in present if m != self.base_model]
        if not variants:
            raise ValueError(
                f"Merge method requires at least 1 non-base inputs for {name}; got 0"
            )
        all_tensors = [tensor for _, tensor in present]
        if not all(tensor.is_floating_point() for tensor in all_tensors):
            first = all_tensors[0]
            if any(
                t.dtype != first.dtype or not torch.equal(t, first)
                for t in all_tensors[1:]
            ):
                raise ValueError(
                    f"Non-floating buffer {name!r} differs between inputs; "
                    "resolve it explicitly before merging"
                )
            return first.clone()
        shapes = [tuple(tensor.shape) for tensor in all_tensors]
        if len(set(shapes)) != 1:
            raise ValueError(f"Tensor size mismatch for {name}: {shapes}")
        if len({tensor.device for tensor in all_tensors}) != 1:
            raise ValueError(f"Inputs for {name} must have the same device")

        dtype = all_tensors[0].dtype
        for tensor in all_tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        base = tensors[self.base_model].to(dtype=dtype)
        overrides = dict(self.drop_rates)
        params, seed_source = seeds.resolve(dict(self.global_values))
        with torch.autocast(device_type=base.device.type, enabled=False):
            return merge_tensor(
                base,
                [tensor.to(dtype=dtype) for _, tensor in variants],
                params,
                self.report,
                drop_rate=[overrides.get(model) for model, _ in variants],
                name=name,
                labels=[str(self.base_model), *(str(m) for m, _ in variants)],
                seed_source=seed_source,
            )


class CircuitMerge014(MergeMethod):
    """``merge_method: circuit``: priority is the order of ``models:``."""

    def name(self) -> str:
        return METHOD_NAME

    def pretty_name(self) -> Optional[str]:
        return PRETTY_NAME

    def reference_url(self) -> Optional[str]:
        return REFERENCE_URL

    def parameters(self) -> List[ConfigParameterDef]:
        return [
            ConfigParameterDef(name=info.name, required=False, default_value=info.default)
            for info in GLOBAL_PARAMETERS + OUTPUT_PARAMETERS
        ]

    def tensor_parameters(self) -> List[ConfigParameterDef]:
        return [
            ConfigParameterDef(name=info.name, required=False, default_value=info.default)
            for info in VARIANT_PARAMETERS
        ]

    def make_task(
        self,
        *,
        output_weight: WeightInfo,
        tensors: MergeTensorInput,
        parameters: ImmutableMap[str, Any],
        tensor_parameters: ImmutableMap[ModelReference, ImmutableMap[str, Any]],
        base_model: Optional[ModelReference],
        **_kwargs,
    ) -> Task:
        name = output_weight.name
        if base_model is None:
            raise ValueError(
                f"Merge method {METHOD_NAME} requires a base input for {name} "
                "(set base_model in the recipe)"
            )
        order = _model_order(tensors, tensor_parameters)
        if base_model not in order:
            raise ValueError(f"Base input is not present in merge inputs for {name}")
        variants = [model for model in order if model != base_model]
        if not variants:
            raise ValueError(
                f"Merge method {METHOD_NAME} requires at least 1 non-base inputs "
                f"for {name}; got 0"
            )

        global_values = []
        for info in GLOBAL_PARAMETERS:
            value = parameters[info.name] if info.name in parameters else info.default
            try:
                global_values.append((info.name, check_014(info.name, value)))
            except ValueError as error:
                raise ValueError(f"{error} (tensor {name})") from None

        report = parameters["report"] if "report" in parameters else None
        try:
            report = check_014("report", report)
        except ValueError as error:
            raise ValueError(f"{error} (tensor {name})") from None

        drop_rates = []
        for model in variants:
            model_values = (
                tensor_parameters[model] if model in tensor_parameters else {}
            )
            value = model_values["drop_rate"] if "drop_rate" in model_values else None
            try:
                drop_rates.append((model, check_014("drop_rate", value)))
            except ValueError as error:
                raise ValueError(f"{error} (model {model}, tensor {name})") from None

        return CircuitMergeTask(
            gather_tensors=tensors,
            weight_info=output_weight,
            base_model=base_model,
            model_order=order,
            global_values=tuple(global_values),
            drop_rates=tuple(drop_rates),
            report=report,
        )


def circuit_method() -> CircuitMerge014:
    return CircuitMerge014()


# If this module was imported before mergekit, registration was deferred to here.
from circuit_merge_plugin.adapters.registration import register_after_import  # noqa: E402

register_after_import()
