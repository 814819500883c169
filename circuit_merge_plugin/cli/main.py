"""``circuit-merge``: the original Circuit-Merge! command line, run on mergekit.

    circuit-merge [--config FILE] [--temperature T] [--base_droprate R]
                  [--meaningful_change_threshold X] [--seed S] [--skip_rescaling]
                  [--test] BASE VARIANT1 [VARIANT2 ...] OUTPUT
    circuit-merge check RECIPE.yaml [--scan-values]
    circuit-merge digest DIR [--tensors] [--expect HASH] [--against OTHER_DIR]
    circuit-merge analyze|report|demo [...]

:data:`circuit_merge` is a click group: a first word that names a subcommand
runs it; any other command line is a merge (:func:`merge_command`), so the
original script's command line works unchanged. Subcommands are imported only
when they run. This module is only the front end (parsing, messages, exit
codes); the work is in :mod:`.request` (flags + config), :mod:`.job` (the
mergekit run and the atomic output), :mod:`.check`, :mod:`.selftest` and
:mod:`circuit_merge_plugin.io.digest`.

Exit codes (:mod:`circuit_merge_plugin.errors`): 0 done; 2 refused (bad command
line, parameter, config or input; nothing was read beyond headers and nothing
written); 1 the merge failed while running (nothing written); 130 / 143
interrupted by SIGINT / SIGTERM (nothing written).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import signal
import sys
from typing import Dict, List, Optional, Tuple

import click

from circuit_merge_plugin import __version__
from circuit_merge_plugin.core.params import (
    GLOBAL_PARAMETERS,
    ORIGINAL_SCRIPT_SEED,
    SEED_RULES,
)
from circuit_merge_plugin.errors import (
    EXIT_FAILED,
    EXIT_REFUSED,
    PROG,
    Refused,
    fail,
    run_guarded,
)

#: Subcommands: name -> (module, attribute names tried in order, one-line help).
#: Imported only when run; listed in --help only when the module is installed.
SUBCOMMANDS: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    "check": ("circuit_merge_plugin.cli.check", ("check_command",),
              "check a mergekit recipe before a long merge"),
    "digest": ("circuit_merge_plugin.cli.main", ("digest_command",),
               "print, check or compare the digest of a model directory"),
    "analyze": ("circuit_merge_plugin.insight.analyze", ("analyze_command",),
                "where variants change the base and fight"),
    "report": ("circuit_merge_plugin.insight.report", ("report_command",),
               "what each variant contributed to a merge"),
    "demo": ("circuit_merge_plugin.demo.run", ("demo_command",),
             "build small models locally and run a demo merge"),
}
SUBCOMMANDS["search"] = ("circuit_merge_plugin.search.command", ("search", "search_command", "command"), "choose an order and parameters by evaluation")  # noqa: E501

_DEVICE = re.compile(r"^(cpu|cuda|xpu|mps|auto)(:\d+)?$")


def _available_subcommands() -> Dict[str, tuple]:
    found = {}
    for name, (module, attributes, text) in SUBCOMMANDS.items():
        try:
            present = module == __name__ or importlib.util.find_spec(module) is not None
        except ImportError:  # its parent package is missing
            present = False
        if present:
            found[name] = (module, attributes, text)
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


#: The parameter table's numeric parameters as flags: name -> metavar. Each is
#: --NAME, and also --NAME-WITH-DASHES where the name has underscores.
_FLAG_METAVARS = {
    "temperature": "T",
    "base_droprate": "R",
    "meaningful_change_threshold": "X",
    "epsilon": "E",
    "lambda": "L",
}


def _parameter_help(info, default=None) -> str:
    """A flag's help from the parameter table: range, meaning, default."""
    shown = info.default if default is None else default
    return f"{info.range_text} {info.meaning}  [default: {shown!r}]"


def _parameter_options(function):
    """The parameter flags, every text and default read from the parameter table."""
    table = {info.name: info for info in GLOBAL_PARAMETERS}
    options = []
    for name, metavar in _FLAG_METAVARS.items():
        decls = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        options.append(click.option(*decls, name, type=float, default=None, metavar=metavar,
                                    help=_parameter_help(table[name])))
    options.append(click.option(
        "--seed", type=int, default=None, metavar="S",
        help=f"{table['seed'].meaning} {SEED_RULES['circuit-merge']}  "
        f"[default: {ORIGINAL_SCRIPT_SEED}]"))
    options.append(click.option(
        "--skip_rescaling", "--skip-rescaling", "skip_rescaling", is_flag=True, default=None,
        help=f"Turn rescale off (default: on). rescale: {table['rescale'].meaning}"))
    for option in reversed(options):
        function = option(function)
    return function


@click.command(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_epilog(),
)
@click.argument("paths", nargs=-1, metavar="BASE VARIANT1 [VARIANT2 ...] OUTPUT")
@click.option("--config", "config_path", metavar="FILE",
              help="YAML config (base_model, variant_models, output_dir, parameters); "
              "command-line values override it.")
