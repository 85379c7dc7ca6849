"""What the row statistics of --report cost the op (docs/design.md §7), measured side by side on LLaMA layer shapes.

Three variants over the same inputs, taking turns call by call (so a busy machine slows them alike):

    op              ext_sub_(p, m, λ): the plain merge's work per block
    op + row sums   ext_sub_(p, m, λ, row_stats=buf): the same pass handing back |p|², |m|², p·m per row
    separate pass   row_products(p, m) then ext_sub_(p, m, λ): the statistics as a second pass, the baseline

p is restored from a copy before every call, outside the timed region. The cost is the median
(and the fastest) time of each variant over that of the op, minus one. On CPU the op runs
on one thread, as the merge engine does on a 2-core machine, with what backend="auto" picks
there (the C++ kernel, or the eager torch path; each row names it).

    python benchmarks/bench_row_stats.py                      # all shapes, bf16 and fp32, 15 calls each
    python benchmarks/bench_row_stats.py --reps 31 --shapes 4096x4096

Every number goes to benchmarks/results/results.csv (_common.record); the table derived from the rows
is printed, and with --results DIR the rows go to DIR/row-stats-<date>-<device>[-<tag>].json too.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from extsub_kernels.ops import ext_sub_, op_backend, row_products

from _common import environment, record, save_rows

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAM = 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shape: tuple[int, int], dtype: torch.dtype, reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each variant, `reps` calls each, interleaved."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    p0 = (0.02 * torch.randn(shape, generator=generator)).to(device, dtype)
    m = (0.02 * torch.randn(shape, generator=generator)).to(device, dtype)
    p = p0.clone()
    sums = torch.empty(shape[0], 3, dtype=torch.float64, device=device)
    variants = {
        "op": lambda: ext_sub_(p, m, LAM),
        "op + row sums": lambda: ext_sub_(p, m, LAM, row_stats=sums),
        "separate pass": lambda: (row_products(p, m, out=sums), ext_sub_(p, m, LAM)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps + 1):
        for name, call in variants.items():
            p.copy_(p0)
            _sync(device)
            started = time.perf_counter()
            call()
            _sync(device)
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return times


def markdown(rows: list[dict]) -> str:
    """The table derived from the rows: per shape and dtype, each variant's median and fastest time and its cost."""
    first = rows[0]
    lines = [
        f"{first['date']}, {first['device']}, torch {first['torch']}, extsub {first['version']}, "
        f"{first['threads']} thread(s), {first['reps']} calls per variant, interleaved; λ = {LAM}; "
        f"op: {first.get('op_backend', 'torch: eager torch ops')}.",
        "",
        "| shape | dtype | variant | median ms | fastest ms | cost (median) | cost (fastest) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        base_median, base_best = row["op"]["median_ms"], row["op"]["fastest_ms"]
        for name in ("op", "op + row sums", "separate pass"):
            stats = row[name]
            cost = "–" if name == "op" else f"{100 * (stats['median_ms'] / base_median - 1):+.1f} %"
            best = "–" if name == "op" else f"{100 * (stats['fastest_ms'] / base_best - 1):+.1f} %"
            lines.append(
                f"| {row['shape']} | {row['dtype']} | {name} | {stats['median_ms']:.2f} | {stats['fastest_ms']:.2f} | "
                f"{cost} | {best} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the engine's on 2 cores: 1)")
    parser.add_argument("--results", type=Path, help="also write the rows (JSON) and their table (.md) here")
    parser.add_argument("--tag", default="", help="a suffix for the result files")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    for text in args.shapes.split(","):
        shape = tuple(int(x) for x in text.split("x"))
        for label, dtype in DTYPES.items():
            times = measure(shape, dtype, args.reps, device)
            row = {**environment(str(device)), "reps": args.reps, "shape": text, "dtype": label}
            row["op_backend"] = op_backend(device)
            for name, values in times.items():
                row[name] = {
                    "median_ms": 1e3 * statistics.median(values),
                    "fastest_ms": 1e3 * min(values),
                    "ms": [1e3 * v for v in values],
                }
            row["load_average"] = list(_load_average())
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in times}), flush=True)
    record("row-stats", recorded(rows), device=str(device))
    print(markdown(rows))
    save_rows(
        args.results,
        f"row-stats-{rows[0]['date']}-{device.type}{'-' + args.tag if args.tag else ''}",
        rows,
        markdown(rows),
    )


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: each variant's median and fastest milliseconds ("median_ms.op")."""
    variants = ("op", "op + row sums", "separate pass")
    measures = ("median_ms", "fastest_ms")
    return [
        {"shape": r["shape"], "dtype": r["dtype"], **{m: {v: r[v][m] for v in variants} for m in measures}}
        for r in rows
    ]


def _load_average() -> tuple[float, ...]:
    """The machine's load averages over 1, 5 and 15 minutes (empty where unknown): how busy it was."""
    try:
        return os.getloadavg()
    except OSError:
        return ()


if __name__ == "__main__":
    main()
