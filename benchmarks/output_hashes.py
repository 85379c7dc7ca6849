"""The sha256 of every file a fixed set of example merges writes: run it on two commits to show a change kept every
output byte-identical (dense methods and λ lists, shards, dtypes, --base, each PEM type and --format).

    python benchmarks/output_hashes.py --out hashes.json      # then compare two such files with --compare
"""

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "tests" / "data" / "trained"
EXAMPLE = ROOT / "examples"

# (name, arguments after `extsub-merge`); {out} is the output path, {T} the trained fixtures, {X} the examples.
CASES = [
    ("dense-ext-sub", "{X}/expert.safetensors {X}/anti.safetensors -o {out}/m.safetensors"),
    ("dense-sub-lams", "{X}/expert.safetensors {X}/anti.safetensors -o {out}/m.safetensors --method sub --lam 0.5,1"),
    (
        "dense-add-bf16",
        "{X}/expert.safetensors {X}/anti.safetensors -o {out}/m.safetensors --method add --dtype bfloat16",
    ),
    ("dense-shards", "{X}/expert.safetensors {X}/anti.safetensors -o {out}/m --max-shard-size 20KB --lam 0.7"),
    ("full-base", "{T}/llama-full-expert {T}/llama-full-anti --base {T}/base-llama -o {out}/m"),
    ("full-gpt2", "{T}/gpt2-full-expert {T}/gpt2-full-anti --base {T}/base-gpt2 -o {out}/m --lam 0.4"),
    ("lora", "{T}/llama-lora-expert {T}/llama-lora-anti -o {out}/m"),
    ("lora-max-rank", "{T}/llama-lora-expert {T}/llama-lora-anti -o {out}/m --max-rank 2"),
    ("lora-dense", "{T}/llama-lora-expert {T}/llama-lora-anti -o {out}/m --format dense-lora --method sub"),
    ("lora-delta", "{T}/gpt2-lora-expert {T}/gpt2-lora-anti -o {out}/m.safetensors --format delta"),
    ("lora-base", "{T}/llama_gqa-lora-expert {T}/llama_gqa-lora-anti -o {out}/m --base {T}/base-llama_gqa"),
    ("ia3", "{T}/llama-ia3-expert {T}/llama-ia3-anti -o {out}/m --lam 0.5,1"),
    ("ia3-base", "{T}/gpt2-ia3-expert {T}/gpt2-ia3-anti -o {out}/m --base {T}/base-gpt2"),
    ("prefix", "{T}/llama-prefix-expert {T}/llama-prefix-anti -o {out}/m"),
    ("prefix-proj", "{T}/gpt2-prefix_projection-expert {T}/gpt2-prefix_projection-anti -o {out}/m --method sub"),
    ("prefix-gqa", "{T}/llama_gqa-prefix-expert {T}/llama_gqa-prefix-anti -o {out}/m --lam 2"),
]


def run_cases() -> dict[str, dict[str, str]]:
    """Each case in one fixed folder with relative paths, since the command line is part of an output's metadata."""
    work = Path(tempfile.gettempdir()) / "extsub-output-hashes"
    lock = open(f"{work}.lock", "w")  # noqa: SIM115 - held until the process ends: runs at once take turns
    fcntl.flock(lock, fcntl.LOCK_EX)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(TRAINED, work / "T")
    shutil.copytree(EXAMPLE, work / "X", ignore=shutil.ignore_patterns("real_model", "*.py"))
    hashes: dict[str, dict[str, str]] = {}
    try:
        for name, arguments in CASES:
            out = work / "out" / name
            out.mkdir(parents=True)
            args = [*arguments.format(out=f"out/{name}", T="T", X="X").split(), "--device", "cpu", "-q"]
            command = [sys.executable, "-m", "extsub_kernels.cli.merge", *args]
            done = subprocess.run(command, capture_output=True, text=True, cwd=work)
            if done.returncode:
                hashes[name] = {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
                continue
            hashes[name] = {
                str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*"))
                if p.is_file()
            }
        for command in ("merge", "inspect", "scan"):  # every flag and its help, byte for byte
            done = subprocess.run(
                [sys.executable, "-m", f"extsub_kernels.cli.{command}", "--help"], capture_output=True, env=_WIDE
            )
            hashes[f"help-{command}"] = {"--help": hashlib.sha256(done.stdout).hexdigest()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return hashes


_WIDE = {**os.environ, "COLUMNS": "100"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the hashes there as JSON")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two such files")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        files = sum(len(v) for v in before.values())
        print(f"{len(before)} merges, {files} files: " + ("all identical" if not differ else f"differ: {differ}"))
        return 1 if differ else 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    hashes = run_cases()
    text = json.dumps(hashes, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    failed = [k for k, v in hashes.items() if "error" in v]
    print(
        f"{len(hashes)} merges, {sum(len(v) for v in hashes.values())} files"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
