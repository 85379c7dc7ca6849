"""What every benchmark shares: the paper authors' per-row pattern, peak memory, and the environment of a result row."""

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The checkout whose extsub_kernels a benchmark imports: this one, or EXTSUB_BENCH_CODE (another
# checkout, to measure code before and after a change side by side); results still go under ROOT.
CODE = Path(os.environ.get("EXTSUB_BENCH_CODE") or ROOT)
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

from extsub_kernels import __version__
from extsub_kernels.engine.memory import peak_rss_bytes

RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["CODE", "RESULTS", "ROOT", "authors_ext_sub", "environment", "peak_rss_bytes"]


def authors_ext_sub(p: torch.Tensor, m: torch.Tensor, lam: float) -> torch.Tensor:
    """The released code's Ext-Sub step on dense rows: unit vectors and bisector vectorized, the
    projection of m on the bisector as a Python loop of per-row dot products, then p − λm + λ·proj."""
    unit_p = p / torch.norm(p, dim=-1, keepdim=True)
    unit_m = m / torch.norm(m, dim=-1, keepdim=True)
    bisector = unit_p + unit_m
    bisector = bisector / torch.norm(bisector, dim=-1, keepdim=True)
    projection = torch.stack([torch.dot(m[i], bisector[i]) * bisector[i] for i in range(m.shape[0])])
    return p - lam * m + lam * projection


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def environment(device: str = "cpu") -> dict:
    """The fields every result row carries: device, date, versions, threads."""
    gpu = f"{torch.cuda.get_device_name(device)}; " if str(device).startswith("cuda") else ""
    row = {
        "device": f"{gpu}cpu: {cpu_name()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda"):
        import triton

        row["triton"] = triton.__version__
    return row
