"""The ``circuit-merge`` console script, run as a subprocess like a user would.

Most of a small merge's time is the interpreter importing torch, transformers
and mergekit, so every merge this module needs is started at once by the
module fixture ``merges`` (single-threaded processes sharing the CPUs) and each
test then waits for its own. Refusals, ``digest`` and ``--print-recipe`` never
import torch and run one by one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import save_file

from circuit_merge_plugin.io.digest import digest_directory
from circuit_merge_plugin.core.kernel import circuit_merge, circuit_merge_with_stats
from circuit_merge_plugin.core.params import CircuitParams
from circuit_merge_plugin.insight.report import check_report, load_report
from conftest import load_tensors
from circuit_merge_plugin.core.exact import same_bytes
from mergekit_runs import subprocess_env

CLI = Path(sys.executable).parent / "circuit-merge"
OTHER_PYTHON = os.environ.get("CIRCUIT_OTHER_PYTHON")




def cli(*args, cwd=None, timeout=120, executable=CLI) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(executable), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=timeout,
    )


def assert_same_tensor(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    assert same_bytes(actual, expected), f"tensor {name} differs"


# ---------------------------------------------------------------- inputs


def perturbed(tensors, generator, scale=0.01):
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        mask = torch.rand(tensor.shape, generator=generator) < 0.5
        out[name] = tensor + torch.randn(tensor.shape, generator=generator) * scale * mask
    return out


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """Bare-safetensors models in the original script's style, with the awkward cases.

    base: two shard files (part-a, part-b), a tensor only it has, an int buffer;
    v1: one file, all of base's weights plus ``only_variants``;
    v2: another file name, no ``w3``, ``only_variants`` and ``only_v2``;
    v2pk: v2 as a pickled ``pytorch_model.bin``.
    """
    root = tmp_path_factory.mktemp("bare")
    g = torch.Generator().manual_seed(11)
    base = {f"w{i}": torch.randn(8, 16, generator=g) for i in range(4)}
    base["norm"] = torch.randn(16, generator=g)
    base["int_buf"] = torch.arange(6)
    v1 = perturbed(base, g)
    v1["only_variants"] = torch.randn(4, 4, generator=g)
    v2 = perturbed(base, g)
    del v2["w3"]
    v2["only_variants"] = torch.randn(4, 4, generator=g)
    v2["only_v2"] = torch.randn(3, generator=g)
    base["only_base"] = torch.randn(5, generator=g)
    for name in ("base", "v1", "v2", "v2pk"):
        (root / name).mkdir()
    save_file({k: base[k] for k in ("w0", "w1")}, str(root / "base" / "part-a.safetensors"))
    save_file(
        {k: v for k, v in base.items() if k not in ("w0", "w1")},
        str(root / "base" / "part-b.safetensors"),
    )
    save_file(v1, str(root / "v1" / "model.safetensors"))
    save_file(v2, str(root / "v2" / "weights.safetensors"))
    torch.save(v2, str(root / "v2pk" / "pytorch_model.bin"))
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Many small tensors, so a merge writes shard after shard for a while."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(5)
    base = {f"layer{i:03d}.weight": torch.randn(32, 32, generator=g) for i in range(300)}
    for name, tensors in (("b", base), ("a1", perturbed(base, g)), ("a2", perturbed(base, g))):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"))
    return root


class Launched:
    """Processes started together; ``result(label)`` waits for one."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.processes: Dict[str, subprocess.Popen] = {}

    def start(self, label: str, *args, executable=CLI, cwd=None) -> subprocess.Popen:
        out = open(self.workdir / f"{label}.out", "w")
        err = open(self.workdir / f"{label}.err", "w")
        self.processes[label] = subprocess.Popen(
            [str(executable), *(str(a) for a in args)],
            stdout=out,
            stderr=err,
            env=subprocess_env(),
            cwd=cwd,
        )
        out.close()
        err.close()
        return self.processes[label]

    def result(self, label: str, timeout: float = 300) -> subprocess.CompletedProcess:
        process = self.processes[label]
        process.wait(timeout=timeout)
        return subprocess.CompletedProcess(
            process.args,
            process.returncode,
            (self.workdir / f"{label}.out").read_text(),
            (self.workdir / f"{label}.err").read_text(),
        )

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


