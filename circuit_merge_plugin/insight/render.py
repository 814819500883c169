"""Rendering shared by ``circuit-merge analyze`` and ``circuit-merge report``.

Layer grouping of tensor names, number formatting, plain-text tables, PNG
charts (matplotlib, Agg canvas, no global backend state) and a self-contained
HTML page (charts embedded as base64 PNG), and the command-line plumbing both
subcommands share (output checks, writing, one-line errors and exit codes).
Standard library and click at import time: matplotlib is imported when a
chart is drawn, torch never.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import click

from circuit_merge_plugin.errors import EXIT_INTERRUPTED, print_error

# ---------------------------------------------------------------- layer groups

#: ``<prefix>.layers.N.`` and the other common block containers (``h.N`` in
#: GPT-2, ``blocks.N``, ``layer.N`` in BERT-style encoders).
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EMBED = re.compile(r"(?:^|[._])(?:embed\w*|wte|wpe|word_embeddings|position_embeddings)(?:\.|$)")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|output|score|classifier)(?:\.|$)")

EMBEDDINGS = "embeddings"
HEAD = "head"
OTHER = "other"


def layer_group(name: str) -> str:
    """The group a tensor belongs to: ``layers.N``, ``embeddings``, ``head`` or ``other``.

    The layer index is the first ``layers.N.`` (or ``h.N.``, ``blocks.N.``,
    ``layer.N.``) in the name; names without one are embeddings (``embed*``,
    ``wte``, ``wpe``), the head (``lm_head``, ``output``, ``score``,
    ``classifier``) or other (final norms, bare tensor names).
    """
    match = _LAYER.search(name)
    if match:
        return f"layers.{int(match.group(1))}"
    if _EMBED.search(name):
        return EMBEDDINGS
    if _HEAD.search(name):
        return HEAD
    return OTHER


def group_sort_key(group: str) -> Tuple[int, int, str]:
    """Embeddings first, then layers in numeric order, other, head last."""
    if group == EMBEDDINGS:
        return (0, 0, group)
    if group.startswith("layers."):
        return (1, int(group.split(".", 1)[1]), group)
    if group == HEAD:
        return (3, 0, group)
    return (2, 0, group)


# ---------------------------------------------------------------- formatting


def fmt_count(value: Optional[float]) -> str:
    """12, 12.3k, 4.56M, 7.89B."""
    if value is None:
        return "-"
    value = float(value)
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.3g}{suffix}" if abs(scaled) < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def fmt_share(value: Optional[float], digits: int = 1) -> str:
    """0.4213 -> '42.1%'; None -> '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}%"


def fmt_float(value: Optional[float]) -> str:
    """Four significant digits (whole numbers with separators from 10,000 up,
    scientific below 0.001 or from 1e12); None -> '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    if 1e4 <= abs(value) < 1e12:
        return f"{value:,.0f}"
    return f"{value:.3e}"


def text_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns are left-aligned, the rest right."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells):
        out = []
        for index, cell in enumerate(cells):
            out.append(cell.ljust(widths[index]) if index < left else cell.rjust(widths[index]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(row) for row in rows])


# ---------------------------------------------------------------- charts

MISSING_MATPLOTLIB = (
    "PNG charts and HTML need matplotlib: pip install matplotlib "
    "(or pip install 'circuit-merge-plugin[report]')"
)


def require_matplotlib() -> None:
    """ValueError with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MISSING_MATPLOTLIB) from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def heatmap_png(
    values: Sequence[Sequence[Optional[float]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    colorbar: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
    percent: bool = True,
    cmap: str = "viridis",
) -> bytes:
    """A rows x columns heatmap as PNG bytes; None cells are drawn grey."""
    import numpy as np

    rows, cols = len(row_labels), len(col_labels)
    data = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in values], dtype=float
    ).reshape(rows, cols)
    width = min(3.0 + 0.9 * cols, 24.0)
    height = min(1.6 + 0.32 * rows, 40.0)
    figure = _figure(width, height)
    axes = figure.add_subplot(1, 1, 1)
    colormap = _colormap(cmap)
    image = axes.imshow(
        np.ma.masked_invalid(data), aspect="auto", cmap=colormap, vmin=vmin, vmax=vmax,
        interpolation="nearest",
    )
    axes.set_xticks(range(cols))
    axes.set_xticklabels(col_labels, rotation=30 if cols > 4 else 0, ha="right" if cols > 4 else "center")
    axes.set_yticks(range(rows))
    axes.set_yticklabels(row_labels)
    axes.set_title(title)
    bar = figure.colorbar(image, ax=axes)
    bar.set_label(colorbar)
    if rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                value = data[r, c]
                if np.isnan(value):
                    text, color = "-", "black"
                else:
                    text = f"{100 * value:.0f}%" if percent else f"{value:.2g}"
                    red, green, blue, _ = colormap(image.norm(value))
                    light = 0.299 * red + 0.587 * green + 0.114 * blue
                    color = "black" if light > 0.5 else "white"
                axes.text(c, r, text, ha="center", va="center", fontsize=8, color=color)
    return _png(figure)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d0d0d0")


