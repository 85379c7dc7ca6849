"""Time and memory of a merge of many tiny tensors (issue 13's scale target: 1 M tensors in under 60 s).

For each count (default 10k, 100k, 1M float32 tensors of 2 elements, named like a model's; 1M
makes ~100 MB headers, just under the format's limit), an expert and an anti-expert are written
to a temporary folder, then merged in a fresh subprocess per variant:

    extsub             extsub_kernels.merge(expert, anti, out): the whole command (headers, plan, stream, publish)
    baseline-tree      the same call from another checkout of the package (--baseline-tree; e.g. main before a change)
    per-tensor script  safetensors load_file of both, ext_sub per tensor in a Python loop, save_file
    load + save        safetensors load_file of the expert and save_file of it: no merge at all, the floor
                       of any script that loads the tensors

Each row records wall and CPU seconds and the subprocess's peak RSS. Every number goes to
benchmarks/results/results.csv (_common.record); the table derived from the rows is printed.

    python benchmarks/bench_many_tensors.py                               # 10k, 100k, 1M
    python benchmarks/bench_many_tensors.py --counts 200000 --baseline-tree /path/to/old/checkout
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, environment, record

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
variant, expert, anti, out = sys.argv[2:6]
import torch
from safetensors.torch import load_file, save_file
from extsub_kernels import ext_sub, merge
from extsub_kernels.engine.memory import peak_rss_bytes

wall, cpu = time.perf_counter(), time.process_time()
if variant in ("extsub", "baseline-tree"):
    merge(expert, anti, out, force=True)
elif variant == "per-tensor script":
    e, a = load_file(expert), load_file(anti)
    save_file({k: ext_sub(v, a[k], 1.0) if k in a else v for k, v in e.items()}, out)
else:
    save_file(load_file(expert), out)
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def write_model(path: Path, count: int, seed: int) -> None:
    """`count` float32 tensors of 2 elements, through the package's own writer (one run of bytes)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from extsub_kernels.io import CheckpointWriter, TensorEntry

    names = [f"model.layers.{i // 1000}.block.{i % 1000}.weight" for i in range(count)]
    entries = [TensorEntry(name, torch.float32, (2,)) for name in names]
    data = torch.randn(2 * count, generator=torch.Generator().manual_seed(seed))
    with CheckpointWriter(path, entries, {"format": "pt"}) as writer:
        writer.write(writer.order[0].name, data, last=writer.order[-1].name)
        writer.commit()


def run(variant: str, tree: Path, expert: Path, anti: Path, out: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), variant, str(expert), str(anti), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--baseline-tree", type=Path, help="another checkout of the package, run as 'baseline-tree'")
    parser.add_argument("--baseline-name", default="baseline-tree", help="what to call it in the results")
    parser.add_argument("--skip-script-above", type=int, default=1_000_000, help="no per-tensor script past this count")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for count in args.counts:
            expert, anti = folder / f"e{count}.safetensors", folder / f"a{count}.safetensors"
            write_model(expert, count, 1)
            write_model(anti, count, 2)
            variants = [("extsub", ROOT)]
            if args.baseline_tree is not None:
                variants.append((args.baseline_name, args.baseline_tree))
            if count <= args.skip_script_above:
                variants.append(("per-tensor script", ROOT))
            variants.append(("load + save", ROOT))
            for name, tree in variants:
                kind = "baseline-tree" if tree != ROOT else name
                result = run(kind, tree, expert, anti, folder / "out.safetensors")
                row = {"tensors": count, "variant": name, **result, **environment()}
                print(json.dumps(row), flush=True)
                rows.append(row)
            for p in folder.glob("*.safetensors"):
                p.unlink()
    record("many-tensors", recorded(rows), variant="variant")
    lines = ["| tensors | variant | wall s | CPU s | peak RSS, GB |", "|---|---|---|---|---|"]
    for r in rows:
        rss = r["peak_rss_bytes"] / 1e9
        lines.append(f"| {r['tensors']:,} | {r['variant']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {rss:.2f} |")
    print("\n".join(lines))


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: the tensor count as the shape."""
    return [{**r, "shape": f"{r['tensors']} tensors", "dtype": "fp32"} for r in rows]


if __name__ == "__main__":
    main()
