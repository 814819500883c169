"""``circuit-merge search``: recipe, space, eval loading, in-memory trials, refusals.

Everything here runs without Ray (fast loop), except the trial-vs-mergekit-yaml
check (slow: a real mergekit-yaml subprocess). The searches on Ray are in
tests/test_search_ray.py.
"""

from __future__ import annotations

import itertools
import math
import socket
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from circuit_merge_plugin.io.digest import digest_directory
from circuit_merge_plugin.search import evaluation, space
from circuit_merge_plugin.search.command import search
from circuit_merge_plugin.search.engine import Proposer, Settings
from circuit_merge_plugin.search.space import Point, SearchInputError

from conftest import run_mergekit_yaml

#: Deterministic evals: a float64 sum of a corner of one merged weight (16
#: elements, no summation-order effects); ``picky`` fails below a threshold.
EVAL_SOURCE = textwrap.dedent(
    '''
    def score(model, tokenizer):
        weight = model.model.layers[0].mlp.up_proj.weight.detach()
        assert tokenizer is not None
        return {"score": float(weight[:4, :4].double().sum()), "corner": float(weight[0, 0])}

    def picky(model, tokenizer):
        weight = model.model.layers[0].mlp.up_proj.weight.detach()
        total = float(weight[:4, :4].double().sum())
        if total < -0.05:
            raise RuntimeError("picky eval refuses this merge")
        return total

    def text(model, tokenizer):
        return "high"

    def one_argument(model):
        return 1.0
    '''
)


@pytest.fixture
def eval_file(tmp_path) -> Path:
    path = tmp_path / "evals.py"
    path.write_text(EVAL_SOURCE)
    return path


def write_recipe(path: Path, family, *, variants=None, parameters=None, **extra) -> Path:
    chosen = family.variants if variants is None else variants
    recipe = {
        "merge_method": "circuit",
        "base_model": str(family.base),
        "models": [{"model": str(v)} for v in chosen],
        "parameters": dict(parameters or {}),
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe(tmp_path, llama_family):
    return space.load_recipe(str(write_recipe(tmp_path / "recipe.yaml", llama_family,
                                              parameters={"temperature": 0.3})))


# ---------------------------------------------------------------- recipe


def test_recipe_variants_in_order_and_base_entries_kept(tmp_path, llama_family):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "circuit",
        "base_model": str(llama_family.base),
        "models": [{"model": str(llama_family.base)}] + [{"model": str(v)} for v in llama_family.variants],
    }))
    parsed = space.load_recipe(str(path))
    assert parsed.variants == tuple(str(v) for v in llama_family.variants)
    assert [e["model"] for e in parsed.base_entries] == [str(llama_family.base)]


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"merge_method": "ties"}, "merge_method is 'ties'; search needs merge_method: circuit"),
        ({"base_model": None}, "base_model is missing"),
        ({"models": "x"}, "models: is missing or empty"),
        ({"slices": [{"sources": []}]}, "does not support recipes with slices:"),
        ({"parameters": {"temprature": 0.2}}, "unknown circuit parameter 'temprature'"),
    ],
)
def test_recipe_refusals(tmp_path, llama_family, change, expect):
    path = write_recipe(tmp_path / "r.yaml", llama_family)
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SearchInputError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        space.load_recipe(str(path))


def test_fewer_than_two_variants_is_refused(tmp_path, llama_family):
    path = write_recipe(tmp_path / "r.yaml", llama_family, variants=llama_family.variants[:1])
    with pytest.raises(SearchInputError, match="at least two variants to order, found 1"):
        space.load_recipe(str(path))


def test_missing_local_model_is_refused(tmp_path, llama_family):
    path = write_recipe(tmp_path / "r.yaml", llama_family,
                        variants=[*llama_family.variants[:2], tmp_path / "nowhere"])
    with pytest.raises(SearchInputError, match="nowhere: no such directory"):
        space.check_local_models(space.load_recipe(str(path)))


# ---------------------------------------------------------------- space


def test_default_space_is_order_temperature_base_droprate_lambda(recipe):
    built = space.build_space(recipe)
    assert [(d.name, d.low, d.high) for d in built.dimensions] == [
        ("temperature", 0.0, 1.0), ("base_droprate", 0.0, 0.9), ("lambda", 0.2, 1.5)]
    assert built.size() is None and not built.discrete


