"""The adapter family: `PeftAdapter`, the one class each PEM type (LoRA, (IA)³, prefix-tuning) subclasses with
everything about it, and `merge_adapters`, the template method holding the rules every type shares."""

import dataclasses
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from extsub_kernels.adapters.report import AdapterReport
from extsub_kernels.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from extsub_kernels.engine.method_spec import DEFAULT_METHOD, MethodSpec, method_spec
from extsub_kernels.engine.options import lam_value
from extsub_kernels.engine.writing import LazyOutput
from extsub_kernels.errors import AdapterError, InputError
from extsub_kernels.io import TensorEntry
from extsub_kernels.ops import row_products

PEFT_PREFIX = "base_model.model."


def strip_peft_prefix(key: str) -> str:
    """A key without PEFT's `base_model.model.` prefix: the name in the base model (`lm_head.weight`)."""
    return key.removeprefix(PEFT_PREFIX)


def base_tensor_name(key: str) -> str:
    """The base model's name of a full tensor an adapter saved (`….c_attn.base_layer.bias` → `….c_attn.bias`)."""
    return strip_peft_prefix(key).replace(".base_layer.", ".")


def weight_key(module: str) -> str:
    """The base model's weight name of a module: `model.layers.0.mlp.up_proj` → `....up_proj.weight`."""
    return f"{strip_peft_prefix(module)}.weight"


def config_text(config: Mapping) -> str:
    """An adapter_config.json's text, as every adapter output writes it."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class BaseEdit:
    """One tensor `name` of the base model that adapter module `module` changes (with a base model): its `shape` as
    nn.Linear stores it ((out, in), (out,) for a bias; None for a size the adapter does not fix), `optional` when it
    is changed only where the base has it (a bias)."""

    module: str
    name: str
    shape: tuple[int | None, ...]
    optional: bool = False

    def fits(self, shape: Sequence[int], *, transposed: bool) -> bool:
        """Whether a base tensor of `shape` is this one (a transposed weight is stored (in, out))."""
        expected = self.shape[::-1] if transposed and len(self.shape) == 2 else self.shape
        return len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=True))


@dataclass(frozen=True)
class MergeStep:
    """What a type's `merge_units` gets, checked by `merge_adapters`: the anti-experts (of the expert's type) in order,
    one λ each, the method, the report to fill, and LoRA's `max_rank` (None: exact)."""

    antis: Sequence["PeftAdapter"]
    lams: tuple[float, ...]
    spec: MethodSpec
    report: AdapterReport
    max_rank: int | None = None


@dataclass(frozen=True)
class OutputFormat:
    """One output format: the `name` format= takes, `make` (adapter, *, dtype, device) → its lazy output, `keys` (a
    unit's name → the output tensors it is written as) and `what` the output is, for its model card."""

    name: str
    make: Callable[..., LazyOutput]
    keys: Callable[[str], tuple[str, ...]]
    what: str


