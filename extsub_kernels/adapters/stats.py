"""Row statistics of adapter merges from each type's hooks (`stat_units`, `stat_parts`, `row_sums`, `change_sq`; docs/
design.md §7): ΔW is never formed."""

import math
from collections.abc import Sequence

from extsub_kernels.adapters.family import PeftAdapter
from extsub_kernels.engine.stats import TensorStats, pair_stats


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
    kind = type(adapters[0])
    expert, antis = adapters[0].stat_units(), [a.stat_units() for a in adapters[1:]]
    results = [m.stat_units() for m in merged]
    stats = []
    for name in names:
        for part, select in adapters[0].stat_parts(name):
            pick = select or (lambda unit: unit)
            unit = pick(expert[name])
            pairs = tuple(
                pair_stats(kind.row_sums(unit, pick(anti[name])), role)
                for anti, role in zip(antis, roles[1:], strict=True)
                if name in anti
            )
            norm = pairs[0].expert_norm
            changes = []
            for result in results:
                moved = math.sqrt(kind.change_sq(unit, pick(result[name])))
                changes.append(moved / norm if norm > 0 else (0.0 if moved == 0 else None))
            stats.append(TensorStats(part, "module", pairs, tuple(changes)))
    return stats
