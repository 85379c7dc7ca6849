"""Row statistics by module type and by layer × module type (a name splits at its first numeric component), combined
exactly: cos means weighted by rows, deficiency share Σ|Ext(mᵢ)| / Σ|mᵢ|, relative change ‖θ' − θ⁺‖ / ‖θ⁺‖."""

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from extsub_kernels.engine.options import lam_text
from extsub_kernels.engine.stats import PairStats, TensorStats

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def layer_and_type(name: str) -> tuple[int | None, str]:
    """(layer index or None, module type) of a tensor or module name: "model.layers.3.self_attn.q_proj.weight" →
    (3, "self_attn.q_proj")."""
    match = _LAYER.search(name)
    rest = name[match.end() :] if match else name
    return (int(match[1]) if match else None), rest.removesuffix(".weight")


@dataclass
class Group:
    """Tensors of one module type (or one layer × type cell), combined."""

    tensors: int = 0
    rows: int = 0
    degenerate_rows: int = 0
    layers: set = field(default_factory=set)
    _cos_weighted: float = 0.0
    _measured: int = 0
    _ext_abs: float = 0.0
    _m_abs: float = 0.0
    _expert_sq: float = 0.0
    _changed_sq: list = field(default_factory=list)
    _unknown_change: bool = False

    def add(self, pair: PairStats, changes: Sequence[float | None], layer: int | None) -> None:
        self.tensors += 1
        self.rows += pair.rows
        self.degenerate_rows += pair.degenerate_rows
        if layer is not None:
            self.layers.add(layer)
        if pair.cos is not None:
            self._cos_weighted += pair.cos.mean * pair.measured_rows
            self._measured += pair.measured_rows
        self._ext_abs += pair.deficiency_abs_sum
        self._m_abs += pair.anti_abs_sum
        self._expert_sq += pair.expert_norm**2
        self._changed_sq = self._changed_sq or [0.0] * len(changes)
        self._unknown_change |= None in changes
        for i, change in enumerate(changes):
            self._changed_sq[i] += (change * pair.expert_norm) ** 2 if change is not None else 0.0

    @property
    def cos_mean(self) -> float | None:
        return self._cos_weighted / self._measured if self._measured else None

    @property
    def deficiency_share(self) -> float | None:
        return self._ext_abs / self._m_abs if self._m_abs > 0 else None

    @property
    def relative_change(self) -> list[float | None]:
        if self._unknown_change or self._expert_sq == 0:
            return [None] * len(self._changed_sq)
        return [math.sqrt(sq / self._expert_sq) for sq in self._changed_sq]


def anti_roles(stats: Iterable[TensorStats]) -> list[str]:
    """The anti-experts the statistics speak of, in order of first appearance."""
    roles: list[str] = []
    for tensor in stats:
        for pair in tensor.pairs:
            if pair.anti not in roles:
                roles.append(pair.anti)
    return roles


def by_module_type(stats: Iterable[TensorStats], anti: str, *, layers: bool = False) -> dict:
    """Groups per module type for one anti-expert, in order of first appearance (per (layer, type) with `layers`)."""
    groups: dict = {}
    for tensor in stats:
        for pair in tensor.pairs:
            if pair.anti == anti:
                layer, kind = layer_and_type(tensor.name)
                groups.setdefault((layer, kind) if layers else kind, Group()).add(pair, tensor.relative_change, layer)
    return groups


def by_layer_and_type(stats: Iterable[TensorStats], anti: str) -> dict[tuple[int | None, str], Group]:
    """Groups per (layer, module type) cell for one anti-expert."""
    return by_module_type(stats, anti, layers=True)


def _table(first: str, settings: Sequence[Sequence[float]], rows: Iterable[tuple[str, Group]]) -> list[str]:
    """Markdown lines: the head (`first` columns, the common ones, a change per λ setting), a row per (cells, group)."""
    head = f"| {first} | rows | degenerate rows | mean cos(p, m) | deficiency share |"
    lines = [
        head + "".join(f" change at λ={lam_text(s, short=True)} |" for s in settings),
        "|---" * (first.count("|") + 5 + len(settings)) + "|",
    ]
    for cells, group in rows:
        cos = "–" if group.cos_mean is None else f"{group.cos_mean:+.3f}"
        share = "–" if group.deficiency_share is None else f"{group.deficiency_share:.2f}"
        changes = "".join(f" {'–' if c is None else f'{100 * c:.1f} %'} |" for c in group.relative_change)
        lines.append(f"| {cells} | {group.rows} | {group.degenerate_rows} | {cos} | {share} |{changes}")
    return lines


def summary_table(stats: Sequence[TensorStats], settings: Sequence[Sequence[float]]) -> str:
    """Markdown: per anti-expert, a row per module type (layers, tensors and `_table`'s columns); "" without stats."""
    if not stats:
        return ""
    parts = []
    for anti in anti_roles(stats):
        groups = by_module_type(stats, anti).items()
        rows = [
            (f"{k} | {f'{min(g.layers)}–{max(g.layers)}' if g.layers else '–'} | {g.tensors}", g) for k, g in groups
        ]
        lines = _table("module type | layers | tensors", settings, rows)
        parts.append("\n".join(([f"{anti}:"] if len(anti_roles(stats)) > 1 else []) + lines))
    return "\n\n".join(parts) + "\n"


def layer_table(stats: Sequence[TensorStats], anti: str, settings: Sequence[Sequence[float]]) -> str:
    """Markdown: one row per layer × module type for one anti-expert (the detail of `summary_table`)."""
    cells = sorted(by_layer_and_type(stats, anti).items(), key=lambda item: (item[0][0] is None, item[0][0] or 0))
    rows = [(f"{'–' if layer is None else layer} | {kind}", group) for (layer, kind), group in cells]
    return "\n".join(_table("layer | module type", settings, rows)) + "\n"
