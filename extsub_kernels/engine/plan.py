"""Plan a dense merge from the headers alone: each output tensor's job (keys, dtypes, shapes for the header first)
and its blocks of rows; rows or Conv1D weights larger than a block stream twice for a row-pairing method."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from extsub_kernels._tensors import is_float
from extsub_kernels.engine.conv1d import TransposedRule, never_transposed
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorInfo
from extsub_kernels.io.format import DTYPE_CODES
from extsub_kernels.io.provenance import display_path

_SHOWN = 10  # keys listed in an error before "... and N more"


@dataclass(frozen=True, slots=True)
class TensorJob:
    """What the merge does with one output tensor. Inputs are numbered 0 the expert, 1..n the anti-experts, n + 1
    the base; `antis`: the anti-experts merged in, in order (none: copied from input `source`)."""

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
        base = (self.base,) if self.base is not None else ()
        return (0, *self.antis, *base) if self.antis else (self.source,)


def plan_tensors(
    readers: Sequence[CheckpointReader],
    *,
    n_anti: int,
    has_base: bool,
    on_missing: str = "error",
    out_dtype: torch.dtype | None = None,
    transposed: TransposedRule = never_transposed,
    inputs: Sequence[ResolvedInput] = (),
) -> tuple[list[TensorJob], list[str]]:
    """Match tensors by key; returns the jobs (expert order) and skipped keys. The expert's float tensors an anti-expert
    (and the base) has are merged, its others copied; anti-only keys follow `on_missing`. InputError for mismatches,
    missing keys, nothing to merge; `inputs` name files."""
    expert = readers[0]
    where = _namer(readers, inputs)
    for reader in readers:
        if not len(reader):
            raise InputError(f"{reader.label} ({where(reader)}) holds no tensors; there is nothing to merge")
    base = readers[1 + n_anti] if has_base else None
    base_index = 1 + n_anti if has_base else None
    jobs, shared = [], [0] * n_anti
    anti_tensors = [(k, readers[k].tensors) for k in range(1, n_anti + 1)]
    for name, info in expert.tensors.items():
        with_key = []
        for k, tensors in anti_tensors:
            other = tensors.get(name)
            if other is not None:
                if other.shape != info.shape or other.dtype != info.dtype:
                    _check_match(info, other, f"EXPERT ({where(info)})", f"{readers[k].label} ({where(other)})")
                with_key.append(k)
                shared[k - 1] += 1
        floating = is_float(info.dtype)
        dtype = out_dtype if out_dtype is not None and floating else info.dtype
        merged = tuple(with_key) if floating else ()
        if merged and base is not None:
            if name not in base:
                raise InputError(
                    f"tensor {name!r} is in EXPERT and {readers[merged[0]].label} but not in BASE; "
                    "ΔW = θ − θ₀ needs it in all three (are they the same architecture?)"
                )
            other = base.info(name)
            if other.shape != info.shape or other.dtype != info.dtype:
                _check_match(info, other, f"EXPERT ({where(info)})", f"{base.label} ({where(other)})")
        flip = bool(merged) and transposed(name, info.shape)
        jobs.append(TensorJob(name, info.shape, dtype, 0, merged, base_index if merged else None, flip))
    for k, count in enumerate(shared, start=1):
        if count == 0:
            raise InputError(
                f"EXPERT ({where(expert)}) and {readers[k].label} ({where(readers[k])}) share no tensor name "
                f"(EXPERT has e.g. {expert.keys()[0]!r}, {readers[k].label} has e.g. {readers[k].keys()[0]!r}); "
                "are they checkpoints of the same model? Nothing would be merged"
            )
    if not any(job.merged for job in jobs):
        common = [name for name in expert if any(name in readers[k] for k in range(1, n_anti + 1))]
        example = expert.info(common[0])
        raise InputError(
            f"EXPERT ({where(expert)}) and the anti-expert(s) share {len(common)} tensor name(s) but none is a float "
            f"tensor (e.g. {example.name!r} is {DTYPE_CODES[example.dtype]}); there is nothing to merge"
        )
    extra, skipped = _anti_only(readers, n_anti, on_missing, out_dtype)
    return jobs + extra, skipped


def _namer(readers: Sequence[CheckpointReader], inputs: Sequence[ResolvedInput]) -> Callable[[object], str]:
    """A function naming a reader, or the file of a tensor, by the path the user gave."""
    pairs = list(zip(readers, inputs, strict=False))
    by_file = {header.path: display_path(inp, header.path) for reader, inp in pairs for header in reader.headers}
    by_reader = {id(reader): inp.spec for reader, inp in pairs}

    def where(thing: CheckpointReader | TensorInfo) -> str:
        if isinstance(thing, CheckpointReader):
            return by_reader.get(id(thing)) or (thing.headers[0].path.name if thing.headers else thing.label)
        return by_file.get(thing.path, thing.path.name)

    return where


def _check_match(a: TensorInfo, b: TensorInfo, a_role: str, b_role: str) -> None:
    if a.shape != b.shape:
        raise InputError(
            f"shape mismatch for tensor {a.name!r}: {list(a.shape)} in {a_role} but {list(b.shape)} in {b_role}"
        )
    if is_float(a.dtype) != is_float(b.dtype) or (not is_float(a.dtype) and a.dtype != b.dtype):
        raise InputError(
            f"dtype mismatch for tensor {a.name!r}: {DTYPE_CODES[a.dtype]} in {a_role} but "
            f"{DTYPE_CODES[b.dtype]} in {b_role}; only float tensors may differ in precision"
        )


def _anti_only(
    readers: Sequence[CheckpointReader], n_anti: int, on_missing: str, out_dtype: torch.dtype | None
) -> tuple[list[TensorJob], list[str]]:
    """Jobs for keys that anti-experts have and the expert lacks, per `on_missing`."""
    expert = readers[0]
    first_holder: dict[str, int] = {}
    for k in range(1, n_anti + 1):
        for name in readers[k]:
            if name not in expert and name not in first_holder:
                first_holder[name] = k
    if not first_holder:
        return [], []
    if on_missing == "error":
        listed = ", ".join(f"{name!r} ({readers[k].label})" for name, k in list(first_holder.items())[:_SHOWN])
        more = f" and {len(first_holder) - _SHOWN} more" if len(first_holder) > _SHOWN else ""
        raise InputError(
            f"{len(first_holder)} tensor(s) of the anti-expert(s) are not in EXPERT: {listed}{more}; "
            'pass on_missing="copy" (write them unchanged) or on_missing="skip" (leave them out)',
            options=("on_missing",),
        )
    if on_missing == "skip":
        return [], list(first_holder)
    jobs = []
    for name, k in first_holder.items():
        info = readers[k].info(name)
        dtype = out_dtype if out_dtype is not None and is_float(info.dtype) else info.dtype
        jobs.append(TensorJob(name, info.shape, dtype, source=k))
    return jobs, []


Phase = Literal["one-pass", "norms", "update"]


@dataclass(frozen=True, slots=True)
class Block:
    """Rows [start, stop) of a tensor, or elements `cols` of row `start`, handled at once; `phase`: "one-pass", or
    for op rows over several blocks "norms" (sums only) then "update" (written)."""

    job: TensorJob
    start: int
    stop: int
    cols: tuple[int, int] | None = None
    phase: Phase = "one-pass"

    def shape(self) -> tuple[int, ...]:
        if self.cols is not None:
            return (self.cols[1] - self.cols[0],)
        shape = self.job.shape
        return (self.stop - self.start, *shape[1:]) if len(shape) >= 2 else shape

    def elements(self) -> tuple[int, int]:
        row = row_elements(self.job.shape)
        if self.cols is not None:
            return self.start * row + self.cols[0], self.cols[1] - self.cols[0]
        return self.start * row, (self.stop - self.start) * row


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows the op pairs (dim 0; a 0-D or 1-D tensor is one row)."""
    return shape[0] if len(shape) >= 2 else 1


