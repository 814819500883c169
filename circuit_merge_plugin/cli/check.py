"""``circuit-merge check RECIPE.yaml``: a preflight of a mergekit recipe.

    circuit-merge check RECIPE.yaml [--scan-values] [--allow-pickle]

Applies to an ordinary mergekit recipe with ``merge_method: circuit`` (a
``models:`` list or ``slices:``) the checks ``circuit-merge`` applies to its own
inputs, from the safetensors headers alone (:mod:`circuit_merge_plugin.io.inputs`,
:mod:`circuit_merge_plugin.io.headers`), before a long merge:

* every model path exists and holds safetensors (pickled checkpoints are a
  problem unless ``--allow-pickle``); paths are relative to the directory the
  command runs in, as for ``mergekit-yaml``;
* architectures (``config.json``) agree, and every tensor has the same shape
  and kind (floating or not) in every model, naming the model as listed in the
  recipe and the tensor; a tensor of the base missing from a model is a
  problem; a difference of vocabulary size is reported with its fix
  (``tokenizer_source: union``) unless the recipe already aligns vocabularies;
* every parameter name is known (did-you-mean for misspellings: mergekit itself
  silently ignores unknown names), global parameters are not given per model
  (mergekit would ignore them there), and every value each tensor resolves to is
  in range, naming parameter, model, tensor and value. Values resolve as
  mergekit resolves them: a model's (or slice source's) own value, then the
  slice's, then the recipe's; in a list of ``{filter, value}`` entries the first
  whose filter is a substring of the tensor name wins and an entry without
  filter (or ``*``) matches every tensor; a list of numbers is a gradient over
  the layers, checked at its end points;
* with ``--scan-values`` every tensor is read once and NaN/Inf reported by
  tensor and model.

Exit 0 with a one-screen summary (models, tensors, bytes to read, drop rate per
model), or 2 with the list of problems.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import click

from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    OUTPUT_PARAMETERS,
    VARIANT_PARAMETERS,
    parameter_info,
)
from circuit_merge_plugin.errors import EXIT_REFUSED, PROG, Refused, print_error, run_guarded
from circuit_merge_plugin.io.inputs import ModelDir, inspect_directory

CHECK_PROG = f"{PROG} check"
METHOD = "circuit"
#: Names valid under the recipe's (or a slice's) ``parameters:``.
GLOBAL_NAMES = tuple(p.name for p in GLOBAL_PARAMETERS + VARIANT_PARAMETERS + OUTPUT_PARAMETERS)
#: Names valid under a model's (or a slice source's) ``parameters:``.
MODEL_NAMES = tuple(p.name for p in VARIANT_PARAMETERS)
#: At most this many problems of one kind are listed (then a count).
SHOWN_PER_KIND = 5


@dataclass
class Source:
    """One model of the recipe, as listed."""

    label: str  # "base model ./b", "model 2 ./v2", "slice 1 source 2 ./v2"
    path: str  # as given
    parameters: Dict[str, Any] = field(default_factory=dict)
    layer_range: Optional[Tuple[int, int]] = None
    model: Optional[ModelDir] = None


@dataclass
class Group:
    """What one merge of the recipe combines: the base and its variants in
    priority order, and the parameters that apply (most specific first)."""

    name: str
    base: Source
    variants: List[Source]
    parameters: List[Dict[str, Any]]


@dataclass
class CheckResult:
    problems: List[str]
    summary: List[str]


class _Problems:
    """Problems in first-seen order, similar ones counted instead of repeated."""

    def __init__(self):
        self.items: List[str] = []
        self._kinds: Dict[str, List[str]] = {}

    def add(self, text: str, kind: Optional[str] = None) -> None:
        if kind is None:
            if text not in self.items:
                self.items.append(text)
            return
        seen = self._kinds.setdefault(kind, [])
        seen.append(text)
        if len(seen) <= SHOWN_PER_KIND:
            self.items.append(text)

    def listing(self) -> List[str]:
        extra = [f"... and {len(v) - SHOWN_PER_KIND} more like: {v[0]}"
                 for v in self._kinds.values() if len(v) > SHOWN_PER_KIND]
        return self.items + extra

    def __len__(self) -> int:
        return len(self.items) + sum(max(0, len(v) - SHOWN_PER_KIND)
                                     for v in self._kinds.values())


# ---------------------------------------------------------------- the recipe


def load_recipe(path: str) -> dict:
    """The recipe as YAML data; Refused naming the file when it cannot be read."""
    import yaml

    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as error:
        raise Refused(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise Refused(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise Refused(f"{path}: not a mergekit recipe (expected a mapping at the top level)")
    return data


def _model_path(reference: Any) -> Optional[str]:
    """The local path of a mergekit model reference (a string, or ``{model: {path}}``)."""
    if isinstance(reference, str):
        return reference
    if isinstance(reference, dict):
        inner = reference.get("model", reference)
        if isinstance(inner, dict):
            inner = inner.get("path")
        if isinstance(inner, str):
            return inner
    return None


def _mapping(value: Any, where: str, problems: _Problems) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(f"{where}: parameters must be a mapping of name to value")
        return {}
    return dict(value)


def groups_of(recipe: dict, problems: _Problems) -> List[Group]:
    """The merges a recipe describes (one for ``models:``, one per slice)."""
    top = _mapping(recipe.get("parameters"), "parameters", problems)
    base_given = _model_path(recipe.get("base_model")) if recipe.get("base_model") else None
    if "modules" in recipe:
        problems.add("modules: recipes are not checked (only models: and slices:)")
        return []
    if ("models" in recipe) == ("slices" in recipe):
        problems.add("the recipe needs exactly one of models: and slices:")
        return []
    if "models" in recipe:
        entries = recipe["models"]
        if not isinstance(entries, list) or not entries:
            problems.add("models: must be a non-empty list")
            return []
        sources = []
        for index, entry in enumerate(entries, 1):
            path = _model_path(entry.get("model") if isinstance(entry, dict) else entry)
            if path is None:
                problems.add(f"models[{index}]: no model path")
                continue
            label = f"model {index} {path}"
            parameters = _mapping(entry.get("parameters") if isinstance(entry, dict) else None,
                                  label, problems)
            sources.append(Source(label, path, parameters))
        if base_given is None:
            problems.add("no base_model: circuit takes every delta against the base model")
            return []
        base = next((s for s in sources if s.path == base_given), None)
        base = Source(f"base model {base_given}", base_given) if base is None else base
        variants = [s for s in sources if s.path != base_given]
        if not variants:
            problems.add("models: lists no model besides the base model")
        return [Group("models", base, variants, [top])]
    groups = []
    slices = recipe["slices"]
    if not isinstance(slices, list) or not slices:
        problems.add("slices: must be a non-empty list")
        return []
    for number, entry in enumerate(slices, 1):
        where = f"slice {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list):
            problems.add(f"{where}: needs a list of sources")
            continue
        slice_parameters = _mapping(entry.get("parameters"), where, problems)
        slice_base = _model_path(entry["base_model"]) if entry.get("base_model") else base_given
        sources = []
        for index, item in enumerate(entry["sources"], 1):
            path = _model_path(item.get("model")) if isinstance(item, dict) else None
            if path is None:
                problems.add(f"{where} source {index}: no model path")
                continue
            label = f"{where} source {index} {path}"
            layer_range = item.get("layer_range")
            if not (isinstance(layer_range, list) and len(layer_range) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                    and 0 <= layer_range[0] < layer_range[1]):
                problems.add(f"{label}: layer_range must be [start, end] with 0 <= start < end, "
                             f"got {layer_range!r}")
                layer_range = None
            sources.append(Source(label, path, _mapping(item.get("parameters"), label, problems),
                                  tuple(layer_range) if layer_range else None))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}
        if len(lengths) > 1:
            problems.add(f"{where}: its sources' layer_range lengths differ ({sorted(lengths)})")
        if slice_base is None:
            problems.add(f"{where}: no base_model (in the slice or the recipe)")
            continue
        base = next((s for s in sources if s.path == slice_base), None)
        if base is None:
            problems.add(f"{where}: the base model {slice_base} is not one of its sources")
            continue
        variants = [s for s in sources if s is not base]
        if not variants:
            problems.add(f"{where}: no source besides the base model")
        groups.append(Group(where, base, variants, [slice_parameters, top]))
    return groups


# ---------------------------------------------------------------- parameters


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(known)}"


def check_names(recipe: dict, groups: Sequence[Group], problems: _Problems) -> None:
    """Unknown names and global parameters given per model."""
    places = [("parameters", recipe.get("parameters"))]
    for number, entry in enumerate(recipe.get("slices") or [], 1):
        if isinstance(entry, dict):
            places.append((f"slice {number} parameters", entry.get("parameters")))
    for where, given in places:
        for name in (given if isinstance(given, dict) else {}):
            if name not in GLOBAL_NAMES:
                problems.add(f"{where}: unknown parameter {name!r}{_did_you_mean(name, GLOBAL_NAMES)}")
    global_only = {p.name for p in GLOBAL_PARAMETERS + OUTPUT_PARAMETERS}
    for group in groups:
        for source in [*group.variants, group.base]:
            for name in source.parameters:
                if name in global_only:
                    problems.add(f"{source.label}: {name!r} is a global parameter; mergekit "
                                 "ignores it under a model: move it to the recipe's parameters:")
                elif name not in MODEL_NAMES:
                    problems.add(f"{source.label}: unknown parameter {name!r}"
                                 f"{_did_you_mean(name, GLOBAL_NAMES)}")


def _is_conditional(setting: Any) -> bool:
    return isinstance(setting, dict) or (
        isinstance(setting, list) and any(isinstance(e, dict) for e in setting))


def resolve_setting(setting: Any, tensor: str) -> Tuple[bool, List[Any]]:
    """(found, values) of a recipe setting for one tensor, as mergekit resolves
    it: a scalar; a list of numbers (a gradient: its end points); a list of
    ``{filter, value}`` (the first entry whose filter is None, ``*`` or a
    substring of the tensor name)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return False, []
        if not _is_conditional(setting):
            return True, list(setting)
        for entry in setting:
            if not isinstance(entry, dict) or "value" not in entry:
                continue
            where = entry.get("filter")
            if where is None or where == "*" or (tensor and str(where) in tensor):
                return resolve_setting(entry["value"], tensor)
        return False, []
    return True, [setting]


