"""The factored Ext-Sub path for LoRA adapters: exact results without forming ΔW (docs/design.md §3).

For a LoRA module ΔW = s·B·A (B: out×r, A: r×in), Ext-Sub's per-row closed form
p' = α·p + β·m needs only the row norms of ΔW⁺ and ΔW⁻, and a row norm of s·B·A is
s·sqrt(b·(A·Aᵀ)·bᵀ): an r×r Gram matrix gives them all. So

    ΔW' = diag(α)·ΔW⁺ + diag(β)·ΔW⁻ = [diag(α)·s⁺B⁺, diag(β)·s⁻B⁻] · [A⁺; A⁻]

is exactly a LoRA of rank r⁺ + r⁻, at O((out + in)·r²) cost per module.
"""

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from extsub_kernels._tensors import all_finite, compute_dtype, is_float
from extsub_kernels.adapters.family import (
    BaseEdit,
    PeftAdapter,
    check_base_models,
    check_same_type,
    copy_extra,
    describe_dtypes,
    lam_list,
    weight_key,
)
from extsub_kernels.adapters.report import AdapterReport, counted
from extsub_kernels.engine.options import method_sign
from extsub_kernels.errors import InputError
from extsub_kernels.ops import ext_sub_coefficients

Device = torch.device | str | None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module, ΔW = scaling · lora_B @ lora_A; rows of ΔW are output features.

    `dtype` is the dtype the module is stored in; merged modules keep their factors in
    float32 or float64 until they are materialized, so rounding happens once, at the end.
    """

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
        """ΔW = scaling·B·A as an (out, in) tensor, in `dtype` on `device` (default: where the factors are).

        Example:
            >>> LoraModule(torch.ones(1, 3), torch.ones(2, 1), 0.5).delta().shape
            torch.Size([2, 3])
        """
        return (self.lora_B.to(device, dtype) * self.scaling) @ self.lora_A.to(device, dtype)

    def __repr__(self) -> str:
        return (
            f"LoraModule(out={self.out_features}, in={self.in_features}, rank={self.rank}, "
            f"scaling={self.scaling:g}, dtype={describe_dtypes([self.lora_A, self.lora_B], self.dtype)})"
        )


def module_delta(
    module: LoraModule, *, dtype: torch.dtype | None = None, transposed: bool = False, device: Device = None
) -> torch.Tensor:
    """ΔW = scaling·B·A laid out like the base weight: (out, in), or (in, out) when `transposed` (Conv1D).

    Computed on `device` (default: where the factors are) in float32, or float64 for float64
    factors, and rounded once to `dtype` (default: the module's storage dtype). The result
    stays on `device`: the formats move it to the host, the full model adds it to θ₀ there.

    Example:
        >>> module_delta(LoraModule(torch.ones(1, 3), torch.ones(2, 1), 0.5), transposed=True).shape
        torch.Size([3, 2])
    """
    compute = compute_dtype(module.lora_A.dtype, module.lora_B.dtype)
    delta = module.delta(compute, device).to(dtype or module.storage_dtype)
    return delta.T.contiguous() if transposed else delta


@dataclass(repr=False)
class LoraAdapter(PeftAdapter):
    """A LoRA adapter as data: modules keyed by their name in the base model, plus metadata.

    `extra` holds non-LoRA tensors (e.g. `modules_to_save`) under their stored keys;
    `config` is the adapter_config the adapter came with (empty when there was none).
    """

    peft_type = "LORA"
    label = "LoRA"
    unit = "module"
    formats = ("lora", "dense-lora", "delta")

    modules: dict[str, LoraModule]
    source: str = "<memory>"
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @classmethod
    def merge(
        cls,
        expert: PeftAdapter,
        antis: Sequence[PeftAdapter],
        lam: float | Sequence[float],
        method: str,
        *,
        max_rank: int | None = None,
        any_base_model: bool = False,
    ) -> "MergedAdapter":
        """`merge_adapters` below: the factored merge."""
        return merge_adapters(expert, antis, lam, method, max_rank=max_rank, any_base_model=any_base_model)

    @classmethod
    def owns_key(cls, key: str) -> bool:
        return ".lora_A" in key or ".lora_B" in key

    def describe(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}" if ranks else "no ranks"
        tensors = [t for m in self.modules.values() for t in (m.lora_A, m.lora_B)]
        stored = {m.dtype for m in self.modules.values()} - {None}
        dtype = describe_dtypes(tensors, stored.pop() if len(stored) == 1 else None)
        return f"{counted(len(self.modules), 'module')}, {span}, {dtype}"

    def base_edits(self) -> list[BaseEdit]:
        """Each module changes its weight: ΔW' (out, in) is added to it."""
        return [BaseEdit(name, weight_key(name), (m.out_features, m.in_features)) for name, m in self.modules.items()]

    def fold(self, edit: BaseEdit, theta0: torch.Tensor, *, transposed: bool, device: torch.device) -> torch.Tensor:
        """θ₀ + ΔW', out of place (θ₀ is shared by every output)."""
        module = self.modules[edit.module]
        compute = compute_dtype(theta0.dtype, module.lora_A.dtype, module.lora_B.dtype)
        return theta0.to(device, compute) + module_delta(module, dtype=compute, transposed=transposed, device=device)


@dataclass(kw_only=True, repr=False)
class MergedAdapter(LoraAdapter):
    """The result of `merge_adapters`: an adapter plus the report of how it was made."""

    report: AdapterReport


def lora_row_norms(lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Row norms of scaling·B·A from the r×r Gram matrix A·Aᵀ, in float64; ΔW is never formed.

    |row_i|² = scaling²·b_i·(A·Aᵀ)·b_iᵀ = scaling²·|b_i·Rᵀ|² with A·Aᵀ = Rᵀ·R, R the triangular
    factor of a QR of Aᵀ (in×r). Using R instead of the Gram matrix itself keeps the
    accuracy of the dense norm, eps·|b_i|·|A| / |row_i| relative, where the quadratic form
    would square that ratio when the row cancels (as results of earlier steps can).

    Example:
        >>> lora_row_norms(torch.tensor([[3.0], [0.0]]), torch.tensor([[0.0, 1.0]]))
        tensor([3., 0.], dtype=torch.float64)
    """
    r_factor = torch.linalg.qr(lora_A.to(torch.float64).T, mode="r").R
    return torch.linalg.vector_norm(lora_B.to(torch.float64) @ r_factor.T, dim=1) * abs(float(scaling))


def _scaled_factors(module: LoraModule, compute: torch.dtype, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor·scaling·B, A) in `compute`: the module with its scaling folded into B."""
    return module.lora_B.to(torch.float64).mul(factor * module.scaling).to(compute), module.lora_A.to(compute)


def ext_sub_factors(
    b_plus: torch.Tensor,
    a_plus: torch.Tensor,
    b_minus: torch.Tensor,
    a_minus: torch.Tensor,
    lam: float,
    *,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One Ext-Sub step on factors with scaling folded into B: ΔW' = B'·A', rank r⁺ + r⁻.

    Per row α = 1 + (λ/2)|m|/|p| and β = −λ/2 (α = 1, β = 0 where |p| = 0, as the dense op),
    with |p| and |m| from Gram matrices (`lora_row_norms`).

    Args:
        b_plus, a_plus: the expert (or the result so far), B⁺ (out×r⁺) and A⁺ (r⁺×in).
        b_minus, a_minus: the anti-expert, B⁻ (out×r⁻) and A⁻ (r⁻×in).
        lam: λ.
        norms: (|p|, |m|) per row when already known (they do not depend on λ: `LoraSweep`).

    Returns:
        (B', A', number of rows with |p| = 0), B' = [diag(α)·B⁺, diag(β)·B⁻], A' = [A⁺; A⁻],
        in the dtype of `b_plus`.

    Example:
        >>> b, a = ext_sub_factors(torch.ones(2, 1), torch.ones(1, 3), torch.ones(2, 2), torch.ones(2, 3), 1.0)[:2]
        >>> tuple(b.shape), tuple(a.shape)
        ((2, 3), (3, 3))
    """
    p_norm, m_norm = norms or (lora_row_norms(b_plus, a_plus), lora_row_norms(b_minus, a_minus))
    alpha, beta = ext_sub_coefficients(p_norm, m_norm, float(lam))
    dtype = b_plus.dtype
    b_out = torch.cat([b_plus * alpha.to(dtype), b_minus.to(dtype) * beta.to(dtype)], dim=1)
    a_out = torch.cat([a_plus, a_minus.to(a_plus.dtype)], dim=0)
    return b_out, a_out, int((p_norm == 0).sum())


def truncate_factors(
    lora_B: torch.Tensor, lora_A: torch.Tensor, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`max_rank` approximation of B·A by an SVD in the factored space.

    QR of B (out×R) and of Aᵀ (in×R), then an SVD of the R×R core R_B·R_Aᵀ: the out×in
    product is never formed. The singular values are split evenly (√σ into each factor).

    Args:
        lora_B: (out, R). lora_A: (R, in). max_rank: the largest rank kept (≥ 1).

    Returns:
        (B'', A'', relative Frobenius error |B·A − B''·A''| / |B·A|, 0 for a zero product).
        Factors with R ≤ max_rank come back unchanged with error 0.

    Example:
        >>> b, a, err = truncate_factors(torch.randn(8, 4).double(), torch.randn(4, 6).double(), 2)
        >>> b.shape[1], 0 < err < 1
        (2, True)
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
        raise InputError(f"max_rank must be a positive integer, got {max_rank!r}")


def check_compatible(expert: LoraAdapter, antis: Sequence[LoraAdapter], *, any_base_model: bool = False) -> None:
    """Raise an InputError (a ValueError) unless every anti-expert fits the expert: same base model, same module shapes.

    Example:
        >>> m = LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0)
        >>> check_compatible(LoraAdapter({"q": m}), [LoraAdapter({"q": m})])
    """
    check_base_models(expert, antis, any_base_model=any_base_model)
    for anti in antis:
        for name, module in anti.modules.items():
            ref = expert.modules.get(name)
            if ref is not None and (ref.out_features, ref.in_features) != (module.out_features, module.in_features):
                raise InputError(
                    f"module {name}: the expert {expert.source} adapts a ({ref.out_features}, {ref.in_features}) "
                    f"weight but {anti.source} a ({module.out_features}, {module.in_features}) one; "
                    "the adapters belong to different base models"
                )


def merge_adapters(
    expert: LoraAdapter,
    antis: LoraAdapter | Sequence[LoraAdapter],
    lam: float | Sequence[float] = 1.0,
    method: str = "ext-sub",
    *,
    max_rank: int | None = None,
    any_base_model: bool = False,
) -> MergedAdapter:
    """Ext-Sub (or direct subtraction/addition) of LoRA adapters, exactly, in the factored space.

    Anti-experts apply in order (the paper's compositional unlearning, Table 4); each Ext-Sub
    step takes its row norms from the result so far, so ranks add up. Computed modules have
    their scaling folded into B (scaling 1) and factors in float32 (float64 if an input is);
    modules only in the expert are kept as they are. Output dtype per module: the expert's
    (the anti-expert's for modules only there).

    Args:
        expert: θ⁺.
        antis: θ⁻, one adapter or several in order.
        lam: one λ for all anti-experts, or one per anti-expert.
        method: "ext-sub" (θ⁺ − λ·Ext(θ⁻)), "sub" (θ⁺ − λ·θ⁻) or "add" (θ⁺ + λ·θ⁻).
        max_rank: truncate every module to this rank by an SVD of the factored result and
            report the relative Frobenius error per module; None keeps the exact result.
        any_base_model: accept adapters whose base_model_name_or_path differ (shapes are still checked).

    Returns:
        A MergedAdapter (modules, metadata from the expert, `report`).

    Example:
        >>> m = LoraModule(torch.randn(2, 8), torch.randn(4, 2), 2.0)
        >>> out = merge_adapters(LoraAdapter({"q": m}), LoraAdapter({"q": m}), 0.5)
        >>> out.modules["q"].rank
        4
    """
    antis = [antis] if isinstance(antis, LoraAdapter) else list(antis)
    if not antis:
        raise InputError("merge_adapters needs at least one anti-expert")
    check_same_type(expert, antis)
    sign = method_sign(method)
    lam_values = lam_list(lam, len(antis))
    if max_rank is not None:
        check_max_rank(max_rank)
    check_compatible(expert, antis, any_base_model=any_base_model)
    report = expert.new_report(method, lam_values)
    names = list(expert.modules)
    names += sorted({n for anti in antis for n in anti.modules if n not in expert.modules})
    modules: dict[str, LoraModule] = {}
    for name in names:
        module = _merge_module(name, expert, antis, lam_values, method, sign, report)
        if module is None:
            continue
        if max_rank is not None and module.rank > max_rank:
            b, a, error = truncate_factors(*_scaled_factors(module, torch.float64), max_rank)
            compute = compute_dtype(module.lora_B.dtype, module.lora_A.dtype)
            module = LoraModule(a.to(compute), b.to(compute), 1.0, module.storage_dtype)
            report.truncation_error[name] = error
        elif max_rank is not None:
            report.truncation_error[name] = 0.0
        modules[name] = module
    extra = copy_extra(expert, antis, report)
    return MergedAdapter(
        modules=modules,
        source=f"{method} of {expert.source} and {', '.join(a.source for a in antis)}",
        base_model_name_or_path=expert.base_model_name_or_path,
        fan_in_fan_out=expert.fan_in_fan_out,
        task_type=expert.task_type,
        extra=extra,
        config=expert.config,
        report=report,
    )


@dataclass(frozen=True)
class _FirstStep:
    """What a module's first Ext-Sub step needs and λ does not change: both sides' scaled factors and row norms."""

    b_plus: torch.Tensor
    a_plus: torch.Tensor
    b_minus: torch.Tensor
    a_minus: torch.Tensor
    norms: tuple[torch.Tensor, torch.Tensor]


class LoraSweep:
    """`merge_adapters` at many λ of one method, bitwise the same, what λ does not change done once (docs/design.md §8).

    A module's first Ext-Sub step, from the expert's module, needs the scaled factors of both
    sides and their row norms (QR factorisations); only the coefficients α and β depend on λ.
    Those are prepared here once per module; every λ then costs the coefficients and the
    products, O(out·r) per module. Later steps (several anti-experts) start from a result that
    depends on λ, and `sub`/`add` need no norms: those run as `merge_adapters` runs them.

    Args:
        expert, antis, method, any_base_model: as for `merge_adapters` (checked here, once).

    Example:
        >>> sweep = LoraSweep(expert, [anti], "ext-sub")  # doctest: +SKIP
        >>> [sweep.modules(lam) for lam in (0.5, 1.0, 2.0)]  # doctest: +SKIP
    """

    def __init__(
        self,
        expert: LoraAdapter,
        antis: LoraAdapter | Sequence[LoraAdapter],
        method: str = "ext-sub",
        *,
        any_base_model: bool = False,
    ):
        self.expert = expert
        self.antis = [antis] if isinstance(antis, LoraAdapter) else list(antis)
        self.method, self.sign = method, method_sign(method)
        # Validates (types, base models, shapes) and fixes the result's modules, which λ does not change.
        self.template = merge_adapters(expert, self.antis, 1.0, method, any_base_model=any_base_model)
        self._first: dict[str, _FirstStep] = {}
        for name in self.template.modules if method == "ext-sub" else ():
            start = expert.modules.get(name)
            holders = [a.modules[name] for a in self.antis if name in a.modules]
            if start is None or not holders:
                continue
            compute = compute_dtype(*(t.dtype for m in (start, *holders) for t in (m.lora_A, m.lora_B)))
            (b, a), (b_minus, a_minus) = _scaled_factors(start, compute), _scaled_factors(holders[0], compute)
            norms = (lora_row_norms(b, a), lora_row_norms(b_minus, a_minus))
            self._first[name] = _FirstStep(b, a, b_minus, a_minus, norms)

    def to(self, device: torch.device | str) -> "LoraSweep":
        """This sweep with every tensor on `device`, so each λ is merged there (a GPU: no host work per λ)."""
        moved = copy.copy(self)
        moved.expert = _adapter_to(self.expert, device)
        moved.antis = [_adapter_to(a, device) for a in self.antis]
        moved._first = {
            name: _FirstStep(
                *(t.to(device) for t in (f.b_plus, f.a_plus, f.b_minus, f.a_minus)),
                tuple(n.to(device) for n in f.norms),
            )
            for name, f in self._first.items()
        }
        return moved

    def modules(self, lam: float | Sequence[float]) -> dict[str, LoraModule]:
        """The modules of `merge_adapters(expert, antis, lam, method)`, bitwise, in its order."""
        lams = lam_list(lam, len(self.antis))
        scratch = self.expert.new_report(self.method, lams)  # what merge_adapters reports; not kept
        merged = {}
        for name in self.template.modules:
            args = (name, self.expert, self.antis, lams, self.method, self.sign, scratch)
            merged[name] = _merge_module(*args, first=self._first.get(name))
        return merged


def _adapter_to(adapter: LoraAdapter, device: torch.device | str) -> LoraAdapter:
    modules = {
        name: LoraModule(m.lora_A.to(device), m.lora_B.to(device), m.scaling, m.storage_dtype)
        for name, m in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=modules)


def _merge_module(
    name: str,
    expert: LoraAdapter,
    antis: list[LoraAdapter],
    lams: tuple[float, ...],
    method: str,
    sign: float,
    report: AdapterReport,
    *,
    first: _FirstStep | None = None,
) -> LoraModule | None:
    """The module `name` of the result (None when it vanishes), with the report updated.

    `first`: the first Ext-Sub step's λ-independent part, prepared by `LoraSweep`.
    """
    start = expert.modules.get(name)
    steps = [(anti.modules[name], lam) for anti, lam in zip(antis, lams, strict=False) if name in anti.modules]
    if start is None and method == "ext-sub":
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
        b, a = _scaled_factors(first, compute, sign * lam)
        report.added.append(name)
    else:
        b, a = (first.b_plus, first.a_plus) if first is not None else _scaled_factors(start, compute)
        report.merged.append(name)
    zero_rows = 0
    for i, (anti_module, lam) in enumerate(steps):
        if method == "ext-sub":
            if i == 0 and first is not None:
                b, a, zeros = ext_sub_factors(b, a, first.b_minus, first.a_minus, lam, norms=first.norms)
            else:
                b_minus, a_minus = _scaled_factors(anti_module, compute)
                b, a, zeros = ext_sub_factors(b, a, b_minus, a_minus, lam)
            zero_rows = max(zero_rows, zeros)
        else:
            b_minus, a_minus = _scaled_factors(anti_module, compute, sign * lam)
            b, a = torch.cat([b, b_minus], dim=1), torch.cat([a, a_minus], dim=0)
    if zero_rows:
        report.zero_rows[name] = zero_rows
    if not all_finite(b) or not all_finite(a):
        raise InputError(
            f"module {name}: the merged factors overflow {str(compute).removeprefix('torch.')} (B scaled by "
            "lora_alpha/r, by α and by λ leaves its range); the adapters' scaling or λ is out of range"
        )
    return LoraModule(a, b, 1.0, out_dtype)
