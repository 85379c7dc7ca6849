"""The streaming merge engine: resolve, plan from headers, then stream blocks of rows through the op.

`merge` is the one entry point for every input kind: dense checkpoints stream here, LoRA
adapters go to the factored path (`lora_files`), and both share the checks on inputs and
outputs and the report. Per block: read (pread into a reused host buffer) → device → op → host → append to each
output. Reading the next block, computing this one and writing the previous one overlap
(`pipeline`). Host and device memory stay a small multiple of the block size, whatever the
model's size. Outputs are written under temporary names and appear whole or not at all.
"""

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extsub_kernels.devices import resolve_device
from extsub_kernels.errors import InputError
from extsub_kernels.io import (
    CheckpointReader,
    CheckpointWriter,
    ResolvedInput,
    TensorEntry,
    all_or_nothing,
    check_free_space,
    parse_size,
    resolve_input,
)
from extsub_kernels.io.atomic import terminate_as_interrupt
from extsub_kernels.io.resolve import ADAPTER_CONFIG
from extsub_kernels.io.targets import check_outputs
from extsub_kernels.lora import LoraMergeReport, summarize_modules
from extsub_kernels.lora_files import adapter_shard_limit, check_lora_options, merge_lora
from extsub_kernels.plan import (
    METHODS,
    ON_MISSING,
    OUT_DTYPES,
    Lam,
    conv1d_weights,
    input_roles,
    output_metadata,
    output_paths,
    parse_lams,
    plan_tensors,
)
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
        lora: adapter inputs: the module-level report of each output (empty for dense inputs).
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
    lora: tuple[LoraMergeReport, ...] = field(default=(), repr=False)

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
        modules = f"{summarize_modules(self.lora)} | " if self.lora else ""
        return (
            f"{modules}{self.tensors} tensors ({self.merged} merged, {self.copied} copied{skipped}) | "
            f"read {_human(self.bytes_read)}, wrote {_human(self.bytes_written)} | {self.seconds:.2f} s | "
            f"{self.gb_per_s:.2f} GB/s | peak RSS {rss} | peak GPU {gpu} | {self.device} -> {outputs}"
        )


    def details(self) -> list[str]:
        """Per-module lines of an adapter merge (truncation error, modules left out), per output."""
        return [f"{path}: {line}" for path, report in zip(self.outputs, self.lora) for line in report.details()]


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
    output_format: str | None = None,
    max_rank: int | None = None,
    lora_alpha: float | None = None,
    rank: int | None = None,
    use_rslora: bool = False,
    check_base_model: bool = True,
) -> MergeReport:
    """Merge checkpoints or LoRA adapters with Ext-Sub, streamed: θ' = θ⁺ ⊖ θ₁⁻ ⊖ θ₂⁻ ...

    Dense inputs stream one block of rows at a time through the op. LoRA adapters (PEFT
    folders, hub ids of adapters, bare .safetensors files of lora_A/lora_B) are detected and
    merged exactly in the factored space (DESIGN.md §3); their outputs stream one tensor at a
    time. The inputs are all dense or all adapters (BASE is always a full model).

    Args:
        expert: θ⁺: a .safetensors file, a folder of shards, a PEFT adapter folder, or a hub id
            `org/name[@revision]`.
        anti: θ⁻, one or several (applied in order, paper Table 4), same forms as `expert`.
        out: a path ending in .safetensors (one file) or a folder (model.safetensors, or
            shards and an index past `max_shard_size`).
        lam: λ. A number; a list of numbers (one output per λ, OUT suffixed `-lam<λ>`); a
            per-anti-expert list inside the list (`[[1.0, 0.5]]`); or the CLI's string form
            "0.5,1" / "1:0.5".
        method: "ext-sub" (θ⁺ − λ·Ext(θ⁻)), "sub" (θ⁺ − λθ⁻) or "add" (θ⁺ + λθ⁻).
        base: θ₀, a full model. Dense inputs are then full models, ΔW = θ − θ₀, and OUT is θ₀ + ΔW'
            (a folder OUT gets the expert's config and tokenizer files). With adapter inputs OUT
            is θ₀ + ΔW' of the merged adapter (a folder OUT gets the base's config files).
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: output dtype of float tensors: "keep" (the expert's), "float16", "bfloat16", "float32".
        max_shard_size: largest shard of a folder OUT, bytes or "5GB" (default 5GB).
        on_missing: keys only in an anti-expert: "error" (list them), "copy", "skip".
        force: replace an existing OUT.
        progress: show a progress bar (stderr).
        block_bytes: target bytes of a block of rows (memory is a small multiple of it).
        output_format: adapter inputs: "lora" (default: the exact factored PEFT adapter),
            "dense-lora" (lora_B = ΔW', lora_A = I: the paper's layout) or "delta" (ΔW' keyed by
            the base model's weight names). Not with `base` (the output is the full model).
        max_rank: adapter inputs, "lora" only: truncate each module to this rank (SVD in the
            factored space) and report the relative Frobenius error per module.
        lora_alpha, rank, use_rslora: the scaling of adapter weights that have no
            adapter_config.json (bare .safetensors files).
        check_base_model: refuse adapters whose base_model_name_or_path differ.

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
    if output_format is not None or max_rank is not None:
        check_lora_options(output_format, max_rank, base=base is not None)
    settings = parse_lams(lam, len(antis))
    target = resolve_device(device)
    out = Path(out)
    shard_limit = _shard_limit(out, max_shard_size)
    inputs = _resolve_all(expert, antis, base, quiet=not progress)
    paths = output_paths(out, settings)
    if _adapter_inputs(inputs):
        output_format = check_lora_options(output_format, max_rank, base=base is not None)
        shard_limit = adapter_shard_limit(out, output_format, base=base is not None, max_shard_size=max_shard_size,
                                          default=DEFAULT_MAX_SHARD_SIZE)  # fmt: skip
        check_outputs(paths, inputs, force=force)
        with terminate_as_interrupt():
            run = merge_lora(
                inputs, settings, paths, [_metadata(s, method, inputs, None if base else output_format) for s in settings],
                method=method, output_format=output_format, device=target, max_rank=max_rank,
                out_dtype=OUT_DTYPES[dtype], shard_limit=shard_limit, force=force, check_base_model=check_base_model,
                lora_alpha=lora_alpha, rank=rank, use_rslora=use_rslora, progress=progress,
            )  # fmt: skip
        return MergeReport(
            outputs=run.outputs, tensors=run.tensors, merged=run.merged, copied=run.tensors - run.merged, skipped=0,
            bytes_read=run.bytes_read, bytes_written=run.bytes_written, seconds=time.perf_counter() - started,
            peak_rss_bytes=_peak_rss(), peak_gpu_bytes=run.peak_gpu_bytes, device=str(target), lora=run.reports,
        )  # fmt: skip
    _refuse_adapter_options(inputs[0], output_format=output_format, max_rank=max_rank, lora_alpha=lora_alpha,
                            rank=rank, use_rslora=use_rslora, check_base_model=not check_base_model)  # fmt: skip
    check_outputs(paths, inputs, force=force)
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
    roles = list(zip(input_roles(len(antis)), [expert, *antis]))
    roles += [("BASE", base)] if base is not None else []
    return [(role, resolve_input(spec, role=role, quiet=quiet)) for role, spec in roles]


def _adapter_inputs(inputs: list[tuple[str, ResolvedInput]]) -> bool:
    """True when EXPERT and ANTI are LoRA adapters, False when dense; mixed inputs and an adapter BASE are refused."""
    for role, inp in inputs:
        if role == "BASE" and inp.adapter:
            raise InputError(
                f"BASE {inp.spec!r} is a LoRA adapter; --base takes the full base model θ₀ (adapters go in EXPERT and ANTI)"
            )
    merged = [(role, inp) for role, inp in inputs if role != "BASE"]
    adapters = [(role, inp) for role, inp in merged if inp.adapter]
    if adapters and len(adapters) != len(merged):
        (a_role, a), (d_role, d) = adapters[0], next((r, i) for r, i in merged if not i.adapter)
        raise InputError(
            f"{a_role} {a.spec!r} is a LoRA adapter but {d_role} {d.spec!r} is a dense checkpoint; Ext-Sub combines "
            "adapters with adapters (exactly, in the factored space) or dense checkpoints with dense checkpoints"
        )
    return bool(adapters)


def _refuse_adapter_options(expert: tuple[str, ResolvedInput], **options: object) -> None:
    """Options of the LoRA path given with dense inputs (each None or False when not given): an error naming the first."""
    flags = {"output_format": "--format", "max_rank": "--max-rank", "lora_alpha": "--lora-alpha", "rank": "--rank",
             "use_rslora": "--rslora", "check_base_model": "--any-base-model"}  # fmt: skip
    for name, value in options.items():
        if value not in (None, False):
            role, inp = expert
            raise InputError(f"{flags[name]} ({name}) applies to LoRA adapter inputs; {role} {inp.spec!r} is a dense checkpoint")


def _metadata(
    setting: tuple[float, ...], method: str, inputs: list[tuple[str, ResolvedInput]], output_format: str | None = None
) -> dict[str, str]:
    names = {role: inp.name for role, inp in inputs}
    antis = [name for role, name in names.items() if role.startswith("ANTI")]
    return output_metadata(setting, method, names["EXPERT"], antis, names.get("BASE"), output_format)


def _stream(
    inputs, readers, jobs, skipped, settings, paths, device, *, method, base, shard_limit, force, progress, block_bytes, started
) -> MergeReport:
    """Open every output (temporary names), stream the blocks into them, and publish them whole."""
    entries = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
    expert = inputs[0][1]
    extra = [p for p in expert.config_files if p.name != ADAPTER_CONFIG] if base and shard_limit is not None else []
    with all_or_nothing() as writers:
        for setting, path in zip(settings, paths):
            meta = _metadata(setting, method, inputs)
            writers.append(CheckpointWriter(path, entries, meta, max_shard_size=shard_limit, extra_files=extra, force=force))
        check_free_space(writers)
        streamer = BlockStreamer(readers, [role for role, _ in inputs], settings, method, device, writers)
        bytes_read = streamer.run(streamer.blocks(jobs, block_bytes), progress=progress)
        outputs = tuple(w.commit() for w in writers)
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
