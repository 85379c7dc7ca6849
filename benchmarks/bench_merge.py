"""Merge throughput and memory on synthetic LLaMA-13B-shaped checkpoints (issue 3's benchmark).

For 1, 2, 4 and 8 layers (hidden 5120, intermediate 13824, vocab 32000, bf16, one shard per
layer plus one for embeddings and head), four kinds of run over the same expert/anti pair,
each in its own subprocess so peak RSS is per run:

    plain-read    every input byte read once into a reused buffer (the I/O floor)
    merge         extsub_kernels.merge(expert, anti, out, stats=False), fsync included: the plain merge
    merge-report  the same merge with report=FILE: row statistics of every tensor from the op's own
                  pass (DESIGN.md §7), the model card's table, the JSON record written
    load-all      safetensors.torch.load_file on both, the op tensor by tensor, save_file, fsync

plain-read, merge and merge-report run --repeat times each, interleaved (so a busy machine slows
them alike), and the table shows the median and the range; the cost of --report is the median of
merge-report over the median of merge, minus one, in wall time and in CPU time (all threads of
the process, from the call to merge() to its return): on a machine shared with other work the
wall time of a run moves by tens of percent, its CPU time far less. load-all, much slower, runs
once for the --baseline-layers counts. The page cache is dropped
before every run when this process may (root on Linux), so each run reads from disk;
otherwise (or with --warm) the inputs are read once first and every run sees a warm cache.
Rows go to benchmarks/results/merge-<date>-<device>.json, the table to a .md beside them.
Checkpoints live in a temporary folder (removed at the end), never in the repository.
--output-dir puts the outputs of merge and load-all on another file system (e.g. a tmpfs) to
separate the cost of writing to the disk from the rest; its rows go to
merge-<date>-<device>-output-on-<fs type>.json.

    python benchmarks/bench_merge.py                                # 1, 2, 4, 8 layers (~10 min on 2 cores)
    python benchmarks/bench_merge.py --layers 1,2 --repeat 1        # a quicker look
    python benchmarks/bench_merge.py --baseline-layers 1,2,4,8      # load-all at every size too
    python benchmarks/bench_merge.py --output-dir /dev/shm          # outputs off the disk
    python benchmarks/bench_merge.py --layers 1,2 --repeat 5 --kinds merge,merge-report   # --report's cost
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from extsub_kernels.io import CheckpointWriter, TensorEntry

from _common import ROOT, environment, peak_rss_bytes

HIDDEN, INTERMEDIATE, VOCAB = 5120, 13824, 32000
DTYPE = torch.bfloat16
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}
OUTER_SHAPES = {
    "model.embed_tokens.weight": (VOCAB, HIDDEN),
    "model.norm.weight": (HIDDEN,),
    "lm_head.weight": (VOCAB, HIDDEN),
}
LARGEST_TENSOR_BYTES = VOCAB * HIDDEN * DTYPE.itemsize
READ_BUFFER = 32 << 20


# ------------------------------------------------------------------ synthetic checkpoints


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], pool: torch.Tensor, offset: int) -> int:
    """Stream tensors cut from a random pool (each at its own offset) into one shard; returns the next offset."""
    entries = [TensorEntry(name, DTYPE, shape) for name, shape in shapes.items()]
    with CheckpointWriter(path, entries, {"format": "pt"}) as writer:
        for entry in writer.order:
            n = entry.nbytes // DTYPE.itemsize
            start = offset % (pool.numel() - n)
            writer.write(entry.name, pool[start : start + n])
            offset += 7919 * 64 + n // 3
        writer.commit()
    return offset


def make_layer_shards(folder: Path, max_layers: int, seed: int) -> None:
    """Shards shared by every layer count: layer-XX.safetensors and outer.safetensors."""
    folder.mkdir(parents=True)
    # a random pool a little larger than the largest tensor; tensors are slices of it at different offsets
    pool = (0.02 * torch.randn(VOCAB * HIDDEN + (8 << 20), generator=torch.Generator().manual_seed(seed))).to(DTYPE)
    offset = _write_shard(folder / "outer.safetensors", OUTER_SHAPES, pool, seed)
    for layer in range(max_layers):
        shapes = {f"model.layers.{layer}.{name}": shape for name, shape in LAYER_SHAPES.items()}
        offset = _write_shard(folder / f"layer-{layer:02d}.safetensors", shapes, pool, offset)


def assemble(shards: Path, folder: Path, layers: int) -> int:
    """A checkpoint folder of `layers` layers: hard links to the shared shards and a Hugging Face index."""
    from extsub_kernels.io import read_header

    folder.mkdir(parents=True)
    names = ["outer.safetensors"] + [f"layer-{i:02d}.safetensors" for i in range(layers)]
    weight_map, total = {}, 0
    for i, name in enumerate(names):
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.link(shards / name, folder / shard)
        for key, info in read_header(folder / shard).tensors.items():
            weight_map[key] = shard
            total += info.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# ------------------------------------------------------------------ child runs (one process each)


def child_read(*folders: str) -> dict:
    buffer = memoryview(bytearray(READ_BUFFER))
    started, total = time.perf_counter(), 0
    for folder in folders:
        for path in sorted(Path(folder).glob("*.safetensors")):
            fd = os.open(path, os.O_RDONLY)
            try:
                while n := os.readv(fd, [buffer]):
                    total += n
            finally:
                os.close(fd)
    return {"seconds": time.perf_counter() - started, "bytes_read": total, "peak_rss_bytes": peak_rss_bytes()}


def child_merge(expert: str, anti: str, out: str, device: str, report: str | None = None) -> dict:
    from extsub_kernels import merge

    cpu_started = time.process_time()
    report = merge(expert, anti, out, lam=1.0, device=device, stats=report is not None, report=report)
    return {
        "cpu_seconds": time.process_time() - cpu_started,
        "seconds": report.seconds,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_written,
        "peak_rss_bytes": report.peak_rss_bytes,
        "peak_gpu_bytes": report.peak_gpu_bytes,
    }


def child_load_all(expert: str, anti: str, out: str, device: str) -> dict:
    from safetensors.torch import load_file, save_file

    from extsub_kernels import ext_sub_

    started = time.perf_counter()
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    e, a = {}, {}
    for folder, into in ((expert, e), (anti, a)):
        for path in sorted(Path(folder).glob("*.safetensors")):
            into.update(load_file(path, device=str(dev)))
    for name, t in e.items():
        ext_sub_(t, a[name], 1.0)
    Path(out).mkdir()
    save_file({k: v.cpu() for k, v in e.items()}, f"{out}/model.safetensors", metadata={"format": "pt"})
    fd = os.open(f"{out}/model.safetensors", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    peak_gpu = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": peak_gpu}


def child_idle() -> dict:
    """The floor under every RSS figure: Python with torch and extsub imported, nothing else."""
    import extsub_kernels  # noqa: F401

    return {"peak_rss_bytes": peak_rss_bytes()}


def child_merge_report(expert: str, anti: str, out: str, device: str) -> dict:
    """The merge with --report: the record goes beside OUT (it may not be inside it)."""
    return child_merge(expert, anti, out, device, report=f"{out}.report.json")


CHILDREN = {
    "plain-read": child_read,
    "merge": child_merge,
    "merge-report": child_merge_report,
    "load-all": child_load_all,
}
TIMED = ("plain-read", "merge", "merge-report")  # the kinds that run --repeat times, interleaved


# ------------------------------------------------------------------ the driver


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _run_child(kind: str, args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fs_type(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, fs = "", "unknown"
    path = str(path.resolve())
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            _, point, kind = line.split()[:3]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fs = point, kind
    return fs


def run(
    layer_counts: list[int],
    baseline_layers: list[int],
    repeat: int,
    device: str,
    workdir: Path,
    output_dir: Path,
    kinds: tuple[str, ...] = TIMED,
    warm: bool = False,
) -> list[dict]:
    """Rows for every run: each of `kinds` `repeat` times, interleaved (the disk's speed drifts), then
    load-all once where asked (it is the slow one)."""
    shards = {role: workdir / f"shards-{role}" for role in ("expert", "anti")}
    for seed, (_role, folder) in enumerate(shards.items()):
        make_layer_shards(folder, max(layer_counts), seed)
    cold = not warm and _drop_caches()
    idle_rss = _run_child("idle", [])["peak_rss_bytes"]
    on_gpu = torch.cuda.is_available() and device != "cpu"
    common = {
        **environment("cuda" if on_gpu else "cpu"),
        "cache": "cold" if cold else "warm",
        "idle_rss_bytes": idle_rss,
        "largest_tensor_bytes": LARGEST_TENSOR_BYTES,
        "output_fs": _fs_type(output_dir),
    }
    rows = []
    for layers in layer_counts:
        pair = {role: workdir / f"{role}-{layers}" for role in shards}
        input_bytes = sum(assemble(shards[role], pair[role], layers) for role in pair)
        runs = [(kind, rep) for rep in range(repeat) for kind in kinds]
        runs += [("load-all", 0)] if layers in baseline_layers else []
        for kind, rep in runs:
            out = output_dir / f"extsub-bench-out-{kind}-{layers}"
            args = [str(pair["expert"]), str(pair["anti"])] + ([] if kind == "plain-read" else [str(out), device])
            if not (cold and _drop_caches()):
                _run_child(
                    "plain-read", [str(pair["expert"]), str(pair["anti"])]
                )  # warm the cache the same way for every run
            result = _run_child(kind, args)
            shutil.rmtree(out, ignore_errors=True)
            Path(f"{out}.report.json").unlink(missing_ok=True)
            row = {
                **common,
                "layers": layers,
                "run": kind,
                "rep": rep,
                "input_bytes": input_bytes,
                **result,
                "gb_per_s": input_bytes / 1e9 / result["seconds"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        for folder in pair.values():
            shutil.rmtree(folder)
    return rows


def markdown(rows: list[dict]) -> str:
    """The table derived from the rows: per layer count and run, the median time of its repeats."""
    first = rows[0]
    lines = [
        f"{first['date']}, {first['device']}, torch {first['torch']}, "
        f"extsub {first.get('version', first.get('extsub'))}, {first['cache']} page cache, "
        f"outputs on {first.get('output_fs', 'the disk')}; bf16, "
        f"largest tensor {first['largest_tensor_bytes'] / 1e9:.2f} GB; Python + torch alone: "
        f"{first['idle_rss_bytes'] / 1e9:.2f} GB RSS.",
        "",
        "| layers | input GB | run | runs | seconds (median; range) | GB/s (input) | % of plain read "
        "| cost of --report | CPU s (median) | cost of --report, CPU | peak RSS GB | RSS / largest tensor "
        "| peak GPU GB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["layers"], r["run"]), []).append(r)
    median = {key: statistics.median(r["seconds"] for r in group) for key, group in groups.items()}
    cpu = {
        key: statistics.median(r["cpu_seconds"] for r in group)
        for key, group in groups.items()
        if all("cpu_seconds" in r for r in group)
    }
    for (layers, kind), group in groups.items():
        seconds = median[(layers, kind)]
        rate = group[0]["input_bytes"] / 1e9 / seconds
        read = median.get((layers, "plain-read"))
        of_read = f"{100 * read / seconds:.0f} %" if read else "–"
        plain = median.get((layers, "merge"))
        cost = f"{100 * (seconds / plain - 1):+.1f} %" if kind == "merge-report" and plain else "–"
        cpu_s = cpu.get((layers, kind))
        cpu_plain = cpu.get((layers, "merge"))
        cpu_cost = f"{100 * (cpu_s / cpu_plain - 1):+.1f} %" if kind == "merge-report" and cpu_s and cpu_plain else "–"
        rss = max(r["peak_rss_bytes"] for r in group)
        gpu = max((r.get("peak_gpu_bytes") or 0) for r in group)
        spread = (
            f"{min(r['seconds'] for r in group):.2f}–{max(r['seconds'] for r in group):.2f}" if len(group) > 1 else "–"
        )
        lines.append(
            f"| {layers} | {group[0]['input_bytes'] / 1e9:.2f} | {kind} | {len(group)} | {seconds:.2f}; {spread} | "
            f"{rate:.2f} | {of_read} | {cost} | {f'{cpu_s:.2f}' if cpu_s else '–'} | {cpu_cost} | "
            f"{rss / 1e9:.2f} | {rss / group[0]['largest_tensor_bytes']:.1f}× | "
            f"{f'{gpu / 1e9:.2f}' if gpu else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,2,4,8", help="layer counts, comma-separated")
    parser.add_argument("--baseline-layers", default="1,2", help="layer counts that also run load-all (slow)")
    parser.add_argument("--repeat", type=int, default=2, help="plain-read and merge runs per layer count")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--output-dir", type=Path, help="where merge and load-all write (default: beside the inputs)")
    parser.add_argument("--name", help="a suffix for the result files (merge-<date>-<device>-<name>.json)")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="read the inputs from the page cache in every run (compute and writes, not the disk's reads, then set "
        "the pace: the harshest setting for any added computation)",
    )
    parser.add_argument(
        "--kinds", default=",".join(TIMED), help=f"the runs repeated and interleaved (default {','.join(TIMED)})"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        print(json.dumps((CHILDREN | {"idle": child_idle})[args.child](*rest)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="extsub-bench-"))
    try:
        rows = run(
            _ints(args.layers),
            _ints(args.baseline_layers),
            args.repeat,
            args.device,
            workdir,
            args.output_dir or workdir,
            tuple(k for k in args.kinds.split(",") if k),
            args.warm,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for leftover in (
            args.output_dir.glob("extsub-bench-out-*") if args.output_dir else ()
        ):  # a run that failed midway
            shutil.rmtree(leftover, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    stem = (
        args.results / f"merge-{rows[0]['date']}-{tag}"
        if args.output_dir is None
        else args.results / f"merge-{rows[0]['date']}-{tag}-output-on-{rows[0]['output_fs']}"
    )
    if args.name:
        stem = stem.with_name(f"{stem.name}-{args.name}")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
