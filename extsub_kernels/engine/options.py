"""The vocabulary, in one place: methods, output formats, dtypes, on-missing, the λ grammars, devices, sizes.

Every entry point (Python, CLI, adapters, dense engine, the λ scan) validates its options
here, so a choice is spelled, checked and explained the same way everywhere.
"""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from extsub_kernels._tensors import FLOAT_DTYPES
from extsub_kernels.errors import InputError

Method = Literal["ext-sub", "sub", "add"]
METHODS: tuple[str, ...] = get_args(Method)
# Adapter outputs: LoRA writes lora, dense-lora or delta; (IA)³ and prefix-tuning their own PEFT folder.
OutputFormat = Literal["lora", "dense-lora", "delta", "ia3", "prefix-tuning"]
FORMATS: tuple[str, ...] = get_args(OutputFormat)
OnMissing = Literal["error", "copy", "skip"]
ON_MISSING: tuple[str, ...] = get_args(OnMissing)
# A dtype option's names are torch's own ("float16"), after the first, which forces none ("keep", "auto").
_FLOAT_DTYPES: dict[str, torch.dtype] = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}


def _dtype_choices(names: tuple[str, ...]) -> dict[str, torch.dtype | None]:
    return {name: None if i == 0 else _FLOAT_DTYPES[name] for i, name in enumerate(names)}


DtypeName = Literal["keep", "float16", "bfloat16", "float32"]
OUT_DTYPES: dict[str, torch.dtype | None] = _dtype_choices(get_args(DtypeName))
Mode = Literal["merge", "dry-run", "inspect"]
MODES: tuple[str, ...] = get_args(Mode)
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in OUT_DTYPES.items() if dtype is not None}
# The dtype a λ scan loads and evaluates the model in; "auto": the checkpoint's own on CUDA, float32 on the CPU.
EvalDtypeName = Literal["auto", "float32", "float64", "bfloat16", "float16"]
EVAL_DTYPES: dict[str, torch.dtype | None] = _dtype_choices(get_args(EvalDtypeName))
# What a λ scan's --save-best writes: an adapter format, or "model", the full merged model θ₀ + ΔW'.
FULL_MODEL_FORMAT = "model"
SAVE_FORMATS: tuple[str, ...] = (*FORMATS, FULL_MODEL_FORMAT)
MAX_SCAN_POINTS = 1000
DEFAULT_MAX_SHARD_SIZE = "5GB"
CPU = torch.device("cpu")
# Bytes of a streamed block of rows when none is asked for. CPU: small, so the few buffers in
# flight stay in cache between reading, the op and writing (benchmarks/RESULTS.md, merge).
# CUDA: large, so copies and kernels are few.
CPU_BLOCK_BYTES = 2 << 20
CUDA_BLOCK_BYTES = 32 << 20
# The op computes in float32 (float64 for float64 weights): a λ past float32's range cannot be used.
MAX_LAM = float(torch.finfo(torch.float32).max)

# λ as the Python API takes it: a number, a list (one output each), per-anti-expert lists, or the CLI string.
Lam = float | str | Sequence[float | Sequence[float]]
LamSetting = tuple[float, ...]  # one λ per anti-expert: one output


def check_choice(value: object, choices: Sequence[str], what: str) -> None:
    """Raise an InputError unless `value` is one of `choices`, listing them."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def method_sign(method: str) -> float:
    """The sign direct arithmetic gives an anti-expert: −1 for sub, +1 for add (ext-sub subtracts Ext(θ⁻))."""
    check_choice(method, METHODS, "method")
    return 1.0 if method == "add" else -1.0


def out_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a `dtype` option ("keep" → None: each tensor keeps its own)."""
    check_choice(name, tuple(OUT_DTYPES), "dtype")
    return OUT_DTYPES[name]


