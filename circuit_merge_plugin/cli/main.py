"""``circuit-merge``: the original Circuit-Merge! command line, run on mergekit.

    circuit-merge [--config FILE] [--temperature T] [--base_droprate R]
                  [--meaningful_change_threshold X] [--seed S] [--skip_rescaling]
                  [--test] BASE VARIANT1 [VARIANT2 ...] OUTPUT
    circuit-merge digest DIR
    circuit-merge demo|analyze|report [...]   (when those modules are installed)

This module is only the front end (parsing, messages, exit codes); the work is
in :mod:`.request` (flags + config), :mod:`.merge_job` (the mergekit run and the
atomic output), :mod:`.digest` and :mod:`.selftest`.

Exit codes: 0 done; 2 refused (bad command line, parameter, config or input;
nothing was read beyond headers and nothing written); 1 the merge failed while
running (nothing written); 130 / 143 interrupted by SIGINT / SIGTERM (nothing
written).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import signal
import sys
from typing import Dict, List, Optional, Sequence

import click

from circuit_merge_plugin import __version__

PROG = "circuit-merge"
EXIT_FAILED = 1
EXIT_REFUSED = 2

#: Subcommands: name -> (module, attribute, one-line help). Skipped when the
#: module is not installed.
SUBCOMMANDS: Dict[str, tuple] = {
    "digest": ("circuit_merge_plugin.cli.main", "digest_main", "print the digest of a model directory"),
    "demo": ("circuit_merge_plugin.demo.run", "main", "build small models locally and run a demo merge"),
    "analyze": ("circuit_merge_plugin.insight.analyze", "main", "where variants change the base and fight"),
    "report": ("circuit_merge_plugin.insight.report", "main", "what each variant contributed to a merge"),
}

_DEVICE = re.compile(r"^(cpu|cuda|xpu|mps|auto)(:\d+)?$")


class Refused(Exception):
    """Bad input detected before merging."""


def _error(message: str, code: int) -> "None":
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    click.echo(f"{PROG}: error: {first}", err=True)
    sys.exit(code)


def _available_subcommands() -> Dict[str, tuple]:
    found = {}
    for name, (module, attribute, text) in SUBCOMMANDS.items():
        if module == __name__ or importlib.util.find_spec(module) is not None:
            found[name] = (module, attribute, text)
    return found


def _epilog() -> str:
    lines = ["\b", "Subcommands:"]
    for name, (_m, _a, text) in _available_subcommands().items():
        lines.append(f"  {PROG} {name:<8} {text}")
    lines += [
        "",
        "\b",
        "Exit codes: 0 done, 2 refused (bad input; nothing written),",
        "1 merge failed (nothing written), 130/143 interrupted (nothing written).",
    ]
    return "\n".join(lines)


def _float_option(*decls: str, metavar: str, help: str):
    return click.option(*decls, type=float, default=None, metavar=metavar, help=help)


@click.command(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_epilog(),
)
@click.argument("paths", nargs=-1, metavar="BASE VARIANT1 [VARIANT2 ...] OUTPUT")
@click.option("--config", "config_path", metavar="FILE",
              help="YAML config (base_model, variant_models, output_dir, parameters); "
              "command-line values override it.")
@_float_option("--temperature", "temperature", metavar="T",
               help="[0, 1] 0 = priority-weighted drop rates and pairwise averaging, "
               "1 = equal drop rates and true averaging.  [default: 0.0]")
@_float_option("--base_droprate", "--base-droprate", "base_droprate", metavar="R",
               help="[0, 1) drop rate of the highest-priority variant.  [default: 0.5]")
@_float_option("--meaningful_change_threshold", "--meaningful-change-threshold",
               "meaningful_change_threshold", metavar="X",
               help="|delta| below this counts as unchanged.  [default: 2e-06]")
@_float_option("--epsilon", "epsilon", metavar="E",
               help="[0, 1) MAGPRUNE spread of drop probabilities.  [default: 0.1]")
@_float_option("--lambda", "lambda", metavar="L",
               help="(0, 10] scale of the merged delta: base + L * delta.  [default: 1.0]")
@click.option("--seed", type=int, default=None, metavar="S",
              help="Seed of the random drops.  [default: 0]")
@click.option("--skip_rescaling", "--skip-rescaling", "skip_rescaling", is_flag=True,
              default=None, help="Do not divide kept deltas by (1 - drop probability).")
@click.option("--test", "selftest", is_flag=True,
              help="Merge a small synthetic base and two perturbed variants and print "
              "them side by side.")
@click.option("--cuda", is_flag=True, help="Merge on the GPU (same as --device cuda).")
@click.option("--device", metavar="DEV", default=None,
              help="Merge on this torch device (cpu, cuda, cuda:1, auto, ...).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Compute dtype: float32, float16 or bfloat16.  [default: inputs']")
@click.option("--out-dtype", "--out_dtype", "out_dtype", default=None, metavar="DTYPE",
              help="Output dtype of floating tensors.  [default: the merge's]")
@click.option("--out-shard-size", "--out_shard_size", "out_shard_size", default=None,
              metavar="SIZE", help="Bytes per output shard, K/M/B suffixes.  [default: 5B]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUTPUT.")
@click.option("--allow-pickle", "--allow_pickle", "allow_pickle", is_flag=True,
              help="Read pickled checkpoints (.bin/.pt); they can run code when loaded.")
@click.option("--no-report", "--no_report", "no_report", is_flag=True,
              help="Do not count contributions nor write circuit_merge_report.json "
              "(see `circuit-merge report`).")
@click.option("--print-recipe", "--print_recipe", "print_recipe", is_flag=True,
              help="Print the equivalent mergekit recipe and exit.")
@click.version_option(__version__, "--version", prog_name=PROG)
def merge_command(paths, config_path, selftest, cuda, device, dtype, out_dtype,
                  out_shard_size, quiet, overwrite, allow_pickle, no_report, print_recipe,
                  **parameter_flags):
    """Merge VARIANT1..N into BASE with Circuit-Merge!, through mergekit.

    Variants are in priority order: the first listed wins sign conflicts and
    drops the least. Directories of a transformers architecture mergekit knows
    go through mergekit's planner (config, tokenizer and model card written);
    directories of bare safetensors through its raw-tensor planning. The result
    is written beside OUTPUT and renamed into place when complete, with a
    circuit_merge.json manifest and digest, and circuit_merge_report.json
    (what each variant contributed; render it with `circuit-merge report OUTPUT`).
    """
    try:
        request = _build_request(
            list(paths), config_path, parameter_flags, selftest=selftest, cuda=cuda,
            device=device, dtype=dtype, out_dtype=out_dtype,
            out_shard_size=out_shard_size, quiet=quiet, overwrite=overwrite,
            allow_pickle=allow_pickle, report=not no_report,
        )
    except ValueError as error:
        _error(str(error), EXIT_REFUSED)
    if print_recipe:
        from circuit_merge_plugin.cli.job import guess_mode, recipe_yaml

        if selftest:
            _error("--print-recipe needs model paths, not --test", EXIT_REFUSED)

        click.echo(recipe_yaml(request, guess_mode(request)), nl=False)
        return
    _configure_logging(request.quiet)
    with _signals_raise():
        if selftest:
            from circuit_merge_plugin.cli.selftest import run_selftest

            sys.exit(_guarded(lambda: run_selftest(request)))
        sys.exit(_guarded(lambda: _merge(request)))


def _build_request(paths, config_path, parameter_flags, *, selftest, cuda, device,
                   dtype, out_dtype, out_shard_size, quiet, overwrite, allow_pickle,
                   report=True):
    from circuit_merge_plugin.cli.request import (
        DEFAULT_SHARD_SIZE,
        MergeRequest,
        load_config,
        parse_dtype,
        parse_size,
        paths_from,
        resolve_parameters,
    )

    config = load_config(config_path) if config_path is not None else {}
    flags = {k: v for k, v in parameter_flags.items() if v is not None}
    params, sources = resolve_parameters(
        config.get("parameters", {}), flags, config_path=config_path
    )
    if selftest:
        if paths:
            raise ValueError("--test builds its own models; give it no paths")
        base, variants, output = "", [], ""
    else:
        base, variants, output = paths_from(paths, config, config_path)
    device = device or ("cuda" if cuda else "cpu")
    if not _DEVICE.match(device):
        raise ValueError(f"--device must be cpu, cuda, cuda:N, xpu, mps or auto, got {device!r}")
    return MergeRequest(
        base=base,
        variants=list(variants),
        output=output,
        params=params,
        dtype=parse_dtype(dtype if dtype is not None else config.get("dtype"), "--dtype"),
        out_dtype=parse_dtype(
            out_dtype if out_dtype is not None else config.get("out_dtype"), "--out-dtype"
        ),
        device=device,
        out_shard_size=parse_size(out_shard_size or DEFAULT_SHARD_SIZE),
        quiet=quiet,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        report=report,
        sources=sources,
    )


def _resolve_device(request) -> None:
    import torch

    device = request.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise Refused(f"--device {request.device}: CUDA is not available on this machine")
    if kind == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise Refused(f"--device {request.device}: no such CUDA device")
    request.device = device


def _merge(request) -> int:
    from circuit_merge_plugin.cli.job import check_inputs, run_job

    try:
        inputs = check_inputs(request)
        _resolve_device(request)
    except (ValueError, Refused) as error:
        raise Refused(str(error)) from None
    for variant in inputs.variants:
        if variant.tensors and not set(variant.tensors) & set(inputs.base.tensors):
            if not request.quiet:
                click.echo(
                    f"{PROG}: warning: {variant.role} {variant.given} shares no tensor "
                    f"name with the base model; its tensors are added as they are",
                    err=True,
                )
    out, mode, digest = run_job(request, inputs=inputs)
    if not request.quiet:
        click.echo(f"merged {len(request.variants)} variant(s) into {out} ({mode} mode)")
        click.echo(f"digest {digest}")
    return 0


def _guarded(work) -> int:
    """Run ``work`` turning every failure into a one-line message and exit code."""
    try:
        return work()
    except Refused as error:
        _error(str(error), EXIT_REFUSED)
    except KeyboardInterrupt:
        _error("interrupted; nothing was written", 130)
    except BrokenPipeError:  # e.g. `circuit-merge --test | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as stop:
        if stop.code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
            _error("terminated; nothing was written", stop.code)
        raise
    except Exception as error:  # noqa: BLE001 - the command line reports, not traces
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _error(f"merge failed: {type(error).__name__}: {message}", EXIT_FAILED)
    return EXIT_FAILED  # pragma: no cover


class _signals_raise:
    """SIGTERM/SIGHUP raise SystemExit(128+n) so the temporary output is removed."""

    def __enter__(self):
        self._previous = {}
        for number in (signal.SIGTERM, signal.SIGHUP):
            self._previous[number] = signal.signal(number, self._raise)
        return self

    @staticmethod
    def _raise(number, _frame):
        # Once: a second signal must not interrupt the clean-up it triggers.
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise SystemExit(128 + number)

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False


def _configure_logging(quiet: bool) -> None:
    import logging
    import os
    import warnings

    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING)
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")


# ---------------------------------------------------------------- digest


@click.command(name="digest", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", metavar="DIR")
@click.option("--tensors", "per_tensor", is_flag=True,
              help="Also print each tensor's own digest (to find what changed).")
def digest_command(directory: str, per_tensor: bool) -> None:
    """Print the order-independent SHA-256 of DIR's safetensors tensors.

    It covers tensor names, dtypes, shapes and bytes only, not file names,
    sharding or metadata: the same merge gives the same digest on any machine.
    """
    from circuit_merge_plugin.io.digest import combine, tensor_digests

    try:
        digests = tensor_digests(directory)
    except ValueError as error:
        _error(str(error), EXIT_REFUSED)
    if per_tensor:
        for name in sorted(digests, key=lambda n: n.encode("utf-8")):
            click.echo(f"{digests[name]}  {name}")
    click.echo(combine(digests))


def digest_main(argv: Sequence[str]) -> int:
    digest_command.main(args=list(argv), prog_name=f"{PROG} digest", standalone_mode=True)
    return 0


# ---------------------------------------------------------------- dispatch


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point: subcommand by first word, else a merge."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        found = _available_subcommands()
        if argv[0] in found:
            module, attribute, _text = found[argv[0]]
            function = getattr(importlib.import_module(module), attribute)
            result = function(argv[1:])
            sys.exit(result if isinstance(result, int) else 0)
    return merge_command.main(args=argv, prog_name=PROG, standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main()
