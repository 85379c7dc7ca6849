"""Row statistics of adapter merges from each PEM's own parameters (docs/design.md §7): ΔW is never formed.

Hooks dispatched on the type, so every member of the PEM family plugs in its own math:
`units(adapter)` gives what it merges, by name (a LoRA module, an (IA)³ task vector
d = l − 1 as one row, a prefix's per-head key/value rows); `row_sums(expert, anti)` gives
|p|², |m|², p·m per row of two units; `change_sq(expert, merged)` gives ‖p' − p‖² of a unit;
`unit_shapes(adapter)` the shape and dtype of each unit, as the report names them. The
engine's `PairAccumulator` turns the sums into the same statistics dense tensors get.

LoRA (ΔW = s·B·A): |p|² from the triangular factor of A⁺ (as the merge's own row norms),
p·m = s⁺s⁻·b⁺ᵢ(A⁺A⁻ᵀ)b⁻ᵢᵀ from an r⁺×r⁻ cross-Gram, and the change from the factors of
[ΔW', −ΔW⁺] stacked: O((d + k)·r²) per module, all in float64. (IA)³ vectors and prefix rows
are small dense tensors: their sums are the op's, in float64.
"""

import math
from collections.abc import Mapping, Sequence
from functools import singledispatch

import torch

from extsub_kernels.adapters.family import PeftAdapter
from extsub_kernels.adapters.ia3 import IA3Adapter
from extsub_kernels.adapters.lora import LoraAdapter, LoraModule, lora_row_norms
from extsub_kernels.adapters.prefix import PROMPT_KEY, PrefixAdapter
from extsub_kernels.engine.stats import TensorStats, pair_stats
from extsub_kernels.io.format import DTYPE_CODES
from extsub_kernels.ops import row_products


@singledispatch
def units(adapter: PeftAdapter) -> Mapping[str, object]:
    """What `adapter` merges, by name: objects `row_sums` and `change_sq` take."""
    raise TypeError(f"no row statistics for {type(adapter).__name__} adapters")


@units.register
def _lora_units(adapter: LoraAdapter) -> Mapping[str, object]:
    return adapter.modules


@units.register
def _ia3_units(adapter: IA3Adapter) -> Mapping[str, object]:
    return {name: vector.to(torch.float64).reshape(1, -1) - 1 for name, vector in adapter.vectors.items()}


@units.register
def _prefix_units(adapter: PrefixAdapter) -> Mapping[str, object]:
    return {PROMPT_KEY: adapter.rows().to(torch.float64)}


@singledispatch
def stat_parts(adapter: PeftAdapter, name: str) -> list[tuple[str, object]]:
    """How one unit's statistics are reported: (name, rows selector or None for all of them) per part.

    A unit is one part, except a prefix, whose rows are per token, layer, key/value and head: one part
    per layer and head (`prompt_embeddings.layers.3.head0`: layer 3, type head0), so the tables and the
    heatmap draw layer × head.
    """
    return [(name, None)]


@stat_parts.register
def _prefix_parts(adapter: PrefixAdapter, name: str) -> list[tuple[str, object]]:
    shape = (adapter.num_virtual_tokens, adapter.num_layers, 2, adapter.num_attention_heads, adapter.head_dim)

    def select(rows: torch.Tensor, layer: int, head: int) -> torch.Tensor:
        return rows.reshape(shape)[:, layer, :, head, :].reshape(-1, adapter.head_dim)

    return [
        (f"{name}.layers.{layer}.head{head}", lambda rows, layer=layer, head=head: select(rows, layer, head))
        for layer in range(adapter.num_layers)
        for head in range(adapter.num_attention_heads)
    ]


@singledispatch
def row_sums(expert: object, anti: object) -> torch.Tensor:
    """(rows, 3) float64 |p|², |m|², p·m of each row of one unit of the expert and of an anti-expert."""
    raise TypeError(f"no row statistics for {type(expert).__name__} and {type(anti).__name__} modules")