def check_values(groups: Sequence[Group], tensors: Dict[str, List[str]],
                 problems: _Problems) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """Every value every tensor resolves to, in range; returns the per-variant
    drop rate range {group: {label: (min, max)}} for the summary."""
    from circuit_merge_plugin.core.kernel import drop_rates

    rates_by_group: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for group in groups:
        names = tensors.get(group.name, [])
        ranges: Dict[str, Tuple[float, float]] = {}
        for tensor in names:
            shared = {}
            for info in GLOBAL_PARAMETERS + OUTPUT_PARAMETERS:
                for settings in group.parameters:
                    if info.name in settings:
                        found, values = resolve_setting(settings[info.name], tensor)
                        if found:
                            shared[info.name] = _checked(info, values, "all models", tensor,
                                                         problems)
                            break
            overrides = []
            for source in group.variants:
                value = None
                for settings in (source.parameters, *group.parameters):
                    if "drop_rate" in settings:
                        found, values = resolve_setting(settings["drop_rate"], tensor)
                        if found:
                            value = _checked(parameter_info("drop_rate"), values,
                                             source.label, tensor, problems)
                            break
                overrides.append(value)
            temperature = shared.get("temperature", parameter_info("temperature").default)
            base_droprate = shared.get("base_droprate", parameter_info("base_droprate").default)
            if temperature is None or base_droprate is None or not group.variants:
                continue
            rates = drop_rates(len(group.variants), temperature, base_droprate,
                               [None if o is None else o for o in overrides]
                               if any(o is not None for o in overrides) else None)
            for source, rate in zip(group.variants, rates):
                low, high = ranges.get(source.label, (rate, rate))
                ranges[source.label] = (min(low, rate), max(high, rate))
        rates_by_group[group.name] = ranges
    return rates_by_group


