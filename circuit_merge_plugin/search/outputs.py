"""What ``circuit-merge search`` writes into DIR, and reading it back for ``--resume``.

* ``trials.jsonl``: one JSON object per finished trial, appended in one write
  (so an interrupt never leaves half a line): trial number, status, score, the
  eval's other keys, the order, every parameter, per-variant drop rates, the
  merge seed, the digest of the merged model, wall/merge/eval seconds, where it
  ran, and the point (``values``/``key``) that ``--resume`` skips.
* ``leaderboard.md``: the best trials and how much the order alone moves the score.
* ``best.yaml``: the best trial as a mergekit recipe (models in its order, its
  parameters and seed): ``mergekit-yaml DIR/best.yaml OUT`` writes that model.
* ``search.html`` and three PNGs: score by order, the temperature x
  base_droprate surface, score against trial number.

Every file but the log is replaced atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from circuit_merge_plugin.io.report_file import write_atomically
from circuit_merge_plugin.search.space import (
    Point,
    Recipe,
    SearchInputError,
    trial_parameters,
    trial_recipe,
    variant_drop_rates,
)

TRIALS = "trials.jsonl"
LEADERBOARD = "leaderboard.md"
BEST = "best.yaml"
HTML = "search.html"
CHARTS = {
    "score_by_order.png": "Best score of each order",
    "temperature_base_droprate.png": "Score over temperature x base_droprate",
    "score_by_trial.png": "Score against trial number (line: best so far)",
}
TOP = 10


# ---------------------------------------------------------------- the log


class TrialLog:
    """``DIR/trials.jsonl``, appended one whole line per write."""

    def __init__(self, out: str):
        self.path = Path(out) / TRIALS

    def append(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(handle, line)
            os.fsync(handle)
        finally:
            os.close(handle)


def make_record(recipe: Recipe, point: Point, seed: int, number: int, engine: str,
                result: Dict[str, Any]) -> dict:
    score = result.get("score")
    record = {
        "trial": number,
        "status": "ok" if score is not None else "failed",
        "score": score,
        "metrics": result.get("extras") or {},
        "error": result.get("error"),
        "order": list(point.order),
        "parameters": trial_parameters(recipe, point, seed),
        "drop_rate": variant_drop_rates(recipe, point),
        "seed": seed,
        "digest": result.get("digest"),
        "wall_s": result.get("wall_s"),
        "merge_s": result.get("merge_s"),
        "eval_s": result.get("eval_s"),
        "where": result.get("where"),
        "engine": engine,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "values": dict(point.values),
        "key": point.key(),
    }
    return record


def check_out(out: str, resume: bool, recipe: Recipe) -> List[dict]:
    """Check DIR before any work; the finished trials to resume from (else [])."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SearchInputError(f"--out {out}: exists and is not a directory")
    trials = path / TRIALS
    if path.is_dir() and any(path.iterdir()):
        if not trials.is_file():
            raise SearchInputError(f"--out {out}: exists, is not empty and holds no {TRIALS}")
        if not resume:
            raise SearchInputError(
                f"--out {out}: already holds a search ({TRIALS}); pass --resume to continue it"
            )
    if not trials.is_file():
        return []
    records = []
    with open(trials, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                order, values, key = record["order"], record["values"], record["key"]
                assert isinstance(order, list) and isinstance(values, dict) and isinstance(key, str)
                assert isinstance(record["trial"], int)
            except (ValueError, KeyError, AssertionError, TypeError):
                raise SearchInputError(f"{trials} line {number}: not a trial record") from None
            if sorted(order) != sorted(recipe.variants):
                raise SearchInputError(
                    f"{trials} line {number}: a trial of other models than {recipe.path}'s variants"
                )
            records.append(record)
    return records


# ---------------------------------------------------------------- summaries


def ok_records(records: Sequence[dict]) -> List[dict]:
    return [r for r in records if r.get("score") is not None]


def best_record(records: Sequence[dict]) -> Optional[dict]:
    good = ok_records(records)
    if not good:
        return None
    return max(good, key=lambda r: (r["score"], -r["trial"]))


def short_names(recipe: Recipe) -> Dict[str, str]:
    """A short display name per variant (its directory name, unless two share one)."""
    names = {label: Path(label.rstrip("/")).name or label for label in recipe.variants}
    if len(set(names.values())) < len(names):
        return {label: label for label in recipe.variants}
    return names


def _order_text(order: Sequence[str], names: Dict[str, str]) -> str:
    return " > ".join(names.get(label, label) for label in order)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def progress_line(record: dict, finished: int, todo: int, best: Optional[dict]) -> str:
    head = f"[{finished}/{todo}] trial {record['trial']}"
    if record["score"] is None:
        body = f"failed: {record['error']}"
    else:
        body = f"score {record['score']:.6g}"
    tail = f" | best {best['score']:.6g} (trial {best['trial']})" if best else ""
    return head + ": " + body + tail


def _setting_key(record: dict) -> str:
    """Everything of a trial but its order (to pair trials that differ in order only)."""
    return json.dumps([sorted(record["parameters"].items()), sorted(record["drop_rate"].items())])


def order_effect(records: Sequence[dict]) -> Dict[str, Any]:
    """How much the order moves the score: best per order, and paired at equal settings."""
    good = ok_records(records)
    by_order: Dict[tuple, List[float]] = defaultdict(list)
    for record in good:
        by_order[tuple(record["order"])].append(record["score"])
    orders = sorted(
        ((order, max(scores), sum(scores) / len(scores), len(scores)) for order, scores in by_order.items()),
        key=lambda item: -item[1],
    )
    result: Dict[str, Any] = {"orders": orders}
    if len(orders) >= 2:
        result["spread_best"] = orders[0][1] - orders[-1][1]
    groups: Dict[str, Dict[tuple, float]] = defaultdict(dict)
    for record in good:
        groups[_setting_key(record)][tuple(record["order"])] = record["score"]
    spreads = [max(g.values()) - min(g.values()) for g in groups.values() if len(g) >= 2]
    if spreads:
        result["paired_mean"] = sum(spreads) / len(spreads)
        result["paired_max"] = max(spreads)
        result["paired_settings"] = len(spreads)
    return result


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


_SHOWN = ("temperature", "base_droprate", "lambda")


def _best_rows(records: Sequence[dict], names: Dict[str, str]) -> List[List[str]]:
    ranked = sorted(ok_records(records), key=lambda r: (-r["score"], r["trial"]))[:TOP]
    rows = []
    for rank, record in enumerate(ranked, 1):
        params = record["parameters"]
        others = {k: v for k, v in params.items() if k not in _SHOWN and k != "seed"}
        others.update({f"drop_rate[{names.get(k, k)}]": v for k, v in record["drop_rate"].items()})
        rows.append([
            str(rank), str(record["trial"]), _fmt(record["score"]),
            _order_text(record["order"], names),
            *(_fmt(params.get(name)) for name in _SHOWN),
            ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(others.items())),
            (record.get("digest") or "")[:16],
        ])
    return rows


