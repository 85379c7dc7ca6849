"""The factored math of LoRA merges, exact without forming ΔW (docs/design.md §3): p' = α·p + β·m needs only row norms,
which r×r factors give, so ΔW' = [diag(α)·s⁺B⁺, diag(β)·s⁻B⁻] · [A⁺; A⁻] is a LoRA of rank r⁺ + r⁻."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from extsub_kernels._tensors import all_finite, compute_dtype, is_float
from extsub_kernels.adapters.family import describe_dtypes
from extsub_kernels.adapters.report import AdapterReport
from extsub_kernels.engine.method_spec import EXT_SUB, MethodSpec, method_spec
from extsub_kernels.errors import InputError

Device = torch.device | str | None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module, ΔW = scaling · lora_B @ lora_A; `dtype`: its storage dtype (merged factors stay in float32 or
    float64 until written, so rounding happens once)."""

    lora_A: torch.Tensor  # (r, in_features)
    lora_B: torch.Tensor  # (out_features, r)
    scaling: float
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        a, b = self.lora_A, self.lora_B
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"lora_A and lora_B must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"lora_B {tuple(b.shape)} and lora_A {tuple(a.shape)} do not chain: "
                "lora_B must be (out, r) and lora_A (r, in)"
            )
        if not is_float(a.dtype) or not is_float(b.dtype):
            raise TypeError(f"lora_A and lora_B must be floating point, got {a.dtype} and {b.dtype}")
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be finite, got {self.scaling}")

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype or self.lora_B.dtype

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW = scaling·B·A as an (out, in) tensor, in `dtype` on `device` (default: where the factors are)."""
        return (self.lora_B.to(device, dtype) * self.scaling) @ self.lora_A.to(device, dtype)

    def __repr__(self) -> str:
        return (
            f"LoraModule(out={self.out_features}, in={self.in_features}, rank={self.rank}, "
            f"scaling={self.scaling:g}, dtype={describe_dtypes([self.lora_A, self.lora_B], self.dtype)})"
        )


def module_delta(
    module: LoraModule, *, dtype: torch.dtype | None = None, transposed: bool = False, device: Device = None
) -> torch.Tensor:
    """ΔW = scaling·B·A, (out, in) or (in, out) when `transposed`, formed on `device` in float32 (float64 for float64
    factors), rounded once to `dtype` (None: the storage dtype), left on `device`."""
    compute = compute_dtype(module.lora_A.dtype, module.lora_B.dtype)
    delta = module.delta(compute, device).to(dtype or module.storage_dtype)
    return delta.T.contiguous() if transposed else delta


def lora_row_norms(lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Row norms of scaling·B·A in float64 as scaling·|b_i·Rᵀ|, R the triangular factor of a QR of Aᵀ: the dense norm's
    accuracy, where the Gram quadratic form would square the error of a cancelling row. ΔW is never formed."""
    r_factor = torch.linalg.qr(lora_A.to(torch.float64).T, mode="r").R
    return torch.linalg.vector_norm(lora_B.to(torch.float64) @ r_factor.T, dim=1) * abs(float(scaling))


def lora_row_products(
    b_plus: torch.Tensor, a_plus: torch.Tensor, b_minus: torch.Tensor, a_minus: torch.Tensor
) -> torch.Tensor:
    """p·m per row of B⁺·A⁺ and B⁻·A⁻ (scalings folded into B) from the r⁺×r⁻ cross-Gram A⁺·A⁻ᵀ, in float64."""
    b_plus, a_plus, b_minus, a_minus = (t.to(torch.float64) for t in (b_plus, a_plus, b_minus, a_minus))
    return ((b_plus @ (a_plus @ a_minus.T)) * b_minus).sum(dim=1)


def scaled_factors(module: LoraModule, compute: torch.dtype, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor·scaling·B, A) in `compute`: the module with its scaling folded into B."""
    return module.lora_B.to(torch.float64).mul(factor * module.scaling).to(compute), module.lora_A.to(compute)


def ext_sub_factors(
    b_plus: torch.Tensor,
    a_plus: torch.Tensor,
    b_minus: torch.Tensor,
    a_minus: torch.Tensor,
    lam: float,
    *,
    method: str | MethodSpec = EXT_SUB,
    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One step of a row-pairing method on factors with scaling folded into B: ΔW' = B'·A', rank r⁺ + r⁻, the method's
    per-row α and β from factored row sums.

    Args:
        b_plus, a_plus: the expert (or the result so far), B⁺ (out×r⁺) and A⁺ (r⁺×in).
        b_minus, a_minus: the anti-expert, B⁻ (out×r⁻) and A⁻ (r⁻×in).
        lam: λ.
        method: the method (a row-pairing one).
        sums: (|p|, |m|, p·m or None) per row when already known (they do not depend on λ: `LoraSweep`).

    Returns:
        (B', A', number of rows with |p| = 0), B' = [diag(α)·B⁺, diag(β)·B⁻], A' = [A⁺; A⁻], in `b_plus`'s dtype.
    """
    spec = method_spec(method)
    p_norm, m_norm, products = sums or factor_row_sums(spec, b_plus, a_plus, b_minus, a_minus)
    alpha, beta = spec.row_coefficients(p_norm, m_norm, products, float(lam))
    dtype = b_plus.dtype
    b_out = torch.cat([b_plus * alpha.to(dtype), b_minus.to(dtype) * beta.to(dtype)], dim=1)
    a_out = torch.cat([a_plus, a_minus.to(a_plus.dtype)], dim=0)
    return b_out, a_out, int((p_norm == 0).sum())


