"""Benchmark a 10-point λ scan: `extsub_kernels.scan()` against the loop a user writes today, side by side.

A small LLaMA-shaped model (random weights, built from a config: by default 4 layers, hidden
256, 8 heads, intermediate 688, vocabulary 4096, float32; no tokenizer) and a LoRA pair of it
(r = 16 on all seven linear layers of every block, random A and B, different seeds), or with
`--kind full` two full models (the base plus random task vectors of every float tensor). KEEP
and FORGET are 200 pre-tokenised examples each (`input_ids`, lengths uniform in 16..64).
The grid is ten λ values, 0, 0.2, ..., 1.8, method ext-sub.

Two variants, run in this process in the order scan, per-output, per-output, scan (`--rounds 2`;
a shared machine's load then weighs on both alike), torch, transformers and peft imported before
either, so neither pays the imports; the table shows the median over the rounds:

- `scan`: `scan(expert, anti, base=..., keep=..., forget=..., lam="0:1.8:0.2", method="ext-sub")`:
  the base loaded once; each point installs the merge in place and evaluates. Its own timing
  (load, prepare, merge and evaluation per point) is kept beside the wall time.
- `per-output`: what users do without the scan: for each λ, `merge()` writes the merged
  adapter (or the full model with `--base`), `from_pretrained` loads the base and the adapter
  (or the merged model), `mean_nll` scores KEEP and FORGET, one after the other.

Both evaluate the same merges on the same examples with the same batches (batch size 8), so
their NLLs agree and the difference is loading and merging. On a shared machine the
evaluations' own times drift (other work on the cores), so the table also shows each variant's
time spent not evaluating (wall − evaluation): loading, merging, writing.

`--merge-7b` measures the scan's per-point install for a LLaMA-7B-shaped LoRA pair (32 layers ×
q, k, v, o (4096×4096), gate, up (11008×4096), down (4096×11008), r = 16, float32, random), the
part of a 7B scan that does not depend on the evaluation: `LoraInstaller.install` for each of the
ten λ values (the factored merge, then B' and A' copied into rank-32 tensors the shape of the PEFT
layers' weights; the 7B base itself is not built, as the install never touches it). Every number goes
to benchmarks/results/results.csv (_common.record); --out FILE also keeps the rows (JSON), and
`--table FILE` prints the markdown table derived from such a file.

    python benchmarks/bench_scan.py --kind lora full --threads 1   # what RESULTS.md shows (~5 min)
    python benchmarks/bench_scan.py --kind full          # full models
    python benchmarks/bench_scan.py --device cuda        # on a GPU, when one is at hand
    python benchmarks/bench_scan.py --merge-7b           # the install of a 7B-shaped LoRA pair per point
    python benchmarks/bench_scan.py --out /tmp/scan.json && python benchmarks/bench_scan.py --table /tmp/scan.json
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import environment, peak_rss_bytes, record

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, vocab_size=4096),
    "medium": dict(
        hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000
    ),
}
RANK, EXAMPLES, LENGTHS, BATCH, GRID = 16, 200, (16, 64), 8, "0:1.8:0.2"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_inputs(workdir: Path, kind: str, size: str) -> dict[str, Path]:
    """The base model, the expert and anti-expert (LoRA folders or full models), KEEP and FORGET .jsonl files."""
    import peft
    import torch
    import transformers

    config = transformers.LlamaConfig(max_position_embeddings=2 * LENGTHS[1], **SIZES[size])
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    paths = {"base": workdir / "base"}
    base.save_pretrained(paths["base"])
    for seed, role in enumerate(("expert", "anti"), start=1):
        torch.manual_seed(seed)
        if kind == "lora":
            model = transformers.LlamaForCausalLM.from_pretrained(paths["base"])
            lora = peft.LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=2 * RANK, target_modules=LORA_TARGETS)
            model = peft.get_peft_model(model, lora)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.02)
        else:
            model = transformers.LlamaForCausalLM.from_pretrained(paths["base"])
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.002)
        paths[role] = workdir / role
        model.save_pretrained(paths[role])
    rng = random.Random(0)
    for name in ("keep", "forget"):
        paths[name] = workdir / f"{name}.jsonl"
        rows = [
            {"input_ids": [rng.randrange(1, config.vocab_size) for _ in range(rng.randint(*LENGTHS))]}
            for _ in range(EXAMPLES)
        ]
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_scan(paths: dict[str, Path], device: str) -> dict:
    from extsub_kernels import scan

    start = time.perf_counter()
    result = scan(
        paths["expert"],
        paths["anti"],
        base=paths["base"],
        keep=paths["keep"],
        forget=paths["forget"],
        lam=GRID,
        method="ext-sub",
        device=device,
        batch_size=BATCH,
    )
    wall = time.perf_counter() - start
    rows = [(r.lam, r.keep_nll, r.forget_nll, r.merge_seconds, r.eval_seconds) for r in result]
    return {"wall_seconds": wall, "timing": result.timing, "points": rows}


def run_per_output(paths: dict[str, Path], kind: str, device: str, workdir: Path) -> dict:
    """For each λ: merge() writes the output, from_pretrained loads it, mean_nll scores both sets."""
    import peft
    import torch
    import transformers

    from extsub_kernels import merge
    from extsub_kernels.engine.options import parse_lam_grid
    from extsub_kernels.lambda_scan.metrics import load_examples, mean_nll

    sets = {name: load_examples(paths[name]) for name in ("keep", "forget")}
    start = time.perf_counter()
    points = []
    for lam in parse_lam_grid(GRID):
        out = workdir / f"per-output-{lam}"
        t0 = time.perf_counter()
        merge(paths["expert"], paths["anti"], out, lam=lam, base=paths["base"] if kind == "full" else None)
        t1 = time.perf_counter()
        if kind == "full":
            model = transformers.LlamaForCausalLM.from_pretrained(out)
        else:
            base = transformers.LlamaForCausalLM.from_pretrained(paths["base"])
            model = peft.PeftModel.from_pretrained(base, out)
        model = model.to(device).eval()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        nll = [mean_nll(model, sets[name], BATCH) for name in ("keep", "forget")]
        t3 = time.perf_counter()
        points.append((lam, *nll, t1 - t0, t2 - t1, t3 - t2))
        del model
    return {"wall_seconds": time.perf_counter() - start, "points": points}


def run_merge_7b(device: str) -> dict:
    """Seconds of `LoraInstaller.install` per λ for a LLaMA-7B-shaped r = 16 pair, into tensors shaped like PEFT's."""
    import torch

    from extsub_kernels.adapters import LoraAdapter, LoraModule
    from extsub_kernels.engine.options import parse_lam_grid
    from extsub_kernels.lambda_scan.installers import LoraInstaller

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)}
    shapes |= {"gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    adapters = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        modules = {}
        for layer in range(32):
            for name, (out, inp) in shapes.items():
                a = torch.randn(RANK, inp, generator=gen) / inp**0.5
                b = torch.randn(out, RANK, generator=gen) * 0.02
                part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                modules[f"model.layers.{layer}.{part}.{name}"] = LoraModule(a, b, 2.0)
        adapters.append(LoraAdapter(modules, source=f"7b-shaped-{seed}", base_model_name_or_path="synthetic/7b"))
    installer = LoraInstaller(adapters, ["ext-sub"])
    # What `attach` points the installer at: each PEFT layer's lora_A (R, in) and lora_B (out, R) weights.
    if not device.startswith("cpu"):  # as `attach` does: the sweeps merge where the model is
        installer.sweeps = {method: sweep.to(device) for method, sweep in installer.sweeps.items()}
    installer.slots = {}
    for name, r in installer.ranks.items():
        module = adapters[0].modules[name]
        installer.slots[name] = (
            torch.zeros(r, module.in_features, device=device),
            torch.zeros(module.out_features, r, device=device),
        )
    seconds = []
    for lam in parse_lam_grid(GRID):
        start = time.perf_counter()
        installer.install("ext-sub", lam)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"modules": len(installer.slots), "rank": RANK, "install_seconds": seconds}


