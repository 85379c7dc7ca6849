"""The names of every choice an option takes and the defaults of a run, without torch: the command lines build
their parsers from them, so `--help` and usage errors answer before torch loads (`engine.options`: the rules)."""

import sys
from collections.abc import Iterator
from typing import Literal, get_args

# The built-in methods' formulas; the rest of a method is its MethodSpec (engine.method_spec), registered ones too.
METHOD_FORMULAS: dict[str, str] = {"ext-sub": "θ⁺ − λ·Ext(θ⁻)", "sub": "θ⁺ − λθ⁻", "add": "θ⁺ + λθ⁻"}
DEFAULT_METHOD = "ext-sub"
_METHOD_SPECS = "extsub_kernels.engine.method_spec"


def _method_formulas() -> dict[str, str]:
    """Name → formula of every method: the registry's once engine.method_spec is loaded, else the built-in ones."""
    specs = sys.modules.get(_METHOD_SPECS)
    return {s.name: s.formula for s in specs.method_specs()} if specs is not None else dict(METHOD_FORMULAS)


class _MethodNames:
    """The methods' names, as argparse's `choices` and `in` checks see them (by iterating), kept current."""

    def __iter__(self) -> Iterator[str]:
        return iter(_method_formulas())

    def __len__(self) -> int:
        return len(_method_formulas())

    def __repr__(self) -> str:
        return repr(tuple(_method_formulas()))


METHODS = _MethodNames()


def method_help() -> str:
    """`--method`'s help: each method with its formula, the default marked."""
    return "; ".join(f"{n}: {f}{' (default)' if n == DEFAULT_METHOD else ''}" for n, f in _method_formulas().items())


# Adapter outputs: LoRA writes lora, dense-lora or delta; (IA)³ and prefix-tuning their own PEFT folder.
OutputFormat = Literal["lora", "dense-lora", "delta", "ia3", "prefix-tuning"]
FORMATS: tuple[str, ...] = get_args(OutputFormat)
OnMissing = Literal["error", "copy", "skip"]
ON_MISSING: tuple[str, ...] = get_args(OnMissing)
# A dtype option's names are torch's own ("float16"), after the first, which forces none ("keep", "auto").
DtypeName = Literal["keep", "float16", "bfloat16", "float32"]
OUT_DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
# The dtype a λ scan loads and evaluates the model in; "auto": the checkpoint's own on CUDA, float32 on the CPU.
EvalDtypeName = Literal["auto", "float32", "float64", "bfloat16", "float16"]
EVAL_DTYPE_NAMES: tuple[str, ...] = get_args(EvalDtypeName)
_Mode = Literal["merge", "dry-run", "inspect"]
MODES: tuple[str, ...] = get_args(_Mode)
# What a λ scan's --save-best writes: an adapter format, or "model", the full merged model θ₀ + ΔW'.
FULL_MODEL_FORMAT = "model"
SAVE_FORMATS: tuple[str, ...] = (*FORMATS, FULL_MODEL_FORMAT)
# What an option of a run is when nobody sets it: merge(), inspect(), the commands and recipes read these.
DEFAULT_LAM, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_ON_MISSING = 1.0, "auto", "keep", "error"
DEFAULT_MAX_SHARD_SIZE = "5GB"