def factor_row_sums(
    spec: MethodSpec, b_plus: torch.Tensor, a_plus: torch.Tensor, b_minus: torch.Tensor, a_minus: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(|p|, |m|, p·m or None where the method does not read it) per row, from the factors."""
    products = lora_row_products(b_plus, a_plus, b_minus, a_minus) if spec.needs_products else None
    return lora_row_norms(b_plus, a_plus), lora_row_norms(b_minus, a_minus), products


def truncate_factors(
    lora_B: torch.Tensor, lora_A: torch.Tensor, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`max_rank` approximation of B·A: QRs of B and Aᵀ, an SVD of the R×R core, √σ into each factor.

    Args:
        lora_B: (out, R). lora_A: (R, in). max_rank: the largest rank kept (≥ 1).

    Returns:
        (B'', A'', relative Frobenius error, 0 for a zero product); R ≤ max_rank: unchanged, error 0.
    """
    check_max_rank(max_rank)
    if lora_A.shape[0] <= max_rank:
        return lora_B, lora_A, 0.0
    q_b, r_b = torch.linalg.qr(lora_B)
    q_a, r_a = torch.linalg.qr(lora_A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(max_rank, s.numel())
    total = float(torch.linalg.vector_norm(s, dtype=torch.float64))
    tail = float(torch.linalg.vector_norm(s[keep:], dtype=torch.float64))
    root = s[:keep].sqrt()
    b_out = (q_b @ u[:, :keep]) * root
    a_out = root.unsqueeze(1) * (vh[:keep] @ q_a.T)
    return b_out, a_out, (tail / total if total > 0 else 0.0)


def check_max_rank(max_rank: object) -> None:
    """Raise an InputError unless `max_rank` is a positive integer (a rank to truncate to)."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise InputError(f"max_rank must be a positive integer, got {max_rank!r}", options=("max_rank",))


@dataclass(frozen=True)
class FirstStep:
    """What a module's first row-pairing step needs and λ does not change: both sides' scaled factors and row sums."""

    b_plus: torch.Tensor
    a_plus: torch.Tensor
    b_minus: torch.Tensor
    a_minus: torch.Tensor
    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def merge_module(
    name: str,
    expert: Mapping[str, LoraModule],
    antis: Sequence[Mapping[str, LoraModule]],
    lams: tuple[float, ...],
    spec: MethodSpec,
    report: AdapterReport,
    *,
    first: FirstStep | None = None,
) -> LoraModule | None:
    """The module `name` of the result (None when it vanishes), the report updated; `first`: from `LoraSweep`."""
    start = expert.get(name)
    steps = [(anti[name], lam) for anti, lam in zip(antis, lams, strict=False) if name in anti]
    if start is None and spec.pairs_rows:
        report.dropped.append(name)
        return None
    if not steps:
        report.copied.append(name)
        return start
    tensors = [t for m in ([start] if start else []) + [m for m, _ in steps] for t in (m.lora_A, m.lora_B)]
    compute = compute_dtype(*(t.dtype for t in tensors))
    out_dtype = (start or steps[0][0]).storage_dtype
    if start is None:
        first, lam = steps.pop(0)
        b, a = scaled_factors(first, compute, spec.weight_sign * lam)
        report.added.append(name)
    else:
        b, a = (first.b_plus, first.a_plus) if first is not None else scaled_factors(start, compute)
        report.merged.append(name)
    zero_rows = 0
    for i, (anti_module, lam) in enumerate(steps):
        if spec.pairs_rows:
            if i == 0 and first is not None:
                b, a, zeros = ext_sub_factors(b, a, first.b_minus, first.a_minus, lam, method=spec, sums=first.sums)
            else:
                b_minus, a_minus = scaled_factors(anti_module, compute)
                b, a, zeros = ext_sub_factors(b, a, b_minus, a_minus, lam, method=spec)
            zero_rows = max(zero_rows, zeros)
        else:
            b_minus, a_minus = scaled_factors(anti_module, compute, spec.weight_sign * lam)
            b, a = torch.cat([b, b_minus], dim=1), torch.cat([a, a_minus], dim=0)
    if zero_rows:
        report.zero_rows[name] = zero_rows
    if not all_finite(b) or not all_finite(a):
        raise InputError(
            f"module {name}: the merged factors overflow {str(compute).removeprefix('torch.')} (B scaled by "
            "lora_alpha/r, by α and by λ leaves its range); the adapters' scaling or λ is out of range"
        )
    return LoraModule(a, b, 1.0, out_dtype)
