"""Benchmark LoRA Ext-Sub on a LLaMA-7B-shaped adapter pair: factored `lora` vs `dense-lora` vs the authors' pattern.

A synthetic PEFT adapter pair (32 layers × q,k,v,o,gate,up,down; hidden 4096, intermediate
11008; r = 16, lora_alpha = 32; bf16) is merged with Ext-Sub (λ = 1) three ways, each in its own
subprocess, timed end to end from the input files to the fsynced output (imports excluded,
reported apart):

- `lora`: `extsub_kernels.merge(expert, anti, out, device=D, adapter=AdapterOptions(output_format="lora"))`, what
  `extsub-merge expert/ anti/ -o out/` runs: load and validate both adapters, the factored merge
  (docs/design.md §3), write the PEFT adapter.
- `dense-lora`: the same with `output_format="dense-lora"` (`--format dense-lora`): ΔW' = B'·A'
  per module, formed on the device, in the paper's released layout (lora_B = ΔW', lora_A =
  identity), streamed one module at a time into one adapter_model.safetensors.
- `authors`: the released code's pattern: per module B·A materialized in float32 for both
  adapters, unit vectors and bisector vectorized, the projection as a Python loop over rows,
  on the device, then the same dense-lora layout, one shard per layer (the released code keeps every
  module of both adapters in memory at once; that does not fit this machine, see RESULTS.md).
  It takes about 45 s per layer on 2 cores, so it runs on the first --authors-layers layers
  and its wall time and output bytes are extrapolated linearly to all layers (labelled so
  in the rows: `extrapolated_from_layers`).

Each variant runs --repeats times (fresh subprocess, output removed in between); times are
medians (every run is kept in `wall_s_runs`, with the 1-minute load average before it: the
machine may be shared), beside the fastest run and the CPU seconds (user + system) of the
subprocess. Peak memory is the largest peak RSS of the
subprocesses (getrusage ru_maxrss) and, on CUDA, the largest torch.cuda.max_memory_allocated,
measured. Output bytes are the
sizes of the files written. The three ΔW' are compared with each other and with a float64
oracle (Algorithm 1 on ΔW formed in float64 from the same bf16 factors) on the modules of
the layers the authors' pattern ran on. Every number goes to benchmarks/results/results.csv
(_common.record) and the table derived from the rows is printed; --results FILE also keeps the
rows (JSON), and `--table --results FILE` prints the table of saved rows.

    python benchmarks/bench_lora.py                    # full run on CPU (~30 GB of scratch disk, ~11 min)
    python benchmarks/bench_lora.py --device cuda      # the same with B·A and the merge on the GPU
    python benchmarks/bench_lora.py --layers 2         # a quick look
    python benchmarks/bench_lora.py --table --results benchmarks/results/lora.json   # the committed rows' table
"""

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import authors_ext_sub, environment, peak_rss_bytes, record

HIDDEN, INTERMEDIATE, RANK, ALPHA, LAM = 4096, 11008, 16, 32, 1.0
MODULES = {  # name → (out_features, in_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def _module_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{module}"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- inputs ---------------------------------------------------------------------------


def make_adapters(workdir: Path, layers: int) -> dict[str, Path]:
    """Two synthetic PEFT adapter folders (bf16, r = 16) with different seeds."""
    import torch

    from extsub_kernels.adapters.formats import write_adapter
    from extsub_kernels.adapters.peft import peft_key

    paths = {}
    for seed, name in enumerate(("expert", "anti")):
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for layer in range(layers):
            for module, (out, inp) in MODULES.items():
                name_ = _module_name(layer, module)
                # A like PEFT's kaiming-uniform init, B like a trained LoRA B (small, dense).
                bound = 1 / math.sqrt(inp)
                state[peft_key(name_, "A")] = ((torch.rand(RANK, inp, generator=gen) * 2 - 1) * bound).bfloat16()
                state[peft_key(name_, "B")] = (torch.randn(out, RANK, generator=gen) * 0.02).bfloat16()
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "synthetic/llama-7b-shape",
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": list(MODULES),
            "lora_dropout": 0.05,
            "bias": "none",
        }
        paths[name] = write_adapter(workdir / name, state, config)
    return paths


