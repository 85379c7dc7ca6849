"""A row-pairing method on rows in pieces: a first pass sums in float64 the Gram matrix of v₀ = p, vᵢ = mᵢ (minus θ₀)
per row, a second writes θ₀ + Σᵢ cᵢ·vᵢ (|p|² of the running result is cᵀGc); `reduce_dim`: the axis of an op row."""

from collections.abc import Callable, Iterator, Sequence

import torch

from extsub_kernels._tensors import compute_dtype
from extsub_kernels.engine.method_spec import EXT_SUB, MethodSpec
from extsub_kernels.engine.transfer import Workspace

_Piece2d = tuple[slice, slice]


def pieces(rows: int, cols: int, elements: int, reduce_dim: int) -> Iterator[_Piece2d]:
    """(row slice, column slice) pieces of at most `elements` numbers, each op row's pieces in order."""
    col_step = max(1, min(cols, elements))
    row_step = max(1, elements // col_step)
    for r0 in range(0, rows, row_step):  # a row's (or a column's) pieces come in order
        for c0 in range(0, max(cols, reduce_dim), col_step):
            yield slice(r0, min(r0 + row_step, rows)), slice(c0, min(c0 + col_step, cols))


def _pairs(piece: _Piece2d, reduce_dim: int) -> slice:
    return piece[0] if reduce_dim == 1 else piece[1]


def widen(
    workspace: Workspace, slot: int, source: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """`source` copied into workspace slot `slot` in `dtype`, minus `base` (already widened) when given."""
    wide = workspace.slot(slot, tuple(source.shape), dtype)
    wide.copy_(source)
    if base is not None:
        wide.sub_(base)
    return wide


class RowGram:
    """Per-row float64 sums vᵢ·vⱼ of [p, m₁, …, mₙ] over `n_pairs` op rows: those the coefficients need, p·mₙ
    with `products` (row statistics), every vᵢ·vⱼ with `cross`."""

    def __init__(
        self,
        n_vectors: int,
        n_pairs: int,
        *,
        products: bool = False,
        cross: bool = False,
        device: torch.device | None = None,
    ):
        self.n_vectors, self.n_pairs = n_vectors, n_pairs
        self.sums = torch.zeros(n_vectors, n_vectors, n_pairs, dtype=torch.float64, device=device)
        self._partial = torch.empty(n_pairs, dtype=torch.float64, device=device)
        n = n_vectors - 1
        self._entries = [(i, i) for i in range(n_vectors)] + [(i, j) for j in range(n + cross) for i in range(j)]
        if products and not cross and n > 0:
            self._entries.append((0, n))

    def add(
        self,
        vectors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        reduce_dim: int,
        workspace: Workspace,
        pair_offset: int = 0,
    ) -> None:
        """Add the sums of 2-D views `vectors` (minus `base`), their op rows pairs `pair_offset`… of this Gram."""
        dtype = compute_dtype(*(v.dtype for v in vectors), *((base.dtype,) if base is not None else ()))
        rows, cols = vectors[0].shape
        for piece in pieces(rows, cols, workspace.elements, reduce_dim):
            pairs = _pairs(piece, reduce_dim)
            target = slice(pair_offset + pairs.start, pair_offset + pairs.stop)
            wide_base = widen(workspace, self.n_vectors, base[piece], None, dtype) if base is not None else None
            wide = [widen(workspace, i, v[piece], wide_base, dtype) for i, v in enumerate(vectors)]
            product = workspace.slot(self.n_vectors + 1, tuple(wide[0].shape), dtype)
            partial = self._partial[: target.stop - target.start]
            for i, j in self._entries:
                torch.mul(wide[i], wide[j], out=product)
                torch.sum(product, dim=reduce_dim, dtype=torch.float64, out=partial)
                self.sums[i, j, target].add_(partial)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sums).all())

    def row_sums(self, k: int) -> torch.Tensor:
        """(n_pairs, 3) float64 |p|², |mₖ|², p·mₖ per pair, as `ops.row_products` gives them."""
        return torch.stack([self.sums[0, 0], self.sums[k, k], self.sums[0, k]], dim=1)

    def coefficients(self, lams: Sequence[float], spec: MethodSpec = EXT_SUB) -> torch.Tensor:
        """c (n_vectors, n_pairs), float64, with Σᵢ cᵢ·vᵢ the method's steps with `lams`: step j takes |p|² = cᵀGc,
        |mⱼ| = √Gⱼⱼ, p·mⱼ = Σᵢ cᵢGᵢⱼ, then c ← α·c, cⱼ = β (`row_coefficients`)."""
        if len(lams) != self.n_vectors - 1:
            raise ValueError(f"{self.n_vectors - 1} anti-experts but {len(lams)} λ values")
        gram = self.sums.clone()
        for i, j in self._entries:
            gram[j, i] = gram[i, j]
        c = torch.zeros(self.n_vectors, self.n_pairs, dtype=torch.float64, device=self.sums.device)
        c[0] = 1.0
        for j, lam in enumerate(lams, start=1):
            p_sq = torch.einsum("ip,ijp,jp->p", c[:j], gram[:j, :j], c[:j]).clamp_min(0.0)
            products = torch.einsum("ip,ip->p", c[:j], gram[:j, j]) if spec.needs_products else None
            alpha, beta = spec.row_coefficients(p_sq.sqrt(), gram[j, j].sqrt(), products, lam)
            c[:j] *= alpha.reshape(1, -1)
            c[j] = beta.reshape(-1)
        return c


