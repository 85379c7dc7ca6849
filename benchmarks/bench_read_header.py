"""Time and memory to read and validate safetensors headers of many tiny tensors (issue 13's scale target).

For each count (default 10k, 100k, 1M one-byte U8 tensors with names like a model's; 1M makes a
~96 MB header, just under the format's 100 MB limit), a file is written to a temporary folder and
read in a fresh subprocess three ways:

    read_header        extsub_kernels.io.read_header: parse and validate, TensorInfo per tensor
    reader             CheckpointReader([file]): the same, as the merge builds it
    safetensors keys   safe_open(file).keys(): the reference implementation's own parse (Rust)

Each row records wall and CPU seconds and the peak RSS above the subprocess's baseline (torch
and the package imported). Every number goes to benchmarks/results/results.csv (_common.record);
the table derived from the rows is printed.

    python benchmarks/bench_read_header.py                      # 10k, 100k, 1M (~1 min on 2 cores)
    python benchmarks/bench_read_header.py --counts 200000
"""

import argparse
import datetime
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("read_header", "reader", "safetensors keys")


def write_header_file(path: Path, count: int) -> int:
    """`count` one-byte tensors in one file; returns the header's size in bytes."""
    entries = ",".join(
        f'"model.layers.{i // 1000}.block.{i % 1000}.w":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
        for i in range(count)
    )
    raw = ("{" + entries + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(count))
    return len(raw)


def child(kind: str, path: str) -> dict:
    import resource
    import time

    from safetensors import safe_open

    from extsub_kernels.io import CheckpointReader, read_header
    from extsub_kernels.io.format import readable_dtypes

    readable_dtypes()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    if kind == "read_header":
        n = len(read_header(path).tensors)
    elif kind == "reader":
        n = len(CheckpointReader([path]))
    else:
        with safe_open(path, "pt") as f:
            n = len(f.keys())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tensors": n,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_above_base_mb": round((peak - base) / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10000,100000,1000000", help="tensor counts, comma-separated")
    args = parser.parse_args()
    import torch

    from extsub_kernels import __version__

    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(c) for c in args.counts.split(",")):
            path = Path(tmp) / f"{count}.safetensors"
            header_bytes = write_header_file(path, count)
            for kind in KINDS:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(path)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = {
                    "kind": kind,
                    "count": count,
                    "header_mb": round(header_bytes / 1e6, 1),
                    **json.loads(done.stdout),
                }
                row |= {
                    "date": datetime.date.today().isoformat(),
                    "device": "cpu",
                    "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "extsub": __version__,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    from _common import record  # here, not at the top: the children measure their own imports

    record("read-header", recorded(rows), variant="kind")
    lines = ["| tensors | header MB | kind | wall s | CPU s | peak RSS above base, MB |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['count']:,} | {r['header_mb']} | {r['kind']} | {r['wall_s']} | {r['cpu_s']} "
        f"| {r['peak_rss_above_base_mb']} |"
        for r in rows
    ]
    print("\n".join(lines))


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: the tensor count as the shape."""
    return [{**r, "shape": f"{r['count']} tensors"} for r in rows]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
