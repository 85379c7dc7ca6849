"""What every command shares: exit codes, SIGTERM as an exception from start-up on, one-line errors and warnings.

Heavy imports (torch) happen inside each command's body, after `run_command` has set the
signal handler, so an interrupt during start-up ends with the same message and exit code
as one during the work.
"""

import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from extsub_kernels.errors import InputError, Terminated

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body with SIGTERM raising `Terminated`; interrupts become one line and exit 130 / 143."""
    previous = _terminate_as_interrupt()
    try:
        return body()
    except Terminated:
        return fail(prog, "terminated; nothing was written", EXIT_SIGTERM)
    except KeyboardInterrupt:
        return fail(prog, "interrupted; nothing was written", EXIT_SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def guarded(prog: str, work: Callable[[], object], what: str = "run") -> tuple[int, object]:
    """(EXIT_OK, result) of `work`, or the exit code of its failure with its one-line message printed.

    Bad input (InputError) exits 2; any other exception is a failed `what` ("merge"), exit 1.
    """
    try:
        return EXIT_OK, work()
    except InputError as e:
        return fail(prog, str(e), EXIT_BAD_INPUT), None
    except (KeyboardInterrupt, Terminated):
        raise
    except Exception as e:
        return fail(prog, f"the {what} failed and nothing was written: {type(e).__name__}: {e}", EXIT_FAILED), None


@contextmanager
def shown_warnings(prog: str, *, quiet: bool) -> Iterator[None]:
    """Within the block, warnings print as one line `PROG: warning: ...` each (none with `quiet`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            print(f"{prog}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def fail(prog: str, message: str, code: int) -> int:
    """Print `PROG: error: message` on stderr and return `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _terminate_as_interrupt() -> object:
    """SIGTERM raises Terminated from here on (so start-up is covered too); returns the previous handler."""

    def _raise(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    try:
        return signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        return None
