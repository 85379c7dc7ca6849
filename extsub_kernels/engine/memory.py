"""Peak memory of this process, as the summary, the report and the benchmarks state it."""

import contextlib
import sys


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process image, in bytes (None where unknown): VmHWM on Linux (`ru_maxrss`, used
    elsewhere, carries a large parent's peak over fork + exec)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
