"""Benchmark the ext_sub_ op against named baselines on LLaMA-7B/13B layer shapes.

Columns, measured side by side in one run: our backend (`auto`: the Triton kernel on CUDA,
the C++ kernel on CPU, or the eager torch path where it cannot be built; the row names the
implementation), the eager torch path itself (`backend="torch"`, the CPU fallback), the eager
`ext_sub_reference` in the input dtype, `torch.compile` of the closed form (warmed up: its
first call, the compilation, is timed apart), a copy of the same bytes (p + m → out: reads two
tensors, writes one — the floor), and on CPU for one shape the authors' pattern (a Python loop
over rows). On CPU it also counts minor page faults per call of ours and of the fallback in
steady state (getrusage ru_minflt), the cost of fresh pages a per-call allocation would bring.
GB/s count 3·N·itemsize. Appends every number to benchmarks/results/results.csv (medians;
_common.record) and prints the table derived from the rows; with --out-dir, the rows themselves
(JSON, every figure) and that table go to <out-dir>/op-<device>.{json,md} too (--name sets another
stem). --ranges renders one table from several runs' JSON files: per shape and dtype, the range of
each figure over the runs.
--cold-start instead measures what the first call of a process costs with empty caches (on
CPU): torch.compile of the closed form with an empty Inductor cache, and the C++ kernel's build
with an empty extsub cache, each in a fresh process, one shape (the first of --shapes).

    python benchmarks/bench_ext_sub.py                 # every shape, bf16 and fp32, on CUDA if present
    python benchmarks/bench_ext_sub.py --device cpu --shapes 4096x4096 --dtypes fp32
    python benchmarks/bench_ext_sub.py --ranges benchmarks/results/op-2026-11-25-cpu-run[123].json
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import extsub_kernels
from extsub_kernels import ext_sub_, ext_sub_reference
from extsub_kernels.ops import cpu_backend

from _common import record

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (5120, 13824), (13824, 5120)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAM = 1.0
# Inputs rotate through enough copies that the working set is several times the last-level
# cache (H100 L2 is 50 MB; server L3s are tens of MB), so every timed call streams from DRAM.
ROTATION_BYTES = 512 << 20


def closed_form_(p: torch.Tensor, m: torch.Tensor, lam: float) -> torch.Tensor:
    """The closed form (docs/design.md §1) as plain torch ops, for torch.compile to fuse."""
    pf, mf = p.float(), m.float()
    p_norm = pf.norm(dim=1, keepdim=True)
    m_norm = mf.norm(dim=1, keepdim=True)
    has_p = p_norm > 0
    alpha = torch.where(has_p, 1 + 0.5 * lam * m_norm / torch.where(has_p, p_norm, 1.0), 1.0)
    beta = torch.where(has_p, -0.5 * lam, 0.0)
    return p.copy_(alpha * pf + beta * mf)


def authors_row_loop_(p: torch.Tensor, m: torch.Tensor, lam: float) -> torch.Tensor:
    """The released code's pattern: unit vectors and bisector vectorized, then the projection as
    a Python loop of per-row dot products stacked back into a matrix, then p − λm + λ·proj."""
    unit_p = p / torch.norm(p, dim=-1, keepdim=True)
    unit_m = m / torch.norm(m, dim=-1, keepdim=True)
    bisector = unit_p + unit_m
    bisector = bisector / torch.norm(bisector, dim=-1, keepdim=True)
    projection = torch.stack([torch.dot(m[i], bisector[i]) * bisector[i] for i in range(m.shape[0])])
    return p.copy_(p - lam * m + lam * projection)


def _inputs(shape: tuple[int, int], dtype: torch.dtype, device: str, copies: int) -> list[tuple[torch.Tensor, ...]]:
    return [
        (
            torch.randn(shape, device=device).to(dtype),
            torch.randn(shape, device=device).to(dtype),
            torch.empty(shape, device=device, dtype=dtype),
        )
        for _ in range(copies)
    ]


def _median_ms(
    variants: dict[str, Callable], inputs: list, device: str, reps: int, best: dict[str, float] | None = None
) -> dict[str, float]:
    """Median wall time in ms of each variant over rotating inputs (and the best time into `best`, on CPU).

    CUDA: triton.testing.do_bench per variant. CPU: the variants take turns, one call each per
    round, so that a noisy machine slows them alike and the ratios stay fair; the best of the
    rounds is the figure least disturbed by other work on the machine.
    """
    counters = {name: 0 for name in variants}

    def call(name: str) -> None:
        variants[name](inputs[counters[name] % len(inputs)])
        counters[name] += 1

    if device.startswith("cuda"):
        from triton.testing import do_bench

        return {
            name: float(do_bench(lambda n=name: call(n), warmup=100, rep=max(200, reps * 20), return_mode="median"))
            for name in variants
        }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:  # warm-up: allocator, first-call paths, compilation
        call(name)
    for _ in range(reps):
        for name in variants:
            start = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - start)
    if best is not None:
        best.update({name: min(t) * 1e3 for name, t in times.items()})
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _minor_faults_per_call(fn: Callable, inputs: list, calls: int) -> float:
    """Minor page faults of the whole process per call of fn in steady state (after two warm-up rounds)."""
    for t in inputs * 2:
        fn(t)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(calls):
        fn(inputs[i % len(inputs)])
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _implementation(device: str) -> str:
    if device.startswith("cuda"):
        return "triton" if _triton_importable() else "torch"
    return cpu_backend()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads"


def _slug(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return "cpu"


def _wait_for_quiet(max_load: float | None, timeout_s: float) -> None:
    """On a shared machine: wait (up to timeout_s) until the 1-minute load average is below max_load."""
    if max_load is None or _load_average() is None:
        return
    deadline = time.monotonic() + timeout_s
    while _load_average() >= max_load and time.monotonic() < deadline:
        time.sleep(5)


def bench(
    device: str,
    shapes: list[tuple[int, int]],
    dtypes: list[str],
    reps: int,
    loop_shape: tuple[int, int] | None,
    quiet_load: float | None = None,
    quiet_timeout_s: float = 600.0,
) -> list[dict]:
    """One row per (shape, dtype): the timings of every variant, GB/s, and on CPU minor faults per call."""
    rows = []
    implementation = _implementation(device)
    print(f"ours (backend='auto') on {device}: {implementation}", flush=True)
    for shape in shapes:
        for dtype_name in dtypes:
            _wait_for_quiet(quiet_load, quiet_timeout_s)
            load_before = _load_average()
            torch._dynamo.reset()  # a fresh specialization per shape and dtype, never the eager fallback
            compiled = torch.compile(closed_form_, dynamic=False)
            dtype = DTYPES[dtype_name]
            tensor_bytes = shape[0] * shape[1] * dtype.itemsize
            copies = max(2, ROTATION_BYTES // (3 * tensor_bytes))
            inputs = _inputs(shape, dtype, device, copies)
            moved = 3 * tensor_bytes
            start = time.perf_counter()
            compiled(inputs[0][0], inputs[0][1], LAM)  # the compilation, timed apart from the warmed calls
            compile_first_s = time.perf_counter() - start
            variants = {
                "ours": lambda t: ext_sub_(t[0], t[1], LAM),
                "copy": lambda t: torch.add(t[0], t[1], out=t[2]),
                "compile": lambda t, fn=compiled: fn(t[0], t[1], LAM),
                "eager": lambda t: ext_sub_(t[0], t[1], LAM, backend="torch"),
            }
            best: dict[str, float] = {}
            timings = _median_ms(variants, inputs, device, reps, best)
            slow = {"reference": lambda t, dt=dtype: ext_sub_reference(t[0], t[1], LAM, dtype=dt)}
            if device == "cpu" and loop_shape == shape and dtype_name == "fp32":
                slow["row_loop"] = lambda t: authors_row_loop_(t[0], t[1], LAM)
            timings.update(_median_ms(slow, inputs, device, max(3, reps // 4), best))
            row = {
                "device": _device_name(device),
                "date": datetime.date.today().isoformat(),
                "version": extsub_kernels.__version__,
                "torch": torch.__version__,
                "implementation": implementation,
                "shape": list(shape),
                "dtype": dtype_name,
                "bytes_moved": moved,
                "ms": timings,
                "ms_best": best,
                "gbps": {k: moved / (v * 1e-3) / 1e9 for k, v in timings.items()},
                "compile_first_call_s": compile_first_s,
                "load_average_1min": [load_before, _load_average()],  # other work on the machine, before and after
            }
            if device == "cpu":
                row["minor_faults_per_call"] = {
                    name: _minor_faults_per_call(variants[name], inputs, 2 * copies) for name in ("ours", "eager")
                }
            rows.append(row)
            print(_format_row(row), flush=True)
            del inputs
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _format_row(row: dict) -> str:
    ms, gbps = row["ms"], row["gbps"]
    faults = row.get("minor_faults_per_call", {})
    cells = [
        f"{row['shape'][0]}×{row['shape'][1]}",
        row["dtype"],
        f"{ms['ours']:.2f}",
        f"{gbps['ours']:.1f}",
        f"{ms['ours'] / ms['copy']:.2f}×",
        f"{row['ms_best']['ours'] / row['ms_best']['copy']:.2f}×" if row.get("ms_best") else "–",
        f"{ms['copy']:.2f}",
        f"{ms['compile']:.2f}",
        f"{ms['compile'] / ms['ours']:.2f}×",
        f"{row['ms_best']['compile'] / row['ms_best']['ours']:.2f}×" if row.get("ms_best") else "–",
        f"{ms['eager']:.2f}",
        f"{ms['reference'] / ms['ours']:.1f}×",
        f"{ms['row_loop'] / ms['ours']:.0f}× ({ms['row_loop']:.0f} ms)" if "row_loop" in ms else "–",
        f"{faults['ours']:.1f} / {faults['eager']:.1f}" if faults else "–",
    ]
    return "| " + " | ".join(cells) + " |"


def render_markdown(rows: list[dict]) -> str:
    """The table derived from the JSON rows."""
    first = rows[0]
    head = (
        f"Device: {first['device']} · date {first['date']} · extsub {first['version']} · torch {first['torch']}\n"
        f"ours = backend='auto': {first.get('implementation', 'n/a')}\n\n"
        "| shape | dtype | ours ms | ours GB/s | ours / copy | (best) | copy ms | torch.compile ms "
        "| vs torch.compile | (best) | eager torch path ms | vs eager reference | vs authors' row loop "
        "| minor faults per call (ours / eager) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(_format_row(r) for r in rows) + "\n"


_COLD_START = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from bench_ext_sub import closed_form_
from extsub_kernels.ops import ext_sub_, cpu_backend
rows, cols, dtype = int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
p, m = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
start = time.perf_counter()
if sys.argv[5] == "compile":
    torch.compile(closed_form_, dynamic=False)(p, m, 1.0)
else:
    ext_sub_(p, m, 1.0)
print(time.perf_counter() - start, cpu_backend())
"""


