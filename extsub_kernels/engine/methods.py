"""The method step of a merge, per tensor: ext-sub, sub or add of each anti-expert in order, optionally on task vectors.

Kept apart from streaming so every producer of tensors (the dense engine, the full model of
an adapter merge) applies a method the same way.
"""

from collections.abc import Callable, Sequence

import torch

from extsub_kernels._tensors import as_rows, compute_dtype
from extsub_kernels.engine.options import method_sign
from extsub_kernels.ops import ext_sub_, row_products, subtract_

# observe(step, sums): the (rows, 3) float64 |p|², |m|², p·m of the expert against anti-expert `step`.
Observer = Callable[[int, torch.Tensor], None]


def apply_method(
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    lams: Sequence[float],
    *,
    method: str = "ext-sub",
    base: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    transposed: bool = False,
    inplace: bool = False,
    observe: Observer | None = None,
) -> torch.Tensor:
    """One tensor (or a block of its rows) merged: the method applied with each anti-expert in order.

    ext-sub: θ ← θ − λ·Ext(θ⁻); sub: θ ← θ − λθ⁻; add: θ ← θ + λθ⁻. With `base`, the op works
    on task vectors: ΔW = θ − θ₀ for every input, and the result is θ₀ + ΔW'. `transposed`
    pairs columns instead of rows (GPT-2 Conv1D weights, stored (in, out)).

    A single step in the expert's dtype runs the op in that dtype (it reduces in float32 and
    rounds once); anything longer works in float32 (float64 for float64 inputs) and rounds
    once at the end. `inplace` lets the single-step case overwrite `plus`; inputs are
    otherwise left unchanged.

    `observe`, when given, receives the row sums of the expert (task vector) against each
    anti-expert, as rows are paired (DESIGN.md §7): from the op's own pass for one ext-sub
    step, from a separate reduction otherwise.

    Example:
        >>> out = apply_method(torch.randn(8, 16), [torch.randn(8, 16)], [1.0])
    """
    sign = method_sign(method)
    if len(minus) != len(lams):
        raise ValueError(f"{len(minus)} anti-expert tensors but {len(lams)} λ values")
    out_dtype = out_dtype or plus.dtype
    if len(minus) == 1 and base is None and out_dtype == plus.dtype:
        work = plus if inplace else plus.clone()
        _step(work, minus[0], lams[0], method, sign, transposed, observe)
        return work
    dtypes = [plus.dtype, *(m.dtype for m in minus)] + ([base.dtype] if base is not None else [])
    work = plus.to(compute_dtype(*dtypes), copy=True)
    if base is not None:
        work.sub_(base)

    def task_vector(m: torch.Tensor) -> torch.Tensor:
        return m.to(work.dtype) - base if base is not None else m

    if observe is not None and len(minus) > 1:  # every anti-expert against the expert, before any step
        for k, m in enumerate(minus):
            observe(k, row_products(*_paired(work, task_vector(m), transposed)))
    for m, lam in zip(minus, lams, strict=True):
        _step(work, task_vector(m), lam, method, sign, transposed, observe if len(minus) == 1 else None)
    if base is not None:
        work.add_(base)
    return work.to(out_dtype)


def _paired(work: torch.Tensor, minus: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors whose rows are paired: columns for weights stored transposed."""
    return (work.t(), minus.t()) if transposed else (work, minus)


def _step(
    work: torch.Tensor,
    minus: torch.Tensor,
    lam: float,
    method: str,
    sign: float,
    transposed: bool,
    observe: Observer | None = None,
) -> None:
    work, minus = _paired(work, minus, transposed)
    sums = None
    if observe is not None:
        sums = torch.empty(as_rows(work).shape[0], 3, dtype=torch.float64, device=work.device)
        if method != "ext-sub":
            row_products(work, minus, out=sums)
    if method == "ext-sub":
        ext_sub_(work, minus, lam, row_stats=sums)
    else:
        subtract_(work, minus, -sign * lam)
    if observe is not None:
        observe(0, sums)
