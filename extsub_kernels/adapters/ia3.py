"""(IA)³ adapters: learned scaling vectors, merged as task vectors d = l − 1, one row each (docs/design.md §6).

PEFT's (IA)³ multiplies a layer's output features by `ia3_l`, shaped (out, 1), or, for the
modules listed in `feedforward_modules`, its input features by `ia3_l` shaped (1, in); every
vector starts at ones. The task vector of a vector is therefore d = l − 1, and Ext-Sub applies
to d with the whole vector as one row: l' = 1 + d⁺ − λ·Ext(d⁻) (`sub`: 1 + d⁺ − λ·d⁻, `add`:
1 + d⁺ + λ·d⁻). The arithmetic runs in float64 (the vectors are small) and rounds once.

With a base model, l' folds into the weights as PEFT's own merge does: W·l' scales the rows of
an nn.Linear weight (out, in) and its bias, or its columns for a feedforward vector; GPT-2's
Conv1D stores (in, out), so the vector is transposed first.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from extsub_kernels._tensors import compute_dtype, is_float
from extsub_kernels.adapters.family import (
    PEFT_PREFIX,
    BaseEdit,
    PeftAdapter,
    check_base_models,
    check_same_type,
    config_text,
    copy_extra,
    describe_dtypes,
    lam_list,
    peft_fields,
    refuse_max_rank,
    strip_peft_prefix,
    weight_key,
)
from extsub_kernels.adapters.patterns import PatternMatcher
from extsub_kernels.adapters.report import AdapterReport, counted
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.options import method_sign
from extsub_kernels.engine.outputs import LazyOutput
from extsub_kernels.errors import AdapterError, InputError
from extsub_kernels.io import TensorEntry
from extsub_kernels.io.resolve import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# <module>.ia3_l, optionally with an adapter-name segment: <module>.ia3_l.default
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?$")


def ia3_key(module: str) -> str:
    """The key PEFT saves a module's vector under: `ia3_key("m.k_proj")` → `base_model.model.m.k_proj.ia3_l`."""
    return f"{PEFT_PREFIX}{module}.ia3_l"


def is_feedforward_module(patterns: object, module: str, matcher: PatternMatcher | None = None) -> bool:
    """Whether PEFT treats `module` as feedforward under `feedforward_modules` (its own matching rule).

    A string is a regular expression matched against the whole name (in bounded time, see
    `patterns`); a list matches names that end with one of its entries (PEFT's `key.endswith(target_key)`).

    Example:
        >>> is_feedforward_module(["down_proj"], "model.layers.0.mlp.down_proj")
        True
    """
    if isinstance(patterns, str):
        return (matcher or PatternMatcher("adapter config")).matches(patterns, module, "feedforward_modules", full=True)
    return any(module.endswith(p) for p in patterns or ())


