"""The public ops: validation, dispatch by device and backend, and the eager torch path.

Kernels: Triton on CUDA (kernels/ext_sub.py), C++ on CPU (kernels/ext_sub_cpu.py, built at
first use; `cpu_backend()` says whether it runs). The eager torch path runs everywhere else
and is the CPU fallback when no compiler is present.

Ext-Sub per row (DESIGN.md §1): p' = α·p + β·m, α = 1 + (λ/2)·|m|/|p|, β = −λ/2;
rows with |p| = 0 keep p. Only two row norms are needed.
"""

import math
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "cpp", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cpp", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The torch path works on row blocks of about this many bytes per operand (compute dtype),
# so the second touch of a block (the write after the norms) is served from cache.
_CPU_BLOCK_BYTES = 2 << 20


def check_pair(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float) -> None:
    """Raise a helpful error unless (w_plus, w_minus, lam) is a valid Ext-Sub problem."""
    for name, t in (("w_plus", w_plus), ("w_minus", w_minus)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; Ext-Sub needs floating-point weights "
                "(float16, bfloat16, float32 or float64)"
            )
    if w_plus.shape != w_minus.shape:
        raise ValueError(
            f"shape mismatch: w_plus has shape {tuple(w_plus.shape)} but w_minus has shape "
            f"{tuple(w_minus.shape)}; Ext-Sub pairs rows of tensors of the same shape"
        )
    if w_plus.device != w_minus.device:
        raise ValueError(
            f"device mismatch: w_plus is on {w_plus.device} but w_minus is on {w_minus.device}; "
            "move both to one device first"
        )
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View (or copy, if no view exists) `t` as (rows, cols): rows are dim 0; 0-D and 1-D are one row."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def ext_sub_coefficients(p_norm: torch.Tensor, m_norm: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row α and β of Ext-Sub's closed form p' = α·p + β·m, from the two row norms (DESIGN.md §1).

    α = 1 + (λ/2)·|m|/|p| and β = −λ/2; rows with |p| = 0 get α = 1, β = 0 (they keep p).
    Shared by the dense torch path and the factored LoRA path, which gets its norms from
    Gram factors instead of the rows themselves.

    Args:
        p_norm, m_norm: 1-D tensors of row norms of the expert and the anti-expert.
        lam: λ.

    Returns:
        (α, β) as column vectors (rows, 1) in the dtype of `p_norm`, ready to scale rows.

    Example:
        >>> alpha, beta = ext_sub_coefficients(torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0]), 1.0)
        >>> alpha.flatten().tolist(), beta.flatten().tolist()
        ([2.0, 1.0], [-0.5, 0.0])
    """
    has_p = p_norm > 0
    alpha = torch.where(has_p, 1.0 + (0.5 * lam) * m_norm / torch.where(has_p, p_norm, 1.0), 1.0)
    beta = torch.where(has_p, torch.full_like(p_norm, -0.5 * lam), torch.zeros_like(p_norm))
    return alpha.unsqueeze(1), beta.unsqueeze(1)


def _ext_sub_rows_torch_(p: torch.Tensor, m: torch.Tensor, lam: float) -> None:
    """Closed form in eager torch ops, writing into the 2-D tensor `p` (any device; the CPU fallback).

    On CPU the rows go in blocks of about _CPU_BLOCK_BYTES per operand: the norms read a block
    from DRAM and the update and the write find it in cache, so memory sees about one pass.
    Low-precision blocks are widened once into reused scratch buffers, so the result is
    rounded once.
    """
    compute = _compute_dtype(p.dtype, m.dtype)
    n_rows, n_cols = p.shape
    if p.device.type == "cpu":
        block_rows = max(1, min(n_rows, _CPU_BLOCK_BYTES // max(1, n_cols * compute.itemsize)))
    else:
        block_rows = n_rows
    p_scratch = torch.empty((block_rows, n_cols), dtype=compute, device=p.device) if p.dtype != compute else None
    m_scratch = torch.empty((block_rows, n_cols), dtype=compute, device=p.device) if m.dtype != compute else None
    for start in range(0, n_rows, block_rows):
        p_block = p[start : start + block_rows]
        m_block = m[start : start + block_rows]
        rows = p_block.shape[0]
        p_wide = p_block if p_scratch is None else p_scratch[:rows].copy_(p_block)
        m_wide = m_block if m_scratch is None else m_scratch[:rows].copy_(m_block)
        p_norm = torch.linalg.vector_norm(p_wide, dim=1)
        m_norm = torch.linalg.vector_norm(m_wide, dim=1)
        if bool((p_norm == 0).any()):  # rare: zero expert rows keep p (α = 1, β = 0)
            alpha, beta = ext_sub_coefficients(p_norm, m_norm, lam)
            p_wide.mul_(alpha).addcmul_(m_wide, beta)
        else:  # the common case in a few in-place ops: α = 1 + (λ/2)|m|/|p|, β = −λ/2
            alpha = m_norm.div_(p_norm).mul_(0.5 * lam).add_(1.0).unsqueeze(1)
            p_wide.mul_(alpha).add_(m_wide, alpha=-0.5 * lam)
        if p_wide is not p_block:
            p_block.copy_(p_wide)


def _triton_allowed(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _resolve_backend(backend: str, w_plus: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if w_plus.is_cuda:
            return "triton" if _triton_importable() else "torch"
        return "cpp" if w_plus.device.type == "cpu" and _cpp_kernel_loads() else "torch"
    if backend == "cpp":
        if w_plus.device.type != "cpu":
            raise ValueError(
                f"backend='cpp' runs on CPU tensors (got a tensor on {w_plus.device}); use 'auto' or 'torch'"
            )
        if not _cpp_kernel_loads():
            raise ValueError(f"backend='cpp' is unavailable here: {cpu_backend()}; backend='torch' runs everywhere")
    if backend == "triton" and not _triton_allowed(w_plus):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {w_plus.device}); "
            "set TRITON_INTERPRET=1 before importing extsub_kernels to run the kernel on CPU"
        )
    return backend


def _cpp_kernel_loads() -> bool:
    from extsub_kernels.kernels import ext_sub_cpu

    return ext_sub_cpu.load() is not None


def cpu_backend() -> str:
    """Which implementation `backend="auto"` runs on CPU tensors, and why, in one line.

    "cpp: ..." is the C++ kernel (built on first use, then loaded from a per-user cache);
    "torch: ..." is the eager torch path, with the reason the kernel is not used. The first
    call in a process may build the kernel (about two seconds).

    Example:
        >>> cpu_backend().split(":")[0] in ("cpp", "torch")
        True
    """
    from extsub_kernels.kernels import ext_sub_cpu

    status = ext_sub_cpu.status()
    return f"cpp: {status.detail}" if status.available else f"torch: eager torch ops; {status.detail}"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b share storage (then writing a would change b mid-computation)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def ext_sub_(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float, *, backend: Backend = "auto") -> torch.Tensor:
    """Ext-Sub in place: w_plus ← w_plus − λ·Ext(w_minus), row by row (paper Algorithm 1).

    Args:
        w_plus: expert weights, overwritten with the result (rows are dim 0).
        w_minus: anti-expert weights of the same shape and device; any float dtype; never modified.
        lam: subtraction weight λ (finite).
        backend: "auto" (CUDA → the Triton kernel; CPU → the C++ kernel, or the torch path when
            it cannot be built, see `cpu_backend()`), "triton", "cpp", "torch" (eager torch ops,
            any device) or "reference" (Algorithm 1 literally, in float64).

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
    if w_plus.numel() == 0:
        return w_plus
    if _overlaps(w_plus, w_minus):
        w_minus = w_minus.clone()
    if chosen == "reference":
        from extsub_kernels.reference import ext_sub_reference

        w_plus.copy_(ext_sub_reference(w_plus, w_minus, lam))
        return w_plus

    p = _writable_rows(w_plus)
    compiled = chosen in ("triton", "cpp")  # both kernels need contiguous columns
    copy_back = p is None or (compiled and p.stride(-1) != 1)
    if copy_back:
        p = as_rows(w_plus).contiguous()
    m = as_rows(w_minus)
    if compiled and m.stride(-1) != 1:
        m = m.contiguous()
    if chosen == "triton":
        from extsub_kernels.kernels.ext_sub import ext_sub_rows_

        ext_sub_rows_(p, m, lam)
    elif chosen == "cpp":
        from extsub_kernels.kernels.ext_sub_cpu import ext_sub_rows_ as ext_sub_rows_cpu_

        ext_sub_rows_cpu_(p, m, lam)
    else:
        _ext_sub_rows_torch_(p, m, lam)
    if copy_back:
        w_plus.copy_(p.view(w_plus.shape))
    return w_plus


