"""``circuit-merge analyze``: where variants change the base and where they fight.

    circuit-merge analyze BASE VARIANT1 [VARIANT2 ...] [--threshold X]
                          [--json FILE] [--html FILE] [--png-dir DIR] [--quiet]

Streams the floating tensors of BASE and every variant in element chunks (one
tensor name at a time, a row block of it per read, through safetensors
``safe_open``), so memory stays O(chunk x variants) whatever the model size.
Works on transformers model directories and on directories of bare
safetensors; the variants are listed in priority order, as for a merge.

Every number, with ``d = float32(V) - float32(B)`` per element and *changed*
meaning ``|d| >= threshold`` and ``d != 0`` (the merge's own test):

per variant (per layer group and in total)
    ``changed`` / ``changed_share``: changed elements, and their share of the
    floating elements; ``mean_abs``: mean ``|d|`` over the changed elements;
    ``max_abs``: largest ``|d|``; ``positive`` / ``negative``: changed elements
    with ``d > 0`` / ``d < 0``; ``balance = (positive - negative) / changed``
    (in [-1, 1], 0 = as many increases as decreases); ``abs_sum``: sum of
    ``|d|`` over the changed elements (the variant's |delta| mass).
per pair of variants i < j
    ``overlap``: elements both changed; ``overlap_share``: overlap / elements
    either changed (Jaccard index); ``agreement``: share of the overlap where
    the signs agree; ``mean_disagreement``: mean ``|d_i - d_j|`` over the
    overlap; ``conflicts``: overlap elements with opposite signs;
    ``conflict_mass_i`` / ``conflict_mass_j``: sum of ``|d_i|`` / ``|d_j|`` over
    the conflicts (what i / j loses under the sign rule when the other one has
    the higher priority).
priority orders
    Under the sign rule a variant's change of an element is overwritten when
    any higher-priority variant changed the same element with the opposite
    sign (agreeing changes are averaged, not lost). For an order, the
    overwritten mass is the sum over variants and elements of ``|d|`` of every
    change so overwritten (each change counted once however many variants
    above it disagree). It is computed before MAGPRUNE (random drops only make
    it smaller) from per-variant histograms of which other variants disagree,
    exactly for up to 16 variants; beyond that from the pairwise conflict
    masses (an upper bound). Every permutation is evaluated for up to 7
    variants, otherwise a greedy order improved by pairwise swaps. The order
    that overwrites least (``orders.suggested`` in the JSON document) has the
    least overwritten mass; ties (within 1e-9 of all |delta| mass) go to the
    order putting variants with more |delta| mass first, then to the listing
    order. It predicts sign conflicts, not merge quality: the quality
    benchmark found it no better than other orders; order by the variants'
    validated gain on their own task, or by evaluation (``circuit-merge search``).

The code is split in three: :mod:`.analyze_stats` (inputs and the streaming
per-tensor statistics), :mod:`.orders` (the priority-order statistic) and this
module (the analysis document, its rendering and the command).

Exit codes: 0 done; 2 refused (missing directory, mismatched models, bad
option; one line naming the path or tensor); 1 failed while reading; 130
interrupted.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

import click

from circuit_merge_plugin.core.params import parameter_info
from circuit_merge_plugin.errors import Refused, run_guarded
from circuit_merge_plugin.insight.analyze_stats import CHUNK_BUDGET, _Stats, collect, open_inputs
from circuit_merge_plugin.insight.orders import OrderCost, rank_orders
from circuit_merge_plugin.insight.render import (
    agreement_matrix,
    check_chart_options,
    check_output_file,
    fmt_count,
    fmt_float,
    fmt_share,
    group_sort_key,
    heatmap_png,
    html_image,
    html_page,
    html_paragraph,
    html_table,
    run_click,
    text_table,
    variant_tags,
    write_outputs,
)

PROG = "circuit-merge analyze"
FORMAT = "circuit-merge-analysis"
VERSION = 1


# ---------------------------------------------------------------- documents


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator > 0 else None


def _group_doc(name: str, stats: _Stats) -> dict:
    n = stats.n
    changed = stats.changed.tolist()
    positive = stats.positive.tolist()
    negative = stats.negative.tolist()
    abs_sum = stats.abs_sum.tolist()
    max_abs = stats.max_abs.tolist()
    overlap = stats.overlap.tolist()
    agreeing = stats.agreeing.tolist()
    conflicts = stats.conflicts.tolist()
    mass = stats.mass.tolist()
    absdiff = stats.absdiff.tolist()
    variants = []
    for k in range(n):
        variants.append({
            "changed": int(changed[k]),
            "changed_share": _ratio(changed[k], stats.numel) or 0.0,
            "positive": int(positive[k]),
            "negative": int(negative[k]),
            "balance": _ratio(positive[k] - negative[k], changed[k]),
            "abs_sum": abs_sum[k],
            "mean_abs": _ratio(abs_sum[k], changed[k]),
            "max_abs": max_abs[k],
        })
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            both = overlap[i][j]
            union = changed[i] + changed[j] - both
            pairs.append({
                "i": i,
                "j": j,
                "overlap": int(both),
                "union": int(union),
                "overlap_share": _ratio(both, union) or 0.0,
                "agreeing": int(agreeing[i][j]),
                "agreement": _ratio(agreeing[i][j], both),
                "mean_disagreement": _ratio(absdiff[i][j], both),
                "conflicts": int(conflicts[i][j]),
                "conflict_mass_i": mass[i][j],
                "conflict_mass_j": mass[j][i],
            })
    return {"name": name, "tensors": stats.tensors, "numel": stats.numel,
            "variants": variants, "pairs": pairs}


_THRESHOLD = parameter_info("meaningful_change_threshold")


def analyze(base: str, variants: Sequence[str], *, threshold: float = _THRESHOLD.default,
            chunk_budget: int = CHUNK_BUDGET, progress: bool = False) -> dict:
    """The analysis document of BASE and VARIANTS (see the module docs)."""
    try:
        threshold = _THRESHOLD.check(threshold)
    except ValueError as error:
        raise Refused(f"--threshold: {error}") from None
    inputs = open_inputs(base, variants)
    groups, hist = collect(inputs, threshold, chunk_budget=chunk_budget, progress=progress)
    n = len(inputs.variants)
    total = _Stats(n)
    for stats in groups.values():
        total.add(stats)
    labels = [m.given for m in inputs.variants]
    ordered = sorted(groups, key=group_sort_key)
    cost = OrderCost(total, hist)
    mass = total.mass.tolist()
    conflicts = total.conflicts.tolist()
    abs_sum = total.abs_sum.tolist()
    ordered_pairs = [
        {
            "higher": hi,
            "lower": lo,
            "conflicts": int(conflicts[hi][lo]),
            "conflict_mass": mass[lo][hi],
            "share_of_lower": _ratio(mass[lo][hi], abs_sum[lo]) or 0.0,
        }
        for hi in range(n) for lo in range(n) if hi != lo
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "base": inputs.base.given,
        "variants": labels,
        "threshold": threshold,
        "tensors": len(inputs.names),
        "skipped_tensors": inputs.skipped,
        "groups": [_group_doc(g, groups[g]) for g in ordered],
        "total": _group_doc("total", total),
        "ordered_pairs": ordered_pairs,
        "orders": rank_orders(cost, labels),
    }


# ---------------------------------------------------------------- rendering


#: What the order statistic is, and what it is not.
LEAST_OVERWRITING = "Order that overwrites least"
CONFLICT_NOT_QUALITY = (
    "This statistic predicts sign conflicts, not merge quality. Order variants by their "
    "validated gain on their own task (highest first), or choose an order by evaluation "
    "with `circuit-merge search`."
)


def _order_text(order: Sequence[int]) -> str:
    return " ".join(f"V{j + 1}" for j in order)


def _variant_rows(group: dict, tags: Sequence[str]) -> List[List[str]]:
    rows = []
    for tag, v in zip(tags, group["variants"]):
        changed = v["changed"]
        rows.append([
            tag,
            f"{fmt_count(changed)} ({fmt_share(v['changed_share'])})",
            fmt_float(v["mean_abs"]),
            fmt_float(v["max_abs"]),
            fmt_share(_ratio(v["positive"], changed)),
            fmt_share(_ratio(v["negative"], changed)),
            "-" if v["balance"] is None else f"{v['balance']:+.3f}",
        ])
    return rows


VARIANT_HEADERS = ["variant", "changed", "mean |d|", "max |d|", "positive", "negative", "balance"]
PAIR_HEADERS = ["pair", "overlap", "agreement", "mean disagreement", "conflicts"]


def _pair_rows(group: dict) -> List[List[str]]:
    rows = []
    for p in group["pairs"]:
        rows.append([
            f"V{p['i'] + 1}-V{p['j'] + 1}",
            f"{fmt_count(p['overlap'])} ({fmt_share(p['overlap_share'])})",
            fmt_share(p["agreement"]),
            fmt_float(p["mean_disagreement"]),
            fmt_count(p["conflicts"]),
        ])
    return rows


def _conflict_rows(doc: dict) -> List[List[str]]:
    return [
        [
            f"V{e['higher'] + 1} > V{e['lower'] + 1}",
            fmt_count(e["conflicts"]),
            fmt_float(e["conflict_mass"]),
            fmt_share(e["share_of_lower"]),
        ]
        for e in doc["ordered_pairs"]
    ]


CONFLICT_HEADERS = ["higher > lower", "conflicts", "|d| of lower lost", "share of lower's |d|"]


def _order_rows(doc: dict, limit: int) -> Tuple[List[str], List[List[str]]]:
    orders = doc["orders"]
    n = len(doc["variants"])
    per_variant = n <= 6
    headers = ["rank", "order", "overwritten |d|", "of all |d|", "elements"]
    if per_variant:
        headers += [f"V{k + 1} loses" for k in range(n)]
    shown = list(enumerate(orders["orders"][:limit], start=1))
    if orders["listing_rank"] > limit:
        shown.append((orders["listing_rank"], orders["listing"]))
    rows = []
    for rank, entry in shown:
        row = [
            str(rank),
            _order_text(entry["order"]) + (" (listing)" if entry["order"] == list(range(n)) else ""),
            fmt_float(entry["overwritten_mass"]),
            fmt_share(entry["overwritten_share"]),
            fmt_count(entry["overwritten_elements"]),
        ]
        if per_variant:
            row += [fmt_share(share) for share in entry["lost_share"]]
        rows.append(row)
    return headers, rows


def render_text(doc: dict, *, order_limit: int = 10) -> str:
    """The terminal report of an analysis document."""
    n = len(doc["variants"])
    tags = variant_tags(n)
    total = doc["total"]
    out = [
        f"Circuit-Merge analysis of {n} variant(s) against base {doc['base']}",
        f"threshold {doc['threshold']:g}; {fmt_count(total['numel'])} floating parameters "
        f"in {doc['tensors']} tensors, {len(doc['groups'])} groups"
        + (f"; {len(doc['skipped_tensors'])} non-floating tensor(s) skipped"
           if doc["skipped_tensors"] else ""),
    ]
    out += [f"  {tag} = {label}" for tag, label in zip(tags, doc["variants"])]
    out += ["", "Per variant (all layers)", text_table(VARIANT_HEADERS, _variant_rows(total, tags))]
    if n > 1:
        out += ["", "Per pair (all layers; overlap share = both / either changed)",
                text_table(PAIR_HEADERS, _pair_rows(total))]
        out += ["", "Sign conflicts: what the lower priority loses (before MAGPRUNE)",
                text_table(CONFLICT_HEADERS, _conflict_rows(doc))]
    layer_rows = []
    for group in doc["groups"] + [total]:
        layer_rows.append([group["name"], fmt_count(group["numel"])] + [
            fmt_share(v["changed_share"]) for v in group["variants"]
        ])
    out += ["", "Changed share per layer",
            text_table(["layer", "params"] + tags, layer_rows)]
    if 1 < n <= 4:
        pair_tags = [f"V{p['i'] + 1}-V{p['j'] + 1}" for p in total["pairs"]]
        rows = []
        for group in doc["groups"] + [total]:
            rows.append([group["name"]] + [
                f"{fmt_share(p['overlap_share'], 0)} / {fmt_share(p['agreement'], 0)}"
                for p in group["pairs"]
            ])
        out += ["", "Overlap / agreement per layer", text_table(["layer"] + pair_tags, rows)]
    orders = doc["orders"]
    if n > 1:
        headers, rows = _order_rows(doc, order_limit)
        exact = "" if orders["exact"] else ", pairwise upper bound"
        out += [
            "",
            f"Priority orders ({orders['method']}, {orders['evaluated']} evaluated{exact}): "
            "|d| mass each would overwrite under the sign rule, before MAGPRUNE",
            text_table(headers, rows, left=2),
        ]
    suggested = orders["suggested"]
    note = " (the listing order)" if suggested["order"] == list(range(n)) else (
        f"; the listing order overwrites {fmt_float(orders['listing']['overwritten_mass'])} "
        f"({fmt_share(orders['listing']['overwritten_share'])}), rank {orders['listing_rank']}"
    )
    out += [
        "",
        f"{LEAST_OVERWRITING}: {_order_text(suggested['order'])} = "
        + " ".join(suggested["labels"]),
        f"  overwrites {fmt_float(suggested['overwritten_mass'])} "
        f"({fmt_share(suggested['overwritten_share'])} of all |d|){note}",
        f"  {CONFLICT_NOT_QUALITY}",
    ]
    everything = sum(v["abs_sum"] for v in total["variants"])
    spread = orders["orders"][-1]["overwritten_mass"] - suggested["overwritten_mass"]
    if n > 1 and everything > 0 and spread < 0.01 * everything:
        out.append(f"  all {orders['evaluated']} orders evaluated overwrite within 1% of all |d| "
                   "of each other: for conflicts the order hardly matters here")
    return "\n".join(out) + "\n"


def charts(doc: dict) -> Dict[str, Tuple[str, bytes]]:
    """PNG charts: file name -> (caption, bytes)."""
    n = len(doc["variants"])
    tags = variant_tags(n)
    groups = doc["groups"] + [doc["total"]]
    rows = [g["name"] for g in groups]
    result = {
        "changed_share.png": (
            "Share of parameters changed beyond the threshold, per layer and variant",
            heatmap_png([[v["changed_share"] for v in g["variants"]] for g in groups],
                        rows, tags, title="Changed share", colorbar="changed share"),
        )
    }
    if n > 1:
        total = doc["total"]
        result["agreement.png"] = (
            "Directional agreement on the overlap, per pair of variants (all layers)",
            heatmap_png(agreement_matrix(total["pairs"], n), tags, tags,
                        title="Sign agreement on overlap", colorbar="agreement",
                        cmap="RdYlGn"),
        )
        overlap = [[1.0 if r == c else None for c in range(n)] for r in range(n)]
        for p in total["pairs"]:
            overlap[p["i"]][p["j"]] = overlap[p["j"]][p["i"]] = p["overlap_share"]
        result["overlap.png"] = (
            "Overlap of changed parameters (both / either changed), per pair",
            heatmap_png(overlap, tags, tags, title="Overlap (Jaccard)", colorbar="overlap"),
        )
        lost = [[None] * n for _ in range(n)]
        for e in doc["ordered_pairs"]:
            lost[e["higher"]][e["lower"]] = e["share_of_lower"]
        result["conflict_loss.png"] = (
            "Share of the column variant's |d| overwritten when the row variant has "
            "higher priority (sign conflicts, before MAGPRUNE)",
            heatmap_png(lost, [f"{t} higher" for t in tags], [f"{t} lower" for t in tags],
                        title="Loss to sign conflicts", colorbar="share of lower's |d|",
                        cmap="Reds"),
        )
    return result


def render_html(doc: dict, pngs: Dict[str, Tuple[str, bytes]]) -> str:
    """A self-contained HTML page: tables and the charts as base64 PNG."""
    n = len(doc["variants"])
    tags = variant_tags(n)
    total = doc["total"]
    summary = [
        html_paragraph(
            f"Base {doc['base']}; threshold {doc['threshold']:g}; "
            f"{total['numel']:,} floating parameters in {doc['tensors']} tensors"
            + (f"; {len(doc['skipped_tensors'])} non-floating tensors skipped"
               if doc["skipped_tensors"] else "") + "."
        ),
        html_table(["variant", "directory"], [[t, l] for t, l in zip(tags, doc["variants"])]),
    ]
    sections = [("Inputs", summary),
                ("Per variant (all layers)", [html_table(VARIANT_HEADERS, _variant_rows(total, tags))])]
    if n > 1:
        suggested = doc["orders"]["suggested"]
        headers, rows = _order_rows(doc, 20)
        sections += [
            ("Per pair (all layers)", [html_table(PAIR_HEADERS, _pair_rows(total))]),
            ("Sign conflicts", [html_table(CONFLICT_HEADERS, _conflict_rows(doc))]),
            ("Priority orders", [
                html_paragraph(CONFLICT_NOT_QUALITY),
                html_paragraph(
                    f"{LEAST_OVERWRITING}: {_order_text(suggested['order'])} "
                    f"({', '.join(suggested['labels'])}), overwriting "
                    f"{fmt_float(suggested['overwritten_mass'])} of |d| "
                    f"({fmt_share(suggested['overwritten_share'])}). Overwritten mass: sum of "
                    "|d| of every change that a higher-priority variant changes with the "
                    "opposite sign, before MAGPRUNE."
                ),
                html_table(headers, rows, left=2),
            ]),
        ]
    sections.append(("Charts", [html_image(png, caption, name) + html_paragraph(caption)
                                for name, (caption, png) in pngs.items()]))
    per_layer = []
    for group in doc["groups"] + [total]:
        per_layer.append(html_paragraph(
            f"{group['name']}: {group['numel']:,} parameters in {group['tensors']} tensors", "l"))
        per_layer.append(html_table(VARIANT_HEADERS, _variant_rows(group, tags)))
        if n > 1:
            per_layer.append(html_table(PAIR_HEADERS, _pair_rows(group)))
    sections.append(("Per layer", per_layer))
    return html_page("Circuit-Merge analysis", sections)


# ---------------------------------------------------------------- command line


@click.command(name="analyze", context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.argument("paths", nargs=-1, metavar="BASE VARIANT1 [VARIANT2 ...]")
@click.option("--threshold", "--meaningful_change_threshold",
              "threshold", type=float, default=_THRESHOLD.default, show_default=True,
              metavar="X", help=f"{_THRESHOLD.range_text} {_THRESHOLD.meaning} (the merge's "
              "meaningful_change_threshold)")
@click.option("--json", "json_path", metavar="FILE", default=None,
              help="Write the full analysis as JSON to FILE ('-' for stdout, which "
              "replaces the text report).")
@click.option("--html", "html_path", metavar="FILE", default=None,
              help="Write a self-contained HTML page with tables and charts.")
@click.option("--png-dir", "--png_dir", "png_dir", metavar="DIR", default=None,
              help="Write the PNG charts into DIR (created if missing).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
@click.pass_context
def analyze_command(ctx, paths, threshold, json_path, html_path, png_dir, quiet):
    """Compare VARIANT1..N with BASE before merging them.

    Variants are in priority order (first = highest). Prints, per variant and
    layer, the share of parameters changed beyond the threshold, mean and max
    |delta| and the sign balance; per pair of variants the overlap of changed
    parameters, sign agreement and mean |d_i - d_j| on the overlap; and the
    |delta| mass each priority order would overwrite on sign conflicts, with
    the order that overwrites least (it predicts conflict, not quality: choose
    an order by evaluation with `circuit-merge search`). Tensors are streamed
    in chunks.
    """
    ctx.exit(run_guarded(
        lambda: _analyze_command(paths, threshold, json_path, html_path, png_dir, quiet), PROG))


def _analyze_command(paths, threshold, json_path, html_path, png_dir, quiet) -> int:
    if len(paths) < 2:
        raise Refused("give BASE and at least one VARIANT directory")
    check_output_file(json_path, "--json")
    check_chart_options(html_path, png_dir)
    doc = analyze(paths[0], list(paths[1:]), threshold=threshold, progress=not quiet)
    if json_path != "-":
        click.echo(render_text(doc), nl=False)
    write_outputs(doc, json_path=json_path, html_path=html_path, png_dir=png_dir, quiet=quiet,
                  render_charts=charts, render_page=render_html)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``circuit-merge analyze`` entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_click(analyze_command, argv, PROG)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
