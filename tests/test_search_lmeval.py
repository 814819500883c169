"""``--eval lm-eval:TASK[,TASK] --eval-limit N``: lm-eval-harness on the in-memory merge.

Local tasks written here (multiple choice over the toy family's words, data in
a JSON lines file), the toy family's word-level tokenizer, no downloads: the
trial's score is checked against ``lm_eval.simple_evaluate`` run directly on
the same merged model. The one search through the command on a local Ray is
slow-marked; everything else runs in this process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from circuit_merge_plugin.search import evaluation, lmeval, space
from circuit_merge_plugin.search.command import search
from circuit_merge_plugin.search.space import Point, SearchInputError

from test_search import write_recipe

WORDS = "the quick brown fox jumps over lazy dog merge".split()


def _docs():
    """Nine three-way questions made of the toy tokenizer's words."""
    return [{"question": f"the {w} fox jumps over the", "choices": ["lazy dog", "brown fox", "merge"],
             "answer": i % 3} for i, w in enumerate(WORDS)]


TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{choices}
doc_to_target: "{target}"
metric_list:
{metrics}
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """``toy_mc`` (multiple choice: acc, acc_norm) and ``toy_ll`` (the answer's
    perplexity: a continuous score) on the same nine docs."""
    root = tmp_path_factory.mktemp("lm_tasks")
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in _docs()))
    (root / "toy_mc.yaml").write_text(TASK_YAML.format(
        name="toy_mc", data=data, kind="multiple_choice", choices='doc_to_choice: "{{choices}}"',
        target="{{answer}}", metrics="  - metric: acc\n  - metric: acc_norm"))
    (root / "toy_ll.yaml").write_text(TASK_YAML.format(
        name="toy_ll", data=data, kind="loglikelihood", choices="", target="{{choices[answer]}}",
        metrics="  - metric: perplexity"))
    (root / "not_a_task.yaml").write_text("dataset_path: json\n")
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, llama_family):
    path = write_recipe(tmp_path_factory.mktemp("lm_recipe") / "recipe.yaml", llama_family,
                        parameters={"temperature": 0.3})
    return space.load_recipe(str(path))


def lm_spec(tasks: Path, limit=None, names=("toy_mc", "toy_ll")):
    text = lmeval.PREFIX + ",".join(str(tasks / f"{name}.yaml") for name in names)
    return evaluation.parse_eval(text, None, limit)


@pytest.fixture(scope="module")
def runner(tasks):
    from circuit_merge_plugin.search.trial import TrialRunner

    return TrialRunner(lm_spec(tasks, limit=4), device="cpu", threads=1)


def point(recipe, temperature=0.5):
    first, second, third = recipe.variants
    return Point((second, third, first), {"temperature": temperature, "base_droprate": 0.4,
                                          "lambda": 0.8})


# ---------------------------------------------------------------- parsing


def test_local_task_files_parse_to_names_offline_without_the_registry(tasks, monkeypatch):
    monkeypatch.chdir(tasks)
    spec = evaluation.parse_eval("lm-eval:toy_mc.yaml, ./toy_ll.yaml", None, 5)
    assert spec.lm_eval == lmeval.LmEvalTasks(
        specs=(str(tasks / "toy_mc.yaml"), str(tasks / "toy_ll.yaml")),
        names=("toy_mc", "toy_ll"), limit=5, registry=False, offline=True)
    assert isinstance(evaluation.load_function(spec), lmeval.LmEvalEval)


def test_primary_metric_rule():
    row = {"alias": "t", "sample_len": 9, "acc,none": 0.25, "acc_stderr,none": 0.1,
           "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A"}
    assert lmeval.primary_metric(row) == ("acc_norm", "none", 0.5)
    assert lmeval.primary_metric({"f1,none": 0.3, "acc,none": 0.2}) == ("acc", "none", 0.2)
    assert lmeval.primary_metric({"alias": "g", "exact_match_stderr,strict": 0.01,
                                  "exact_match,strict": 0.4, "exact_match,flex": 0.6}) == (
        "exact_match", "strict", 0.4)
    assert lmeval.primary_metric({"alias": "g", "sample_len": 3}) is None
    tasks = lmeval.LmEvalTasks(specs=("grp", "t3"), names=("grp", "t3"), limit=None,
                               registry=True, offline=False)
    results = {"results": {"grp": {"alias": "grp"}, "t1": {"acc,none": 0.5},
                           "t2": {"acc_norm,none": 0.25, "acc,none": 1.0}, "t3": {"bleu,none": 3.0}},
               "group_subtasks": {"grp": ["t1", "t2"]}, "n-samples": {"t3": {"original": 9, "effective": 2}}}
    assert lmeval.summarize(tasks, results) == {
        "score": ((0.5 + 0.25) / 2 + 3.0) / 2, "grp/primary": "mean of subtasks",
        "t3/primary": "bleu", "t3/bleu": 3.0, "t3/samples": 2}


