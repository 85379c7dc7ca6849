"""Before and after in one run: bench_ext_sub.py and bench_merge.py of two revisions, taking turns on this machine.

Each revision is checked out into a temporary git worktree and measured with its own benchmark scripts and its own
`extsub_kernels` (PYTHONPATH set to its worktree; the script checks which package each run imported). The rounds
alternate the order (A B, B A, A B, ...), so a machine whose load drifts slows both alike; each figure is the median
over the rounds, and the ratio is B ÷ A (above 1: B is slower or bigger). The copy of the same bytes (`ms.copy`) and
the I/O floor (`seconds.floor`) are measured beside ours in every run: their ratios show how much of a difference
is the machine's rather than the code's.

    python benchmarks/compare_revisions.py main HEAD                       # the defaults below, 3 rounds
    python benchmarks/compare_revisions.py HEAD~2 HEAD --rounds 5 --op "--shapes 4096x4096 --dtypes bf16,fp32" \\
        --merge "--layers 2 --runs floor,sub,ext-sub --cache warm --repeat 1" --out compare.json

Nothing is appended to results.csv (the rows of both revisions go to a temporary folder); --out writes the
comparison as JSON rows (benchmark, configuration, figure, A, B, ratio, each round's values).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OP_ARGS = "--device cpu --shapes 4096x4096,11008x4096 --dtypes bf16,fp32 --reps 15 --loop-shape 1x1"
MERGE_ARGS = "--layers 2 --runs floor,sub,ext-sub --cache warm --repeat 1"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _run(tree: Path, script: str, args: list[str], scratch: Path) -> None:
    """One benchmark script of the revision in `tree`, importing that revision's package."""
    env = os.environ | {"PYTHONPATH": str(tree), "EXTSUB_RESULTS_CSV": str(scratch / "results.csv")}
    env.pop("EXTSUB_BENCH_CODE", None)
    command = [sys.executable, str(tree / "benchmarks" / script), *args]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _imported(tree: Path) -> str:
    """Where `import extsub_kernels` resolves with the revision's PYTHONPATH (must be inside its worktree)."""
    env = os.environ | {"PYTHONPATH": str(tree)}
    code = "import extsub_kernels; print(extsub_kernels.__file__)"
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True).stdout


def op_figures(folder: Path) -> dict[tuple[str, str], float]:
    """(configuration, figure) → value from bench_ext_sub's JSON rows: each variant's median milliseconds."""
    rows = json.loads(next(folder.glob("*.json")).read_text())
    return {
        (f"{'x'.join(map(str, r['shape']))} {r['dtype']}", f"ms.{variant}"): ms
        for r in rows
        for variant, ms in r["ms"].items()
    }


def merge_figures(folder: Path) -> dict[tuple[str, str], float]:
    """(configuration, figure) → value from bench_merge's JSON rows: each run's median seconds and peak RSS."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in json.loads(next(folder.glob("*.json")).read_text()):
        if "seconds" in r:
            config = f"{r['layers']} layers, {r['cache']}"
            values.setdefault((config, f"seconds.{r['run']}"), []).append(r["seconds"])
            values.setdefault((config, f"peak_rss_gb.{r['run']}"), []).append(r["peak_rss_bytes"] / 1e9)
    return {key: statistics.median(v) for key, v in values.items()}


BENCHES = {"op": ("bench_ext_sub.py", "--out-dir", op_figures), "merge": ("bench_merge.py", "--results", merge_figures)}


def compare(rev_a: str, rev_b: str, rounds: int, args: dict[str, list[str]], log=print) -> list[dict]:
    """Run the benchmarks of both revisions `rounds` times, alternating, and return the comparison rows."""
    names = {"A": _git("rev-parse", "--short", rev_a), "B": _git("rev-parse", "--short", rev_b)}
    scratch = Path(tempfile.mkdtemp(prefix="extsub-compare-"))
    trees = {side: scratch / f"tree-{side}-{commit}" for side, commit in names.items()}
    measured: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    try:
        for side, tree in trees.items():
            _git("worktree", "add", "--detach", "--quiet", str(tree), names[side])
            where = _imported(tree)
            if not where.startswith(str(tree)):
                raise RuntimeError(f"revision {names[side]}: extsub_kernels came from {where!r}, not its worktree")
            log(f"{side} = {names[side]} ({_git('log', '-1', '--format=%s', names[side])[:70]})")
        for number in range(rounds):
            for side in ("A", "B") if number % 2 == 0 else ("B", "A"):
                for bench, bench_args in args.items():
                    script, out_flag, figures = BENCHES[bench]
                    out = scratch / f"out-{side}-{bench}-{number}"
                    _run(trees[side], script, [*bench_args, out_flag, str(out)], scratch)
                    for (config, figure), value in figures(out).items():
                        measured.setdefault((bench, config, figure), {"A": [], "B": []})[side].append(value)
                    log(f"round {number + 1}/{rounds}: {bench} of {side} ({names[side]}) done")
    finally:
        for tree in trees.values():
            if tree.exists():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
    rows = []
    for (bench, config, figure), sides in measured.items():
        if sides["A"] and sides["B"]:
            a, b = statistics.median(sides["A"]), statistics.median(sides["B"])
            row = {"benchmark": bench, "configuration": config, "figure": figure, "A": a, "B": b}
            rows.append(row | {"ratio": b / a if a else float("nan"), "rounds": sides, "commits": names})
    return rows


def markdown(rows: list[dict]) -> str:
    """The comparison as a table: medians of A and B and their ratio per configuration and figure."""
    commits, rounds = rows[0]["commits"], len(rows[0]["rounds"]["A"])
    same = subprocess.run(["git", "diff", "--quiet", commits["A"], commits["B"], "--", "extsub_kernels"], cwd=ROOT)
    lines = [
        f"A = {commits['A']}, B = {commits['B']}: medians of {rounds} alternating rounds; B ÷ A above 1: B slower.",
        *(
            ["extsub_kernels is the same in both: every ratio here is the machine's noise."]
            if same.returncode == 0
            else []
        ),
        "",
        "| benchmark | configuration | figure | A | B | B ÷ A |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['configuration']} | {r['figure']} | {r['A']:.4g} | {r['B']:.4g} | "
            f"{r['ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a", help="the revision before (any git revision: a branch, a commit, HEAD~2)")
    parser.add_argument("rev_b", help="the revision after")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each benchmark per revision, alternating")
    parser.add_argument("--op", default=OP_ARGS, help="bench_ext_sub.py's arguments ('' skips it)")
    parser.add_argument("--merge", default=MERGE_ARGS, help="bench_merge.py's arguments ('' skips it)")
    parser.add_argument("--out", type=Path, help="also write the comparison rows (JSON) here")
    args = parser.parse_args(argv)
    benches = {name: shlex.split(text) for name, text in (("op", args.op), ("merge", args.merge)) if text.strip()}
    if not benches:
        parser.error("nothing to run: --op and --merge are both empty")
    rows = compare(args.rev_a, args.rev_b, args.rounds, benches, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
