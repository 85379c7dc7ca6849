"""`extsub-scan`: the command line over `extsub_kernels.scan()`; parsing and messages, nothing more.

Exit codes, signals and one-line messages come from common.py. Heavy imports (torch, transformers) happen inside
`main`, after the signal handlers are set, so a Ctrl-C or SIGTERM at any moment ends with one line and its exit code."""

import argparse
import sys

from extsub_kernels import _signals
from extsub_kernels.cli.common import (
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    add_closing_flags,
    command_main,
    command_parser,
    fail,
    guarded,
    say,
)
from extsub_kernels.errors import ScanInterrupted

PROG = "extsub-scan"
# The guards of the recommendation: (flag, Guards field, what it allows).
GUARD_FLAGS = (
    ("--max-rep-increase", "max_rep_increase", "rep-4 may rise by this much over λ = 0"),
    ("--max-distinct-drop", "max_distinct_drop", "distinct-2 may fall by this much"),
    ("--max-length-change", "max_length_change", "mean continuation length may change by this fraction"),
    ("--max-end-drop", "max_end_drop", "the share of continuations that end may fall by this much"),
)

# The flags whose value `scan()` takes under the same name.
_OPTIONS = (
    "base keep forget out lam method prompts truth choices chat_template system lm_eval lm_eval_include "
    "max_new_tokens device dtype batch_size max_keep_increase threads workers ray_address save_best save_format force"
)
SCAN_OPTIONS = tuple(_OPTIONS.split())