@dataclass(repr=False)
class IA3Adapter(PeftAdapter):
    """An (IA)³ adapter as data: one scaling vector per module, keyed by the module's name in the base model.

    Attributes:
        vectors: module name → `ia3_l`, (out, 1), or (1, in) for a feedforward module.
        feedforward: the modules whose vector scales inputs (PEFT's `feedforward_modules`).
        dtype: the dtype merged vectors are written in (they are held in float64); None: each vector's own.
        report: what the merge did (merged adapters only).
    """

    peft_type = "IA3"
    label = "(IA)³"
    unit = "vector"
    row = "vector"
    delta = "d⁻"
    formats = ("ia3",)
    config_needed = "which modules are feedforward_modules"

    vectors: dict[str, torch.Tensor]
    feedforward: frozenset[str] = frozenset()
    source: str = "<memory>"
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None
    report: AdapterReport | None = None

    def __post_init__(self) -> None:
        self.feedforward = frozenset(self.feedforward)
        for name, vector in self.vectors.items():
            problem = _shape_problem(vector, name in self.feedforward)
            if problem is not None:
                raise ValueError(f"(IA)³ vector {name}: {problem}")
        unknown = sorted(self.feedforward - set(self.vectors))
        if unknown:
            raise ValueError(f"feedforward lists modules with no vector: {', '.join(unknown[:3])}")

    @classmethod
    def from_peft(cls, weights: Path, tensors: Mapping[str, torch.Tensor], config: dict, where: str) -> "IA3Adapter":
        """Read the tensors of an (IA)³ adapter file with its adapter_config, validated.

        Args:
            weights: the weights file (for messages).
            tensors: every tensor of the file, by key (finiteness already checked).
            config: its adapter_config (peft_type IA3).
            where: where the config came from (for messages).

        Raises:
            AdapterError: no vectors, a vector that is not (out, 1) or (1, in), a shape the
                config's feedforward_modules contradicts, several adapters in one file.
        """
        for name in ("target_modules", "feedforward_modules"):
            value = config.get(name)
            if value is not None and not isinstance(value, str) and not _is_str_list(value):
                raise AdapterError(f"{where}: {name} must be a list of module names or a regex string, got {value!r}")
        vectors: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        adapter_names = set()
        for key, tensor in tensors.items():
            match = _IA3_KEY.match(key)
            if match is None:
                extra[key] = tensor
                continue
            if match["adapter"] is not None:
                adapter_names.add(match["adapter"])
            if not is_float(tensor.dtype):
                raise AdapterError(f"{weights}: {key} has dtype {tensor.dtype}; (IA)³ vectors must be floating point")
            vectors[strip_peft_prefix(match["module"])] = tensor
        if len(adapter_names) > 1:
            names = ", ".join(sorted(adapter_names))
            raise AdapterError(f"{weights}: holds several adapters ({names}); save one adapter per file")
        if not vectors:
            raise AdapterError(f"{weights}: no (IA)³ vectors (keys ending in .ia3_l), but {where} says peft_type IA3")
        feedforward = set()
        matcher = PatternMatcher(where)
        for name, vector in vectors.items():
            by_shape = vector.dim() == 2 and vector.shape[0] == 1 and vector.shape[1] != 1
            listed = config.get("feedforward_modules")
            by_config = is_feedforward_module(listed, name, matcher)
            if vector.dim() == 2 and vector.shape == (1, 1):
                by_shape = by_config
            problem = _shape_problem(vector, by_shape)
            if problem is not None:
                raise AdapterError(f"{weights}: {ia3_key(name)}: {problem}")
            if listed is not None and by_shape != by_config:
                said = "lists it in" if by_config else "does not list it in"
                kind = "a feedforward (1, in)" if by_shape else "an output (out, 1)"
                raise AdapterError(
                    f"{weights}: {ia3_key(name)} is {list(vector.shape)}, {kind} vector, but {where} {said} "
                    f"feedforward_modules ({listed!r}); the config does not describe these weights"
                )
            if by_shape:
                feedforward.add(name)
        return cls(
            vectors=vectors,
            feedforward=frozenset(feedforward),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            **peft_fields(weights, config, extra),
        )

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
    ) -> "IA3Adapter":
        """`merge_ia3` below."""
        refuse_max_rank(max_rank, "(IA)³ vectors have")
        return merge_ia3(expert, antis, lam, method, any_base_model=any_base_model)

    @classmethod
    def owns_key(cls, key: str) -> bool:
        return _IA3_KEY.match(key) is not None

    def describe(self) -> str:
        vectors = list(self.vectors.values())
        ff = len(self.feedforward)
        return (
            f"{counted(len(vectors), 'vector')}: {len(vectors) - ff} (out, 1), {ff} feedforward (1, in), "
            f"{sum(v.numel() for v in vectors):,} scales, {describe_dtypes(vectors, self.dtype)}"
        )

    def base_edits(self) -> list[BaseEdit]:
        """A vector scales its weight's rows (and the bias), or a feedforward vector the weight's columns."""
        edits = []
        for name, vector in self.vectors.items():
            n = vector.numel()
            if name in self.feedforward:
                edits.append(BaseEdit(name, weight_key(name), (None, n)))
            else:
                edits.append(BaseEdit(name, weight_key(name), (n, None)))
                edits.append(BaseEdit(name, f"{strip_peft_prefix(name)}.bias", (n,), optional=True))
        return edits

    def fold(self, edit: BaseEdit, theta0: torch.Tensor, *, transposed: bool, device: torch.device) -> torch.Tensor:
        """θ₀·l' laid out as PEFT's merge multiplies: rows or columns of the weight, the bias elementwise."""
        vector = self.vectors[edit.module]
        compute = compute_dtype(theta0.dtype, vector.dtype)
        scale = vector.to(device, compute)
        if len(edit.shape) == 1:
            scale = scale.reshape(-1)
        elif transposed:
            scale = scale.T
        return theta0.to(device, compute) * scale


