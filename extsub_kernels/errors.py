"""Every exception the package raises on purpose, one hierarchy: exit code 2 for bad input, 1 for a failed run."""


class _Named(Exception):
    """An error whose message names Python options as `name=` (`force=True`); `options` lists them, so a command
    prints each as its flag (`--force`)."""

    def __init__(self, message: str = "", *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = tuple(options)


class InputError(_Named, ValueError):
    """A bad input or bad usage (a broken file, mismatched tensors, an unsafe OUT): exit code 2."""


class AdapterError(InputError):
    """A bad or unsupported adapter: the message names the file, the module and what is wrong (exit code 2)."""


class MergeError(_Named, RuntimeError):
    """A failure while the merge runs (an input changed underneath, a write failed): exit code 1."""


class PublishError(MergeError):
    """Moving a run's outputs into place failed and could not be fully undone (exit code 1); `published` lists the
    outputs that are in place, each complete (the run's others were not written)."""

    def __init__(self, message: str, *, published: tuple = ()):
        super().__init__(message)
        self.published = published


class Interrupted(KeyboardInterrupt):
    """Ctrl-C held back while a run published its outputs, raised once every one was in place (`published`, each
    complete). A Ctrl-C at any other time is a plain KeyboardInterrupt, and nothing of the run is left."""

    def __init__(self, message: str = "interrupted", *, published: tuple = ()):
        super().__init__(message)
        self.published = published


class Terminated(Interrupted):
    """SIGTERM, turned into an exception so the same cleanup as for Ctrl-C runs (`published` as for `Interrupted`)."""

    def __init__(self, message: str = "terminated (SIGTERM)", *, published: tuple = ()):
        super().__init__(message, published=published)


class ScanInterrupted(KeyboardInterrupt):
    """A λ scan stopped by Ctrl-C or SIGTERM (`terminated`: True for SIGTERM); `result` holds the `ScanResult` as it
    stood (complete=False, its rows also in scan.json)."""

    def __init__(self, message: str, result: object, *, terminated: bool = False):
        super().__init__(message)
        self.result = result
        self.terminated = terminated


class Notice(UserWarning):
    """Something worth telling a user that is not a problem ("building the CPU kernel ..."); the commands print it
    as `PROG: message`, not as a warning."""
