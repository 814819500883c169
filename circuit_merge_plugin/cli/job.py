"""One ``circuit-merge`` run: check inputs, merge through mergekit, publish atomically.

Order of work, so that bad input costs nothing and leaves nothing behind:

1. parameters were validated when the request was built (:mod:`.request`);
2. directories, file kinds, config.json and safetensors headers are checked
   (:mod:`circuit_merge_plugin.io.inputs`), still without torch or mergekit;
3. mergekit is imported and the mode chosen: directories whose config.json names
   an architecture mergekit knows go through its normal planner
   (``mergekit.merge.run_merge`` on a ``MergeConfiguration`` built in memory:
   config, tokenizer and model card written as ``mergekit-yaml`` would); others
   through its raw-tensor planning (:mod:`.raw_tensors`);
4. everything is written into a hidden temporary directory beside OUTPUT,
   completed with an index, a ``circuit_merge.json`` manifest and its digest,
   and (unless ``--no-report``) ``circuit_merge_report.json``, written by the
   merge method itself as it merges (:mod:`circuit_merge_plugin.adapters.recording`), with variants
   labelled as given on the command line; only then is it renamed to OUTPUT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional

from circuit_merge_plugin.io.inputs import (
    ModelDir,
    check_compatible,
    check_output,
    inspect_directory,
)
from circuit_merge_plugin.cli.request import MergeRequest

MANIFEST_NAME = "circuit_merge.json"
TEMP_MARKER = ".circuit-merge-tmp-"


@dataclass
class Inputs:
    base: ModelDir
    variants: List[ModelDir]
    output: Path


def check_inputs(request: MergeRequest) -> Inputs:
    """Step 2: everything that can be checked without reading a tensor."""
    base = inspect_directory(request.base, "base model", allow_pickle=request.allow_pickle)
    variants = [
        inspect_directory(path, f"variant {index}", allow_pickle=request.allow_pickle)
        for index, path in enumerate(request.variants, 1)
    ]
    seen = {base.path: base}
    for variant in variants:
        if variant.path in seen:
            raise ValueError(
                f"{variant.role} {variant.given} is the same directory as "
                f"{seen[variant.path].role} {seen[variant.path].given}"
            )
        seen[variant.path] = variant
    _check_vocabularies(base, variants, request.tokenizer_source)
    output = check_output(request.output, [base, *variants], overwrite=request.overwrite)
    return Inputs(base, variants, output)


def _vocab_size(model: ModelDir) -> Optional[int]:
    size = (model.config or {}).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_vocabularies(base: ModelDir, variants: List[ModelDir],
                        tokenizer_source: Optional[str]) -> None:
    """Shapes agree tensor by tensor; a vocabulary difference (config.json
    vocab_size) is refused with its fix unless --tokenizer-source aligns it, and
    then only the vocabulary axis of the embeddings may differ."""
    sizes = {id(m): _vocab_size(m) for m in (base, *variants)}
    differing = [v for v in variants
                 if None not in (sizes[id(v)], sizes[id(base)]) and sizes[id(v)] != sizes[id(base)]]
    if not differing:
        check_compatible(base, variants)
        return
    if tokenizer_source is None:
        other = differing[0]
        raise ValueError(
            f"vocabulary sizes differ: {other.role} {other.given} has {sizes[id(other)]} "
            f"tokens, base model {base.given} {sizes[id(base)]}; pass --tokenizer-source union "
            "(all tokens), base (the base's) or MODEL to align them"
        )
    vocabularies = {size for size in sizes.values() if size is not None}

    def without_vocabulary_axis(model: ModelDir) -> ModelDir:
        kept = {}
        for name, info in model.tensors.items():
            reference = base.tensors.get(name)
            if (reference is not None and info.shape != reference.shape and info.shape
                    and info.shape[1:] == reference.shape[1:]
                    and {info.shape[0], reference.shape[0]} <= vocabularies):
                continue  # aligned by mergekit's tokenizer_source
            kept[name] = info
        return replace(model, tensors=kept)

    check_compatible(base, [without_vocabulary_axis(v) for v in variants])


# ---------------------------------------------------------------- the recipe


def _recipe_path(given: str) -> str:
    """A path mergekit reads as local: "a/b" would be asked of the Hugging Face hub."""
    given = os.path.expanduser(given)
    if os.path.isabs(given) or given.startswith(("./", "../")) or given in (".", ".."):
        return given
    return "./" + given


def _single_file(given: str) -> Optional[Path]:
    files = sorted(Path(given).glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def recipe(
    request: MergeRequest, *, absolute: Optional[Inputs] = None, single_files: bool = False
) -> dict:
    """The equivalent mergekit recipe (paths as given, or absolute)."""
    if absolute is not None:
        base = str(absolute.base.path)
        variants = [str(v.path) for v in absolute.variants]
    else:
        base = _recipe_path(request.base)
        variants = [_recipe_path(v) for v in request.variants]
        if single_files:  # mergekit-pytorch reads one file per model
            base, *variants = [
                _recipe_path(str(_single_file(p))) for p in (request.base, *request.variants)
            ]
    data = {
        "merge_method": "circuit",
        "base_model": base,
        "models": [{"model": v} for v in variants],
        "parameters": request.params.as_dict(),
    }
    if request.dtype:
        data["dtype"] = request.dtype
    if request.out_dtype:
        data["out_dtype"] = request.out_dtype
    if request.tokenizer_source in ("base", "union"):
        data["tokenizer_source"] = request.tokenizer_source
    elif request.tokenizer_source is not None:
        data["tokenizer_source"] = (str(Path(request.tokenizer_source).expanduser().resolve())
                                    if absolute is not None
                                    else _recipe_path(request.tokenizer_source))
    return data


def recipe_yaml(request: MergeRequest, mode: str = "transformers") -> str:
    import yaml

    lines = [
        "# Circuit-Merge recipe equivalent to this circuit-merge command line.",
        "# models: are in priority order (first listed = highest priority).",
    ]
    single = mode != "transformers" and all(
        _single_file(p) is not None for p in (request.base, *request.variants)
    )
    if mode == "transformers":
        lines.append("# Run it with: mergekit-yaml circuit.yaml OUTPUT")
    else:
        lines += [
            "# Bare tensors: run it with mergekit-pytorch circuit.yaml OUTPUT --tensor-union",
            "# (it reads one safetensors file per model and needs each tensor in the",
            "# base; circuit-merge also reads shard directories and applies the original",
            "# script's rules for tensors missing from some inputs).",
        ]
        if not single:
            lines.append("# NOTE: some inputs hold several files; list one file per model.")
    body = yaml.safe_dump(
        recipe(request, single_files=single), sort_keys=False, default_flow_style=False
    )
    return "\n".join(lines) + "\n" + body


# ---------------------------------------------------------------- the modes


def choose_mode(inputs: Inputs) -> str:
    """"transformers" if mergekit's planner can take every input, else "raw"."""
    models = [inputs.base, *inputs.variants]
    arch = inputs.base.architecture
    if arch is None or any(m.architecture != arch for m in models):
        return "raw"
    for model in models:
        stem = "pytorch_model.bin" if model.pickled else "model.safetensors"
        if not any((model.path / f).exists() for f in (stem, stem + ".index.json")):
            return "raw"
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        known = arch_info_for_config(AutoConfig.from_pretrained(str(inputs.base.path)))
    except Exception:  # unknown model_type, remote code, ...: bare tensors then
        return "raw"
    return "transformers" if known is not None else "raw"


