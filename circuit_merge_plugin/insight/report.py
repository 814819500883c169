"""``circuit-merge report``: what each variant contributed to a finished merge.

    circuit-merge report DIR [--json] [--html FILE] [--png-dir DIR] [--analysis FILE]
                             [--partial]

Renders ``DIR/circuit_merge_report.json`` (written by merges; DIR may also be
the JSON file itself): a text table on the terminal, a JSON summary for
machines (``--json``), PNG charts and a self-contained HTML page. Reads JSON
only: no torch, no model tensors.

The report file (version 1)::

    {"format": "circuit-merge-report", "version": 1,
     "variants": ["<label of V1>", ...],          # listing order, V1 = highest priority
     "parameters": {"temperature": .., "base_droprate": .., ...},
     "tensors": {"<name>": {"numel": int, "drop_rates": [float or null per variant],
         "variants": [{"changed", "kept", "dropped", "taken", "overwrote",
                       "averaged", "overwritten": int, "final_share": float}, ...]}},
     "analysis": {...},                           # optional: a `circuit-merge analyze --json` document
     "finished": bool, "tensors_merged": int,     # optional (older reports lack them)
     "recipe_parameters": {...}}                  # optional: the recipe's parameters as given

A report whose ``finished`` is false comes from a merge that failed or was
interrupted: it is refused (exit 2) unless ``--partial`` is given; one whose
``finished`` is true says so in its header; one without the key (an older
version) says nothing about it.

Per tensor and variant: ``changed`` elements with ``|d| >= threshold``;
``kept`` survived MAGPRUNE; ``dropped = changed - kept``; ``taken``: kept
elements written where nothing was accumulated yet; ``overwrote``: kept
elements that replaced a disagreeing accumulated value (sign conflict);
``averaged``: kept elements averaged with an agreeing accumulated value
(``taken + overwrote + averaged = kept``); ``overwritten``: elements of this
variant's contribution later overwritten by a higher-priority variant;
``final_share``: the variant's share of the tensor's final sum of ``|delta|``.
A variant that lacks a tensor (an optional weight) has a null drop rate and
zero counts there. The counts are made by the kernel
(:mod:`circuit_merge_plugin.core.tally`) and written by
:mod:`circuit_merge_plugin.adapters.recording`.

Aggregation (:func:`aggregate`) groups tensors into layers by their
``layers.N.`` index (embeddings, head and other as their own groups). Counts
are summed. A layer's contribution share of a variant is the mean of its
tensors' ``final_share`` weighted by each tensor's number of nonzero final
delta elements, which is ``sum of taken`` over the variants (overwriting and
averaging never add or remove a nonzero element); so layer shares sum to 1
wherever the merge changed anything, and tensors the merge left unchanged
weigh nothing.

Exit codes: 0 done (inconsistencies in the file are printed as warnings);
2 refused (no report, unreadable or malformed file, bad option, an unfinished
merge without ``--partial``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click

from circuit_merge_plugin.core.params import GLOBAL_PARAMETERS
from circuit_merge_plugin.errors import Refused, run_guarded
from circuit_merge_plugin.insight.render import (
    agreement_matrix,
    check_chart_options,
    fmt_count,
    fmt_share,
    group_sort_key,
    heatmap_png,
    html_image,
    html_page,
    html_paragraph,
    html_table,
    layer_group,
    run_click,
    stacked_bars_png,
    text_table,
    variant_tags,
    write_outputs,
)
from circuit_merge_plugin.io.report_file import COUNTS, FORMAT, REPORT_ENV, REPORT_FILE, VERSION

PROG = "circuit-merge report"
SUMMARY_FORMAT = "circuit-merge-report-summary"

#: final_share sums within this of 1 count as 1.
SHARE_TOLERANCE = 1e-4


# ---------------------------------------------------------------- loading


def report_path(directory: str) -> Path:
    """DIR/circuit_merge_report.json, or DIR itself when it is a file."""
    path = Path(directory).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise Refused(f"{directory}: no such directory")
    candidate = path / REPORT_FILE
    if not candidate.is_file():
        raise Refused(
            f"{directory}: no {REPORT_FILE} (written by circuit-merge merges, and by "
            f"mergekit-yaml merges with the recipe parameter report: PATH or {REPORT_ENV}=PATH)"
        )
    return candidate


def load_report(directory: str) -> dict:
    """Read and validate a report; Refused naming the file and the bad entry."""
    path = report_path(directory)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise Refused(f"{path}: cannot read ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise Refused(f"{path}: not valid JSON ({error})") from None
    try:
        validate_report(report)
    except ValueError as error:
        raise Refused(f"{path}: {error}") from None
    return report


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def validate_report(report) -> None:
    """ValueError unless ``report`` has the version-1 structure (types, lengths)."""
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ValueError(f"not a Circuit-Merge report (format is not {FORMAT!r})")
    version = report.get("version")
    if version != VERSION:
        raise ValueError(f"report version {version!r} is not supported (this reads {VERSION})")
    variants = report.get("variants")
    if not isinstance(variants, list) or not variants or not all(
        isinstance(v, str) for v in variants
    ):
        raise ValueError("'variants' must be a non-empty list of labels")
    if not isinstance(report.get("parameters", {}), dict):
        raise ValueError("'parameters' must be a map")
    if not isinstance(report.get("recipe_parameters") or {}, dict):
        raise ValueError("'recipe_parameters' must be a map (or null)")
    if not isinstance(report.get("finished", False), bool):
        raise ValueError("'finished' must be true or false")
    if "tensors_merged" in report and not _is_int(report["tensors_merged"]):
        raise ValueError("'tensors_merged' must be a non-negative integer")
    tensors = report.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError("'tensors' must be a map of tensor name to counts")
    n = len(variants)
    for name, entry in tensors.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry is not a map")
        if not _is_int(entry.get("numel")):
            raise ValueError(f"{where}: 'numel' must be a non-negative integer")
        rates = entry.get("drop_rates")
        if not isinstance(rates, list) or len(rates) != n or not all(
            r is None or _is_number(r) for r in rates
        ):
            raise ValueError(f"{where}: 'drop_rates' must hold {n} numbers (null: variant absent)")
        rows = entry.get("variants")
        if not isinstance(rows, list) or len(rows) != n:
            raise ValueError(f"{where}: 'variants' must hold {n} entries (one per variant)")
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: variant {index + 1} entry is not a map")
            for key in COUNTS:
                if not _is_int(row.get(key)):
                    raise ValueError(
                        f"{where}: variant {index + 1} '{key}' must be a non-negative integer"
                    )
            if not _is_number(row.get("final_share")):
                raise ValueError(f"{where}: variant {index + 1} 'final_share' must be a number")
    analysis = report.get("analysis")
    if analysis is not None:
        _validate_analysis(analysis, n)


def _validate_analysis(analysis, count: int) -> None:
    if not isinstance(analysis, dict) or analysis.get("format") != "circuit-merge-analysis":
        raise ValueError("'analysis' is not a circuit-merge analyze document")
    if len(analysis.get("variants", [])) != count:
        raise ValueError(
            f"the analysis covers {len(analysis.get('variants', []))} variants, "
            f"the report {count}"
        )
    if not isinstance(analysis.get("total", {}).get("pairs"), list):
        raise ValueError("the analysis has no pairwise data ('total.pairs')")


def check_report(report: dict) -> List[str]:
    """Inconsistencies between the counts of a (structurally valid) report."""
    problems = []
    for name, entry in report["tensors"].items():
        rows = entry["variants"]
        for index, row in enumerate(rows):
            who = f"tensor {name!r} variant {index + 1}"
            if row["taken"] + row["overwrote"] + row["averaged"] != row["kept"]:
                problems.append(f"{who}: taken + overwrote + averaged != kept")
            if row["dropped"] != row["changed"] - row["kept"]:
                problems.append(f"{who}: dropped != changed - kept")
            if row["changed"] > entry["numel"]:
                problems.append(f"{who}: changed > numel")
            if row["overwritten"] > row["kept"]:
                problems.append(f"{who}: overwritten > kept")
            if index == 0 and row["overwritten"]:
                problems.append(f"{who}: the highest priority cannot be overwritten")
            if row["final_share"] < 0 or row["final_share"] > 1 + SHARE_TOLERANCE:
                problems.append(f"{who}: final_share outside [0, 1]")
        shares = sum(row["final_share"] for row in rows)
        nonzero = sum(row["taken"] for row in rows)
        if nonzero > 0 and abs(shares - 1) > SHARE_TOLERANCE:
            problems.append(f"tensor {name!r}: final shares sum to {shares:.6g}, not 1")
        if nonzero == 0 and shares != 0:
            problems.append(f"tensor {name!r}: final shares are nonzero but nothing was taken")
    return problems


# ---------------------------------------------------------------- aggregation


def _empty_group(name: str, count: int) -> dict:
    return {
        "name": name,
        "tensors": 0,
        "numel": 0,
        "final_changed": 0,
        "variants": [dict({key: 0 for key in COUNTS}, share=0.0) for _ in range(count)],
    }


def aggregate(report: dict) -> dict:
    """Per-layer and total counts and contribution shares of a report.

    Returns ``{"variants": labels, "layers": [group, ...], "total": group}``;
    a group is ``{"name", "tensors", "numel", "final_changed", "variants": [
    {"changed", "kept", "dropped", "taken", "overwrote", "averaged",
    "overwritten", "share"}, ...]}`` with the counts summed over its tensors,
    ``final_changed`` = nonzero elements of the final delta (sum of taken)
    and ``share`` = the variants' final_share averaged over its tensors,
    weighted by each tensor's nonzero final elements (0 when there are none).
    Layers come in model order: embeddings, layers.0.., other, head.
    """
    labels = list(report["variants"])
    n = len(labels)
    groups: Dict[str, dict] = {}
    weighted: Dict[str, List[float]] = {}
    total = _empty_group("total", n)
    total_weighted = [0.0] * n
    for name, entry in report["tensors"].items():
        key = layer_group(name)
        group = groups.setdefault(key, _empty_group(key, n))
        sums = weighted.setdefault(key, [0.0] * n)
        rows = entry["variants"]
        weight = sum(row["taken"] for row in rows)
        for target, acc in ((group, sums), (total, total_weighted)):
            target["tensors"] += 1
            target["numel"] += entry["numel"]
            target["final_changed"] += weight
            for index, row in enumerate(rows):
                for count in COUNTS:
                    target["variants"][index][count] += row[count]
                acc[index] += weight * row["final_share"]
    for key, group in groups.items():
        _finish_shares(group, weighted[key])
    _finish_shares(total, total_weighted)
    return {
        "variants": labels,
        "layers": [groups[key] for key in sorted(groups, key=group_sort_key)],
        "total": total,
    }


def _finish_shares(group: dict, weighted: Sequence[float]) -> None:
    weight = group["final_changed"]
    for index, row in enumerate(group["variants"]):
        row["share"] = weighted[index] / weight if weight > 0 else 0.0


def drop_rate_ranges(report: dict) -> List[Tuple[float, float]]:
    """(min, max) drop rate of each variant over the tensors."""
    n = len(report["variants"])
    ranges: List[Optional[Tuple[float, float]]] = [None] * n
    for entry in report["tensors"].values():
        for index, rate in enumerate(entry["drop_rates"]):
            if rate is None:  # the variant lacks this tensor
                continue
            low, high = ranges[index] or (rate, rate)
            ranges[index] = (min(low, rate), max(high, rate))
    return [r if r is not None else (0.0, 0.0) for r in ranges]


def summary(report: dict, analysis: Optional[dict] = None) -> dict:
    """The machine-readable summary printed by ``--json``."""
    analysis = analysis if analysis is not None else report.get("analysis")
    n = len(report["variants"])
    result = {
        "format": SUMMARY_FORMAT,
        "version": VERSION,
        "variants": list(report["variants"]),
        "parameters": dict(report.get("parameters", {})),
        "drop_rates": [{"min": lo, "max": hi} for lo, hi in drop_rate_ranges(report)],
        **{k: v for k, v in aggregate(report).items() if k != "variants"},
        "agreement": (agreement_matrix(analysis["total"]["pairs"], n)
                      if analysis is not None else None),
        "problems": check_report(report),
    }
    for key in ("finished", "tensors_merged", "recipe_parameters"):
        if key in report:  # reports of older versions do not have them
            result[key] = report[key]
    return result


# ---------------------------------------------------------------- rendering


def _rate_text(low: float, high: float) -> str:
    return f"{low:.4g}" if low == high else f"{low:.4g}-{high:.4g}"


#: Short names of parameters in the header line.
_SHORT_NAMES = {"meaningful_change_threshold": "threshold"}


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parameter_text(parameters: dict) -> str:
    """The merge's (fallback) parameter values, in the parameter table's order."""
    parts = []
    for info in GLOBAL_PARAMETERS:
        if info.name in parameters:
            shown = _SHORT_NAMES.get(info.name, info.name)
            parts.append(f"{shown} {_value_text(parameters[info.name])}")
    return ", ".join(parts)


def _recipe_value_text(value) -> str:
    """A recipe value as given: a scalar, or mergekit's per-layer list of
    ``{filter, value}`` entries (first matching filter wins, no filter = fallback)."""
    if isinstance(value, list) and all(isinstance(e, dict) and "value" in e for e in value):
        parts = []
        for entry in value:
            where = entry.get("filter")
            parts.append(f"{_recipe_value_text(entry['value'])} "
                         + (f"({where})" if where is not None else "(otherwise)"))
        return ", ".join(parts)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_recipe_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_recipe_value_text(v) for v in value) + "]"
    return _value_text(value)


#: Keys of a structured ``recipe_parameters`` (the recipe's parts that hold parameters).
_RECIPE_PARTS = ("parameters", "models", "slices", "modules")


def _flat_text(parameters: dict) -> str:
    return "; ".join(f"{key} = {_recipe_value_text(value)}" for key, value in parameters.items())


def _recipe_text(recipe: dict) -> str:
    """The recipe's parameters as given (``recipe_parameters``), one line: either
    ``{name: setting}`` or the recipe's parts ``{"parameters": {...}, "models":
    [{"model", "parameters"}, ...], "slices": [...]}`` (per-model values after
    the global ones, each model named as listed)."""
    if not set(recipe) <= set(_RECIPE_PARTS):
        return _flat_text(recipe)
    parts = []
    if isinstance(recipe.get("parameters"), dict) and recipe["parameters"]:
        parts.append(_flat_text(recipe["parameters"]))
    for entry in recipe.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            parts.append(f"{_recipe_value_text(entry.get('model'))}: "
                         f"{_flat_text(entry['parameters'])}")
    for number, piece in enumerate(recipe.get("slices") or [], 1):
        if not isinstance(piece, dict):
            continue
        if isinstance(piece.get("parameters"), dict) and piece["parameters"]:
            parts.append(f"slice {number}: {_flat_text(piece['parameters'])}")
        for source in piece.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("parameters"), dict):
                parts.append(f"slice {number} {_recipe_value_text(source.get('model'))}: "
                             f"{_flat_text(source['parameters'])}")
    if recipe.get("modules"):
        parts.append(f"modules = {_recipe_value_text(recipe['modules'])}")
    return "; ".join(parts)


def _finished_text(summary_doc: dict) -> Optional[str]:
    """What the report says about the merge's end (None: an older report, which
    does not say)."""
    finished = summary_doc.get("finished")
    if finished is None:
        return None
    covered = summary_doc.get("tensors_merged")
    if covered is None:
        covered = summary_doc["total"]["tensors"]
    if finished:
        return f"the merge finished ({covered} tensor(s) merged)"
    return (f"the merge did NOT finish: this report covers only the {covered} tensor(s) "
            "merged before it stopped")


#: One line under the table: what each column counts.
LEGEND = (
    "changed: |delta| >= threshold; kept: survived MAGPRUNE; dropped: changed - kept; "
    "taken: kept where nothing was accumulated yet; overwrote: kept, replacing a value of "
    "the opposite sign; averaged: kept, averaged with an agreeing value; overwritten: later "
    "replaced by a higher priority; share: of the final |delta|"
)


TOTAL_HEADERS = ["variant", "changed", "kept", "dropped", "taken", "overwrote", "averaged",
                 "overwritten", "share"]


def _total_rows(group: dict, tags: Sequence[str]) -> List[List[str]]:
    rows = []
    for tag, row in zip(tags, group["variants"]):
        rows.append([tag] + [fmt_count(row[key]) for key in COUNTS] + [fmt_share(row["share"])])
    return rows


def _share_rows(summary_doc: dict) -> List[List[str]]:
    return [
        [group["name"], fmt_count(group["final_changed"])]
        + [fmt_share(row["share"]) for row in group["variants"]]
        for group in summary_doc["layers"] + [summary_doc["total"]]
    ]


def _outcome_rows(summary_doc: dict) -> List[List[str]]:
    return [
        [group["name"]] + [
            "/".join(fmt_count(row[key]) for key in ("kept", "dropped", "overwrote", "averaged"))
            for row in group["variants"]
        ]
        for group in summary_doc["layers"] + [summary_doc["total"]]
    ]


def render_text(summary_doc: dict, source: str) -> str:
    """The terminal report."""
    n = len(summary_doc["variants"])
    tags = variant_tags(n)
    total = summary_doc["total"]
    out = [f"Circuit-Merge report: {source}",
           f"{n} variant(s), V1 = highest priority; {fmt_count(total['numel'])} parameters in "
           f"{total['tensors']} tensors"]
    finished = _finished_text(summary_doc)
    if finished is not None:
        out.append(finished[0].upper() + finished[1:])
    parameters = _parameter_text(summary_doc["parameters"])
    if parameters:
        out.append(parameters)
    if summary_doc.get("recipe_parameters"):
        out.append(f"recipe parameters as given: {_recipe_text(summary_doc['recipe_parameters'])}")
    for tag, label, rates in zip(tags, summary_doc["variants"], summary_doc["drop_rates"]):
        out.append(f"  {tag} = {label}  (drop rate {_rate_text(rates['min'], rates['max'])})")
    out += ["", "All layers (elements; share = share of the final |delta|)",
            text_table(TOTAL_HEADERS, _total_rows(total, tags)), LEGEND]
    out += ["", "Contribution share per layer (final changed elements, share of each variant)",
            text_table(["layer", "final changed"] + tags, _share_rows(summary_doc))]
    out += ["", "Kept / dropped / overwrote / averaged per layer",
            text_table(["layer"] + tags, _outcome_rows(summary_doc))]
    agreement = summary_doc.get("agreement")
    if agreement is not None and n > 1:
        rows = [[tags[r]] + [fmt_share(v, 0) for v in agreement[r]] for r in range(n)]
        out += ["", "Sign agreement on the overlap (from the analysis)",
                text_table([""] + tags, rows)]
    problems = summary_doc["problems"]
    if problems:
        out += ["", f"{len(problems)} inconsistenc{'y' if len(problems) == 1 else 'ies'} "
                "in the report:"] + [f"  {p}" for p in problems[:5]]
        if len(problems) > 5:
            out.append(f"  ... and {len(problems) - 5} more (see --json)")
    return "\n".join(out) + "\n"


def charts(summary_doc: dict) -> Dict[str, Tuple[str, bytes]]:
    """PNG charts: file name -> (caption, bytes)."""
    n = len(summary_doc["variants"])
    tags = variant_tags(n)
    groups = summary_doc["layers"] + [summary_doc["total"]]
    result = {
        "contribution_share.png": (
            "Share of each layer's final |delta| held by each variant",
            heatmap_png([[row["share"] for row in g["variants"]] for g in groups],
                        [g["name"] for g in groups], tags,
                        title="Contribution share", colorbar="share of final |delta|"),
        )
    }
    total = summary_doc["total"]["variants"]

    def share(row, value):
        return value / row["changed"] if row["changed"] else 0.0

    result["outcomes.png"] = (
        "What became of each variant's changed elements",
        stacked_bars_png(
            tags,
            [
                ("kept, in the result", [share(r, r["kept"] - r["overwritten"]) for r in total]),
                ("kept, later overwritten", [share(r, r["overwritten"]) for r in total]),
                ("dropped by MAGPRUNE", [share(r, r["dropped"]) for r in total]),
            ],
            title="Fate of changed elements", xlabel="share of the variant's changed elements",
        ),
    )
    agreement = summary_doc.get("agreement")
    if agreement is not None and n > 1:
        result["agreement.png"] = (
            "Directional agreement on the overlap, per pair of variants (from the analysis)",
            heatmap_png(agreement, tags, tags, title="Sign agreement on overlap",
                        colorbar="agreement", cmap="RdYlGn"),
        )
    return result


def render_html(summary_doc: dict, pngs: Dict[str, Tuple[str, bytes]], source: str = "") -> str:
    """A self-contained HTML page: tables and the charts as base64 PNG."""
    n = len(summary_doc["variants"])
    tags = variant_tags(n)
    inputs = [
        html_paragraph(f"Merge {source}: {_parameter_text(summary_doc['parameters'])}"),
        *([html_paragraph(_finished_text(summary_doc))] if "finished" in summary_doc else []),
        *([html_paragraph("Recipe parameters as given: "
                          + _recipe_text(summary_doc["recipe_parameters"]))]
          if summary_doc.get("recipe_parameters") else []),
        html_table(["variant", "label", "drop rate"], [
            [t, label, _rate_text(r["min"], r["max"])]
            for t, label, r in zip(tags, summary_doc["variants"], summary_doc["drop_rates"])
        ], left=2),
    ]
    sections = [
        ("Inputs", inputs),
        ("All layers", [html_table(TOTAL_HEADERS, _total_rows(summary_doc["total"], tags)),
                        html_paragraph(LEGEND)]),
        ("Charts", [html_image(png, caption, name) + html_paragraph(caption)
                    for name, (caption, png) in pngs.items()]),
        ("Contribution share per layer", [
            html_paragraph("Share of the final |delta| held by each variant; layers weigh "
                           "their tensors by the number of changed elements in the result."),
            html_table(["layer", "final changed"] + tags, _share_rows(summary_doc)),
        ]),
        ("Kept / dropped / overwrote / averaged per layer",
         [html_table(["layer"] + tags, _outcome_rows(summary_doc))]),
    ]
    if summary_doc["problems"]:
        sections.append(("Inconsistencies", [html_paragraph(p) for p in summary_doc["problems"]]))
    return html_page("Circuit-Merge report", sections)


# ---------------------------------------------------------------- command line


@click.command(name="report", context_settings={"help_option_names": ["-h", "--help"],
                                                "max_content_width": 100})
@click.argument("directory", metavar="DIR")
@click.option("--json", "as_json", is_flag=True,
              help="Print the per-layer summary as JSON instead of the text table.")
@click.option("--html", "html_path", metavar="FILE", default=None,
              help="Write a self-contained HTML page with tables and charts.")
@click.option("--png-dir", "--png_dir", "png_dir", metavar="DIR", default=None,
              help="Write the PNG charts into DIR (created if missing).")
@click.option("--analysis", "analysis_path", metavar="FILE", default=None,
              help="A `circuit-merge analyze --json` file of the same variants, for the "
              "agreement matrix (used instead of one embedded in the report).")
@click.option("--partial", is_flag=True,
              help="Show the report of a merge that did not finish (failed or interrupted) "
              "instead of refusing it.")
@click.option("--quiet", "-q", is_flag=True, help="No messages about written files.")
@click.pass_context
def report_command(ctx, directory, as_json, html_path, png_dir, analysis_path, partial, quiet):
    """Show what each variant contributed to the merge in DIR.

    Reads DIR/circuit_merge_report.json; prints per layer and variant the
    elements kept, dropped by MAGPRUNE, overwriting on sign conflicts and
    averaged on agreement, and each variant's share of the final delta.
    """
    ctx.exit(run_guarded(
        lambda: _report_command(directory, as_json, html_path, png_dir, analysis_path,
                                partial, quiet),
        PROG))


def _report_command(directory, as_json, html_path, png_dir, analysis_path, partial,
                    quiet) -> int:
    check_chart_options(html_path, png_dir)
    report = load_report(directory)
    if report.get("finished") is False and not partial:
        covered = report.get("tensors_merged", len(report["tensors"]))
        raise Refused(f"{directory}: the merge did not finish; its report covers only "
                      f"{covered} tensor(s) (pass --partial to show it anyway)")
    analysis = None
    if analysis_path is not None:
        analysis = _load_analysis(analysis_path, len(report["variants"]))
    doc = summary(report, analysis)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    else:
        click.echo(render_text(doc, directory), nl=False)
    if report.get("finished") is False and not quiet:
        click.echo(f"{PROG}: warning: the merge did not finish; the report is partial", err=True)
    if doc["problems"] and not quiet:
        click.echo(f"{PROG}: warning: {len(doc['problems'])} inconsistencies in the report, "
                   f"first: {doc['problems'][0]}", err=True)
    write_outputs(doc, json_path=None, html_path=html_path, png_dir=png_dir, quiet=quiet,
                  render_charts=charts,
                  render_page=lambda d, p: render_html(d, p, directory))
    return 0


def _load_analysis(path: str, count: int) -> dict:
    try:
        analysis = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as error:
        raise Refused(f"--analysis {path}: cannot read ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise Refused(f"--analysis {path}: not valid JSON ({error})") from None
    try:
        _validate_analysis(analysis, count)
    except ValueError as error:
        raise Refused(f"--analysis {path}: {error}") from None
    return analysis


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``circuit-merge report`` entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_click(report_command, argv, PROG)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
