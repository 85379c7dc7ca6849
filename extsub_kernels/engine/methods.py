"""The method step of a merge, per tensor: ext-sub, sub or add of each anti-expert in order, optionally on task vectors.

Kept apart from streaming so every producer of tensors (the dense engine, the full model of
an adapter merge) applies a method the same way. `apply_method_into` is the form the engine
streams with: it writes into a buffer the caller owns and works in a `Workspace` of a few
cache-sized chunks, so a block of rows allocates nothing; `apply_method` wraps it for whole
tensors.

Precision, the same on every path: a single ext-sub step in the expert's dtype (one
anti-expert, no base, the expert's dtype out) is the op itself, in place (it reduces in float32
and rounds once); anything else works in float32 (float64 for float64 inputs) and rounds once
at the end.
"""

from collections.abc import Sequence

import torch

from extsub_kernels._tensors import as_rows, compute_dtype
from extsub_kernels.engine.gram import ext_sub_in_memory, pieces, widen
from extsub_kernels.engine.options import method_sign
from extsub_kernels.engine.transfer import Workspace
from extsub_kernels.ops import ext_sub_

# Numbers per working chunk on CPU: the few float32 slots a chunk uses stay in L2, so the passes
# over a chunk (widen, subtract θ₀, the op, add θ₀, round) cost one trip to memory.
CPU_CHUNK_ELEMENTS = 1 << 17


def workspace_slots(n_anti: int) -> int:
    """Workspace slots `apply_method_into` needs for `n_anti` anti-experts (the Gram path's are the most)."""
    return n_anti + 3


def in_place_step(
    plus_dtype: torch.dtype, n_anti: int, *, method: str, base: bool, out_dtype: torch.dtype, transposed: bool
) -> bool:
    """Whether the result is the op applied to the expert in place: one ext-sub step, no base, the expert's dtype out.

    Conv1D weights (`transposed`) pair columns, which the op cannot reach in place without a copy,
    so they take the working-space path.
    """
    return method == "ext-sub" and n_anti == 1 and not base and out_dtype == plus_dtype and not transposed


def apply_method_(plus: torch.Tensor, minus: torch.Tensor, lam: float) -> torch.Tensor:
    """The single ext-sub step in place on `plus` (see `in_place_step`); returns `plus`."""
    return ext_sub_(plus, minus, lam)


def apply_method_into(
    out: torch.Tensor,
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    lams: Sequence[float],
    *,
    method: str = "ext-sub",
    base: torch.Tensor | None = None,
    transposed: bool = False,
    workspace: Workspace,
) -> torch.Tensor:
    """The method applied with each anti-expert in order, written into `out` (any float dtype); returns `out`.

    Works chunk by chunk in `workspace` (float32, or float64 for float64 inputs; `workspace_slots`
    slots) and rounds once into `out` (contiguous; it may be `plus` itself: each chunk is read
    before it is written); inputs are otherwise left unchanged. ext-sub pairs rows (dim 0, as
    the op does), or columns with `transposed`; rows longer than a workspace chunk and columns
    go through their Gram matrices (`gram`). sub and add are elementwise.

    Example:
        >>> out = torch.empty(8, 16, dtype=torch.bfloat16)
        >>> _ = apply_method_into(out, torch.randn(8, 16), [torch.randn(8, 16)], [1.0], workspace=Workspace(256, 4))
    """
    sign = method_sign(method)
    if len(minus) != len(lams):
        raise ValueError(f"{len(minus)} anti-expert tensors but {len(lams)} λ values")
    if not out.is_contiguous() or out.shape != plus.shape:
        raise ValueError(f"out must be a contiguous tensor of the inputs' shape {tuple(plus.shape)}")
    dtype = compute_dtype(plus.dtype, *(m.dtype for m in minus), *((base.dtype,) if base is not None else ()))
    if method != "ext-sub":
        _elementwise_into(out, plus, minus, [sign * lam for lam in lams], base, workspace, dtype)
        return out
    if transposed:
        views = [plus, *minus]
        ext_sub_in_memory(out, views, base, lams, reduce_dim=0, workspace=workspace)
        return out
    views = [as_rows(plus), *(as_rows(m) for m in minus)]
    flat_base = as_rows(base) if base is not None else None
    if views[0].shape[1] > workspace.elements:
        ext_sub_in_memory(as_rows(out), views, flat_base, lams, reduce_dim=1, workspace=workspace)
    else:
        _rows_into(as_rows(out), views, flat_base, lams, workspace, dtype)
    return out


