"""Checking the command line's input directories before anything is merged.

Standard library only: directories, file kinds, ``config.json`` and the
safetensors headers (names, dtypes, shapes) are checked here, so bad input is
refused with a one-line message before torch or mergekit is even imported and
before any tensor is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from circuit_merge_plugin.io.headers import TensorHeader, read_directory

#: File suffixes of pickled PyTorch checkpoints (loading one can run code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class ModelDir:
    """One input directory as found on disk."""

    given: str  # as the user wrote it
    path: Path  # absolute
    role: str  # "base model" or "variant N"
    tensors: Dict[str, TensorHeader] = field(default_factory=dict)
    pickles: List[Path] = field(default_factory=list)  # used only if no safetensors
    config: Optional[dict] = None  # parsed config.json, if any

    @property
    def pickled(self) -> bool:
        return not self.tensors and bool(self.pickles)

    @property
    def architecture(self) -> Optional[str]:
        archs = (self.config or {}).get("architectures")
        if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str):
            return archs[0]
        return None


def inspect_directory(given: str, role: str, *, allow_pickle: bool = False) -> ModelDir:
    """Read what a model directory holds (headers only); ValueError if unusable."""
    path = Path(given).expanduser()
    if not path.exists():
        raise ValueError(f"{role} {given}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{role} {given}: not a directory")
    try:
        names = sorted(os.listdir(path))
    except OSError as error:
        raise ValueError(f"{role} {given}: cannot read ({error.strerror})") from None
    model = ModelDir(given=given, path=path.resolve(), role=role)
    if any(name.endswith(".safetensors") for name in names):
        try:
            model.tensors = read_directory(path)
        except ValueError as error:
            raise ValueError(f"{role} {error}") from None
        if not model.tensors:
            raise ValueError(f"{role} {given}: its .safetensors files hold no tensors")
    else:
        model.pickles = [path / n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        if not model.pickles:
            raise ValueError(f"{role} {given}: no .safetensors files in the directory")
        if not allow_pickle:
            raise ValueError(
                f"{role} {given}: only pickled checkpoints ({model.pickles[0].name}); "
                "loading a pickle can run arbitrary code: convert it to safetensors, "
                "or pass --allow-pickle if you trust it"
            )
    config_path = path / "config.json"
    if config_path.is_file():
        try:
            model.config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{role} {config_path}: unreadable config.json ({error})")
    return model


def check_compatible(base: ModelDir, variants: Sequence[ModelDir]) -> None:
    """Same shape for every tensor name everywhere; floating types stay floating.

    Only safetensors inputs are checked here (pickles are checked once loaded).
    """
    reference: Dict[str, ModelDir] = {}
    for model in (base, *variants):
        for name, info in model.tensors.items():
            first = reference.setdefault(name, model)
            if first is model:
                continue
            expected = first.tensors[name]
            if info.shape != expected.shape:
                raise ValueError(
                    f"shape mismatch in tensor {name!r}: {model.role} {model.given} has "
                    f"{list(info.shape)}, {first.role} {first.given} has "
                    f"{list(expected.shape)}"
                )
            if info.is_float != expected.is_float:
                raise ValueError(
                    f"dtype mismatch in tensor {name!r}: {model.role} {model.given} has "
                    f"{info.dtype}, {first.role} {first.given} has {expected.dtype}"
                )


def check_output(output: str, inputs: Sequence[ModelDir], *, overwrite: bool) -> Path:
    """Resolve OUTPUT and refuse what would clobber inputs or existing models."""
    path = Path(output).expanduser().resolve()
    for model in inputs:
        if path == model.path or path in model.path.parents:
            raise ValueError(
                f"output {output}: would replace the {model.role} {model.given}"
            )
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"output {output}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise ValueError(
                f"output {output}: exists and is not empty (pass --overwrite to replace it)"
            )
    return path
