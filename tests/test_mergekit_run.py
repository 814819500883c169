"""What the adapters read from the mergekit run on the call stack (in process):
the recipe's parameters, the per-model check, and where the seed came from.

A "mergekit frame" is made by running a small function whose module name is
``mergekit.*``, holding the objects ``run_merge`` holds (the configuration,
its YAML text, the options). Both mergekit versions parse recipes the same way here.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from circuit_merge_plugin.adapters import mergekit_run, seeds


def in_mergekit_frame(function, *, config=None, config_source=None, options=None):
    """Call ``function()`` from a frame of a module named like mergekit's."""
    namespace = {"__name__": "mergekit.fake_run"}
    exec(
        "def run_merge(merge_config, options, config_source, function):\n"
        "    return function()\n",
        namespace,
    )
    return namespace["run_merge"](config, options, config_source, function)


RECIPE = {
    "merge_method": "circuit",
    "base_model": "./base",
    "models": [
        {"model": "./v1", "parameters": {"drop_rate": 0.25}},
        {"model": "./v2"},
    ],
    "parameters": {
        "temperature": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}],
        "epsilon": [0.1, 0.2],
        "seed": 3,
    },
    "dtype": "float32",
}


def config_of(recipe):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(recipe)


def test_nothing_without_a_mergekit_run():
    assert mergekit_run.merge_options() is None
    assert mergekit_run.merge_config() == (None, None)
    assert mergekit_run.recipe_parameters() is None
    mergekit_run.check_recipe()  # nothing to check: no error


def test_recipe_parameters_as_written():
    text = yaml.safe_dump(RECIPE, sort_keys=False)
    shown = in_mergekit_frame(
        mergekit_run.recipe_parameters, config=config_of(RECIPE), config_source=text
    )
    assert shown == {
        "parameters": RECIPE["parameters"],
        "models": [{"model": "./v1", "parameters": {"drop_rate": 0.25}}, {"model": "./v2"}],
    }


def test_recipe_parameters_from_the_parsed_configuration():
    """No YAML text (a program calling run_merge): the parsed configuration,
    filters and per-model values kept, models as listed."""
    shown = in_mergekit_frame(mergekit_run.recipe_parameters, config=config_of(RECIPE))
    assert shown["models"] == [
        {"model": "./v1", "parameters": {"drop_rate": 0.25}}, {"model": "./v2"}]
    temperature = shown["parameters"]["temperature"]
    assert temperature == [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]
    assert [float(v) for v in shown["parameters"]["epsilon"]] == [0.1, 0.2]


def test_recipe_parameters_of_slices():
    recipe = {
        "merge_method": "circuit",
        "base_model": "./base",
        "slices": [{
            "sources": [
                {"model": "./base", "layer_range": [0, 2]},
                {"model": "./v1", "layer_range": [0, 2], "parameters": {"drop_rate": 0.1}},
            ],
            "parameters": {"temperature": 0.5},
        }],
    }
    shown = in_mergekit_frame(
        mergekit_run.recipe_parameters, config=config_of(recipe),
        config_source=yaml.safe_dump(recipe),
    )
    assert shown == {"slices": [{
        "sources": [
            {"model": "./base", "layer_range": [0, 2]},
            {"model": "./v1", "layer_range": [0, 2], "parameters": {"drop_rate": 0.1}},
        ],
        "parameters": {"temperature": 0.5},
    }]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"models": [{"model": "./v1"}, {"model": "./v2", "parameters": {"drop_rate": 1.2}}]},
         "drop_rate must be in [0, 1), got 1.2 (model ./v2)"),
        ({"models": [{"model": "./v1", "parameters": {
            "drop_rate": [{"filter": "mlp", "value": 1.0}, {"value": 0.1}]}}]},
         "drop_rate must be in [0, 1), got 1.0 (model ./v1, filter 'mlp')"),
        ({"models": [{"model": "./v1", "parameters": {"drop_rate": [0.1, 1.5]}}]},
         "drop_rate must be in [0, 1), got 1.5 (model ./v1)"),
        ({"parameters": {"temperature": 2}}, "temperature must be in [0, 1], got 2.0"),
        ({"slices": [{"sources": [
            {"model": "./base", "layer_range": [0, 2]},
            {"model": "./v9", "layer_range": [0, 2], "parameters": {"drop_rate": -0.5}}]}],
          "models": None},
         "drop_rate must be in [0, 1), got -0.5 (model ./v9)"),
    ],
)
def test_check_recipe_names_the_model(change, message):
    recipe = {key: value for key, value in dict(RECIPE, **change).items() if value is not None}
    with pytest.raises(ValueError) as caught:
        in_mergekit_frame(mergekit_run.check_recipe, config=config_of(recipe))
    assert str(caught.value) == message


def test_check_recipe_passes_good_values_and_ignores_other_names():
    recipe = dict(RECIPE, parameters=dict(RECIPE["parameters"], weight=7, density=0.5))
    in_mergekit_frame(mergekit_run.check_recipe, config=config_of(recipe))


# ---------------------------------------------------------------- the seed


def options(random_seed=None):
    from mergekit.options import MergeOptions

    return MergeOptions(random_seed=random_seed)


def test_seed_from_the_recipe():
    params, source = in_mergekit_frame(lambda: seeds.resolve({"seed": 8}), options=options())
    assert (params.seed, source) == (8, seeds.RECIPE)


def test_seed_from_the_random_seed_option(capsys):
    torch.manual_seed(1234)  # what mergekit-yaml --random-seed 1234 does
    params, source = in_mergekit_frame(lambda: seeds.resolve({"seed": None}), options=options(1234))
    assert (params.seed, source) == (1234, seeds.OPTION)
    assert capsys.readouterr().err == ""


def test_drawn_seed_is_printed_once(capsys, monkeypatch):
    monkeypatch.setattr(seeds, "_announced", set())
    drawn = torch.seed()  # what torch does at start-up when nobody seeds it
    for _ in range(3):
        params, source = in_mergekit_frame(lambda: seeds.resolve({}), options=options())
        assert (params.seed, source) == (drawn, seeds.DRAWN)
    err = capsys.readouterr().err
    assert err == (
        f"circuit: no seed given; drew seed {drawn} (reproduce with `seed: {drawn}` "
        f"in the recipe or mergekit-yaml --random-seed {drawn})\n"
    )


def test_seed_outside_a_mergekit_run_is_the_callers(capsys):
    torch.manual_seed(77)
    params, source = seeds.resolve({})
    assert (params.seed, source) == (77, seeds.TORCH)
    assert capsys.readouterr().err == ""
