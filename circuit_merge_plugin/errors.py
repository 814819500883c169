"""The one error type and the exit codes of every ``circuit-merge`` command.

Standard library only, so every layer may import it. A front end raises
:class:`Refused` for bad input found before any work (a path, a parameter, a
header, a report file); :func:`run_guarded` turns that and every other failure
into one line on stderr and an exit code::

    <prog>: error: <one line>

where ``<prog>`` is ``circuit-merge`` or the subcommand's own name
(``circuit-merge analyze``, ``circuit-merge report``, ...).

Exit codes, the same for every subcommand:

==== ======================================================================
0    done
1    failed while working (nothing written)
2    refused: bad command line, parameter, recipe, input or report
     (nothing read beyond headers, nothing written); also ``check`` finding
     problems, ``digest --expect`` finding a different digest, and ``report``
     on an unfinished merge without ``--partial``
130  interrupted (Ctrl-C)
143  terminated (SIGTERM)
==== ======================================================================
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Tuple

PROG = "circuit-merge"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


class Refused(ValueError):
    """Bad input detected before (or instead of) the work; exit code 2.

    A ``ValueError``, so the parameter table's checks (which raise plain
    ``ValueError``) are refusals too.
    """


def one_line(message: object) -> str:
    """The first line of ``message`` ("error" when it is empty)."""
    text = str(message).strip()
    return text.splitlines()[0] if text else "error"


def print_error(message: object, prog: str = PROG) -> None:
    """Print ``<prog>: error: <first line of message>`` on stderr."""
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()


def fail(message: object, code: int = EXIT_REFUSED, prog: str = PROG) -> NoReturn:
    """Print the one-line error and exit with ``code``."""
    print_error(message, prog)
    sys.exit(code)


def run_guarded(
    work: Callable[[], int],
    prog: str = PROG,
    *,
    failed: str = "failed",
    interrupted: str = "interrupted",
    refusals: Tuple[type, ...] = (ValueError,),
) -> int:
    """Run ``work``; return its exit code, or print one line and return the code
    of the failure: ``refusals`` (:class:`Refused` and the parameter table's
    ``ValueError`` by default) 2, Ctrl-C 130, anything else 1
    (``<failed>: <type>: <first line>``). A closed stdout (``| head``) ends the
    command quietly with 0.
    """
    try:
        result = work()
    except refusals as error:
        print_error(error, prog)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print_error(interrupted, prog)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `circuit-merge --test | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - the command line reports, not traces
        detail = one_line(error) if str(error).strip() else ""
        print_error(f"{failed}: {type(error).__name__}: {detail}", prog)
        return EXIT_FAILED
    return result if isinstance(result, int) else EXIT_OK
