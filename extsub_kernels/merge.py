"""The streaming merge engine: resolve, plan from headers, then stream blocks of rows through the op.

Per block: read (pread into a reused host buffer) → device → op → host → append to each
output. Reading the next block, computing this one and writing the previous one overlap
(`pipeline`). Host and device memory stay a small multiple of the block size, whatever the
model's size. Outputs are written under temporary names and appear whole or not at all.
"""

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from extsub_kernels.devices import BufferPool, Transfer, resolve_device, view_as
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, CheckpointWriter, ResolvedInput, TensorEntry, parse_size, resolve_input
from extsub_kernels.io.atomic import terminate_as_interrupt
from extsub_kernels.io.format import is_float
from extsub_kernels.io.resolve import ADAPTER_CONFIG, CONFIG_PATTERNS
from extsub_kernels.ops import ext_sub_, subtract_
from extsub_kernels.pipeline import run_pipeline
from extsub_kernels.plan import (
    METHODS,
    ON_MISSING,
    OUT_DTYPES,
    Block,
    Lam,
    TensorJob,
    conv1d_weights,
    cut_blocks,
    lam_label,
    output_paths,
    parse_lams,
    plan_tensors,
    rows_of,
)

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_BLOCK_BYTES = 32 << 20
GB = 1e9


