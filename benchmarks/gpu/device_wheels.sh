#!/usr/bin/env bash
# Prepare the wheels that benchmarks/gpu/device_check.sh installs on the GPU machine
# (which has torch, transformers, safetensors, pytest, hypothesis, yaml, but no
# network and no mergekit). Run HERE, from the repository root, with PyPI access:
#
#     bash benchmarks/gpu/device_wheels.sh
#
# It fills .whl/ (git-ignored; about 70 MiB) with: this plugin (built from the
# working tree), mergekit 0.1.5 and the dependencies missing on that image
# (numba and llvmlite for the fused CPU kernel among them), as CPython 3.12
# manylinux wheels. Then call the device tool with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/../.."   # the repository root
PY="${PYTHON:-.venv/bin/python}"
rm -rf .whl && mkdir -p .whl
EXCLUDE="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
# the plugin itself, from this working tree (hatchling is in the dev venv)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
# versions as in the dev venv, which resolved them together
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in mergekit pydantic pydantic_core annotated-types typing-inspection immutables numba llvmlite; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .whl "$name==$(version "$name")"
done
ls -la .whl
du -sh .whl