def _checked(info, values: Iterable[Any], who: str, tensor: str, problems: _Problems):
    """The first value checked against the table (None when out of range)."""
    checked = None
    for value in values:
        try:
            value = info.check(value)
        except ValueError as error:
            problems.add(f"{info.name} = {value!r} for tensor {tensor!r} ({who}) is out of "
                         f"range: {error}", kind=f"{info.name} {value!r} {who}")
            return None
        checked = value if checked is None else checked
    return checked


# ---------------------------------------------------------------- the models


def inspect_sources(groups: Sequence[Group], problems: _Problems, *,
                    allow_pickle: bool) -> Dict[str, ModelDir]:
    """Open every model once (headers only); problems for unusable ones."""
    opened: Dict[str, Optional[ModelDir]] = {}
    for group in groups:
        for source in [group.base, *group.variants]:
            if source.path not in opened:
                opened[source.path] = _inspect(source, problems, allow_pickle=allow_pickle)
            source.model = opened[source.path]
    return {path: model for path, model in opened.items() if model is not None}


def _inspect(source: Source, problems: _Problems, *, allow_pickle: bool) -> Optional[ModelDir]:
    label, path = source.label.rsplit(" ", 1)[0], source.path
    if "+" in path and not Path(path).exists():
        problems.add(f"{source.label}: LoRA references (model+lora) are not checked")
        return None
    try:
        model = inspect_directory(path, label, allow_pickle=allow_pickle)
    except ValueError as error:
        text = str(error)
        if "no such directory" in text and not path.startswith(("/", "./", "../", "~")):
            text += (" (mergekit would ask the Hugging Face hub for it: write local paths "
                     "as ./PATH)")
        elif "--allow-pickle" in text:
            text = text.replace("or pass --allow-pickle if you trust it",
                                "or pass check --allow-pickle if you trust it "
                                "(mergekit-yaml loads it as it is)")
        problems.add(text)
        return None
    if model.pickled:
        from circuit_merge_plugin.cli.raw_tensors import load_pickle_headers

        try:
            load_pickle_headers(model)
        except ValueError as error:
            problems.add(str(error))
            return None
    return model


