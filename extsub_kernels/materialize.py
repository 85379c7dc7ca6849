"""Output layouts of a LoRA adapter: the factored PEFT adapter, the authors' dense-lora, dense deltas.

- `to_peft`: lora_A/lora_B under PEFT keys plus an adapter_config that makes PEFT apply exactly
  scaling·B·A per module. Every module is written with use_rslora=False and
  lora_alpha = scaling·r, so PEFT's lora_alpha/r gives back its scaling: computed modules have
  scaling 1 (lora_alpha = r); modules copied from the expert keep their B and scaling. The most
  common (r, lora_alpha) is the config default; other modules get exact-name rank_pattern /
  alpha_pattern keys (`^` + the escaped module name: PEFT matches them against that module only).
- `iter_dense_lora`: ΔW' as lora_B (out×in) with an identity lora_A (in×in), r = lora_alpha =
  in_features (scaling 1): the layout the paper's released code writes.
- `iter_delta`: ΔW' keyed by the module's weight name in the base model, laid out like that weight.

The iterators yield one module at a time, so a caller can stream outputs of any size.
"""

import re
from collections import Counter
from collections.abc import Iterator

import torch

from extsub_kernels.adapter import PEFT_PREFIX, peft_key
from extsub_kernels.lora import LoraAdapter, LoraModule


def exact_pattern(module: str) -> str:
    """A rank_pattern/alpha_pattern key that PEFT applies to `module` and to nothing else.

    Example:
        >>> exact_pattern("model.layers.0.mlp.up_proj")
        '^model\\\\.layers\\\\.0\\\\.mlp\\\\.up_proj'
    """
    return "^" + re.escape(module)


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


def to_peft(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The factored adapter as (state_dict under PEFT keys, adapter_config dict); see the module doc.

    Args:
        adapter: a loaded or merged adapter.
        dtype: the dtype of the written factors; None keeps each module's storage dtype.

    Returns:
        (state_dict, config), ready for `adapter.write_adapter`; non-LoRA tensors are included.

    Example:
        >>> state_dict, config = to_peft(merge_adapters(expert, anti, 1.0))  # doctest: +SKIP
    """
    state_dict: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        out = dtype or module.storage_dtype
        state_dict[peft_key(name, "A")] = module.lora_A.to(out).contiguous()
        state_dict[peft_key(name, "B")] = module.lora_B.to(out).contiguous()
    state_dict.update(adapter.extra)
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    alphas = {name: _alpha(m) for name, m in adapter.modules.items()}
    return state_dict, peft_config(adapter, ranks, alphas)


def _delta(module: LoraModule, dtype: torch.dtype | None) -> torch.Tensor:
    """ΔW = scaling·B·A computed in float32 (float64 for float64 factors), stored in `dtype`."""
    compute = torch.float64 if torch.float64 in (module.lora_A.dtype, module.lora_B.dtype) else torch.float32
    return module.delta(compute).to(dtype or module.storage_dtype)


def iter_dense_lora(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) pairs of the dense-lora layout, one module at a time: lora_A = I, lora_B = ΔW'.

    Example:
        >>> dict(iter_dense_lora(adapter))  # doctest: +SKIP
    """
    for name, module in adapter.modules.items():
        delta = _delta(module, dtype)
        yield peft_key(name, "A"), torch.eye(module.in_features, dtype=delta.dtype)
        yield peft_key(name, "B"), delta
    yield from adapter.extra.items()


def dense_lora_config(adapter: LoraAdapter) -> dict:
    """The adapter_config of the dense-lora layout: r = lora_alpha = in_features per module (scaling 1)."""
    ranks = {name: m.in_features for name, m in adapter.modules.items()}
    return peft_config(adapter, ranks, dict(ranks))


def to_dense_lora(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The dense-lora layout as (state_dict, adapter_config); memory grows as out·in per module.

    Example:
        >>> state_dict, config = to_dense_lora(merged)  # doctest: +SKIP
    """
    return dict(iter_dense_lora(adapter, dtype=dtype)), dense_lora_config(adapter)


def delta_key(module: str) -> str:
    """The base model's weight name of a module: `model.layers.0.mlp.up_proj` → `....up_proj.weight`."""
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX) :]
    return f"{module}.weight"


def iter_delta(
    adapter: LoraAdapter,
    *,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(weight name, ΔW') per module, laid out like the base model's weight so θ₀ + ΔW' is a plain add.

    nn.Linear stores (out, in); GPT-2's Conv1D (PEFT's fan_in_fan_out=True) stores (in, out),
    so there ΔW' is transposed. Non-LoRA tensors are not part of this layout.

    Args:
        adapter: a loaded or merged adapter.
        dtype: the dtype of ΔW'; None keeps each module's storage dtype.
        fan_in_fan_out: whether the base weights are stored (in, out); None takes the adapter's flag.

    Example:
        >>> deltas = dict(iter_delta(merged))  # doctest: +SKIP
        >>> base_state["model.layers.0.self_attn.q_proj.weight"] += deltas["model.layers.0.self_attn.q_proj.weight"]  # doctest: +SKIP
    """
    transposed = adapter.fan_in_fan_out if fan_in_fan_out is None else fan_in_fan_out
    for name, module in adapter.modules.items():
        delta = _delta(module, dtype)
        yield delta_key(name), (delta.T.contiguous() if transposed else delta)


def to_delta(
    adapter: LoraAdapter, *, dtype: torch.dtype | None = None, fan_in_fan_out: bool | None = None
) -> dict[str, torch.Tensor]:
    """`iter_delta` collected into a dict (for small adapters and tests).

    Example:
        >>> deltas = to_delta(merged)  # doctest: +SKIP
    """
    return dict(iter_delta(adapter, dtype=dtype, fan_in_fan_out=fan_in_fan_out))