EPILOG = f"""\
inputs:
  EXPERT, ANTI: PEFT adapters of one type, LoRA, (IA)³ or prefix-tuning (folders, bare .safetensors
  files, hub ids), or full fine-tuned models of MODEL. MODEL (--base) is loaded once with
  transformers, with its own tokenizer.
  KEEP, FORGET: .txt (one example per line), or .jsonl with "text", or "prompt" + "completion"
  (only the completion is scored), or "input_ids" (pre-tokenised, for models without a tokenizer).
  TRUTH: FORGET's prompts, line for line, with true completions (.jsonl "prompt" + "completion").
  CHOICES: .jsonl, one question per line: TruthfulQA's "question", "mc1_targets", "mc2_targets"
  ({{"choices": [...], "labels": [1, 0, ...]}}), or "question", "correct": [...], "incorrect": [...];
  "question_ids" and lists of token ids for pre-tokenised options.
  PROMPTS: .txt (one per line), or .jsonl with "prompt" or "prompt_ids".
  With a chat template (--chat-template auto, the default, when the tokenizer has one), prompts and
  questions are user turns and completions and options what the assistant writes (no leading
  space); without one, a completion starts with its separating space.

what is measured at every (method, λ):
  the merge is installed in the loaded model in place (LoRA: the factored weights are rebuilt,
  ΔW is never formed; (IA)³, prefix-tuning: the merged vectors or prefix; full models: the op on
  the device, the model must fit there), then: mean NLL per token on KEEP, FORGET (and TRUTH);
  with --choices, MC1 and MC2 as TruthfulQA defines them; with --prompts, greedy continuations
  scored by rep-4, distinct-1/2, their mean length and the share that ends (kept in samples.jsonl);
  with --lm-eval, every metric lm-evaluation-harness reports for its tasks, on the model in place.
  λ = 0 is the expert itself and is measured once (method "expert").

λ grid:
  --lam 0:2:0.2        start:stop:step (stop included): 0, 0.2, ..., 2 (the default)
  --lam 0,0.5,1,2      a list; items may mix numbers and ranges: 0:1:0.25,1.5,2
  A λ applies to every anti-expert; λ = 0 is always added.

outputs in SCAN_DIR:
  scan.json   everything: the rows, the recommendation per method, seconds of merges and evaluations
  scan.csv    one line per method and λ;  scan.md  the table;  scan.png  one panel per metric
  samples.jsonl  every continuation: method, lam, prompt, text, tokens, ended
  recommended λ per method: the best MC2 (with --choices; else the FORGET − TRUTH margin, with
  --truth; without either, none) among the λ whose KEEP-NLL rises at most --max-keep-increase
  (relative) over λ = 0 and whose generations stay like λ = 0's (the --max-rep-increase,
  --max-distinct-drop, --max-length-change and --max-end-drop guards). --save-best OUT writes the
  merge at the first --method's recommended λ exactly as extsub-merge does (--format: an adapter format, or
  "model" for the full merged model θ₀ + ΔW' with MODEL as --base).

workers (the ray extra, pip install 'extsub[ray]'):
  --workers N starts N Ray workers on this machine (one GPU each where there are GPUs, else processes
  sharing the cores, --threads split between them); --ray-address ADDR runs them on an existing Ray
  cluster (default: one per GPU, else per node). Each loads MODEL once and takes points from one queue,
  λ = 0 first, then the largest |λ| first; rows reach scan.json as they finish, in λ order. A worker that
  dies has its point run again on another (the row's "attempts" says so). --save-best runs here, once.

examples:
  {PROG} expert_adapter/ anti_adapter/ --base org/base-model --keep keep.jsonl --forget forget.jsonl -o scan/
  {PROG} expert/ anti/ --base base/ --keep keep.jsonl --forget forget.jsonl --choices mc.jsonl \\
      --prompts prompts.txt -o scan/ --lam 0,0.5,1,1.5,2 --method ext-sub,sub --save-best best_adapter/

exit codes:
  0    done
  1    a failure during the scan, or an input changed while it ran (the rows measured before are in SCAN_DIR)
  2    bad usage or bad input (nothing is written)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): the rows measured so far are in SCAN_DIR
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `extsub-scan` (the option names and defaults only: no torch)."""
    from extsub_kernels._names import EVAL_DTYPE_NAMES, SAVE_FORMATS
    from extsub_kernels.lambda_scan.rendering import CHAT_MODES
    from extsub_kernels.lambda_scan.results import Guards

    parser = command_parser(
        PROG,
        "Choose λ by measuring it: load the base once, install the Ext-Sub merge at every λ in place,\n"
        "measure NLL on text to keep and to forget (and repetition of generations), plot and recommend.",
        EPILOG,
        ("the expert θ⁺: an adapter, or a full model of MODEL", "anti-expert(s) θ⁻, applied in order"),
    )
    add = parser.add_argument
    add("--base", metavar="MODEL", required=True, help="the base model, loaded once (a folder or hub id)")
    add("--keep", metavar="KEEP", required=True, help="text the merged model should still model well")
    add("--forget", metavar="FORGET", required=True, help="examples of the deficiency to unlearn")
    add("-o", "--out", metavar="SCAN_DIR", required=True, help="folder for scan.json, scan.csv, scan.md, scan.png")
    add("--lam", default="0:2:0.2", metavar="GRID", help="λ values: start:stop:step and/or a list (default 0:2:0.2)")
    add("--method", default="ext-sub,sub", metavar="M[,M]", help="methods to compare (default ext-sub,sub)")
    add("--prompts", metavar="PROMPTS", help="prompts whose greedy continuations get rep-4, distinct-n, length, ends")
    add("--truth", metavar="TRUTH", help="FORGET's prompts with true completions: the FORGET − TRUTH NLL margin")
    add("--choices", metavar="CHOICES", help="multiple-choice questions (.jsonl): MC1, MC2 (the recommendation axis)")
    chat_help = "render prompts through the tokenizer's chat template (default auto: when it has one)"
    add("--chat-template", choices=CHAT_MODES, default="auto", help=chat_help)
    add("--system", metavar="TEXT", help="a system message before every rendered prompt")
    add("--lm-eval", metavar="TASK[,TASK]", help="lm-evaluation-harness tasks at every point (extsub[eval])")
    include_help = "a folder of local lm-eval task definitions (repeatable)"
    add("--lm-eval-include", metavar="DIR", action="append", default=[], help=include_help)
    add("--max-new-tokens", type=int, default=64, metavar="N", help="longest continuation (default 64)")
    add("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    dtype_help = "the model's dtype (default auto: the checkpoint's on CUDA, float32 on the CPU)"
    add("--dtype", choices=EVAL_DTYPE_NAMES, default="auto", help=dtype_help)
    add("--batch-size", type=int, default=8, metavar="N", help="examples per forward pass (default 8)")
    add("--threads", type=int, metavar="N", help="torch CPU threads (default: half the cores, at least 1)")
    add("--workers", type=int, metavar="N", help="measure the points on N Ray workers, MODEL loaded once in each")
    add("--ray-address", metavar="ADDR", help="an existing Ray cluster for the workers (default: a local one)")
    budget_help = "recommendation: KEEP-NLL may rise by this fraction over λ = 0 (default 0.05)"
    add("--max-keep-increase", type=float, default=0.05, metavar="F", help=budget_help)
    defaults = Guards()
    for flag, name, what in GUARD_FLAGS:
        value = getattr(defaults, name)
        add(flag, type=float, default=value, metavar="F", help=f"guard: {what} (default {value:g})")
    add("--save-best", metavar="OUT", help="write the merge at the first method's recommended λ, as extsub-merge does")
    format_help = "--save-best's format: an adapter format of extsub-merge, or model (θ₀ + ΔW')"
    add("--format", dest="save_format", choices=SAVE_FORMATS, help=format_help)
    add_closing_flags(parser, force_help="replace the scan files in SCAN_DIR and an existing --save-best OUT")
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    try:
        code, result = guarded(PROG, lambda: _scan(args), "scan", quiet=args.quiet)
    except ScanInterrupted as e:  # the rows measured so far are in SCAN_DIR: say where
        _signals.answered()  # this is the signal's answer: nothing was swallowed
        where = f"; the {len(e.result.rows)} rows measured are in {e.result.files[0]}" if e.result.files else ""
        return fail(PROG, f"{e}{where}", EXIT_SIGTERM if e.terminated else EXIT_SIGINT)
    if code == EXIT_OK and not args.quiet:
        from extsub_kernels.lambda_scan.report import markdown_table

        print(markdown_table(result))
        for line in _summary(result):
            say(f"{PROG}: {line}")
    return code


