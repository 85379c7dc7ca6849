"""What every command shares: exit codes, SIGTERM as an exception from start-up on, one-line errors and warnings.

Heavy imports (torch) happen inside each command's body, after `run_command` has set the
signal handler, so an interrupt during start-up ends with the same message and exit code
as one during the work.
"""

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from extsub_kernels._version import __version__
from extsub_kernels.errors import InputError, PublishError, Terminated

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body with SIGTERM raising `Terminated` and usable std streams; interrupts become one line
    and exit 130 / 143."""
    previous = _terminate_as_interrupt()
    _usable_std_streams()
    try:
        return body()
    except Terminated as e:
        return fail(prog, _interrupted("terminated", e), EXIT_SIGTERM)
    except KeyboardInterrupt as e:
        return fail(prog, _interrupted("interrupted", e), EXIT_SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def guarded(prog: str, work: Callable[[], object], what: str = "run") -> tuple[int, object]:
    """(EXIT_OK, result) of `work`, or the exit code of its failure with its one-line message printed.

    Bad input (InputError) exits 2; any other exception is a failed `what` ("merge"), exit 1, whose
    message says whether outputs were published before the failure.
    """
    try:
        return EXIT_OK, work()
    except InputError as e:
        return fail(prog, str(e), EXIT_BAD_INPUT), None
    except (KeyboardInterrupt, Terminated):
        raise
    except PublishError as e:
        return fail(prog, f"the {what} failed: {e}", EXIT_FAILED), None
    except Exception as e:
        published = getattr(e, "published", ())
        if published:
            names = ", ".join(str(p) for p in published)
            message = f"the {what} failed after publishing its outputs (each complete: {names}): {e}"
            return fail(prog, message, EXIT_FAILED), None
        return fail(prog, f"the {what} failed and nothing was written: {type(e).__name__}: {e}", EXIT_FAILED), None


def _interrupted(what: str, interrupt: BaseException) -> str:
    """The message of a Ctrl-C or SIGTERM: nothing was written, or (held back while publishing) all outputs were."""
    published = getattr(interrupt, "published", ())
    if not published:
        return f"{what}; nothing was written"
    names = ", ".join(str(p) for p in published)
    return f"{what} while the outputs were moved into place, after which every one was complete: {names}"


def _usable_std_streams() -> None:
    """A closed stdin, stdout or stderr (`2>&-`) becomes /dev/null, before any file is opened.

    Otherwise the first file opened would take the free descriptor, and messages or the progress
    bar written to "stderr" would land in it (an output file), or fail the run with EBADF.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            if fd and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                raise OSError  # a file some launcher left open on a closed stream's number: not an output
        except OSError:
            sink = os.open(os.devnull, os.O_RDWR)
            if sink != fd:
                os.dup2(sink, fd)
                os.close(sink)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or getattr(stream, "closed", False):
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - lives as long as the process


@contextmanager
def shown_warnings(prog: str, *, quiet: bool) -> Iterator[None]:
    """Within the block, warnings print as one line `PROG: warning: ...` each (none with `quiet`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            say(f"{prog}: warning: {message}")

        warnings.showwarning = show
        yield


def fail(prog: str, message: str, code: int) -> int:
    """Print `PROG: error: message` on stderr and return `code`."""
    say(f"{prog}: error: {message}")
    return code


def say(line: str) -> None:
    """One line on stderr; a stderr that cannot take it (a closed pipe) never changes the exit code."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def _terminate_as_interrupt() -> object:
    """SIGTERM raises Terminated from here on (so start-up is covered too); returns the previous handler."""

    def _raise(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    try:
        return signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        return None


def command_parser(prog: str, description: str, epilog: str, **options: object) -> argparse.ArgumentParser:
    """The parser every command starts from: its name, a description and an epilog kept as written."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **options,
    )


def add_closing_flags(parser: argparse.ArgumentParser, *, force_help: str) -> None:
    """The flags every command ends with: --force (what it replaces), -q, --version."""
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_adapter_input_flags(add: Callable[..., object]) -> None:
    """The flags that say how to read adapter inputs, as extsub-merge and extsub-inspect both take them: the scaling
    of bare LoRA files (--lora-alpha, --rank, --rslora) and --any-base-model. `add`: a parser's or group's
    add_argument."""
    add(
        "--lora-alpha",
        type=float,
        metavar="A",
        help="lora_alpha of bare .safetensors files with no adapter_config.json",
    )
    add("--rank", type=int, metavar="R", help="with --lora-alpha: their r (default: from the shapes)")
    add("--rslora", action="store_true", help="with --lora-alpha: scaling lora_alpha/√r (rsLoRA)")
    add(
        "--any-base-model",
        action="store_true",
        help="accept different base_model_name_or_path (module shapes are still checked)",
    )
