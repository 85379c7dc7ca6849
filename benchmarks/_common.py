"""What every benchmark shares: the paper authors' per-row pattern, peak memory, the environment of a result row,
and `record`, through which every benchmark appends its numbers to results/results.csv."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping
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

# isort: split
from results_table import CSV_PATH, append

RESULTS = ROOT / "benchmarks" / "results"
# Numbers that describe a configuration or its bookkeeping rather than measure it: never recorded as metrics.
NOT_MEASURED = frozenset(
    "rep reps repeats runs lam threads layers tensors count cpus rank modules examples parameters seed "  # noqa: SIM905
    "bytes_moved input_bytes largest_tensor_bytes idle_rss_bytes mergekit_idle_rss_bytes elements shape_layers "
    "extrapolated_from_layers compared_modules load_1min_before loadavg_1min_before load_average_1min "
    "load_average load_avg_1m".split()
)

__all__ = ["CODE", "RESULTS", "ROOT", "authors_ext_sub", "device_words", "environment", "peak_rss_bytes", "record"]


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


def commit() -> str:
    """The measured checkout's commit (short), "+" when it has uncommitted changes; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CODE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CODE, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def device_words(device: str = "cpu") -> str:
    """The device in words: the GPU's name for CUDA, else the CPU model and its core count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name() or 'CPU'}, {os.cpu_count()} cores"


def _number(value) -> float | None:
    """A measured number: a number, or the median of a list of them (repetitions); None for anything else."""
    if isinstance(value, list) and value and all(_number(v) is not None and not isinstance(v, list) for v in value):
        return statistics.median(value)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def long_lines(rows: Iterable[Mapping], variant: str = "") -> list[dict]:
    """The numbers of `rows` as (shape, dtype, metric, value) lines, one per configuration (see `record`)."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        shape = row.get("shape", "")
        shape = "x".join(map(str, shape)) if isinstance(shape, (list, tuple)) else str(shape)
        suffix = f".{row[variant]}" if variant and isinstance(row.get(variant), str) else ""
        for key, value in row.items():
            if key in NOT_MEASURED or key in ("shape", "dtype") or key.endswith("_runs"):
                continue
            numbers = {f".{k}": v for k, v in value.items()} if isinstance(value, Mapping) else {suffix: value}
            for name, number in numbers.items():
                if (number := _number(number)) is not None:
                    values.setdefault((shape, str(row.get("dtype", "")), key + name), []).append(number)
    return [
        {"shape": shape, "dtype": dtype, "metric": metric, "value": statistics.median(numbers)}
        for (shape, dtype, metric), numbers in values.items()
    ]


def record(benchmark: str, rows: Iterable[Mapping], *, device: str = "cpu", variant: str = "", **given: str) -> int:
    """Append the numbers of `rows` to results/results.csv (or $EXTSUB_RESULTS_CSV); returns how many lines.

    Each row gives `shape` and `dtype` (a list shape becomes "AxB"); its numeric fields are the metrics (a list of
    numbers: their median), except those in NOT_MEASURED. Where `variant` names a string field of the row (the run,
    the implementation), each metric is named "metric.variant", as a field holding a dict of numbers is
    ({"ms": {"ours": 1.2}} → "ms.ours"). Rows of one configuration (repetitions) are recorded once, as their
    median. Commit, UTC date and the device in words come from this checkout and machine unless `given`
    (commit=, date=, device_name=, path=: for rows measured elsewhere)."""
    date = given.get("date") or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    fields = {"commit": given.get("commit") or commit(), "date": date, "benchmark": benchmark}
    fields["device"] = given.get("device_name") or device_words(device)
    target = Path(given.get("path") or os.environ.get("EXTSUB_RESULTS_CSV") or CSV_PATH)
    return append(long_lines(rows, variant), path=target, **fields)


def save_rows(folder: Path | None, stem: str, rows: list[dict], table: str) -> None:
    """With --results FOLDER: the rows themselves (every figure) as FOLDER/STEM.json and their table as STEM.md."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(table)
