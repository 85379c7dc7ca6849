"""Points per hour of a λ scan with 1 worker (the one-device scan, no Ray) and with N Ray workers, on one machine.

The inputs of bench_scan.py (a small LLaMA-shaped model, random weights, a LoRA pair, 200 + 200 pre-tokenised
KEEP/FORGET examples); the grid 0:2:0.2 over ext-sub and sub (21 points). Each run (`--runs WORKERS:THREADS`,
THREADS the torch threads in all, split between the workers) is a fresh process, so that each pays its own imports
and Ray start-up as a user would. Points per hour are counted over the wall time of the whole `scan()` call
(start-up and model loads included) and over the measuring alone (wall − the slowest load: the workers load
together). Runs of one day are collected in one file, benchmarks/results/scan-workers-<date>-cpu.json.

    python benchmarks/bench_scan_workers.py --runs 1:1 1:2 2:2
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import RESULTS, environment

GRID, METHODS = "0:2:0.2", "ext-sub,sub"


def run_variant(workdir: Path, workers: int, threads: int) -> dict:
    """One scan with `workers` workers over the inputs in `workdir` (made by bench_scan.make_inputs)."""
    from extsub_kernels import scan

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = scan(
            workdir / "expert",
            workdir / "anti",
            base=workdir / "base",
            keep=workdir / "keep.jsonl",
            forget=workdir / "forget.jsonl",
            lam=GRID,
            method=METHODS,
            device="cpu",
            threads=threads,
            workers=workers,
        )
    wall = time.perf_counter() - start
    measuring = wall - result.timing["load_seconds"]
    return {
        "workers": workers,
        "threads_total": threads,
        "points": len(result),
        "wall_seconds": wall,
        "load_seconds": result.timing["load_seconds"],
        "points_per_hour": 3600 * len(result) / wall,
        "points_per_hour_measuring": 3600 * len(result) / measuring,
        "eval_seconds_total": result.timing["eval_seconds_total"],
        "rows": [(r.method, r.lam, r.keep_nll, r.forget_nll, r.attempts) for r in result],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["1:1", "1:2", "2:2"], help="WORKERS:THREADS (threads in all)")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="recorded with the results (e.g. how loaded the machine was)")
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.inputs, args.variant, args.threads)))
        return
    from bench_scan import make_inputs

    record = environment("cpu") | {"benchmark": "scan-workers", "grid": GRID, "methods": METHODS}
    path = RESULTS / f"scan-workers-{record['date']}-cpu.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(Path(tmp), "lora", "small")
        for run in args.runs:
            workers, threads = run.split(":")
            command = [sys.executable, __file__, "--variant", workers, "--threads", threads, "--inputs", tmp]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]) | {"note": args.note})
            print(f"{run}: {runs[-1]['points_per_hour']:.0f} points/h", file=sys.stderr)
    path.write_text(json.dumps(record | {"runs": runs}, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