def combine(
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    lams: Sequence[float],
    *,
    method: str = "ext-sub",
    base: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    transposed: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """One tensor (or a block of its rows) merged: the method applied with each anti-expert in order.

    ext-sub: θ ← θ − λ·Ext(θ⁻); sub: θ ← θ − λθ⁻; add: θ ← θ + λθ⁻. With `base`, the op works
    on task vectors: ΔW = θ − θ₀ for every input, and the result is θ₀ + ΔW'. `transposed`
    pairs columns instead of rows (GPT-2 Conv1D weights, stored (in, out)).

    A single step in the expert's dtype runs the op in that dtype (it reduces in float32 and
    rounds once); anything longer works in float32 (float64 for float64 inputs) and rounds
    once at the end. `inplace` lets the single-step case overwrite `plus`.

    Example:
        >>> out = combine(torch.randn(8, 16), [torch.randn(8, 16)], [1.0])
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(minus) != len(lams):
        raise ValueError(f"{len(minus)} anti-expert tensors but {len(lams)} λ values")
    out_dtype = out_dtype or plus.dtype
    if len(minus) == 1 and base is None and out_dtype == plus.dtype:
        work = plus if inplace else plus.clone()
        _step(work, minus[0], lams[0], method, transposed)
        return work
    dtypes = [plus.dtype, *(m.dtype for m in minus)] + ([base.dtype] if base is not None else [])
    compute = torch.float64 if torch.float64 in dtypes else torch.float32
    work = plus.to(compute, copy=True)
    if base is not None:
        work.sub_(base)
    for m, lam in zip(minus, lams):
        _step(work, m.to(compute) - base if base is not None else m, lam, method, transposed)
    if base is not None:
        work.add_(base)
    return work.to(out_dtype)


def _step(work: torch.Tensor, minus: torch.Tensor, lam: float, method: str, transposed: bool) -> None:
    if transposed:
        work, minus = work.t(), minus.t()
    if method == "ext-sub":
        ext_sub_(work, minus, lam)
    else:
        subtract_(work, minus, lam if method == "sub" else -lam)


@dataclass(frozen=True)
class MergeReport:
    """What a merge did and what it cost.

    Attributes:
        outputs: the paths written (one per λ setting).
        tensors: tensors in each output; merged went through the op, copied did not.
        skipped: keys left out (anti-expert-only keys with on_missing="skip").
        bytes_read: tensor bytes read from all inputs.
        bytes_written: bytes written to all outputs (headers included).
        seconds: wall time of the whole merge, fsync included.
        peak_rss_bytes: peak resident memory of this process (None where unknown).
        peak_gpu_bytes: peak CUDA memory allocated by torch during the merge (None on CPU).
        device: where the op ran.
    """

    outputs: tuple[Path, ...]
    tensors: int
    merged: int
    copied: int
    skipped: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None
    device: str
    skipped_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def gb_per_s(self) -> float:
        """Input bytes read per second, in GB/s (10⁹ bytes)."""
        return self.bytes_read / GB / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: tensors, GB read and written, seconds, GB/s, peak host RSS, peak GPU memory."""
        rss = _human(self.peak_rss_bytes) if self.peak_rss_bytes is not None else "n/a"
        gpu = _human(self.peak_gpu_bytes) if self.peak_gpu_bytes is not None else "n/a (cpu)"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        outputs = ", ".join(str(p) for p in self.outputs)
        return (
            f"{self.tensors} tensors ({self.merged} merged, {self.copied} copied{skipped}) | "
            f"read {_human(self.bytes_read)}, wrote {_human(self.bytes_written)} | {self.seconds:.2f} s | "
            f"{self.gb_per_s:.2f} GB/s | peak RSS {rss} | peak GPU {gpu} | {self.device} -> {outputs}"
        )


def _human(n: int) -> str:
    """Bytes in GB (10⁹), or MB / kB for small amounts."""
    for unit, size in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def merge(
    expert: str | os.PathLike,
    anti: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    lam: Lam = 1.0,
    method: str = "ext-sub",
    base: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "keep",
    max_shard_size: int | str | None = None,
    on_missing: str = "error",
    force: bool = False,
    progress: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> MergeReport:
    """Merge checkpoints with Ext-Sub, streaming one block of rows at a time: θ' = θ⁺ ⊖ θ₁⁻ ⊖ θ₂⁻ ...

    Args:
        expert: θ⁺: a .safetensors file, a folder of shards, or a hub id `org/name[@revision]`.
        anti: θ⁻, one or several (applied in order, paper Table 4), same forms as `expert`.
        out: a path ending in .safetensors (one file) or a folder (model.safetensors, or
            shards and an index past `max_shard_size`).
        lam: λ. A number; a list of numbers (one output per λ, OUT suffixed `-lam<λ>`); a
            per-anti-expert list inside the list (`[[1.0, 0.5]]`); or the CLI's string form
            "0.5,1" / "1:0.5".
        method: "ext-sub" (θ⁺ − λ·Ext(θ⁻)), "sub" (θ⁺ − λθ⁻) or "add" (θ⁺ + λθ⁻).
        base: θ₀: EXPERT and ANTI are full models, ΔW = θ − θ₀, and OUT is θ₀ + ΔW' (a folder
            OUT gets the expert's config and tokenizer files).
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: output dtype of float tensors: "keep" (the expert's), "float16", "bfloat16", "float32".
        max_shard_size: largest shard of a folder OUT, bytes or "5GB" (default 5GB).
        on_missing: keys only in an anti-expert: "error" (list them), "copy", "skip".
        force: replace an existing OUT.
        progress: show a progress bar (stderr).
        block_bytes: target bytes of a block of rows (memory is a small multiple of it).

    Returns:
        A MergeReport.

    Raises:
        InputError: bad inputs or arguments (nothing is written).
        MergeError, OSError: a failure while streaming (nothing is left behind).

    Example:
        >>> report = merge("expert.safetensors", "anti.safetensors", "out.safetensors", lam=1.0)
        >>> print(report.summary())
    """
    started = time.perf_counter()
    antis = [anti] if isinstance(anti, (str, os.PathLike)) else list(anti)
    _check_choices(method=method, on_missing=on_missing, dtype=dtype, antis=antis, block_bytes=block_bytes)
    settings = parse_lams(lam, len(antis))
    target = resolve_device(device)
    out = Path(out)
    shard_limit = _shard_limit(out, max_shard_size)
    inputs = _resolve_all(expert, antis, base, quiet=not progress)
    paths = output_paths(out, settings)
    _check_outputs(paths, inputs, force=force)
    readers = [CheckpointReader(inp.files, label=role) for role, inp in inputs]
    try:
        jobs, skipped = plan_tensors(
            readers,
            n_anti=len(antis),
            has_base=base is not None,
            on_missing=on_missing,
            out_dtype=OUT_DTYPES[dtype],
            transposed=conv1d_weights(inputs[0][1].config()),
        )
        with terminate_as_interrupt():
            return _stream(
                inputs, readers, jobs, skipped, settings, paths, target,
                method=method, base=base is not None, shard_limit=shard_limit, force=force,
                progress=progress, block_bytes=block_bytes, started=started,
            )  # fmt: skip
    finally:
        for r in readers:
            r.close()


def _check_choices(*, method: str, on_missing: str, dtype: str, antis: list, block_bytes: int) -> None:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if on_missing not in ON_MISSING:
        raise InputError(f"unknown on_missing {on_missing!r}; choose one of {', '.join(ON_MISSING)}")
    if dtype not in OUT_DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUT_DTYPES)}")
    if not antis:
        raise InputError("give at least one anti-expert")
    if not isinstance(block_bytes, int) or block_bytes <= 0:
        raise InputError(f"block_bytes must be a positive int, got {block_bytes!r}")


