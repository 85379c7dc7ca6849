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
    """Statistics of each unit in `names` (in the expert and an anti-expert), from `adapters` (expert first, named by
    `roles`) and the `merged` result of each λ setting; a unit is reported per `stat_parts`."""
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