def row_elements(shape: tuple[int, ...]) -> int:
    """Elements in one row the op pairs (0 for a tensor with no rows)."""
    rows = rows_of(shape)
    return math.prod(shape) // rows if rows else 0


def cut_blocks(job: TensorJob, row_bytes: int, block_bytes: int, *, whole_rows: bool) -> list[Block]:
    """Cut `job` into blocks of at most `block_bytes` (`row_bytes` per row): whole rows, or pieces of one; with
    `whole_rows`, merged op rows over several blocks (a Conv1D weight: the whole tensor) go "norms" then "update"."""
    rows = rows_of(job.shape)
    if not rows or not row_bytes:
        return []
    if row_bytes > block_bytes:
        n = row_elements(job.shape)
        step = max(1, block_bytes * n // row_bytes)
        cuts = [(a, min(a + step, n)) for a in range(0, n, step)]
        units = [[Block(job, r, r + 1, cols) for cols in cuts] for r in range(rows)]
    else:
        step = max(1, block_bytes // row_bytes)
        units = [[Block(job, a, min(a + step, rows))] for a in range(0, rows, step)]
    if whole_rows and job.merged and job.transposed:
        units = [[block for unit in units for block in unit]]
    blocks = []
    for unit in units:
        if whole_rows and job.merged and len(unit) > 1:
            blocks += [replace(block, phase="norms") for block in unit] + [replace(b, phase="update") for b in unit]
        else:
            blocks += unit
    return blocks
