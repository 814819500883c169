"""The package's layers, checked on every module's imports (parsed, not run).

The rule (arrows point down only):

* ``core`` (parameter table, kernel, random streams, tally): imports nothing of
  the package outside ``core``, and never mergekit;
* ``io`` (safetensors headers, input checks, digest, report file): ``core`` and ``io``;
* ``adapters`` (mergekit integration): ``core``, ``io`` and the package root's constants;
* ``insight`` (analyze, report): ``core``, ``io`` and the root's constants (not ``adapters``);
* front ends, ``cli``, ``demo`` and ``search``: anything in the package;
* the package root (``__init__``) imports only ``adapters.bootstrap`` (its public
  names load lazily, by name);
* ``circuit_merge_plugin/errors.py``, if present, is standard library only and may be
  imported by every layer;
* mergekit is imported at module level only in ``adapters`` and ``cli``
  (elsewhere inside functions, where a front end needs it);
* what the interpreter loads at start-up through the ``.pth`` hook (the root,
  ``adapters/__init__``, ``adapters/bootstrap``) imports no third-party module
  at module level.

Every import counts, including those inside functions (ast.walk), and relative
imports are resolved. A module outside every known layer is a failure, so a new
subpackage has to be placed in the rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

PACKAGE = "circuit_merge_plugin"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
ERRORS = "errors"  # the top-level errors module, open to every layer
TOP = "(root)"  # the package root's own names (METHOD_NAME, ...)

FRONT_ENDS = {"cli", "demo", "search"}
ALLOWED = {
    "core": {"core", ERRORS},
    "io": {"core", "io", ERRORS},
    "adapters": {"core", "io", "adapters", ERRORS, TOP},
    "insight": {"core", "io", "insight", ERRORS, TOP},
}
MERGEKIT_AT_MODULE_LEVEL = {"adapters", "cli"}
START_UP = {"__init__", "adapters/__init__", "adapters/bootstrap"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, tree: ast.AST, *, module_level_only: bool = False) -> Iterator[Tuple[str, int]]:
    """(absolute imported module, line) for every import in ``tree``."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = _module_level(tree) if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PACKAGE:  # `from circuit_merge_plugin import x`: x may be a module
                for alias in node.names:
                    submodule = ROOT / alias.name
                    if submodule.is_dir() or submodule.with_suffix(".py").exists():
                        yield f"{PACKAGE}.{alias.name}", node.lineno
                    else:
                        yield PACKAGE, node.lineno
            else:
                yield target, node.lineno


def _module_level(tree: ast.AST) -> Iterator[ast.AST]:
    """Nodes that run at import: everything outside function bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stack.append(child)


def _layer(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else TOP


def _target_layer(module: str) -> Optional[str]:
    """The layer an imported module belongs to, or None if it is not the package's."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else TOP


def violations(path: Path, source: str) -> List[str]:
    """Every broken rule of one module, as ``file:line: what``."""
    tree = ast.parse(source, filename=str(path))
    relative = path.relative_to(ROOT).with_suffix("").as_posix()
    layer = _layer(path)
    where = f"{PACKAGE}/{relative}.py"
    found = []
    if layer == TOP and relative == ERRORS:
        for module, line in _imports(path, tree):
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top != "__future__":
                found.append(f"{where}:{line}: errors.py is standard library only, imports {module}")
        return found
    if layer == TOP:
        allowed = {"adapters"}  # the start-up hook; public names load by name
    elif layer in FRONT_ENDS:
        allowed = None
    elif layer in ALLOWED:
        allowed = ALLOWED[layer]
    else:
        return [f"{where}: in no known layer ({layer!r}); place it in tests/test_layers.py's rule"]
    for module, line in _imports(path, tree):
        target = _target_layer(module)
        if target is None:
            if module.split(".")[0] == "mergekit" and layer in ("core", "io"):
                found.append(f"{where}:{line}: {layer} must not import mergekit ({module})")
            continue
        if target == ERRORS and module != f"{PACKAGE}.{ERRORS}":
            continue
        if allowed is not None and target not in allowed:
            found.append(f"{where}:{line}: {layer} imports {module} ({target} is above it)")
    if layer == TOP and relative == "__init__":
        allowed_modules = {f"{PACKAGE}.adapters", f"{PACKAGE}.adapters.bootstrap"}
        for module, line in _imports(path, tree):
            if module.startswith(PACKAGE) and module not in allowed_modules:
                found.append(f"{where}:{line}: the package root imports {module}")
    for module, line in _imports(path, tree, module_level_only=True):
        top = module.split(".")[0]
        if top == "mergekit" and layer not in MERGEKIT_AT_MODULE_LEVEL:
            found.append(f"{where}:{line}: imports mergekit at module level ({module})")
        if relative in START_UP and top not in (PACKAGE, "__future__") and top not in sys.stdlib_module_names:
            found.append(f"{where}:{line}: loaded at interpreter start-up, imports {module}")
    return found


def _modules() -> List[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_the_package_has_its_layers():
    layers = {_layer(path) for path in _modules()}
    assert {"core", "io", "adapters", "insight", "cli", "demo", TOP} <= layers


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_respects_the_layers(path):
    assert violations(path, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "file, source, expect",
    [
        ("core/x.py", "def f():\n    from circuit_merge_plugin.cli import main\n", "core imports circuit_merge_plugin.cli"),
        ("core/x.py", "from ..adapters import recording\n", "core imports circuit_merge_plugin.adapters"),
        ("core/x.py", "from circuit_merge_plugin import METHOD_NAME\n", "core imports circuit_merge_plugin"),
        ("core/x.py", "def f():\n    import mergekit.config\n", "core must not import mergekit"),
        ("io/x.py", "from circuit_merge_plugin.insight import report\n", "io imports circuit_merge_plugin.insight"),
        ("insight/x.py", "from circuit_merge_plugin.adapters.recording import record\n", "insight imports"),
        ("insight/x.py", "import mergekit\n", "imports mergekit at module level"),
        ("demo/x.py", "try:\n    from mergekit import config\nexcept ImportError:\n    pass\n", "module level"),
        ("adapters/bootstrap.py", "import torch\n", "loaded at interpreter start-up"),
        ("errors.py", "import torch\n", "standard library only"),
        ("newlayer/x.py", "import os\n", "in no known layer"),
    ],
)
def test_the_checker_finds_violations(file, source, expect):
    """The rule can fail: each of these sources breaks it."""
    found = violations(ROOT / file, source)
    assert any(expect in text for text in found), found


def test_allowed_imports_pass():
    assert violations(ROOT / "core" / "x.py", "from . import params\nimport torch\n") == []
    assert violations(ROOT / "io" / "x.py", "from circuit_merge_plugin.errors import Refused\n") == []
    assert violations(ROOT / "insight" / "x.py", "def f():\n    import mergekit\n") == []
    assert violations(ROOT / "cli" / "x.py", "import mergekit\nfrom ..insight import report\n") == []
