"""What the command line was asked to do: the original script's YAML config plus flags.

Pure Python (PyYAML only). The original script's config file looks like::

    base_model: /path/to/base
    variant_models:
      - model: /path/to/variant1
      - model: /path/to/variant2
    output_dir: /path/to/output
    parameters:
      temperature: 0.2
      base_droprate: 0.6
      meaningful_change_threshold: 1e-6
      seed: 42

Values given on the command line override the file's. Parameters are validated
here (through :mod:`circuit_merge_plugin.core.params`), before any input is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    ORIGINAL_SCRIPT_SEED,
    CircuitParams,
    check_parameter,
)

#: mergekit's default output shard size, in bytes.
DEFAULT_SHARD_SIZE = "5B"
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
CONFIG_KEYS = ("base_model", "variant_models", "output_dir", "parameters", "dtype", "out_dtype")
PARAMETER_NAMES = tuple(p.name for p in GLOBAL_PARAMETERS) + ("skip_rescaling",)


@dataclass
class MergeRequest:
    """A fully resolved, validated merge request."""

    base: str
    variants: List[str]
    output: str
    params: CircuitParams
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    device: str = "cpu"
    out_shard_size: int = 5_000_000_000
    quiet: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    report: bool = True  # write circuit_merge_report.json into the output
    tokenizer_source: Optional[str] = None  # "base", "union" or a model directory
    sources: Dict[str, str] = field(default_factory=dict)  # parameter -> where from


def parse_size(text: Any, name: str = "out-shard-size") -> int:
    """mergekit's size syntax: an integer with an optional K/M/B (10^3/6/9) suffix."""
    value = str(text).strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(value[-1:].lower(), 1)
    digits = value[:-1] if scale != 1 else value
    if not digits.isdigit() or int(digits) * scale <= 0:
        raise ValueError(
            f"{name} must be a positive size like 500M or 5B (bytes), got {text!r}"
        )
    return int(digits) * scale


def parse_dtype(text: Optional[str], name: str) -> Optional[str]:
    if text is None:
        return None
    dtype = DTYPES.get(str(text).lower())
    if dtype is None:
        raise ValueError(
            f"{name} must be one of float32, float16, bfloat16, got {text!r}"
        )
    return dtype


def parse_tokenizer_source(text: Optional[str]) -> Optional[str]:
    """``base``, ``union`` or a model directory (as mergekit-yaml's tokenizer_source)."""
    if text is None or text in ("base", "union"):
        return text
    import os

    if not os.path.isdir(os.path.expanduser(text)):
        raise ValueError(
            f"--tokenizer-source must be base, union or a model directory, got {text!r}"
        )
    return text


def load_config(path: str) -> Dict[str, Any]:
    """Read the original script's YAML config; ValueError naming the file and key if malformed."""
    import yaml

    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ValueError(f"config {path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"config {path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of keys at the top level")
    if "merge_method" in data or "models" in data:
        raise ValueError(
            f"config {path}: this is a mergekit recipe; check it with circuit-merge check "
            "and run it with mergekit-yaml (circuit-merge --config reads base_model / "
            "variant_models / output_dir)"
        )
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"config {path}: unknown key {unknown[0]!r}; expected {', '.join(CONFIG_KEYS)}"
        )
    config: Dict[str, Any] = {}
    for key in ("base_model", "output_dir", "dtype", "out_dtype"):
        if data.get(key) is not None:
            if not isinstance(data[key], (str, int, float)):
                raise ValueError(f"config {path}: {key} must be a string")
            config[key] = str(data[key])
    if "variant_models" in data:
        entries = data["variant_models"]
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"config {path}: variant_models must be a non-empty list")
        variants = []
        for index, entry in enumerate(entries, 1):
            if isinstance(entry, dict) and set(entry) == {"model"}:
                entry = entry["model"]
            if not isinstance(entry, str):
                raise ValueError(
                    f"config {path}: variant_models entry {index} must be "
                    "{model: PATH}"
                )
            variants.append(entry)
        config["variant_models"] = variants
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError(f"config {path}: parameters must be a mapping")
    for key in parameters:
        if key not in PARAMETER_NAMES:
            raise ValueError(
                f"config {path}: unknown parameter {key!r}; expected one of "
                f"{', '.join(PARAMETER_NAMES)}"
            )
    config["parameters"] = dict(parameters)
    return config


def resolve_parameters(
    config_parameters: Mapping[str, Any],
    flag_values: Mapping[str, Any],
    *,
    config_path: Optional[str] = None,
) -> tuple:
    """CircuitParams from defaults < config ``parameters`` < command-line flags.

    ``flag_values`` holds only the flags actually given on the command line.
    Returns (params, sources) where sources maps each parameter to where its
    value came from ("default", "config" or "command line"). The seed follows
    ``SEED_RULES["circuit-merge"]`` (default ``ORIGINAL_SCRIPT_SEED``).
    """
    values: Dict[str, Any] = {p.name: p.default for p in GLOBAL_PARAMETERS}
    values["seed"] = ORIGINAL_SCRIPT_SEED
    sources = {name: "default" for name in values}
    for origin, given in (("config", config_parameters), ("command line", flag_values)):
        for key, value in given.items():
            where = f"config {config_path}: " if origin == "config" else ""
            if key == "skip_rescaling":
                if not isinstance(value, bool):
                    raise ValueError(f"{where}skip_rescaling must be true or false, got {value!r}")
                key, value = "rescale", not value
            try:
                values[key] = check_parameter(key, value)
            except ValueError as error:
                raise ValueError(f"{where}{error}") from None
            sources[key] = origin
    if values["seed"] is None:
        values["seed"] = ORIGINAL_SCRIPT_SEED
    return CircuitParams.from_parameters(values), sources


def paths_from(
    positionals: List[str], config: Mapping[str, Any], config_path: Optional[str]
) -> tuple:
    """(base, variants, output) from positionals and/or the config file."""
    if config_path is None:
        if len(positionals) < 3:
            raise ValueError(
                "expected BASE VARIANT1 [VARIANT2 ...] OUTPUT "
                f"(got {len(positionals)} path{'s' if len(positionals) != 1 else ''}); "
                "see circuit-merge --help"
            )
        return positionals[0], positionals[1:-1], positionals[-1]
    if len(positionals) >= 3:
        return positionals[0], positionals[1:-1], positionals[-1]
    if len(positionals) == 2:
        raise ValueError(
            "with --config give no paths, just OUTPUT, or BASE VARIANT1 [...] OUTPUT"
        )
    base = config.get("base_model")
    variants = config.get("variant_models")
    output = positionals[0] if positionals else config.get("output_dir")
    for key, value in (("base_model", base), ("variant_models", variants), ("output_dir", output)):
        if not value:
            raise ValueError(f"config {config_path}: missing {key}")
    return base, list(variants), output

