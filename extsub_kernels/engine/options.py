"""The rules over the option vocabulary (`_names`): the dtype each name means, the one λ grammar and formatter,
devices, sizes, and `RunOptions`, the validated options every path of a merge reads."""

import math
import reprlib
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from extsub_kernels._names import (  # noqa: F401 (re-exported: the rules over them live here)
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_ON_MISSING,
    EVAL_DTYPE_NAMES,
    FULL_MODEL_FORMAT,
    MODES,
    ON_MISSING,
    OUT_DTYPE_NAMES,
    EvalDtypeName,
)
from extsub_kernels._tensors import FLOAT_DTYPES
from extsub_kernels.engine.method_spec import DEFAULT_METHOD, METHODS, method_spec
from extsub_kernels.errors import InputError

_CPU = torch.device("cpu")
_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}
# Each dtype option's names, the first forcing none ("keep": each tensor its own; "auto": decided by the device).
OUT_DTYPES: dict[str, torch.dtype | None] = {n: _BY_NAME.get(n) for n in OUT_DTYPE_NAMES}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in OUT_DTYPES.items() if dtype is not None}
_EVAL_DTYPES: dict[str, torch.dtype | None] = {n: _BY_NAME.get(n) for n in EVAL_DTYPE_NAMES}
_MAX_SCAN_POINTS = 1000
_MAX_OUTPUTS = 1000  # λ settings of one run, one output each
# Default bytes of a streamed block: on CPU small, so buffers in flight stay in cache; on CUDA large, few copies.
CPU_BLOCK_BYTES = 2 << 20
CUDA_BLOCK_BYTES = 32 << 20
# The op computes in float32 (float64 for float64 weights): a λ past float32's range cannot be used.
_MAX_LAM = float(torch.finfo(torch.float32).max)

# λ as the Python API takes it: a number, a list (one output each), per-anti-expert lists, or the CLI string.
Lam = float | str | Sequence[float | Sequence[float]]
LamSetting = tuple[float, ...]  # one λ per anti-expert: one output


def check_choice(value: object, choices: Sequence[str], what: str) -> None:
    """Raise an InputError unless `value` is one of `choices`, listing them."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def out_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype of a `dtype` option, a name or the dtype ("keep" → None: each tensor keeps its own)."""
    return _dtype_option(name, OUT_DTYPES, "an output dtype")


def eval_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype a scan evaluates in, from its name or itself ("auto" → None: decided by the device)."""
    return _dtype_option(name, _EVAL_DTYPES, "an evaluation dtype")


def _dtype_option(value: str | torch.dtype, table: dict[str, torch.dtype | None], what: str) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        if value not in table.values():
            names = ", ".join(name for name, dtype in table.items() if dtype is not None)
            raise InputError(f"dtype {value} cannot be {what}; choose one of {names}")
        return value
    check_choice(value, tuple(table), "dtype")
    return table[value]


def lam_value(value: object) -> float:
    """One λ as a float (" 0.5" → 0.5); an InputError for anything that is not a finite number in float32's range."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value.strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"λ must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise InputError(f"λ must be a finite number, got {value!r}")
    if abs(x) > _MAX_LAM:
        raise InputError(
            f"λ {value!r} is out of range: |λ| must be at most {_MAX_LAM:.4g} (float32, the precision of the op)"
        )
    return x


def lam_items(lam: Lam, like: str = "'0.5,1,2'") -> list[tuple[str, list[float] | float]]:
    """The one λ grammar (a number; "a,b:c" items; or a list of numbers or lists): each item as (text, value(s)).

    Example:
        >>> lam_items("0.5, 1:2")
        [('0.5', 0.5), ('1:2', [1.0, 2.0])]
    """
    if isinstance(lam, str):
        items: list = [part.strip() for part in lam.split(",")]
        items = [item.split(":") if ":" in item else item for item in items]
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        items = [lam]
    elif isinstance(lam, Sequence) and lam:
        items = list(lam)
    else:
        raise InputError(f"lam must be a number, a list of numbers or a string like {like}, got {short(lam)}")
    return [
        (":".join(map(str, item)), [lam_value(v) for v in item])
        if isinstance(item, (list, tuple))
        else (str(item), lam_value(item))
        for item in items
    ]


def parse_lams(lam: Lam, n_anti: int) -> list[LamSetting]:
    """λ settings, one per output, each one λ per anti-expert (a number: the same for all; "1:0.5": one each).

    Example:
        >>> parse_lams("0.5,1:2", 2)
        [(0.5, 0.5), (1.0, 2.0)]
    """
    count = lam.count(",") + 1 if isinstance(lam, str) else len(lam) if isinstance(lam, Sequence) else 1
    if count > _MAX_OUTPUTS:
        raise InputError(f"λ gives {count} settings, one output each; a run writes at most {_MAX_OUTPUTS}")
    settings = []
    for _, values in lam_items(lam):
        values = values if isinstance(values, list) else [values] * n_anti
        if len(values) != n_anti:
            raise InputError(
                f"λ setting {lam_text(values, ':')} gives {len(values)} values for {n_anti} "
                "anti-expert(s); give one λ for all, or one per anti-expert separated by ':'"
            )
        settings.append(tuple(values))
    duplicated = sorted(label for label, n in Counter(lam_labels(settings)).items() if n > 1)
    if duplicated:
        raise InputError(f"λ {', '.join(duplicated)} is given twice; each λ setting writes its own output")
    return settings


