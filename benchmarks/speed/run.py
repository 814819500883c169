"""Benchmarks: circuit against mergekit's della, ties and linear, side by side.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.speed.run                # everything, ~35M model
    .venv/bin/python -m benchmarks.speed.run --tiny         # seconds: smoke test
    .venv/bin/python -m benchmarks.speed.run --parts compare --rounds 5 --dtype bf16
    .venv/bin/python -m benchmarks.speed.run --size 1B --variants 3 --cuda --parts compare

Parts (``--parts``, comma separated; default all):

compare   the real ``mergekit-yaml`` (a child process per merge) on a generated
          Llama-style family (default ~35M parameters, base + 3 variants,
          float32), alternating circuit, della, ties, linear for ``--rounds``
          rounds (the order rotates each round); median wall time, peak RSS and
          CPU time of each child, ratios circuit/della and circuit/linear
          (ratio of medians, and the median of per-round ratios, which cancels
          slow drifts of machine load).
scaling   circuit (and linear, the I/O floor) against the number of variants
          (``--scaling-variants``, default 1,2,4,8) and the model size
          (``--scaling-sizes``, default 9M,35M,140M).
kernel    in process, no I/O: every tensor of the family merged by circuit's
          kernel (through the plugin's merge_group) and by mergekit's della
          (DELLA sparsify + sum consensus) and ties merge_group.
memory    extra peak memory of one tensor merge against the tensor size
          (fresh child process per point): circuit's chunked kernel is flat.
floor     in process: the torch and the fused kernel against the memory floor
          (the variants summed into a copy of the base), 8M float32 elements x
          3 variants, 2 threads, medians of 5 alternating rounds, plus the fused
          kernel's first-call compile cost; written to ``<out>/floor.md`` and
          ``floor.json`` (see :mod:`benchmarks.speed.floor`). Not in the default
          set; ``--parts floor`` runs it alone.
report    the cost of the contribution report (recipe ``report: PATH``):
          circuit with and without it, at temperature 0 and 0.5, as whole
          ``mergekit-yaml`` merges (alternating, ``--rounds`` rounds) and kernel
          only; target: at most 5% more whole-merge time.

Results: ``<out>/<name>.md`` (tables + machine description), ``<name>.png``
(chart), ``<name>.json`` (raw numbers); defaults ``benchmarks/speed/results/benchmark``.
Generated models are cached in ``benchmarks/speed/.cache`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.speed import charts, workloads
from benchmarks.speed.timing import run_merge

HERE = Path(__file__).resolve().parent
PARTS = ("compare", "scaling", "kernel", "memory", "report")
EXTRA_PARTS = ("floor",)
TARGETS = {"circuit/della": 0.6, "circuit/linear": 1.3}
#: Largest extra whole-merge time of the contribution report, as a fraction.
REPORT_TARGET = 0.05


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed.run",
        description="Benchmark circuit against mergekit's della, ties and linear.",
    )
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models, one round, small scaling: a smoke test in seconds")
    parser.add_argument("--size", default="35M", help="parameters of the compared model (35M, 1B, ...)")
    parser.add_argument("--variants", type=int, default=3, help="variants merged into the base")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the method comparison")
    parser.add_argument("--dtype", default="float32", choices=sorted(workloads.DTYPES),
                        help="dtype of the generated models and of the merge")
    parser.add_argument("--methods", default=",".join(workloads.METHODS),
                        help="methods compared (default circuit,della,ties,linear)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    parser.add_argument("--scaling-variants", default="1,2,4,8")
    parser.add_argument("--scaling-sizes", default="9M,35M,140M")
    parser.add_argument("--scaling-methods", default="circuit,linear")
    parser.add_argument("--scaling-rounds", type=int, default=2)
    parser.add_argument("--kernel-rounds", type=int, default=3)
    parser.add_argument("--memory-sizes", default="1M,4M,16M",
                        help="tensor element counts of the memory part")
    parser.add_argument("--cuda", action="store_true",
                        help="pass --cuda to mergekit-yaml; kernel part on the GPU")
    parser.add_argument("--mergekit-arg", action="append", default=[],
                        help="extra argument for every mergekit-yaml run (repeatable)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up merge of the compare part")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="benchmark", help="file stem of the results")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per merge")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the markdown and chart of an earlier run's JSON")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS + EXTRA_PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(PARTS + EXTRA_PARTS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.scaling_methods = [m.strip() for m in args.scaling_methods.split(",") if m.strip()]
    args.scaling_variants = [int(v) for v in args.scaling_variants.split(",") if v.strip()]
    args.scaling_sizes = [s.strip() for s in args.scaling_sizes.split(",") if s.strip()]
    args.memory_sizes = [workloads.parse_size(s) for s in args.memory_sizes.split(",") if s.strip()]
    if args.tiny:
        args.rounds = min(args.rounds, 1)
        args.scaling_variants = [1, 2]
        args.scaling_sizes = ["tiny"]
        args.scaling_methods = ["circuit"]
        args.scaling_rounds = 1
        args.kernel_rounds = 1
        args.memory_sizes = [1 << 16]
    return args


def _shape(size: str, tiny: bool) -> workloads.Shape:
    if size == "tiny" or (tiny and size not in ("tiny2",)):
        return workloads.tiny_shape()
    if size == "tiny2":
        return workloads.Shape(hidden=128, layers=2, intermediate=352)
    return workloads.shape_for(workloads.parse_size(size))


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.cache / "runs"
        self.extra = list(args.mergekit_arg) + (["--cuda"] if args.cuda else [])

    def family(self, size: str, variants: int) -> workloads.Family:
        shape = _shape(size, self.args.tiny)
        _log(f"model family {shape.label()} params (hidden {shape.hidden}, {shape.layers} layers), "
             f"{variants} variants, {self.args.dtype}")
        return workloads.build(self.args.cache, shape, variants, self.args.dtype)

    def merge(self, method: str, family: workloads.Family, variants: int, label: str,
              circuit: Optional[Dict] = None) -> Dict:
        tag = f"{label}-{method}-n{variants}"
        recipe_path = workloads.write_recipe(
            self.work / f"{tag}.yaml",
            workloads.recipe(method, family, variants, seed=self.args.seed, circuit=circuit),
        )
        m = run_merge(method, recipe_path, self.work / f"{tag}.out", self.work / f"{tag}.log",
                      extra_args=self.extra, seed=self.args.seed, timeout=self.args.timeout,
                      label=label)
        if m.returncode != 0:
            log = (self.work / f"{tag}.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"mergekit-yaml {method} failed ({m.returncode}):\n{log}")
        _log(f"  {label:>12} {method:<8} wall {m.wall_s:7.2f} s  peak RSS {m.peak_rss_mib:7.0f} MiB"
             f"  CPU {m.cpu_s:7.2f} s  (load {charts.load_average()})")
        return m.as_dict()

    # ------------------------------------------------------------- parts ----

    def compare(self, family: workloads.Family) -> Dict:
        args = self.args
        variants = args.variants
        if not (args.tiny or args.no_warmup):
            _log("warm-up merge (page cache, bytecode), not timed")
            self.merge("linear", family, variants, "warmup")
        rows = []
        methods = args.methods
        for round_index in range(args.rounds):
            order = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
            for method in order:
                row = self.merge(method, family, variants, f"round{round_index + 1}")
                row["round"] = round_index
                rows.append(row)
        summary = charts.summarize(rows)
        ratios = {}
        for other in ("della", "linear", "ties"):
            if "circuit" in summary and other in summary:
                paired = charts.paired_ratios(rows, "circuit", other)
                ratios[f"circuit/{other}"] = {
                    "of_medians": summary["circuit"]["wall_s"] / summary[other]["wall_s"],
                    "median_paired": charts.median(paired),
                    "paired": paired,
                }
        return {
            "rounds": args.rounds,
            "workload": f"{family.shape.label()} params, base + {variants} variants, {family.dtype}",
            "input_gib": family.input_bytes(variants) / 2**30,
            "rows": rows,
            "summary": summary,
            "ratios": ratios,
        }

    def scaling(self, base_family: workloads.Family) -> Dict:
        args = self.args
        out: Dict = {}
        variant_rows: Dict[str, List[Dict]] = {m: [] for m in args.scaling_methods}
        for count in args.scaling_variants:
            for method in args.scaling_methods:
                runs = [self.merge(method, base_family, count, f"vars{count}-r{r + 1}")
                        for r in range(args.scaling_rounds)]
                variant_rows[method].append(self._point(runs, base_family, count, base_family.shape.label()))
        out["scaling_variants"] = {"rows": variant_rows, "workload": base_family.shape.label()}
        size_rows: Dict[str, List[Dict]] = {m: [] for m in args.scaling_methods}
        for size in args.scaling_sizes:
            shape = _shape(size, args.tiny)
            family = base_family if shape == base_family.shape else self.family(size, args.variants)
            for method in args.scaling_methods:
                runs = [self.merge(method, family, args.variants, f"size{size}-r{r + 1}")
                        for r in range(args.scaling_rounds)]
                size_rows[method].append(self._point(runs, family, args.variants, family.shape.label()))
        out["scaling_size"] = {"rows": size_rows, "variants": args.variants}
        return out

    @staticmethod
    def _point(runs: List[Dict], family: workloads.Family, variants: int, size: str) -> Dict:
        input_bytes = family.input_bytes(variants)
        wall = charts.median([r["wall_s"] for r in runs])
        return {
            "variants": variants,
            "size": size,
            "input_gib": input_bytes / 2**30,
            "wall_s": wall,
            "rss_mib": charts.median([r["peak_rss_mib"] for r in runs]),
            "cpu_s": charts.median([r["cpu_s"] for r in runs]),
            "s_per_gib": wall / (input_bytes / 2**30),
        }

    def kernel(self, family: workloads.Family) -> Dict:
        from benchmarks.speed.kernel_bench import kernel_times

        device = "cuda" if self.args.cuda else "cpu"
        _log(f"kernel-only timings on {device} ({self.args.kernel_rounds} rounds)")
        times = kernel_times(family, self.args.variants, rounds=self.args.kernel_rounds,
                             device=device, seed=self.args.seed)
        for method, row in times.items():
            _log(f"  kernel {method:<8} median {row['median_s']:.3f} s"
                 f"  {row['ns_per_element']:.2f} ns/element/variant")
        return {
            "workload": f"{family.shape.label()} params, {self.args.variants} variants, {device}",
            "times": times,
        }

    def report_overhead(self, family: workloads.Family) -> Dict:
        """circuit with and without ``report:``: whole merges, then kernel only."""
        from benchmarks.speed.kernel_bench import REPORT_SETTINGS, kernel_times, report_method
        from circuit_merge_plugin.insight.report import check_report, load_report

        args = self.args
        rows = []
        for setting, extra in REPORT_SETTINGS.items():
            for round_index in range(args.rounds):
                order = (False, True) if round_index % 2 == 0 else (True, False)
                for with_report in order:
                    label = f"report-{setting}{'-on' if with_report else '-off'}-r{round_index + 1}"
                    report_file = self.work / f"{label}.report.json"
                    report_file.unlink(missing_ok=True)
                    parameters = dict(extra, **({"report": str(report_file)} if with_report else {}))
                    row = self.merge("circuit", family, args.variants, label, circuit=parameters)
                    if with_report:  # it was written, and it is consistent
                        problems = check_report(load_report(str(report_file)))
                        if problems:
                            raise RuntimeError(f"{report_file}: {problems[0]}")
                        report_file.unlink()
                    row.update(setting=setting, report=with_report, round=round_index)
                    rows.append(row)
        whole = {}
        for setting in REPORT_SETTINGS:
            off = [r for r in rows if r["setting"] == setting and not r["report"]]
            on = [r for r in rows if r["setting"] == setting and r["report"]]
            paired = [b["wall_s"] / a["wall_s"] for a, b in zip(
                sorted(off, key=lambda r: r["round"]), sorted(on, key=lambda r: r["round"]))]
            whole[setting] = {
                "off_s": charts.median([r["wall_s"] for r in off]),
                "on_s": charts.median([r["wall_s"] for r in on]),
                "overhead": charts.median(paired) - 1,
                "paired": paired,
            }
            _log(f"  report {setting}: whole merge {whole[setting]['off_s']:.2f} s -> "
                 f"{whole[setting]['on_s']:.2f} s ({whole[setting]['overhead']:+.1%})")
        device = "cuda" if args.cuda else "cpu"
        names = [report_method(s, on) for s in REPORT_SETTINGS for on in (False, True)]
        kernel_dir = self.work / "kernel-reports"
        kernel_dir.mkdir(parents=True, exist_ok=True)
        times = kernel_times(family, args.variants, rounds=args.kernel_rounds, device=device,
                             seed=args.seed, methods=names, report_dir=kernel_dir)
        kernel = {}
        for setting in REPORT_SETTINGS:
            without, with_ = times[report_method(setting, False)], times[report_method(setting, True)]
            off, on = without["median_s"], with_["median_s"]
            kernel[setting] = {"off_s": off, "on_s": on, "overhead": on / off - 1,
                               "ns_per_element_off": without["ns_per_element"],
                               "ns_per_element_on": with_["ns_per_element"]}
            _log(f"  report {setting}: kernel {off:.3f} s -> {on:.3f} s ({on / off - 1:+.1%})")
        return {
            "workload": f"{family.shape.label()} params, base + {args.variants} variants, "
                        f"{family.dtype}",
            "rounds": args.rounds,
            "rows": rows,
            "whole": whole,
            "kernel": kernel,
            "kernel_device": device,
        }

    def memory(self) -> Dict:
        from benchmarks.speed.kernel_bench import memory_growth

        _log("extra memory of one tensor merge against tensor size")
        methods = ("circuit",) if self.args.tiny else ("circuit", "della")
        result = memory_growth(self.args.memory_sizes, self.args.variants, methods)
        for method, rows in result.items():
            for row in rows:
                _log(f"  memory {method:<8} {row['numel']:>10} elements: "
                     f"{row['work_bytes'] / 2**20:8.2f} MiB beyond the output")
        return result


# ------------------------------------------------------------ markdown ----


def _fit(rows: List[Dict]) -> str:
    """Least-squares wall = a + b * input GiB over the rows, as text."""
    xs = [r["input_gib"] for r in rows]
    ys = [r["wall_s"] for r in rows]
    if len(xs) < 2 or max(xs) == min(xs):
        return "n/a"
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return f"{intercept:.2f} s + {slope:.2f} s/GiB (R^2 {r2:.2f})"


def _open(lines: List[str], name: str) -> None:
    """Start a named part of the page: the docs site includes parts by name
    (``--8<-- "benchmarks/speed/results/X.md:NAME"``), so its figures always come
    from this file. The markers are HTML comments, invisible when rendered."""
    lines += ["", f"<!-- --8<-- [start:{name}] -->"]


def _close(lines: List[str], name: str) -> None:
    lines += ["", f"<!-- --8<-- [end:{name}] -->"]


def _markdown(results: Dict) -> str:
    lines = [f"# {results['title']}"]
    _open(lines, "machine")
    lines += ["", f"Command: `{results['command']}`  "]
    lines.append(f"Started {results['started']}, took {results['elapsed_s'] / 60:.1f} min; "
                 f"load average at start {results['load_start']}, at end {results['load_end']}.")
    lines += ["", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in results["machine"].items()]
    _close(lines, "machine")
    compare = results.get("compare")
    if compare:
        _open(lines, "compare")
        lines += ["", f"## Whole merges: `mergekit-yaml`, {compare['workload']}", "",
                  f"{compare.get('rounds', '?')} round(s), methods alternating (order rotated each round); "
                  f"inputs {compare['input_gib']:.2f} GiB. Wall time and peak RSS/CPU of the "
                  "`mergekit-yaml` child process.", "",
                  charts.comparison_table(compare["summary"]), ""]
        lines.append("| ratio | of medians | median of per-round ratios | target |")
        lines.append("|---|---:|---:|---|")
        for key, value in compare["ratios"].items():
            target = TARGETS.get(key)
            met = ""
            if target is not None:
                met = f"<= {target} " + ("(met)" if value["median_paired"] <= target else "(not met)")
            lines.append(f"| {key} | {value['of_medians']:.3f} | {value['median_paired']:.3f} | {met} |")
        summary = compare["summary"]
        if "circuit" in summary and "della" in summary:
            ok = summary["circuit"]["rss_mib"] <= summary["della"]["rss_mib"]
            lines.append(f"| peak RSS circuit - della | {summary['circuit']['rss_mib'] - summary['della']['rss_mib']:+.0f} MiB"
                         f" | | <= 0 {'(met)' if ok else '(not met)'} |")
        _close(lines, "compare")
    for key, title in (("scaling_variants", "Scaling with the number of variants"),
                       ("scaling_size", "Scaling with model size")):
        data = results.get(key)
        if not data:
            continue
        _open(lines, key.replace("_", "-"))
        lines += ["", f"## {title}", "",
                  "| method | size | variants | input GiB | median wall (s) | s per input GiB | peak RSS (MiB) | CPU (s) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for method, rows in data["rows"].items():
            for r in rows:
                lines.append(f"| {method} | {r['size']} | {r['variants']} | {r['input_gib']:.3f} | "
                             f"{r['wall_s']:.2f} | {r['s_per_gib']:.2f} | {r['rss_mib']:.0f} | {r['cpu_s']:.2f} |")
        lines += ["", "Least-squares fit of wall time against input bytes (intercept: start-up "
                  "and fixed costs; slope: cost per GiB read):", ""]
        lines += [f"- {method}: {_fit(rows)}" for method, rows in data["rows"].items()]
        _close(lines, key.replace("_", "-"))
    kernel = results.get("kernel")
    if kernel:
        _open(lines, "kernel")
        lines += ["", f"## Kernel only (in process, no I/O): {kernel['workload']}", "",
                  "| method | median (s) | ns per element per variant | circuit / method |",
                  "|---|---:|---:|---:|"]
        circuit = kernel["times"].get("circuit", {}).get("median_s")
        for method, row in kernel["times"].items():
            ratio = circuit / row["median_s"] if circuit else float("nan")
            lines.append(f"| {method} | {row['median_s']:.3f} | {row['ns_per_element']:.2f} | {ratio:.3f} |")
        _close(lines, "kernel")
    memory = results.get("memory")
    if memory:
        _open(lines, "memory")
        lines += ["", "## Extra memory of one float32 tensor merge (3 variants)", "",
                  "Peak resident set during `merge_group` minus the resident set before it, "
                  "less the output tensor itself (fresh process per point).", "",
                  "| method | tensor elements | inputs (MiB) | working memory (MiB) |",
                  "|---|---:|---:|---:|"]
        for method, rows in memory.items():
            for r in rows:
                lines.append(f"| {method} | {r['numel']} | {r['input_bytes'] / 2**20:.0f} | "
                             f"{r['work_bytes'] / 2**20:.2f} |")
        _close(lines, "memory")
    counting = results.get("report")
    if counting:
        _open(lines, "report")
        lines += ["", f"## Contribution report (`report:`): {counting['workload']}", "",
                  f"circuit without and with the recipe parameter `report: PATH`, "
                  f"{counting['rounds']} round(s) alternating; overhead = median of the "
                  "per-round ratios - 1. Kernel only: in process, no I/O, "
                  f"{counting['kernel_device']}.", "",
                  "| setting | whole merge without (s) | with (s) | overhead | target "
                  "| kernel without (s) | with (s) | kernel overhead |",
                  "|---|---:|---:|---:|---|---:|---:|---:|"]
        for setting, whole in counting["whole"].items():
            kernel = counting["kernel"][setting]
            met = "(met)" if whole["overhead"] <= REPORT_TARGET else "(not met)"
            lines.append(
                f"| {setting} | {whole['off_s']:.2f} | {whole['on_s']:.2f} | "
                f"{whole['overhead']:+.1%} | <= {REPORT_TARGET:.0%} {met} | "
                f"{kernel['off_s']:.3f} | {kernel['on_s']:.3f} | {kernel['overhead']:+.1%} |")
        _close(lines, "report")
    if results.get("chart"):
        lines += ["", f"![chart]({Path(results['chart']).name})"]
    lines.append("")
    return "\n".join(lines)


def render(path: Path, out: Path, name: str) -> int:
    results = json.loads(Path(path).read_text())
    chart = charts.chart(results, out / f"{name}.png")
    results["chart"] = str(chart) if chart else None
    (out / f"{name}.md").write_text(_markdown(results))
    _log(f"rewrote {out / (name + '.md')}" + (f" and {chart}" if chart else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out, args.name)
    command = "python -m benchmarks.speed.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if "floor" in args.parts:
        from benchmarks.speed import floor

        floor.run(args.out, "floor", 1 << 23, 3, 2, 5, True, command)
        args.parts = [part for part in args.parts if part != "floor"]
        if not args.parts:
            return 0
    started = time.time()
    runner = Runner(args)
    results: Dict = {
        "title": "circuit-merge-plugin benchmarks" + (" (tiny smoke run)" if args.tiny else ""),
        "command": "python -m benchmarks.speed.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": charts.load_average(),
        "machine": charts.machine_description(),
    }
    need_family = {"compare", "scaling", "kernel", "report"} & set(args.parts)
    family = None
    if need_family:
        most = args.variants
        if "scaling" in args.parts:
            most = max([most] + args.scaling_variants)
        family = runner.family("tiny" if args.tiny else args.size, most)
    if "compare" in args.parts:
        results["compare"] = runner.compare(family)
    if "kernel" in args.parts:
        results["kernel"] = runner.kernel(family)
    if "scaling" in args.parts:
        results.update(runner.scaling(family))
    if "memory" in args.parts:
        results["memory"] = runner.memory()
    if "report" in args.parts:
        results["report"] = runner.report_overhead(family)
    results["elapsed_s"] = time.time() - started
    results["load_end"] = charts.load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    chart = charts.chart(results, args.out / f"{args.name}.png")
    results["chart"] = str(chart) if chart else None
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = _markdown(results)
    (args.out / f"{args.name}.md").write_text(markdown)
    _log(f"results: {args.out / (args.name + '.md')}" + (f", {chart}" if chart else ""))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
