"""The family's output formats, by `--format` name (`OUTPUT_FORMATS`), and the three of a LoRA adapter.

(IA)³ and prefix-tuning adapters have one format each, their own PEFT folder
(`ia3.ia3_output`, `prefix.prefix_output`). A LoRA adapter has three:

- `lora`: lora_A/lora_B under PEFT keys plus an adapter_config that makes PEFT apply exactly
  scaling·B·A per module. Every module is written with use_rslora=False and
  lora_alpha = scaling·r, so PEFT's lora_alpha/r gives back its scaling: computed modules have
  scaling 1 (lora_alpha = r); modules copied from the expert keep their B and scaling. The most
  common (r, lora_alpha) is the config default; other modules get exact-name rank_pattern /
  alpha_pattern keys (`^` + the escaped module name: PEFT matches them against that module only).
- `dense-lora`: ΔW' as lora_B (out×in) with an identity lora_A (in×in), r = lora_alpha =
  in_features (scaling 1): the layout the paper's released code writes.
- `delta`: ΔW' keyed by the module's weight name in the base model, laid out like that weight.

Each format is a `LazyOutput` (`lora_output`, `dense_lora_output`, `delta_output`): its
tensors' names, dtypes and shapes are known up front and each is made on demand, so
`write_outputs` streams outputs of any size one module at a time. `to_*` collect an output in
memory (small adapters, tests); the iterators yield one module at a time.
"""

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from extsub_kernels._tensors import all_finite
from extsub_kernels.adapters.family import config_text
from extsub_kernels.adapters.ia3 import ia3_key, ia3_output
from extsub_kernels.adapters.lora import Device, LoraAdapter, LoraModule, module_delta
from extsub_kernels.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, exact_pattern, peft_key, weight_key
from extsub_kernels.adapters.prefix import PROMPT_KEY, prefix_output
from extsub_kernels.engine.outputs import LazyOutput, write_outputs
from extsub_kernels.errors import InputError
from extsub_kernels.io import TensorEntry
from extsub_kernels.io.outputs import refuse_existing


