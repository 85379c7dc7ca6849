"""`extsub-merge`: the command line over `extsub_kernels.merge()`; parsing, recipes and messages, nothing more.

Options come from three places, later ones winning: `merge()`'s defaults, a recipe (`--config`), the flags given.
"""

import argparse
import sys
from typing import Any

from extsub_kernels.cli.common import (
    EXIT_OK,
    add_adapter_input_flags,
    add_closing_flags,
    command_main,
    command_parser,
    guarded,
    python_options,
    say,
)

PROG = "extsub-merge"

EPILOG = f"""\
inputs (EXPERT, ANTI, --base):
  a .safetensors file; a folder of shards (with *.safetensors.index.json, or all *.safetensors
  in it); or a Hugging Face repo id org/name[@revision] (safetensors, json and tokenizer files
  only; from the cache when HF_HUB_OFFLINE=1). Pickle checkpoints (.bin .pt .pth .ckpt) are refused.

PEFT adapters (EXPERT and ANTI; all adapters of one type or all dense, never mixed):
  PEFT adapter folders, hub ids of adapters, and bare .safetensors files of adapter weights are
  detected by their keys and adapter_config.json (peft_type) and merged exactly in their own space.
  LoRA: without forming ΔW. A bare file takes its scaling from the adapter_config.json beside it,
  or from --lora-alpha (and --rank, --rslora).
  --format lora        (default) a PEFT adapter folder of rank r⁺ + r⁻ per module, exact;
                       --max-rank R truncates it (SVD in the factored space, error reported)
  --format dense-lora  the paper's layout: lora_B = ΔW', lora_A = I (one adapter_model.safetensors;
                       sharded only with --max-shard-size, which PEFT does not read)
  --format delta       ΔW' keyed by the base model's weight names (a .safetensors file or a folder)
  --base MODEL         the full model θ₀ + ΔW' instead (config and tokenizer files from MODEL);
                       the adapters' modules_to_save merge as full weights against θ₀
  (IA)³: on the task vectors d = l − 1, each ia3_l vector one row: l' = 1 + d⁺ − λ·Ext(d⁻); written
  as an (IA)³ adapter folder (--format ia3, the only one); --base folds l' into MODEL's weights.
  prefix-tuning: on prompt_embeddings itself, one row per token, layer, key/value and head (geometry
  from adapter_config.json); written as a prefix-tuning folder; --base is refused (no weight changes).

outputs:
  OUT ending in .safetensors is one file; any other OUT is a folder (model.safetensors, or shards
  and model.safetensors.index.json past --max-shard-size). With --base a folder OUT also gets the
  expert's config, generation and tokenizer files (adapter inputs: the base's). Adapter outputs
  (every format but delta) are folders: adapter_model.safetensors and adapter_config.json.
  Every folder OUT gets a model card (README.md) and its recipe (extsub_recipe.yaml); every
  weights file's __metadata__ records the version, the command, the inputs' commits and hashes.

seeing into a merge:
  --dry-run          resolve the inputs, read their headers, plan, and print what would happen per
                     tensor or module and the files OUT would get, with their sizes; write nothing
  --report FILE.json the run's record: inputs (resolved hub commits, header sha256), options, outputs
                     and their files, times, bytes, peak memory, and per merged tensor or module
                     cos(p, m) over rows, the deficiency share and the relative change at each λ
                     (--report - prints it on stdout)
  -v, --verbose      one line per tensor or module, with those statistics
  extsub-inspect EXPERT ANTI -o DIR   the same statistics without merging (report.json/.md/.png)

recipes:
  --config recipe.yaml takes every option from a YAML file (keys: expert, anti, base, out, and the
  long options with _ for -, e.g. max_shard_size); flags given on the command line override it.
  {PROG} --config OUT/extsub_recipe.yaml -o AGAIN/  makes the same tensors again, byte for byte.

λ:
  --lam 1            one output, λ = 1 for every anti-expert
  --lam 0.5,1,2      one output per λ, from a single read of the inputs: OUT gets the suffix
                     -lam<λ> (out.safetensors -> out-lam0.5.safetensors, out/ -> out-lam0.5/)
  --lam 1:0.5        with two anti-experts: λ = 1 for the first, 0.5 for the second
  --lam 1:0.5,2:1    two outputs (suffixes -lam1_0.5 and -lam2_1)

examples:
  {PROG} expert.safetensors anti.safetensors -o merged.safetensors --lam 1.0
  {PROG} expert/ anti/ -o merged/ --dry-run
  {PROG} expert/ anti/ -o merged/ --report merged-report.json
  {PROG} expert/ anti1/ anti2/ -o merged/ --lam 1:0.5
  {PROG} org/expert org/anti --base org/base -o merged-model/ --lam 0.5,1,2 --device cuda
  {PROG} expert_adapter/ anti_adapter/ -o merged_adapter/ --lam 1.0
  {PROG} expert_adapter/ anti_adapter/ --base org/base -o merged-model/
  {PROG} ia3_expert/ ia3_anti/ -o ia3_merged/ --lam 0.6 --method sub
  {PROG} --config merged/extsub_recipe.yaml -o merged-again/

exit codes:
  0    done
  1    failure during the merge (an input changed underneath, a write failed, ...)
  2    bad usage or bad input (unreadable or broken file, mismatched tensors, NaN/Inf, unsafe OUT)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
  In every case but 0, nothing is left at OUT and the inputs are untouched, except a Ctrl-C or
  SIGTERM that came while the outputs were moved into place: it waits until all of them are,
  and the message names them (each complete). OUT is never left half-written, even after
  SIGKILL; the next run into the same folder cleans up what a killed run left there.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `extsub-merge`; options not given are absent from its namespace (recipes fill them)."""
    from extsub_kernels._names import DEFAULT_MAX_SHARD_SIZE, FORMATS, METHODS, ON_MISSING, OUT_DTYPE_NAMES, method_help

    parser = command_parser(
        PROG,
        usage=f"{PROG} EXPERT ANTI [ANTI ...] -o OUT [options]\n       {PROG} --config recipe.yaml [-o OUT] [options]",
        description="Ext-Sub merge of checkpoints and PEFT adapters (LoRA, (IA)³, prefix-tuning), streamed tensor\n"
        "by tensor: θ' = θ⁺ − λ·Ext(θ⁻) (Extraction-before-Subtraction, AAAI 2024). Memory stays a small\n"
        "multiple of one block of rows, whatever the model's size; OUT appears whole or not at all.",
        epilog=EPILOG,
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add(
        "inputs",
        nargs="*",
        metavar="EXPERT ANTI",
        help="the expert θ⁺ (ΔW, or a full model with --base), then the anti-expert(s) θ⁻, applied in order",
    )
    add("-o", "--out", metavar="OUT", help="output .safetensors file or folder")
    add("--config", metavar="RECIPE", help="take every option from a YAML recipe; flags given here override it")
    add("--lam", metavar="L[,L...]", help="λ, a list of λ, or λ per anti-expert as a:b (default 1)")
    add("--method", choices=METHODS, help=method_help())
    add(
        "--base",
        metavar="BASE",
        help="θ₀: inputs are full models (merge ΔW = θ − θ₀), or LoRA / (IA)³ adapters of BASE; write the full model",
    )
    add("--device", help="auto (CUDA when available; default), cpu, cuda or cuda:N")
    add("--dtype", choices=OUT_DTYPE_NAMES, help="dtype of float tensors in OUT (default keep: the inputs')")
    add(
        "--max-shard-size",
        metavar="SIZE",
        help=f"largest shard of a folder OUT, e.g. 2GB or 500MiB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    add(
        "--on-missing",
        choices=ON_MISSING,
        help="tensors only in an anti-expert: error (default), copy them, or skip them",
    )
    add(
        "--transposed",
        action=argparse.BooleanOptionalAction,
        help="GPT-2 Conv1D-named weights (c_attn, c_proj, c_fc) are stored (in, out) / are not "
        "(default: from config.json, else key names and shapes)",
    )
    lora = parser.add_argument_group("adapter inputs")
    lora.add_argument(
        "--format",
        choices=FORMATS,
        help="LoRA: lora (default: exact PEFT adapter), dense-lora (lora_B = ΔW', lora_A = I), delta (ΔW' by "
        "weight name); (IA)³: ia3; prefix-tuning: prefix-tuning (each the default of its type)",
    )
    lora.add_argument("--max-rank", type=int, metavar="R", help="--format lora: truncate each module to rank R")
    add_adapter_input_flags(lora.add_argument)
    seeing = parser.add_argument_group("seeing into a merge")
    seeing.add_argument("--dry-run", action="store_true", help="plan and print what would be written; write nothing")
    seeing.add_argument("--report", metavar="FILE.json", help="write the run's JSON record there (- for stdout)")
    seeing.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="after the summary, one line per tensor or module with its row statistics",
    )
    add_closing_flags(parser, force_help="replace an existing OUT (and --report file)")
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    from extsub_kernels.merging import merge

    code, values = guarded(PROG, lambda: _option_values(vars(args), parser))
    if code != EXIT_OK:
        return code
    quiet = bool(values.get("quiet"))
    code, report = guarded(PROG, lambda: merge(**python_options(values, merge), command=command), "merge", quiet=quiet)
    if code != EXIT_OK or quiet:
        return code
    if report.mode == "dry-run":
        for line in report.details() + report.file_lines():
            say(f"  {line}")
    say(f"{PROG}: {report.summary()}")
    for line in report.details() if values.get("verbose") and report.mode != "dry-run" else []:
        say(f"  {line}")
    return code


def _option_values(given: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every option: the recipe's (--config) overridden by the flags; a usage error without EXPERT, ANTI or OUT."""
    from extsub_kernels.adapters.peft import FORMATS
    from extsub_kernels.engine.recipe import load_recipe

    recipe = load_recipe(given["config"], {"format": FORMATS}) if "config" in given else {}
    inputs = given.pop("inputs", [])
    values = {**recipe, **given}
    if inputs:
        values["expert"], values["anti"] = inputs[0], inputs[1:]
    if isinstance(values.get("anti"), str):
        values["anti"] = [values["anti"]]
    if not values.get("expert") or not values.get("anti"):
        parser.error("give EXPERT and at least one ANTI (or a --config recipe that names expert and anti)")
    if not values.get("out"):
        parser.error("give -o OUT (or out: in the --config recipe)")
    return values


main = command_main(PROG, build_parser, _run)

if __name__ == "__main__":
    sys.exit(main())
