"""The method step per tensor, for every producer and device: elementwise methods add each anti-expert weighted; a
row-pairing kernel runs in place, fused on task vectors, or on widened `Workspace` chunks rounded once; long rows,
Conv1D columns and methods without a kernel take the rows' Gram matrices (`gram`)."""

from collections.abc import Callable, Sequence

import torch

from extsub_kernels._tensors import as_rows, compute_dtype
from extsub_kernels.engine.gram import observed_gram, pieces, rows_in_memory, widen
from extsub_kernels.engine.method_spec import DEFAULT_METHOD, MethodSpec, method_spec
from extsub_kernels.engine.transfer import Workspace
from extsub_kernels.ops import row_products

# Numbers per working chunk on CPU: its float32 slots stay in L2, so a chunk's passes cost one trip to memory.
CPU_CHUNK_ELEMENTS = 1 << 17

# observe(step, sums): the (rows, 3) float64 |p|², |m|², p·m of the expert against anti-expert `step`.
Observer = Callable[[int, torch.Tensor], None]


def workspace_slots(n_anti: int) -> int:
    """Workspace slots `apply_method_into` needs for `n_anti` anti-experts (the Gram path's are the most)."""
    return n_anti + 3


def method_workspace(n_anti: int, itemsize: int, device: torch.device, largest: int) -> Workspace:
    """The `Workspace` `apply_method_into` needs: `CPU_CHUNK_ELEMENTS` per slot on CPU, else the `largest` piece."""
    chunk = CPU_CHUNK_ELEMENTS if device.type == "cpu" else max(1, largest)
    return Workspace(chunk, workspace_slots(n_anti), itemsize=itemsize, device=device)


def in_place_step(
    plus_dtype: torch.dtype, n_anti: int, *, method: str, base: bool, out_dtype: torch.dtype, transposed: bool
) -> bool:
    """Whether the method's kernel runs on the expert in place: one step, no base, its dtype out, not transposed."""
    has_op = method_spec(method).op is not None
    return has_op and n_anti == 1 and not base and out_dtype == plus_dtype and not transposed


def apply_method_into(
    out: torch.Tensor,
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    lams: Sequence[float],
    *,
    method: str | MethodSpec = DEFAULT_METHOD,
    base: torch.Tensor | None = None,
    transposed: bool = False,
    workspace: Workspace,
    observe: Observer | None = None,
) -> torch.Tensor:
    """The method applied with each anti-expert in order into contiguous `out` (may be `plus`); returns `out`. Rows
    are dim 0 (columns with `transposed`); with `base`, on task vectors θ − θ₀, writing θ₀ + ΔW'. `observe` gets the
    row sums against each anti-expert (docs/design.md §7), from the same pass where there is one."""
    spec = method_spec(method)
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
    in_place = in_place_step(
        plus.dtype, len(minus), method=spec.name, base=base is not None, out_dtype=out.dtype, transposed=transposed
    )
    in_pieces = transposed or views[0].shape[1] > workspace.elements
    if not spec.pairs_rows:
        if observe is not None and in_pieces:
            observed_gram(views, flat_base, reduce_dim=reduce_dim, workspace=workspace, observe=observe)
        elif observe is not None:
            _rows_into(None, None, views, flat_base, lams, workspace, dtype, observe)
        _elementwise_into(out, plus, minus, [spec.weight_sign * lam for lam in lams], base, workspace, dtype)
    elif not in_place and (in_pieces or spec.op is None):
        target = out if transposed else as_rows(out)
        args = (target, views, flat_base, lams)
        rows_in_memory(*args, spec=spec, reduce_dim=reduce_dim, workspace=workspace, observe=observe)
    else:  # the kernel: in place, or its fused pass on task vectors (p, m, θ₀ read once each) where it runs
        sums = _row_sums(views[0].shape[0], plus.device) if observe is not None else None
        fused = base is not None and len(minus) == 1 and spec.fused is not None
        if in_place:
            spec.op(out if out is plus else out.copy_(plus), minus[0], lams[0], row_stats=sums)
        elif not (fused and spec.fused(as_rows(out), views[0], views[1], flat_base, lams[0], row_stats=sums)):
            _rows_into(spec, as_rows(out), views, flat_base, lams, workspace, dtype, observe)
            return out
        _observed(observe, [sums] if sums is not None else [])
    return out


def _row_sums(rows: int, device: torch.device) -> torch.Tensor:
    """A (rows, 3) float64 tensor for |p|², |m|², p·m per row."""
    return torch.empty(rows, 3, dtype=torch.float64, device=device)


def _observed(observe: Observer | None, sums: Sequence[torch.Tensor]) -> None:
    for k, step_sums in enumerate(sums):
        observe(k, step_sums)


def _rows_into(
    spec: MethodSpec | None,
    out: torch.Tensor | None,
    views: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    lams: Sequence[float],
    workspace: Workspace,
    dtype: torch.dtype,
    observe: Observer | None = None,
) -> None:
    """Chunks of whole rows: widen, subtract θ₀, the kernel once per anti-expert, add θ₀, round into `out`."""
    rows, cols = views[0].shape
    n_anti = len(views) - 1
    sums = [_row_sums(rows, views[0].device) for _ in range(n_anti)] if observe is not None else None
    own = sums is not None and spec is not None and n_anti == 1
    for piece in pieces(rows, cols, workspace.elements, reduce_dim=1):
        wide_base = widen(workspace, 2, base[piece], None, dtype) if base is not None else None
        result = widen(workspace, 0, views[0][piece], wide_base, dtype)
        expert = None
        if sums is not None and not own:
            expert = result if spec is None else workspace.slot(3, tuple(result.shape), dtype).copy_(result)
        for k, (m, lam) in enumerate(zip(views[1:], lams, strict=True)):
            wide_m = widen(workspace, 1, m[piece], wide_base, dtype)
            if expert is not None:
                row_products(expert, wide_m, out=sums[k][piece[0]])
            if spec is not None:
                spec.op(result, wide_m, lam, row_stats=sums[0][piece[0]] if own else None)
        if spec is not None:
            if wide_base is not None:
                result.add_(wide_base)
            out[piece].copy_(result)
    _observed(observe, sums or [])


def _elementwise_into(
    out: torch.Tensor,
    plus: torch.Tensor,
    minus: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    workspace: Workspace,
    dtype: torch.dtype,
) -> None:
    """out ← p + Σ wⱼ·(mⱼ − θ₀) over flat chunks (θ₀ never added back: one rounding fewer)."""
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
    method: str | MethodSpec = DEFAULT_METHOD,
    base: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    transposed: bool = False,
    inplace: bool = False,
    observe: Observer | None = None,
) -> torch.Tensor:
    """`apply_method_into` into a new tensor of `out_dtype`; `inplace` lets a single step overwrite `plus`."""
    out_dtype = out_dtype or plus.dtype
    dtype = compute_dtype(plus.dtype, *(m.dtype for m in minus), *((base.dtype,) if base is not None else ()))
    workspace = method_workspace(len(minus), dtype.itemsize, plus.device, plus.numel())
    single = len(minus) == 1 and base is None and out_dtype == plus.dtype
    # a single step in place writes over `plus` piece by piece, each piece read before it is written
    over_plus = single and inplace and plus.is_contiguous()
    out = plus if over_plus else torch.empty(plus.shape, dtype=out_dtype, device=plus.device)
    apply_method_into(
        out, plus, minus, lams, method=method, base=base, transposed=transposed, workspace=workspace, observe=observe
    )
    return plus.copy_(out) if single and inplace and not over_plus else out