def cold_start(shape: tuple[int, int], dtype_name: str, repeat: int) -> dict:
    """Seconds of the first call in a fresh process with empty caches: torch.compile's and the C++ kernel's."""
    found: dict[str, list[float]] = {"compile": [], "cpp": []}
    backend = ""
    for _ in range(repeat):
        for what in found:
            with tempfile.TemporaryDirectory(prefix="extsub-cold-") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "EXTSUB_CACHE_DIR": cache}
                env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
                args = [str(Path(__file__).parent), str(shape[0]), str(shape[1]), str(DTYPES[dtype_name]).split(".")[1]]
                done = subprocess.run(
                    [sys.executable, "-c", _COLD_START, *args, what],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds, line = done.stdout.strip().split(" ", 1)
                found[what].append(float(seconds))
                backend = line if what == "cpp" else backend
    return {
        "device": _device_name("cpu"),
        "date": datetime.date.today().isoformat(),
        "version": extsub_kernels.__version__,
        "torch": torch.__version__,
        "shape": list(shape),
        "dtype": dtype_name,
        "implementation": backend,
        "first_call_s": found,
    }


def render_ranges(runs: list[list[dict]]) -> str:
    """One table from several runs: for each (shape, dtype), each figure's lowest–highest value over the runs."""
    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for row in rows:
            by_key.setdefault((tuple(row["shape"]), row["dtype"]), []).append(row)

    def span(values: list[float], fmt: str, suffix: str = "") -> str:
        low, high = min(values), max(values)
        return f"{low:{fmt}}{suffix}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}–{high:{fmt}}{suffix}"

    first = runs[0][0]
    lines = [
        f"Device: {first['device']} · date {first['date']} · extsub {first['version']} · torch {first['torch']} · "
        f"{len(runs)} runs\nours = backend='auto': {first.get('implementation', 'n/a')}\n",
        "| shape | dtype | ours ms | ours / copy | (best) | copy ms | torch.compile ms | vs torch.compile | (best) "
        "| eager torch path ms | vs eager | vs eager reference | vs authors' row loop | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, dtype), rows in by_key.items():
        ms = [r["ms"] for r in rows]
        best = [r["ms_best"] for r in rows]
        loads = [x for r in rows for x in r.get("load_average_1min", []) if x is not None]
        cells = [
            f"{shape[0]}×{shape[1]}",
            dtype,
            span([m["ours"] for m in ms], ".2f"),
            span([m["ours"] / m["copy"] for m in ms], ".2f", "×"),
            span([b["ours"] / b["copy"] for b in best], ".2f", "×"),
            span([m["copy"] for m in ms], ".2f"),
            span([m["compile"] for m in ms], ".2f"),
            span([m["compile"] / m["ours"] for m in ms], ".2f", "×"),
            span([b["compile"] / b["ours"] for b in best], ".2f", "×"),
            span([m["eager"] for m in ms], ".2f"),
            span([m["eager"] / m["ours"] for m in ms], ".1f", "×"),
            span([m["reference"] / m["ours"] for m in ms], ".0f", "×"),
            span([m["row_loop"] / m["ours"] for m in ms if "row_loop" in m], ".0f", "×")
            if any("row_loop" in m for m in ms)
            else "–",
            span(loads, ".1f") if loads else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="comma-separated RxC")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per measurement (CPU)")
    parser.add_argument("--loop-shape", default="4096x4096", help="shape for the authors' row loop (CPU only)")
    parser.add_argument("--out-dir", type=Path, help="also write the rows (JSON) and their table (.md) here")
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=None,
        help="on a shared machine, start each row once the 1-minute load average is below this (each row records it)",
    )
    parser.add_argument("--quiet-timeout", type=float, default=600.0, help="longest wait for --quiet-load, seconds")
    parser.add_argument("--name", default=None, help="stem of the output files (default: op-<device>)")
    parser.add_argument(
        "--ranges", nargs="+", type=Path, default=None, help="print one table from these runs' JSON files and stop"
    )
    parser.add_argument("--cold-start", type=int, default=0, help="measure first calls with empty caches, N times")
    args = parser.parse_args()
    if args.ranges:
        print(render_ranges([json.loads(path.read_text()) for path in args.ranges]), end="")
        return
    if args.cold_start:
        row = cold_start(_parse_shape(args.shapes.split(",")[0]), args.dtypes.split(",")[0], args.cold_start)
        if args.out_dir:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / f"{args.name or 'op-cpu-cold-start'}.json").write_text(json.dumps(row, indent=1) + "\n")
        record("op-cold-start", [row], device="cpu")
        print(json.dumps(row["first_call_s"]), row["implementation"], "-> results.csv")
        return

    shapes = [_parse_shape(s) for s in args.shapes.split(",")]
    rows = bench(
        args.device,
        shapes,
        args.dtypes.split(","),
        args.reps,
        _parse_shape(args.loop_shape),
        args.quiet_load,
        args.quiet_timeout,
    )
    record("op", rows, device=args.device)
    print(render_markdown(rows))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"op-{_slug(args.device)}"
        (args.out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out_dir / f"{stem}.md").write_text(render_markdown(rows))
        print(f"wrote {args.out_dir / f'{stem}.json'} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