def test_space_and_fix_narrow_pin_and_add(recipe):
    built = space.build_space(
        recipe,
        ["temperature=0,1", "drop_rate.2=0.1:0.4", "rescale=true,false", "epsilon=0.05:0.2"],
        ["base_droprate=0.3", "lambda=1"],
    )
    by_name = {d.name: d for d in built.dimensions}
    assert by_name["temperature"].values == (0.0, 1.0)
    assert (by_name["drop_rate.2"].low, by_name["drop_rate.2"].high) == (0.1, 0.4)
    assert by_name["rescale"].values == (True, False)
    assert (by_name["epsilon"].low, by_name["epsilon"].high) == (0.05, 0.2)
    assert built.fixed == {"base_droprate": 0.3, "lambda": 1.0}
    assert "base_droprate" not in by_name and "lambda" not in by_name


def test_drop_rate_gives_every_variant_its_dimension(recipe):
    built = space.build_space(recipe, ["drop_rate=0.1,0.2"], ["temperature=0", "base_droprate=0.5",
                                                              "lambda=1"])
    assert [d.name for d in built.dimensions] == ["drop_rate.1", "drop_rate.2", "drop_rate.3"]
    assert built.size() == 6 * 2 ** 3


@pytest.mark.parametrize(
    "spaces, fixes, expect",
    [
        (["temprature=0:1"], [], "--space temprature: unknown parameter 'temprature'"),
        (["base_droprate=0:1"], [], "--space base_droprate=0:1: base_droprate must be in [0, 1), got 1.0"),
        (["lambda=0:2"], [], "lambda must be in (0, 10], got 0.0"),
        (["temperature=0.5:0.5"], [], "LOW must be below HIGH"),
        (["temperature=a,b"], [], "temperature must be a number in [0, 1], got 'a'"),
        (["temperature"], [], "expected NAME=LOW:HIGH or NAME=V1,V2,..."),
        (["rescale=0:1"], [], "rescale takes a list of values"),
        (["report=a,b"], [], "--space report: not a searchable parameter"),
        (["drop_rate.4=0:0.5"], [], "drop_rate.K needs K in 1..3"),
        (["temperature=0:1"], ["temperature=0.5"], "temperature is also pinned by --fix temperature=0.5"),
        ([], ["lambda=11"], "--fix lambda=11: lambda must be in (0, 10], got 11.0"),
        ([], ["seed=x"], "seed must be an integer"),
        ([], ["epsilon"], "--fix 'epsilon': expected NAME=VALUE"),
    ],
)
def test_space_refusals_name_the_thing(recipe, spaces, fixes, expect):
    with pytest.raises(SearchInputError) as caught:
        space.build_space(recipe, spaces, fixes)
    assert expect in str(caught.value)
    assert "\n" not in str(caught.value)


def test_exhaustive_points_cover_every_order_and_value_once(recipe):
    built = space.build_space(recipe, ["temperature=0,1"], ["base_droprate=0.3", "lambda=1"])
    points = list(built.points())
    assert built.size() == len(points) == 12
    assert len({p.key() for p in points}) == 12
    assert {p.order for p in points} == set(itertools.permutations(recipe.variants))
    assert all(p.values["base_droprate"] == 0.3 and p.values["lambda"] == 1.0 for p in points)
    assert all(built.contains(p) for p in points)


def test_starting_point_is_the_recipe_when_inside_the_space(recipe):
    built = space.build_space(recipe)
    start = space.starting_point(recipe, built)
    assert start.order == recipe.variants
    assert start.values == {"temperature": 0.3, "base_droprate": 0.5, "lambda": 1.0}
    narrowed = space.build_space(recipe, ["temperature=0.5:1"])
    assert space.starting_point(recipe, narrowed) is None


def test_trial_recipe_orders_models_keeps_drop_rates_with_their_model_and_sets_the_seed(recipe):
    first, second, third = recipe.variants
    point = Point((third, first, second), {"temperature": 1.0, "drop_rate.1": 0.2})
    data = space.trial_recipe(recipe, point, 11)
    assert [m["model"] for m in data["models"]] == [third, first, second]
    assert data["models"][1]["parameters"] == {"drop_rate": 0.2}
    assert "parameters" not in data["models"][0]
    assert data["parameters"] == {"temperature": 1.0, "seed": 11}
    seeded = space.trial_recipe(recipe, Point(point.order, {**point.values, "seed": 5}), 11)
    assert seeded["parameters"]["seed"] == 5