def merge_ia3(
    expert: IA3Adapter,
    antis: IA3Adapter | Sequence[IA3Adapter],
    lam: float | Sequence[float] = 1.0,
    method: str = "ext-sub",
    *,
    any_base_model: bool = False,
) -> IA3Adapter:
    """Ext-Sub (or sub / add) of (IA)³ adapters on their task vectors d = l − 1, each vector one row, in float64.

    A vector only in the expert is copied. One only in anti-experts contributes nothing under
    ext-sub (|p| = 0 ⇒ Ext = 0: it is written as l = 1) and l = 1 ∓ λ·d⁻ under sub/add. The
    result's feedforward modules are the union of the inputs'; shapes must agree.

    Args:
        expert: θ⁺.
        antis: θ⁻, one adapter or several in order.
        lam: one λ for all anti-experts, or one per anti-expert.
        method: "ext-sub", "sub" or "add".
        any_base_model: accept adapters whose base_model_name_or_path differ.

    Returns:
        An IA3Adapter with merged vectors in float64 (`dtype`: the expert's, for writing) and a `report`.

    Example:
        >>> ones = IA3Adapter({"k": torch.ones(4, 1)})
        >>> merge_ia3(ones, ones, 1.0).vectors["k"].flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    antis = [antis] if isinstance(antis, IA3Adapter) else list(antis)
    if not antis:
        raise InputError("merge_ia3 needs at least one anti-expert")
    check_same_type(expert, antis)
    method_sign(method)
    lams = lam_list(lam, len(antis))
    check_base_models(expert, antis, any_base_model=any_base_model)
    _check_shapes(expert, antis)
    report = expert.new_report(method, lams)
    names = list(expert.vectors) + sorted({n for a in antis for n in a.vectors if n not in expert.vectors})
    vectors = {}
    for name in names:
        start = expert.vectors.get(name)
        steps = [(anti.vectors[name], lam) for anti, lam in zip(antis, lams, strict=True) if name in anti.vectors]
        if not steps:
            report.copied.append(name)
            vectors[name] = start
            continue
        if start is not None:
            report.merged.append(name)
        else:  # only in anti-experts: nothing under ext-sub (l = 1), ∓λ·d⁻ under sub/add
            (report.dropped if method == "ext-sub" else report.added).append(name)
        task = start.double() - 1 if start is not None else torch.zeros(steps[0][0].shape, dtype=torch.float64)
        work = task.reshape(-1)  # the whole vector is one row
        for vector, step_lam in steps:
            if method == "ext-sub" and not bool(work.any()):
                report.zero_rows[name] = 1
            apply_method(work, [vector.double().reshape(-1) - 1], [step_lam], method=method, inplace=True)
        vectors[name] = 1 + task
    feedforward = frozenset(n for adapter in (expert, *antis) for n in adapter.feedforward)
    stored = expert.dtype or next(iter(expert.vectors.values())).dtype
    return IA3Adapter(
        vectors=vectors,
        feedforward=feedforward,
        source=f"{method} of {expert.source} and {', '.join(a.source for a in antis)}",
        base_model_name_or_path=expert.base_model_name_or_path,
        fan_in_fan_out=expert.fan_in_fan_out,
        task_type=expert.task_type,
        extra=copy_extra(expert, antis, report),
        config=expert.config,
        dtype=stored,
        report=report,
    )


def ia3_output(
    adapter: IA3Adapter, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> LazyOutput:
    """The (IA)³ adapter as a PEFT adapter folder: every vector under PEFT's key, the config the expert's.

    The config's `target_modules` and `feedforward_modules` list the vectors' modules by full
    name (the union over the merged inputs): PEFT applies such entries to exactly those
    modules, whatever pattern form the inputs used. `device` is unused (nothing to compute).

    Args:
        adapter: a loaded or merged adapter; its non-(IA)³ tensors are included as they are.
        dtype: the dtype of the written vectors; None: the adapter's `dtype`, else each vector's own.
    """
    makers = []
    for name, vector in adapter.vectors.items():
        out = dtype or adapter.dtype or vector.dtype
        entry = TensorEntry(ia3_key(name), out, tuple(vector.shape))
        makers.append((entry, lambda v=vector, o=out: v.to(o).contiguous()))
    makers += [(TensorEntry(key, t.dtype, tuple(t.shape)), lambda t=t: t) for key, t in adapter.extra.items()]
    texts = {ADAPTER_CONFIG: config_text(ia3_config(adapter))}
    return LazyOutput.lazy(makers, texts=texts, weights_name=ADAPTER_WEIGHTS)


def ia3_config(adapter: IA3Adapter) -> dict:
    """The adapter_config.json of an (IA)³ output: the adapter's own, with its module lists as written."""
    config = dict(adapter.config)
    config.update(
        peft_type="IA3",
        task_type=adapter.task_type,
        base_model_name_or_path=adapter.base_model_name_or_path,
        target_modules=sorted(adapter.vectors),
        feedforward_modules=sorted(adapter.feedforward),
        exclude_modules=None,
        fan_in_fan_out=adapter.fan_in_fan_out,
        inference_mode=True,
    )
    if not adapter.extra:
        config["modules_to_save"] = None
    return config