def lam_value(value: object) -> float:
    """One λ as a float; an InputError for anything that is not a finite number.

    Example:
        >>> lam_value(" 0.5")
        0.5
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value.strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"λ must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise InputError(f"λ must be a finite number, got {value!r}")
    if abs(x) > MAX_LAM:
        raise InputError(
            f"λ {value!r} is out of range: |λ| must be at most {MAX_LAM:.4g} (float32, the precision of the op)"
        )
    return x


def parse_lams(lam: Lam, n_anti: int) -> list[LamSetting]:
    """λ settings, one per output, each with one λ per anti-expert.

    `lam` is a number (one output, that λ for every anti-expert); a string in the CLI's syntax,
    "0.5,1,2" (one output per λ) where each item may be "1:0.5" (one λ per anti-expert, in order);
    or a list whose items are numbers or per-anti-expert lists (`[[1.0, 0.5]]`: one output).

    Example:
        >>> parse_lams("0.5,1:2", 2)
        [(0.5, 0.5), (1.0, 2.0)]
    """
    if isinstance(lam, str):
        items: list = [part.split(":") if ":" in part else part for part in lam.split(",")]
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        items = [lam]
    elif isinstance(lam, Sequence) and lam:
        items = list(lam)
    else:
        raise InputError(f"lam must be a number, a list of numbers or a string like '0.5,1,2', got {lam!r}")
    settings = []
    for item in items:
        values = [lam_value(v) for v in item] if isinstance(item, (list, tuple)) else [lam_value(item)] * n_anti
        if len(values) != n_anti:
            raise InputError(
                f"λ setting {':'.join(_format(v) for v in values)} gives {len(values)} values for {n_anti} "
                "anti-expert(s); give one λ for all, or one per anti-expert separated by ':'"
            )
        settings.append(tuple(values))
    labels = [lam_label(s) for s in settings]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise InputError(f"λ {', '.join(duplicated)} is given twice; each λ setting writes its own output")
    return settings


def _format(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def lam_label(values: Sequence[float]) -> str:
    """ "0.5" for a λ shared by all anti-experts, "1_0.5" for one λ per anti-expert."""
    if len(set(values)) <= 1:
        return _format(values[0]) if values else ""
    return "_".join(_format(v) for v in values)


def parse_lam_grid(lam: str | float | Sequence[float]) -> list[float]:
    """The λ values of a scan, sorted and without repeats, always with λ = 0 (the expert, the reference).

    A string is a comma-separated list whose items are numbers or ranges `start:stop:step`
    (stop included when the steps land on it): "0:2:0.2", "0,0.5,1,2", "0:1:0.25,1.5,2". A
    λ applies to every anti-expert. Values are rounded to 12 decimals, so 0.1·3 is 0.3.

    Raises:
        InputError: an item that is not a number or a range, a step that is not positive, a
            range that ends before it starts, or more than MAX_SCAN_POINTS values.

    Example:
        >>> parse_lam_grid("0.5:1:0.25,2")
        [0.0, 0.5, 0.75, 1.0, 2.0]
    """
    if isinstance(lam, str):
        values = [v for item in lam.split(",") for v in _grid_item(item.strip())]
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        values = [lam_value(lam)]
    elif isinstance(lam, Sequence) and lam:
        values = [lam_value(v) for v in lam]
    else:
        raise InputError(f"lam must be a number, a list of numbers or a string like '0:2:0.2' or '0,1,2', got {lam!r}")
    grid = sorted({round(v, 12) + 0.0 for v in [0.0, *values]})
    if len(grid) > MAX_SCAN_POINTS:
        raise InputError(f"λ grid {lam!r} has {len(grid)} values; a scan takes at most {MAX_SCAN_POINTS}")
    return grid


def _grid_item(item: str) -> list[float]:
    parts = item.split(":")
    if len(parts) == 1:
        return [lam_value(item)]
    if len(parts) != 3:
        raise InputError(f"λ item {item!r}: write a number or a range start:stop:step, like 0:2:0.2")
    start, stop, step = (lam_value(p) for p in parts)
    if step <= 0:
        raise InputError(f"λ range {item!r}: the step must be positive, got {_format(step)}")
    if stop < start:
        raise InputError(f"λ range {item!r}: it ends ({_format(stop)}) before it starts ({_format(start)})")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_SCAN_POINTS:
        raise InputError(f"λ range {item!r} has {count} values; a scan takes at most {MAX_SCAN_POINTS}")
    return [start + i * step for i in range(count)]


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Methods to scan, in order: "ext-sub,sub" or a list; each one of METHODS, none twice.

    Example:
        >>> parse_methods("ext-sub, sub")
        ('ext-sub', 'sub')
    """
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if not names:
        raise InputError(f"give at least one method; choose from {', '.join(METHODS)}")
    for name in names:
        check_choice(name, METHODS, "method")
    if len(set(names)) != len(names):
        raise InputError(f"method list {', '.join(names)} names a method twice")
    return tuple(names)


