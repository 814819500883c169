"""Shared fixtures: locally generated model families and a mergekit-yaml runner.

The same suite runs under mergekit 0.1.5 and 0.1.4 (see .ci/test); tests that
only make sense under one API use the ``api`` fixture (the package's one probe,
:func:`circuit_merge_plugin.adapters.methods.mergekit_api`) to skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
import yaml

from circuit_merge_plugin.adapters.methods import mergekit_api  # the one probe
from circuit_merge_plugin.demo.toymodels import build_family

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def api() -> str:
    return mergekit_api()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one intra-op thread is faster, and avoids spinning
    OpenMP workers on a busy machine. Restored after the module using it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["torch", "fused"], scope="module")
def implementation(request):
    """Run the module's tests once per kernel implementation (CIRCUIT_MERGE_KERNEL).

    Module scope: hypothesis tests may use it, and each implementation's
    tests run together. The fused one must really be in use (numba is a core
    dependency): no silent fallback to the torch kernel.
    """
    from circuit_merge_plugin.core.kernel import KERNEL_ENV, kernel_implementation

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KERNEL_ENV, request.param)
        assert kernel_implementation("cpu") == request.param
        yield request.param


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("llama"), variants=3, seed=0)


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory):
    return build_family(
        tmp_path_factory.mktemp("qwen2"), variants=2, architecture="qwen2", seed=1
    )


def run_mergekit_yaml(config: dict, out: Path, *args: str, check: bool = True):
    """Run the installed ``mergekit-yaml`` console script on ``config``."""
    out = Path(out)
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(recipe), str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"mergekit-yaml failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def load_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors model directory (any sharding)."""
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_refused(code, captured, prog, expect):
    """A refusal: exit code 2, one stderr line ``PROG: error: ...`` holding every
    text of ``expect``, nothing on stdout."""
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), captured.err
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert captured.out == ""