# --- variants (each runs in its own subprocess) ----------------------------------------


def run_merge(expert: Path, anti: Path, out: Path, output_format: str, device: str) -> dict:
    """What `extsub-merge expert/ anti/ -o out/ [--format dense-lora] --device D` runs."""
    from extsub_kernels import AdapterOptions, merge

    t0 = time.perf_counter()
    report = merge(expert, anti, out, lam=LAM, device=device, adapter=AdapterOptions(output_format=output_format))
    return {"wall_s": time.perf_counter() - t0, "peak_gpu_bytes": report.peak_gpu_bytes}


def _write_shard(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def run_authors(expert: Path, anti: Path, out: Path, layers: int, device: str) -> dict:
    import torch
    from safetensors import safe_open

    from extsub_kernels.adapters.peft import peft_key
    from extsub_kernels.constants import ADAPTER_WEIGHTS

    scaling = ALPHA / RANK
    t0 = time.perf_counter()
    out.mkdir()
    write_s = 0.0
    with safe_open(str(expert / ADAPTER_WEIGHTS), "pt") as fe, safe_open(str(anti / ADAPTER_WEIGHTS), "pt") as fa:
        for layer in range(layers):
            shard = {}
            for module in MODULES:
                name = _module_name(layer, module)
                a_key, b_key = peft_key(name, "A"), peft_key(name, "B")
                b_plus = fe.get_tensor(b_key)
                dtype = b_plus.dtype
                p = (b_plus.to(device).float() @ fe.get_tensor(a_key).to(device).float()) * scaling
                m = (fa.get_tensor(b_key).to(device).float() @ fa.get_tensor(a_key).to(device).float()) * scaling
                shard[b_key] = authors_ext_sub(p, m, LAM).to(dtype).cpu()
                shard[a_key] = torch.eye(p.shape[1], dtype=dtype)
            tw = time.perf_counter()
            _write_shard(out / f"adapter_model-{layer + 1:05d}-of-{layers:05d}.safetensors", shard)
            write_s += time.perf_counter() - tw
            del shard
    t1 = time.perf_counter()
    peak_gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"wall_s": t1 - t0, "compute_s": t1 - t0 - write_s, "write_s": write_s, "peak_gpu_bytes": peak_gpu}


def _variant_main(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import torch  # noqa: F401  (import time is reported apart)

    import extsub_kernels  # noqa: F401

    import_s = time.perf_counter() - t_start
    rss_after_import = peak_rss_bytes() / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF)
    workdir = Path(args.workdir)
    expert, anti, out = workdir / "expert", workdir / "anti", workdir / f"out-{args.variant}"
    if args.variant == "authors":
        row = run_authors(expert, anti, out, args.layers, args.device)
    else:
        row = run_merge(expert, anti, out, args.variant, args.device)
    done = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (done.ru_utime - usage.ru_utime) + (done.ru_stime - usage.ru_stime)
    row.update(
        import_s=import_s,
        cpu_s=cpu_s,
        rss_after_import_mb=rss_after_import,
        peak_rss_mb=peak_rss_bytes() / 2**20,
        output_bytes=_folder_bytes(out),
    )
    print(json.dumps(row))


# --- comparison of the three results -----------------------------------------------------


