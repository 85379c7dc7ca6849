"""The per-tensor operation of a merge: one tensor (or block of rows) and its anti-experts → the result.

Kept apart from the streaming so any producer of tensors can reuse it with the writer.
"""

from collections.abc import Sequence

import torch

from extsub_kernels.ops import ext_sub_, subtract_

METHODS = ("ext-sub", "sub", "add")


def combine(
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    lams: Sequence[float],
    *,
    method: str = "ext-sub",
    base: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    transposed: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """One tensor (or a block of its rows) merged: the method applied with each anti-expert in order.

    ext-sub: θ ← θ − λ·Ext(θ⁻); sub: θ ← θ − λθ⁻; add: θ ← θ + λθ⁻. With `base`, the op works
    on task vectors: ΔW = θ − θ₀ for every input, and the result is θ₀ + ΔW'. `transposed`
    pairs columns instead of rows (GPT-2 Conv1D weights, stored (in, out)).

    A single step in the expert's dtype runs the op in that dtype (it reduces in float32 and
    rounds once); anything longer works in float32 (float64 for float64 inputs) and rounds
    once at the end. `inplace` lets the single-step case overwrite `plus`; inputs are
    otherwise left unchanged.

    Example:
        >>> out = combine(torch.randn(8, 16), [torch.randn(8, 16)], [1.0])
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(minus) != len(lams):
        raise ValueError(f"{len(minus)} anti-expert tensors but {len(lams)} λ values")
    out_dtype = out_dtype or plus.dtype
    if len(minus) == 1 and base is None and out_dtype == plus.dtype:
        work = plus if inplace else plus.clone()
        _step(work, minus[0], lams[0], method, transposed)
        return work
    dtypes = [plus.dtype, *(m.dtype for m in minus)] + ([base.dtype] if base is not None else [])
    compute = torch.float64 if torch.float64 in dtypes else torch.float32
    work = plus.to(compute, copy=True)
    if base is not None:
        work.sub_(base)
    for m, lam in zip(minus, lams):
        _step(work, m.to(compute) - base if base is not None else m, lam, method, transposed)
    if base is not None:
        work.add_(base)
    return work.to(out_dtype)


def _step(work: torch.Tensor, minus: torch.Tensor, lam: float, method: str, transposed: bool) -> None:
    if transposed:
        work, minus = work.t(), minus.t()
    if method == "ext-sub":
        ext_sub_(work, minus, lam)
    else:
        subtract_(work, minus, lam if method == "sub" else -lam)
