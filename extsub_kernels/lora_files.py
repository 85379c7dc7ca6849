"""Adapter files in, one output out: load and validate, merge in the factored space, write atomically.

The whole LoRA job as one call, so a command-line front end only parses arguments. Every
input is validated before anything is written; the output appears whole or not at all.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from extsub_kernels.adapter import load_adapter, write_adapter, write_tensors
from extsub_kernels.errors import InputError
from extsub_kernels.lora import LoraAdapter, LoraMergeReport, merge_adapters
from extsub_kernels.materialize import to_dense_lora, to_delta, to_peft

FORMATS: tuple[str, ...] = ("lora", "dense-lora", "delta")

AdapterSource = str | os.PathLike | LoraAdapter


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
) -> LoraMergeReport:
    """Merge LoRA adapters and write the result as a PEFT adapter folder, a dense-lora folder or deltas.

    Args:
        expert: θ⁺: a PEFT adapter folder, a .safetensors file with adapter_config.json beside
            it, or a LoraAdapter already loaded (e.g. a bare file with explicit scaling).
        antis: θ⁻, one or several in order, in the same forms.
        out: the output: a folder for "lora" and "dense-lora", a .safetensors file for "delta".
        lams, method, max_rank, check_base_model: as `merge_adapters`.
        output_format: "lora" (exact factored adapter, rank r⁺ + r⁻), "dense-lora" (the
            paper's released layout) or "delta" (ΔW' keyed by base-model weight names).
        dtype: dtype of the written tensors; None keeps each module's input dtype.
        overwrite: replace an existing output.

    Returns:
        The LoraMergeReport (its `summary()` is one paragraph for the user).

    The "lora" output is small ((out + in)·(r⁺ + r⁻) numbers per module). "dense-lora" and
    "delta" are out×in per module and are assembled in memory before the atomic write here;
    for adapters of a large model, stream `iter_dense_lora`/`iter_delta` into a header-first
    writer instead.

    Example:
        >>> report = merge_adapter_files("expert/", "anti/", "out/", 1.0)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    from extsub_kernels import __version__

    if output_format not in FORMATS:
        raise InputError(f"unknown output format {output_format!r}; choose one of {', '.join(FORMATS)}")
    if max_rank is not None and output_format != "lora":
        raise InputError(f"max_rank truncates the factored result; it applies to the lora format, not {output_format!r}")
    sources = [expert] + (list(antis) if isinstance(antis, (list, tuple)) else [antis])
    _refuse_overlap(Path(out), [s for s in sources if not isinstance(s, LoraAdapter)])
    if output_format == "delta" and Path(out).suffix != ".safetensors":
        raise InputError(f"{out}: the delta format writes one .safetensors file; give a path ending in .safetensors")
    adapters = [s if isinstance(s, LoraAdapter) else load_adapter(s) for s in sources]
    merged = merge_adapters(
        adapters[0], adapters[1:], lams, method, max_rank=max_rank, check_base_model=check_base_model
    )
    metadata = {
        "extsub_version": __version__,
        "extsub_method": method,
        "extsub_lams": ",".join(repr(lam) for lam in merged.report.lams),
        "extsub_format": output_format,
        "extsub_inputs": " ; ".join(a.source for a in adapters),
    }
    if output_format == "delta":
        write_tensors(out, to_delta(merged, dtype=dtype), metadata=metadata, overwrite=overwrite)
    else:
        state_dict, config = to_peft(merged, dtype=dtype) if output_format == "lora" else to_dense_lora(merged, dtype=dtype)
        write_adapter(out, state_dict, config, metadata=metadata, overwrite=overwrite)
    return merged.report


def _refuse_overlap(out: Path, inputs: list[str | os.PathLike]) -> None:
    """An output that is an input, lies inside one, or contains one would damage that input."""
    target = out.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise InputError(f"the output {out} overlaps the input {source} (the same path, or one inside the other); write it elsewhere")
