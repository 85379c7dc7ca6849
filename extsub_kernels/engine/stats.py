"""What Ext-Sub did to each row, summarised per tensor or module (docs/design.md §7), from three sums per row.

With c = cos(p, m) = p·m/(|p||m|), the closed form Ext(m) = ½(m − |m|·p̂) gives
|Ext(m)|² = |m|²(1 − c)/2: the deficiency share of a row is |Ext(m)|/|m| = √((1 − c)/2) and
the rest of the anti-expert, |m|·√((1 + c)/2), is the "general capability" Ext-Sub keeps. The
change of a row is p' − p = −λ·Ext(m), so ‖θ' − θ⁺‖ = λ·‖Ext(θ⁻)‖ over a tensor. Rows with
|p| = 0 or |m| = 0 have Ext(m) = 0 (docs/design.md §1); they are counted, not averaged.

Everything comes from |p|², |m|² and p·m of each row, which the op hands back from its own
pass (`ext_sub_(..., row_stats=...)`) and LoRA modules give from their factors. Quartiles
need every row: a tensor keeps one float32 cosine per row until it ends (at most a few
hundred thousand rows, about a megabyte), then only its summary stays.
"""

import math
from dataclasses import dataclass

import torch

from extsub_kernels.engine.method_spec import method_spec

# A row counts as antiparallel (Ext(m) = m, the bisector vanishes) when cos(p, m) ≤ −1 + this;
# the sums behind cos are float32 reductions, good to about 1e-7 relative.
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
        anti: the anti-expert's role (ANTI, ANTI #2, ...).
        rows: rows paired (output features).
        zero_expert_rows, zero_anti_rows: rows with |p| = 0 / |m| = 0 (Ext(m) = 0 there).
        antiparallel_rows: rows with cos(p, m) within ANTIPARALLEL_TOLERANCE of −1 (Ext(m) = m).
        measured_rows: rows with both norms non-zero, over which `cos` is taken.
        cos: mean, min, quartiles and max of cos(p, m) (None when no row has both norms).
        expert_norm, anti_norm: ‖θ⁺‖ and ‖θ⁻‖ over these rows (Frobenius).
        deficiency_norm: ‖Ext(θ⁻)‖ (Frobenius), so ‖θ' − θ⁺‖ = λ·deficiency_norm for one anti-expert.
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
        """Rows where a norm is zero or the pair is antiparallel."""
        return self.rows - self.measured_rows + self.antiparallel_rows

    @property
    def deficiency_share(self) -> float | None:
        """|Ext(m)|/|m| = √((1 − cos)/2) averaged over rows weighted by |m|: Σ|Ext(mᵢ)| / Σ|mᵢ|."""
        return self.deficiency_abs_sum / self.anti_abs_sum if self.anti_abs_sum > 0 else None

    def relative_change(self, lam: float, method: str) -> float | None:
        """‖θ' − θ⁺‖/‖θ⁺‖ of one step with this anti-expert at λ (None when ‖θ⁺‖ = 0 and something changes).

        ext-sub: |λ|·‖Ext(θ⁻)‖/‖θ⁺‖; sub and add: |λ|·‖θ⁻‖/‖θ⁺‖ (`MethodSpec.change_per_lam`; None where a method
        does not say).
        """
        per_lam = method_spec(method).change_per_lam
        if per_lam is None:
            return None
        moved = abs(lam) * per_lam(self)
        if self.expert_norm > 0:
            return moved / self.expert_norm
        return 0.0 if moved == 0 else None


class PairAccumulator:
    """Row sums of one pair, block by block, turned into a `PairStats` when the tensor ends.

    A block only keeps its (rows, 3) sums (one small copy, on its device, so no block waits for a
    transfer); the statistics are computed once per tensor in `result`, in a few vectorised ops
    instead of a dozen per block.
    """

    def __init__(self) -> None:
        self._sums: list[torch.Tensor] = []
        self.rows = 0

    def add(self, sums: torch.Tensor) -> None:
        """Add a block of rows: `sums` is (rows, 3) with |p|², |m|², p·m per row (any float dtype, any device)."""
        self._sums.append(sums.to(torch.float64, copy=True))
        self.rows += sums.shape[0]

    def result(self, anti: str) -> PairStats:
        """The summary of every row added so far."""
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
        return PairStats(
            anti=anti,
            rows=self.rows,
            zero_expert_rows=int((~has_p).sum()),
            zero_anti_rows=int((~has_m).sum()),
            antiparallel_rows=int((both & (cos <= -1.0 + ANTIPARALLEL_TOLERANCE)).sum()),
            measured_rows=measured,
            cos=_summarize_cos(measured_cos.to(torch.float32), mean_cos),
            expert_norm=math.sqrt(float(pp.sum())),
            anti_norm=math.sqrt(float(mm.sum())),
            deficiency_norm=math.sqrt(float(ext_sq.sum())),
            anti_abs_sum=float(torch.sqrt(mm).sum()),
            deficiency_abs_sum=float(torch.sqrt(ext_sq).sum()),
        )


def pair_stats(sums: torch.Tensor, anti: str) -> PairStats:
    """`PairStats` of all rows at once, from their (rows, 3) sums |p|², |m|², p·m.

    Example:
        >>> s = pair_stats(torch.tensor([[1.0, 1.0, -1.0]]), "ANTI")
        >>> s.antiparallel_rows, s.deficiency_share
        (1, 1.0)
    """
    acc = PairAccumulator()
    acc.add(sums)
    return acc.result(anti)


def _summarize_cos(cos: torch.Tensor, mean: float | None = None) -> CosSummary | None:
    """Mean (`mean`, when summed more precisely elsewhere), min, quartiles (linear interpolation) and max of a 1-D
    tensor of cosines; None when empty."""
    if cos.numel() == 0:
        return None
    cos = cos.to(torch.float64)
    q1, median, q3 = torch.quantile(cos, torch.tensor(_QUANTILES, dtype=torch.float64)).tolist()
    return CosSummary(float(cos.mean()) if mean is None else mean, float(cos.min()), q1, median, q3, float(cos.max()))


@dataclass(frozen=True)
class TensorStats:
    """What the merge did to one tensor (dense inputs) or module (adapters), row by row.

    Attributes:
        name: the tensor's or module's name.
        kind: "tensor" or "module".
        pairs: the geometry against each anti-expert that has it (expert vs that anti-expert).
        relative_change: ‖θ' − θ⁺‖/‖θ⁺‖ per λ setting (task vectors with a base), in the run's order.
    """

    name: str
    kind: str
    pairs: tuple[PairStats, ...]
    relative_change: tuple[float | None, ...]


def measured_change(result: torch.Tensor, plus: torch.Tensor, *, scratch: torch.Tensor | None = None) -> float:
    """‖result − plus‖² over a block, in float64: the change a merge of several steps made.

    With `scratch` (a 1-D float64 tensor on their device) the difference goes through it chunk by
    chunk, so nothing of the block's size is allocated.
    """
    if scratch is None:
        return float(torch.linalg.vector_norm(result.to(torch.float64) - plus.to(torch.float64)) ** 2)
    flat_result, flat_plus = result.reshape(-1), plus.reshape(-1)
    total, step = 0.0, scratch.numel()
    for start in range(0, flat_result.numel(), step):
        stop = min(start + step, flat_result.numel())
        diff = scratch[: stop - start].copy_(flat_result[start:stop]).sub_(flat_plus[start:stop])
        total += float(torch.dot(diff, diff))
    return total
