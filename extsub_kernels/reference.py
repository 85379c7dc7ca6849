"""Algorithm 1 of the Ext-Sub paper (§3), written literally: the oracle for tests, never the fast path."""

import torch

from extsub_kernels._tensors import as_rows, check_pair


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / |x| per row; a zero row stays zero (docs/design.md §1 convention, as F.normalize)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def ext_sub_reference(
    w_plus: torch.Tensor, w_minus: torch.Tensor, lam: float, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """θ⁺ − λ·Ext(θ⁻) by normalize → bisector → projection → subtract, computed in `dtype`.

    Args:
        w_plus, w_minus: expert and anti-expert weights of one shape (rows are dim 0); lam: λ.
        dtype: the precision of every step and of the result (float64 for an oracle).

    Returns:
        A new tensor of `w_plus`'s shape in `dtype`; inputs are not modified.
    """
    check_pair(w_plus, w_minus, lam)
    if w_plus.numel() == 0:
        return w_plus.to(dtype=dtype, copy=True)
    p = as_rows(w_plus).to(dtype)
    m = as_rows(w_minus).to(dtype)
    general_direction = _normalize_rows(p) + _normalize_rows(m)  # line 6: v° = p̂ + m̂
    u_hat = _normalize_rows(general_direction)
    general = (m * u_hat).sum(dim=1, keepdim=True) * u_hat  # line 7: projection of m on v°
    deficiency = m - general  # line 8: Ext(m)
    out = p - lam * deficiency  # line 9
    return out.reshape(w_plus.shape)