def summarize(row: dict) -> dict:
    """Medians over the rounds of each variant's figures, and the largest NLL difference between any two runs."""
    scans, loops = row["scan"], row["per_output"]
    med = statistics.median
    timings = [s["timing"] for s in scans]
    return {
        "scan_wall_s": med(s["wall_seconds"] for s in scans),
        "scan_overhead_s": med(
            s["wall_seconds"] - t["eval_seconds_total"] for s, t in zip(scans, timings, strict=True)
        ),
        "scan_load_s": med(t["load_seconds"] for t in timings),
        "scan_merge_median_s": med(t["merge_seconds_median"] for t in timings),
        "scan_merge_total_s": med(t["merge_seconds_total"] for t in timings),
        "scan_eval_total_s": med(t["eval_seconds_total"] for t in timings),
        "smallest_eval_median_s": med(t[f"{t['smallest_evaluation']}_seconds_median"] for t in timings),
        "merge_share": med(t["merge_share_of_smallest_evaluation"] for t in timings),
        "per_output_wall_s": med(loop["wall_seconds"] for loop in loops),
        "per_output_merge_write_median_s": med(p[3] for loop in loops for p in loop["points"]),
        "per_output_load_median_s": med(p[4] for loop in loops for p in loop["points"]),
        "per_output_eval_total_s": med(sum(p[5] for p in loop["points"]) for loop in loops),
        "per_output_overhead_s": med(loop["wall_seconds"] - sum(p[5] for p in loop["points"]) for loop in loops),
        "max_nll_difference": max(
            abs(a[i] - b[i])
            for run in [*scans[1:], *loops]
            for a, b in zip(scans[0]["points"], run["points"], strict=True)
            for i in (1, 2)
        ),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| kind | model | points | scan s | evaluating | not evaluating | merges (median per point) | model load | "
        "smallest evaluation (median) | merge share | per-output loop s | evaluating | not evaluating | "
        "merge + write per λ | load per λ | max NLL difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = summarize(row)
        lines.append(
            f"| {row['kind']} | {row['size']}, {row['parameters'] / 1e6:.1f} M params | {len(row['scan'][0]['points'])}"
            f" | {s['scan_wall_s']:.1f} | {s['scan_eval_total_s']:.1f} | {s['scan_overhead_s']:.2f} "
            f"| {s['scan_merge_total_s']:.2f} s ({s['scan_merge_median_s'] * 1e3:.1f} ms) | {s['scan_load_s']:.2f} s "
            f"| {s['smallest_eval_median_s']:.2f} s | {s['merge_share']:.2%} | {s['per_output_wall_s']:.1f} "
            f"| {s['per_output_eval_total_s']:.1f} | {s['per_output_overhead_s']:.2f} "
            f"| {s['per_output_merge_write_median_s'] * 1e3:.0f} ms "
            f"| {s['per_output_load_median_s'] * 1e3:.0f} ms | {s['max_nll_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["lora", "full"], nargs="+", default=["lora"])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved (default 2)")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default torch's; on a shared machine 1 keeps timings steady)"
    )
    parser.add_argument("--out", type=Path, help="also write the rows (JSON) to this file")
    parser.add_argument("--table", type=Path, metavar="FILE", help="print the markdown table from a results file")
    parser.add_argument("--merge-7b", action="store_true", help="only the install of a 7B-shaped LoRA pair per point")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return
    warnings.simplefilter("ignore")
    import peft  # noqa: F401  (imported before either variant, so neither pays for it)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    if args.merge_7b:
        row = run_merge_7b(args.device) | env
        record("scan-install-7b", [recorded_7b(row)], device=args.device)
        if args.out:
            args.out.write_text(json.dumps(row, indent=2) + "\n")
        median = statistics.median(row["install_seconds"])
        print(
            f"7B-shaped LoRA pair, {row['modules']} modules, r = {RANK}: install per point median {median:.3f} s "
            f"(min {min(row['install_seconds']):.3f}, max {max(row['install_seconds']):.3f})"
        )
        return
    rows = []
    for kind in args.kind:
        with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
            workdir = Path(tmp)
            paths = make_inputs(workdir, kind, args.size)
            parameters = sum(
                t.numel() for t in transformers.LlamaForCausalLM.from_pretrained(paths["base"]).parameters()
            )
            row = {"kind": kind, "size": args.size, "config": SIZES[args.size], "parameters": parameters}
            row |= {"rank": RANK if kind == "lora" else None, "examples": EXAMPLES, "lengths": LENGTHS, "grid": GRID}
            row["scan"], row["per_output"] = [], []
            for r in range(args.rounds):  # scan, loop, loop, scan, ...: a drifting load weighs on both
                order = ("scan", "per_output") if r % 2 == 0 else ("per_output", "scan")
                for variant in order:
                    if variant == "scan":
                        row["scan"].append(run_scan(paths, args.device))
                    else:
                        row["per_output"].append(run_per_output(paths, kind, args.device, workdir / f"round{r}"))
            row["peak_rss_bytes"] = peak_rss_bytes()
            rows.append(row | env)
            print(table([row]), file=sys.stderr, flush=True)
    record("scan", recorded(rows), device=args.device)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads()}, indent=2) + "\n")
    print(table(rows))


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: the PEM kind and model size as the shape, the medians of `summarize`."""
    return [{"shape": f"{r['kind']}, {r['size']}", "dtype": "fp32", **summarize(r)} for r in rows]


def recorded_7b(row: dict) -> dict:
    """The 7B-shaped install as results.csv keeps it: the median install time per point."""
    return {"shape": f"llama-7b LoRA, {row['modules']} modules, r={row['rank']}", "dtype": "fp32", **row}


if __name__ == "__main__":
    main()