def _shard_limit(out: Path, max_shard_size: int | str | None) -> int | None:
    if out.suffix == ".safetensors":
        if max_shard_size is not None:
            raise InputError(f"OUT {out} is one .safetensors file; give a folder OUT to shard it with --max-shard-size")
        return None
    return parse_size(max_shard_size if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE)


def _resolve_all(expert, antis, base, *, quiet: bool) -> list[tuple[str, ResolvedInput]]:
    roles = [("EXPERT", expert)]
    roles += [(f"ANTI{'' if len(antis) == 1 else f' #{i + 1}'}", a) for i, a in enumerate(antis)]
    roles += [("BASE", base)] if base is not None else []
    inputs = [(role, resolve_input(spec, role=role, quiet=quiet)) for role, spec in roles]
    for role, inp in inputs:
        if inp.adapter:
            raise InputError(
                f"{role} {inp.spec!r} is a PEFT LoRA adapter; adapters are merged by the LoRA path "
                "(factored, without materialising ΔW), not by the dense merge"
            )
    return inputs


def _check_outputs(paths: list[Path], inputs: list[tuple[str, ResolvedInput]], *, force: bool) -> None:
    """Refuse an OUT that is, is inside, or contains an input; or exists (without force); or cannot be replaced."""
    for path in paths:
        target = path.resolve()
        for role, inp in inputs:
            if inp.kind != "file":
                root = inp.root.resolve()
                if target == root:
                    raise InputError(f"OUT {path} is the {role} folder; choose another OUT (inputs are never overwritten)")
                if root in target.parents:
                    raise InputError(f"OUT {path} is inside the {role} folder {inp.root}; choose another OUT")
            for f in inp.files:
                real = f.resolve()
                if real == target or f.absolute() == path.absolute():
                    raise InputError(f"OUT {path} is the {role} file {f}; choose another OUT (inputs are never overwritten)")
                if target in real.parents:
                    raise InputError(f"OUT {path} contains the {role} file {f}; choose another OUT")
        if not os.path.lexists(path):
            continue
        if not force:
            raise InputError(f"OUT {path} already exists; pass --force to replace it")
        wants_folder = path.suffix != ".safetensors"
        if wants_folder != (path.is_dir() and not path.is_symlink()):
            kind = "a folder" if path.is_dir() else "a file"
            raise InputError(f"OUT {path} exists and is {kind}; --force only replaces an output of the same kind")
        if wants_folder:
            strangers = [p.name for p in path.iterdir() if not _is_checkpoint_file(p)]
            if strangers:
                raise InputError(
                    f"OUT {path} holds files that are not part of a checkpoint (e.g. {strangers[0]!r}); "
                    "--force replaces only checkpoint folders"
                )


def _is_checkpoint_file(p: Path) -> bool:
    return p.is_file() and (p.suffix == ".safetensors" or any(p.match(pat) for pat in CONFIG_PATTERNS))


