"""What every command shares: `main`'s steps, exit codes, the one signal policy from start-up to exit (`_signals`:
interrupts become one line and exit 130 / 143), one-line errors and warnings, flags, flags → Python options."""

import argparse
import contextlib
import fcntl
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from extsub_kernels import _signals
from extsub_kernels._version import __version__
from extsub_kernels.errors import InputError, Notice, PublishError, Terminated

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def command_main(
    prog: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.ArgumentParser, argparse.Namespace, str], int],
) -> Callable[..., int]:
    """A command's `main(argv=None)`: parse (before torch loads), load torch, `run(parser, args, command line)`."""

    def main(argv: Sequence[str] | None = None) -> int:
        def body() -> int:
            words = list(sys.argv[1:] if argv is None else argv)
            parser = build_parser()
            args = parser.parse_args(words)
            load_torch()
            return run(parser, args, shlex.join([prog, *words]))

        return run_command(prog, body, process=argv is None)

    main.__doc__ = f"Run `{prog}` with `argv` (default: sys.argv[1:]); returns the exit code."
    return main


def run_command(prog: str, body: Callable[[], int], *, process: bool = False) -> int:
    """Run a command's body under the one signal policy with usable std streams, interrupts one line and exit 130 /
    143; `process`: the command is the whole process (a signal while the interpreter exits ends it at once)."""
    previous = _signals.install()
    try:
        try:
            _signals.raise_unanswered()  # one that came while the command line was imported
            _usable_std_streams()
            code = body()
        except KeyboardInterrupt as e:
            _signals.answered()
            return _interrupt_exit(prog, e)
        except Exception:
            swallowed = _signals.unanswered()
            if swallowed is None:
                raise
            _signals.answered()  # a failure that follows a swallowed signal is that interrupt
            return _interrupt_exit(prog, _signals.exception_for(swallowed))
        swallowed = _signals.unanswered()
        if swallowed is not None:  # raised inside a library that swallowed it, after the outputs were published
            _signals.answered()
            what, exit_code = _INTERRUPTS[swallowed == signal.SIGTERM]
            return fail(prog, f"{what} after the run had finished (its outputs are complete)", exit_code)
        return code
    except KeyboardInterrupt as e:  # a second Ctrl-C while the first was answered
        return _interrupt_exit(prog, e)
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            _signals.exit_quietly() if process else _signals.restore(previous)


def load_torch() -> None:
    """Import torch whole or not at all: a signal meanwhile is answered once it has loaded."""
    with _signals.deferred():
        import torch  # noqa: F401


_INTERRUPTS = {False: ("interrupted", EXIT_SIGINT), True: ("terminated", EXIT_SIGTERM)}


def _interrupt_exit(prog: str, interrupt: BaseException) -> int:
    """One line for a Ctrl-C or SIGTERM: nothing was written, or (held back while publishing) every output was."""
    what, code = _INTERRUPTS[isinstance(interrupt, Terminated)]
    names = ", ".join(str(p) for p in getattr(interrupt, "published", ()))
    done = f" while the outputs were moved into place, after which every one was complete: {names}"
    return fail(prog, what + (done if names else "; nothing was written"), code)


def guarded(
    prog: str, work: Callable[[], object], what: str = "run", *, quiet: bool | None = None
) -> tuple[int, object]:
    """(EXIT_OK, result) of `work`, or its failure's exit code (InputError 2, else a failed `what`, 1) with one line
    printed; one that follows a swallowed signal is that interrupt. With `quiet` given, warnings show as one line."""
    with _shown_warnings(prog, quiet=quiet) if quiet is not None else contextlib.nullcontext():
        try:
            return EXIT_OK, work()
        except (KeyboardInterrupt, Terminated):
            raise
        except Exception as e:
            _signals.raise_unanswered()
            return _failure(prog, e, what), None


