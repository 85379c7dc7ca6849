"""The one signal policy of a command, from its first instruction to its exit: SIGINT (KeyboardInterrupt) and SIGTERM
(`Terminated`) are raised and noted until answered, so one a library swallows still stops the run before it publishes
(`raise_unanswered`). Outside a command (the Python API) nothing is noted.
"""

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence

_unanswered: list[int] = []
_active = [False]
_COMMANDS = ("extsub-merge", "extsub-inspect", "extsub-scan")
# `python -m` runs a command from these modules (the first two: extsub-merge).
_COMMAND_MODULES = ("extsub_kernels", "extsub_kernels.cli", "extsub_kernels.cli.merge")
_COMMAND_MODULES += ("extsub_kernels.cli.inspect", "extsub_kernels.cli.scan")


def _handle(handler: Callable[[int, object], None]) -> dict[int, object]:
    """`handler` for SIGINT and SIGTERM unless ignored (nohup) or off the main thread; returns the ones replaced."""
    previous: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    return previous


def install() -> dict[int, object]:
    """Turn the policy on: SIGINT and SIGTERM raise and are noted; returns the previous handlers."""
    _active[0] = True
    return _handle(_raise)


def install_for_commands(argv: Sequence[str], orig_argv: Sequence[str]) -> None:
    """At the package's import, when this process is one of the commands (script or `python -m`): SIGINT and SIGTERM
    only noted until the command runs. A library import changes nothing."""
    script = argv[0].replace("\\", "/").rsplit("/", 1)[-1] if argv else ""
    module = next((orig_argv[i + 1] for i in range(len(orig_argv) - 1) if orig_argv[i] == "-m"), None)
    if script in _COMMANDS or (script == "-m" and module in _COMMAND_MODULES):
        _active[0] = True
        _handle(_note_only)


def _note_only(signum: int, frame: object) -> None:
    note(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM are only noted, the first raised after it (for importing torch whole)."""
    previous = _handle(_note_only)
    try:
        yield
    finally:
        restore(previous, active=True)
    raise_unanswered()


def exit_quietly() -> None:
    """From here to the process's exit, SIGINT and SIGTERM end it at once with 130 / 143, no traceback."""
    _handle(lambda signum, frame: os._exit(128 + signum))


def restore(previous: dict[int, object], *, active: bool = False) -> None:
    """Put back the handlers `install` replaced and turn the policy off (unless `active`)."""
    if not active:
        _active[0] = False
        _unanswered.clear()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _raise(signum: int, frame: object) -> None:
    note(signum)
    raise exception_for(signum)


def exception_for(signum: int) -> BaseException:
    """The exception a signal raises: `Terminated` for SIGTERM, KeyboardInterrupt for SIGINT."""
    from extsub_kernels.errors import Terminated  # here: the policy is on before anything else is imported

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def note(signum: int) -> None:
    """Remember a signal until the command answers it (while the policy is on)."""
    if _active[0]:
        _unanswered.append(signum)


def answered() -> None:
    """The command answered the signals so far (an interrupt reached its top)."""
    _unanswered.clear()


def unanswered() -> int | None:
    """The first signal raised but not answered yet (swallowed on its way), or None."""
    return _unanswered[0] if _unanswered else None


def raise_unanswered() -> None:
    """Raise the interrupt of a signal that was swallowed on its way (before anything is published)."""
    signum = unanswered()
    if signum is not None:
        raise exception_for(signum)
