"""Writing ``circuit_merge_report.json`` during a merge: adapters.recording."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from circuit_merge_plugin.adapters import recording as report_writer
from circuit_merge_plugin.core.kernel import circuit_merge_with_stats
from circuit_merge_plugin.core.params import CircuitParams, check_parameter
from circuit_merge_plugin.insight.report import check_report, load_report
from circuit_merge_plugin.adapters.recording import (
    REPORT_ENV,
    REPORT_FILE,
    record,
    report_file,
    reporting_to,
    target_for,
)

PARAMS = CircuitParams(seed=1)


def _stats(count=2, seed=0, numel=300):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    variants = [base + torch.randn(numel, generator=g) * 0.01 for _ in range(count)]
    return circuit_merge_with_stats(base, variants, PARAMS, name=f"t{seed}")[1]


def test_report_path_rules(tmp_path):
    assert report_file(str(tmp_path / "r.json")) == tmp_path / "r.json"
    assert report_file(str(tmp_path / "R.JSON")) == tmp_path / "R.JSON"
    assert report_file(str(tmp_path / "merged")) == tmp_path / "merged" / REPORT_FILE
    for bad in ("", "  ", 5, None):
        with pytest.raises(ValueError, match="report must be a file or directory path"):
            report_file(bad)


def test_report_parameter_validation():
    assert check_parameter("report", "out/") == "out/"
    assert check_parameter("report", None) is None  # off by default
    with pytest.raises(ValueError, match="report must be a file or directory path"):
        check_parameter("report", 1.0)
    with pytest.raises(ValueError, match="report must be"):
        check_parameter("report", "")


def test_where_a_report_goes(tmp_path, monkeypatch):
    monkeypatch.delenv(REPORT_ENV, raising=False)
    assert target_for(None) is None  # nothing asked: no counting at all
    monkeypatch.setenv(REPORT_ENV, str(tmp_path / "env.json"))
    assert target_for(None) == (tmp_path / "env.json", {})
    with reporting_to(str(tmp_path / "cli"), {"/abs/v1": "v1"}) as path:
        assert path == tmp_path / "cli" / REPORT_FILE
        assert target_for(None) == (path, {"/abs/v1": "v1"})  # in-process beats env
        assert target_for(str(tmp_path / "recipe.json"))[0] == tmp_path / "recipe.json"
    assert target_for(None) == (tmp_path / "env.json", {})  # restored


def test_every_record_leaves_a_complete_report(tmp_path):
    target = (report_file(str(tmp_path / "out")), {})
    names = ["model.layers.10.w", "model.layers.2.w", "model.embed_tokens.weight"]
    for index, name in enumerate(names):
        record(target, name, ["a", "b"], _stats(seed=index), PARAMS.as_dict())
        report = load_report(str(tmp_path / "out"))  # valid after every tensor
        assert len(report["tensors"]) == index + 1
        assert check_report(report) == []
    assert list(report["tensors"]) == [  # natural order, not arrival order
        "model.embed_tokens.weight", "model.layers.2.w", "model.layers.10.w"]
    assert report["variants"] == ["a", "b"]
    assert report["parameters"] == PARAMS.as_dict()
    assert report["tensors"]["model.layers.2.w"] == _stats(seed=1).as_dict()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [REPORT_FILE]


def test_bytes_do_not_depend_on_arrival_order(tmp_path):
    names = [f"model.layers.{i}.w" for i in range(5)]
    for label, order in (("forward", names), ("backward", names[::-1])):
        target = (report_file(str(tmp_path / f"{label}.json")), {})
        for name in order:
            record(target, name, ["a", "b"], _stats(seed=int(name.split(".")[2])), {})
    assert (tmp_path / "forward.json").read_bytes() == (tmp_path / "backward.json").read_bytes()


def test_a_repeated_tensor_starts_a_new_report(tmp_path):
    target = (report_file(str(tmp_path / "r.json")), {})
    record(target, "x", ["a", "b"], _stats(seed=1), {"seed": 1})
    record(target, "y", ["a", "b"], _stats(seed=2), {"seed": 1})
    record(target, "x", ["a", "b"], _stats(seed=3), {"seed": 2})  # a second merge
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["tensors"]) == ["x"] and report["parameters"] == {"seed": 2}


def test_tensors_some_variants_lack(tmp_path):
    """Optional weights: labels are merged in listing order; absent rows are zero."""
    target = (report_file(str(tmp_path / "r.json")), {"/abs/b": "b"})
    record(target, "partial", ["a", "/abs/c"], _stats(seed=1), {})
    record(target, "full", ["a", "/abs/b", "/abs/c"], _stats(count=3, seed=2), {})
    report = load_report(str(tmp_path / "r.json"))
    assert report["variants"] == ["a", "b", "/abs/c"]  # alias applied, order kept
    partial = report["tensors"]["partial"]
    assert partial["drop_rates"][1] is None
    assert partial["variants"][1] == dict(
        changed=0, kept=0, dropped=0, taken=0, overwrote=0, averaged=0, overwritten=0,
        final_share=0.0)
    assert partial["variants"][2] == _stats(seed=1).as_dict()["variants"][1]
    assert check_report(report) == []


def test_threads_recording_at_once(tmp_path):
    target = (report_file(str(tmp_path / "r.json")), {})
    stats = _stats()

    def work(first):
        for index in range(first, 200, 4):
            record(target, f"t{index}", ["a", "b"], stats, {})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(load_report(str(tmp_path / "r.json"))["tensors"]) == 200
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_report_dir_is_created(tmp_path):
    target = (report_file(str(tmp_path / "a" / "b")), {})
    record(target, "x", ["v"], _stats(count=1), {})
    assert (tmp_path / "a" / "b" / REPORT_FILE).is_file()


def test_reporting_to_starts_fresh(tmp_path):
    with reporting_to(str(tmp_path)) as path:
        record(target_for(None), "x", ["v"], _stats(count=1), {})
    with reporting_to(str(tmp_path)):
        record(target_for(None), "y", ["v"], _stats(count=1), {})
    assert list(json.loads(path.read_text())["tensors"]) == ["y"]
    assert report_writer._default is None


# ---------------------------------------------------------------- finished or not


def _header(path):
    report = json.loads(path.read_text())
    return {key: value for key, value in report.items() if key != "tensors"}


def test_a_report_being_written_is_not_finished(tmp_path):
    target = (report_file(str(tmp_path / "r.json")), {})
    record(target, "x", ["a", "b"], _stats(seed=1), {"seed": 1}, {"seed_source": "recipe"})
    record(target, "y", ["a", "b"], _stats(seed=2), {"seed": 1})
    head = _header(tmp_path / "r.json")
    assert head["finished"] is False and head["tensors_merged"] == 2
    assert head["seed_source"] == "recipe"  # the first record's header keys
    assert head["recipe_parameters"] is None  # no mergekit run on the stack
    report_writer.finish(str(tmp_path / "r.json"))
    after = _header(tmp_path / "r.json")
    assert after == dict(head, finished=True)
    assert load_report(str(tmp_path / "r.json"))["tensors"].keys() == {"x", "y"}


def test_finish_patches_a_report_no_longer_held(tmp_path):
    """finish() after reporting_to's block (or in another process): the header
    is rewritten, the tensors are kept byte for byte."""
    path = tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        with reporting_to(str(path)):
            record(target_for(None), "x", ["v"], _stats(count=1), {})
            raise RuntimeError("the merge failed")
    before = path.read_text()
    assert _header(path)["finished"] is False  # a failed block leaves it unfinished
    report_writer.finish(path)
    after = path.read_text()
    assert _header(path)["finished"] is True
    assert after.split("\n", 1)[1] == before.split("\n", 1)[1]
    report_writer.finish(tmp_path / "absent.json")  # nothing there: nothing made
    assert not (tmp_path / "absent.json").exists()


def test_reporting_to_finishes_when_its_block_completes(tmp_path):
    with reporting_to(str(tmp_path)) as path:
        record(target_for(None), "x", ["v"], _stats(count=1), {})
        assert _header(path)["finished"] is False
    assert _header(path)["finished"] is True


def test_a_new_merge_after_finishing_starts_a_new_report(tmp_path):
    target = (report_file(str(tmp_path / "r.json")), {})
    record(target, "x", ["v"], _stats(count=1), {})
    report_writer.finish(str(tmp_path / "r.json"))
    record(target, "y", ["v"], _stats(count=1), {})
    head = _header(tmp_path / "r.json")
    assert head["finished"] is False and head["tensors_merged"] == 1


@pytest.mark.parametrize(
    "ending, finished",
    [("return", True), ("exit0", True), ("error", False), ("interrupt", False), ("exit2", False)],
)
def test_inside_a_click_command(tmp_path, ending, finished):
    """mergekit-yaml is a click command: its context closing decides. An
    exception, Ctrl-C (click's Abort) or a non-zero exit leaves the report unfinished."""
    import sys

    import click
    from click.testing import CliRunner

    path = tmp_path / "r.json"

    @click.command()
    def command():
        record((report_file(str(path)), {}), "x", ["v"], _stats(count=1), {})
        assert _header(path)["finished"] is False
        if ending == "error":
            raise ValueError("NaN in an input")
        if ending == "interrupt":
            raise KeyboardInterrupt
        if ending == "exit0":
            sys.exit(0)
        if ending == "exit2":
            sys.exit(2)

    CliRunner().invoke(command, [])
    assert _header(path)["finished"] is finished
    assert path not in report_writer._pending


@pytest.mark.slow
@pytest.mark.parametrize("fails", [False, True])
def test_outside_click_the_interpreter_exit_decides(tmp_path, fails):
    """A Python program: finished at normal exit, not after an uncaught exception."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "r.json"
    code = textwrap.dedent(f"""
        import torch
        from circuit_merge_plugin.adapters.recording import record, report_file
        from circuit_merge_plugin.core.kernel import circuit_merge_with_stats
        from circuit_merge_plugin.core.params import CircuitParams
        base = torch.zeros(8); variant = torch.ones(8)
        _, stats = circuit_merge_with_stats(base, [variant], CircuitParams(seed=1), name="x")
        record((report_file({str(path)!r}), {{}}), "x", ["v"], stats, {{}})
        if {fails}:
            raise SystemError("failed after recording")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (result.returncode != 0) is fails, result.stderr
    assert _header(path)["finished"] is (not fails)
