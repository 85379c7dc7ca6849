"""Plan a merge from the inputs' headers alone: λ settings, output paths, what happens to each tensor.

Nothing here reads tensor data. The plan fixes the output's keys, dtypes and shapes (so the
writer can emit its header first) and cuts tensors into blocks of whole rows for streaming.
"""

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from extsub_kernels.combine import METHODS  # noqa: F401 - the methods are part of a plan's vocabulary
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, TensorInfo
from extsub_kernels.io.format import DTYPE_CODES, is_float
ON_MISSING = ("error", "copy", "skip")
OUT_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# Models whose linear layers are GPT-2's Conv1D, storing weights as (in, out) instead of (out, in).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_ARCHITECTURE_PREFIXES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer")
_CONV1D_WEIGHT = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")
_SHOWN = 10  # keys listed in an error before "... and N more"

Lam = float | str | Sequence[float | Sequence[float]]


def parse_lams(lam: Lam, n_anti: int) -> list[tuple[float, ...]]:
    """λ settings, one per output, each with one λ per anti-expert.

    `lam` is a number (one output, that λ for every anti-expert); a string in the CLI's syntax,
    "0.5,1,2" (one output per λ) where each item may be "1:0.5" (one λ per anti-expert, in order);
    or a list whose items are numbers or per-anti-expert lists (`[[1.0, 0.5]]`: one output).
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
        values = [_lam_value(v) for v in item] if isinstance(item, (list, tuple)) else [_lam_value(item)] * n_anti
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


def _lam_value(value: object) -> float:
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"λ must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise InputError(f"λ must be a finite number, got {value!r}")
    return x


def _format(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def lam_label(values: Sequence[float]) -> str:
    """"0.5" for a λ shared by all anti-experts, "1_0.5" for one λ per anti-expert."""
    if len(set(values)) <= 1:
        return _format(values[0]) if values else ""
    return "_".join(_format(v) for v in values)


def output_paths(out: Path, settings: Sequence[Sequence[float]]) -> list[Path]:
    """One OUT per λ setting: OUT itself for one setting, else OUT with `-lam<label>` before `.safetensors`
    (or after a folder's name): out.safetensors → out-lam0.5.safetensors, out/ → out-lam0.5/."""
    if len(settings) == 1:
        return [out]
    paths = []
    for values in settings:
        suffix = f"-lam{lam_label(values)}"
        if out.suffix == ".safetensors":
            paths.append(out.with_name(out.stem + suffix + ".safetensors"))
        else:
            paths.append(out.with_name(out.name + suffix))
    return paths


def input_roles(n_anti: int) -> list[str]:
    """Names of the inputs in messages: EXPERT, then ANTI (or ANTI #1, ANTI #2, ... for several)."""
    return ["EXPERT"] + [f"ANTI{'' if n_anti == 1 else f' #{i + 1}'}" for i in range(n_anti)]


def output_metadata(
    setting: Sequence[float],
    method: str,
    expert: str,
    antis: Sequence[str],
    base: str | None = None,
    output_format: str | None = None,
) -> dict[str, str]:
    """`__metadata__` of an output: format=pt, method, λ, the inputs' names, the tool's version (and
    the LoRA output format).

    Example:
        >>> output_metadata((0.5,), "ext-sub", "expert.safetensors", ["anti.safetensors"])["extsub.lam"]
        '[0.5]'
    """
    import extsub_kernels

    meta = {
        "format": "pt",
        "extsub.method": method,
        "extsub.lam": json.dumps(list(setting)),
        "extsub.expert": expert,
        "extsub.anti": json.dumps(list(antis)),
        "extsub.version": extsub_kernels.__version__,
    }
    if base is not None:
        meta["extsub.base"] = base
    if output_format is not None:
        meta["extsub.format"] = output_format
    return meta


def conv1d_weights(config: dict | None) -> Callable[[str, tuple[int, ...]], bool]:
    """A predicate naming the 2-D weights stored transposed (GPT-2 Conv1D), from a model's config.json."""
    config = config or {}
    architectures = config.get("architectures") or []
    uses_conv1d = config.get("model_type") in CONV1D_MODEL_TYPES or any(
        isinstance(a, str) and a.startswith(CONV1D_ARCHITECTURE_PREFIXES) for a in architectures
    )
    if not uses_conv1d:
        return lambda name, shape: False
    return lambda name, shape: len(shape) == 2 and _CONV1D_WEIGHT.search(name) is not None


@dataclass(frozen=True)
class TensorJob:
    """What the merge does with one output tensor.

    Inputs are numbered: 0 the expert, 1..n the anti-experts, n + 1 the base.
    `antis` lists the anti-experts whose tensor goes through the op, in order; an empty
    `antis` means the tensor is copied from input `source`.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    source: int = 0
    antis: tuple[int, ...] = ()
    base: int | None = None
    transposed: bool = False

    @property
    def merged(self) -> bool:
        return bool(self.antis)

    def inputs(self) -> tuple[int, ...]:
        """The inputs read for this tensor, in the order the op takes them."""
        if not self.antis:
            return (self.source,)
        return (0, *self.antis) + ((self.base,) if self.base is not None else ())


def plan_tensors(
    readers: Sequence[CheckpointReader],
    *,
    n_anti: int,
    has_base: bool,
    on_missing: str = "error",
    out_dtype: torch.dtype | None = None,
    transposed: Callable[[str, tuple[int, ...]], bool] = lambda name, shape: False,
) -> tuple[list[TensorJob], list[str]]:
    """Match tensors by key across the inputs; returns the jobs (expert order) and the skipped keys.

    Float tensors of the expert that an anti-expert also has go through the op with that
    anti-expert (with `has_base`, the base must have them too). Other tensors of the expert
    are copied. Keys only in anti-experts follow `on_missing`. Raises InputError for shape or
    dtype mismatches, missing keys (with on_missing="error") and inputs that share no tensor.
    """
    expert, antis = readers[0], readers[1 : 1 + n_anti]
    base = readers[1 + n_anti] if has_base else None
    base_index = 1 + n_anti if has_base else None
    jobs, shared = [], [0] * n_anti
    for name in expert.keys():
        info = expert.info(name)
        with_key = [k for k in range(1, n_anti + 1) if name in readers[k]]
        for k in with_key:
            _check_match(info, readers[k].info(name), "EXPERT", readers[k].label)
            shared[k - 1] += 1
        dtype = out_dtype if out_dtype is not None and is_float(info.dtype) else info.dtype
        merged = tuple(with_key) if is_float(info.dtype) else ()
        if merged and base is not None:
            if name not in base:
                raise InputError(
                    f"tensor {name!r} is in EXPERT and {readers[merged[0]].label} but not in BASE; "
                    "ΔW = θ − θ₀ needs it in all three (are they the same architecture?)"
                )
            _check_match(info, base.info(name), "EXPERT", "BASE")
        jobs.append(
            TensorJob(name, info.shape, dtype, 0, merged, base_index if merged else None, merged != () and transposed(name, info.shape))
        )
    for k, count in enumerate(shared, start=1):
        if count == 0 and len(expert) and len(readers[k]):
            raise InputError(
                f"EXPERT and {readers[k].label} share no tensor name (EXPERT has e.g. {expert.keys()[0]!r}, "
                f"{readers[k].label} has e.g. {readers[k].keys()[0]!r}); are they checkpoints of the same model?"
            )
    extra, skipped = _anti_only(readers, n_anti, on_missing, out_dtype)
    return jobs + extra, skipped


def _check_match(a: TensorInfo, b: TensorInfo, a_role: str, b_role: str) -> None:
    if a.shape != b.shape:
        raise InputError(
            f"shape mismatch for tensor {a.name!r}: {list(a.shape)} in {a_role} ({a.path.name}) but "
            f"{list(b.shape)} in {b_role} ({b.path.name})"
        )
    if is_float(a.dtype) != is_float(b.dtype) or (not is_float(a.dtype) and a.dtype != b.dtype):
        raise InputError(
            f"dtype mismatch for tensor {a.name!r}: {DTYPE_CODES[a.dtype]} in {a_role} ({a.path.name}) but "
            f"{DTYPE_CODES[b.dtype]} in {b_role} ({b.path.name}); only float tensors may differ in precision"
        )


def _anti_only(
    readers: Sequence[CheckpointReader], n_anti: int, on_missing: str, out_dtype: torch.dtype | None
) -> tuple[list[TensorJob], list[str]]:
    """Jobs for keys that anti-experts have and the expert lacks, per `on_missing`."""
    expert = readers[0]
    first_holder: dict[str, int] = {}
    for k in range(1, n_anti + 1):
        for name in readers[k].keys():
            if name not in expert and name not in first_holder:
                first_holder[name] = k
    if not first_holder:
        return [], []
    if on_missing == "error":
        listed = ", ".join(f"{name!r} ({readers[k].label})" for name, k in list(first_holder.items())[:_SHOWN])
        more = f" and {len(first_holder) - _SHOWN} more" if len(first_holder) > _SHOWN else ""
        raise InputError(
            f"{len(first_holder)} tensor(s) of the anti-expert(s) are not in EXPERT: {listed}{more}; "
            "pass --on-missing copy (write them unchanged) or --on-missing skip (leave them out)"
        )
    if on_missing == "skip":
        return [], list(first_holder)
    jobs = []
    for name, k in first_holder.items():
        info = readers[k].info(name)
        dtype = out_dtype if out_dtype is not None and is_float(info.dtype) else info.dtype
        jobs.append(TensorJob(name, info.shape, dtype, source=k))
    return jobs, []


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one tensor: the unit read, computed and written at a time."""

    job: TensorJob
    start: int
    stop: int

    def shape(self) -> tuple[int, ...]:
        """This block's shape (a 0-D or 1-D tensor is one block, whole)."""
        shape = self.job.shape
        return (self.stop - self.start, *shape[1:]) if len(shape) >= 2 and not self.job.transposed else shape


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows the op pairs (dim 0; a 0-D or 1-D tensor is one row)."""
    return shape[0] if len(shape) >= 2 else 1


def cut_blocks(job: TensorJob, row_bytes: int, block_bytes: int) -> list[Block]:
    """Cut `job` into blocks of whole rows of at most `block_bytes` (at least one row each).

    `row_bytes` is the widest row across the job's inputs and output. Transposed weights
    pair columns, so they stay whole.
    """
    rows = rows_of(job.shape)
    if job.transposed or len(job.shape) < 2:
        return [Block(job, 0, rows)] if row_bytes * rows else []
    step = max(1, block_bytes // max(1, row_bytes))
    return [Block(job, start, min(start + step, rows)) for start in range(0, rows, step)] if row_bytes else []
