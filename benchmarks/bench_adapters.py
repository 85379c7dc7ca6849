"""Benchmark prefix-tuning and (IA)³ Ext-Sub on LLaMA-7B-shaped adapter pairs: extsub-merge vs the authors' pattern.

Synthetic PEFT adapter pairs of LLaMA-7B's shape (32 layers, hidden 4096, 32 heads,
intermediate 11008; float32, as PEFT saves them):

- `prefix`: prefix-tuning, 30 virtual tokens: `prompt_embeddings` (30, 32·2·4096), 61,440 rows
  of 128 (one per token, layer, key/value and head).
- `ia3`: (IA)³ on k_proj, v_proj (4096, 1) and down_proj (1, 11008, feedforward): 96 vectors.

Each is merged with Ext-Sub at λ = 1 (where the released code's (IA)³ formula is the paper's
too, so both results can be checked) three ways, each in its own process, --repeats times:

- `cli`: `python -m extsub_kernels EXPERT ANTI -o OUT -q`, timed from spawn to exit by this
  script: what a user waits for.
- `merge`: the same `extsub_kernels.merge()` call inside a process that reports the merge's own
  time (load, validate, merge, write, fsync); the rest of that process's wall time is start-up
  (the interpreter, importing torch and extsub) and exit.
- `authors`: the released code's pattern in its own process: both adapters loaded whole
  (safetensors instead of their torch.load), the projection computed by the shared per-row
  pattern (`_common.authors_ext_sub`) — for prefix-tuning their nested loop over tokens and
  layers·2, each step over the heads of one key or value; for (IA)³ one vector per step — then
  saved (safetensors, fsync).

The outputs of `merge` and `authors` are compared with a float64 oracle: Algorithm 1 written
literally (`ext_sub_reference`) on the same rows in float64, rounded to float32: the share of
elements that are bit-identical to it and the largest distance in float32 ulps (0 ulp: the
oracle's value itself), and the largest error of a row relative to the row (per-head rows of
the prefix; the task vectors l − 1 of (IA)³). Every number goes to benchmarks/results/results.csv
(_common.record); --results FILE also keeps the rows (JSON), and `--table --results FILE` prints
the markdown table derived from them.

    python benchmarks/bench_adapters.py                 # both pairs, 5 repeats (~2 min on 2 cores)
    python benchmarks/bench_adapters.py --table --results benchmarks/results/adapters.json
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

from _common import ROOT, authors_ext_sub, environment, peak_rss_bytes, record

LAYERS, HIDDEN, HEADS, INTERMEDIATE, TOKENS, LAM = 32, 4096, 32, 11008, 30, 1.0
IA3_MODULES = {"self_attn.k_proj": (HIDDEN, 1), "self_attn.v_proj": (HIDDEN, 1), "mlp.down_proj": (1, INTERMEDIATE)}
PEMS = ("prefix", "ia3")
SHAPES = {
    "prefix": f"llama-7b prefix-tuning: {TOKENS} virtual tokens x {LAYERS} layers x 2 x {HEADS} heads x "
    f"{HIDDEN // HEADS}, float32",
    "ia3": f"llama-7b (IA)3: {LAYERS} layers x k_proj, v_proj ({HIDDEN}, 1), down_proj (1, {INTERMEDIATE}), float32",
}


# --- inputs ---------------------------------------------------------------------------


def make_adapters(workdir: Path, pem: str) -> dict[str, Path]:
    """An expert and an anti-expert PEFT folder of `pem`, with different seeds."""
    import torch

    from extsub_kernels.adapters.family import config_text
    from extsub_kernels.adapters.formats import write_adapter
    from extsub_kernels.adapters.ia3 import ia3_key

    paths = {}
    for seed, role in enumerate(("expert", "anti")):
        gen = torch.Generator().manual_seed(seed)
        common = {
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "synthetic/llama-7b-shape",
            "inference_mode": True,
        }
        if pem == "prefix":
            state = {"prompt_embeddings": torch.randn(TOKENS, LAYERS * 2 * HIDDEN, generator=gen)}
            config = {
                **common,
                "peft_type": "PREFIX_TUNING",
                "num_virtual_tokens": TOKENS,
                "num_layers": LAYERS,
                "token_dim": HIDDEN,
                "num_attention_heads": HEADS,
                "num_transformer_submodules": 1,
                "prefix_projection": False,
            }
        else:
            state = {
                ia3_key(f"model.layers.{layer}.{module}"): 1 + 0.05 * torch.randn(shape, generator=gen)
                for layer in range(LAYERS)
                for module, shape in IA3_MODULES.items()
            }
            config = {
                **common,
                "peft_type": "IA3",
                "target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"],
            }
        paths[role] = write_adapter(workdir / f"{pem}-{role}", state, json.loads(config_text(config)))
    return paths


# --- variants (each runs in its own process) ---------------------------------------------


def _write(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    fd = os.open(path / "adapter_model.safetensors", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def run_authors(pem: str, expert: Path, anti: Path, out: Path) -> None:
    """The released code's pattern: load both whole, the per-row loops of its Ext-Sub branch, save."""
    from safetensors.torch import load_file

    plus, minus = load_file(expert / "adapter_model.safetensors"), load_file(anti / "adapter_model.safetensors")
    if pem == "prefix":
        p = plus["prompt_embeddings"].view(TOKENS, LAYERS * 2, HEADS, HIDDEN // HEADS)
        m = minus["prompt_embeddings"].view(TOKENS, LAYERS * 2, HEADS, HIDDEN // HEADS)
        for a in range(p.shape[0]):
            for b in range(p.shape[1]):
                p[a, b] = authors_ext_sub(p[a, b], m[a, b], LAM)
        result = {"prompt_embeddings": p.reshape(TOKENS, -1)}
    else:
        result = {}
        for key, l_plus in plus.items():
            d_plus, d_minus = (l_plus - 1).reshape(1, -1), (minus[key] - 1).reshape(1, -1)
            result[key] = (1 + authors_ext_sub(d_plus, d_minus, LAM)).reshape(l_plus.shape)
    _write(out, {k: v.contiguous() for k, v in result.items()})


def _variant_main(args: argparse.Namespace) -> None:
    import extsub_kernels

    usage = resource.getrusage(resource.RUSAGE_SELF)
    workdir = Path(args.workdir)
    expert, anti = workdir / f"{args.pem}-expert", workdir / f"{args.pem}-anti"
    out = workdir / f"out-{args.pem}-{args.variant}"
    t0 = time.perf_counter()
    if args.variant == "authors":
        run_authors(args.pem, expert, anti, out)
    else:
        extsub_kernels.merge(expert, anti, out, lam=LAM, device="cpu")
    work_s = time.perf_counter() - t0
    done = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (done.ru_utime - usage.ru_utime) + (done.ru_stime - usage.ru_stime)
    print(json.dumps({"work_s": work_s, "cpu_s": cpu_s, "peak_rss_mb": peak_rss_bytes() / 2**20}))


# --- the check against the float64 oracle -------------------------------------------------


def max_errors(workdir: Path, pem: str) -> dict[str, dict[str, float]]:
    """Per variant: how far the float32 output is from the float64 oracle rounded to float32, in ulps."""
    import torch
    from safetensors.torch import load_file

    from extsub_kernels import ext_sub_reference

    plus = load_file(workdir / f"{pem}-expert" / "adapter_model.safetensors")
    minus = load_file(workdir / f"{pem}-anti" / "adapter_model.safetensors")
    if pem == "prefix":
        rows = HIDDEN // HEADS
        p, m = plus["prompt_embeddings"].double(), minus["prompt_embeddings"].double()
        reference = {"prompt_embeddings": ext_sub_reference(p.reshape(-1, rows), m.reshape(-1, rows), LAM).view_as(p)}
    else:
        reference = {}
        for key, l_plus in plus.items():
            d_plus, d_minus = (l_plus.double() - 1).reshape(1, -1), (minus[key].double() - 1).reshape(1, -1)
            reference[key] = (1 + ext_sub_reference(d_plus, d_minus, LAM)).reshape(l_plus.shape)
    errors = {}
    for variant in ("merge", "authors"):
        out = load_file(workdir / f"out-{pem}-{variant}" / "adapter_model.safetensors")
        if set(out) != set(reference):
            raise RuntimeError(f"{variant}: tensors {sorted(set(out) ^ set(reference))[:3]} differ from the reference")
        ulps = torch.cat([(_ordered(out[k]) - _ordered(ref.float())).abs().reshape(-1) for k, ref in reference.items()])
        row_errors = [_row_errors(out[key], ref, pem) for key, ref in reference.items()]
        errors[variant] = {
            "max_ulps": int(ulps.max()),
            "identical_share": float((ulps == 0).double().mean()),
            "max_row_rel_error": max(float(e.max()) for e in row_errors),
        }
    return errors


def _row_errors(out, ref, pem: str):
    """|out − ref| / |ref| per Ext-Sub row: per-head rows of the prefix, task vectors l − 1 of (IA)³."""
    import torch

    if pem == "prefix":
        diff, scale = (out.double() - ref).reshape(-1, HIDDEN // HEADS), ref.reshape(-1, HIDDEN // HEADS)
    else:
        diff, scale = (out.double() - ref).reshape(1, -1), (ref - 1).reshape(1, -1)
    return torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(scale, dim=1)


def _ordered(t):
    """float32 values as integers in the order of the values: neighbours differ by one (one ulp)."""
    import torch

    bits = t.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


# --- driver -----------------------------------------------------------------------------


def _spawn(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, done.stdout


def run_pem(pem: str, scratch: Path, repeats: int) -> list[dict]:
    """Every variant of one pair, `repeats` times interleaved; one result row per variant and one of errors."""
    paths = make_adapters(scratch, pem)
    input_bytes = sum(p.stat().st_size for folder in paths.values() for p in folder.iterdir())
    runs: dict[str, list[dict]] = {"cli": [], "merge": [], "authors": []}
    for _ in range(repeats):
        for variant in runs:
            out = scratch / f"out-{pem}-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            if variant == "cli":
                command = [sys.executable, "-m", "extsub_kernels", str(paths["expert"]), str(paths["anti"])]
                wall, _ = _spawn([*command, "-o", str(out), "--lam", str(LAM), "--device", "cpu", "-q"])
                row = {}
            else:
                command = [sys.executable, __file__, "--variant", variant, "--pem", pem, "--workdir", str(scratch)]
                wall, stdout = _spawn(command)
                row = json.loads(stdout.strip().splitlines()[-1])
                row["startup_s"] = wall - row["work_s"]  # interpreter, imports and exit
            runs[variant].append({**row, "wall_s": wall, "loadavg_1min_before": load})
    rows = []
    env = environment("cpu")
    for variant, measured in runs.items():
        row = {key: statistics.median(r[key] for r in measured) for key in measured[0] if key.endswith("_s")}
        row.update(
            env,
            bench="adapters",
            pem=pem,
            variant=variant,
            shape=SHAPES[pem],
            lam=LAM,
            input_bytes=input_bytes,
            repeats=repeats,
            wall_s_runs=[r["wall_s"] for r in measured],
            loadavg_1min_before=[r["loadavg_1min_before"] for r in measured],
        )
        if "peak_rss_mb" in measured[0]:
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in measured)
        rows.append(row)
    rows.append({**env, "bench": "adapters", "pem": pem, "variant": "errors", "errors": max_errors(scratch, pem)})
    return rows


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: the PEM type's shape, and the errors as measures of each variant."""
    out = []
    for r in rows:
        errors = r.get("errors", {})
        measures = {m: {variant: e[m] for variant, e in errors.items()} for m in next(iter(errors.values()), {})}
        out.append({**{k: v for k, v in r.items() if k != "errors"}, **measures, "shape": SHAPES[r["pem"]]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant (interleaved); times are medians")
    parser.add_argument("--pem", choices=PEMS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["merge", "authors"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="scratch folder (default: a temporary folder, removed afterwards)")
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
    scratch = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_adapters."))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        rows = [row for pem in PEMS for row in run_pem(pem, scratch, args.repeats)]
        record("adapters", recorded(rows), variant="variant")
        if args.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(json.dumps(rows, indent=1) + "\n")
        print(table(rows))
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)


def table(rows: list[dict]) -> str:
    """The markdown table of RESULTS.md, derived from the rows."""
    first = rows[0]
    lines = [
        f"{first['device']}; torch {first['torch']}, extsub {first['version']}, {first['date']}; medians of "
        f"{first['repeats']} runs of each variant, interleaved",
        "",
        "| pair | `extsub-merge` process (s) | `merge()` process (s) | of which start-up and exit | of which the merge "
        "| authors' pattern (s) | speed-up, wall | merge / authors' CPU (s) | vs float64 oracle: ours | authors' |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pem in PEMS:
        by = {r["variant"]: r for r in rows if r.get("pem") == pem}
        if not by:
            continue
        cli, ours, authors, errors = by["cli"], by["merge"], by["authors"], by["errors"]["errors"]
        cells = [
            cli["shape"],
            f"{cli['wall_s']:.2f}",
            f"{ours['wall_s']:.2f}",
            f"{ours['startup_s']:.2f} s ({ours['startup_s'] / ours['wall_s']:.0%})",
            f"{ours['work_s']:.2f} s ({ours['work_s'] / ours['wall_s']:.0%})",
            f"{authors['work_s']:.2f}",
            f"{authors['work_s'] / ours['work_s']:.1f}×",
            f"{ours['cpu_s']:.2f} / {authors['cpu_s']:.2f}",
            _error_cell(errors["merge"]),
            _error_cell(errors["authors"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _error_cell(error: dict) -> str:
    return (
        f"{error['identical_share']:.2%} bit-identical, max {error['max_ulps']:,} ulp; per row ≤ "
        f"{error['max_row_rel_error']:.1e}"
    )


if __name__ == "__main__":
    main()
