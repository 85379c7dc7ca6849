"""`extsub-inspect`: the row statistics of an expert/anti-expert pair without merging, over `analysis.inspect()`;
report files into -o DIR, or the Markdown tables on stdout."""

import argparse
import sys

from extsub_kernels.cli import common

PROG = "extsub-inspect"
EPILOG = f"""\
what it reports, per tensor (dense inputs) or module (LoRA adapters), over its rows p (expert) and m
(anti-expert), task vectors with --base:
  cos(p, m)           mean, min, quartiles and max over rows
  deficiency share    |Ext(m)|/|m| = √((1 − cos)/2), the part of the anti-expert Ext-Sub removes
                      (mean weighted by |m|); the rest is the general capability it keeps
  relative change     ‖θ' − θ⁺‖/‖θ⁺‖ that a merge at each --lam would make
  degenerate rows     a zero norm, or an antiparallel pair
Dense tensors are streamed block by block (memory stays small); LoRA statistics come from the
factors, never forming ΔW.

outputs (-o DIR):
  report.json  the same record as extsub-merge --report
  report.md    a table per module type, and one per layer and module type
  report.png   heatmaps of layers × module types: mean cos and deficiency share
               (needs matplotlib, the plot extra; without it the other two are written)

examples:
  {PROG} expert_adapter/ anti_adapter/ -o inspect/
  {PROG} org/expert org/anti --base org/base --lam 0.5,1,2 -o inspect/
  {PROG} expert.safetensors anti.safetensors        # tables on stdout

exit codes: 0 done; 1 failure while reading; 2 bad usage or bad input; 130/143 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `extsub-inspect`; options not given are absent (inspect()'s defaults apply)."""
    from extsub_kernels._names import METHODS

    parser = common.command_parser(
        PROG,
        "The geometry of an Ext-Sub merge without making it: per tensor or module, how much of the anti-expert\n"
        "is shared capability and how much is deficiency (docs/design.md §7 of extsub).",
        EPILOG,
        ("the expert θ⁺ (as for extsub-merge)", "anti-expert(s) θ⁻"),
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("-o", "--out", metavar="DIR", help="write report.json, report.md and report.png into DIR")
    add("--base", metavar="BASE", help="θ₀: the inputs are full models, compared as task vectors θ − θ₀")
    add("--lam", metavar="L[,L...]", help="λ settings to report the relative change at (default 1)")
    add("--method", choices=METHODS, help="the method the relative change is for")
    add("--device", help="auto (default), cpu, cuda or cuda:N")
    add("--transposed", action=argparse.BooleanOptionalAction, help="GPT-2 Conv1D layout, as for extsub-merge")
    common.add_adapter_input_flags(add)
    common.add_closing_flags(parser, force_help="replace report files already in DIR")
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    values = vars(args)
    quiet = bool(values.get("quiet"))
    code, report = common.guarded(PROG, lambda: _inspect(values, command, quiet), "inspection", quiet=quiet)
    if code == common.EXIT_OK and not quiet:
        common.say(f"{PROG}: {report.summary()}")
    return code


def _inspect(values: dict, command: str, quiet: bool) -> object:
    from pathlib import Path

    from extsub_kernels.analysis import inspect, write_inspection
    from extsub_kernels.analysis.inspect import check_inspection_folder
    from extsub_kernels.analysis.markdown import inspection_markdown

    options = common.python_options(values, inspect)  # the scaling flags checked before the folder
    out, force = values.get("out"), bool(values.get("force"))
    if out is not None:
        check_inspection_folder(Path(out), values["expert"], values["anti"], values.get("base"), force=force)
    report = inspect(**options, command=command)
    if out is None:
        sys.stdout.write(inspection_markdown(report))
    else:
        for path in write_inspection(report, out, force=force):
            if not quiet:
                common.say(f"{PROG}: wrote {path}")
    return report


main = common.command_main(PROG, build_parser, _run)

if __name__ == "__main__":
    sys.exit(main())
