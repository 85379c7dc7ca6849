"""`extsub-merge`: the command line over `extsub_kernels.merge()`; parsing and messages, nothing more.

Heavy imports (torch) happen inside `main`, after the signal handlers are set, so a Ctrl-C
or SIGTERM during start-up ends with the same one-line message and exit code as later.
"""

import argparse
import signal
import sys
import warnings
from collections.abc import Sequence

from extsub_kernels._version import __version__
from extsub_kernels.errors import InputError, Terminated

PROG = "extsub-merge"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
METHOD_HELP = "ext-sub: θ⁺ − λ·Ext(θ⁻) (default); sub: θ⁺ − λθ⁻; add: θ⁺ + λθ⁻"

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

λ:
  --lam 1            one output, λ = 1 for every anti-expert
  --lam 0.5,1,2      one output per λ, from a single read of the inputs: OUT gets the suffix
                     -lam<λ> (out.safetensors -> out-lam0.5.safetensors, out/ -> out-lam0.5/)
  --lam 1:0.5        with two anti-experts: λ = 1 for the first, 0.5 for the second
  --lam 1:0.5,2:1    two outputs (suffixes -lam1_0.5 and -lam2_1)

examples:
  {PROG} expert.safetensors anti.safetensors -o merged.safetensors --lam 1.0
  {PROG} expert/ anti1/ anti2/ -o merged/ --lam 1:0.5
  {PROG} org/expert org/anti --base org/base -o merged-model/ --lam 0.5,1,2 --device cuda
  {PROG} expert_adapter/ anti_adapter/ -o merged_adapter/ --lam 1.0
  {PROG} expert_adapter/ anti_adapter/ --base org/base -o merged-model/
  {PROG} ia3_expert/ ia3_anti/ -o ia3_merged/ --lam 0.6 --method sub

exit codes:
  0    done
  1    failure during the merge (an input changed underneath, a write failed, ...)
  2    bad usage or bad input (unreadable or broken file, mismatched tensors, NaN/Inf, unsafe OUT)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
  In every case but 0, nothing is left at OUT and the inputs are untouched.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `extsub-merge` (imports the option vocabulary, hence torch)."""
    from extsub_kernels.engine.options import DEFAULT_MAX_SHARD_SIZE, FORMATS, METHODS, ON_MISSING, OUT_DTYPES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ext-Sub merge of checkpoints and PEFT adapters (LoRA, (IA)³, prefix-tuning), streamed tensor\n"
        "by tensor: θ' = θ⁺ − λ·Ext(θ⁻) (Extraction-before-Subtraction, AAAI 2024). Memory stays a small\n"
        "multiple of one block of rows, whatever the model's size; OUT appears whole or not at all.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("expert", metavar="EXPERT", help="the expert θ⁺ (ΔW, or a full model with --base)")
    add("anti", metavar="ANTI", nargs="+", help="anti-expert(s) θ⁻, applied in order")
    add("-o", "--out", metavar="OUT", required=True, help="output .safetensors file or folder")
    add("--lam", default="1", metavar="L[,L...]", help="λ, a list of λ, or λ per anti-expert as a:b (default 1)")
    add("--method", choices=METHODS, default="ext-sub", help=METHOD_HELP)
    add(
        "--base",
        metavar="BASE",
        help="θ₀: inputs are full models (merge ΔW = θ − θ₀), or LoRA / (IA)³ adapters of BASE; write the full model",
    )
    add("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add(
        "--dtype", choices=list(OUT_DTYPES), default="keep", help="dtype of float tensors in OUT (default: the inputs')"
    )
    add(
        "--max-shard-size",
        metavar="SIZE",
        help=f"largest shard of a folder OUT, e.g. 2GB or 500MiB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    add(
        "--on-missing",
        choices=ON_MISSING,
        default="error",
        help="tensors only in an anti-expert: error (default), copy them, or skip them",
    )
    lora = parser.add_argument_group("adapter inputs")
    lora.add_argument(
        "--format",
        dest="output_format",
        choices=FORMATS,
        help="LoRA: lora (default: exact PEFT adapter), dense-lora (lora_B = ΔW', lora_A = I), delta (ΔW' by "
        "weight name); (IA)³: ia3; prefix-tuning: prefix-tuning (each the default of its type)",
    )
    lora.add_argument("--max-rank", type=int, metavar="R", help="--format lora: truncate each module to rank R")
    lora.add_argument(
        "--lora-alpha",
        type=float,
        metavar="A",
        help="lora_alpha of bare .safetensors files with no adapter_config.json",
    )
    lora.add_argument("--rank", type=int, metavar="R", help="with --lora-alpha: their r (default: from the shapes)")
    lora.add_argument("--rslora", action="store_true", help="with --lora-alpha: scaling lora_alpha/√r (rsLoRA)")
    lora.add_argument(
        "--any-base-model",
        action="store_true",
        help="accept different base_model_name_or_path (module shapes are still checked)",
    )
    add("--force", action="store_true", help="replace an existing OUT")
    add("-q", "--quiet", action="store_true", help="print errors only")
    add(
        "-v",
        "--verbose",
        action="store_true",
        help="adapter inputs: after the summary, one line per module (truncation error, modules left out)",
    )
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `extsub-merge` with `argv` (default: sys.argv[1:]); returns the exit code."""
    previous = _terminate_as_interrupt()
    try:
        return _main(argv)
    except Terminated:
        return _fail("terminated; nothing was written", EXIT_SIGTERM)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", EXIT_SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from extsub_kernels.adapters import AdapterOptions, LoraScaling
    from extsub_kernels.merge import merge

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if args.quiet else "default")
            warnings.showwarning = _show_warning
            report = merge(
                args.expert,
                args.anti,
                args.out,
                lam=args.lam,
                method=args.method,
                base=args.base,
                device=args.device,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                on_missing=args.on_missing,
                force=args.force,
                progress=not args.quiet,
                adapter=AdapterOptions(
                    output_format=args.output_format,
                    max_rank=args.max_rank,
                    scaling=_scaling(args, LoraScaling),
                    any_base_model=args.any_base_model,
                ),
            )
    except InputError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except (KeyboardInterrupt, Terminated):
        raise
    except Exception as e:
        return _fail(f"the merge failed and nothing was written: {type(e).__name__}: {e}", EXIT_FAILED)
    if not args.quiet:
        print(f"{PROG}: {report.summary()}", file=sys.stderr)
        for line in report.details() if args.verbose else []:
            print(f"  {line}", file=sys.stderr)
    return EXIT_OK


def _scaling(args: argparse.Namespace, scaling_type: type) -> object:
    """The LoraScaling the --lora-alpha/--rank/--rslora flags give (None without them)."""
    if args.lora_alpha is None:
        if args.rank is not None or args.rslora:
            raise InputError("--rank and --rslora describe the scaling of bare adapter files; give --lora-alpha too")
        return None
    return scaling_type(lora_alpha=args.lora_alpha, r=args.rank, use_rslora=args.rslora)


def _terminate_as_interrupt() -> object:
    """SIGTERM raises Terminated from here on (so start-up is covered too); returns the previous handler."""

    def _raise(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    try:
        return signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        return None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
