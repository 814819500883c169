"""Registration through entry points: nothing for the user to import or call.

Each test runs a fresh interpreter, since registration is about start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest


PROJECT = Path(__file__).resolve().parent.parent

REGISTERED = textwrap.dedent(
    """
    from mergekit.merge_methods import registry
    from circuit_merge_plugin.adapters.methods import mergekit_api
    if mergekit_api() == "0.1.5":
        names = [m.spec.name for m in registry.registered_methods()]
    else:
        names = list(registry.REGISTERED_MERGE_METHODS)
    print("circuit-count", names.count("circuit"))
    """
)


def python(code: str, *, executable: str = sys.executable, env_extra=None, check=True):
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env.update(env_extra or {})
    result = subprocess.run(
        [executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow
def test_registered_without_any_user_import():
    result = python("from mergekit import merge_methods; " + REGISTERED.replace("\n", "\n"))
    assert "circuit-count 1" in result.stdout


def test_start_up_imports_neither_torch_nor_mergekit():
    result = python(
        "import sys; print(sorted(m for m in ('torch', 'mergekit', 'circuit_merge_plugin')"
        " if m in sys.modules))"
    )
    # The .pth bootstrap loads only our tiny package; torch/mergekit stay unloaded.
    assert result.stdout.strip() == "['circuit_merge_plugin']"


@pytest.mark.slow
def test_registration_is_idempotent():
    code = textwrap.dedent(
        """
        import mergekit.merge_methods
        import circuit_merge_plugin
        import importlib
        importlib.reload(circuit_merge_plugin)
        from circuit_merge_plugin.adapters.registration import register_entry_points
        assert register_entry_points() == []
        assert register_entry_points() == []
        """
    )
    result = python(code + REGISTERED)
    assert "circuit-count 1" in result.stdout


@pytest.fixture
def other_plugins(tmp_path):
    """A second distribution in the same entry-point group: one duplicate, one broken."""
    dist = tmp_path / "otherplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: otherplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mergekit.merge_methods]\n"
        "circuit = circuit_merge_plugin.adapters.methods:circuit_method\n"
        "broken = otherplugin_missing_module:method\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_shared_group_and_broken_plugin_only_warn(other_plugins):
    result = python("import mergekit.merge_methods\n" + REGISTERED, env_extra=other_plugins)
    assert "circuit-count 1" in result.stdout
    assert "broken" in result.stderr and "failed to register" in result.stderr


def test_broken_plugin_cannot_break_interpreter_start(other_plugins):
    result = python("print('alive')", env_extra=other_plugins)
    assert result.stdout.strip() == "alive"


def _fresh_venv(root: Path) -> Path:
    """A new venv that borrows this environment's dependencies by a plain path.

    The project itself is then installed into it, so the start-up hook and the
    entry point come only from that installation.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    venv_python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path line: the dependencies' own .pth files (our editable install) are not run.
    Path(purelib, "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv_python


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_fresh_venv_install(tmp_path, llama_family, editable):
    venv_python = _fresh_venv(tmp_path / "venv")
    target = ["-e", str(PROJECT)] if editable else [str(PROJECT)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(venv_python), "install", "-q",
            "--no-deps", "--no-build-isolation", "--no-index", *target,
        ],
        check=True,
        capture_output=True,
    )
    where = python(
        "import circuit_merge_plugin, sys; print(circuit_merge_plugin.__file__)",
        executable=str(venv_python),
    ).stdout.strip()
    if editable:
        assert where.startswith(str(PROJECT))
    else:
        assert where.startswith(str(tmp_path / "venv"))
    result = python("import mergekit.merge_methods\n" + REGISTERED, executable=str(venv_python))
    assert "circuit-count 1" in result.stdout

    # And the unmodified mergekit-yaml entry point, run by that interpreter, merges.
    config = {
        "merge_method": "circuit",
        "base_model": str(llama_family.base),
        "models": [{"model": str(p)} for p in llama_family.variants],
        "parameters": {"seed": 1},
        "dtype": "float32",
    }
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    merged = subprocess.run(
        [
            str(venv_python), "-c",
            "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())",
            str(recipe), str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert merged.returncode == 0, merged.stderr
    assert list(out.glob("*.safetensors"))