@row_sums.register
def _lora_row_sums(expert: LoraModule, anti: LoraModule) -> torch.Tensor:
    b_plus, a_plus = _scaled(expert)
    b_minus, a_minus = _scaled(anti)
    pp = lora_row_norms(b_plus, a_plus) ** 2
    mm = lora_row_norms(b_minus, a_minus) ** 2
    pm = ((b_plus @ (a_plus @ a_minus.T)) * b_minus).sum(dim=1)
    return torch.stack([pp, mm, pm], dim=1)


@row_sums.register
def _dense_row_sums(expert: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
    return row_products(expert, anti)


@singledispatch
def change_sq(expert: object, merged: object) -> float:
    """‖p' − p‖² of one unit (Frobenius), from the expert's unit and the merged one."""
    raise TypeError(f"no change measure for {type(expert).__name__} and {type(merged).__name__} modules")


@change_sq.register
def _lora_change_sq(expert: LoraModule, merged: LoraModule) -> float:
    b_plus, a_plus = _scaled(expert)
    b_out, a_out = _scaled(merged)
    b = torch.cat([b_out, -b_plus], dim=1)
    a = torch.cat([a_out, a_plus], dim=0)
    return float((lora_row_norms(b, a) ** 2).sum())


@change_sq.register
def _dense_change_sq(expert: torch.Tensor, merged: torch.Tensor) -> float:
    return float(((merged.to(torch.float64) - expert.to(torch.float64)) ** 2).sum())


def _scaled(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) in float64."""
    return module.lora_B.to(torch.float64) * module.scaling, module.lora_A.to(torch.float64)


@singledispatch
def unit_shapes(adapter: PeftAdapter) -> dict[str, tuple[tuple[int, ...], str]]:
    """Unit name → (shape, dtype code) as the report gives them; nothing for types without a hook."""
    return {}


@unit_shapes.register
def _lora_shapes(adapter: LoraAdapter) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: ((m.out_features, m.in_features), DTYPE_CODES[m.storage_dtype]) for n, m in adapter.modules.items()}


@unit_shapes.register
def _ia3_shapes(adapter: IA3Adapter) -> dict[str, tuple[tuple[int, ...], str]]:
    dtype = adapter.dtype
    return {n: (tuple(v.shape), DTYPE_CODES[dtype or v.dtype]) for n, v in adapter.vectors.items()}


@unit_shapes.register
def _prefix_shapes(adapter: PrefixAdapter) -> dict[str, tuple[tuple[int, ...], str]]:
    t = adapter.prompt_embeddings
    return {PROMPT_KEY: (tuple(t.shape), DTYPE_CODES[adapter.dtype or t.dtype])}


def adapter_stats(
    adapters: Sequence[PeftAdapter],
    merged: Sequence[PeftAdapter],
    names: Sequence[str],
    roles: Sequence[str],
) -> list[TensorStats]:
    """Statistics of each unit in `names` (merged: in the expert and an anti-expert).

    Args:
        adapters: the expert, then the anti-experts in order.
        merged: the result of each λ setting, in order.
        names: the units to describe (a prefix is described per layer and head, `stat_parts`).
        roles: EXPERT, ANTI, ... naming `adapters`.
    """
    expert, antis = units(adapters[0]), [units(a) for a in adapters[1:]]
    results = [units(m) for m in merged]
    stats = []
    for name in names:
        for part, select in stat_parts(adapters[0], name):
            pick = select or (lambda unit: unit)
            unit = pick(expert[name])
            pairs = tuple(
                pair_stats(row_sums(unit, pick(anti[name])), role)
                for anti, role in zip(antis, roles[1:], strict=True)
                if name in anti
            )
            norm = pairs[0].expert_norm
            changes = []
            for result in results:
                moved = math.sqrt(change_sq(unit, pick(result[name])))
                changes.append(moved / norm if norm > 0 else (0.0 if moved == 0 else None))
            stats.append(TensorStats(part, "module", pairs, tuple(changes)))
    return stats
