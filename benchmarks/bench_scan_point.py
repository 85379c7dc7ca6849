"""Where a scan point's time goes on the real model, against each part's floor, and what torch's threads do to it.

The model, adapters and sets of `examples/real_model/` (SmolLM2-135M-Instruct, a LoRA pair r = 8;
run prepare.py and train.py first). For each thread count, in this process:

- `scan`: `scan(..., lam="0,1", method="sub")` with the example's sets: its own per-part seconds
  at λ = 1 (merge install, KEEP, FORGET, TRUTH, choices, generation), from scan.json's row;
- the floors, on the same model (the base with the merged LoRA installed by that scan's
  installer is not kept, so the base model alone: the adapter's r = 16 matmuls are < 1 % of its
  FLOPs):
  - scoring (NLL and MC): one forward pass over every scored sequence, no padding, no loss, at
    the scan's batch size: Σ over batches of one `model(input_ids)` on sequences of one length,
    timed as a (batch, mean length) forward per batch;
  - generation: one forward per new token with a KV cache: the scan's number of decode steps
    (its longest continuation per batch) times the time of one cached decode step at that batch.

Every number goes to benchmarks/results/results.csv (_common.record) as each thread count finishes;
--out FILE also keeps the rows (JSON), and `--table FILE` prints the table of such a file.

    python benchmarks/bench_scan_point.py --threads 1 2
    python benchmarks/bench_scan_point.py --threads 1 --out point.json
    python benchmarks/bench_scan_point.py --table point.json
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import ROOT, environment, record

EXAMPLE = ROOT / "examples" / "real_model"
SETS = {name: EXAMPLE / "sets" / f"{name}.jsonl" for name in ("keep", "forget", "truth", "choices", "prompts")}


def scan_point(threads: int, max_new_tokens: int, batch_size: int) -> dict:
    """The scan's own seconds per part at sub λ = 1, and the generation's decode steps per batch."""
    from extsub_kernels import scan

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = scan(
            EXAMPLE / "adapters" / "expert",
            EXAMPLE / "adapters" / "anti",
            base=EXAMPLE / "base",
            **{k: v for k, v in SETS.items()},
            lam="0,1",
            method="sub",
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            threads=threads,
            out=out,
            device="cpu",
        )
        wall = time.perf_counter() - start
        row = result.row("sub", 1.0)
        samples = [s for s in result.samples if s["lam"] == 1.0]
    parts = ("merge", "keep", "forget", "truth", "choices", "generate")
    out = {f"{p}_s": getattr(row, f"{p}_seconds") for p in parts}
    out |= {"load_s": result.timing["load_seconds"], "scan_wall_s": wall, "sets": result.setup["sets"]}
    out["generated_tokens"] = [len(s["tokens"]) for s in samples]
    return out


def floors(threads: int, batch_size: int, generated: list[int], reps: int) -> dict:
    """Floor seconds of scoring each set and of the generation, on the base model (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extsub_kernels.lambda_scan.choices import load_choices
    from extsub_kernels.lambda_scan.metrics import load_examples
    from extsub_kernels.lambda_scan.rendering import ChatTemplate, encode_prompt

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE / "base")
    model = AutoModelForCausalLM.from_pretrained(EXAMPLE / "base", dtype=torch.float32).eval()
    chat = ChatTemplate()
    lengths = {
        name: [len(e.input_ids) for e in load_examples(SETS[name], tokenizer, chat)]
        for name in ("keep", "forget", "truth")
    }
    lengths["choices"] = [len(o.input_ids) for q in load_choices(SETS["choices"], tokenizer, chat) for o in q.options]

    def forward_s(batch: int, length: int) -> float:
        ids = torch.randint(100, 1000, (batch, length))
        times = []
        with torch.no_grad():
            for _ in range(reps):
                start = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {}
    for name, ls in lengths.items():
        ls = sorted(ls, reverse=True)
        batches = [ls[k : k + batch_size] for k in range(0, len(ls), batch_size)]
        out[f"{name}_floor_s"] = sum(forward_s(len(b), round(sum(b) / len(b))) for b in batches)
    prompts = [
        encode_prompt(tokenizer, json.loads(line)["prompt"], chat) for line in SETS["prompts"].read_text().splitlines()
    ]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            batch = order[k : k + batch_size]
            width = len(prompts[batch[0]])
            ids = torch.randint(100, 1000, (len(batch), width))
            prefill = time.perf_counter()
            cache = model(input_ids=ids, use_cache=True).past_key_values
            prefill = time.perf_counter() - prefill
            step_ids = torch.randint(100, 1000, (len(batch), 1))
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                model(input_ids=step_ids, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - start)
                cache.crop(-1)  # drop the step just appended
            steps = max(generated[i] for i in batch) if generated else 0
            total += prefill + max(steps, 1) * statistics.median(times)
    out["generate_floor_s"] = total
    return out


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines += [
            f"threads {r['threads']}: scan of 3 points {r['scan_wall_s']:.1f} s (model load {r['load_s']:.1f} s)",
            "",
            "| part | scan s | floor s | scan / floor |",
            "|---|---|---|---|",
        ]
        for part in ("keep", "forget", "truth", "choices", "generate"):
            floor = r[f"{part}_floor_s"]
            lines.append(f"| {part} | {r[f'{part}_s']:.3f} | {floor:.3f} | {r[f'{part}_s'] / floor:.2f}× |")
        lines.append(f"| merge (install) | {r['merge_s']:.4f} | – | – |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rows (JSON) to this file")
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return 0
    rows = []
    env = environment()
    for threads in args.threads:
        row = {"threads": threads, **scan_point(threads, args.max_new_tokens, args.batch_size)}
        row |= floors(threads, args.batch_size, row.pop("generated_tokens"), args.reps)
        rows.append(row)
        print(table([row]), flush=True)
        record("scan-point", [{**row, "shape": f"SmolLM2-135M-Instruct, {threads} thread(s)", "dtype": "fp32"}])
        if args.out:
            args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")  # each row as it comes
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