_BEST_HEADERS = ["rank", "trial", "score", "order", *_SHOWN, "other", "digest"]


def leaderboard_text(recipe: Recipe, records: Sequence[dict]) -> str:
    names = short_names(recipe)
    good = ok_records(records)
    failed = [r for r in records if r.get("score") is None]
    best = best_record(records)
    lines = ["# circuit-merge search: leaderboard", ""]
    lines.append(f"Recipe: `{recipe.path}`. Trials: {len(records)} finished, {len(failed)} failed.")
    if best is not None:
        lines.append(
            f"Best: trial {best['trial']}, score {_fmt(best['score'])}, order "
            f"{_order_text(best['order'], names)} (recipe: `{BEST}`)."
        )
    lines += ["", "## Best trials", ""]
    lines += _table(_BEST_HEADERS, _best_rows(records, names)) if good else ["No trial succeeded."]
    effect = order_effect(records)
    lines += ["", "## The order alone", ""]
    if "spread_best" in effect:
        lines.append(
            f"Between the best and the worst of {len(effect['orders'])} orders (best trial of each) "
            f"the score moves by {_fmt(effect['spread_best'])}."
        )
    if "paired_mean" in effect:
        lines.append(
            f"At equal settings, changing only the order moves the score by "
            f"{_fmt(effect['paired_mean'])} on average and by up to {_fmt(effect['paired_max'])} "
            f"({effect['paired_settings']} setting(s) tried with two or more orders)."
        )
    if effect["orders"]:
        lines.append("")
        lines += _table(
            ["order", "trials", "best score", "mean score"],
            [[_order_text(o, names), str(n), _fmt(b), _fmt(m)] for o, b, m, n in effect["orders"]],
        )
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += _table(["trial", "error"], [[str(r["trial"]), r.get("error") or ""] for r in failed])
    return "\n".join(lines) + "\n"


