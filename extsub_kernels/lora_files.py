"""LoRA adapters in, outputs out: the adapter half of `extsub-merge`, and `merge_adapter_files` in Python.

Every adapter is loaded and validated before anything is written (PEFT folders, hub
snapshots, bare .safetensors files with their scaling). The merge runs in the factored space
once per λ setting (O((out + in)·r²) per module, DESIGN.md §3). Each output is a `Layout`
streamed through the engine's header-first writer one tensor at a time, so no output is ever
held in memory: a PEFT adapter (`lora`), the paper's dense layout (`dense-lora`), dense deltas
(`delta`), or, with a base model, the full merged model θ₀ + ΔW' (`full_model`).
"""

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from extsub_kernels.adapter import AdapterError, load_adapter, peft_key
from extsub_kernels.devices import Transfer
from extsub_kernels.errors import InputError
from extsub_kernels.full_model import full_model_layouts, match_targets
from extsub_kernels.io import CheckpointReader, ResolvedInput, parse_size, resolve_input
from extsub_kernels.io.resolve import ADAPTER_CONFIG
from extsub_kernels.io.targets import check_outputs
from extsub_kernels.layout import Layout, write_layouts
from extsub_kernels.lora import LoraAdapter, LoraMergeReport, MergedAdapter, check_max_rank, merge_adapters
from extsub_kernels.materialize import delta_key, delta_layout, dense_lora_layout, lora_layout
from extsub_kernels.plan import conv1d_weights, input_roles, output_metadata

FORMATS: tuple[str, ...] = ("lora", "dense-lora", "delta")

AdapterSource = str | os.PathLike | LoraAdapter


def check_lora_options(output_format: str | None, max_rank: int | None, *, base: bool) -> str:
    """The output format of an adapter merge (default "lora"), after the checks that need no input.

    Raises:
        InputError: an unknown format; a format with a base model (the output is then the full
            model); a max_rank that is not a positive int, or with another format than lora.
    """
    if output_format is not None and output_format not in FORMATS:
        raise InputError(f"unknown output format {output_format!r}; choose one of {', '.join(FORMATS)}")
    if base and output_format is not None:
        raise InputError(
            f"--base writes the full merged model θ₀ + ΔW'; --format {output_format} is for adapter outputs, drop one of them"
        )
    if max_rank is not None:
        check_max_rank(max_rank)
        if base or (output_format or "lora") != "lora":
            other = "--base" if base else f"--format {output_format}"
            raise InputError(f"--max-rank truncates the factored adapter, so it applies to --format lora, not to {other}")
    return output_format or "lora"


def adapter_shard_limit(
    out: Path, output_format: str, *, base: bool, max_shard_size: int | str | None, default: int | str | None
) -> int | None:
    """Largest shard of an adapter merge's output in bytes, None for one weights file.

    Full models (`base`) and `delta` folders shard like the dense engine's outputs, past
    `max_shard_size` or `default`. Adapter folders are one adapter_model.safetensors by
    default, the only file PEFT reads: `lora` never shards, `dense-lora` only when asked to.
    """
    if out.suffix == ".safetensors":
        if not base and output_format != "delta":
            raise InputError(
                f"OUT {out}: the {output_format} format writes a PEFT adapter folder (adapter_model.safetensors and "
                f"{ADAPTER_CONFIG}); give a folder OUT, or --format delta for one .safetensors file"
            )
        return None
    if base or output_format == "delta":
        size = max_shard_size if max_shard_size is not None else default
        return parse_size(size) if size is not None else None
    if max_shard_size is None:
        return None
    if output_format == "lora":
        raise InputError(
            "a lora adapter is small and PEFT reads it from one adapter_model.safetensors; "
            "--max-shard-size applies to dense-lora, delta and --base outputs"
        )
    warnings.warn(
        "--max-shard-size shards the dense-lora adapter (adapter_model-0000i-of-0000n.safetensors and an index); "
        "PEFT's from_pretrained reads only an unsharded adapter_model.safetensors",
        stacklevel=2,
    )
    return parse_size(max_shard_size)


def load_inputs(
    inputs: Sequence[tuple[str, ResolvedInput]],
    *,
    lora_alpha: float | None = None,
    rank: int | None = None,
    use_rslora: bool = False,
) -> list[LoraAdapter]:
    """Load and validate resolved adapter inputs, in order; each adapter's `source` is its spec.

    An adapter with an adapter_config.json (in its folder, or beside a bare file) takes its
    scaling from it. Weights without one take the explicit `lora_alpha` (and `rank`,
    `use_rslora`); without those, loading fails with a message that says so. Explicit scaling
    that no input needs is refused rather than silently ignored: a config is never overridden.

    Raises:
        AdapterError: a bad adapter (see `load_adapter`), or scaling that is missing or unused.
    """
    explicit = lora_alpha is not None or rank is not None or use_rslora
    adapters, used = [], False
    for role, inp in inputs:
        path = inp.files[0] if inp.kind == "file" else inp.root
        has_config = (inp.files[0].parent if inp.kind == "file" else inp.root).joinpath(ADAPTER_CONFIG).is_file()
        if has_config or not explicit:
            adapter = load_adapter(path)
        elif len(inp.files) != 1:
            raise AdapterError(f"{role} {inp.spec}: LoRA weights in {len(inp.files)} files; an adapter is one .safetensors file")
        else:
            adapter = load_adapter(inp.files[0], lora_alpha=lora_alpha, r=rank, use_rslora=use_rslora)
            used = True
        adapters.append(dataclasses.replace(adapter, source=inp.spec))
    if explicit and not used:
        raise AdapterError(
            f"--lora-alpha/--rank/--rslora give the scaling of LoRA weights that have no {ADAPTER_CONFIG}, but every "
            "adapter here has one (a config's scaling is never overridden); drop them"
        )
    return adapters