def test_tpe_priority_keys_round_trip_every_order(recipe):
    built = space.build_space(recipe, [], ["base_droprate=0.3", "lambda=1"])
    settings = Settings(out="unused", trials=8, seed=0, address=None, cpus_per_trial=1,
                        gpus_per_trial=0, resume=False)
    proposer = Proposer(built, recipe, settings, [])
    assert not proposer.exhaustive
    for order in itertools.permutations(recipe.variants):
        point = Point(order, {"temperature": 0.25, "base_droprate": 0.3, "lambda": 1.0})
        assert proposer.decode(proposer.encode(point)) == point
    handle, first = proposer.next()
    assert first == space.starting_point(recipe, built)  # the recipe is tried first
    seen = {first.key()}
    proposer.tell(handle, 1.0)
    for _ in range(7):
        handle, point = proposer.next()
        assert built.contains(point) and point.key() not in seen
        seen.add(point.key())
        proposer.tell(handle, None)
    assert proposer.next() is None


# ---------------------------------------------------------------- eval


def test_eval_from_a_file_and_from_a_module(eval_file, monkeypatch):
    spec = evaluation.parse_eval(f"{eval_file}:score", None)
    assert spec.file == str(eval_file.resolve()) and spec.source == EVAL_SOURCE
    monkeypatch.syspath_prepend(str(eval_file.parent))
    spec = evaluation.parse_eval("evals:picky", None)
    assert spec.module == "evals" and callable(evaluation.load_function(spec))


@pytest.mark.parametrize(
    "text, command, expect",
    [
        ("{dir}/missing.py:score", None, "missing.py:score: cannot read"),
        ("{dir}/evals.py:absent", None, "no function 'absent' in it"),
        ("{dir}/evals.py:one_argument", None, "one_argument must take (model, tokenizer)"),
        ("no_such_module_xyz:score", None, "cannot import it (ModuleNotFoundError"),
        ("score", None, "expected path/to/file.py:function or package.module:function"),
        (None, "python score.py", "must contain {model}"),
        (None, None, "give exactly one of --eval"),
        ("{dir}/evals.py:score", "echo {model}", "give exactly one of --eval"),
    ],
)
def test_eval_refusals(eval_file, text, command, expect):
    text = text.format(dir=eval_file.parent) if text else text
    with pytest.raises(SearchInputError) as caught:
        evaluation.parse_eval(text, command)
    assert expect in str(caught.value)


@pytest.mark.parametrize(
    "value, score, extras",
    [(0.5, 0.5, {}), (3, 3.0, {}), ({"score": 2.5, "acc": 0.7, "n": 10}, 2.5, {"acc": 0.7, "n": 10.0})],
)
def test_score_of_numbers_and_dicts(value, score, extras):
    assert evaluation.score_of(value) == (score, extras)


@pytest.mark.parametrize(
    "value, expect",
    [("high", "not a number"), (True, "not a number"), (math.nan, "not a finite number"),
     ({"acc": 1.0}, "without a 'score' key"), (None, "not a number")],
)
def test_score_of_refuses_non_numbers(value, expect):
    with pytest.raises(evaluation.TrialFailed, match=expect):
        evaluation.score_of(value)


def test_eval_command_score_is_the_last_line(tmp_path):
    assert evaluation.run_command("echo loading; echo 0.25 # {model}", str(tmp_path)) == 0.25
    with pytest.raises(evaluation.TrialFailed, match="last line 'done' is not a number"):
        evaluation.run_command("echo 1; echo done # {model}", str(tmp_path))
    with pytest.raises(evaluation.TrialFailed, match="exited with 3: bad"):
        evaluation.run_command("echo bad >&2; exit 3 # {model}", str(tmp_path))