def _metadata(setting: tuple[float, ...], method: str, inputs: list[tuple[str, ResolvedInput]]) -> dict[str, str]:
    import extsub_kernels

    names = {role: inp.name for role, inp in inputs}
    meta = {
        "format": "pt",
        "extsub.method": method,
        "extsub.lam": json.dumps(list(setting)),
        "extsub.expert": names["EXPERT"],
        "extsub.anti": json.dumps([inp.name for role, inp in inputs if role.startswith("ANTI")]),
        "extsub.version": extsub_kernels.__version__,
    }
    if "BASE" in names:
        meta["extsub.base"] = names["BASE"]
    return meta


def _stream(
    inputs, readers, jobs, skipped, settings, paths, device, *, method, base, shard_limit, force, progress, block_bytes, started
) -> MergeReport:
    entries = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
    expert = inputs[0][1]
    extra = [p for p in expert.config_files if p.name != ADAPTER_CONFIG] if base and shard_limit is not None else []
    writers: list[CheckpointWriter] = []
    try:
        for setting, path in zip(settings, paths):
            meta = _metadata(setting, method, inputs)
            writers.append(CheckpointWriter(path, entries, meta, max_shard_size=shard_limit, extra_files=extra, force=force))
        _check_space(writers)
        by_name = {j.name: j for j in jobs}
        blocks = [b for e in writers[0].order for b in cut_blocks(by_name[e.name], _row_bytes(by_name[e.name], readers), block_bytes)]
        streamer = _Streamer(readers, settings, method, device, blocks, inputs)
        total = sum(streamer.read_bytes(b) for b in blocks)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="extsub-merge", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)  # fmt: skip
        with bar, streamer.transfer:
            streamer.transfer.reset_peak()
            run_pipeline(blocks, streamer.read, streamer.compute, lambda b, r: streamer.write(b, r, writers, bar))
        outputs = tuple(w.commit() for w in writers)
        written = sum(w.bytes_written for w in writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return MergeReport(
        outputs=outputs,
        tensors=len(jobs),
        merged=sum(j.merged for j in jobs),
        copied=sum(not j.merged for j in jobs),
        skipped=len(skipped),
        bytes_read=total,
        bytes_written=written,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss(),
        peak_gpu_bytes=streamer.transfer.peak_memory(),
        device=str(device),
        skipped_keys=tuple(skipped),
    )


def _check_space(writers: list[CheckpointWriter]) -> None:
    need: dict[Path, int] = {}
    for w in writers:
        need[w.target.parent] = need.get(w.target.parent, 0) + w.total_bytes
    for folder, n in need.items():
        free = shutil.disk_usage(folder).free
        if n > free:
            raise InputError(f"not enough space for OUT in {folder}: the output needs {n / GB:.2f} GB, {free / GB:.2f} GB are free")


def _row_bytes(job: TensorJob, readers: list[CheckpointReader]) -> int:
    """Bytes of the widest row of `job` across its inputs, its output and the float32 working copy."""
    rows = rows_of(job.shape)
    if rows == 0:
        return 0
    widest = max(readers[i].info(job.name).nbytes for i in job.inputs())
    numel = readers[job.source].info(job.name).nbytes // readers[job.source].info(job.name).dtype.itemsize
    return max(widest, numel * job.out_dtype.itemsize) // rows


class _Streamer:
    """The three stages for blocks of rows: read into pooled buffers, compute on the device, write."""

    def __init__(self, readers, settings, method, device, blocks: list[Block], inputs):
        self.readers = readers
        self.settings = settings
        self.method = method
        self.inputs = inputs
        self.transfer = Transfer(device)
        capacity = max((self._block_bytes(b) for b in blocks), default=1)
        self.pool = BufferPool(capacity, pin=self.transfer.cuda)

    def _ranges(self, block: Block, i: int) -> tuple[int, int]:
        info = self.readers[i].info(block.job.name)
        row = info.nbytes // rows_of(info.shape)
        return block.start * row, (block.stop - block.start) * row

    def _block_bytes(self, block: Block) -> int:
        n = max(self._ranges(block, i)[1] for i in block.job.inputs())
        numel = n // min(self.readers[i].info(block.job.name).dtype.itemsize for i in block.job.inputs())
        return max(n, numel * block.job.out_dtype.itemsize)

    def read_bytes(self, block: Block) -> int:
        return sum(self._ranges(block, i)[1] for i in block.job.inputs())

    def _read_rows(self, block: Block, i: int, buffer: torch.Tensor) -> torch.Tensor:
        info = self.readers[i].info(block.job.name)
        start, length = self._ranges(block, i)
        self.readers[i].read_into(block.job.name, buffer, start, length)
        return view_as(buffer, info.dtype, block.shape())

    def read(self, block: Block) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        buffers = [self.pool.get() for _ in block.job.inputs()]
        return [self._read_rows(block, i, buf) for i, buf in zip(block.job.inputs(), buffers)], buffers

    def compute(self, block: Block, payload):
        tensors, buffers = payload
        job = block.job
        moved = self.transfer.to_device(tensors)
        if job.merged:
            plus, minus = moved[0], moved[1 : 1 + len(job.antis)]
            theta0 = moved[-1] if job.base is not None else None
            results = []
            for s, setting in enumerate(self.settings):
                lams = [setting[k - 1] for k in job.antis]
                last = s == len(self.settings) - 1
                results.append(
                    combine(plus, minus, lams, method=self.method, base=theta0, out_dtype=job.out_dtype,
                            transposed=job.transposed, inplace=last)  # fmt: skip
                )
                self._check_finite(block, results[-1], setting)
        else:
            results = [moved[0].to(job.out_dtype)] * len(self.settings)
        return self._to_host(results, buffers)

    def _to_host(self, results: list[torch.Tensor], buffers: list[torch.Tensor]):
        if not self.transfer.cuda:
            keep = [b for b in buffers if any(_shares(r, b) for r in results)]
            self.pool.put([b for b in buffers if not any(b is k for k in keep)])
            return results, keep, None
        self.pool.put(buffers)
        host, keep, seen = [], [], {}
        for r in results:
            if id(r) not in seen:
                keep.append(self.pool.get())
                seen[id(r)] = self.transfer.to_host(r, keep[-1])
            host.append(seen[id(r)])
        return host, keep, self.transfer.done_event()

    def write(self, block: Block, result, writers: list[CheckpointWriter], bar: tqdm) -> None:
        host, keep, event = result
        self.transfer.ready(event)
        for tensor, writer in zip(host, writers):
            writer.write(block.job.name, tensor)
        self.pool.put(keep)
        bar.update(self.read_bytes(block))

    def _check_finite(self, block: Block, result: torch.Tensor, setting: tuple[float, ...]) -> None:
        """A NaN or Inf in the result names the input tensor that holds one, or else the overflow."""
        if _all_finite(result):
            return
        job = block.job
        for i in job.inputs():
            role, inp = self.inputs[i]
            data = self._read_rows(block, i, torch.empty(self._ranges(block, i)[1], dtype=torch.uint8))
            if not _all_finite(data):
                row = block.start + _first_nonfinite_row(data)
                where = self.readers[i].info(job.name).path.name
                raise InputError(
                    f"tensor {job.name!r} in {role} ({where}) contains NaN or Inf (first in row {row}); "
                    "the op needs finite weights, so fix or drop that input"
                )
        raise InputError(
            f"tensor {job.name!r}: the result at λ={lam_label(setting)} overflows {job.out_dtype} although the inputs "
            "are finite; use a smaller λ or --dtype float32"
        )


def _all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf: a float64 sum is finite exactly then (short of a
    float64 overflow, checked element by element)."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


def _first_nonfinite_row(t: torch.Tensor) -> int:
    rows = t.reshape(t.shape[0] if t.dim() >= 2 else 1, -1)
    return int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0])


def _shares(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