def _scan(args: argparse.Namespace) -> object:
    from extsub_kernels.lambda_scan import scan
    from extsub_kernels.lambda_scan.results import Guards

    options = {name: getattr(args, name) for name in SCAN_OPTIONS}
    guards = Guards(**{name: getattr(args, name) for _, name, _ in GUARD_FLAGS})
    return scan(args.expert, args.anti, **options, guards=guards, progress=not args.quiet)


def _summary(result) -> list[str]:
    """What the scan found and where it is: recommendations, the cost of a merge against an evaluation, files."""
    timing = result.timing
    lines = [
        f"{method}: recommended λ = {'none' if rec.lam is None else f'{rec.lam:g}'}: {rec.note}"
        for method, rec in result.recommendations.items()
    ]
    load = f"{len(result.rows)} points in {timing['total_seconds']:.3g} s"
    load += f" (model loaded in {timing['load_seconds']:.3g} s)"
    share, smallest = timing.get("merge_share_of_smallest_evaluation"), timing.get("smallest_evaluation")
    if share is not None:
        seconds = timing[f"{smallest}_seconds_median"]
        load += f"; a merge costs {share:.2%} of the smallest evaluation ({smallest}, {seconds:.3g} s)"
    lines.append(load)
    if result.files:
        lines.append(f"wrote {', '.join(str(p) for p in result.files)}")
    if result.saved is not None:
        lines.append(f"saved the best merge: {result.saved.summary()}")
    return lines


main = command_main(PROG, build_parser, _run)

if __name__ == "__main__":
    sys.exit(main())