def peft_config(adapter: LoraAdapter, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """An adapter_config.json dict giving each module of `ranks` its rank and lora_alpha.

    Args:
        adapter: supplies base_model_name_or_path, task_type, fan_in_fan_out and, when it has
            non-LoRA tensors, the original config's modules_to_save and bias.
        ranks, alphas: per module name; use_rslora is False, so each scaling is alpha/rank.

    Returns:
        The config dict: the most common (r, lora_alpha) as defaults, rank_pattern/alpha_pattern
        for the other modules, target_modules the sorted module names.
    """
    if not ranks:
        raise ValueError(f"{adapter.source}: no LoRA modules to write (every module was left out)")
    default_r, default_alpha = Counter((ranks[n], alphas[n]) for n in ranks).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "revision": adapter.config.get("revision"),
        "r": default_r,
        "lora_alpha": default_alpha,
        "use_rslora": False,
        "rank_pattern": {exact_pattern(n): ranks[n] for n in ranks if ranks[n] != default_r},
        "alpha_pattern": {exact_pattern(n): alphas[n] for n in ranks if alphas[n] != default_alpha},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if adapter.extra:
        config["modules_to_save"] = adapter.config.get("modules_to_save")
        config["bias"] = adapter.config.get("bias", "none")
    return config


def _alpha(module: LoraModule) -> float | int:
    """lora_alpha giving `module.scaling` under lora_alpha/r (an int when it is one)."""
    alpha = module.scaling * module.rank
    return int(alpha) if float(alpha).is_integer() else alpha


def _finite(module: str, key: str, make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`make`, checked: an adapter merge's output never holds NaN or ±inf (its inputs are finite: it overflowed)."""

    def checked() -> torch.Tensor:
        tensor = make()
        if not all_finite(tensor):
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise InputError(
                f"module {module}: {key} overflows {dtype} (ΔW' = s·B·A leaves its range, from the adapters' "
                "scaling lora_alpha/r, λ or --dtype)"
            )
        return tensor

    return checked


def _extra_makers(adapter: LoraAdapter) -> list:
    return [(TensorEntry(key, t.dtype, tuple(t.shape)), lambda t=t: t) for key, t in adapter.extra.items()]


def lora_output(adapter: LoraAdapter, *, dtype: torch.dtype | None = None, device: Device = None) -> LazyOutput:
    """The factored adapter as a PEFT adapter folder; see the module doc.

    Args:
        adapter: a loaded or merged adapter; its non-LoRA tensors are included as they are.
        dtype: the dtype of the written factors; None keeps each module's storage dtype.
        device: unused (the factors are written as they are); every output format takes it.
    """
    makers = []
    for name, module in adapter.modules.items():
        out = dtype or module.storage_dtype
        for part, factor in (("A", module.lora_A), ("B", module.lora_B)):
            key = peft_key(name, part)
            make = _finite(name, key, lambda f=factor, o=out: f.to(o).contiguous())
            makers.append((TensorEntry(key, out, tuple(factor.shape)), make))
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    alphas = {name: _alpha(m) for name, m in adapter.modules.items()}
    config = peft_config(adapter, ranks, alphas)
    return LazyOutput.lazy(
        makers + _extra_makers(adapter), texts={CONFIG_NAME: config_text(config)}, weights_name=WEIGHTS_NAME
    )


def dense_lora_output(adapter: LoraAdapter, *, dtype: torch.dtype | None = None, device: Device = None) -> LazyOutput:
    """The dense-lora format: per module lora_A = I (in×in), lora_B = ΔW' (out×in), made one module at a time.

    Args:
        adapter: a loaded or merged adapter; its non-LoRA tensors are included as they are.
        dtype: the dtype of the written tensors; None keeps each module's storage dtype.
        device: where B·A is computed (default: the CPU).
    """
    makers = []
    for name, module in adapter.modules.items():
        out = dtype or module.storage_dtype
        n_in = module.in_features
        makers.append(
            (TensorEntry(peft_key(name, "A"), out, (n_in, n_in)), lambda n=n_in, o=out: torch.eye(n, dtype=o))
        )
        key = peft_key(name, "B")
        make_b = _finite(name, key, lambda m=module, o=out: module_delta(m, dtype=o, device=device).cpu())
        makers.append((TensorEntry(key, out, (module.out_features, n_in)), make_b))
    texts = {CONFIG_NAME: config_text(dense_lora_config(adapter))}
    return LazyOutput.lazy(makers + _extra_makers(adapter), texts=texts, weights_name=WEIGHTS_NAME)


def dense_lora_config(adapter: LoraAdapter) -> dict:
    """The adapter_config of the dense-lora format: r = lora_alpha = in_features per module (scaling 1)."""
    ranks = {name: m.in_features for name, m in adapter.modules.items()}
    return peft_config(adapter, ranks, dict(ranks))


def delta_output(
    adapter: LoraAdapter,
    *,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: bool | None = None,
    device: Device = None,
) -> LazyOutput:
    """ΔW' per module under the base model's weight name, shaped like that weight; non-LoRA tensors are not part of it.

    nn.Linear stores (out, in); GPT-2's Conv1D (PEFT's fan_in_fan_out=True) stores (in, out),
    so there ΔW' is transposed and θ₀ + ΔW' is a plain add.

    Args:
        adapter: a loaded or merged adapter.
        dtype: the dtype of ΔW'; None keeps each module's storage dtype.
        fan_in_fan_out: whether the base weights are stored (in, out); None takes the adapter's flag.
        device: where B·A is computed (default: the CPU).
    """
    transposed = adapter.fan_in_fan_out if fan_in_fan_out is None else fan_in_fan_out
    makers = []
    for name, module in adapter.modules.items():
        shape = (module.in_features, module.out_features) if transposed else (module.out_features, module.in_features)
        key = weight_key(name)
        delta = lambda m=module: module_delta(m, dtype=dtype, transposed=transposed, device=device).cpu()  # noqa: E731
        makers.append((TensorEntry(key, dtype or module.storage_dtype, shape), _finite(name, key, delta)))
    return LazyOutput.lazy(makers)


def to_peft(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The factored adapter as (state_dict under PEFT keys, adapter_config dict); see the module doc.

    Example:
        >>> state_dict, config = to_peft(merge_adapters(expert, anti, 1.0))  # doctest: +SKIP
    """
    output = lora_output(adapter, dtype=dtype)
    return dict(output.items()), json.loads(output.texts[CONFIG_NAME])


def iter_dense_lora(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) pairs of the dense-lora format, one module at a time: lora_A = I, lora_B = ΔW'.

    Example:
        >>> dict(iter_dense_lora(adapter))  # doctest: +SKIP
    """
    return dense_lora_output(adapter, dtype=dtype).items()


def to_dense_lora(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The dense-lora format as (state_dict, adapter_config) in memory: out·in numbers per module.

    Example:
        >>> state_dict, config = to_dense_lora(merged)  # doctest: +SKIP
    """
    return dict(iter_dense_lora(adapter, dtype=dtype)), dense_lora_config(adapter)


def iter_delta(
    adapter: LoraAdapter,
    *,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(weight name, ΔW') per module, laid out like the base model's weight (see `delta_output`).

    Example:
        >>> deltas = dict(iter_delta(merged))  # doctest: +SKIP
        >>> key = "model.layers.0.self_attn.q_proj.weight"  # doctest: +SKIP
        >>> base_state[key] += deltas[key]  # doctest: +SKIP
    """
    return delta_output(adapter, dtype=dtype, fan_in_fan_out=fan_in_fan_out).items()


def to_delta(
    adapter: LoraAdapter, *, dtype: torch.dtype | None = None, fan_in_fan_out: bool | None = None
) -> dict[str, torch.Tensor]:
    """`iter_delta` collected into a dict (for small adapters and tests).

    Example:
        >>> deltas = to_delta(merged)  # doctest: +SKIP
    """
    return dict(iter_delta(adapter, dtype=dtype, fan_in_fan_out=fan_in_fan_out))


def write_adapter(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) atomically.

    Goes through the engine's header-first writer: a temporary folder beside the target,
    fsynced and renamed into place, so the folder appears whole or not at all.

    Args:
        folder: the adapter folder to create (missing parent folders are created).
        state_dict: tensors under PEFT keys (see `to_peft`).
        config: the adapter_config.json contents.
        metadata: extra str→str entries for the safetensors header (format=pt is always set).
        force: replace an existing folder instead of refusing.

    Returns:
        The folder's path.

    Example:
        >>> write_adapter(tmp / "out", *to_peft(merged))  # doctest: +SKIP
    """
    output = LazyOutput.of_tensors(state_dict, texts={CONFIG_NAME: config_text(config)}, weights_name=WEIGHTS_NAME)
    return _write(Path(folder), output, metadata, force)


def write_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write one .safetensors file atomically (temporary file beside it, fsync, rename).

    Example:
        >>> write_tensors(tmp / "delta.safetensors", to_delta(merged))  # doctest: +SKIP
    """
    return _write(Path(path), LazyOutput.of_tensors(tensors), metadata, force)


def _write(target: Path, output: LazyOutput, metadata: Mapping[str, str] | None, force: bool) -> Path:
    refuse_existing(target, force=force)
    write_outputs([output], [target], [dict(metadata or {})], force=force)
    return target


@dataclass(frozen=True)
class OutputFormat:
    """One `--format`: how an adapter becomes that output, and which output tensors a merged unit becomes.

    Attributes:
        make: (adapter, *, dtype, device) → the lazy output.
        keys: a unit's name (module, vector) → the names of the output tensors it is written as.
    """

    make: Callable[..., LazyOutput]
    keys: Callable[[str], tuple[str, ...]]


def _factor_keys(module: str) -> tuple[str, ...]:
    return peft_key(module, "A"), peft_key(module, "B")


# Every format of the family, by the name `--format` takes (engine.options.FORMATS); each
# adapter type lists the ones it writes in its `formats`.
OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "lora": OutputFormat(lora_output, _factor_keys),
    "dense-lora": OutputFormat(dense_lora_output, _factor_keys),
    "delta": OutputFormat(delta_output, lambda module: (weight_key(module),)),
    "ia3": OutputFormat(ia3_output, lambda module: (ia3_key(module),)),
    "prefix-tuning": OutputFormat(prefix_output, lambda _unit: (PROMPT_KEY,)),
}