def _writable_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A (rows, cols) view sharing `t`'s storage, or None when the strides allow no such view."""
    try:
        return t.view(1, -1) if t.dim() <= 1 else t.view(t.shape[0], -1)
    except RuntimeError:
        return None


def ext_sub(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float, *, backend: Backend = "auto") -> torch.Tensor:
    """Out-of-place Ext-Sub: a new tensor θ⁺ − λ·Ext(θ⁻) in `w_plus`'s dtype; inputs unchanged.

    Example:
        >>> out = ext_sub(torch.randn(8, 16), torch.randn(8, 16), 0.5)
    """
    check_pair(w_plus, w_minus, lam)
    return ext_sub_(w_plus.clone(memory_format=torch.contiguous_format), w_minus, lam, backend=backend)


def extract_deficiency(w_plus: torch.Tensor, w_minus: torch.Tensor) -> torch.Tensor:
    """Ext(θ⁻) row by row: the part of the anti-expert orthogonal to the bisector of p and m.

    Computed with the closed form Ext(m) = ½(m − |m|·p̂) (DESIGN.md §1); zero on rows where
    |p| = 0 or |m| = 0. Returns a new tensor in `w_minus`'s dtype.

    Example:
        >>> ext = extract_deficiency(torch.randn(8, 16), torch.randn(8, 16))
    """
    check_pair(w_plus, w_minus, 0.0)
    if w_minus.numel() == 0:
        return w_minus.clone()
    compute = _compute_dtype(w_plus.dtype, w_minus.dtype)
    p = as_rows(w_plus).to(compute)
    m = as_rows(w_minus).to(compute)
    p_norm = torch.linalg.vector_norm(p, dim=1, keepdim=True)
    m_norm = torch.linalg.vector_norm(m, dim=1, keepdim=True)
    has_p = p_norm > 0
    p_hat = p / torch.where(has_p, p_norm, torch.ones_like(p_norm))
    ext = torch.where(has_p, 0.5 * (m - m_norm * p_hat), torch.zeros_like(m))
    return ext.to(w_minus.dtype).reshape(w_minus.shape)


def subtract_(w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float) -> torch.Tensor:
    """Direct subtraction in place, w_plus ← w_plus − λ·w_minus: the paper's baseline (eq. 2).

    Computed in float32 at least and stored in `w_plus`'s dtype; returns `w_plus`.
    A negative λ adds (the `add` method of the merge tools).

    Example:
        >>> p = torch.ones(2, 2); subtract_(p, torch.ones(2, 2), 0.5)[0, 0].item()
        0.5
    """
    check_pair(w_plus, w_minus, lam)
    if w_plus.numel() == 0:
        return w_plus
    compute = _compute_dtype(w_plus.dtype, w_minus.dtype)
    if w_plus.dtype == compute and w_minus.dtype == compute and not _overlaps(w_plus, w_minus):
        return w_plus.sub_(w_minus, alpha=float(lam))
    w_plus.copy_(w_plus.to(compute) - float(lam) * w_minus.to(compute))
    return w_plus
