"""Every exception the package raises on purpose, one hierarchy: exit code 2 for bad input, 1 for a failed run."""


class InputError(ValueError):
    """A bad input or bad usage (a broken file, mismatched tensors, an unsafe OUT): exit code 2."""


class AdapterError(InputError):
    """A bad or unsupported adapter: the message names the file, the module and what is wrong (exit code 2)."""


class MergeError(RuntimeError):
    """A failure while the merge runs (an input changed underneath, a write failed): exit code 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the same cleanup as for Ctrl-C runs."""


class ScanInterrupted(KeyboardInterrupt):
    """A λ scan stopped by Ctrl-C or SIGTERM; `result` holds the rows measured so far (also in scan.json).

    Attributes:
        result: the `ScanResult` as it stood (complete=False).
        terminated: True for SIGTERM, False for Ctrl-C.
    """

    def __init__(self, message: str, result: object, *, terminated: bool = False):
        super().__init__(message)
        self.result = result
        self.terminated = terminated