#: Every drop rate is 0 with two variants and base_droprate 0, whatever the
#: temperature; the other parameters still matter (threshold, averaging).
FLAGS = [
    "--temperature", "0.3",
    "--base-droprate", "0",
    "--meaningful_change_threshold", "1e-6",
    "--seed", "7",
    "--skip_rescaling",
]
EXACT = CircuitParams(
    temperature=0.3, base_droprate=0.0, meaningful_change_threshold=1e-6, rescale=False, seed=7
)


@pytest.fixture(scope="module")
def merges(tmp_path_factory, bare, big, llama_family):
    """Start every merge of this module at once."""
    root = tmp_path_factory.mktemp("cli")
    runs = Launched(root)
    # The merge interrupted midway (test_sigterm_midway_leaves_nothing) first.
    runs.start(
        "killed", big / "b", big / "a1", big / "a2", root / "killed", "--out-shard-size", "1K", "-q"
    )
    # The flag form, with the pickled copy of v2 (--allow-pickle).
    runs.start(
        "flags", bare / "base", bare / "v1", bare / "v2pk", root / "flags", *FLAGS,
        "--allow-pickle", "-q",
    )
    # The config form: the original script's file (its "1e-6" reads as a string in YAML),
    # one value overridden on the command line, into a non-empty OUTPUT.
    (root / "config_out").mkdir()
    (root / "config_out" / "stale.txt").write_text("old\n")
    config = {
        "base_model": str(bare / "base"),
        "variant_models": [{"model": str(bare / "v1")}, {"model": str(bare / "v2")}],
        "output_dir": str(root / "config_out"),
        "parameters": {
            "temperature": 0.9,
            "base_droprate": 0,
            "meaningful_change_threshold": "1e-6",
            "seed": 7,
            "skip_rescaling": True,
        },
    }
    (root / "seed.yaml").write_text(yaml.safe_dump(config))
    runs.start(
        "config", "--config", root / "seed.yaml", "--temperature", "0.3", "--overwrite",
        "--no-report", "-q",
    )
    # A transformers model on the random path (default drop rates, seed 3).
    base, v1, v2 = llama_family.base, *llama_family.variants[:2]
    runs.start("llama", base, v1, v2, root / "llama", "--seed", "3")
    runs.start("selftest", "--test", "--seed", "3", "--base_droprate", "0.3")
    if OTHER_PYTHON and "0.1.5" == _api():
        other = Path(OTHER_PYTHON).parent / "circuit-merge"
        runs.start(
            "other", base, v1, v2, root / "other", "--seed", "3", "-q", executable=other
        )
    runs.root = root
    yield runs
    runs.close()


def _api() -> str:
    from conftest import mergekit_api

    return mergekit_api()


# ---------------------------------------------------------------- merges


@pytest.mark.slow
def test_sigterm_midway_leaves_nothing(merges):
    """Interrupted after shards were written: no OUTPUT, no temporary directory."""
    out = merges.root / "killed"
    process = merges.processes["killed"]
    deadline = time.monotonic() + 240
    while True:
        temps = list(merges.root.glob(".killed.circuit-merge-tmp-*"))
        if temps and list(temps[0].glob("*.safetensors")):
            break
        assert process.poll() is None, "the merge ended before it could be interrupted"
        assert time.monotonic() < deadline, "no shard was written in time"
        time.sleep(0.02)
    assert process.poll() is None, "the merge ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    result = merges.result("killed")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "nothing was written" in result.stderr
    assert not out.exists()
    assert not list(merges.root.glob(".killed*"))