# ---------------------------------------------------------------- command refusals (no Ray)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--space", "base_droprate=0:1"], "base_droprate must be in [0, 1)"),
        (["--fix", "nothing=1"], "unknown parameter 'nothing'"),
        (["--eval", "{dir}/evals.py:one_argument"], "must take (model, tokenizer)"),
        (["--address", "ray://127.0.0.1:{port}"], "--address ray://127.0.0.1:{port}: cannot reach a Ray cluster"),
        (["--address", "nohostport"], "expected auto, HOST:PORT or ray://HOST:PORT"),
        (["--eval-limit", "5"], "--eval-limit applies to --eval lm-eval:TASK only"),
    ],
)
def test_command_refusals_are_one_line_exit_2_and_leave_no_dir(tmp_path, eval_file, llama_family,
                                                               args, expect):
    recipe_path = write_recipe(tmp_path / "r.yaml", llama_family)
    port = _closed_port()
    args = [a.format(dir=eval_file.parent, port=port) for a in args]
    expect = expect.format(port=port)
    if "--eval" not in args:
        args += ["--eval", f"{eval_file}:score"]
    out = tmp_path / "out"
    result = CliRunner().invoke(search, [str(recipe_path), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuit-merge search: error: "), result.stderr
    assert expect in lines[0]
    assert not out.exists()


def test_command_refuses_a_non_circuit_recipe_and_a_used_dir(tmp_path, eval_file, llama_family):
    bad = write_recipe(tmp_path / "ties.yaml", llama_family, merge_method="ties")
    data = yaml.safe_load(bad.read_text())
    data["merge_method"] = "ties"
    bad.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(search, [str(bad), "--eval", f"{eval_file}:score", "--out",
                                         str(tmp_path / "o")])
    assert result.exit_code == 2 and "search needs merge_method: circuit" in result.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    good = write_recipe(tmp_path / "r.yaml", llama_family)
    result = CliRunner().invoke(search, [str(good), "--eval", f"{eval_file}:score", "--out", str(used)])
    assert result.exit_code == 2 and "is not empty and holds no trials.jsonl" in result.stderr
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- one trial in memory


@pytest.fixture(scope="module")
def runner_factory():
    from circuit_merge_plugin.search.trial import TrialRunner

    made = {}

    def make(spec):
        if spec.text not in made:
            made[spec.text] = TrialRunner(spec, device="cpu", threads=1)
        return made[spec.text]

    return make


@pytest.mark.slow
def test_trial_digest_and_score_equal_mergekit_yaml(tmp_path, eval_file, recipe, runner_factory):
    """The in-memory trial merges what mergekit-yaml writes for the trial's recipe."""
    import transformers

    runner = runner_factory(evaluation.parse_eval(f"{eval_file}:score", None))
    first, second, third = recipe.variants
    point = Point((second, third, first), {"temperature": 0.5, "base_droprate": 0.4,
                                           "lambda": 0.7, "drop_rate.3": 0.2})
    data = space.trial_recipe(recipe, point, 9)
    result = runner.run(data)
    assert "error" not in result, result
    run_mergekit_yaml(data, tmp_path / "merged")
    assert result["digest"] == digest_directory(tmp_path / "merged")
    written = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    want = runner.function(written, tokenizer)
    assert result["score"] == want["score"] and result["extras"] == {"corner": want["corner"]}


def test_a_mergekit_without_the_calls_a_trial_uses_is_refused_in_one_line(monkeypatch):
    """The trial merge's one private mergekit call, ``_model_out_config``, and the
    public ``plan_to_disk()``: absent, a worker refuses to start, naming both
    the installed mergekit and what to do."""
    import mergekit.merge
    from mergekit.plan import MergePlanner

    from circuit_merge_plugin.search import trial

    version = trial.mergekit_version()
    assert version in ("0.1.4", "0.1.5")
    spec = evaluation.parse_eval(None, "true {model}")
    for owner, name, what in ((mergekit.merge, "_model_out_config", "mergekit.merge._model_out_config"),
                              (MergePlanner, "plan_to_disk", "MergePlanner.plan_to_disk")):
        with monkeypatch.context() as patch:
            patch.delattr(owner, name)
            with pytest.raises(trial.MergekitApiError) as refused:
                trial.TrialRunner(spec, device="cpu", threads=1)
        assert str(refused.value) == (
            f"mergekit {version} has no {what}, which circuit-merge search needs for its "
            "in-memory trial merge; install mergekit 0.1.5 or 0.1.4")


def test_trial_failures_are_recorded_not_raised(eval_file, recipe, runner_factory):
    point = Point(recipe.variants, {"temperature": 0.0, "base_droprate": 0.3, "lambda": 1.0})
    data = space.trial_recipe(recipe, point, 0)
    text = runner_factory(evaluation.parse_eval(f"{eval_file}:text", None)).run(data)
    assert "score" not in text
    assert text["error"] == "eval returned 'high', not a number" and len(text["digest"]) == 64
    command = runner_factory(evaluation.parse_eval(None, "exit 4 # {model}")).run(data)
    assert command["error"] == "--eval-cmd exited with 4"