def compare(workdir: Path, layers: list[int], authors_layers: int) -> dict:
    """Largest differences between the three ΔW' (and a float64 oracle) on the given layers.

    Besides the outputs as written (bf16), the factored result before its bf16 storage
    (float32 factors, in process) is compared with the oracle: the math without the rounding.
    """
    import torch
    from safetensors import safe_open

    from extsub_kernels import ext_sub_reference
    from extsub_kernels.adapters import merge_adapters
    from extsub_kernels.adapters.peft import load_adapter, peft_key
    from extsub_kernels.io.reader import CheckpointReader

    expert, anti = load_adapter(workdir / "expert"), load_adapter(workdir / "anti")
    lora = load_adapter(workdir / "out-lora")
    factored = merge_adapters(expert, anti, LAM)
    worst: dict[str, float] = {}
    dense_files = sorted((workdir / "out-dense-lora").glob("*.safetensors"))
    if len(dense_files) != 1:
        raise RuntimeError(f"expected one dense-lora adapter file, found {[f.name for f in dense_files]}")
    # The dense-lora file (27 GB at full size) is read with the project's pread reader: an mmap
    # of it fails on a machine with less memory than that.
    dense = CheckpointReader(dense_files, label="dense-lora output")
    for layer in layers:
        authors_shard = f"adapter_model-{layer + 1:05d}-of-{authors_layers:05d}.safetensors"
        with safe_open(str(workdir / "out-authors" / authors_shard), "pt") as fa:
            for module in MODULES:
                name = _module_name(layer, module)
                exact = ext_sub_reference(
                    expert.modules[name].delta(torch.float64), anti.modules[name].delta(torch.float64), LAM
                )
                results = {
                    "lora": lora.modules[name].delta(torch.float64),
                    "dense-lora": dense.read(peft_key(name, "B")).double(),
                    "authors": fa.get_tensor(peft_key(name, "B")).double(),
                }
                scale = float(exact.abs().max())
                pairs = [("lora", "dense-lora"), ("lora", "authors"), ("dense-lora", "authors")]
                diffs = {f"{a} vs {b}": results[a] - results[b] for a, b in pairs}
                diffs.update({f"{k} vs float64 oracle": v - exact for k, v in results.items()})
                diffs["lora before bf16 storage (float32 factors) vs float64 oracle"] = (
                    factored.modules[name].delta(torch.float64) - exact
                )
                for key, diff in diffs.items():
                    worst[key] = max(worst.get(key, 0.0), float(diff.abs().max()) / scale)
    dense.close()
    return worst


# --- driver -----------------------------------------------------------------------------


