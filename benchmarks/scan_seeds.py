"""What training put into the tests' toy models, and the paper's claims on them, across training seeds.

The tests load weights trained once and committed (`tests/data/trained/`) and assert mechanisms only;
what those models learned, and what Ext-Sub does to them, is measured here instead. For each seed
this script trains the fixtures of `tests/trained_fixtures.py` again with that SEED (the base model,
the data split and every adapter change with it) and, for the LLaMA pair of each PEM type, records:

- what each role learned (completion tokens of the held-out sets): the expert below the base on
  KEEP, the anti-expert below the base on FORGET, each better than the other on its own task; the
  expert better on completions than on whole lines (whose start word is a guess); for full models,
  the anti-expert's greedy continuations repetitive (rep-4 > 0.5) and the expert's not;
- the scan over λ = 0, 0.5, ..., 2 with both methods (keep.jsonl, forget.jsonl): FORGET-NLL rising
  with λ, and KEEP-NLL higher under sub than under ext-sub at the largest λ (the paper's Figure 1).

    python benchmarks/scan_seeds.py                       # 8 seeds × lora, ia3, full (~10 min on 2 cores)
    python benchmarks/scan_seeds.py --table benchmarks/results/scan-seeds-2026-12-07-cpu.json
"""

import argparse
import json
import sys
import tempfile
import warnings
from itertools import pairwise
from pathlib import Path

from _common import ROOT, environment, record

sys.path.insert(0, str(ROOT / "tests"))

SEEDS = (20240221, 1, 2, 3, 4, 5, 6, 7)  # the first is the tests' own
KINDS = ("lora", "ia3", "full")
GRID = "0:2:0.5"


def learned(fixtures, kind: str) -> dict[str, bool]:
    """What the LLaMA pair of `kind` learned (the claims the tests once asserted on freshly trained weights)."""
    import peft
    import transformers

    from extsub_kernels.lambda_scan.metrics import generate_greedy, load_examples, mean_nll, mean_rep_n

    import trained_fixtures as tf

    def model(role):
        if role == "base":
            return fixtures.load_base("llama")
        if kind == "full":
            return transformers.AutoModelForCausalLM.from_pretrained(fixtures.adapter("llama", kind, role)).eval()
        return peft.PeftModel.from_pretrained(fixtures.load_base("llama"), fixtures.adapter("llama", kind, role)).eval()

    tokenizer = fixtures.tokenizer
    sets = {name: load_examples(fixtures.eval_set(f"{name}.jsonl"), tokenizer) for name in ("keep", "forget")}
    lines = load_examples(fixtures.eval_set("keep.txt"), tokenizer)
    nets = {role: model(role) for role in ("base", "expert", "anti")}
    nll = {(role, name): mean_nll(net, examples) for role, net in nets.items() for name, examples in sets.items()}
    out = {
        "expert below the base on keep (by 0.5)": nll["expert", "keep"] < nll["base", "keep"] - 0.5,
        "anti below the base on forget (by 0.5)": nll["anti", "forget"] < nll["base", "forget"] - 0.5,
        "expert below anti on keep (by 0.3)": nll["expert", "keep"] < nll["anti", "keep"] - 0.3,
        "anti below expert on forget (by 0.3)": nll["anti", "forget"] < nll["expert", "forget"] - 0.3,
        "expert: completions below whole lines": nll["expert", "keep"] < mean_nll(nets["expert"], lines),
    }
    if kind == "full":
        prompts = [tf.split_line(line)[0] for line in tf.task_lines(tf.TASKS["anti"], "eval")[:8]]
        rep = {
            role: mean_rep_n([g.token_ids for g in generate_greedy(nets[role], tokenizer, prompts, 12)], 4)
            for role in ("expert", "anti")
        }
        out["rep-4: anti above 0.5, expert below"] = rep["anti"] > 0.5 and not rep["expert"] >= 0.5
    return out


def measure(seeds: tuple[int, ...], kinds: tuple[str, ...]) -> list[dict]:
    """One row per (seed, kind): what the pair learned, and the scan's (method, λ, KEEP NLL, FORGET NLL) points."""
    from extsub_kernels import scan

    import trained_fixtures

    rows = []
    for seed in seeds:
        trained_fixtures.SEED = seed
        with tempfile.TemporaryDirectory(prefix=f"scan-seeds-{seed}-") as tmp:
            fixtures = trained_fixtures.TrainedFixtures(Path(tmp))
            for kind in kinds:
                result = scan(
                    fixtures.adapter("llama", kind, "expert"),
                    fixtures.adapter("llama", kind, "anti"),
                    base=fixtures.base("llama"),
                    keep=fixtures.eval_set("keep.jsonl"),
                    forget=fixtures.eval_set("forget.jsonl"),
                    lam=GRID,
                    method="ext-sub,sub",
                )
                points = [[r.method, r.lam, r.keep_nll, r.forget_nll] for r in result]
                rows.append({"seed": seed, "kind": kind, "points": points, "learned": learned(fixtures, kind)})
                print(seed, kind, "done", file=sys.stderr, flush=True)
    return rows


def claims(points: list) -> dict[str, bool]:
    """The claims for one scan: FORGET-NLL above λ = 0's at the first λ, and at every λ rising (each method);
    KEEP-NLL higher under sub than under ext-sub at the largest λ."""
    expert = next(p for p in points if p[0] == "expert")
    out = {}
    for method in ("ext-sub", "sub"):
        curve = [expert] + [p for p in points if p[0] == method]
        out[f"forget rises at the first λ ({method})"] = curve[1][3] > expert[3]
        out[f"forget rises at every λ ({method})"] = all(b[3] > a[3] for a, b in pairwise(curve))
    last = {p[0]: p for p in points if p[1] == max(q[1] for q in points)}
    out["keep: sub above ext-sub at the largest λ"] = last["sub"][2] > last["ext-sub"][2]
    return out


def _all_claims(row: dict) -> dict[str, bool]:
    return {**row.get("learned", {}), **claims(row["points"])}


def table(rows: list[dict]) -> str:
    """Per PEM type and claim: the seeds where it holds, of all seeds ("–" where a claim is not measured for a type)."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    names = list(dict.fromkeys(name for r in rows for name in _all_claims(r)))
    lines = ["| claim | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name in names:
        cells = []
        for kind in kinds:
            held = [_all_claims(r)[name] for r in rows if r["kind"] == kind and name in _all_claims(r)]
            cells.append(f"{sum(held)}/{len(held)}" if held else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", type=Path, help="also write the rows (JSON) to this file")
    parser.add_argument("--table", type=Path, metavar="FILE", help="print the markdown table from a results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return
    warnings.simplefilter("ignore")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    env = environment("cpu")
    rows = measure(tuple(args.seeds), tuple(args.kinds))
    record("scan-seeds", recorded(rows))
    if args.out:
        args.out.write_text(json.dumps({"grid": GRID, "rows": rows, **env}, indent=2) + "\n")
    print(table(rows))


def recorded(rows: list[dict]) -> list[dict]:
    """The rows as results.csv keeps them: per PEM kind, of how many seeds each claim held ("seeds_held.<claim>")."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        claims_of = [_all_claims(r) for r in rows if r["kind"] == kind]
        held = {name: sum(c.get(name, False) for c in claims_of) for c in claims_of for name in c}
        out.append({"shape": kind, "seeds": len(claims_of), "seeds_held": held})
    return out


if __name__ == "__main__":
    main()