def _rows_into(
    out: torch.Tensor,
    views: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    lams: Sequence[float],
    workspace: Workspace,
    dtype: torch.dtype,
) -> None:
    """ext-sub on chunks of whole rows: widen, subtract θ₀, the op once per anti-expert, add θ₀, round into `out`."""
    rows, cols = views[0].shape
    for piece in pieces(rows, cols, workspace.elements, reduce_dim=1):
        wide_base = widen(workspace, 2, base[piece], None, dtype) if base is not None else None
        result = widen(workspace, 0, views[0][piece], wide_base, dtype)
        for m, lam in zip(views[1:], lams, strict=True):
            ext_sub_(result, widen(workspace, 1, m[piece], wide_base, dtype), lam)
        if wide_base is not None:
            result.add_(wide_base)
        out[piece].copy_(result)


def _elementwise_into(
    out: torch.Tensor,
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    workspace: Workspace,
    dtype: torch.dtype,
) -> None:
    """out ← θ₀ + (p − θ₀) + Σ wⱼ·(mⱼ − θ₀) over flat chunks: sub and add (no θ₀ without a base).

    Computed as p + Σ wⱼ·(mⱼ − θ₀), the same sum without adding θ₀ back: one pass and one
    rounding fewer (the differences of bf16 or fp16 inputs are exact in float32).
    """
    flat = [plus.reshape(-1), *(m.reshape(-1) for m in minus)]
    flat_base = base.reshape(-1) if base is not None else None
    flat_out = out.view(-1)
    n, step = flat[0].numel(), workspace.elements
    for start in range(0, n, step):
        chunk = slice(start, min(start + step, n))
        wide_base = widen(workspace, 2, flat_base[chunk], None, dtype) if flat_base is not None else None
        result = widen(workspace, 0, flat[0][chunk], None, dtype)
        for m, weight in zip(flat[1:], weights, strict=True):
            result.add_(widen(workspace, 1, m[chunk], wide_base, dtype), alpha=weight)
        flat_out[chunk].copy_(result)


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
) -> torch.Tensor:
    """One tensor (or a block of its rows) merged: the method applied with each anti-expert in order.

    ext-sub: θ ← θ − λ·Ext(θ⁻); sub: θ ← θ − λθ⁻; add: θ ← θ + λθ⁻. With `base`, the op works
    on task vectors: ΔW = θ − θ₀ for every input, and the result is θ₀ + ΔW'. `transposed`
    pairs columns instead of rows (GPT-2 Conv1D weights, stored (in, out)). Precision as in
    the module's docstring. `inplace` lets the single-step case overwrite `plus`; inputs are
    otherwise left unchanged.

    Example:
        >>> out = apply_method(torch.randn(8, 16), [torch.randn(8, 16)], [1.0])
    """
    method_sign(method)
    if len(minus) != len(lams):
        raise ValueError(f"{len(minus)} anti-expert tensors but {len(lams)} λ values")
    out_dtype = out_dtype or plus.dtype
    single = len(minus) == 1 and base is None and out_dtype == plus.dtype
    if single and method == "ext-sub" and not transposed:
        return apply_method_(plus if inplace else plus.clone(), minus[0], lams[0])
    chunk = CPU_CHUNK_ELEMENTS if plus.device.type == "cpu" else max(1, plus.numel())
    dtype = compute_dtype(plus.dtype, *(m.dtype for m in minus), *((base.dtype,) if base is not None else ()))
    workspace = Workspace(chunk, workspace_slots(len(minus)), itemsize=dtype.itemsize, device=plus.device)
    # a single step in place writes over `plus` piece by piece, each piece read before it is written
    over_plus = single and inplace and plus.is_contiguous()
    out = plus if over_plus else torch.empty(plus.shape, dtype=out_dtype, device=plus.device)
    apply_method_into(out, plus, minus, lams, method=method, base=base, transposed=transposed, workspace=workspace)
    return plus.copy_(out) if single and inplace and not over_plus else out
