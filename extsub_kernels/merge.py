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

from extsub_kernels.devices import resolve_device
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, CheckpointWriter, ResolvedInput, TensorEntry, parse_size, resolve_input
from extsub_kernels.io.atomic import terminate_as_interrupt
from extsub_kernels.io.resolve import ADAPTER_CONFIG, CONFIG_PATTERNS
from extsub_kernels.plan import METHODS, ON_MISSING, OUT_DTYPES, Lam, conv1d_weights, output_paths, parse_lams, plan_tensors
from extsub_kernels.stream import BlockStreamer

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_BLOCK_BYTES = 32 << 20
GB = 1e9


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
    """Open every output (temporary names), stream the blocks into them, and publish them whole."""
    entries = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
    expert = inputs[0][1]
    extra = [p for p in expert.config_files if p.name != ADAPTER_CONFIG] if base and shard_limit is not None else []
    writers: list[CheckpointWriter] = []
    try:
        for setting, path in zip(settings, paths):
            meta = _metadata(setting, method, inputs)
            writers.append(CheckpointWriter(path, entries, meta, max_shard_size=shard_limit, extra_files=extra, force=force))
        _check_space(writers)
        streamer = BlockStreamer(readers, [role for role, _ in inputs], settings, method, device, writers)
        bytes_read = streamer.run(streamer.blocks(jobs, block_bytes), progress=progress)
        outputs = tuple(w.commit() for w in writers)
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
        bytes_read=bytes_read,
        bytes_written=sum(w.bytes_written for w in writers),
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


def _peak_rss() -> int | None:
    """Peak resident memory of this process: VmHWM on Linux (per process image, so a large parent
    does not show through as ru_maxrss does across fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
