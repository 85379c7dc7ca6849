"""Dense merge against its I/O floor and mergekit, on synthetic LLaMA-shaped models with a base (issue 14's benchmark).

Three bf16 models — base θ₀, expert θ⁺ and anti-expert θ⁻ — of the shape in issue 14 (hidden
2048, intermediate 5632, 32 heads, vocab 32000; 1.08 GB per model at 8 layers), or LLaMA-13B
shapes with --model llama-13b, one shard per layer plus one for embeddings and head, with a
config.json. Every run is its own process (peak RSS is the process's VmHWM); the runs of one
layer count take turns (floor, ours, mergekit, floor, ...) so a machine that drifts slows all
of them alike:

    floor        a plain read of the three inputs into a reused buffer while a second thread writes the
                 output's size and fsyncs it: the I/O the merge cannot avoid, overlapped as the merge
                 overlaps it (results before 2026-12-07 read first, then wrote)
    sub          extsub_kernels.merge(expert, anti, out, base=base, method="sub", lam=0.6, stats=False)
    ext-sub      the same with method="ext-sub" (the Ext-Sub merge)
    ext-sub+report
                 the Ext-Sub merge with report=FILE (beside OUT): row statistics of every tensor from
                 the merge's own passes (docs/design.md §7), the model card's table, the JSON record; what
                 a folder OUT gets by default. Its "--report cost" is its median over ext-sub's, − 1,
                 in wall and in CPU time (CPU moves far less than wall on a shared machine)
    mergekit     mergekit's task_arithmetic (normalize: false, dtype: float32, out_dtype: bfloat16),
                 base + 1.0·(θ⁺ − θ₀) − 0.6·(θ⁻ − θ₀): the formula of `sub`; its output is fsynced
                 and the fsync counted, as ours is (run only where mergekit is installed)

Each run reports wall seconds of the work itself (imports excluded), peak RSS, the minor and
major page faults and CPU time the work took (getrusage of the process, before and after),
and the 1-minute load average before it (how quiet the machine was). With --cache cold the
page cache is dropped before every run (needs root); with warm the inputs are read once before
every run. After the runs of a layer count, the largest |difference| between mergekit's output
and ours under `sub` is measured tensor by tensor.

--device cuda runs the merges on the GPU (mergekit with its --cuda) and adds each run's peak GPU
memory (torch's max_memory_allocated) against the largest tensor; the floor stays the disk's.

--before DIR adds runs of `sub` and `ext-sub` with the extsub_kernels of another checkout DIR
(e.g. the code before a change), and --blocks 32MiB runs them with other block sizes than the
default ("sub [32MiB]"), all taking turns with the others. --long-row-gib G instead merges
two one-tensor checkpoints, a 1-D float32 tensor of G GiB each (one row longer than any block),
and checks the output against the op applied to the whole tensor in memory.

Every number goes to benchmarks/results/results.csv (medians of the repeats; _common.record) and
the table derived from the rows is printed; with --results DIR, the rows themselves go to
DIR/merge-<date>-<device>[-<tag>].json and the table to a .md beside them. Checkpoints live in a
temporary folder (removed at the end), never in the repository.

    python benchmarks/bench_merge.py                                   # 8 layers, warm and cold, 3 runs each
    python benchmarks/bench_merge.py --layers 2,4,8,16,32 --runs sub --cache warm --repeat 2 --tag flat
    python benchmarks/bench_merge.py --layers 2 --repeat 1             # a quick look
    python benchmarks/bench_merge.py --long-row-gib 1 --repeat 2 --tag long-row
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (
    CODE,
    ROOT,
    environment,
    peak_rss_bytes,
    record,
    save_rows,
)  # puts the checkout to measure first on sys.path

# isort: split
from extsub_kernels.io import CheckpointReader, CheckpointWriter, TensorEntry, read_header

MODELS = {
    # issue 14's model: LLaMA-shaped, hidden 2048 (TinyLlama's width, full-width k/v), 1.08 GB at 8 layers
    "llama-2048": {"hidden": 2048, "intermediate": 5632, "heads": 32, "vocab": 32000},
    "llama-13b": {"hidden": 5120, "intermediate": 13824, "heads": 40, "vocab": 32000},
}
DTYPE = torch.bfloat16
LAM = 0.6
DEVICE = os.environ.get("EXTSUB_BENCH_DEVICE", "cpu")  # where the merges run (--device; set for the children)
READ_BUFFER = 32 << 20
RUNS = ("floor", "sub", "ext-sub", "ext-sub+report", "mergekit")
REPORTED = "ext-sub+report"  # the run whose cost over "ext-sub" the table shows


def layer_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    h, i = model["hidden"], model["intermediate"]
    return {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }


def outer_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    h, v = model["hidden"], model["vocab"]
    return {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}


def largest_tensor_bytes(model: dict) -> int:
    return model["vocab"] * model["hidden"] * DTYPE.itemsize


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


def make_layer_shards(folder: Path, model: dict, max_layers: int, seed: int) -> None:
    """Shards shared by every layer count: layer-XX.safetensors and outer.safetensors."""
    folder.mkdir(parents=True)
    size = model["vocab"] * model["hidden"] + (8 << 20)
    pool = (0.02 * torch.randn(size, generator=torch.Generator().manual_seed(seed))).to(DTYPE)
    offset = _write_shard(folder / "outer.safetensors", outer_shapes(model), pool, seed)
    for layer in range(max_layers):
        shapes = {f"model.layers.{layer}.{name}": shape for name, shape in layer_shapes(model).items()}
        offset = _write_shard(folder / f"layer-{layer:02d}.safetensors", shapes, pool, offset)


def model_config(model: dict, layers: int) -> dict:
    """A LlamaForCausalLM config.json for the synthetic model (mergekit reads the architecture from it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model["hidden"],
        "intermediate_size": model["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": model["heads"],
        "num_key_value_heads": model["heads"],
        "vocab_size": model["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def assemble(shards: Path, folder: Path, model: dict, layers: int) -> int:
    """A model folder of `layers` layers: hard links to the shared shards, an index, a config; returns its bytes."""
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
    (folder / "config.json").write_text(json.dumps(model_config(model, layers), indent=2))
    return total


# ------------------------------------------------------------------ child runs (one process each)


class Usage:
    """getrusage of this process between `start` and `stop`: faults and CPU seconds of the work measured."""

    def __enter__(self) -> "Usage":
        self.before = resource.getrusage(resource.RUSAGE_SELF)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.fields = {
            "seconds": self.seconds,
            "minor_faults": after.ru_minflt - self.before.ru_minflt,
            "major_faults": after.ru_majflt - self.before.ru_majflt,
            "user_s": after.ru_utime - self.before.ru_utime,
            "system_s": after.ru_stime - self.before.ru_stime,
        }


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _fsync_folder(folder: Path) -> None:
    for path in _weights(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def child_floor(out: str, output_bytes: str, *inputs: str) -> dict:
    """Read every input byte once into a reused buffer while a second thread writes `output_bytes` bytes and fsyncs
    them: the I/O a streaming merge cannot avoid, overlapped as the merge overlaps it (read ∥ write)."""
    import threading

    read_buffer = memoryview(bytearray(READ_BUFFER))
    write_buffer = memoryview(bytearray(READ_BUFFER))
    errors: list[BaseException] = []

    def write() -> None:
        try:
            left = int(output_bytes)
            fd = os.open(Path(out) / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                while left:
                    left -= os.write(fd, write_buffer[: min(left, len(write_buffer))])
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    with Usage() as usage:
        Path(out).mkdir()
        writer = threading.Thread(target=write)
        writer.start()
        total = 0
        for folder in inputs:
            for path in _weights(Path(folder)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    while n := os.readv(fd, [read_buffer]):
                        total += n
                finally:
                    os.close(fd)
        writer.join()
    if errors:
        raise errors[0]
    return {**usage.fields, "bytes_read": total, "peak_rss_bytes": peak_rss_bytes()}


def child_extsub(
    method: str, out: str, expert: str, anti: str, base: str, block: str = "", *, record: bool = False
) -> dict:
    import inspect

    from extsub_kernels import merge, ops
    from extsub_kernels.engine.options import parse_size

    sized = {"block_bytes": parse_size(block)} if block else {}  # (code before 14 knows no block_bytes=None)
    if record:
        sized["report"] = f"{out}.report.json"  # beside OUT: a record may not be inside it
    elif "stats" in inspect.signature(merge).parameters:
        sized["stats"] = False  # a folder OUT gathers statistics for its model card unless told not to
    with Usage() as usage:
        report = merge(expert, anti, out, base=base, lam=LAM, method=method, device=DEVICE, **sized)
    Path(f"{out}.report.json").unlink(missing_ok=True)
    backend = ops.cpu_backend() if hasattr(ops, "cpu_backend") else "torch: eager torch ops"
    return {
        **usage.fields,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_written,
        "peak_rss_bytes": peak_rss_bytes(),
        **_gpu_peak(),
        "cpu_backend": backend,
    }


def _gpu_peak() -> dict:
    """The process's peak GPU memory allocated by torch, on a CUDA run."""
    if not DEVICE.startswith("cuda"):
        return {}
    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated(DEVICE)}


def child_long_row(out: str, expert: str, anti: str) -> dict:
    from extsub_kernels import merge, ops

    with Usage() as usage:
        report = merge(expert, anti, out, lam=LAM, device=DEVICE)
    backend = ops.cpu_backend() if hasattr(ops, "cpu_backend") else "torch: eager torch ops"
    fields = {**usage.fields, "bytes_read": report.bytes_read, "peak_rss_bytes": peak_rss_bytes(), **_gpu_peak()}
    return {**fields, "cpu_backend": backend}


def child_check_long_row(out: str, expert: str, anti: str) -> dict:
    """The largest |merged − op on the whole tensor| / max |op| (the whole row in memory, as the merge avoids)."""
    from safetensors.torch import load_file

    from extsub_kernels import ext_sub_

    expected = ext_sub_(load_file(expert)["row"], load_file(anti)["row"], LAM)
    merged = load_file(out)["row"]
    diff = float((merged - expected).abs().max())
    return {"max_abs_diff": diff, "max_abs": float(expected.abs().max()), "elements": expected.numel()}


def mergekit_config(expert: str, anti: str, base: str) -> dict:
    """task_arithmetic with the formula of --method sub: θ₀ + 1.0·(θ⁺ − θ₀) − λ·(θ⁻ − θ₀), float32 math."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": expert, "parameters": {"weight": 1.0}},
            {"model": anti, "parameters": {"weight": -LAM}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def child_mergekit(out: str, expert: str, anti: str, base: str) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(mergekit_config(expert, anti, base))
    cuda = DEVICE.startswith("cuda")
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, cuda=cuda)
    with Usage() as usage:
        run_merge(config, out, options=options)
        _fsync_folder(Path(out))
    return {**usage.fields, "peak_rss_bytes": peak_rss_bytes()}


def child_idle(kind: str) -> dict:
    """The floor under every RSS figure: Python with the tool imported, nothing else."""
    if kind == "mergekit":
        import mergekit.merge  # noqa: F401
    else:
        import extsub_kernels  # noqa: F401
    return {"peak_rss_bytes": peak_rss_bytes()}


def child_compare(ours: str, theirs: str) -> dict:
    """The largest |ours − theirs| over every tensor, read one tensor at a time (both outputs bf16)."""
    mine = CheckpointReader(_weights(Path(ours)), label="ours")
    other = CheckpointReader(_weights(Path(theirs)), label="mergekit")
    largest, where, differing, total = 0.0, "", 0, 0
    try:
        if sorted(mine.keys()) != sorted(other.keys()):
            raise RuntimeError(f"the outputs hold different tensors: {sorted(set(mine.keys()) ^ set(other.keys()))}")
        for name in mine:
            a, b = mine.read(name).float(), other.read(name).float()
            diff = (a - b).abs()
            differing += int((diff > 0).sum())
            total += diff.numel()
            top = float(diff.max()) if diff.numel() else 0.0
            if top > largest:
                largest, where = top, name
    finally:
        mine.close()
        other.close()
    return {"max_abs_diff": largest, "max_abs_diff_tensor": where, "elements_differing": differing, "elements": total}


CHILDREN = {
    "floor": child_floor,
    "long-row": child_long_row,
    "check-long-row": child_check_long_row,
    "sub": lambda *a: child_extsub("sub", *a),
    "ext-sub": lambda *a: child_extsub("ext-sub", *a),
    "ext-sub+report": lambda *a: child_extsub("ext-sub", *a, record=True),
    "mergekit": child_mergekit,
    "idle": child_idle,
    "compare": child_compare,
}


# ------------------------------------------------------------------ the driver


def drop_caches() -> bool:
    """Empty the page cache (root on Linux); False where this process may not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(folders: list[Path]) -> None:
    buffer = memoryview(bytearray(READ_BUFFER))
    for folder in folders:
        for path in _weights(folder):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def run_child(kind: str, args: list[str], code: Path | None = None) -> dict:
    """Run one child in a fresh process (with the extsub_kernels of checkout `code` when given)."""
    cmd = [sys.executable, __file__, "--child", kind, *args]
    env = {**os.environ, "EXTSUB_BENCH_CODE": str(code or CODE)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mergekit_installed() -> bool:
    done = subprocess.run([sys.executable, "-c", "import mergekit.merge"], capture_output=True)
    return done.returncode == 0


BEFORE = " (before)"  # suffix of the runs with the extsub_kernels of --before


def _child_of(kind: str) -> str:
    """The child a run label runs: "sub (before)" and "sub [32MiB]" run "sub"."""
    return kind.removesuffix(BEFORE).split(" [")[0]


def _block_of(kind: str) -> list[str]:
    """The block size a run label asks for, as the child's extra argument ("sub [32MiB]" → ["32MiB"])."""
    return [kind.split(" [")[1].rstrip("]")] if " [" in kind else []


def _folder_name(kind: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in kind)


def run(
    model_name: str,
    layer_counts: list[int],
    kinds: list[str],
    caches: list[str],
    repeat: int,
    workdir: Path,
    before: Path | None,
) -> list[dict]:
    """Rows of every run: per layer count and cache, `repeat` rounds in which each kind runs once, in turn."""
    model = MODELS[model_name]
    roles = ("base", "expert", "anti")
    shards = {role: workdir / f"shards-{role}" for role in roles}
    for seed, role in enumerate(roles):
        make_layer_shards(shards[role], model, max(layer_counts), seed)
    common = _common_fields(model_name, largest_tensor_bytes(model), "mergekit" in kinds, before)
    rows = []
    for layers in layer_counts:
        folders = {role: workdir / f"{role}-{layers}" for role in roles}
        input_bytes = sum(assemble(shards[role], folders[role], model, layers) for role in roles)
        output_bytes = input_bytes // 3
        kept: dict[str, Path] = {}
        for cache in caches:
            for rep in range(repeat):
                for kind in kinds:
                    out = workdir / f"out-{_folder_name(kind)}-{layers}-{cache}-{rep}"
                    args = [str(out)]
                    if kind == "floor":
                        args += [str(output_bytes)] + [str(folders[r]) for r in roles]
                    else:
                        args += [str(folders["expert"]), str(folders["anti"]), str(folders["base"])]
                        args += _block_of(kind)
                    fields = _timed_child(kind, args, cache, list(folders.values()), before)
                    row = {**common, "layers": layers, "input_bytes": input_bytes, "output_bytes": output_bytes}
                    rows.append({**row, "cache": cache, "run": kind, "rep": rep, **fields})
                    print(json.dumps(rows[-1]), flush=True)
                    if kind in ("sub", "mergekit") and kind not in kept:
                        kept[kind] = out
                    else:
                        shutil.rmtree(out, ignore_errors=True)
        if {"sub", "mergekit"} <= set(kept):
            diff = run_child("compare", [str(kept["sub"]), str(kept["mergekit"])])
            rows.append({**common, "layers": layers, "run": "compare sub vs mergekit", **diff})
            print(json.dumps(rows[-1]), flush=True)
        for path in [*kept.values(), *folders.values()]:
            shutil.rmtree(path, ignore_errors=True)
    return rows


def _common_fields(model: str, largest: int, mergekit: bool, before: Path | None) -> dict:
    common = {
        **environment(DEVICE),
        "model": model,
        "lam": LAM,
        "idle_rss_bytes": run_child("idle", ["extsub"])["peak_rss_bytes"],
        "largest_tensor_bytes": largest,
    }
    if mergekit:
        common["mergekit_idle_rss_bytes"] = run_child("idle", ["mergekit"])["peak_rss_bytes"]
    if before is not None:
        common["before_code"] = before.name
    return common


def _timed_child(kind: str, args: list[str], cache: str, inputs: list[Path], before: Path | None) -> dict:
    """One run in its own process, after emptying or warming the page cache; the load average before it."""
    if cache == "cold":
        if not drop_caches():
            raise RuntimeError("--cache cold needs root: /proc/sys/vm/drop_caches is not writable")
    else:
        warm(inputs)
    load = os.getloadavg()[0]
    result = run_child(_child_of(kind), args, before if BEFORE in kind else None)
    return {"load_1min_before": load, **result}


def run_long_row(gib: float, caches: list[str], repeat: int, workdir: Path, before: Path | None) -> list[dict]:
    """Merge two checkpoints of one 1-D float32 tensor of `gib` GiB each, and check the output against the op."""
    n = int(gib * 2**30) // 4
    paths = {}
    for seed, role in enumerate(("expert", "anti")):
        paths[role] = workdir / f"{role}.safetensors"
        row = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        with CheckpointWriter(paths[role], [TensorEntry("row", torch.float32, (n,))], {"format": "pt"}) as writer:
            writer.write("row", row)
            writer.commit()
        del row
    common = {**_common_fields("one 1-D float32 tensor", 4 * n, False, before), "input_bytes": 8 * n}
    kinds = ["long-row"] + (["long-row" + BEFORE] if before is not None else [])
    rows = []
    for cache in caches:
        for rep in range(repeat):
            for kind in kinds:
                out = workdir / f"out-{rep}{'-before' if BEFORE in kind else ''}.safetensors"
                args = [str(out), str(paths["expert"]), str(paths["anti"])]
                fields = _timed_child(kind, args, cache, [workdir], before)
                rows.append({**common, "layers": 0, "cache": cache, "run": kind, "rep": rep, **fields})
                print(json.dumps(rows[-1]), flush=True)
                if rep == 0:
                    check = run_child("check-long-row", args)
                    rows.append({**common, "layers": 0, "run": f"check {kind} vs the op on the whole tensor", **check})
                    print(json.dumps(rows[-1]), flush=True)
                out.unlink(missing_ok=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The tables derived from the rows: per layer count, cache and run, medians of the repeats and ratios."""
    first = rows[0]
    idle = f"Python + torch + extsub alone: {first['idle_rss_bytes'] / 1e9:.2f} GB RSS"
    if "mergekit_idle_rss_bytes" in first:
        idle += f"; Python + mergekit alone: {first['mergekit_idle_rss_bytes'] / 1e9:.2f} GB"
    before = f"; '(before)' runs: the code of {first['before_code']}" if "before_code" in first else ""
    lines = [
        f"{first['date']}, {first['device']}, torch {first['torch']}, extsub {first['version']}; model "
        f"{first['model']}, λ = {first['lam']}; largest tensor {first['largest_tensor_bytes'] / 1e9:.3f} GB; "
        f"{idle}{before}.",
        "",
        "| layers | input GB | cache | run | runs | seconds (median; range) | × floor | mergekit ÷ this "
        "| before ÷ this | --report cost (wall; CPU) | peak RSS GB (max) | RSS / largest tensor "
        "| peak GPU GB (max) | GPU / largest tensor | minor faults / GB in | user + sys s | load before |",
        "|---:|---:|---|---|" + "---:|" * 13,
    ]
    groups: dict[tuple[int, str, str], list[dict]] = {}
    for r in rows:
        if "seconds" in r:
            groups.setdefault((r["layers"], r["cache"], r["run"]), []).append(r)
    median = {key: statistics.median(r["seconds"] for r in group) for key, group in groups.items()}
    cpu_median = {key: statistics.median(r["user_s"] + r["system_s"] for r in group) for key, group in groups.items()}
    for (layers, cache, kind), group in groups.items():
        seconds = median[(layers, cache, kind)]
        floor = median.get((layers, cache, "floor"))
        mergekit = median.get((layers, cache, "mergekit")) if kind != "mergekit" else None
        earlier = median.get((layers, cache, kind + BEFORE))
        spread = f"{min(r['seconds'] for r in group):.2f}–{max(r['seconds'] for r in group):.2f}"
        rss = max(r["peak_rss_bytes"] for r in group)
        faults = statistics.median(r["minor_faults"] for r in group) / (group[0]["input_bytes"] / 1e9)
        cpu = cpu_median[(layers, cache, kind)]
        plain, plain_cpu = median.get((layers, cache, "ext-sub")), cpu_median.get((layers, cache, "ext-sub"))
        cost = (
            f"{100 * (seconds / plain - 1):+.0f} %; {100 * (cpu / plain_cpu - 1):+.0f} %"
            if kind == REPORTED and plain and plain_cpu
            else "–"
        )
        loads = f"{min(r['load_1min_before'] for r in group):.1f}–{max(r['load_1min_before'] for r in group):.1f}"
        gpus = [r["peak_gpu_bytes"] for r in group if "peak_gpu_bytes" in r]
        gpu = f"{max(gpus) / 1e9:.2f} | {max(gpus) / first['largest_tensor_bytes']:.1f}×" if gpus else "n/a | n/a"
        lines.append(
            f"| {layers} | {group[0]['input_bytes'] / 1e9:.2f} | {cache} | {kind} | {len(group)} | "
            f"{seconds:.2f}; {spread} | {f'{seconds / floor:.2f}×' if floor else '–'} | "
            f"{f'{mergekit / seconds:.2f}×' if mergekit and kind != 'floor' else '–'} | "
            f"{f'{earlier / seconds:.2f}×' if earlier else '–'} | {cost} | {rss / 1e9:.2f} | "
            f"{rss / first['largest_tensor_bytes']:.1f}× | {gpu} | {faults:,.0f} | {cpu:.1f} | {loads} |"
        )
    compared = [r for r in rows if "max_abs_diff" in r]
    if compared:
        lines += ["", "| layers | comparison | largest abs difference | where / of | elements differing |"]
        lines += ["|---:|---|---:|---|---:|"]
        for r in compared:
            where = r.get("max_abs_diff_tensor") or f"max |op| {r['max_abs']:.3g}"
            differing = f"{r['elements_differing']:,} of {r['elements']:,}" if "elements_differing" in r else "–"
            lines.append(f"| {r['layers']} | {r['run']} | {r['max_abs_diff']:.3g} | {where} | {differing} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-2048")
    parser.add_argument("--layers", default="8", help="layer counts, comma-separated")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"runs to take turns, from {', '.join(RUNS)}")
    parser.add_argument("--cache", default="warm,cold", help="page cache before each run: warm, cold or both")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind per layer count and cache")
    parser.add_argument("--before", type=Path, help="another checkout: its sub and ext-sub take turns with ours")
    parser.add_argument("--blocks", default="", help="block sizes (e.g. 32MiB) to run sub and ext-sub with as well")
    parser.add_argument("--long-row-gib", type=float, help="merge one 1-D tensor of this many GiB instead of models")
    parser.add_argument("--device", default="cpu", help="where the merges run: cpu (default) or cuda[:N]")
    parser.add_argument("--results", type=Path, help="also write the rows (JSON) and their table (.md) here")
    parser.add_argument("--tag", default="", help="a suffix for the result files")
    parser.add_argument("--workdir", type=Path, help="where checkpoints and outputs go (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](*rest)))
        return
    os.environ["EXTSUB_BENCH_DEVICE"] = DEVICE = args.device  # the children merge there
    kinds = [k for k in args.runs.split(",") if k]
    unknown = set(kinds) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    if "mergekit" in kinds and not mergekit_installed():
        print("mergekit is not installed: its runs are left out (pip install mergekit)", file=sys.stderr)
        kinds.remove("mergekit")
    merges = [k for k in kinds if k in ("sub", "ext-sub")]
    kinds += [f"{k} [{size}]" for size in args.blocks.split(",") if size for k in merges]
    if args.before is not None:
        kinds += [k + BEFORE for k in merges]
    caches = [c for c in args.cache.split(",") if c]
    if set(caches) - {"warm", "cold"}:
        parser.error("--cache takes warm, cold or warm,cold")
    workdir = Path(tempfile.mkdtemp(prefix="extsub-bench-", dir=args.workdir))
    try:
        if args.long_row_gib:
            rows = run_long_row(args.long_row_gib, caches, args.repeat, workdir, args.before)
        else:
            rows = run(args.model, _ints(args.layers), kinds, caches, args.repeat, workdir, args.before)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record("merge", recorded(rows), device=DEVICE, variant="run")
    print(markdown(rows))
    save_rows(
        args.results,
        f"merge-{rows[0]['date']}-{DEVICE.split(':')[0]}{'-' + args.tag if args.tag else ''}",
        rows,
        markdown(rows),
    )


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: model, layers, page cache (and the output's file system) as the shape."""
    out = []
    for r in rows:
        layers = f"{r['layers']} layers" if r.get("layers") else ""
        parts = (r.get("model"), layers, r.get("cache") and f"{r['cache']} cache", r.get("output_fs"))
        out.append({**r, "shape": ", ".join(p for p in parts if p), "dtype": "fp32" if r["layers"] == 0 else "bf16"})
    return out


if __name__ == "__main__":
    main()