@_parameter_options
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
@click.option("--tokenizer-source", "--tokenizer_source", "tokenizer_source", default=None,
              metavar="base|union|MODEL",
              help="Align vocabularies that differ (fine-tunes that added tokens), as "
              "mergekit-yaml's tokenizer_source: the base's tokens, the union of all, or "
              "a model directory's.  [default: none: a vocabulary difference is refused]")
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
                  out_shard_size, tokenizer_source, quiet, overwrite, allow_pickle, no_report,
                  print_recipe, **parameter_flags):
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
            allow_pickle=allow_pickle, report=not no_report, tokenizer_source=tokenizer_source,
        )
    except ValueError as error:
        fail(error, EXIT_REFUSED)
    if print_recipe:
        from circuit_merge_plugin.cli.job import guess_mode, recipe_yaml

        if selftest:
            fail("--print-recipe needs model paths, not --test", EXIT_REFUSED)

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
                   report=True, tokenizer_source=None):
    from circuit_merge_plugin.cli.request import (
        DEFAULT_SHARD_SIZE,
        MergeRequest,
        load_config,
        parse_dtype,
        parse_size,
        parse_tokenizer_source,
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
        tokenizer_source=parse_tokenizer_source(tokenizer_source),
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
        return run_guarded(work, PROG, failed="merge failed", refusals=(Refused,),
                           interrupted="interrupted; nothing was written")
    except SystemExit as stop:
        if stop.code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
            fail("terminated; nothing was written", stop.code)
        raise


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
@click.option("--expect", metavar="HASH", default=None,
              help="Exit 1 unless DIR's digest is HASH (a CI regression check).")
@click.option("--against", metavar="OTHER_DIR", default=None,
              help="Compare with OTHER_DIR tensor by tensor: name every tensor that "
              "differs or is in one directory only; exit 1 if any does.")
def digest_command(directory: str, per_tensor: bool, expect: Optional[str],
                   against: Optional[str]) -> None:
    """Print the order-independent SHA-256 of DIR's safetensors tensors.

    It covers tensor names, dtypes, shapes and bytes only, not file names,
    sharding or metadata: the same merge gives the same digest on any machine.
    Exit codes: 0 done (and the same digest / tensors), 1 a different digest
    (--expect) or different tensors (--against), 2 refused (no such directory,
    no tensors, a malformed HASH).
    """
    sys.exit(run_guarded(lambda: _digest(directory, per_tensor, expect, against), PROG))


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _digest(directory: str, per_tensor: bool, expect: Optional[str],
            against: Optional[str]) -> int:
    from circuit_merge_plugin.io.digest import combine, compare_digests, tensor_digests

    wanted = None
    if expect is not None:
        wanted = expect.strip().lower()
        if not _HEX64.match(wanted):
            raise Refused(f"--expect {expect}: not a digest (64 hexadecimal digits)")
    digests = tensor_digests(directory)
    if per_tensor:
        for name in sorted(digests, key=lambda n: n.encode("utf-8")):
            click.echo(f"{digests[name]}  {name}")
    digest = combine(digests)
    click.echo(digest)
    code = 0
    if wanted is not None and digest != wanted:
        click.echo(f"{PROG} digest: {directory}: digest {digest}, expected {wanted}", err=True)
        code = EXIT_FAILED
    if against is not None:
        changed, only_here, only_there = compare_digests(digests, tensor_digests(against))
        for name in changed:
            click.echo(f"differs: {name}")
        for name in only_here:
            click.echo(f"only in {directory}: {name}")
        for name in only_there:
            click.echo(f"only in {against}: {name}")
        count = len(changed) + len(only_here) + len(only_there)
        if count:
            click.echo(f"{PROG} digest: {count} tensor(s) differ between {directory} and "
                       f"{against}", err=True)
            code = EXIT_FAILED
        else:
            click.echo(f"same tensors as {against}")
    return code


# ---------------------------------------------------------------- the group


class CircuitMergeGroup(click.Group):
    """The subcommands of :data:`SUBCOMMANDS`, imported when run; a command line
    whose first word names none of them is a merge (:func:`merge_command`), so
    ``circuit-merge BASE V1 OUT``, ``--config``, ``--test`` and ``--version``
    work as the original script's command line."""

    def __init__(self, *args, default: click.Command, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def list_commands(self, ctx) -> List[str]:
        return list(_available_subcommands())

    def get_command(self, ctx, name: str) -> Optional[click.Command]:
        entry = _available_subcommands().get(name)
        if entry is None:
            return None
        module, attributes, _text = entry
        loaded = importlib.import_module(module)
        for attribute in attributes:
            command = getattr(loaded, attribute, None)
            if isinstance(command, click.Command):
                return command
        return None

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if not args or args[0] not in self.list_commands(None):
            self.default.epilog = _epilog()  # the subcommands installed now
            return self.default.main(args=args, prog_name=prog_name or PROG, **extra)
        return super().main(args=args, prog_name=prog_name or PROG, **extra)


circuit_merge = CircuitMergeGroup(
    name=PROG,
    default=merge_command,
    help=merge_command.help,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point: a subcommand by its first word, else a merge."""
    return circuit_merge.main(args=argv, prog_name=PROG, standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main()
