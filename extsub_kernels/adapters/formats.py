"""A LoRA adapter's formats (lora.py's) collected in memory (`to_*`, `iter_*`), and adapter folders and .safetensors
files written atomically from tensors in memory (`write_adapter`, `write_tensors`)."""

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from extsub_kernels.adapters.family import config_text
from extsub_kernels.adapters.lora import LoraAdapter, delta_output, dense_lora_config, dense_lora_output, lora_output
from extsub_kernels.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from extsub_kernels.engine.writing import LazyOutput, write_outputs
from extsub_kernels.io.outputs import refuse_existing


def to_peft(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The factored adapter as (state_dict under PEFT keys, adapter_config dict); see the module doc."""
    output = lora_output(adapter, dtype=dtype)
    return dict(output.items()), json.loads(output.texts[ADAPTER_CONFIG])


def iter_dense_lora(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) pairs of the dense-lora format, one module at a time: lora_A = I, lora_B = ΔW'."""
    return dense_lora_output(adapter, dtype=dtype).items()


def to_dense_lora(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The dense-lora format as (state_dict, adapter_config) in memory: out·in numbers per module."""
    return dict(iter_dense_lora(adapter, dtype=dtype)), dense_lora_config(adapter)


def iter_delta(
    adapter: LoraAdapter,
    *,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(weight name, ΔW') per module, laid out like the base model's weight (see `lora.delta_output`)."""
    return delta_output(adapter, dtype=dtype, fan_in_fan_out=fan_in_fan_out).items()


def to_delta(
    adapter: LoraAdapter, *, dtype: torch.dtype | None = None, fan_in_fan_out: bool | None = None
) -> dict[str, torch.Tensor]:
    """`iter_delta` collected into a dict (for small adapters and tests)."""
    return dict(iter_delta(adapter, dtype=dtype, fan_in_fan_out=fan_in_fan_out))


def write_adapter(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a PEFT adapter folder (`config`, `state_dict` under PEFT keys, `metadata` in its header) atomically;
    `force` replaces. Returns the folder."""
    output = LazyOutput.of_tensors(
        state_dict, texts={ADAPTER_CONFIG: config_text(config)}, weights_name=ADAPTER_WEIGHTS
    )
    return _write(Path(folder), output, metadata, force)


def write_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write one .safetensors file atomically (temporary file beside it, fsync, rename)."""
    return _write(Path(path), LazyOutput.of_tensors(tensors), metadata, force)


def _write(target: Path, output: LazyOutput, metadata: Mapping[str, str] | None, force: bool) -> Path:
    refuse_existing(target, force=force)
    write_outputs([output], [target], [dict(metadata or {})], force=force)
    return target
