"""Row statistics (docs/design.md §7): the formulas against Algorithm 1 in float64, the summaries against our sums."""

import math

import pytest
import torch
import torch.nn.functional as F

from extsub_kernels import ext_sub_reference
from extsub_kernels.engine.stats import ANTIPARALLEL_TOLERANCE, PairAccumulator, pair_stats

from helpers import assert_close_explained

EPS64 = torch.finfo(torch.float64).eps
# The share √((1 − cos)/2) comes from 1 − cos, which cancels on (nearly) parallel rows: an error of a few ε in cos
# becomes √ε in the share. So shares and ‖Ext‖ agree with Algorithm 1 to 4·√ε absolute (relative to |m|).
SHARE_ATOL = 4 * math.sqrt(EPS64)


def _rows_with_degenerate_cases(rows: int = 40, cols: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 rows, with named degenerate rows: 0 zero expert row, 1 zero anti row, 2 both zero,
    3 exactly antiparallel, 4 exactly parallel."""
    p, m = torch.randn(rows, cols, dtype=torch.float64), torch.randn(rows, cols, dtype=torch.float64)
    p[0] = 0
    m[1] = 0
    p[2], m[2] = 0, 0
    m[3] = -2.0 * p[3]  # a power of two: p̂ + m̂ = 0 exactly, as Algorithm 1 needs to see it
    m[4] = 0.5 * p[4]
    return p, m


def _sums(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.stack([(p * p).sum(1), (m * m).sum(1), (p * m).sum(1)], dim=1)


def _algorithm_1_ext(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Ext(m) as the paper's Algorithm 1 writes it (§3), in float64: û = normalize(p̂ + m̂), Ext(m) = m − (m·û)û;
    rows with |p| = 0 extract nothing (docs/design.md §1)."""
    u = F.normalize(F.normalize(p, dim=1) + F.normalize(m, dim=1), dim=1)
    ext = m - (m * u).sum(1, keepdim=True) * u
    return torch.where(p.norm(dim=1, keepdim=True) > 0, ext, 0.0)


def test_the_deficiency_share_and_the_change_follow_algorithm_1():
    p, m = _rows_with_degenerate_cases()
    lam = 0.7
    ext = _algorithm_1_ext(p, m)
    cos = (p * m).sum(1) / (p.norm(dim=1) * m.norm(dim=1))
    both = (p.norm(dim=1) > 0) & (m.norm(dim=1) > 0)
    share = torch.sqrt((1 - cos[both]) / 2)
    assert_close_explained(ext.norm(dim=1)[both] / m.norm(dim=1)[both], share, 0.0, SHARE_ATOL, "|Ext(m)|/|m|", 1.0)
    assert torch.all(ext[~both] == 0), "a zero row on either side extracts nothing"
    assert torch.equal(ext[3], m[3]), "antiparallel rows: the bisector vanishes and Ext(m) = m"
    stats = pair_stats(_sums(p, m), "ANTI")
    assert stats.deficiency_norm == pytest.approx(float(ext.norm()), abs=SHARE_ATOL * float(m.norm()))
    change = float((ext_sub_reference(p, m, lam) - p).norm() / p.norm())
    assert stats.relative_change(lam, "ext-sub") == pytest.approx(
        change, abs=lam * SHARE_ATOL * float(m.norm() / p.norm())
    )
    assert math.isclose(stats.relative_change(lam, "sub"), lam * float(m.norm() / p.norm()), rel_tol=1e-12)


def test_the_summary_of_a_pair_equals_a_float64_computation_with_degenerate_rows():
    p, m = _rows_with_degenerate_cases()
    stats = pair_stats(_sums(p, m), "ANTI #2")
    p_norm, m_norm = p.norm(dim=1), m.norm(dim=1)
    both = (p_norm > 0) & (m_norm > 0)
    cos = ((p * m).sum(1) / (p_norm * m_norm))[both]
    q1, median, q3 = torch.quantile(cos, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    assert stats.anti == "ANTI #2" and stats.rows == 40
    assert (stats.zero_expert_rows, stats.zero_anti_rows, stats.antiparallel_rows) == (2, 2, 1)
    assert stats.measured_rows == 37 and stats.degenerate_rows == 4  # rows 0, 1, 2 and the antiparallel row 3
    assert stats.cos.mean == pytest.approx(float(cos.mean()), rel=1e-12)
    # the other order statistics come from one float32 cosine kept per row: |error| ≤ half an ulp below 1, 2⁻²⁵
    expected = [float(cos.min()), q1, median, q3, float(cos.max())]
    got = [stats.cos.min, stats.cos.q1, stats.cos.median, stats.cos.q3, stats.cos.max]
    assert got == pytest.approx(expected, rel=0, abs=2.0**-25)
    assert stats.cos.min == pytest.approx(-1.0, abs=1e-12) and stats.cos.max == pytest.approx(1.0, abs=1e-12)
    all_cos = ((p * m).sum(1) / (p_norm * m_norm)).clamp(-1.0, 1.0)  # rounding may put a parallel row past 1
    ext_norm = torch.where(both, m_norm * torch.sqrt((1 - all_cos) / 2), 0.0)
    assert stats.deficiency_share == pytest.approx(float(ext_norm.sum() / m_norm.sum()), abs=SHARE_ATOL)
    assert stats.expert_norm == pytest.approx(float(p.norm()), rel=1e-12)
    assert stats.anti_norm == pytest.approx(float(m.norm()), rel=1e-12)


def test_blocks_accumulate_to_the_summary_of_all_rows():
    p, m = _rows_with_degenerate_cases(rows=53)
    whole = pair_stats(_sums(p, m), "ANTI")
    acc = PairAccumulator()
    for start in range(0, 53, 7):
        acc.add(_sums(p[start : start + 7], m[start : start + 7]).to(torch.float32))
    blocks = acc.result("ANTI")
    assert blocks.rows == whole.rows and blocks.degenerate_rows == whole.degenerate_rows
    # cosines are kept per row in float32: quartiles agree to float32 precision
    assert blocks.cos.median == pytest.approx(whole.cos.median, abs=1e-6)
    assert blocks.deficiency_share == pytest.approx(whole.deficiency_share, rel=1e-6)


def test_a_nearly_antiparallel_row_counts_only_within_the_tolerance():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    inside = math.acos(-1 + ANTIPARALLEL_TOLERANCE / 2)
    outside = math.acos(-1 + 4 * ANTIPARALLEL_TOLERANCE)
    m = torch.tensor([[math.cos(inside), math.sin(inside)], [math.cos(outside), math.sin(outside)]])
    assert pair_stats(_sums(p, m.double()), "ANTI").antiparallel_rows == 1


def test_no_rows_and_only_zero_rows_have_no_cosine():
    empty = pair_stats(torch.zeros(0, 3), "ANTI")
    assert empty.rows == 0 and empty.cos is None and empty.deficiency_share is None
    zeros = pair_stats(torch.zeros(3, 3), "ANTI")
    assert zeros.rows == 3 and zeros.degenerate_rows == 3 and zeros.cos is None
    assert zeros.relative_change(1.0, "ext-sub") == 0.0, "nothing moves, so nothing changed"
    only_anti = pair_stats(torch.tensor([[0.0, 4.0, 0.0]]), "ANTI")
    assert only_anti.relative_change(1.0, "sub") is None, "a change of a zero expert has no relative size"