def _check_shapes(expert: IA3Adapter, antis: Sequence[IA3Adapter]) -> None:
    """Raise an InputError naming both shapes where a module's vectors differ between inputs."""
    for anti in antis:
        for name, vector in anti.vectors.items():
            ref = expert.vectors.get(name)
            if ref is not None and ref.shape != vector.shape:
                raise InputError(
                    f"(IA)³ vector {name}: the expert {expert.source} has {_kind(expert, name)} but "
                    f"{anti.source} has {_kind(anti, name)}; the vectors of one module must agree "
                    "(same base model, same feedforward_modules)"
                )


def _kind(adapter: IA3Adapter, name: str) -> str:
    shape = list(adapter.vectors[name].shape)
    return f"{shape} ({'feedforward, (1, in)' if name in adapter.feedforward else '(out, 1)'})"


def _shape_problem(vector: torch.Tensor, feedforward: bool) -> str | None:
    """What is wrong with a vector's shape for its kind, or None."""
    if not isinstance(vector, torch.Tensor) or not is_float(vector.dtype):
        return f"must be a floating-point tensor, got {getattr(vector, 'dtype', type(vector).__name__)}"
    expected = "(1, in_features) (a feedforward module)" if feedforward else "(out_features, 1)"
    if vector.dim() != 2 or vector.shape[0 if feedforward else 1] != 1:
        return (
            f"has shape {list(vector.shape)}, expected {expected}; only (IA)³ on Linear and Conv1D layers "
            "(2-D vectors) is supported"
        )
    return None


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
