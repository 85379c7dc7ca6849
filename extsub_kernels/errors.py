"""The exceptions the merge tools raise, one per exit code of `extsub-merge`."""


class InputError(ValueError):
    """A bad input or bad usage (a broken file, mismatched tensors, an unsafe OUT): exit code 2."""


class MergeError(RuntimeError):
    """A failure while the merge runs (an input changed underneath, a write failed): exit code 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the same cleanup as for Ctrl-C runs."""
