"""Circuit-Merge as a mergekit 0.1.5 ``GroupMergeMethod``.

A thin adapter: mergekit resolves and validates the recipe parameters (through
the validators below, shared with every front end), loads and aligns the
tensors, and hands one :class:`TensorGroup` per output tensor to
:meth:`CircuitMerge.merge_group`, which calls the kernel. With the recipe
parameter ``report: PATH`` (or ``CIRCUIT_MERGE_REPORT``) the counting kernel,
which merges to the same bytes, also adds the tensor's counts to the report
file (:func:`circuit_merge_plugin.adapters.dispatch.merge_tensor`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import AfterValidator
from typing_extensions import Annotated

from circuit_merge_plugin import METHOD_NAME, PRETTY_NAME, REFERENCE_URL
from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    OUTPUT_PARAMETERS,
    VARIANT_PARAMETERS,
    check_parameter,
)
from circuit_merge_plugin.adapters import seeds
from circuit_merge_plugin.adapters.dispatch import merge_tensor
from circuit_merge_plugin.adapters.mergekit_run import check_recipe


def _validated(name: str) -> Any:
    return Annotated[Any, AfterValidator(lambda value: check_parameter(name, value))]


def _spec_parameters():
    scopes = ((GLOBAL_PARAMETERS + OUTPUT_PARAMETERS, ParameterScope.SHARED),
              (VARIANT_PARAMETERS, ParameterScope.NON_BASE))
    for table, scope in scopes:
        for info in table:
            yield ParameterSpec(info.name, _validated(info.name), scope,
                                default=info.default, description=info.meaning)


class CircuitMerge(GroupMergeMethod):
    """``merge_method: circuit``: priority is the order of ``models:``."""

    @cached_property
    def spec(self) -> MergeMethodSpec:
        return MergeMethodSpec(
            name=METHOD_NAME,
            pretty_name=PRETTY_NAME,
            reference_url=REFERENCE_URL,
            parameters=tuple(_spec_parameters()),
            contract=InputContract(
                base=BasePolicy.REQUIRED, min_inputs=2, min_non_base=1
            ),
            optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base
        variants = group.non_base
        drop_rate = parameters.get("drop_rate") or {}
        params, seed_source = seeds.resolve(parameters)
        return merge_tensor(
            base.tensor,
            [entry.tensor for entry in variants],
            params,
            parameters.get("report"),
            drop_rate=[drop_rate.get(entry.id) for entry in variants],
            name=group.metadata.name or "",
            labels=[str(entry.id) for entry in (base, *variants)],
            seed_source=seed_source,
        )

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        """mergekit's structural check, then (once per recipe, while mergekit
        plans) the recipe's parameter values, so an out-of-range per-model
        value names its model; see :func:`~circuit_merge_plugin.adapters.mergekit_run.check_recipe`."""
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        check_recipe()


def circuit_method() -> CircuitMerge:
    return CircuitMerge()


# If this module was imported before mergekit, registration was deferred to here.
from circuit_merge_plugin.adapters.registration import register_after_import  # noqa: E402

register_after_import()