def merge_setting(
    expert: LoraAdapter,
    antis: Sequence[LoraAdapter],
    lams: float | Sequence[float],
    method: str,
    *,
    output_format: str,
    base: bool,
    max_rank: int | None = None,
    check_base_model: bool = True,
) -> MergedAdapter:
    """`merge_adapters` for one λ setting, with the non-LoRA tensors handled as the output needs.

    They are full weights (PEFT's modules_to_save, trained biases). Adapter folders get the
    expert's copied (merge_adapters warns). A `delta` output leaves them out, with a warning:
    they are not deltas. With a base model they are merged against θ₀ by the full model, so
    here they are only listed.
    """
    if not base and output_format != "delta":
        return merge_adapters(expert, antis, lams, method, max_rank=max_rank, check_base_model=check_base_model)
    stripped = [dataclasses.replace(a, extra={}) for a in (expert, *antis)]
    merged = merge_adapters(stripped[0], stripped[1:], lams, method, max_rank=max_rank, check_base_model=check_base_model)
    extra = [f"{a.source}: {key}" for a in (expert, *antis) for key in a.extra]
    if base:
        merged.report.extra_merged.extend(extra)
    elif extra:
        merged.report.extra_left_out.extend(extra)
        warnings.warn(
            f"{len(extra)} non-LoRA tensors (e.g. {extra[0]}) are full weights (PEFT modules_to_save or trained "
            "biases), not deltas; the delta format leaves them out (give --base to merge them into the full model)",
            stacklevel=2,
        )
    return merged