def _vocab_size(model: ModelDir) -> Optional[int]:
    size = (model.config or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def check_models(recipe: dict, groups: Sequence[Group], problems: _Problems) -> Dict[str, List[str]]:
    """Architectures, shapes and kinds tensor by tensor; returns the tensor names
    each group merges (the base's, in file order)."""
    aligned = bool(recipe.get("tokenizer_source") or recipe.get("tokenizer"))
    vocab_noted = set()
    tensors: Dict[str, List[str]] = {}
    for group in groups:
        base = group.base.model
        if base is None:
            continue
        tensors[group.name] = sorted(
            base.tensors, key=lambda n: (str(base.tensors[n].file), base.tensors[n].begin))
        for source in group.variants:
            model = source.model
            if model is None:
                continue
            if base.architecture and model.architecture and model.architecture != base.architecture:
                problems.add(f"architecture: {source.label} is {model.architecture}, "
                             f"{group.base.label} is {base.architecture}")
            base_vocab, vocab = _vocab_size(base), _vocab_size(model)
            vocab_differs = base_vocab is not None and vocab is not None and base_vocab != vocab
            if vocab_differs and not aligned and source.path not in vocab_noted:
                vocab_noted.add(source.path)
                problems.add(
                    f"vocabulary: {source.label} has {vocab} tokens, {group.base.label} "
                    f"{base_vocab}: add `tokenizer_source: union` to the recipe (or `base` to "
                    "keep the base's tokens) so mergekit aligns the embeddings")
            for name in tensors[group.name]:
                expected = base.tensors[name]
                info = model.tensors.get(name)
                if info is None:
                    problems.add(f"tensor {name!r} is missing from {source.label}",
                                 kind=f"missing {source.path}")
                    continue
                if info.shape != expected.shape:
                    if vocab_differs and {info.shape[0], expected.shape[0]} == {vocab, base_vocab} \
                            and info.shape[1:] == expected.shape[1:]:
                        continue  # the vocabulary difference, reported once above
                    problems.add(
                        f"shape mismatch in tensor {name!r}: {source.label} has "
                        f"{list(info.shape)}, {group.base.label} has {list(expected.shape)}",
                        kind=f"shape {source.path}")
                elif info.is_float != expected.is_float:
                    problems.add(
                        f"dtype mismatch in tensor {name!r}: {source.label} has {info.dtype}, "
                        f"{group.base.label} has {expected.dtype}", kind=f"dtype {source.path}")
        for source in [group.base, *group.variants]:
            layers = (source.model.config or {}).get("num_hidden_layers") if source.model else None
            if source.layer_range and isinstance(layers, int) and source.layer_range[1] > layers:
                problems.add(f"{source.label}: layer_range {list(source.layer_range)} goes past "
                             f"its {layers} layers")
    return tensors


def scan_values(models: Dict[str, ModelDir], labels: Dict[str, str], problems: _Problems) -> int:
    """Read every floating tensor once; NaN/Inf problems by tensor and model.
    Returns the number of elements read."""
    import torch
    from safetensors import safe_open

    read = 0
    block = 1 << 24
    for path, model in models.items():
        if model.pickled:
            continue  # headers only: a pickle is read whole by mergekit, not here
        by_file: Dict[Path, List[str]] = {}
        for name, info in model.tensors.items():
            if info.is_float:
                by_file.setdefault(info.file, []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in sorted(names, key=lambda n: model.tensors[n].begin):
                    shape = model.tensors[name].shape
                    sliced = handle.get_slice(name)
                    rows = shape[0] if shape else 1
                    step = max(1, block // max(1, math.prod(shape[1:]))) if shape else 1
                    for start in range(0, rows, step) if shape else [0]:
                        part = sliced[start:start + step] if shape else handle.get_tensor(name)
                        read += part.numel()
                        if not bool(torch.isfinite(part).all()):
                            kind = "NaN" if bool(torch.isnan(part).any()) else "Inf"
                            problems.add(f"{kind} in tensor {name!r} of {labels[path]}",
                                         kind=f"nonfinite {path}")
                            break
    return read


# ---------------------------------------------------------------- the whole check


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""  # pragma: no cover


def check_recipe(path: str, *, scan: bool = False, allow_pickle: bool = False) -> CheckResult:
    """Check a recipe; the problems (empty when it is fine) and a summary."""
    recipe = load_recipe(path)
    problems = _Problems()
    method = recipe.get("merge_method")
    if method != METHOD:
        problems.add(f"merge_method is {method!r}, not {METHOD!r}: check knows circuit's "
                     "parameters only")
    groups = groups_of(recipe, problems)
    check_names(recipe, groups, problems)
    models = inspect_sources(groups, problems, allow_pickle=allow_pickle)
    tensors = check_models(recipe, groups, problems)
    rates = check_values(groups, tensors, problems)
    labels = {}
    for group in groups:
        for source in [group.base, *group.variants]:
            labels.setdefault(source.path, source.label)
    read = scan_values(models, labels, problems) if scan and not len(problems) else None

    summary = [f"recipe {path}: merge_method {method}, "
               f"{'models' if 'models' in recipe else 'slices'}, priority = listing order"]
    for group in groups:
        if len(groups) > 1:
            summary.append(f"{group.name}:")
        base = group.base.model
        if base is not None:
            summary.append(f"  base     {group.base.path}  ({base.architecture or 'bare tensors'}, "
                           f"{len(base.tensors)} tensors)")
        for number, source in enumerate(group.variants, 1):
            low, high = rates.get(group.name, {}).get(source.label, (math.nan, math.nan))
            rate = "?" if math.isnan(low) else (f"{low:.4g}" if low == high
                                                else f"{low:.4g}-{high:.4g}")
            summary.append(f"  V{number:<7} {source.path}  (drop rate {rate})")
    total = sum(info.end - info.begin for m in models.values() for info in m.tensors.values())
    count = sum(len(names) for names in tensors.values())
    summary.append(f"{count} tensor(s) to merge; {_size(total)} to read from "
                   f"{len(models)} model(s)")
    summary.append("values: " + (f"{read:,} elements read, no NaN or Inf" if read is not None
                                 else "not read (--scan-values reads every tensor for NaN/Inf)"))
    return CheckResult(problems.listing(), summary)


@click.command(name="check", context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.argument("recipe", metavar="RECIPE.yaml")
@click.option("--scan-values", "--scan_values", "scan", is_flag=True,
              help="Also read every tensor once and report NaN/Inf by tensor and model.")
@click.option("--allow-pickle", "--allow_pickle", "allow_pickle", is_flag=True,
              help="Accept pickled checkpoints (.bin/.pt): loading one can run code.")
@click.pass_context
def check_command(ctx, recipe: str, scan: bool, allow_pickle: bool) -> None:
    """Check a mergekit recipe (merge_method: circuit) before a long merge.

    Paths, safetensors headers, architectures, tensor shapes (naming model and
    tensor), vocabulary differences, parameter names (did you mean?) and every
    value each tensor resolves to, per-layer filters included; headers only
    unless --scan-values. Exit 0 with a summary, or 2 with the problems.
    """
    ctx.exit(run_guarded(lambda: _check(recipe, scan, allow_pickle), CHECK_PROG))


def _check(recipe: str, scan: bool, allow_pickle: bool) -> int:
    result = check_recipe(recipe, scan=scan, allow_pickle=allow_pickle)
    if result.problems:
        click.echo(f"{recipe}: {len(result.problems)} problem(s):")
        for problem in result.problems:
            click.echo(f"  - {problem}")
        print_error(f"{recipe}: {len(result.problems)} problem(s), first: {result.problems[0]}",
                    CHECK_PROG)
        return EXIT_REFUSED
    for line in result.summary:
        click.echo(line)
    click.echo(f"{recipe}: OK")
    return 0
