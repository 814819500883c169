"""Circuit-Merge parameters: defaults, allowed ranges and refusals.

Spec: temperature T=0.0 in [0,1]; base_droprate b=0.5 in [0,1);
meaningful_change_threshold=2e-6 (>= 0); epsilon=0.1 in [0,1); rescale=true;
seed (int); optional per-variant drop_rate in [0,1). A parameter out of range
(or of the wrong type) is a ValueError that names the parameter.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    VARIANT_PARAMETERS,
    CircuitParams,
    check_parameter,
)

# name -> (values that must be accepted, values that must be refused)
RANGES = {
    "temperature": (
        [0, 0.0, 0.25, 0.5, 1, 1.0],
        [-1e-9, -0.5, 1.0000001, 2.0, math.nan, math.inf, -math.inf],
    ),
    "base_droprate": (
        [0, 0.0, 0.3, 0.5, 0.999999],
        [-1e-9, -0.1, 1, 1.0, 1.5, math.nan, math.inf],
    ),
    "meaningful_change_threshold": (
        [0, 0.0, 2e-6, 1e-3, 10.0],
        [-1e-12, -2e-6, -1.0, math.nan, -math.inf],
    ),
    "epsilon": (
        [0, 0.0, 0.1, 0.5, 0.999999],
        [-1e-9, -0.1, 1, 1.0, 1.5, math.nan, math.inf],
    ),
    "drop_rate": (
        [0, 0.0, 0.1, 0.5, 0.999999],
        [-1e-9, -0.1, 1, 1.0, 1.5, math.nan, math.inf],
    ),
}

# Wrong types: non-numeric strings, bools, containers, None for required ones.
WRONG_TYPES = ["high", "", "0.5x", True, False, [0.1], {"v": 0.1}, object()]

FLOAT_PARAMETERS = sorted(RANGES)


#: The documented defaults (README recipe reference).
DEFAULTS = {
    "temperature": 0.0,
    "base_droprate": 0.5,
    "meaningful_change_threshold": 2e-6,
    "epsilon": 0.1,
    "lambda": 1.0,
    "rescale": True,
    "seed": None,
}


def test_parameter_table_names_and_defaults():
    defaults = {p.name: p.default for p in GLOBAL_PARAMETERS}
    assert defaults == DEFAULTS
    assert [p.name for p in VARIANT_PARAMETERS] == ["drop_rate"]
    assert VARIANT_PARAMETERS[0].default is None
    for info in GLOBAL_PARAMETERS + VARIANT_PARAMETERS:
        assert info.meaning, f"{info.name} has no documented meaning"
        assert info.range_text, f"{info.name} has no documented range"


def test_circuit_params_defaults():
    params = CircuitParams()
    assert params.temperature == 0.0
    assert params.base_droprate == 0.5
    assert params.meaningful_change_threshold == 2e-6
    assert params.epsilon == 0.1
    assert params.rescale is True
    assert params.seed is None
    assert params.as_dict() == DEFAULTS


def test_circuit_params_is_frozen():
    params = CircuitParams(seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", FLOAT_PARAMETERS)
def test_accepted_values(name):
    for value in RANGES[name][0]:
        checked = check_parameter(name, value)
        assert isinstance(checked, float) and not isinstance(checked, bool)
        assert checked == float(value)
        if name != "drop_rate":
            assert getattr(CircuitParams(**{name: value}), name) == float(value)


@pytest.mark.parametrize("name", FLOAT_PARAMETERS)
def test_out_of_range_values_name_the_parameter(name):
    for value in RANGES[name][1]:
        with pytest.raises(ValueError, match=name):
            check_parameter(name, value)
        if name != "drop_rate":
            with pytest.raises(ValueError, match=name):
                CircuitParams(**{name: value})


@pytest.mark.parametrize("name", FLOAT_PARAMETERS)
def test_wrong_types_name_the_parameter(name):
    for value in WRONG_TYPES:
        with pytest.raises(ValueError, match=name):
            check_parameter(name, value)
        if name != "drop_rate":
            with pytest.raises(ValueError, match=name):
                CircuitParams(**{name: value})


@pytest.mark.parametrize("name", ["temperature", "base_droprate", "epsilon", "meaningful_change_threshold"])
def test_required_float_parameters_refuse_none(name):
    with pytest.raises(ValueError, match=name):
        CircuitParams(**{name: None})


def test_drop_rate_none_means_not_overridden():
    assert check_parameter("drop_rate", None) is None


def test_numeric_strings_are_still_range_checked():
    # Numeric strings are accepted (PyYAML reads "1e-6" as a string) but are
    # held to the same range as numbers.
    assert check_parameter("meaningful_change_threshold", "1e-6") == 1e-6
    assert CircuitParams(meaningful_change_threshold="1e-6").meaningful_change_threshold == 1e-6
    for name, bad in [
        ("temperature", "1.5"),
        ("base_droprate", "1"),
        ("epsilon", "-0.1"),
        ("drop_rate", "1.0"),
        ("meaningful_change_threshold", "-1e-6"),
        ("temperature", "nan"),
    ]:
        with pytest.raises(ValueError, match=name):
            check_parameter(name, bad)


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, 1.0, None, [True]])
def test_rescale_must_be_a_bool(value):
    with pytest.raises(ValueError, match="rescale"):
        CircuitParams(rescale=value)
    with pytest.raises(ValueError, match="rescale"):
        check_parameter("rescale", value)


def test_rescale_accepts_bools():
    assert CircuitParams(rescale=False).rescale is False
    assert CircuitParams(rescale=True).rescale is True


@pytest.mark.parametrize("value", [0, 1, 42, -7, 2**40, 2**63 - 1])
def test_seed_accepts_integers(value):
    assert CircuitParams(seed=value).seed == value


@pytest.mark.parametrize("value", ["abc", "", True, False, 1.5, math.nan, [1]])
def test_seed_refuses_non_integers(value):
    with pytest.raises(ValueError, match="seed"):
        CircuitParams(seed=value)


def test_unknown_parameter_is_refused_by_name():
    with pytest.raises(ValueError, match="droprate_typo"):
        check_parameter("droprate_typo", 0.5)