def combine_into(
    out: torch.Tensor,
    vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    coefficients: torch.Tensor,
    *,
    reduce_dim: int,
    workspace: Workspace,
    pair_offset: int = 0,
) -> None:
    """out ← θ₀ + Σᵢ cᵢ·vᵢ over 2-D views, rounded once; `coefficients` (n_vectors, n_pairs) from `pair_offset`."""
    dtype = coefficients.dtype
    rows, cols = vectors[0].shape
    n = len(vectors)
    for piece in pieces(rows, cols, workspace.elements, reduce_dim):
        pairs = _pairs(piece, reduce_dim)
        coef = coefficients[:, pair_offset + pairs.start : pair_offset + pairs.stop]
        coef = coef.unsqueeze(2) if reduce_dim == 1 else coef.unsqueeze(1)  # (n, r, 1) or (n, 1, c)
        wide_base = widen(workspace, n, base[piece], None, dtype) if base is not None else None
        result = widen(workspace, 0, vectors[0][piece], wide_base, dtype)
        result.mul_(coef[0])
        for i in range(1, n):
            result.addcmul_(widen(workspace, 1, vectors[i][piece], wide_base, dtype), coef[i])
        if wide_base is not None:
            result.add_(wide_base)
        out[piece].copy_(result)


def observed_gram(
    vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    reduce_dim: int,
    workspace: Workspace,
    observe: Callable[[int, torch.Tensor], None] | None,
    cross: bool = False,
) -> RowGram:
    """The first pass over 2-D views in memory: their Gram, its row sums against each anti-expert k to `observe`."""
    n_pairs = vectors[0].shape[1 - reduce_dim]
    gram = RowGram(len(vectors), n_pairs, products=observe is not None, cross=cross, device=vectors[0].device)
    gram.add(vectors, base, reduce_dim=reduce_dim, workspace=workspace)
    for k in range(1, len(vectors) if observe is not None else 1):
        observe(k - 1, gram.row_sums(k))
    return gram


def rows_in_memory(
    out: torch.Tensor,
    vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    lams: Sequence[float],
    *,
    spec: MethodSpec = EXT_SUB,
    reduce_dim: int,
    workspace: Workspace,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Both passes over 2-D views already in memory: the method with each anti-expert in order, into `out`."""
    args = dict(reduce_dim=reduce_dim, workspace=workspace)
    gram = observed_gram(vectors, base, observe=observe, cross=spec.needs_products, **args)
    dtype = compute_dtype(*(v.dtype for v in vectors), *((base.dtype,) if base is not None else ()))
    combine_into(out, vectors, base, gram.coefficients(lams, spec).to(dtype), **args)