def stacked_bars_png(
    labels: Sequence[str],
    series: Sequence[Tuple[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
) -> bytes:
    """Horizontal stacked bars, one bar per label, one segment per series."""
    figure = _figure(8.0, 1.4 + 0.45 * len(labels))
    axes = figure.add_subplot(1, 1, 1)
    left = [0.0] * len(labels)
    positions = list(range(len(labels)))
    for name, values in series:
        axes.barh(positions, values, left=left, label=name)
        left = [a + float(b) for a, b in zip(left, values)]
    axes.set_yticks(positions)
    axes.set_yticklabels(labels)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.5 / (1 + len(labels))),
                ncol=min(3, len(series)), fontsize=8, frameon=False)
    return _png(figure)


# ---------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
img.chart{display:block;max-width:100%;margin:0.8em 0}
p.note{color:#555;font-size:0.9em;max-width:60em}
code{background:#f5f5f5;padding:0 0.2em}
"""


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> str:
    """An HTML table (cells escaped); the first ``left`` columns left-aligned."""

    def cell(tag, index, value):
        cls = ' class="l"' if index < left else ""
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_image(png: bytes, alt: str, name: str) -> str:
    """An ``<img>`` embedding ``png`` as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<img class="chart" data-chart="{html.escape(name)}" alt="{html.escape(alt)}" '
        f'src="data:image/png;base64,{data}">'
    )


def html_paragraph(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>'


def html_page(title: str, sections: Sequence[Tuple[str, List[str]]]) -> str:
    """A complete self-contained HTML document: ``sections`` of (heading, fragments)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, fragments in sections:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(fragments)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def agreement_matrix(pairs: Sequence[dict], count: int) -> List[List[Optional[float]]]:
    """n x n directional agreement from analysis pair entries (1 on the diagonal).

    ``pairs`` are the ``{"i", "j", "agreement"}`` entries of an analysis group;
    pairs without overlap have agreement None (drawn grey).
    """
    matrix: List[List[Optional[float]]] = [
        [1.0 if r == c else None for c in range(count)] for r in range(count)
    ]
    for pair in pairs:
        i, j = int(pair["i"]), int(pair["j"])
        matrix[i][j] = matrix[j][i] = pair.get("agreement")
    return matrix


def variant_tags(count: int) -> List[str]:
    """``V1 .. Vn``: short column names, V1 = highest priority."""
    return [f"V{index + 1}" for index in range(count)]


# ---------------------------------------------------------------- command line


def check_output_file(path: Optional[str], option: str) -> None:
    """ValueError unless FILE can be written (checked before any long work)."""
    if path is None or path == "-":
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: no such directory {target.parent}")


def check_png_dir(path: Optional[str]) -> None:
    """ValueError if DIR exists as something other than a directory."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"--png-dir {path}: exists and is not a directory")


def check_chart_options(html_path: Optional[str], png_dir: Optional[str]) -> None:
    """Before any long work: --html FILE writable, --png-dir usable, matplotlib there if needed."""
    check_output_file(html_path, "--html")
    check_png_dir(png_dir)
    if html_path is not None or png_dir is not None:
        require_matplotlib()


def write_outputs(
    doc: dict,
    *,
    json_path: Optional[str],
    html_path: Optional[str],
    png_dir: Optional[str],
    quiet: bool,
    render_charts: Callable[[dict], Dict[str, Tuple[str, bytes]]],
    render_page: Callable[[dict, Dict[str, Tuple[str, bytes]]], str],
) -> None:
    """Write ``doc`` as JSON (``-`` = stdout), its charts as PNG files and the HTML page."""
    if json_path is not None:
        text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
        if json_path == "-":
            sys.stdout.write(text)
        else:
            Path(json_path).expanduser().write_text(text, encoding="utf-8")
            if not quiet:
                click.echo(f"wrote {json_path}", err=True)
    if html_path is None and png_dir is None:
        return
    pngs = render_charts(doc)
    if png_dir is not None:
        directory = Path(png_dir).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        for name, (_caption, png) in pngs.items():
            (directory / name).write_bytes(png)
        if not quiet:
            click.echo(f"wrote {len(pngs)} chart(s) to {png_dir}", err=True)
    if html_path is not None:
        Path(html_path).expanduser().write_text(render_page(doc, pngs), encoding="utf-8")
        if not quiet:
            click.echo(f"wrote {html_path}", err=True)


def run_click(command, argv: Sequence[str], prog: str) -> int:
    """Run a subcommand in-process (``main(argv)``): its exit code, usage errors
    included (the command itself turns failures into one line, see
    :func:`circuit_merge_plugin.errors.run_guarded`)."""
    try:
        result = command.main(args=list(argv), prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as stop:
        return stop.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Abort:
        print_error("interrupted", prog)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0
