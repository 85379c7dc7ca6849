"""The method step of a merge, per tensor: ext-sub, sub or add of each anti-expert in order, optionally on task vectors.

Kept apart from streaming so every producer of tensors (the dense engine, the full model of
an adapter merge) applies a method the same way. `apply_method_into` is the form the engine
streams with: it writes into a buffer the caller owns and works in a `Workspace` of a few
cache-sized chunks, so a block of rows allocates nothing; `apply_method` wraps it for whole
tensors.

Precision, the same on every path: a single ext-sub step in the expert's dtype (one
anti-expert, no base, the expert's dtype out) is the op itself, in place (it reduces in float32
and rounds once); anything else works in float32 (float64 for float64 inputs) and rounds once
at the end. A single ext-sub step with a base on CPU rows runs in the C++ kernel's fused pass
(p, m, θ₀ read once each, no workspace), with the same result bit for bit.
"""

from collections.abc import Callable, Sequence

import torch

from extsub_kernels._tensors import as_rows, compute_dtype
from extsub_kernels.engine.gram import RowGram, ext_sub_in_memory, pieces, widen
from extsub_kernels.engine.options import method_sign
from extsub_kernels.engine.transfer import Workspace
from extsub_kernels.ops import ext_sub_, ext_sub_task_vectors_into, row_products

# Numbers per working chunk on CPU: the few float32 slots a chunk uses stay in L2, so the passes
# over a chunk (widen, subtract θ₀, the op, add θ₀, round) cost one trip to memory.
CPU_CHUNK_ELEMENTS = 1 << 17

# observe(step, sums): the (rows, 3) float64 |p|², |m|², p·m of the expert against anti-expert `step`.
Observer = Callable[[int, torch.Tensor], None]


def workspace_slots(n_anti: int) -> int:
    """Workspace slots `apply_method_into` needs for `n_anti` anti-experts (the Gram path's are the most)."""
    return n_anti + 3


def method_workspace(n_anti: int, itemsize: int, device: torch.device, largest: int) -> Workspace:
    """The working space `apply_method_into` needs, sized once: slots of `CPU_CHUNK_ELEMENTS` numbers on CPU
    (cache-sized), of the `largest` piece it will see elsewhere (one kernel per piece)."""
    chunk = CPU_CHUNK_ELEMENTS if device.type == "cpu" else max(1, largest)
    return Workspace(chunk, workspace_slots(n_anti), itemsize=itemsize, device=device)


def in_place_step(
    plus_dtype: torch.dtype, n_anti: int, *, method: str, base: bool, out_dtype: torch.dtype, transposed: bool
) -> bool:
    """Whether the result is the op applied to the expert in place: one ext-sub step, no base, the expert's dtype out.

    Conv1D weights (`transposed`) pair columns, which the op cannot reach in place without a copy,
    so they take the working-space path.
    """
    return method == "ext-sub" and n_anti == 1 and not base and out_dtype == plus_dtype and not transposed


