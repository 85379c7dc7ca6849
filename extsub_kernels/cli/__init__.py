"""The command lines, `extsub-merge` (merge.py), `extsub-inspect` (inspect.py) and `extsub-scan` (scan.py): thin
layers over the Python API; common.py holds what they share. Nothing here imports torch, and the names below are
imported on first use, so `python -m extsub_kernels.cli.merge` runs its module once, after the signal policy is on.
"""

from extsub_kernels._lazy import lazy_getattr

_LOCATIONS = {
    **dict.fromkeys(("EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_SIGINT", "EXIT_SIGTERM"), f"{__name__}.common"),
    **dict.fromkeys(("build_parser", "main"), f"{__name__}.merge"),
}
__getattr__ = lazy_getattr(__name__, _LOCATIONS, globals())
__all__ = sorted(_LOCATIONS)
