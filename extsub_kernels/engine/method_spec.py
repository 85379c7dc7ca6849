"""A merge method as one object, read by every path that merges: each step turns rows p, m into α·p + β·m with a
constant weight (`weight_sign`, elementwise) or per-row `coefficients` from |p|, |m| (and p·m); |p| = 0 keeps p.
Adding a method is one `MethodSpec` passed to `register_method` (and, for speed, its kernels)."""

from collections.abc import Callable, Collection
from dataclasses import dataclass
from operator import attrgetter

import torch

from extsub_kernels._names import DEFAULT_METHOD as DEFAULT_METHOD  # the default, re-exported beside the specs
from extsub_kernels._names import METHOD_FORMULAS
from extsub_kernels.errors import InputError
from extsub_kernels.ops import ext_sub_, ext_sub_coefficients, ext_sub_task_vectors_into

# (|p|, |m|, p·m or None, λ) → (α, β), each (rows, 1); float64 in, float64 out.
Coefficients = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: what it is called and says, and how a step with one anti-expert computes.

    Attributes:
        name, formula: the name options and files use ("ext-sub"); the result in symbols for --help ("θ⁺ − λ·Ext(θ⁻)").
        title, card_text: the method's name on the model card, and the card's sentence on what it does.
        negative, color: what a negative λ does, for the warning; its line on the scan's plot (None: the next colour).
        weight_sign: elementwise methods: θ ← θ + weight_sign·λ·θ⁻; None for a method that pairs rows.
        coefficients: a row-pairing method's α and β per row (see `Coefficients`).
        needs_products: `coefficients` reads p·m (otherwise it gets None there and the paths skip it).
        op: a kernel doing one step in place, op(p, m, λ, row_stats=) as `ops.ext_sub_` (None: the Gram path).
        fused: a kernel doing one step on task vectors, fused(out, p, m, θ₀, λ, row_stats=) → whether it ran.
        dropped: why a unit only in anti-experts contributes nothing (a row-pairing method keeps |p| = 0).
        change_per_lam: ‖θ' − θ⁺‖ per unit of |λ| over a tensor, from its `PairStats` (None: not known).
    """

    name: str
    formula: str
    title: str
    card_text: str
    negative: str
    color: str | None = None
    weight_sign: float | None = None
    coefficients: Coefficients | None = None
    needs_products: bool = False
    op: Callable[..., torch.Tensor] | None = None
    fused: Callable[..., bool] | None = None
    dropped: str = ""
    change_per_lam: Callable[[object], float | None] | None = None

    def __post_init__(self) -> None:
        if (self.weight_sign is None) == (self.coefficients is None):
            raise ValueError(f"method {self.name!r}: give exactly one of weight_sign and coefficients")
        if not self.dropped:
            object.__setattr__(self, "dropped", f"nothing under {self.name} (|p| = 0 keeps the row)")

    @property
    def pairs_rows(self) -> bool:
        """Whether a step pairs whole rows (needs their sums); False: it is elementwise."""
        return self.weight_sign is None

    @property
    def sign(self) -> str:
        """ "−" or "+": how an elementwise method adds an anti-expert, in messages."""
        return "+" if (self.weight_sign or -1.0) > 0 else "−"

    def row_coefficients(
        self, p_norm: torch.Tensor, m_norm: torch.Tensor, products: torch.Tensor | None, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, β) as (rows, 1) tensors: the method's own, or 1 and weight_sign·λ for an elementwise method."""
        if self.coefficients is None:
            return torch.ones_like(p_norm).unsqueeze(1), torch.full_like(p_norm, self.weight_sign * lam).unsqueeze(1)
        return self.coefficients(p_norm, m_norm, products if self.needs_products else None, lam)


def _direct(name: str, sign: float, title: str, card_text: str, color: str) -> MethodSpec:
    """An elementwise method, θ ← θ + sign·λ·θ⁻; its change over a tensor is |λ|·‖θ⁻‖."""
    does, instead = ("subtracts", "adding") if sign > 0 else ("adds", "subtracting")
    negative = f"{does} the anti-expert instead of {instead} it"
    change = attrgetter("anti_norm")
    return MethodSpec(name, METHOD_FORMULAS[name], title, card_text, negative, color, sign, change_per_lam=change)


EXT_SUB = MethodSpec(
    name="ext-sub",
    formula=METHOD_FORMULAS["ext-sub"],
    title="**Ext-Sub** (Extraction-before-Subtraction)",
    card_text="θ' = θ⁺ − λ·Ext(θ⁻), row by row. Ext(θ⁻) is the part of the anti-expert's task vector orthogonal to "
    "the bisector of expert and anti-expert rows, its *deficiency*; the rest, the general capability both share, is "
    "kept.",
    negative="adds the deficiency Ext(θ⁻) to the expert instead of removing it",
    color="#1f77b4",
    coefficients=lambda p_norm, m_norm, _products, lam: ext_sub_coefficients(p_norm, m_norm, lam),
    op=ext_sub_,
    fused=ext_sub_task_vectors_into,
    dropped="nothing under ext-sub (|p| = 0, so Ext = 0)",
    change_per_lam=lambda pair: pair.deficiency_norm,
)
SUB = _direct("sub", -1.0, "direct subtraction", "θ' = θ⁺ − λ·θ⁻, the paper's baseline.", "#d62728")
ADD = _direct("add", 1.0, "addition", "θ' = θ⁺ + λ·θ⁻.", "#2ca02c")
_REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in (EXT_SUB, SUB, ADD)}


# The registered methods' names, in order, read live (argparse choices, recipe checks, messages).
METHODS: Collection[str] = _REGISTRY.keys()


def method_spec(method: "str | MethodSpec") -> MethodSpec:
    """The registered method of this name (a MethodSpec is returned as is); an InputError listing them otherwise."""
    if isinstance(method, MethodSpec):
        return method
    spec = _REGISTRY.get(method) if isinstance(method, str) else None
    if spec is None:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(_REGISTRY)}")
    return spec


def method_specs() -> tuple[MethodSpec, ...]:
    """Every registered method, in order (the built-in ones first)."""
    return tuple(_REGISTRY.values())


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make `spec` a method every path accepts by its name (returned, so it can decorate an assignment)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Forget a method added by `register_method` (the built-in ones stay)."""
    if name in (EXT_SUB.name, SUB.name, ADD.name):
        raise ValueError(f"{name!r} is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)