def apply_method_(
    plus: torch.Tensor, minus: torch.Tensor, lam: float, *, observe: Observer | None = None
) -> torch.Tensor:
    """The single ext-sub step in place on `plus` (see `in_place_step`); returns `plus`.

    `observe` gets the row sums from the op's own pass (one (rows, 3) float64 tensor allocated).
    """
    if observe is None:
        return ext_sub_(plus, minus, lam)
    sums = _row_sums(as_rows(plus).shape[0], plus.device)
    ext_sub_(plus, minus, lam, row_stats=sums)
    observe(0, sums)
    return plus


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
    observe: Observer | None = None,
) -> torch.Tensor:
    """The method applied with each anti-expert in order, written into `out` (any float dtype); returns `out`.

    Works chunk by chunk in `workspace` (float32, or float64 for float64 inputs; `workspace_slots`
    slots) and rounds once into `out` (contiguous; it may be `plus` itself: each chunk is read
    before it is written); inputs are otherwise left unchanged. ext-sub pairs rows (dim 0, as
    the op does), or columns with `transposed`; rows longer than a workspace chunk and columns
    go through their Gram matrices (`gram`). sub and add are elementwise.

    `observe`, when given, gets the row sums of the expert (task vector) against each anti-expert
    before any step (docs/design.md §7), from the same pass where there is one: the op's for one
    ext-sub step, the Gram matrices' for rows in pieces; `row_products` per chunk of rows
    otherwise. It costs one (rows, 3) float64 tensor per anti-expert and call, nothing per chunk.

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
    if transposed:
        views, flat_base, reduce_dim = [plus, *minus], base, 0
    else:
        views = [as_rows(plus), *(as_rows(m) for m in minus)]
        flat_base = as_rows(base) if base is not None else None
        reduce_dim = 1
    in_pieces = transposed or views[0].shape[1] > workspace.elements
    if method != "ext-sub":
        if observe is not None:
            _observe_products(views, flat_base, reduce_dim, in_pieces, workspace, dtype, observe)
        _elementwise_into(out, plus, minus, [sign * lam for lam in lams], base, workspace, dtype)
        return out
    target = out if transposed else as_rows(out)
    if in_pieces:
        ext_sub_in_memory(target, views, flat_base, lams, reduce_dim=reduce_dim, workspace=workspace, observe=observe)
    elif not _fused_into(target, views, flat_base, lams, observe):
        _rows_into(target, views, flat_base, lams, workspace, dtype, observe)
    return out


def _row_sums(rows: int, device: torch.device) -> torch.Tensor:
    """A (rows, 3) float64 tensor for |p|², |m|², p·m per row."""
    return torch.empty(rows, 3, dtype=torch.float64, device=device)


def _fused_into(
    out: torch.Tensor,
    views: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    lams: Sequence[float],
    observe: Observer | None,
) -> bool:
    """One ext-sub step on task vectors of whole rows in the C++ kernel's fused pass, where it runs; whether it ran.

    Reads p, m and θ₀ in their dtypes and writes `out` once, instead of `_rows_into`'s passes
    through the workspace; the results and row sums are the same bit for bit (`ops.ext_sub_task_vectors_into`).
    """
    if base is None or len(views) != 2:
        return False
    sums = _row_sums(out.shape[0], out.device) if observe is not None else None
    if not ext_sub_task_vectors_into(out, views[0], views[1], base, lams[0], row_stats=sums):
        return False
    if observe is not None:
        observe(0, sums)
    return True


def _rows_into(
    out: torch.Tensor,
    views: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    lams: Sequence[float],
    workspace: Workspace,
    dtype: torch.dtype,
    observe: Observer | None = None,
) -> None:
    """ext-sub on chunks of whole rows: widen, subtract θ₀, the op once per anti-expert, add θ₀, round into `out`.

    Row sums for `observe`: the op's own (one anti-expert), or `row_products` of the expert kept in
    a slot against each widened anti-expert (several: all are taken against the expert).
    """
    rows, cols = views[0].shape
    n_anti = len(views) - 1
    sums = [_row_sums(rows, out.device) for _ in range(n_anti)] if observe is not None else None
    for piece in pieces(rows, cols, workspace.elements, reduce_dim=1):
        wide_base = widen(workspace, 2, base[piece], None, dtype) if base is not None else None
        result = widen(workspace, 0, views[0][piece], wide_base, dtype)
        expert = workspace.slot(3, tuple(result.shape), dtype).copy_(result) if sums and n_anti > 1 else None
        for k, (m, lam) in enumerate(zip(views[1:], lams, strict=True)):
            wide_m = widen(workspace, 1, m[piece], wide_base, dtype)
            if expert is not None:
                row_products(expert, wide_m, out=sums[k][piece[0]])
            ext_sub_(result, wide_m, lam, row_stats=sums[0][piece[0]] if sums and n_anti == 1 else None)
        if wide_base is not None:
            result.add_(wide_base)
        out[piece].copy_(result)
    for k, step_sums in enumerate(sums or ()):
        observe(k, step_sums)


def _observe_products(
    views: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    reduce_dim: int,
    in_pieces: bool,
    workspace: Workspace,
    dtype: torch.dtype,
    observe: Observer,
) -> None:
    """Row sums of the expert against each anti-expert for sub and add, whose elementwise pass pairs no rows.

    Chunks of whole rows: `row_products` of the widened task vectors; rows in pieces and columns:
    their Gram matrices.
    """
    if in_pieces:
        gram = RowGram(len(views), views[0].shape[1 - reduce_dim], products=True, device=views[0].device)
        gram.add(views, base, reduce_dim=reduce_dim, workspace=workspace)
        for k in range(1, len(views)):
            observe(k - 1, gram.row_sums(k))
        return
    rows, cols = views[0].shape
    sums = [_row_sums(rows, views[0].device) for _ in views[1:]]
    for piece in pieces(rows, cols, workspace.elements, reduce_dim=1):
        wide_base = widen(workspace, 2, base[piece], None, dtype) if base is not None else None
        expert = widen(workspace, 0, views[0][piece], wide_base, dtype)
        for k, m in enumerate(views[1:]):
            row_products(expert, widen(workspace, 1, m[piece], wide_base, dtype), out=sums[k][piece[0]])
    for k, step_sums in enumerate(sums):
        observe(k, step_sums)


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
    observe: Observer | None = None,
) -> torch.Tensor:
    """One tensor (or a block of its rows) merged: the method applied with each anti-expert in order.

    ext-sub: θ ← θ − λ·Ext(θ⁻); sub: θ ← θ − λθ⁻; add: θ ← θ + λθ⁻. With `base`, the op works
    on task vectors: ΔW = θ − θ₀ for every input, and the result is θ₀ + ΔW'. `transposed`
    pairs columns instead of rows (GPT-2 Conv1D weights, stored (in, out)). Precision as in
    the module's docstring. `inplace` lets the single-step case overwrite `plus`; inputs are
    otherwise left unchanged.

    `observe`, when given, receives the row sums of the expert (task vector) against each
    anti-expert, as rows are paired (docs/design.md §7; see `apply_method_into`).

    Example:
        >>> out = apply_method(torch.randn(8, 16), [torch.randn(8, 16)], [1.0])
    """
    method_sign(method)
    if len(minus) != len(lams):
        raise ValueError(f"{len(minus)} anti-expert tensors but {len(lams)} λ values")
    out_dtype = out_dtype or plus.dtype
    single = len(minus) == 1 and base is None and out_dtype == plus.dtype
    if single and method == "ext-sub" and not transposed:
        return apply_method_(plus if inplace else plus.clone(), minus[0], lams[0], observe=observe)
    dtype = compute_dtype(plus.dtype, *(m.dtype for m in minus), *((base.dtype,) if base is not None else ()))
    workspace = method_workspace(len(minus), dtype.itemsize, plus.device, plus.numel())
    # a single step in place writes over `plus` piece by piece, each piece read before it is written
    over_plus = single and inplace and plus.is_contiguous()
    out = plus if over_plus else torch.empty(plus.shape, dtype=out_dtype, device=plus.device)
    apply_method_into(
        out, plus, minus, lams, method=method, base=base, transposed=transposed, workspace=workspace, observe=observe
    )
    return plus.copy_(out) if single and inplace and not over_plus else out