def adapter_layout(
    merged: LoraAdapter, output_format: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Layout:
    """The layout of one adapter output in `output_format` ("lora", "dense-lora" or "delta")."""
    if output_format == "lora":
        return lora_layout(merged, dtype=dtype)
    if output_format == "dense-lora":
        return dense_lora_layout(merged, dtype=dtype, device=device)
    return delta_layout(merged, dtype=dtype, device=device)


@dataclass(frozen=True)
class LoraRun:
    """What an adapter merge wrote: for the engine's MergeReport."""

    outputs: tuple[Path, ...]
    reports: tuple[LoraMergeReport, ...]
    tensors: int  # in each output
    merged: int  # of them, computed by the merge (the rest are copies)
    bytes_read: int
    bytes_written: int
    peak_gpu_bytes: int | None


def merge_lora(
    inputs: Sequence[tuple[str, ResolvedInput]],
    settings: Sequence[tuple[float, ...]],
    paths: Sequence[Path],
    metadata: Sequence[dict[str, str]],
    *,
    method: str,
    output_format: str,
    device: torch.device,
    max_rank: int | None = None,
    out_dtype: torch.dtype | None = None,
    shard_limit: int | None = None,
    force: bool = False,
    check_base_model: bool = True,
    lora_alpha: float | None = None,
    rank: int | None = None,
    use_rslora: bool = False,
    progress: bool = False,
) -> LoraRun:
    """Merge resolved adapter inputs (and a base model) and write one output per λ setting.

    The adapters are read once; each λ setting is a factored merge; every output streams
    through `write_layouts` in one pass (with a base model, each base tensor is read once for
    all outputs). The caller has checked the outputs' paths.

    Args:
        inputs: (role, input) pairs: EXPERT, the ANTIs in order, and BASE if given.
        settings: λ per anti-expert, one tuple per output; `paths`, `metadata`: one per output.
        method, max_rank, check_base_model: as `merge_adapters`.
        output_format: "lora", "dense-lora" or "delta" (ignored with BASE: the full model).
        device: where ΔW' = B·A is formed (dense-lora, delta, BASE).
        out_dtype: the dtype of written float tensors (None: the inputs').
        shard_limit, force, progress: as `write_layouts`.
        lora_alpha, rank, use_rslora: the scaling of weights with no adapter_config.json.
    """
    adapter_inputs = [(role, inp) for role, inp in inputs if role != "BASE"]
    base = next((inp for role, inp in inputs if role == "BASE"), None)
    adapters = load_inputs(adapter_inputs, lora_alpha=lora_alpha, rank=rank, use_rslora=use_rslora)
    bytes_read = sum(f.stat().st_size for _, inp in adapter_inputs for f in inp.files)
    merged = [
        merge_setting(adapters[0], adapters[1:], lams, method, output_format=output_format, base=base is not None,
                      max_rank=max_rank, check_base_model=check_base_model)  # fmt: skip
        for lams in settings
    ]
    transfer = Transfer(device)
    transfer.reset_peak()
    writing = dict(max_shard_size=shard_limit, force=force, progress=progress)
    if base is None:
        layouts = [adapter_layout(m, output_format, dtype=out_dtype, device=device) for m in merged]
        outputs, written = write_layouts(layouts, paths, metadata, **writing)
        computed = _computed_names(merged[0], output_format) & {e.name for e in layouts[0].entries}
    else:
        with CheckpointReader(base.files, label="BASE") as reader:
            targets = match_targets(
                merged[0].modules, reader, fan_in_fan_out=merged[0].fan_in_fan_out, conv1d=conv1d_weights(base.config()),
                expert_extra=adapters[0].extra, anti_extras=[a.extra for a in adapters[1:]],
                sources=[a.source for a in adapters],
            )  # fmt: skip
            folder = paths[0].suffix != ".safetensors"
            extra_files = [p for p in base.config_files if p.name != ADAPTER_CONFIG] if folder else []
            layouts = full_model_layouts(merged, settings, reader, targets, method=method, out_dtype=out_dtype,
                                         device=device, extra_files=extra_files)  # fmt: skip
            outputs, written = write_layouts(layouts, paths, metadata, **writing)
            bytes_read += sum(reader.info(k).nbytes for k in reader.keys())
            computed = list(targets)
    return LoraRun(
        outputs=outputs,
        reports=tuple(m.report for m in merged),
        tensors=len(layouts[0].entries),
        merged=len(computed),
        bytes_read=bytes_read,
        bytes_written=written,
        peak_gpu_bytes=transfer.peak_memory(),
    )


def _computed_names(merged: MergedAdapter, output_format: str) -> set[str]:
    """Output tensors of an adapter layout that the merge computed (the rest are the expert's, copied)."""
    modules = [*merged.report.merged, *merged.report.added]
    if output_format == "delta":
        return {delta_key(m) for m in modules}
    return {peft_key(m, part) for m in modules for part in "AB"}


def merge_adapter_files(
    expert: AdapterSource,
    antis: AdapterSource | Sequence[AdapterSource],
    out: str | os.PathLike,
    lams: float | Sequence[float] = 1.0,
    method: str = "ext-sub",
    *,
    output_format: str = "lora",
    max_rank: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    check_base_model: bool = True,
    max_shard_size: int | str | None = None,
) -> LoraMergeReport:
    """Merge LoRA adapters and write the result as a PEFT adapter folder, a dense-lora folder or deltas.

    The Python counterpart of `extsub-merge` for adapters that may already be in memory;
    `extsub_kernels.merge` takes adapter paths too and adds λ lists and a base model.

    Args:
        expert: θ⁺: a PEFT adapter folder, a .safetensors file with adapter_config.json beside
            it, a hub id, or a LoraAdapter already loaded (e.g. a bare file with explicit scaling).
        antis: θ⁻, one or several in order, in the same forms.
        out: the output: a folder for "lora" and "dense-lora"; a .safetensors file or a folder for "delta".
        lams, method, max_rank, check_base_model: as `merge_adapters`.
        output_format: "lora" (exact factored adapter, rank r⁺ + r⁻), "dense-lora" (the
            paper's released layout) or "delta" (ΔW' keyed by base-model weight names).
        dtype: dtype of the written tensors; None keeps each module's input dtype.
        overwrite: replace an existing output.
        max_shard_size: shard a "dense-lora" or "delta" folder past this size (default: one file).

    Returns:
        The LoraMergeReport (its `summary()` is one line for the user).

    Every output streams to disk one module at a time (memory holds one ΔW', not the output).

    Example:
        >>> report = merge_adapter_files("expert/", "anti/", "out/", 1.0)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    output_format = check_lora_options(output_format, max_rank, base=False)
    out = Path(out)
    limit = adapter_shard_limit(out, output_format, base=False, max_shard_size=max_shard_size, default=None)
    sources = [expert] + (list(antis) if isinstance(antis, (list, tuple)) else [antis])
    roles = input_roles(len(sources) - 1)
    resolved = [
        (role, resolve_input(s, role=role, quiet=True)) for role, s in zip(roles, sources) if not isinstance(s, LoraAdapter)
    ]
    check_outputs([out], resolved, force=overwrite)
    loaded = iter(load_inputs(resolved))
    adapters = [s if isinstance(s, LoraAdapter) else next(loaded) for s in sources]
    merged = merge_setting(adapters[0], adapters[1:], lams, method, output_format=output_format, base=False,
                           max_rank=max_rank, check_base_model=check_base_model)  # fmt: skip
    names = [a.source for a in adapters]
    meta = output_metadata(merged.report.lams, method, names[0], names[1:], output_format=output_format)
    write_layouts([adapter_layout(merged, output_format, dtype=dtype)], [out], [meta], max_shard_size=limit, force=overwrite)
    return merged.report
