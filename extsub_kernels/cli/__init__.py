"""The command lines, `extsub-merge` (merge.py), `extsub-inspect` (inspect.py) and `extsub-scan` (scan.py): thin
layers over the Python API.

Shared plumbing (exit codes, signals from start-up on, how warnings and errors print) is in
common.py. Nothing here imports torch at import time: each command sets its signal handlers
first, so a Ctrl-C or SIGTERM during start-up ends with the same one-line message as later.
"""

from extsub_kernels.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from extsub_kernels.cli.merge import build_parser, main

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_SIGINT", "EXIT_SIGTERM", "build_parser", "main"]