def _failure(prog: str, e: Exception, what: str) -> int:
    message = as_flags(str(e), getattr(e, "options", ()))
    if isinstance(e, InputError):
        return fail(prog, message, EXIT_BAD_INPUT)
    if isinstance(e, PublishError):
        return fail(prog, f"the {what} failed: {message}", EXIT_FAILED)
    names = ", ".join(str(p) for p in getattr(e, "published", ()))
    if names:
        message = f"the {what} failed after publishing its outputs (each complete: {names}): {message}"
        return fail(prog, message, EXIT_FAILED)
    return fail(prog, f"the {what} failed and nothing was written: {type(e).__name__}: {message}", EXIT_FAILED)


def _usable_std_streams() -> None:
    """A closed std stream (`2>&-`) becomes /dev/null before a file can take its descriptor and get the messages."""
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
def _shown_warnings(prog: str, *, quiet: bool) -> Iterator[None]:
    """Within the block, warnings print as one line `PROG: warning: ...`, notices as `PROG: ...` (none if `quiet`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            say(f"{prog}: {message}" if issubclass(category, Notice) else f"{prog}: warning: {message}")

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


_FLAGS: dict[str, str] = {}  # Python option name → the flag of the command that runs (filled as it parses)


def as_flags(message: str, options: tuple[str, ...]) -> str:
    """`message` with each Python option it names (`force=True`, `max_shard_size=`) spelled as the command's flag."""
    for name in options:
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        message = re.sub(rf"\b{re.escape(name)}=(True\b)?", flag + " ", message).replace(flag + "  ", flag + " ")
        message = re.sub(rf"{re.escape(flag)} (?=[,.;:)]|$)", flag, message)
    return message


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser with one-line usage errors (exit 2) that notes each option's flag for `as_flags`."""

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            if action.option_strings and action.dest != "help":
                _FLAGS.setdefault(action.dest, max(action.option_strings, key=len))
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        say(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)")
        raise SystemExit(EXIT_BAD_INPUT)


def command_parser(
    prog: str, description: str, epilog: str, pair: tuple[str, str] | None = None, **options: object
) -> argparse.ArgumentParser:
    """The parser every command starts from (texts kept as written); `pair`: the help of EXPERT and ANTI [ANTI ...]."""
    parser = _OneLineParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **options,
    )
    if pair is not None:
        parser.add_argument("expert", metavar="EXPERT", help=pair[0])
        parser.add_argument("anti", metavar="ANTI", nargs="+", help=pair[1])
    return parser


def add_closing_flags(parser: argparse.ArgumentParser, *, force_help: str) -> None:
    """The flags every command ends with: --force (what it replaces), -q, --version."""
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_adapter_input_flags(add: Callable[..., object]) -> None:
    """The adapter-input flags of extsub-merge and extsub-inspect; `add`: a parser's or group's add_argument."""
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


def python_options(values: Mapping[str, Any], function: Callable) -> dict[str, Any]:
    """The keyword arguments of `function` (`merge`, `inspect`) from a command's options under recipe keys (the adapter
    flags make `adapter=`, -q `progress=`, -v `stats=`, --config `reads=`), those it does not take left out."""
    from inspect import signature

    from extsub_kernels.adapters import AdapterOptions, LoraScaling

    alpha, rank, rslora = values.get("lora_alpha"), values.get("rank"), bool(values.get("rslora"))
    if alpha is None and (rank is not None or rslora):
        raise InputError("--rank and --rslora describe the scaling of bare adapter files; give --lora-alpha too")
    scaling = LoraScaling(lora_alpha=alpha, r=rank, use_rslora=rslora) if alpha is not None else None
    given = {
        **values,
        "adapter": AdapterOptions(
            values.get("format"), values.get("max_rank"), scaling, bool(values.get("any_base_model"))
        ),
        "progress": not values.get("quiet"),
        "stats": True if values.get("verbose") or values.get("report") is not None else None,
        "reads": [values["config"]] if values.get("config") else [],
    }
    return {key: value for key, value in given.items() if key in signature(function).parameters}
