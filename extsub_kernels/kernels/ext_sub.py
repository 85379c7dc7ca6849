"""Fused Triton kernel for Ext-Sub (paper Algorithm 1) and its launcher: per row p' = α·p + β·m, α = 1 + (λ/2)·|m|/|p|,
β = −λ/2, |p| = 0 kept (docs/design.md §1); WITH_STATS also stores each row's |p|², |m|², p·m (§7)."""

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from extsub_kernels._tensors import compute_dtype
from extsub_kernels.kernels import ext_sub_tuning as tuning


@triton.jit
def _row_coefficients(p_sq, m_sq, half_lam):
    """α and β of the closed form from the two squared row norms (docs/design.md §1)."""
    p_norm = tl.sqrt(p_sq)
    m_norm = tl.sqrt(m_sq)
    has_p = p_norm > 0.0
    safe_p_norm = tl.where(has_p, p_norm, 1.0)
    alpha = tl.where(has_p, 1.0 + half_lam * m_norm / safe_p_norm, 1.0)
    beta = tl.where(has_p, -half_lam, 0.0)
    return alpha, beta


@triton.jit
def _store_row_sums(stats_ptr, rows, row_mask, p_sq, m_sq, pm):
    """|p|², |m|², p·m of each row into the (rows, 3) row-major `stats_ptr`."""
    row_ptr = stats_ptr + rows * 3
    out_ty = stats_ptr.dtype.element_ty
    tl.store(row_ptr, p_sq.to(out_ty), mask=row_mask)
    tl.store(row_ptr + 1, m_sq.to(out_ty), mask=row_mask)
    tl.store(row_ptr + 2, pm.to(out_ty), mask=row_mask)


@triton.jit
def _ext_sub_kernel(
    p_ptr,
    m_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    p_row_stride,
    m_row_stride,
    half_lam_hi,
    half_lam_lo,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    """In place: p[row] ← α·p[row] + β·m[row] for BLOCK_ROWS rows per program."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    rows = row_start + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    p_row_ptr = p_ptr + rows[:, None] * p_row_stride
    m_row_ptr = m_ptr + rows[:, None] * m_row_stride
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    # λ/2 arrives as two float32 halves (hi + lo) so float64 rows see it to ~48 bits.
    lam = tl.cast(half_lam_hi, COMPUTE_DTYPE) + tl.cast(half_lam_lo, COMPUTE_DTYPE)

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols < n_cols)
        p = tl.load(p_row_ptr + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        m = tl.load(m_row_ptr + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        p_sq = tl.sum(p * p, axis=1)
        m_sq = tl.sum(m * m, axis=1)
        if WITH_STATS:
            _store_row_sums(stats_ptr, rows, row_mask, p_sq, m_sq, tl.sum(p * m, axis=1))
        alpha, beta = _row_coefficients(p_sq, m_sq, lam)
        out = alpha[:, None] * p + beta[:, None] * m
        tl.store(p_row_ptr + cols, out.to(p_ptr.dtype.element_ty), mask=mask)
    else:
        p_acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=COMPUTE_DTYPE)
        m_acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=COMPUTE_DTYPE)
        pm_acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=COMPUTE_DTYPE)
        for col_start in range(0, n_cols, BLOCK_COLS):
            mask = row_mask[:, None] & (col_start + cols < n_cols)
            p = tl.load(p_row_ptr + col_start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            m = tl.load(m_row_ptr + col_start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            p_acc += p * p
            m_acc += m * m
            if WITH_STATS:
                pm_acc += p * m
        p_sq = tl.sum(p_acc, axis=1)
        m_sq = tl.sum(m_acc, axis=1)
        if WITH_STATS:
            _store_row_sums(stats_ptr, rows, row_mask, p_sq, m_sq, tl.sum(pm_acc, axis=1))
        alpha, beta = _row_coefficients(p_sq, m_sq, lam)
        for col_start in range(0, n_cols, BLOCK_COLS):
            mask = row_mask[:, None] & (col_start + cols < n_cols)
            p = tl.load(p_row_ptr + col_start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            m = tl.load(m_row_ptr + col_start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            out = alpha[:, None] * p + beta[:, None] * m
            tl.store(p_row_ptr + col_start + cols, out.to(p_ptr.dtype.element_ty), mask=mask)


def _launch_settings(n_rows: int, n_cols: int, max_block: int) -> tuple[int, int, bool, int]:
    """(BLOCK_ROWS, BLOCK_COLS, SINGLE_PASS, num_warps) for a (n_rows, n_cols) problem."""
    single_pass = n_cols <= max_block
    block_rows = 1
    if single_pass:
        block_cols = triton.next_power_of_2(n_cols)
        block_rows = max(1, min(tuning.TARGET_TILE_ELEMENTS // block_cols, triton.next_power_of_2(n_rows)))
    else:
        block_cols = min(max_block, tuning.LOOP_BLOCK_ELEMENTS)
    tile = block_rows * block_cols
    num_warps = min(tuning.MAX_WARPS, max(1, tile // 512))
    return block_rows, block_cols, single_pass, num_warps


def ext_sub_rows_(
    p: torch.Tensor,
    m: torch.Tensor,
    lam: float,
    max_block: int = tuning.MAX_BLOCK_ELEMENTS,
    *,
    row_stats: torch.Tensor | None = None,
) -> None:
    """Launch the kernel on 2-D views with contiguous columns, overwriting p; rows over `max_block` take the two-loop
    variant; `row_stats` ((rows, 3), contiguous float32/float64) gets |p|², |m|², p·m per row."""
    n_rows, n_cols = p.shape
    wide = compute_dtype(p.dtype, m.dtype) is torch.float64
    max_block = min(max_block, tuning.MAX_BLOCK_ELEMENTS // 2) if wide else max_block
    block_rows, block_cols, single_pass, num_warps = _launch_settings(n_rows, n_cols, max_block)
    half_lam_hi = float(np.float32(0.5 * lam))
    half_lam_lo = 0.5 * lam - half_lam_hi
    grid = (triton.cdiv(n_rows, block_rows),)
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
        stats = row_stats if row_stats is not None else p  # never read without WITH_STATS
        meta = dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, SINGLE_PASS=single_pass, num_warps=num_warps)
        meta.update(COMPUTE_DTYPE=tl.float64 if wide else tl.float32, WITH_STATS=row_stats is not None)
        _ext_sub_kernel[grid](p, m, stats, n_rows, n_cols, p.stride(0), m.stride(0), half_lam_hi, half_lam_lo, **meta)
