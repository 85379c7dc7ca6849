"""`merge()`: validate the options, resolve the inputs, route to the dense engine or the adapter engine, report.

Dense checkpoints stream block by block through the op (`engine.dense`); PEFT adapters are
merged exactly in their factored space (`adapters.run`). Both write through the engine's one
output loop and return the same `MergeReport`.
"""

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from extsub_kernels.adapters import AdapterOptions, PeftAdapter, run_adapters
from extsub_kernels.engine import MergeReport, RunOptions, run_dense
from extsub_kernels.engine.options import (
    DEFAULT_BLOCK_BYTES,
    OUT_DTYPES,
    DtypeName,
    Lam,
    Method,
    OnMissing,
    input_roles,
    lam_label,
    out_dtype,
    parse_lams,
    parse_size,
    resolve_device,
)
from extsub_kernels.errors import InputError
from extsub_kernels.io import ResolvedInput, check_outputs, is_folder_output, output_paths, resolve_input
from extsub_kernels.io.atomic import terminate_as_interrupt

Source = str | os.PathLike | PeftAdapter


def merge(
    expert: Source,
    anti: Source | Sequence[Source],
    out: str | os.PathLike,
    *,
    lam: Lam = 1.0,
    method: Method = "ext-sub",
    base: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: DtypeName | torch.dtype = "keep",
    max_shard_size: int | str | None = None,
    on_missing: OnMissing = "error",
    force: bool = False,
    progress: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    adapter: AdapterOptions | None = None,
) -> MergeReport:
    """Merge checkpoints or PEFT adapters with Ext-Sub, streamed: θ' = θ⁺ ⊖ θ₁⁻ ⊖ θ₂⁻ ...

    Dense inputs stream one block of rows at a time through the op. PEFT adapters (folders,
    hub ids of adapters, bare .safetensors files of lora_A/lora_B, or LoraAdapter,
    IA3Adapter and PrefixAdapter objects) are detected and merged exactly in their own
    parameter space: LoRA in the factored space (DESIGN.md §3), (IA)³ on the vectors l − 1,
    prefix-tuning on the per-head key/value rows (§6); their outputs stream one tensor at a
    time. The inputs are all dense or all adapters of one type (BASE is always a full model).

    Args:
        expert: θ⁺: a .safetensors file, a folder of shards, a PEFT adapter folder, a hub id
            `org/name[@revision]`, or an adapter already loaded (LoraAdapter, IA3Adapter, PrefixAdapter).
        anti: θ⁻, one or several (applied in order, paper Table 4), same forms as `expert`.
        out: a path ending in .safetensors (one file) or a folder (model.safetensors, or
            shards and an index past `max_shard_size`; adapter outputs are PEFT folders).
        lam: λ. A number; a list of numbers (one output per λ, OUT suffixed `-lam<λ>`); a
            per-anti-expert list inside the list (`[[1.0, 0.5]]`); or the CLI's string form
            "0.5,1" / "1:0.5".
        method: "ext-sub" (θ⁺ − λ·Ext(θ⁻)), "sub" (θ⁺ − λθ⁻) or "add" (θ⁺ + λθ⁻).
        base: θ₀, a full model. Dense inputs are then full models, ΔW = θ − θ₀, and OUT is θ₀ + ΔW'
            (a folder OUT gets the expert's config and tokenizer files). With LoRA or (IA)³ inputs OUT
            is θ₀ with the merged adapter folded in (a folder OUT gets the base's config files);
            prefix-tuning changes no weight and is refused.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: output dtype of float tensors: "keep" (the inputs'), "float16", "bfloat16",
            "float32" (or the torch dtype).
        max_shard_size: largest shard of a folder OUT, bytes or "5GB" (default 5GB).
        on_missing: keys only in an anti-expert: "error" (list them), "copy", "skip".
        force: replace an existing OUT.
        progress: show a progress bar (stderr).
        block_bytes: target bytes of a block of rows (memory is a small multiple of it).
        adapter: options of adapter merges (output format, max_rank, scaling of bare LoRA files,
            any_base_model); refused with dense inputs.

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
    sources = [expert, *([anti] if isinstance(anti, (str, os.PathLike, PeftAdapter)) else list(anti))]
    if len(sources) < 2:
        raise InputError("give at least one anti-expert")
    adapter = adapter or AdapterOptions()
    out = Path(out)
    options = RunOptions(
        settings=tuple(parse_lams(lam, len(sources) - 1)),
        method=method,
        device=resolve_device(device),
        out_dtype=_out_dtype(dtype),
        max_shard_size=_max_shard_size(out, max_shard_size),
        on_missing=on_missing,
        force=force,
        progress=progress,
        block_bytes=block_bytes,
    )
    adapter.checked_format(base=base is not None)
    inputs, loaded = _resolve_all(sources, base, quiet=not progress)
    paths = output_paths(out, [lam_label(s) for s in options.settings])
    if _adapter_inputs(inputs):
        check_outputs(paths, inputs, force=force)
        with terminate_as_interrupt():
            return run_adapters(inputs, options, adapter, paths, started=started, loaded=loaded)
    if adapter.given():
        role, inp = inputs[0]
        raise InputError(f"{adapter.given()[0]} applies to adapter inputs; {role} {inp.spec!r} is a dense checkpoint")
    check_outputs(paths, inputs, force=force)
    with terminate_as_interrupt():
        return run_dense(inputs, options, paths, started=started)


def _out_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if dtype not in OUT_DTYPES.values():
            raise InputError(f"dtype {dtype} cannot be an output dtype; choose float16, bfloat16 or float32")
        return dtype
    return out_dtype(dtype)


def _max_shard_size(out: Path, max_shard_size: int | str | None) -> int | None:
    if max_shard_size is None:
        return None
    if not is_folder_output(out):
        raise InputError(f"OUT {out} is one .safetensors file; give a folder OUT to shard it with --max-shard-size")
    return parse_size(max_shard_size)


def _resolve_all(
    sources: Sequence[Source], base: str | os.PathLike | None, *, quiet: bool
) -> tuple[list[tuple[str, ResolvedInput]], dict[str, PeftAdapter]]:
    """(role, input) pairs for every input (BASE last), and the adapters given as objects, by role."""
    roles = input_roles(len(sources) - 1)
    inputs, loaded = [], {}
    for role, source in zip(roles, sources, strict=True):
        if isinstance(source, PeftAdapter):
            loaded[role] = source
            inputs.append((role, ResolvedInput(source.source, source.source, "memory", Path(), (), adapter=True)))
        else:
            inputs.append((role, resolve_input(source, role=role, quiet=quiet)))
    if base is not None:
        inputs.append(("BASE", resolve_input(base, role="BASE", quiet=quiet)))
    return inputs, loaded


def _adapter_inputs(inputs: Sequence[tuple[str, ResolvedInput]]) -> bool:
    """True when EXPERT and ANTI are PEFT adapters, False when dense; mixed inputs and an adapter BASE are refused."""
    for role, inp in inputs:
        if role == "BASE" and inp.adapter:
            raise InputError(
                f"BASE {inp.spec!r} is a PEFT adapter; --base takes the full base model θ₀ "
                "(adapters go in EXPERT and ANTI)"
            )
    merged = [(role, inp) for role, inp in inputs if role != "BASE"]
    adapters = [(role, inp) for role, inp in merged if inp.adapter]
    if adapters and len(adapters) != len(merged):
        (a_role, a), (d_role, d) = adapters[0], next((r, i) for r, i in merged if not i.adapter)
        raise InputError(
            f"{a_role} {a.spec!r} is a PEFT adapter but {d_role} {d.spec!r} is a dense checkpoint; Ext-Sub combines "
            "adapters with adapters (exactly, in their own parameter space) or dense checkpoints with dense checkpoints"
        )
    return bool(adapters)


def merge_adapter_files(
    expert: Source,
    antis: Source | Sequence[Source],
    out: str | os.PathLike,
    lams: float | Sequence[float] = 1.0,
    method: Method = "ext-sub",
    *,
    output_format: str = "lora",
    max_rank: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    check_base_model: bool = True,
    max_shard_size: int | str | None = None,
) -> MergeReport:
    """Deprecated alias of `merge` for adapters (extsub 0.1); `lams` is one λ, or one per anti-expert.

    Use `merge(expert, antis, out, lam=..., force=..., adapter=AdapterOptions(...))`.
    """
    warnings.warn(
        "merge_adapter_files is deprecated; use merge(expert, antis, out, lam=..., force=..., "
        "adapter=AdapterOptions(output_format=..., max_rank=..., any_base_model=...))",
        DeprecationWarning,
        stacklevel=2,
    )
    lam = lams if isinstance(lams, (int, float)) else [list(lams)]
    return merge(
        expert,
        antis,
        out,
        lam=lam,
        method=method,
        dtype=dtype if dtype is not None else "keep",
        max_shard_size=max_shard_size,
        force=overwrite,
        adapter=AdapterOptions(output_format=output_format, max_rank=max_rank, any_base_model=not check_base_model),
    )
