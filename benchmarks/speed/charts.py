"""Machine description, markdown tables and the PNG chart of a benchmark run."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Dict, List, Optional


def machine_description() -> Dict[str, str]:
    import torch

    info: Dict[str, str] = {}
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cores"] = str(os.cpu_count())
    try:
        info["cores usable"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    info["os"] = f"{platform.system()} {platform.release()}"
    info["python"] = platform.python_version()
    info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import version

        info["mergekit"] = version("mergekit")
    except Exception:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=str(Path(__file__).resolve().parent), timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "circuit_merge_plugin"],
            capture_output=True, text=True, timeout=10,
            cwd=str(Path(__file__).resolve().parent.parent),
        ).stdout.strip()
        if commit:
            info["commit"] = commit + (" (plugin modified)" if dirty else "")
    except Exception:
        pass
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def comparison_table(summary: Dict[str, Dict]) -> str:
    """Markdown: method | median wall | range | peak RSS | CPU | vs circuit."""
    lines = [
        "| method | median wall (s) | min-max wall (s) | median peak RSS (MiB) | median CPU (s) | circuit / method (wall) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    circuit = summary.get("circuit", {}).get("wall_s")
    for method, row in summary.items():
        ratio = circuit / row["wall_s"] if circuit and row["wall_s"] else None
        lines.append(
            f"| {method} | {_fmt(row['wall_s'])} | {_fmt(row['wall_min'])}-{_fmt(row['wall_max'])}"
            f" | {_fmt(row['rss_mib'], 0)} | {_fmt(row['cpu_s'])} | {_fmt(ratio)} |"
        )
    return "\n".join(lines)


def summarize(measurements: List[Dict]) -> Dict[str, Dict]:
    by_method: Dict[str, List[Dict]] = {}
    for m in measurements:
        by_method.setdefault(m["method"], []).append(m)
    summary = {}
    for method, rows in by_method.items():
        walls = [r["wall_s"] for r in rows]
        summary[method] = {
            "wall_s": median(walls),
            "wall_min": min(walls),
            "wall_max": max(walls),
            "rss_mib": median([r["peak_rss_mib"] for r in rows]),
            "rss_max_mib": max(r["peak_rss_mib"] for r in rows),
            "cpu_s": median([r["cpu_s"] for r in rows]),
            "runs": len(rows),
        }
    return summary


def paired_ratios(measurements: List[Dict], numerator: str, denominator: str) -> List[float]:
    """Per-round ratios (same round = adjacent runs under similar load)."""
    rounds: Dict[int, Dict[str, float]] = {}
    for m in measurements:
        rounds.setdefault(m["round"], {})[m["method"]] = m["wall_s"]
    return [
        r[numerator] / r[denominator]
        for _, r in sorted(rounds.items())
        if numerator in r and denominator in r and r[denominator] > 0
    ]


def chart(results: Dict, path: Path) -> Optional[Path]:
    """One PNG: compare (wall + RSS), scaling, kernel-only. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [key for key in ("compare", "scaling_variants", "scaling_size", "kernel", "memory")
              if results.get(key)]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.3 * rows), squeeze=False)
    axes = list(grid.reshape(-1))
    for ax in axes[len(panels):]:
        ax.axis("off")
    colors = {"circuit": "#d62728", "della": "#1f77b4", "ties": "#2ca02c", "linear": "#7f7f7f"}
    for ax, key in zip(axes, panels):
        data = results[key]
        if key == "compare":
            summary = data["summary"]
            methods = list(summary)
            walls = [summary[m]["wall_s"] for m in methods]
            bars = ax.bar(methods, walls, color=[colors.get(m, "k") for m in methods])
            for bar, m in zip(bars, methods):
                ax.annotate(f"{summary[m]['rss_mib']:.0f} MiB", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("median wall time (s)")
            ratios = "  ".join(f"{k} {v['median_paired']:.2f}" for k, v in data["ratios"].items()
                               if k in ("circuit/della", "circuit/linear"))
            ax.set_title(f"mergekit-yaml, {data['workload']}\n{ratios}\n(bar labels: peak RSS)",
                         fontsize=9)
        elif key in ("scaling_variants", "scaling_size"):
            for method, rows in data["rows"].items():
                xs = [r["input_gib"] for r in rows]
                ax.plot(xs, [r["wall_s"] for r in rows], "o-", color=colors.get(method, "k"),
                        label=f"{method} wall")
            ax2 = ax.twinx()
            for method, rows in data["rows"].items():
                ax2.plot([r["input_gib"] for r in rows], [r["rss_mib"] for r in rows], "s--",
                         color=colors.get(method, "k"), alpha=0.5, label=f"{method} RSS")
            ax2.set_ylabel("peak RSS (MiB), dashed")
            ax.set_xlabel("input bytes read (GiB)")
            ax.set_ylabel("median wall time (s)")
            what = "variants " + ",".join(str(r["variants"]) for r in next(iter(data["rows"].values()))) \
                if key == "scaling_variants" else \
                "sizes " + ",".join(r["size"] for r in next(iter(data["rows"].values())))
            ax.set_title(f"scaling: {what}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        elif key == "kernel":
            methods = list(data["times"])
            values = [data["times"][m]["ns_per_element"] for m in methods]
            ax.bar(methods, values, color=[colors.get(m, "k") for m in methods])
            ax.set_yscale("log")
            ax.set_ylim(bottom=1)
            for i, v in enumerate(values):
                ax.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("ns per element per variant (log)")
            ax.set_title(f"kernel only, in process\n{data['workload']}", fontsize=9)
        elif key == "memory":
            for method, rows in data.items():
                ax.plot([r["numel"] / 1e6 for r in rows], [r["work_bytes"] / 2**20 for r in rows],
                        "o-", color=colors.get(method, "k"), label=method)
            ax.set_xscale("log")
            ax.set_yscale("symlog", linthresh=1)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("tensor elements (millions)")
            ax.set_ylabel("working memory beyond output (MiB)")
            ax.set_title("extra memory of one tensor merge", fontsize=9)
            ax.legend(fontsize=7)
    machine = results.get("machine", {})
    described = ", ".join(
        f"{machine[k]}" for k in ("cpu", "gpu") if machine.get(k)
    ) + f", {machine.get('cores', '?')} cores, {machine.get('memory', '?')}, torch {machine.get('torch', '?')}"
    fig.suptitle(
        f"{results.get('title', 'circuit-merge-plugin benchmarks')}  ({results.get('started', '')})\n"
        f"{described}; load avg {results.get('load_start', '?')} -> {results.get('load_end', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
