"""Benchmark workloads: locally generated model families and mergekit recipes.

A *size* such as ``35M`` or ``1B`` picks a Llama-style shape (hidden size a
power of two, intermediate = 2.6875 x hidden as in Llama's 512/1376 ratio,
enough layers to reach the size); the tokenizer's vocabulary is tiny, so nearly
all parameters are in the attention and MLP matrices. Families are generated
once by :func:`circuit_merge_plugin.demo.toymodels.build_family` and cached under
``benchmarks/speed/.cache`` (git-ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import yaml

#: Methods compared, in the order each round runs them.
METHODS = ("circuit", "della", "ties", "linear")

#: Parameters per layer of the generated Llama shape: q, o (h x h), k, v
#: (h x h/2 with 4 heads / 2 kv heads), gate, up, down (h x 2.6875h), two norms.
_PER_LAYER = 3.0 + 3 * 2.6875

DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def parse_size(text: str) -> int:
    """``35M`` -> 35_000_000; ``1.5B``, ``800k`` and plain integers too."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise ValueError(f"size must look like 35M, 1B or 800k, got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int

    @property
    def params(self) -> int:
        """Matrix + norm parameters (the tiny embeddings left out)."""
        h, i = self.hidden, self.intermediate
        return self.layers * (2 * h * h + 2 * h * (h // 2) + 3 * h * i + 2 * h) + h

    def label(self) -> str:
        return format_params(self.params)


def shape_for(size: int, min_layers: int = 8) -> Shape:
    """The widest power-of-two hidden size that still gets ``min_layers`` layers."""
    if size <= 0:
        raise ValueError("size must be positive")
    best = None
    for hidden in (64, 128, 256, 512, 1024, 2048, 4096, 8192):
        layers = round(size / (_PER_LAYER * hidden * hidden))
        if layers >= min_layers or best is None:
            best = Shape(hidden, max(1, layers), int(hidden * 2.6875) // 16 * 16)
    return best


def format_params(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.3g}{unit}"
    return str(count)


@dataclass(frozen=True)
class Family:
    """A generated base and its variants (``variant1`` is the highest priority)."""

    root: Path
    shape: Shape
    dtype: str
    variants: int

    @property
    def base(self) -> Path:
        return self.root / "base"

    def variant(self, index: int) -> Path:
        return self.root / f"variant{index + 1}"

    def input_bytes(self, variants: int) -> int:
        """Bytes of safetensors read by a merge of ``variants`` variants + base."""
        total = 0
        for path in [self.base] + [self.variant(k) for k in range(variants)]:
            total += sum(p.stat().st_size for p in path.glob("*.safetensors"))
        return total


def tiny_shape() -> Shape:
    return Shape(hidden=64, layers=2, intermediate=176)


def build(cache: Path, shape: Shape, variants: int, dtype: str, seed: int = 0) -> Family:
    """Generate (or reuse) a family in ``cache``."""
    import torch

    from circuit_merge_plugin.demo.toymodels import build_family

    torch_dtype = getattr(torch, DTYPES[dtype])
    stem = f"llama-h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-{DTYPES[dtype]}"
    # variant k does not depend on how many variants a family has, so a
    # cached family with more variants serves too
    for found in sorted(Path(cache).glob(f"{stem}-n*-s{seed}")):
        have = int(found.name[len(stem) + 2:].split("-s")[0])
        if have >= variants and (found / ".complete").exists():
            return Family(root=found, shape=shape, dtype=DTYPES[dtype], variants=have)
    root = Path(cache) / f"{stem}-n{variants}-s{seed}"
    build_family(
        root,
        variants=variants,
        hidden_size=shape.hidden,
        layers=shape.layers,
        intermediate_size=shape.intermediate,
        seed=seed,
        dtype=torch_dtype,
    )
    return Family(root=root, shape=shape, dtype=DTYPES[dtype], variants=variants)


def recipe(method: str, family: Family, variants: int, *, seed: int = 1,
           out_dtype: Optional[str] = None, circuit: Optional[Dict] = None) -> Dict:
    """A mergekit recipe of ``method`` over the base and the first ``variants``.

    Settings are matched where the methods overlap: circuit's defaults
    (base_droprate 0.5: the top variant keeps half its delta, epsilon 0.1);
    della and ties keep density 0.5 with equal weights (della epsilon 0.1);
    linear averages the variants and the base (it reads the same inputs as the
    others with the least arithmetic: the I/O floor every method pays).
    ``circuit`` adds recipe parameters to circuit's (e.g. temperature, report).
    """
    models: List[Dict] = []
    for index in range(variants):
        entry: Dict = {"model": str(family.variant(index))}
        if method in ("della", "ties"):
            entry["parameters"] = {"weight": 1.0, "density": 0.5}
            if method == "della":
                entry["parameters"]["epsilon"] = 0.1
        elif method == "linear":
            entry["parameters"] = {"weight": 1.0}
        models.append(entry)
    config: Dict = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": models,
        "dtype": out_dtype or family.dtype,
    }
    if method == "circuit":
        config["parameters"] = {"seed": seed, **(circuit or {})}
    elif method == "linear":
        # base_model alone is not a linear input: list it so that the same
        # tensors are read as by the other methods
        models.append({"model": str(family.base), "parameters": {"weight": 1.0}})
    return config


def write_recipe(path: Path, config: Dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