# ---------------------------------------------------------------- one trial in memory


def direct_simple_evaluate(runner, data, tasks: Path, limit):
    """``lm_eval.simple_evaluate`` on the trial's merged model, called here."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from circuit_merge_plugin.search.trial import build_model, tensors_digest

    tensors, config = runner.merge(data)
    digest = tensors_digest(tensors)
    model = build_model(config, tensors, "cpu")
    tokenizer = runner.tokenizer(data["base_model"])
    with lmeval.hub_offline(True):
        results = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
            tasks=[str(tasks / "toy_mc.yaml"), str(tasks / "toy_ll.yaml")], limit=limit,
            task_manager=TaskManager(include_defaults=False), bootstrap_iters=0, log_samples=False,
            random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    return digest, results


def test_trial_score_is_simple_evaluates_mean_primary_metric(tasks, recipe, runner):
    import lm_eval.evaluator

    data = space.trial_recipe(recipe, point(recipe), 3)
    before = (lm_eval.evaluator.add_env_info, os.environ.get("HF_HUB_OFFLINE"),
              os.environ.get("HF_DATASETS_OFFLINE"))
    result = runner.run(data)
    assert "error" not in result, result
    # what the trial switches off for the call (hub access, environment report) is restored
    assert (lm_eval.evaluator.add_env_info, os.environ.get("HF_HUB_OFFLINE"),
            os.environ.get("HF_DATASETS_OFFLINE")) == before
    digest, results = direct_simple_evaluate(runner, data, tasks, 4)
    assert result["digest"] == digest
    mc, ll = results["results"]["toy_mc"], results["results"]["toy_ll"]
    assert result["score"] == (mc["acc_norm,none"] + ll["perplexity,none"]) / 2
    assert results["n-samples"]["toy_mc"] == {"original": 9, "effective": 4}
    assert result["extras"] == {
        "toy_mc/primary": "acc_norm", "toy_mc/acc": mc["acc,none"], "toy_mc/acc_norm": mc["acc_norm,none"],
        "toy_mc/samples": 4, "toy_ll/primary": "perplexity", "toy_ll/perplexity": ll["perplexity,none"],
        "toy_ll/samples": 4}
    other = runner.run(space.trial_recipe(recipe, point(recipe, 0.0), 3))
    assert other["score"] != result["score"]  # the score sees the merged weights
    again = runner.run(data)
    assert (again["score"], again["extras"], again["digest"]) == (
        result["score"], result["extras"], result["digest"])


def test_eval_limit_is_examples_per_task(tasks, recipe):
    from circuit_merge_plugin.search.trial import TrialRunner

    data = space.trial_recipe(recipe, point(recipe, 0.0), 0)
    counts = {}
    for limit in (None, 2):
        result = TrialRunner(lm_spec(tasks, limit, names=("toy_mc",)), device="cpu", threads=1).run(data)
        assert "error" not in result, result
        counts[limit] = result["extras"]["toy_mc/samples"]
        assert 0 <= result["score"] <= 1 and math.isclose(result["score"] * counts[limit],
                                                          round(result["score"] * counts[limit]))
    assert counts == {None: 9, 2: 2}


# ---------------------------------------------------------------- refusals


def _no_tokenizer_base(root: Path, family) -> Path:
    base = root / "bare_base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(family.base / name, base / name)
    return base


@pytest.mark.parametrize(
    "eval_text, expect",
    [
        ("lm-eval:{tasks}/missing.yaml", "task file {tasks}/missing.yaml: no such file"),
        ("lm-eval:{tasks}/not_a_task.yaml", "task file {tasks}/not_a_task.yaml: not an lm-eval task YAML"),
        ("lm-eval:{tasks}/toy_mc.yaml,{tasks}/toy_mc.yaml", "task toy_mc is given twice"),
        ("lm-eval:", "expected lm-eval:TASK[,TASK...]"),
        # lm-eval indexes its ~15k task YAMLs for this one (about 10 s): slow.
        pytest.param("lm-eval:no_such_task_xyz", "lm-eval does not know a task named 'no_such_task_xyz'",
                     marks=pytest.mark.slow),
        ("lm-eval:{tasks}/toy_mc.yaml", "no tokenizer files (--eval lm-eval needs a tokenizer)"),
        ("lm-eval:{tasks}/toy_mc.yaml", "lm-eval-harness is not installed "
                                        "(pip install 'circuit-merge-plugin[lm-eval]')"),
        ("lm-eval:{tasks}/toy_mc.yaml", "lm-eval-harness is older than 0.4.12 "
                                        "(pip install 'circuit-merge-plugin[lm-eval]')"),
    ],
    ids=["missing", "not-a-task", "twice", "empty", "unknown", "no-tokenizer", "not-installed",
         "too-old"],
)
def test_lm_eval_refusals_are_one_line_exit_2_and_leave_no_dir(tmp_path, tasks, llama_family, monkeypatch,
                                                               eval_text, expect):
    family = llama_family
    if "tokenizer" in expect:
        family = type(llama_family)(base=_no_tokenizer_base(tmp_path, llama_family),
                                    variants=llama_family.variants)
    if "not installed" in expect:
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec answers None
    if "older than" in expect:
        monkeypatch.setitem(sys.modules, "lm_eval.tasks._index", None)  # its import fails
    recipe_path = write_recipe(tmp_path / "r.yaml", family)
    out = tmp_path / "out"
    result = CliRunner().invoke(search, [str(recipe_path), "--out", str(out), "--eval-limit", "3",
                                         "--eval", eval_text.format(tasks=tasks)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuit-merge search: error: "), result.stderr
    assert expect.format(tasks=tasks) in lines[0]
    assert not out.exists()


def test_a_task_name_lm_eval_knows_is_accepted_and_needs_its_task_index():
    spec = evaluation.parse_eval("lm-eval:arc_easy", None, 10)
    assert spec.lm_eval == lmeval.LmEvalTasks(specs=("arc_easy",), names=("arc_easy",), limit=10,
                                              registry=True, offline=False)


def test_a_worker_without_tokenizer_fails_the_trial_with_the_reason(tasks):
    """Checked on the driver; should a worker still see no tokenizer, the trial says why."""
    with pytest.raises(ValueError, match="lm-eval needs a tokenizer"):
        evaluation.load_function(lm_spec(tasks))(object(), None)


def test_an_empty_task_entry_is_refused():
    with pytest.raises(SearchInputError, match="expected lm-eval:TASK"):
        evaluation.parse_eval("lm-eval: ,x", None, 2)


# ---------------------------------------------------------------- the command on a local Ray


@pytest.mark.slow
def test_search_with_lm_eval_on_local_ray(tmp_path, tasks, recipe, runner):
    from test_search_ray import read_records, search as run_search

    recipe_path = write_recipe(tmp_path / "grid.yaml", _family_of(recipe))
    out = tmp_path / "out"
    eval_text = lmeval.PREFIX + f"{tasks / 'toy_mc.yaml'},{tasks / 'toy_ll.yaml'}"
    done = run_search(recipe_path, out, "--eval", eval_text, "--eval-limit", "4",
                      "--space", "temperature=0,1", "--fix", "base_droprate=0.3", "--fix", "lambda=1",
                      "--trials", "4")
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), records
    loaded = space.load_recipe(str(recipe_path))
    for record in records:
        local = runner.run(space.trial_recipe(loaded, Point(tuple(record["order"]), record["values"]), 0))
        assert (local["digest"], local["score"]) == (record["digest"], record["score"])
        assert record["metrics"]["toy_mc/samples"] == 4
    assert len({record["score"] for record in records}) == 4  # perplexity tells every merge apart


def _family_of(recipe):
    from circuit_merge_plugin.demo.toymodels import ToyFamily

    return ToyFamily(base=Path(recipe.base), variants=[Path(v) for v in recipe.variants])