def parse_lam_grid(lam: str | float | Sequence[float]) -> list[float]:
    """A scan's λ values, sorted, unique, with 0: `lam_items`' grammar where `start:stop:step` is a range (stop
    included when a step lands on it); rounded to 12 decimals, so 0.1·3 is 0.3.

    Example:
        >>> parse_lam_grid("0.5:1:0.25,2")
        [0.0, 0.5, 0.75, 1.0, 2.0]
    """
    values = [0.0]
    for text, item in lam_items(lam, "'0:2:0.2' or '0,1,2'"):
        values += _lam_range(text, item) if isinstance(item, list) else [item]
    grid = sorted({round(v, 12) + 0.0 for v in values})
    if len(grid) > _MAX_SCAN_POINTS:
        raise InputError(f"λ grid {short(lam)} has {len(grid)} values; a scan takes at most {_MAX_SCAN_POINTS}")
    return grid


def _lam_range(item: str, parts: list[float]) -> list[float]:
    if len(parts) != 3:
        raise InputError(f"λ item {item!r}: write a number or a range start:stop:step, like 0:2:0.2")
    start, stop, step = parts
    if step <= 0:
        raise InputError(f"λ range {item!r}: the step must be positive, got {lam_text([step])}")
    if stop < start:
        raise InputError(f"λ range {item!r}: it ends ({lam_text([stop])}) before it starts ({lam_text([start])})")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > _MAX_SCAN_POINTS:
        raise InputError(f"λ range {item!r} has {count} values; a scan takes at most {_MAX_SCAN_POINTS}")
    return [start + i * step for i in range(count)]


def lam_text(values: Sequence[float], sep: str = ",", *, short: bool = False) -> str:
    """The one λ formatter: each λ exactly and shortest ("0.5", "1"), or to six digits with `short`; joined by `sep`.

    Example:
        >>> lam_text([1.0, 0.5], ":")
        '1:0.5'
    """
    texts = [f"{x:g}" if short else repr(float(x)) for x in values]
    return sep.join(t[:-2] if t.endswith(".0") else t for t in texts)


def lam_label(values: Sequence[float]) -> str:
    """ "0.5" for a λ shared by all anti-experts, "1_0.5" for one λ per anti-expert."""
    return lam_text(values[:1] if len(set(values)) <= 1 else values, "_")


def lam_labels(settings: Sequence[Sequence[float]]) -> list[str]:
    """The labels of a run's λ settings, all `lam_label`'s, or all one λ per anti-expert ("1_0.5", "2_2") if any is."""
    if all(len(set(s)) <= 1 for s in settings):
        return [lam_label(s) for s in settings]
    return [lam_text(s, "_") for s in settings]


def short(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, for messages that quote what a user gave (one line, any size)."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = 8
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit * 2 else f"{text[: limit * 2]}..."


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Methods to scan, in order: "ext-sub,sub" or a list; each one of METHODS, none twice."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if not names:
        raise InputError(f"give at least one method; choose from {', '.join(METHODS)}")
    for name in names:
        method_spec(name)
    if len(set(names)) != len(names):
        raise InputError(f"method list {', '.join(names)} names a method twice")
    return tuple(names)


def warn_negative_lams(settings: Sequence[LamSetting], method: str) -> None:
    """Say once what a negative λ does (each method's own wording: ext-sub then adds the deficiency)."""
    negative = sorted({v for setting in settings for v in setting if v < 0})
    if negative:
        warnings.warn(
            f"λ = {lam_text(negative, ', ')} is negative: {method} then {method_spec(method).negative}; "
            "that is allowed, and rarely what unlearning wants",
            stacklevel=3,
        )


def input_roles(n_anti: int) -> list[str]:
    """Names of the inputs in messages: EXPERT, then ANTI (or ANTI #1, ANTI #2, ... for several)."""
    return ["EXPERT"] + [f"ANTI{'' if n_anti == 1 else f' #{i + 1}'}" for i in range(n_anti)]


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in a size: an int, or a string like "5GB" (10⁹), "500MiB" (2²⁰), "4096"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip().upper()
        number = text.rstrip("KMGTIB")
        try:
            scaled = float(number) * _SIZE_UNITS[text[len(number) :]]
        except (ValueError, KeyError):
            raise InputError(
                f"cannot read size {size!r}; write it like 5GB, 500MB, 2GiB or a number of bytes"
            ) from None
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
        raise InputError(
            f"device {text!r} was asked for but CUDA is not available here; use device=cpu", options=("device",)
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError(f"device {text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class RunOptions:
    """The validated options of one merge run, read by every path; as for `merge()`, and: `settings`, λ per
    anti-expert per output; `out_dtype` None: each keeps its own; `max_shard_size`, `block_bytes` None: the default;
    `mode`: "merge", "dry-run" or "inspect"; `stats`: gather row statistics; `transposed`: Conv1D-named weights are
    stored (in, out) or not (None: decide)."""

    settings: tuple[LamSetting, ...]
    method: str = DEFAULT_METHOD
    device: torch.device = _CPU
    out_dtype: torch.dtype | None = None
    max_shard_size: int | None = None
    on_missing: str = DEFAULT_ON_MISSING
    force: bool = False
    progress: bool = False
    block_bytes: int | None = None
    mode: str = "merge"
    stats: bool = False
    transposed: bool | None = None

    def __post_init__(self) -> None:
        method_spec(self.method)
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
