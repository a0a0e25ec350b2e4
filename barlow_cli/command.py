"""Running a command: logging, and the exit status of each outcome.

Console scripts call ``sys.exit(main())``: a ``main`` that returns anything but None or an int
makes the command print it and exit with status 1 even on success. Every ``main`` therefore
returns None and leaves the status to :func:`run_command`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["CommandFailed", "UsageError", "run_command", "setup_logging", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_FAILED = 1  # the run failed, or was stopped (a signal, non-finite losses)
EXIT_USAGE = 2  # argparse's status: an option or input to change before running again


class UsageError(ValueError):
    """An option or input that cannot work (a file given as the output folder, a batch below 2, a
    file that is no checkpoint, a dataset without the split asked for, ...): exit status 2, as
    argparse gives for a malformed option."""


class CommandFailed(RuntimeError):
    """A run that could not finish, or was stopped; its message says why and what was kept."""


# Errors whose message is the whole answer: bad input found while running (a missing file, an
# unreadable checkpoint, an unknown split) rather than a bug, which keeps its traceback.
_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (CommandFailed, ValueError, OSError)
# Errors that name something to change before running again, hence status 2: a UsageError, and a
# path that does not exist (every path a command opens comes from its options: a model folder,
# --train_dir, --checkpoint, ...), whichever library found it missing.
_INPUT_ERRORS: tuple[type[BaseException], ...] = (UsageError, FileNotFoundError)


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped INFO logs on stderr, the same for every command."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)


def run_command(prog: str, body: Callable[[], Any], *, expected: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``body()`` and exit the way shell scripts and schedulers read it.

    Returns normally on success (status 0; ``body``'s result is discarded). Exits with status 2
    on a :class:`UsageError` or a ``FileNotFoundError`` (an option or input to change), and with
    status 1 on any other expected error (``ValueError``,
    ``OSError``, :class:`CommandFailed` and ``expected``) or Ctrl-C, printing
    ``"{prog}: error: {message}"`` on one line instead of a traceback. A command that fails leaves
    no empty output folder of its own making behind."""
    from .output_dir import remove_empty_folders_made  # it imports UsageError from here

    try:
        body()
    except _INPUT_ERRORS as error:
        remove_empty_folders_made()
        _exit(prog, error, EXIT_USAGE)
    except (*_EXPECTED_ERRORS, *expected) as error:
        remove_empty_folders_made()
        _exit(prog, error, EXIT_FAILED)
    except KeyboardInterrupt:
        remove_empty_folders_made()
        _exit(prog, "interrupted (Ctrl-C).", EXIT_FAILED)
    except Exception:  # a bug keeps its traceback, but not an empty folder
        remove_empty_folders_made()
        raise


def _exit(prog: str, error: BaseException | str, status: int) -> None:
    # One line, whatever the library that raised wrapped into it: scripts grep it, people read it.
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