def eval_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype a scan evaluates in, from its name ("auto" → None: decided by the device)."""
    if isinstance(name, torch.dtype):
        if name not in EVAL_DTYPES.values():
            raise InputError(f"dtype {name} cannot be an evaluation dtype; choose one of {', '.join(EVAL_DTYPES)}")
        return name
    check_choice(name, tuple(EVAL_DTYPES), "dtype")
    return EVAL_DTYPES[name]


def warn_negative_lams(settings: Sequence[LamSetting], method: str) -> None:
    """Say once what a negative λ does: ext-sub then adds the deficiency, sub adds θ⁻ and add subtracts it."""
    negative = sorted({v for setting in settings for v in setting if v < 0})
    if not negative:
        return
    effect = {
        "ext-sub": "adds the deficiency Ext(θ⁻) to the expert instead of removing it",
        "sub": "adds the anti-expert instead of subtracting it",
        "add": "subtracts the anti-expert instead of adding it",
    }[method]
    warnings.warn(
        f"λ = {', '.join(_format(v) for v in negative)} is negative: {method} then {effect}; "
        "that is allowed, and rarely what unlearning wants",
        stacklevel=3,
    )


def input_roles(n_anti: int) -> list[str]:
    """Names of the inputs in messages: EXPERT, then ANTI (or ANTI #1, ANTI #2, ... for several)."""
    return ["EXPERT"] + [f"ANTI{'' if n_anti == 1 else f' #{i + 1}'}" for i in range(n_anti)]


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in a size: an int, or a string like "5GB" (10⁹), "500MiB" (2²⁰), "4096".

    Example:
        >>> parse_size("2GiB")
        2147483648
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip().upper()
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :]
        try:
            scaled = float(number) * _SIZE_UNITS[unit]
        except (ValueError, KeyError):
            hint = "write it like 5GB, 500MB, 2GiB or a number of bytes"
            raise InputError(f"cannot read size {size!r}; {hint}") from None
        if not math.isfinite(scaled):
            raise InputError(f"size {size!r} is not a finite number of bytes; write it like 5GB, 500MB or 2GiB")
        value = int(scaled)
    else:
        raise InputError(f"a size must be an int or a string like '5GB', got {type(size).__name__}")
    if value <= 0:
        raise InputError(f"size {size!r} must be positive")
    return value


def resolve_device(spec: str | torch.device) -> torch.device:
    """ "auto" → the current CUDA device when one is available, else the CPU; "cpu"; "cuda" or "cuda:N"."""
    text = str(spec)
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"device {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"device {text!r} was asked for but CUDA is not available here; use --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError(f"device {text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class RunOptions:
    """The options of one merge run, validated: what every path (dense, adapters, full model) reads.

    Attributes:
        settings: λ per anti-expert, one tuple per output.
        method: "ext-sub", "sub" or "add".
        device: where the op runs.
        out_dtype: dtype of float tensors in the outputs (None: each keeps its own).
        max_shard_size: the largest shard of a folder output in bytes, as asked (None: the default).
        on_missing: tensors only in anti-experts: "error", "copy" or "skip".
        force: replace existing outputs.
        progress: show a progress bar on stderr.
        block_bytes: target bytes of a streamed block of rows (None: `CPU_BLOCK_BYTES` on CPU,
            `CUDA_BLOCK_BYTES` on CUDA; see `block_size`).
        mode: "merge"; "dry-run" (plan from the headers, write nothing); "inspect" (row statistics, no output).
        stats: gather the row statistics of every merged tensor or module (docs/design.md §7).
        transposed: GPT-2 Conv1D-named weights are stored (in, out) (True), are not (False), or decide (None).
    """

    settings: tuple[LamSetting, ...]
    method: str = "ext-sub"
    device: torch.device = CPU
    out_dtype: torch.dtype | None = None
    max_shard_size: int | None = None
    on_missing: str = "error"
    force: bool = False
    progress: bool = False
    block_bytes: int | None = None
    mode: str = "merge"
    stats: bool = False
    transposed: bool | None = None

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "method")
        check_choice(self.on_missing, ON_MISSING, "on_missing")
        check_choice(self.mode, MODES, "mode")
        size = self.block_bytes
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise InputError(f"block_bytes must be a positive int (or None for the device's default), got {size!r}")

    @property
    def block_size(self) -> int:
        """Bytes of a streamed block: as asked, else the device's default."""
        if self.block_bytes is not None:
            return self.block_bytes
        return CUDA_BLOCK_BYTES if self.device.type == "cuda" else CPU_BLOCK_BYTES

    def shard_limit(self, *, default: int | None) -> int | None:
        """The shard size of a folder output: as asked, else `default` (None: one weights file)."""
        return self.max_shard_size if self.max_shard_size is not None else default