@pytest.mark.slow
def test_bare_tensors_exact_when_drop_rates_are_zero(merges, bare):
    """Two variants and base_droprate 0: every drop rate is 0, results are exact.

    Also the original script's rules for tensors missing from some inputs, a base split
    over two files, a pickled variant (--allow-pickle) and an int buffer.
    """
    ok(merges.result("flags"))
    out = merges.root / "flags"
    merged = load_tensors(out)
    base = load_tensors(bare / "base")
    v1 = load_tensors(bare / "v1")
    v2 = torch.load(str(bare / "v2pk" / "pytorch_model.bin"))
    assert set(merged) == set(base) | set(v1) | set(v2)
    for name in ("w0", "w1", "w2", "norm"):
        expected = circuit_merge(base[name], [v1[name], v2[name]], EXACT, name=name)
        assert_same_tensor(merged[name], expected, name)
        assert not torch.equal(merged[name], base[name])
    # missing from v2: merged from v1 alone
    assert_same_tensor(merged["w3"], circuit_merge(base["w3"], [v1["w3"]], EXACT, name="w3"), "w3")
    # missing from the base: v1 (first variant that has it) stands in for it
    expected = circuit_merge(
        v1["only_variants"], [v2["only_variants"]], EXACT, name="only_variants", drop_rate=[0.0]
    )
    assert_same_tensor(merged["only_variants"], expected, "only_variants")
    for name, source in (("only_v2", v2), ("only_base", base), ("int_buf", base)):
        assert_same_tensor(merged[name], source[name], name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged)
    manifest = json.loads((out / "circuit_merge.json").read_text())
    assert manifest["mode"] == "raw"
    assert manifest["parameters"] == {
        "temperature": 0.3,
        "base_droprate": 0.0,
        "meaningful_change_threshold": 1e-6,
        "epsilon": 0.1,
        "lambda": 1.0,
        "rescale": False,
        "seed": 7,
    }
    assert set(manifest["versions"]) >= {"circuit-merge-plugin", "mergekit", "torch"}
    assert manifest["digest"]["value"] == digest_directory(out)
    assert not list(merges.root.glob(".flags*"))
    # the contribution report, with the variants as given on the command line
    report = load_report(str(out))
    assert check_report(report) == []
    assert report["variants"] == [str(bare / "v1"), str(bare / "v2pk")]
    assert report["parameters"] == manifest["parameters"]
    for name in ("w0", "w1", "w2", "norm"):
        _, stats = circuit_merge_with_stats(base[name], [v1[name], v2[name]], EXACT, name=name)
        assert report["tensors"][name] == stats.as_dict(), name
    # merged from v1 alone: v2 has no drop rate and no counts there
    assert report["tensors"]["w3"]["drop_rates"][1] is None
    assert report["tensors"]["w3"]["variants"][1]["changed"] == 0
    assert report["tensors"]["w3"]["variants"][0]["changed"] > 0
    assert "only_v2" not in report["tensors"]  # copied, not merged


