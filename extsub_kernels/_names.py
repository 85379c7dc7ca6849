"""The names of every choice an option takes (methods, formats, dtypes, on-missing), without torch.

The command lines build their parsers from these, so `--help`, `--version` and usage errors
answer before torch loads (seconds on a small machine). `engine.options` holds the rules over
them (the dtype each name means, the λ grammar, devices) and re-exports them.
"""

from typing import Literal, get_args

Method = Literal["ext-sub", "sub", "add"]
METHODS: tuple[str, ...] = get_args(Method)
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
Mode = Literal["merge", "dry-run", "inspect"]
MODES: tuple[str, ...] = get_args(Mode)
# What a λ scan's --save-best writes: an adapter format, or "model", the full merged model θ₀ + ΔW'.
FULL_MODEL_FORMAT = "model"
SAVE_FORMATS: tuple[str, ...] = (*FORMATS, FULL_MODEL_FORMAT)
DEFAULT_MAX_SHARD_SIZE = "5GB"
