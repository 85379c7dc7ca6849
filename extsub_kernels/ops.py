"""The public ops: validation, dispatch by device (CUDA → Triton, CPU → the C++ kernel, else the eager torch path).
Ext-Sub per row (docs/design.md §1): p' = α·p + β·m, α = 1 + (λ/2)·|m|/|p|, β = −λ/2; rows with |p| = 0 keep p.
On request the same pass hands back each row's |p|², |m|² and p·m (`row_stats`, docs/design.md §7)."""

import functools
import importlib
import os
import warnings
from typing import Literal

import torch

from extsub_kernels._tensors import as_rows, check_pair, compute_dtype, shares_storage
from extsub_kernels._version import install_hint
from extsub_kernels.constants import ENV_TRITON_INTERPRET
from extsub_kernels.reference import ext_sub_reference

Backend = Literal["auto", "triton", "cpp", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cpp", "torch", "reference")

# The eager path's row blocks, in bytes per operand: the write after the norms finds the block in cache.
_CPU_BLOCK_BYTES = 2 << 20


def ext_sub_coefficients(p_norm: torch.Tensor, m_norm: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row α = 1 + (λ/2)·|m|/|p| and β = −λ/2 of p' = α·p + β·m (docs/design.md §1); |p| = 0 keeps p.

    Args:
        p_norm, m_norm: 1-D row norms of the expert and the anti-expert; lam: λ.

    Returns:
        (α, β) as (rows, 1) columns in `p_norm`'s dtype.
    """
    has_p = p_norm > 0
    alpha = torch.where(has_p, 1.0 + (0.5 * lam) * m_norm / torch.where(has_p, p_norm, 1.0), 1.0)
    beta = torch.where(has_p, torch.full_like(p_norm, -0.5 * lam), torch.zeros_like(p_norm))
    return alpha.unsqueeze(1), beta.unsqueeze(1)


def _rows_torch(p: torch.Tensor, m: torch.Tensor, lam: float, row_stats: torch.Tensor | None, *, write: bool) -> None:
    """The eager path on 2-D views (any device): row sums into `row_stats`, and with `write` p ← α·p + β·m; on CPU in
    blocks of _CPU_BLOCK_BYTES per operand widened into reused scratch (about one pass, rounded once)."""
    compute = compute_dtype(p.dtype, m.dtype)
    n_rows, n_cols = p.shape
    step = n_rows if p.device.type != "cpu" else min(n_rows, _CPU_BLOCK_BYTES // max(1, n_cols * compute.itemsize))
    step = max(1, step)
    scratch = [
        torch.empty((step, n_cols), dtype=compute, device=p.device) if t.dtype != compute else None for t in (p, m)
    ]
    for start in range(0, n_rows, step):
        blocks = (p[start : start + step], m[start : start + step])
        p_wide, m_wide = (b if w is None else w[: b.shape[0]].copy_(b) for b, w in zip(blocks, scratch, strict=True))
        p_norm = torch.linalg.vector_norm(p_wide, dim=1)
        m_norm = torch.linalg.vector_norm(m_wide, dim=1)
        if row_stats is not None:
            out = row_stats[start : start + step]
            out[:, 0] = p_norm.to(out.dtype).square()
            out[:, 1] = m_norm.to(out.dtype).square()
            out[:, 2] = torch.linalg.vecdot(p_wide, m_wide, dim=1)
        if not write:
            continue
        if bool((p_norm == 0).any()):  # rare: zero expert rows keep p (α = 1, β = 0)
            alpha, beta = ext_sub_coefficients(p_norm, m_norm, lam)
            p_wide.mul_(alpha).addcmul_(m_wide, beta)
        else:  # the common case in a few in-place ops: α = 1 + (λ/2)|m|/|p|, β = −λ/2
            alpha = torch.div(m_norm, p_norm).mul_(0.5 * lam).add_(1.0).unsqueeze(1)
            p_wide.mul_(alpha).add_(m_wide, alpha=-0.5 * lam)
        if p_wide is not blocks[0]:
            blocks[0].copy_(p_wide)


def row_products(w_plus: torch.Tensor, w_minus: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """|p|², |m|² and p·m per row (dim 0) of a pair, as `ext_sub_(..., row_stats=)` gives them, without the update.

    Args:
        w_plus, w_minus: the pair, same shape and device, any float dtypes.
        out: a (rows, 3) float32/float64 tensor on their device to fill (default: a new float64 one).

    Returns:
        `out`, reduced in float32 (float64 for float64 inputs; docs/design.md §7).
    """
    check_pair(w_plus, w_minus, 0.0)
    rows = w_plus.shape[0] if w_plus.dim() >= 2 else 1
    if out is None:
        out = torch.empty(rows, 3, dtype=torch.float64, device=w_plus.device)
    _check_row_stats(out, w_plus)
    if rows == 0:
        return out
    p, m = as_rows(w_plus), as_rows(w_minus)
    if p.device.type == "cpu" and _contiguous_columns(p) and _contiguous_columns(m) and _cpp_kernel_loads():
        from extsub_kernels.kernels.ext_sub_cpu import row_sums

        row_sums(p, m, out)
    else:
        _rows_torch(p, m, 0.0, out, write=False)
    return out


def _contiguous_columns(t: torch.Tensor) -> bool:
    return t.shape[1] <= 1 or t.stride(1) == 1


def _check_row_stats(row_stats: torch.Tensor | None, w_plus: torch.Tensor) -> None:
    """A ValueError unless `row_stats` (None: nothing to check) can hold the row sums of `w_plus`."""
    if row_stats is None:
        return
    rows, given = w_plus.shape[0] if w_plus.dim() >= 2 else 1, isinstance(row_stats, torch.Tensor)
    fits = given and tuple(row_stats.shape) == (rows, 3) and row_stats.dtype in (torch.float32, torch.float64)
    if not (fits and row_stats.device == w_plus.device and row_stats.is_contiguous()):
        found = (
            f"{tuple(row_stats.shape)} {row_stats.dtype} on {row_stats.device}" if given else type(row_stats).__name__
        )
        raise ValueError(
            f"row_stats must be a contiguous ({rows}, 3) float32 or float64 tensor on {w_plus.device} "
            f"(one row of |p|², |m|², p·m per row of w_plus), got {found}"
        )


def _resolve_backend(backend: str, w_plus: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if w_plus.is_cuda:
            if _triton_importable():
                return "triton"
            _warn_no_triton()
            return "torch"
        return "cpp" if w_plus.device.type == "cpu" and _cpp_kernel_loads() else "torch"
    if backend == "cpp":
        if w_plus.device.type != "cpu":
            raise ValueError(
                f"backend='cpp' runs on CPU tensors (got a tensor on {w_plus.device}); use 'auto' or 'torch'"
            )
        if not _cpp_kernel_loads():
            raise ValueError(f"backend='cpp' is unavailable here: {cpu_backend()}; backend='torch' runs everywhere")
    if backend == "triton" and not (w_plus.is_cuda or os.environ.get(ENV_TRITON_INTERPRET, "0") not in ("", "0")):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {w_plus.device}); "
            "set TRITON_INTERPRET=1 before importing extsub_kernels to run the kernel on CPU"
        )
    return backend


def _cpp_kernel_loads() -> bool:
    from extsub_kernels.kernels import ext_sub_cpu

    return ext_sub_cpu.load() is not None


def cpu_backend() -> str:
    """What `backend="auto"` runs on CPU tensors and why, in one line: "cpp: ..." (the C++ kernel) or "torch: ..."."""
    from extsub_kernels.kernels import ext_sub_cpu

    status = ext_sub_cpu.status()
    return f"cpp: {status.detail}" if status.available else f"torch: eager torch ops; {status.detail}"


def op_backend(device: torch.device | str) -> str:
    """What `backend="auto"` runs on tensors of `device`, and why, in one line: "name: detail" (see `cpu_backend`)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_backend()
    if kind == "cuda":
        return "triton: the fused Triton kernel" if _triton_importable() else "torch: eager torch ops; no Triton"
    return f"torch: eager torch ops (no kernel for {kind})"


def _triton_importable() -> bool:
    try:
        return importlib.import_module("triton") is not None
    except ImportError:
        return False


@functools.cache  # said once
def _warn_no_triton() -> None:
    warnings.warn(
        "Triton is not installed, so Ext-Sub on CUDA runs the torch path instead of the fused kernel; "
        f"install it with `{install_hint('cuda')}` (or `pip install triton`)",
        stacklevel=4,
    )


def ext_sub_(
    w_plus: torch.Tensor,
    w_minus: torch.Tensor,
    lam: float,
    *,
    backend: Backend = "auto",
    row_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ext-Sub in place: w_plus ← w_plus − λ·Ext(w_minus), row by row (paper Algorithm 1).

    Args:
        w_plus: expert weights, overwritten with the result (rows are dim 0).
        w_minus: anti-expert weights of the same shape and device; any float dtype; never modified.
        lam: subtraction weight λ (finite).
        backend: "auto" (CUDA → Triton; CPU → the C++ kernel, else torch, see `cpu_backend()`), "triton", "cpp",
            "torch" (eager, any device) or "reference" (Algorithm 1 literally, in float64).
        row_stats: optional (rows, 3) float32/float64 tensor on w_plus's device, filled in the same pass with each
            row's |p|², |m|² and p·m before the update (docs/design.md §7).

    Returns:
        `w_plus` itself.

    Example:
        >>> p, m = torch.randn(4096, 4096), torch.randn(4096, 4096)
        >>> ext_sub_(p, m, 1.0) is p
        True
    """
    check_pair(w_plus, w_minus, lam)
    lam = float(lam)
    chosen = _resolve_backend(backend, w_plus)
    _check_row_stats(row_stats, w_plus)
    if w_plus.numel() == 0:
        if row_stats is not None:
            row_stats.zero_()
        return w_plus
    if shares_storage(w_plus, w_minus):
        w_minus = w_minus.clone()
    if chosen == "reference":
        if row_stats is not None:
            row_products(w_plus, w_minus, out=row_stats)
        w_plus.copy_(ext_sub_reference(w_plus, w_minus, lam))
        return w_plus

    try:  # a (rows, cols) view sharing w_plus's storage, where its strides allow one
        p = w_plus.view(1, -1) if w_plus.dim() <= 1 else w_plus.view(w_plus.shape[0], -1)
    except RuntimeError:
        p = None
    compiled = chosen in ("triton", "cpp")  # both kernels need contiguous columns
    copy_back = p is None or (compiled and not _contiguous_columns(p))
    if copy_back:
        p = as_rows(w_plus).contiguous()
    m = as_rows(w_minus)
    if compiled and not _contiguous_columns(m):
        m = m.contiguous()
    if compiled:  # kernels/ext_sub.py (Triton) or kernels/ext_sub_cpu.py, imported on first use
        kernel = importlib.import_module(f"extsub_kernels.kernels.{'ext_sub' if chosen == 'triton' else 'ext_sub_cpu'}")
        kernel.ext_sub_rows_(p, m, lam, row_stats=row_stats)
    else:
        _rows_torch(p, m, lam, row_stats, write=True)
    if copy_back:
        w_plus.copy_(p.view(w_plus.shape))
    return w_plus


def ext_sub_task_vectors_into(
    out: torch.Tensor,
    w_plus: torch.Tensor,
    w_minus: torch.Tensor,
    base: torch.Tensor,
    lam: float,
    *,
    row_stats: torch.Tensor | None = None,
) -> bool:
    """out ← θ₀ + Ext-Sub(w_plus − θ₀, w_minus − θ₀) in the C++ kernel's fused pass (2-D views of one shape);
    whether it ran: bit for bit the caller's widen, subtract, `ext_sub_`, add back, round once, which it does on
    False (off CPU, no kernel, columns not contiguous, `out` sharing memory, or rows split by columns)."""
    from extsub_kernels.kernels import ext_sub_cpu

    check_pair(w_plus, w_minus, lam)
    tensors = (out, w_plus, w_minus, base)
    _check_row_stats(row_stats, w_plus)
    if (
        any(t.device.type != "cpu" or t.dim() != 2 or not _contiguous_columns(t) for t in tensors)
        or ext_sub_cpu.long_rows(w_plus.shape[1])
        or any(shares_storage(out, t) for t in tensors[1:])
        or not _cpp_kernel_loads()
    ):
        return False
    ext_sub_cpu.ext_sub_task_rows_into(out, w_plus, w_minus, base, float(lam), row_stats=row_stats)
    return True


def ext_sub(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float, *, backend: Backend = "auto") -> torch.Tensor:
    """Out-of-place Ext-Sub: a new tensor θ⁺ − λ·Ext(θ⁻) in `w_plus`'s dtype; inputs unchanged."""
    check_pair(w_plus, w_minus, lam)
    return ext_sub_(w_plus.clone(memory_format=torch.contiguous_format), w_minus, lam, backend=backend)


def extract_deficiency(w_plus: torch.Tensor, w_minus: torch.Tensor) -> torch.Tensor:
    """Ext(θ⁻) row by row, the part of the anti-expert orthogonal to the bisector of p and m, by the closed form
    ½(m − |m|·p̂) (docs/design.md §1): a new tensor in `w_minus`'s dtype, zero on rows where |p| = 0 or |m| = 0."""
    check_pair(w_plus, w_minus, 0.0)
    if w_minus.numel() == 0:
        return w_minus.clone()
    compute = compute_dtype(w_plus.dtype, w_minus.dtype)
    p = as_rows(w_plus).to(compute)
    m = as_rows(w_minus).to(compute)
    p_norm = torch.linalg.vector_norm(p, dim=1, keepdim=True)
    m_norm = torch.linalg.vector_norm(m, dim=1, keepdim=True)
    has_p = p_norm > 0
    p_hat = p / torch.where(has_p, p_norm, torch.ones_like(p_norm))
    ext = torch.where(has_p, 0.5 * (m - m_norm * p_hat), torch.zeros_like(m))
    return ext.to(w_minus.dtype).reshape(w_minus.shape)


def subtract_(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float) -> torch.Tensor:
    """Direct subtraction in place, w_plus ← w_plus − λ·w_minus, the paper's baseline (eq. 2): computed in float32 at
    least, stored in `w_plus`'s dtype; returns `w_plus` (a negative λ adds)."""
    check_pair(w_plus, w_minus, lam)
    if w_plus.numel() == 0:
        return w_plus
    compute = compute_dtype(w_plus.dtype, w_minus.dtype)
    if w_plus.dtype == compute and w_minus.dtype == compute and not shares_storage(w_plus, w_minus):
        return w_plus.sub_(w_minus, alpha=float(lam))
    w_plus.copy_(w_plus.to(compute) - float(lam) * w_minus.to(compute))
    return w_plus
