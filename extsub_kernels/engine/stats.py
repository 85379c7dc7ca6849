"""What a merge did to each row, per tensor or module, from |p|², |m|², p·m (docs/design.md §7): with c = cos(p, m),
|Ext(m)|² = |m|²(1 − c)/2 and ‖θ' − θ⁺‖ = λ·‖Ext(θ⁻)‖; rows with |p| = 0 or |m| = 0 are counted, not averaged."""

import math
from dataclasses import dataclass

import torch

from extsub_kernels.engine.method_spec import method_spec

# cos(p, m) ≤ −1 + this is antiparallel (Ext(m) = m); the float32 sums behind cos are good to about 1e-7.
ANTIPARALLEL_TOLERANCE = 1e-6
_QUANTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class CosSummary:
    """The distribution of cos(p, m) over the rows where both are non-zero."""

    mean: float
    min: float
    q1: float
    median: float
    q3: float
    max: float


@dataclass(frozen=True)
class PairStats:
    """The geometry of one expert/anti-expert pair over the rows of one tensor or module.

    Attributes:
        anti, rows: the anti-expert's role (ANTI, ANTI #2, ...); rows paired (output features).
        zero_expert_rows, zero_anti_rows, antiparallel_rows: |p| = 0, |m| = 0 (Ext(m) = 0), cos(p, m) ≈ −1.
        measured_rows, cos: rows with both norms non-zero; the distribution of cos(p, m) over them (or None).
        expert_norm, anti_norm, deficiency_norm: ‖θ⁺‖, ‖θ⁻‖ and ‖Ext(θ⁻)‖ over these rows (Frobenius).
        anti_abs_sum, deficiency_abs_sum: Σ|mᵢ| and Σ|Ext(mᵢ)| over rows.
    """

    anti: str
    rows: int
    zero_expert_rows: int
    zero_anti_rows: int
    antiparallel_rows: int
    measured_rows: int
    cos: CosSummary | None
    expert_norm: float
    anti_norm: float
    deficiency_norm: float
    anti_abs_sum: float
    deficiency_abs_sum: float

    @property
    def degenerate_rows(self) -> int:
        return self.rows - self.measured_rows + self.antiparallel_rows

    @property
    def deficiency_share(self) -> float | None:
        """|Ext(m)|/|m| = √((1 − cos)/2) averaged over rows weighted by |m|: Σ|Ext(mᵢ)| / Σ|mᵢ|."""
        return self.deficiency_abs_sum / self.anti_abs_sum if self.anti_abs_sum > 0 else None

    def relative_change(self, lam: float, method: str) -> float | None:
        """‖θ' − θ⁺‖/‖θ⁺‖ of one step at λ (`MethodSpec.change_per_lam`); None where unknown or ‖θ⁺‖ = 0 moves."""
        per_lam = method_spec(method).change_per_lam
        if per_lam is None:
            return None
        moved = abs(lam) * per_lam(self)
        if self.expert_norm > 0:
            return moved / self.expert_norm
        return 0.0 if moved == 0 else None


class PairAccumulator:
    """Row sums of one pair, block by block (copied on their device), as a `PairStats` in `result`."""

    def __init__(self) -> None:
        self._sums: list[torch.Tensor] = []
        self.rows = 0

    def add(self, sums: torch.Tensor) -> None:
        """Add a block of rows' (rows, 3) |p|², |m|², p·m (any float dtype, any device)."""
        self._sums.append(sums.to(torch.float64, copy=True))
        self.rows += sums.shape[0]

    def result(self, anti: str) -> PairStats:
        sums = torch.cat([s.cpu() for s in self._sums]) if self._sums else torch.empty(0, 3, dtype=torch.float64)
        pp, mm, pm = sums[:, 0], sums[:, 1], sums[:, 2]
        has_p, has_m = pp > 0, mm > 0
        both = has_p & has_m
        cos = (pm / torch.sqrt(torch.where(both, pp * mm, 1.0))).clamp(-1.0, 1.0)
        # |Ext(m)|² = |m|²(1 − c)/2 where |p| > 0 and |m| > 0, else 0 (docs/design.md §1).
        ext_sq = torch.where(both, mm * (1.0 - cos) / 2.0, 0.0)
        measured = int(both.sum())
        measured_cos = cos[both]
        mean_cos = float(measured_cos.sum()) / measured if measured else None
        counts = (int((~has_p).sum()), int((~has_m).sum()), int((both & (cos <= -1.0 + ANTIPARALLEL_TOLERANCE)).sum()))
        norms = (math.sqrt(float(pp.sum())), math.sqrt(float(mm.sum())), math.sqrt(float(ext_sq.sum())))
        summary = _summarize_cos(measured_cos.to(torch.float32), mean_cos)
        abs_sums = (float(torch.sqrt(mm).sum()), float(torch.sqrt(ext_sq).sum()))
        return PairStats(anti, self.rows, *counts, measured, summary, *norms, *abs_sums)


def pair_stats(sums: torch.Tensor, anti: str) -> PairStats:
    """`PairStats` of all rows at once, from their (rows, 3) sums |p|², |m|², p·m."""
    acc = PairAccumulator()
    acc.add(sums)
    return acc.result(anti)


def _summarize_cos(cos: torch.Tensor, mean: float | None = None) -> CosSummary | None:
    """Mean (or `mean`), min, quartiles and max of a 1-D tensor of cosines; None when empty."""
    if cos.numel() == 0:
        return None
    cos = cos.to(torch.float64)
    q1, median, q3 = torch.quantile(cos, torch.tensor(_QUANTILES, dtype=torch.float64)).tolist()
    return CosSummary(float(cos.mean()) if mean is None else mean, float(cos.min()), q1, median, q3, float(cos.max()))


@dataclass(frozen=True)
class TensorStats:
    """One tensor or module (`kind`): its geometry against each anti-expert, ‖θ' − θ⁺‖/‖θ⁺‖ per λ setting."""

    name: str
    kind: str
    pairs: tuple[PairStats, ...]
    relative_change: tuple[float | None, ...]


def measured_change(result: torch.Tensor, plus: torch.Tensor, *, scratch: torch.Tensor | None = None) -> float:
    """‖result − plus‖² in float64, through the 1-D float64 `scratch` when given (nothing block-sized allocated)."""
    if scratch is None:
        return float(torch.linalg.vector_norm(result.to(torch.float64) - plus.to(torch.float64)) ** 2)
    flat_result, flat_plus = result.reshape(-1), plus.reshape(-1)
    total, step = 0.0, scratch.numel()
    for start in range(0, flat_result.numel(), step):
        stop = min(start + step, flat_result.numel())
        diff = scratch[: stop - start].copy_(flat_result[start:stop]).sub_(flat_plus[start:stop])
        total += float(torch.dot(diff, diff))
    return total