@dataclass(kw_only=True, repr=False)
class PeftAdapter(ABC):
    """A PEFT adapter of one PEM type, loaded and validated. Fields: `source` (a name for messages), the base model,
    task type, `extra` (non-adapter tensors under their keys) and `config` (its adapter_config).

    Class attributes:
        peft_type: the adapter_config's `peft_type` ("LORA", "IA3", "PREFIX_TUNING").
        label: the type's name in messages ("LoRA", "(IA)³", "prefix-tuning").
        tag: its model-card tag, as the Hugging Face hub spells it ("lora", "ia3", "prefix-tuning").
        unit: what the report counts ("module", "vector", "prompt embedding").
        row: what one Ext-Sub row is, in the report ("row", "vector").
        delta: the symbol of an anti-expert's task vector, in the report ("ΔW⁻", "d⁻", "θ⁻").
        formats: the output formats it writes; the first is the default.
        base_refusal: why `base=` cannot fold it into a base model (None: it can).
        config_needed: what only its adapter_config says, so its weights alone are refused (None: LoRA's scaling).
        no_rank: why `max_rank` does not apply, in a few words ("(IA)³ vectors have"); None: it does.
        merged_type: the class of a merge's result (None: the type itself).
        scan_installer: "module:Class" of its λ-scan installer (a layer above: named, not imported); None: none.
    """

    peft_type: ClassVar[str]
    label: ClassVar[str]
    tag: ClassVar[str]
    unit: ClassVar[str]
    row: ClassVar[str] = "row"
    delta: ClassVar[str] = "ΔW⁻"
    formats: ClassVar[tuple[OutputFormat, ...]]
    base_refusal: ClassVar[str | None] = None
    config_needed: ClassVar[str | None] = None
    no_rank: ClassVar[str | None] = None
    merged_type: ClassVar[type | None] = None
    scan_installer: ClassVar[str | None] = None

    source: str = "<memory>"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @classmethod
    @abstractmethod
    def from_peft(cls, weights: Path, tensors: Mapping[str, torch.Tensor], config: dict, where: str) -> "PeftAdapter":
        """The adapter in a file's `tensors` and its adapter_config (read from `where`); AdapterError if they differ."""

    @classmethod  # noqa: B027 (optional: most types have no fields to check beyond their reader's)
    def check_config(cls, config: dict, where: str) -> None:
        """Refuse (AdapterError naming `where` and the field) a config of this type PEFT refuses or reads otherwise."""

    @classmethod
    @abstractmethod
    def owns_key(cls, key: str) -> bool:
        """Whether a tensor saved under `key` is one of this type's parameters (e.g. `...k_proj.ia3_l`)."""

    @abstractmethod
    def merge_units(self, step: "MergeStep") -> dict:
        """This type's math for one λ setting: the result's computed fields (the rest are the expert's)."""

    @abstractmethod
    def check_antis(self, antis: Sequence["PeftAdapter"]) -> None:
        """Raise an InputError unless the anti-experts fit this expert as the type needs (shapes, geometry)."""

    @abstractmethod
    def stat_units(self) -> Mapping[str, object]:
        """What the merge pairs, by name, as `row_sums` and `change_sq` take them (docs/design.md §7)."""

    def stat_parts(self, name: str) -> list[tuple[str, object]]:
        """(name, rows selector or None: all) per reported part of one unit (a prefix: per layer and head)."""
        return [(name, None)]

    @abstractmethod
    def unit_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Unit name → (shape, dtype code) as the report gives them."""

    @staticmethod
    def row_sums(expert: object, anti: object) -> torch.Tensor:
        """(rows, 3) float64 |p|², |m|², p·m of one unit of the expert and of an anti-expert (dense units here)."""
        return row_products(expert, anti)

    @staticmethod
    def change_sq(expert: object, merged: object) -> float:
        """‖p' − p‖² of one unit (Frobenius), from the expert's unit and the merged one."""
        return float(((merged.to(torch.float64) - expert.to(torch.float64)) ** 2).sum())

    def check_max_rank(self, max_rank: object) -> None:
        """`max_rank` truncates LoRA factors only: refuse it for a type whose parameters have no rank (`no_rank`)."""
        raise InputError(f"max_rank truncates LoRA factors; {self.no_rank} no rank to truncate", options=("max_rank",))

    @abstractmethod
    def describe(self) -> str:
        """Shapes and counts in a few words, for `repr()`."""

    def new_report(self, method: str, lams: tuple[float, ...]) -> AdapterReport:
        """An empty report of a merge of this type (counting its units)."""
        return AdapterReport(method=method, lams=lams, pem=self.label, unit=self.unit, row=self.row, delta=self.delta)

    def base_edits(self) -> list[BaseEdit]:
        """The base tensors each module changes (`base=`); an InputError saying why for types that cannot fold."""
        raise InputError(f"base= with {self.label} adapters ({self.source}): {self.base_refusal}", options=("base",))

    def fold(self, edit: BaseEdit, theta0: torch.Tensor, *, transposed: bool, device: torch.device) -> torch.Tensor:
        """Base tensor `theta0` with `edit.module` folded in, on `device`; `transposed`: stored (in, out)."""
        raise InputError(f"base= with {self.label} adapters ({self.source}): {self.base_refusal}", options=("base",))

    def layout(self, inputs: Sequence[tuple[str, object]], explicit: bool | None) -> object | None:
        """The `WeightLayout` of the base weights this type changes, from `explicit` and `inputs`; None: no matter."""
        return None

    def __repr__(self) -> str:
        parts = [self.describe(), f"source={self.source!r}"]
        if self.base_model_name_or_path:
            parts.append(f"base_model={self.base_model_name_or_path!r}")
        if self.extra:
            parts.append(f"{len(self.extra)} non-{self.label} tensors")
        report = getattr(self, "report", None)
        if report is not None:
            parts.append(f"report: {report.summary()}")
        return f"{type(self).__name__}({'; '.join(parts)})"


def peft_fields(weights: object, config: Mapping, extra: dict[str, torch.Tensor]) -> dict:
    """The fields every member reads the same way from a saved adapter, as constructor keyword arguments."""
    return {
        "source": str(weights),
        "base_model_name_or_path": config.get("base_model_name_or_path") or None,
        "task_type": config.get("task_type"),
        "extra": extra,
        "config": config,
    }


def adapter_folder(makers: list, adapter: PeftAdapter, config: Mapping) -> LazyOutput:
    """A PEFT adapter folder's lazy output: `makers`, the adapter's non-adapter tensors, `config`."""
    makers = makers + [(TensorEntry(key, t.dtype, tuple(t.shape)), lambda t=t: t) for key, t in adapter.extra.items()]
    return LazyOutput.lazy(makers, texts={ADAPTER_CONFIG: config_text(config)}, weights_name=ADAPTER_WEIGHTS)


def one_adapter(weights: object, names: set) -> None:
    """Refuse a file holding several named adapters (`names`: the adapter-name segments of its keys; None: none)."""
    if len(names - {None}) > 1:
        found = ", ".join(sorted(names - {None}))
        raise AdapterError(f"{weights}: holds several adapters ({found}); save one adapter per file")


def describe_dtypes(tensors: Sequence[torch.Tensor], storage: torch.dtype | None = None) -> str:
    """The dtypes of some tensors in a word or two ("float32/bfloat16"), or their storage dtype."""
    if storage is not None:
        return str(storage).removeprefix("torch.")
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return "/".join(names) or "no tensors"


def merge_adapters(
    expert: PeftAdapter,
    antis: PeftAdapter | Sequence[PeftAdapter],
    lam: float | Sequence[float] = 1.0,
    method: str = DEFAULT_METHOD,
    *,
    max_rank: int | None = None,
    any_base_model: bool = False,
) -> PeftAdapter:
    """Ext-Sub (or another method) of adapters of one PEM type, exactly, in their own space (docs/design.md §3, §6).

    Args:
        expert: θ⁺, a LoraAdapter, IA3Adapter or PrefixAdapter.
        antis: θ⁻, one adapter or several in order, of the expert's type.
        lam: one λ for all anti-experts, or one per anti-expert.
        method: ext-sub (θ⁺ − λ·Ext(θ⁻)), sub (θ⁺ − λ·θ⁻), add (θ⁺ + λ·θ⁻) or a registered one (`engine.method_spec`).
        max_rank: LoRA only: truncate every module to this rank (SVD in the factored space).
        any_base_model: accept adapters whose base_model_name_or_path differ (shapes are still checked).

    Returns:
        An adapter of the expert's type with a `report` (LoRA: a MergedAdapter).

    Raises:
        InputError: adapters of different types, base models or shapes, bad λ or method.
    """
    antis = [antis] if isinstance(antis, PeftAdapter) else list(antis)
    if not antis:
        raise InputError("merge_adapters needs at least one anti-expert")
    check_same_type(expert, antis)
    if max_rank is not None:
        expert.check_max_rank(max_rank)
    spec = method_spec(method)
    lams = lam_list(lam, len(antis))
    _check_base_models(expert, antis, any_base_model=any_base_model)
    expert.check_antis(antis)
    report = expert.new_report(spec.name, lams)
    computed = expert.merge_units(MergeStep(antis, lams, spec, report, max_rank))
    kept = {f.name: getattr(expert, f.name) for f in dataclasses.fields(expert) if f.init}
    kept.update(
        computed,
        source=f"{spec.name} of {expert.source} and {', '.join(a.source for a in antis)}",
        extra=_copy_extra(expert, antis, report),
        report=report,
    )
    return (expert.merged_type or type(expert))(**kept)


def check_same_type(expert: PeftAdapter, antis: Sequence[PeftAdapter]) -> None:
    """Raise an InputError naming both unless every anti-expert is of the expert's PEM type."""
    for anti in antis:
        if not isinstance(anti, PeftAdapter):
            raise InputError(f"anti-experts must be loaded adapters, got a {type(anti).__name__}")
        if anti.peft_type != expert.peft_type:
            raise InputError(
                f"{anti.source} is a {anti.label} adapter but the expert {expert.source} is a {expert.label} adapter; "
                "Ext-Sub combines adapters of one PEM type (their parameters live in different spaces)"
            )