def _spawn(variant: str, workdir: Path, layers: int, device: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--workdir",
        str(workdir),
        "--layers",
        str(layers),
        "--device",
        device,
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--workdir", help="scratch folder (default: a temporary folder, removed afterwards)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per variant; times are medians, peak RSS the maximum"
    )
    parser.add_argument(
        "--authors-layers", type=int, default=2, help="layers the authors' pattern runs on (then extrapolated)"
    )
    parser.add_argument("--device", default="cpu", help="where B·A and the merge run: cpu (default), cuda or cuda:N")
    parser.add_argument("--variant", choices=["lora", "dense-lora", "authors"], help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="print the markdown table from the saved rows")
    parser.add_argument("--results", help="also write the rows (JSON) to this file; with --table, read them")
    args = parser.parse_args()
    if args.table and not args.results:
        parser.error("--table reads the rows of --results FILE")
    if args.table:
        print(table(json.loads(Path(args.results).read_text())))
        return
    if args.variant:
        _variant_main(args)
        return
    scratch = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_lora."))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        env = environment(args.device)
        shape = (
            f"llama-7b: {args.layers} layers x 7 modules, hidden {HIDDEN}, intermediate {INTERMEDIATE}, r={RANK}, bf16"
        )
        print(f"inputs: {shape} in {scratch}", file=sys.stderr)
        make_adapters(scratch, args.layers)
        input_bytes = _folder_bytes(scratch / "expert") + _folder_bytes(scratch / "anti")
        rows = []
        authors_layers = min(args.authors_layers, args.layers)
        for variant in ("lora", "dense-lora", "authors"):
            layers = authors_layers if variant == "authors" else args.layers
            runs = []
            for _repeat in range(args.repeats):
                shutil.rmtree(
                    scratch / f"out-{variant}", ignore_errors=True
                )  # the last run's output stays for the comparison
                load = os.getloadavg()[0]
                runs.append({**_spawn(variant, scratch, layers, args.device), "loadavg_1min_before": load})
            row = dict(runs[-1])
            row.update({key: statistics.median(r[key] for r in runs) for key in runs[0] if key.endswith("_s")})
            row.update(
                runs=runs,
                wall_s_runs=[r["wall_s"] for r in runs],
                wall_s_min=min(r["wall_s"] for r in runs),
                loadavg_1min_before=[r["loadavg_1min_before"] for r in runs],
                peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
                peak_gpu_bytes=max((r.get("peak_gpu_bytes") or 0) for r in runs) or None,
            )
            row.update(
                env,
                bench="lora",
                variant=variant,
                shape=shape,
                shape_layers=args.layers,
                input_bytes=input_bytes,
                lam=LAM,
            )
            if layers < args.layers:  # a measured subset, extrapolated linearly to every layer
                factor = args.layers / layers
                for key in ("compute_s", "write_s"):  # parts of the measured subset, kept as such
                    row[f"measured_{key}"] = row.pop(key)
                row.update(
                    extrapolated_from_layers=layers,
                    measured_wall_s=row["wall_s"],
                    measured_output_bytes=row["output_bytes"],
                    wall_s=row["wall_s"] * factor,
                    wall_s_min=row["wall_s_min"] * factor,
                    cpu_s=row["cpu_s"] * factor,
                    output_bytes=round(row["output_bytes"] * factor),
                )
            rows.append(row)
            summary = f"{row['wall_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB, {row['output_bytes'] / 1e9:.3f} GB"
            print(f"{variant}: {summary}", file=sys.stderr)
        compare_layers = list(range(authors_layers))
        worst = compare(scratch, compare_layers, authors_layers)
        rows.append(
            {
                **env,
                "bench": "lora",
                "variant": "max-difference",
                "shape": shape,
                "lam": LAM,
                "compared_layers": compare_layers,
                "compared_modules": len(compare_layers) * len(MODULES),
                "max_abs_diff_over_max_abs": worst,
            }
        )
        record("lora", rows, device=args.device, variant="variant")
        if args.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(json.dumps(rows, indent=1) + "\n")
        print(table(rows))
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)


def table(rows: list[dict]) -> str:
    """The markdown table of RESULTS.md, derived from the rows."""
    runs = {r["variant"]: r for r in rows if "wall_s" in r}
    lora = runs["lora"]
    columns = [
        "variant",
        "wall time, median (s)",
        "fastest run (s)",
        "CPU time (s)",
        "speed-up over authors (median)",
        "peak RSS (MB)",
        "RSS after imports (MB)",
        "peak GPU (MB)",
        "output (bytes)",
        "output vs lora",
    ]
    lines = [
        f"{lora['shape']}; {lora['device']}; torch {lora['torch']}, extsub {lora['version']}, {lora['date']}",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for name, r in runs.items():
        label = name
        if "extrapolated_from_layers" in r:
            factor = r["shape_layers"] / r["extrapolated_from_layers"]
            label += (
                f" (measured on {r['extrapolated_from_layers']} layers: {r['measured_wall_s']:.1f} s, "
                f"{r['measured_output_bytes']:,} B; times and bytes extrapolated ×{factor:g})"
            )
        gpu = f"{r['peak_gpu_bytes'] / 2**20:.0f}" if r.get("peak_gpu_bytes") else "n/a"
        cells = [
            label,
            f"{r['wall_s']:.2f}",
            f"{r['wall_s_min']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{runs['authors']['wall_s'] / r['wall_s']:.1f}×",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['rss_after_import_mb']:.0f}",
            gpu,
            f"{r['output_bytes']:,}",
            f"{r['output_bytes'] / lora['output_bytes']:.1f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    diff = next((r for r in rows if r["variant"] == "max-difference"), None)
    if diff:
        lines += [
            "",
            f"Largest |difference| / max|ΔW'| over {diff['compared_modules']} modules "
            f"(layers {diff['compared_layers']}):",
            "",
        ]
        lines += ["| pair | max abs diff / max abs |", "|---|---:|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in diff["max_abs_diff_over_max_abs"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
