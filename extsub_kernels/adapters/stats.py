"""Row statistics of adapter merges from each PEM's own parameters (DESIGN.md §7): ΔW is never formed.

Two hooks, dispatched on the module type, so every member of the PEM family plugs in its own
math: `row_sums(expert_module, anti_module)` gives |p|², |m|², p·m per row of ΔW⁺ and ΔW⁻;
`change_sq(expert_module, merged_module)` gives ‖ΔW' − ΔW⁺‖². The engine's `PairAccumulator`
turns the sums into the same statistics dense tensors get.

LoRA (ΔW = s·B·A): |p|² from the triangular factor of A⁺ (as the merge's own row norms),
p·m = s⁺s⁻·b⁺ᵢ(A⁺A⁻ᵀ)b⁻ᵢᵀ from an r⁺×r⁻ cross-Gram, and the change from the factors of
[ΔW', −ΔW⁺] stacked: O((d + k)·r²) per module, all in float64.
"""

import math
from collections.abc import Sequence
from functools import singledispatch

import torch

from extsub_kernels.adapters.lora import LoraAdapter, LoraModule, lora_row_norms
from extsub_kernels.engine.stats import TensorStats, pair_stats


@singledispatch
def row_sums(expert: object, anti: object) -> torch.Tensor:
    """(rows, 3) float64 |p|², |m|², p·m of each row of one module's ΔW⁺ and ΔW⁻, from their parameters."""
    raise TypeError(f"no row statistics for {type(expert).__name__} and {type(anti).__name__} modules")


@row_sums.register
def _lora_row_sums(expert: LoraModule, anti: LoraModule) -> torch.Tensor:
    b_plus, a_plus = _scaled(expert)
    b_minus, a_minus = _scaled(anti)
    pp = lora_row_norms(b_plus, a_plus) ** 2
    mm = lora_row_norms(b_minus, a_minus) ** 2
    pm = ((b_plus @ (a_plus @ a_minus.T)) * b_minus).sum(dim=1)
    return torch.stack([pp, mm, pm], dim=1)


@singledispatch
def change_sq(expert: object, merged: object) -> float:
    """‖ΔW' − ΔW⁺‖² of one module (Frobenius), from the parameters of the expert's module and the merged one."""
    raise TypeError(f"no change measure for {type(expert).__name__} and {type(merged).__name__} modules")


@change_sq.register
def _lora_change_sq(expert: LoraModule, merged: LoraModule) -> float:
    b_plus, a_plus = _scaled(expert)
    b_out, a_out = _scaled(merged)
    b = torch.cat([b_out, -b_plus], dim=1)
    a = torch.cat([a_out, a_plus], dim=0)
    return float((lora_row_norms(b, a) ** 2).sum())


def _scaled(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) in float64."""
    return module.lora_B.to(torch.float64) * module.scaling, module.lora_A.to(torch.float64)


def adapter_stats(
    adapters: Sequence[LoraAdapter],
    merged: Sequence[LoraAdapter],
    names: Sequence[str],
    roles: Sequence[str],
) -> list[TensorStats]:
    """Statistics of each module in `names` (merged: in the expert and an anti-expert).

    Args:
        adapters: the expert, then the anti-experts in order.
        merged: the result of each λ setting, in order.
        names: the modules to describe.
        roles: EXPERT, ANTI, ... naming `adapters`.
    """
    expert, antis = adapters[0], adapters[1:]
    stats = []
    for name in names:
        module = expert.modules[name]
        pairs = tuple(
            pair_stats(row_sums(module, anti.modules[name]), role)
            for anti, role in zip(antis, roles[1:], strict=True)
            if name in anti.modules
        )
        norm = pairs[0].expert_norm
        changes = []
        for result in merged:
            moved = math.sqrt(change_sq(module, result.modules[name]))
            changes.append(moved / norm if norm > 0 else (0.0 if moved == 0 else None))
        stats.append(TensorStats(name, "module", pairs, tuple(changes)))
    return stats