def lam_list(lam: float | Sequence[float], n_antis: int) -> tuple[float, ...]:
    """One λ per anti-expert: a single λ repeated (`lam_list(0.5, 2)` → (0.5, 0.5)), or the list as given."""
    values = [lam_value(v) for v in ([lam] if isinstance(lam, (int, float, str)) else lam)]
    if len(values) == 1:
        values = values * n_antis
    if len(values) != n_antis:
        raise InputError(f"got {len(values)} λ values for {n_antis} anti-experts; give one λ, or one per anti-expert")
    return tuple(values)


def _check_base_models(expert: PeftAdapter, antis: Sequence[PeftAdapter], *, any_base_model: bool = False) -> None:
    """Raise an InputError unless every adapter names the expert's base model (or one of them names none)."""
    if any_base_model:
        return
    for anti in antis:
        names = (expert.base_model_name_or_path, anti.base_model_name_or_path)
        if all(names) and names[0] != names[1]:
            raise InputError(
                f"{anti.source} was trained on base model {names[1]!r} but the expert {expert.source} on "
                f"{names[0]!r}; Ext-Sub combines adapters of one base model (if both names denote the same model, "
                f"pass any_base_model=True; {expert.unit} shapes are still checked)",
                options=("any_base_model",),
            )


def _copy_extra(expert: PeftAdapter, antis: Sequence[PeftAdapter], report: AdapterReport) -> dict[str, torch.Tensor]:
    """Non-adapter tensors (modules_to_save): the expert's are copied (with a warning), the anti-experts' ignored."""
    if expert.extra:
        warnings.warn(
            f"{expert.source} has {len(expert.extra)} non-{expert.label} tensors (e.g. {next(iter(expert.extra))}); "
            "they are copied to the result unchanged, Ext-Sub does not apply to them",
            stacklevel=3,
        )
        report.extra_copied.extend(expert.extra)
    for anti in antis:
        if anti.extra:
            warnings.warn(
                f"{anti.source} has {len(anti.extra)} non-{anti.label} tensors (e.g. {next(iter(anti.extra))}); "
                "they are ignored: only the expert's are kept",
                stacklevel=3,
            )
    return dict(expert.extra)