def best_yaml_text(recipe: Recipe, best: dict, resolve) -> str:
    point = Point(tuple(best["order"]), dict(best["values"]))
    data = trial_recipe(recipe, point, best["seed"], resolve=resolve, keep_report=True)
    header = (
        f"# circuit-merge search: best of the trials in {TRIALS} (trial {best['trial']}, "
        f"score {_fmt(best['score'])})\n# mergekit-yaml best.yaml OUT writes the model of digest\n"
        f"# {best.get('digest')}\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------- charts


def render_charts(recipe: Recipe, records: Sequence[dict]) -> Dict[str, bytes]:
    from circuit_merge_plugin.insight.render import _figure, _png

    names = short_names(recipe)
    good = ok_records(records)
    charts: Dict[str, bytes] = {}

    effect = order_effect(records)
    orders = effect["orders"]
    figure = _figure(7.0, max(2.0, 0.35 * len(orders) + 1.2))
    axes = figure.add_subplot(1, 1, 1)
    if orders:
        labels = [_order_text(o, names) for o, *_ in orders][::-1]
        axes.barh(range(len(orders)), [b for _, b, *_ in orders][::-1], color="#4c72b0")
        axes.set_yticks(range(len(orders)))
        axes.set_yticklabels(labels, fontsize=8)
        low = min(b for _, b, *_ in orders)
        high = max(b for _, b, *_ in orders)
        pad = (high - low) * 0.1 or abs(high) * 0.01 or 1.0
        axes.set_xlim(low - pad, high + pad)
    axes.set_xlabel("best score")
    axes.set_title(CHARTS["score_by_order.png"])
    charts["score_by_order.png"] = _png(figure)

    figure = _figure(5.5, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    if good:
        xs = [r["parameters"].get("temperature", 0.0) for r in good]
        ys = [r["parameters"].get("base_droprate", 0.5) for r in good]
        points = axes.scatter(xs, ys, c=[r["score"] for r in good], cmap="viridis", s=40)
        figure.colorbar(points, ax=axes, label="score")
    axes.set_xlabel("temperature")
    axes.set_ylabel("base_droprate")
    axes.set_title(CHARTS["temperature_base_droprate.png"])
    charts["temperature_base_droprate.png"] = _png(figure)

    figure = _figure(7.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    ranked = sorted(good, key=lambda r: r["trial"])
    if ranked:
        axes.scatter([r["trial"] for r in ranked], [r["score"] for r in ranked], s=16, color="#4c72b0")
        running, best = [], -math.inf
        for record in ranked:
            best = max(best, record["score"])
            running.append(best)
        axes.step([r["trial"] for r in ranked], running, where="post", color="#dd8452")
    axes.set_xlabel("trial")
    axes.set_ylabel("score")
    axes.set_title(CHARTS["score_by_trial.png"])
    charts["score_by_trial.png"] = _png(figure)
    return charts


def html_text(recipe: Recipe, records: Sequence[dict], charts: Dict[str, bytes]) -> str:
    from circuit_merge_plugin.insight.render import html_image, html_page, html_paragraph, html_table

    names = short_names(recipe)
    best = best_record(records)
    summary = [html_paragraph(f"Recipe {recipe.path}: {len(records)} trial(s), "
                              f"{len(records) - len(ok_records(records))} failed.")]
    if best is not None:
        summary.append(html_paragraph(
            f"Best: trial {best['trial']}, score {_fmt(best['score'])}, order "
            f"{_order_text(best['order'], names)}; recipe in {BEST}, digest {best.get('digest')}."
        ))
    effect = order_effect(records)
    if "spread_best" in effect:
        summary.append(html_paragraph(
            f"The order alone moves the score by {_fmt(effect['spread_best'])} "
            f"(best trial of each of {len(effect['orders'])} orders)."
        ))
    sections = [("", summary), ("Best trials", [html_table(_BEST_HEADERS, _best_rows(records, names), left=4)])]
    for name, caption in CHARTS.items():
        sections.append((caption, [html_image(charts[name], caption, name)]))
    return html_page("circuit-merge search", sections)


def write_summary(out: str, recipe: Recipe, records: Sequence[dict], settings, resolve,
                  *, charts: bool) -> None:
    """leaderboard.md and best.yaml (and with ``charts`` the PNGs and search.html)."""
    directory = Path(out)
    write_atomically(directory / LEADERBOARD, leaderboard_text(recipe, records))
    best = best_record(records)
    if best is not None:
        write_atomically(directory / BEST, best_yaml_text(recipe, best, resolve))
    if not charts:
        return
    pngs = render_charts(recipe, records)
    for name, data in pngs.items():
        write_atomically(directory / name, data)
    write_atomically(directory / HTML, html_text(recipe, records, pngs))