@pytest.mark.slow
def test_flag_and_config_forms_give_the_same_bytes(merges):
    flags, config = ok(merges.result("flags")), ok(merges.result("config"))
    assert flags.stdout == "" and config.stdout == ""  # --quiet
    a, b = merges.root / "flags", merges.root / "config_out"
    assert not (b / "stale.txt").exists()  # --overwrite replaced the directory
    ta, tb = load_tensors(a), load_tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert_same_tensor(ta[name], tb[name], name)
    ma = json.loads((a / "circuit_merge.json").read_text())
    mb = json.loads((b / "circuit_merge.json").read_text())
    assert ma["parameters"] == mb["parameters"]  # temperature 0.3 overrode the file's 0.9
    assert mb["parameter_sources"]["temperature"] == "command line"
    assert mb["parameter_sources"]["seed"] == "config"
    assert ma["digest"] == mb["digest"]
    # --no-report: no report, and the same model either way
    assert (a / "circuit_merge_report.json").is_file()
    assert not (b / "circuit_merge_report.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_PYTHON, reason="CIRCUIT_OTHER_PYTHON not set (.ci/test sets it)")
def test_same_digest_under_the_other_mergekit(merges):
    if "other" not in merges.processes:
        pytest.skip("run from the mergekit 0.1.5 environment only")
    ok(merges.result("other"))
    ok(merges.result("llama"))
    assert digest_directory(merges.root / "other") == digest_directory(merges.root / "llama")


@pytest.mark.slow
def test_transformers_model_goes_through_mergekit_planner(merges, llama_family):
    result = ok(merges.result("llama"))
    out = merges.root / "llama"
    digest = digest_directory(out)
    assert f"digest {digest}" in result.stdout
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "mergekit_config.yml", "model.safetensors.index.json", "circuit_merge.json"):
        assert (out / name).is_file(), name
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "circuit"
    assert "report" not in recipe["parameters"]  # the report is the CLI's, not the recipe's
    report = load_report(str(out))
    assert report["variants"] == [str(p) for p in llama_family.variants[:2]]
    assert check_report(report) == [] and len(report["tensors"]) == len(load_tensors(out))
    assert json.loads((out / "circuit_merge.json").read_text())["mode"] == "transformers"
    merged = load_tensors(out)
    base = load_tensors(llama_family.base)
    v1, v2 = (load_tensors(p) for p in llama_family.variants[:2])
    params = CircuitParams(seed=3)  # default drop rates: the random path
    assert set(merged) == set(base)
    for name in base:
        expected = circuit_merge(base[name], [v1[name], v2[name]], params, name=name)
        assert_same_tensor(merged[name], expected, name)
    other_seed = CircuitParams(seed=4)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(
        merged[name], circuit_merge(base[name], [v1[name], v2[name]], other_seed, name=name)
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 2


@pytest.mark.slow
def test_selftest_prints_the_side_by_side_view(merges):
    result = ok(merges.result("selftest"))
    text = result.stdout
    assert "\033[" not in text  # no colour when stdout is not a terminal
    assert text.count("Tensor: tensor_") == 3
    assert "Base Model:" in text and "Variant 1:" in text and "Merged Model:" in text
    assert "base_droprate=0.3" in text and "seed=3" in text
    rows = [line for line in text.splitlines() if line.count(" | ") == 3 and "Model" not in line]
    assert len(rows) == 3 * 6
    assert all(len(row.split(" | ")[0].split()) == 6 for row in rows)


# ---------------------------------------------------------------- refusals


def _refusal_cases(bare: Path, tmp: Path) -> List[tuple]:
    (tmp / "empty").mkdir()
    (tmp / "pickled").mkdir()
    torch.save({"w0": torch.zeros(8, 16)}, str(tmp / "pickled" / "pytorch_model.bin"))
    (tmp / "shape").mkdir()
    save_file({"w1": torch.zeros(16, 8)}, str(tmp / "shape" / "model.safetensors"))
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("keep\n")
    (tmp / "mergekit.yaml").write_text("merge_method: circuit\nmodels: []\n")
    (tmp / "typo.yaml").write_text(
        f"base_model: {bare / 'base'}\nvariant_models: [{{model: {bare / 'v1'}}}]\n"
        f"output_dir: {tmp / 'x'}\nparameters: {{temprature: 0.5}}\n"
    )
    (tmp / "range.yaml").write_text(
        f"base_model: {bare / 'base'}\nvariant_models: [{{model: {bare / 'v1'}}}]\n"
        f"output_dir: {tmp / 'x'}\nparameters: {{epsilon: 1.5}}\n"
    )
    b, v1, out = bare / "base", bare / "v1", tmp / "out"
    return [
        # (arguments, text the one-line error must contain)
        ((b, v1), "expected BASE VARIANT1"),
        ((tmp / "missing", v1, out), "missing: no such directory"),
        ((b, bare / "v1" / "model.safetensors", out), "not a directory"),
        ((b, tmp / "empty", out), "no .safetensors files"),
        ((b, tmp / "pickled", out), "--allow-pickle"),
        ((b, tmp / "shape", out), "shape mismatch in tensor 'w1'"),
        ((b, v1, v1, out), "same directory"),
        ((b, v1, tmp / "full"), "--overwrite"),
        ((b, v1, b), "would replace the base model"),
        ((b, v1, out, "--temperature", "1.5"), "temperature must be in [0, 1]"),
        ((b, v1, out, "--base_droprate", "1"), "base_droprate must be in [0, 1)"),
        ((b, v1, out, "--meaningful-change-threshold", "-1"), "meaningful_change_threshold"),
        ((b, v1, out, "--epsilon", "1"), "epsilon must be in [0, 1)"),
        ((b, v1, out, "--dtype", "int8"), "--dtype must be one of"),
        ((b, v1, out, "--out-shard-size", "lots"), "out-shard-size"),
        ((b, v1, out, "--device", "tpu"), "--device must be"),
        (("--config", tmp / "nope.yaml"), "nope.yaml: cannot read"),
        (("--config", tmp / "mergekit.yaml"), "mergekit-yaml"),
        (("--config", tmp / "typo.yaml"), "unknown parameter 'temprature'"),
        (("--config", tmp / "range.yaml"), "epsilon must be in [0, 1)"),
        (("--test", b), "--test builds its own models"),
    ]


def test_refusals_are_one_line_exit_2_and_write_nothing(bare, tmp_path):
    for args, message in _refusal_cases(bare, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("circuit-merge: error: "), (args, lines)
        assert message in lines[0], (args, lines[0])
        assert result.stdout == ""
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep\n"


def test_usage_errors_exit_2(bare, tmp_path):
    result = cli(bare / "base", bare / "v1", tmp_path / "o", "--seed", "x")
    assert result.returncode == 2 and "--seed" in result.stderr
    assert not (tmp_path / "o").exists()
    assert cli("--no-such-flag").returncode == 2
    helped = cli("--help")
    assert helped.returncode == 0
    for flag in ("--base_droprate", "--base-droprate", "--skip_rescaling", "--test", "--config",
                 "--overwrite", "--allow-pickle", "--print-recipe", "digest"):
        assert flag in helped.stdout, flag


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused(bare, tmp_path):
    result = cli(bare / "base", bare / "v1", tmp_path / "o", "--cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "circuit-merge: error: --device cuda: CUDA is not available on this machine"
    )
    assert list(tmp_path.iterdir()) == []


def test_version_and_demo_subcommand():
    from circuit_merge_plugin import __version__

    assert __version__ in ok(cli("--version")).stdout
    assert "--workdir" in ok(cli("demo", "--help")).stdout


# ---------------------------------------------------------------- digest, recipe


def test_digest_is_order_and_shard_independent(bare, tmp_path):
    tensors = load_tensors(bare / "v2")
    names = sorted(tensors)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    save_file(tensors, str(one / "model.safetensors"))
    save_file({n: tensors[n] for n in names[::2]}, str(two / "z.safetensors"),
              metadata={"note": "ignored"})
    save_file({n: tensors[n] for n in reversed(names[1::2])}, str(two / "a.safetensors"))
    first, second = ok(cli("digest", one)), ok(cli("digest", two))
    assert first.stdout == second.stdout == cli("digest", one).stdout
    assert len(first.stdout.strip()) == 64
    assert first.stdout.strip() == digest_directory(one)
    per_tensor = ok(cli("digest", "--tensors", one)).stdout.strip().splitlines()
    assert [line.split()[1] for line in per_tensor[:-1]] == names
    # any change of bytes, dtype, shape or name changes it
    changed = dict(tensors)
    changed["only_v2"] = changed["only_v2"].clone()
    changed["only_v2"][0] += 1e-6
    variants = [
        changed,
        {**tensors, "only_v2": tensors["only_v2"].double()},
        {**tensors, "only_v2": tensors["only_v2"].reshape(1, 3)},
        {**{k: v for k, v in tensors.items() if k != "only_v2"}, "only_v3": tensors["only_v2"]},
    ]
    for index, variant in enumerate(variants):
        directory = tmp_path / f"changed{index}"
        directory.mkdir()
        save_file(variant, str(directory / "model.safetensors"))
        assert digest_directory(directory) != digest_directory(one), index
    refused = cli("digest", tmp_path / "nothing")
    assert refused.returncode == 2 and "not a directory" in refused.stderr


def test_print_recipe(bare, llama_family, tmp_path):
    base, v1, v2 = llama_family.base, *llama_family.variants[:2]
    result = ok(cli("--print-recipe", base, v2, v1, tmp_path / "o", "--seed", "4",
                    "--temperature", "0.5", "--out-dtype", "bf16"))
    recipe = yaml.safe_load(result.stdout)
    assert "mergekit-yaml" in result.stdout
    assert recipe["merge_method"] == "circuit"
    assert recipe["base_model"] == str(base)
    assert [m["model"] for m in recipe["models"]] == [str(v2), str(v1)]  # priority order
    assert recipe["parameters"]["seed"] == 4 and recipe["parameters"]["temperature"] == 0.5
    assert recipe["out_dtype"] == "bfloat16"
    assert not (tmp_path / "o").exists()
    raw = ok(cli("--print-recipe", "base", "v1", "out", cwd=bare))
    assert "mergekit-pytorch" in raw.stdout
    assert yaml.safe_load(raw.stdout)["base_model"] == "./base"


def test_digest_expect_and_against(bare, tmp_path, capsys):
    """CI regression checks: --expect HASH exits 1 on a mismatch, 0 on a match;
    --against OTHER_DIR names every tensor that differs and exits 1."""
    from circuit_merge_plugin.cli import main as cli_main

    def run(*args):
        with pytest.raises(SystemExit) as stop:
            cli_main.main(["digest", *(str(a) for a in args)])
        return stop.value.code, capsys.readouterr()

    tensors = load_tensors(bare / "v2")
    same, other = tmp_path / "same", tmp_path / "other"
    same.mkdir()
    other.mkdir()
    save_file(tensors, str(same / "model.safetensors"))
    changed = dict(tensors, w0=tensors["w0"] + 1)
    del changed["only_v2"]
    changed["extra"] = torch.zeros(2)
    save_file(changed, str(other / "model.safetensors"))
    digest = digest_directory(same)
    code, captured = run(same, "--expect", digest)
    assert code == 0 and captured.out.strip() == digest
    code, captured = run(same, "--expect", digest.upper())  # hex is case-insensitive
    assert code == 0
    code, captured = run(other, "--expect", digest)
    assert code == 1 and f"expected {digest}" in captured.err
    code, captured = run(same, "--expect", "abc")
    assert code == 2 and "--expect abc: not a digest" in captured.err
    code, captured = run(same, "--against", other)
    assert code == 1
    lines = captured.out.splitlines()
    assert lines[1:] == ["differs: w0", f"only in {same}: only_v2", f"only in {other}: extra"]
    assert "3 tensor(s) differ" in captured.err
    code, captured = run(same, "--against", bare / "v2")
    assert code == 0 and f"same tensors as {bare / 'v2'}" in captured.out


def test_raw_mode_stand_in_keeps_the_original_drop_rates():
    """A tensor missing from the base: the first variant that has it stands in,
    the others keep the drop rates of their positions among the variants that
    have it (the kernel's formula: 0.5, 0.75, 0.75 for three at the defaults)."""
    from circuit_merge_plugin.cli.raw_tensors import tensor_plan
    from circuit_merge_plugin.io.headers import TensorHeader
    from circuit_merge_plugin.io.inputs import ModelDir

    def model(role, names):
        found = ModelDir(given=role, path=Path("/" + role), role=role)
        found.tensors = {n: TensorHeader(Path("x"), n, "F32", (2,), 0, 8) for n in names}
        return found

    base = model("base", ["w"])
    variants = [model("v1", ["w", "x"]), model("v2", ["w", "x"]), model("v3", ["x", "y"])]
    params = CircuitParams(seed=0)
    assert tensor_plan("w", base, variants, params) == (base, variants[:2], None)
    stand_in, merging, rates = tensor_plan("x", base, variants, params)
    assert stand_in is variants[0] and merging == variants[1:] and rates == [0.75, 0.75]
    stand_in, merging, rates = tensor_plan("y", base, variants, params)
    assert stand_in is variants[2] and merging == [] and rates == []


@pytest.fixture(scope="module")
def added_tokens(llama_family, tmp_path_factory) -> Path:
    """variant 2 of the Llama family fine-tuned with two added tokens."""
    from transformers import AutoModelForCausalLM

    from circuit_merge_plugin.demo.toymodels import SPECIAL_TOKENS, _save, build_tokenizer
    from circuit_merge_plugin.demo.toymodels import word_level_tokenizer

    base_tokens = build_tokenizer().get_vocab()
    tokens = sorted(base_tokens, key=base_tokens.get) + ["zebra", "quokka"]
    assert not {"zebra", "quokka"} & set(base_tokens)
    assert set(SPECIAL_TOKENS) <= set(tokens)
    tokenizer = word_level_tokenizer(tokens)
    model = AutoModelForCausalLM.from_pretrained(str(llama_family.variants[1]))
    model.resize_token_embeddings(len(tokenizer))
    out = tmp_path_factory.mktemp("added") / "variant2-added"
    _save(model, tokenizer, out, None)
    return out


@pytest.mark.slow
def test_tokenizer_source_aligns_added_tokens_and_without_it_the_refusal_says_so(
        llama_family, added_tokens, tmp_path):
    base, v1 = llama_family.base, llama_family.variants[0]
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    refused = cli(base, v1, added_tokens, tmp_path / "none")
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip()
    assert line.startswith("circuit-merge: error: vocabulary sizes differ: variant 2 ")
    assert f"{vocab + 2} tokens, base model {base} {vocab}" in line
    assert "--tokenizer-source union" in line
    assert not (tmp_path / "none").exists()
    runs = Launched(tmp_path)
    try:
        for source in ("union", "base"):
            runs.start(source, base, v1, added_tokens, tmp_path / source, "--tokenizer-source",
                       source, "--seed", "1", "-q")
        for source, size in (("union", vocab + 2), ("base", vocab)):
            ok(runs.result(source))
            merged = load_tensors(tmp_path / source)
            assert merged["model.embed_tokens.weight"].shape[0] == size, source
            assert merged["lm_head.weight"].shape[0] == size, source
    finally:
        runs.close()
    bare = cli(base, v1, tmp_path / "x", "--tokenizer-source", "nowhere")
    assert bare.returncode == 2 and "--tokenizer-source must be base, union or a model" in bare.stderr


def test_group_runs_subcommands_and_adds_search_when_installed(monkeypatch, capsys):
    """The first word names a subcommand, else the command line is a merge; a
    ``search`` command is added when circuit_merge_plugin.search.command exists."""
    import importlib.machinery
    import types

    import click

    from circuit_merge_plugin.cli import main as cli_main

    listed = cli_main.circuit_merge.list_commands(None)
    assert {"check", "digest", "analyze", "report", "demo"} <= set(listed)
    for name in listed:
        assert isinstance(cli_main.circuit_merge.get_command(None, name), click.Command), name

    @click.command(name="search")
    @click.argument("what")
    def search(what):
        click.echo(f"searching {what}")

    for name in ("circuit_merge_plugin.search", "circuit_merge_plugin.search.command"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["circuit_merge_plugin.search.command"].search = search
    assert "search" in cli_main.circuit_merge.list_commands(None)
    with pytest.raises(SystemExit) as stop:
        cli_main.main(["search", "orders"])
    assert stop.value.code == 0 and capsys.readouterr().out == "searching orders\n"
    with pytest.raises(SystemExit) as stop:
        cli_main.main(["--help"])
    assert stop.value.code == 0
    assert "circuit-merge search" in capsys.readouterr().out
    # not a subcommand's name: the merge command's own refusal
    with pytest.raises(SystemExit) as stop:
        cli_main.main(["only-one-path"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("circuit-merge: error: expected BASE VARIANT1")