def _options(request: MergeRequest):
    from mergekit.options import MergeOptions

    return MergeOptions(
        device=request.device,
        out_shard_size=request.out_shard_size,
        quiet=request.quiet,
        copy_tokenizer=True,
        write_model_card=True,
        safe_serialization=True,
        lazy_unpickle=False,
    )


def merge_transformers(request: MergeRequest, inputs: Inputs, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    data = recipe(request, absolute=inputs)
    data["base_model"] = {"model": {"path": data["base_model"]}}
    data["models"] = [{"model": {"model": {"path": m["model"]}}} for m in data["models"]]
    config = MergeConfiguration.model_validate(data)
    run_merge(config, str(out), _options(request), config_source=recipe_yaml(request))


# Files the original script meant to copy from the base (its copy_config_files).
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def merge_raw(request: MergeRequest, inputs: Inputs, out: Path) -> None:
    from mergekit.graph import Executor

    from circuit_merge_plugin.cli.raw_tensors import load_pickle_headers, plan_raw_merge

    models = [inputs.base, *inputs.variants]
    for model in models:
        if model.pickled:
            load_pickle_headers(model)
    if any(m.pickled for m in models):
        check_compatible(inputs.base, inputs.variants)
    tasks = plan_raw_merge(
        inputs.base,
        inputs.variants,
        str(out),
        request.params,
        dtype=request.dtype,
        out_dtype=request.out_dtype,
        out_shard_size=request.out_shard_size,
    )
    executor = Executor(tasks, math_device=request.device, storage_device="cpu")
    for _ in executor.run(quiet=request.quiet, desc="Circuit-Merge"):
        pass
    for name in _CONFIG_FILES:
        source = inputs.base.path / name
        if source.is_file():
            shutil.copy2(source, out / name)


# ---------------------------------------------------------------- the output


def ensure_index(out: Path) -> None:
    """Give a single-shard output the index file the original script always wrote."""
    for stem in ("model.safetensors",):
        single, index = out / stem, out / (stem + ".index.json")
        if single.exists() and not index.exists():
            from circuit_merge_plugin.io.headers import read_header

            tensors = read_header(single)
            total = sum(info.end - info.begin for info in tensors.values())
            content = {
                "metadata": {"total_size": total},
                "weight_map": {name: stem for name in sorted(tensors)},
            }
            index.write_text(json.dumps(content, indent=2) + "\n")


def versions() -> dict:
    import torch

    from circuit_merge_plugin import __version__
    from circuit_merge_plugin.adapters.methods import mergekit_version

    return {
        "circuit-merge-plugin": __version__,
        "mergekit": mergekit_version(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def write_manifest(out: Path, request: MergeRequest, inputs: Inputs, mode: str) -> str:
    from circuit_merge_plugin.io.digest import digest_directory

    digest = digest_directory(out)
    manifest = {
        "tool": "circuit-merge",
        "mode": mode,
        "base_model": request.base,
        "variant_models": list(request.variants),
        "parameters": request.params.as_dict(),
        "parameter_sources": dict(request.sources),
        "dtype": request.dtype,
        "out_dtype": request.out_dtype,
        "versions": versions(),
        "digest": {"algorithm": "circuit-merge digest v1 (sha256)", "value": digest},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return digest


def _created_parents(path: Path) -> List[Path]:
    missing = []
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextmanager
def atomic_directory(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; publish it on success.

    On any exception (including KeyboardInterrupt and the SystemExit that the
    command line raises on SIGTERM) the temporary directory and any parent
    directories made for it are removed and OUTPUT is left untouched.
    """
    made = _created_parents(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}{TEMP_MARKER}", dir=output.parent))
    try:
        yield temp
        _publish(temp, output, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for parent in made:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _publish(temp: Path, output: Path, *, overwrite: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o777 & ~umask)  # mkdtemp made it private
    if output.exists():
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        elif overwrite and output.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.circuit-merge-old-", dir=output.parent))
            old.rmdir()
            os.rename(output, old)
            os.rename(temp, output)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise ValueError(f"output {output}: appeared while merging; not replaced")
    os.rename(temp, output)


@contextmanager
def _reporting(request: MergeRequest, inputs: Inputs, out: Path) -> Iterator[None]:
    """Count contributions into OUT/circuit_merge_report.json unless --no-report."""
    if not request.report:
        yield
        return
    from circuit_merge_plugin.adapters import recording
    from circuit_merge_plugin.io.report_file import REPORT_FILE

    aliases = {str(model.path): model.given for model in (inputs.base, *inputs.variants)}
    # The recorder marks the report finished when this block ends without an
    # exception, while it is still in the temporary directory.
    with recording.reporting_to(str(out / REPORT_FILE), aliases):
        yield


def run_job(request: MergeRequest, *, inputs: Optional[Inputs] = None) -> tuple:
    """Run a whole merge; return (output path, mode, digest)."""
    inputs = inputs or check_inputs(request)
    # `circuit` is registered with mergekit as soon as mergekit's method registry
    # is imported: importing this package installed the hook (see registration.py).
    mode = choose_mode(inputs)
    if mode == "raw" and request.tokenizer_source is not None:
        from circuit_merge_plugin.errors import Refused

        raise Refused("--tokenizer-source needs model directories of an architecture mergekit "
                      "knows (config.json and model.safetensors); these are merged as bare "
                      "tensors")
    with atomic_directory(inputs.output, overwrite=request.overwrite) as temp:
        with _reporting(request, inputs, temp):
            if mode == "transformers":
                merge_transformers(request, inputs, temp)
            else:
                merge_raw(request, inputs, temp)
        ensure_index(temp)
        digest = write_manifest(temp, request, inputs, mode)
    return inputs.output, mode, digest


def guess_mode(request: MergeRequest) -> str:
    """The mode --print-recipe describes, from config.json files alone."""
    archs = set()
    for given in (request.base, *request.variants):
        try:
            config = json.loads((Path(given) / "config.json").read_text(encoding="utf-8"))
            archs.add(tuple(config.get("architectures") or ()))
        except (OSError, ValueError, AttributeError):
            return "raw"
    return "transformers" if len(archs) == 1 and () not in archs else "raw"
