"""(IA)³ adapters: learned scaling vectors, merged as task vectors d = l − 1, one row each (docs/design.md §6).

`ia3_l` scales a layer's outputs, (out, 1), or for `feedforward_modules` its inputs, (1, in), starting at ones, so
l' = 1 + d⁺ − λ·Ext(d⁻) in float64, rounded once. With a base, l' folds in as PEFT's merge does (rows and bias, or
columns; transposed for GPT-2's Conv1D).
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import extsub_kernels.adapters.family as family
from extsub_kernels._tensors import compute_dtype, is_float
from extsub_kernels.adapters.family import BaseEdit, MergeStep, OutputFormat, PeftAdapter
from extsub_kernels.adapters.patterns import PatternMatcher, is_names, selects
from extsub_kernels.adapters.report import AdapterReport, counted
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.writing import LazyOutput
from extsub_kernels.errors import AdapterError, InputError
from extsub_kernels.io import TensorEntry
from extsub_kernels.io.format import DTYPE_CODES

# <module>.ia3_l, optionally with an adapter-name segment: <module>.ia3_l.default
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?$")


def ia3_key(module: str) -> str:
    """The key PEFT saves a module's vector under: `ia3_key("m.k_proj")` → `base_model.model.m.k_proj.ia3_l`."""
    return f"{family.PEFT_PREFIX}{module}.ia3_l"


def is_feedforward_module(patterns: object, module: str, matcher: PatternMatcher | None = None) -> bool:
    """Whether PEFT treats `module` as feedforward: a string is a full-name regex, a list matches name endings."""
    if isinstance(patterns, str):
        return (matcher or PatternMatcher("adapter config")).matches(patterns, module, "feedforward_modules", full=True)
    return any(module.endswith(p) for p in patterns or ())


def ia3_output(
    adapter: "IA3Adapter", *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> LazyOutput:
    """The (IA)³ adapter as a PEFT folder, vectors in `dtype` (None: the adapter's or each one's); `device` unused."""
    makers = []
    for name, vector in adapter.vectors.items():
        out = dtype or adapter.dtype or vector.dtype
        entry = TensorEntry(ia3_key(name), out, tuple(vector.shape))
        makers.append((entry, lambda v=vector, o=out: v.to(o).contiguous()))
    return family.adapter_folder(makers, adapter, _ia3_config(adapter))


def _ia3_config(adapter: "IA3Adapter") -> dict:
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


@dataclass(repr=False)
class IA3Adapter(PeftAdapter):
    """An (IA)³ adapter: one scaling vector per module, keyed by the module's name in the base model.

    Attributes:
        vectors: module name → `ia3_l`, (out, 1), or (1, in) for a feedforward module.
        feedforward: the modules whose vector scales inputs (PEFT's `feedforward_modules`).
        dtype: the dtype merged vectors are written in (they are held in float64); None: each vector's own.
        report: what the merge did (merged adapters only).
    """

    peft_type, label, tag = "IA3", "(IA)³", "ia3"
    unit, row, delta = "vector", "vector", "d⁻"
    formats = (OutputFormat("ia3", ia3_output, lambda module: (ia3_key(module),), "a PEFT (IA)³ adapter"),)
    config_needed = "which modules are feedforward_modules"
    no_rank = "(IA)³ vectors have"
    scan_installer = "extsub_kernels.lambda_scan.installers.ia3:IA3Installer"

    vectors: dict[str, torch.Tensor]
    feedforward: frozenset[str] = frozenset()
    fan_in_fan_out: bool = False
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
    def check_config(cls, config: dict, where: str) -> None:
        """Module lists as PEFT's IA3Config takes them; feedforward_modules a subset of target_modules."""
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            value = config.get(name)
            if value is not None and not (isinstance(value, str) and name != "modules_to_save") and not is_names(value):
                raise AdapterError(f"{where}: {name} must be a list of module names or a regex string, got {value!r}")
        targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            raise AdapterError(
                f"{where}: feedforward_modules should be a subset of target_modules (PEFT refuses the config): "
                f"{sorted(set(feedforward) - set(targets))} are not in target_modules {targets!r}"
            )

    @classmethod
    def from_peft(cls, weights: Path, tensors: Mapping[str, torch.Tensor], config: dict, where: str) -> "IA3Adapter":
        """The `ia3_l` vectors, shaped as feedforward_modules says, on the modules target_modules select."""
        vectors: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        adapter_names = set()
        for key, tensor in tensors.items():
            match = _IA3_KEY.match(key)
            if match is None:
                extra[key] = tensor
                continue
            adapter_names.add(match["adapter"])
            if not is_float(tensor.dtype):
                raise AdapterError(f"{weights}: {key} has dtype {tensor.dtype}; (IA)³ vectors must be floating point")
            vectors[family.strip_peft_prefix(match["module"])] = tensor
        family.one_adapter(weights, adapter_names)
        if not vectors:
            raise AdapterError(f"{weights}: no (IA)³ vectors (keys ending in .ia3_l), but {where} says peft_type IA3")
        feedforward = set()
        matcher = PatternMatcher(where)
        # IA3Config has no layers_to_transform: PEFT selects by these fields alone.
        selection = {k: config.get(k) for k in ("target_modules", "exclude_modules", "modules_to_save")}
        for name, vector in vectors.items():
            if not selects(selection, name, matcher):
                raise AdapterError(
                    f"{weights}: {ia3_key(name)}: {where} does not select module {name} (target_modules "
                    f"{config.get('target_modules')!r}, exclude_modules, modules_to_save): PEFT puts no (IA)³ layer "
                    "there and ignores this vector, so a merge would differ from what PEFT does; fix target_modules "
                    "or drop the vector"
                )
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
            **family.peft_fields(weights, config, extra),
        )

    @classmethod
    def owns_key(cls, key: str) -> bool:
        return _IA3_KEY.match(key) is not None

    def describe(self) -> str:
        vectors = list(self.vectors.values())
        ff = len(self.feedforward)
        return (
            f"{counted(len(vectors), 'vector')}: {len(vectors) - ff} (out, 1), {ff} feedforward (1, in), "
            f"{sum(v.numel() for v in vectors):,} scales, {family.describe_dtypes(vectors, self.dtype)}"
        )

    def stat_units(self) -> Mapping[str, object]:
        return {name: vector.to(torch.float64).reshape(1, -1) - 1 for name, vector in self.vectors.items()}

    def unit_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: (tuple(v.shape), DTYPE_CODES[self.dtype or v.dtype]) for n, v in self.vectors.items()}

    def check_antis(self, antis: Sequence[PeftAdapter]) -> None:
        """Raise an InputError naming both shapes where a module's vectors differ between inputs."""
        for anti in antis:
            for name, vector in anti.vectors.items():
                ref = self.vectors.get(name)
                if ref is not None and ref.shape != vector.shape:
                    raise InputError(
                        f"(IA)³ vector {name}: the expert {self.source} has {_kind(self, name)} but "
                        f"{anti.source} has {_kind(anti, name)}; the vectors of one module must agree "
                        "(same base model, same feedforward_modules)"
                    )

    def merge_units(self, step: MergeStep) -> dict:
        """The method on the task vectors d = l − 1, each vector one row, in float64 (`dtype`: the expert's)."""
        antis, lams, spec, report = step.antis, step.lams, step.spec, step.report
        names = list(self.vectors) + sorted({n for a in antis for n in a.vectors if n not in self.vectors})
        vectors = {}
        for name in names:
            start = self.vectors.get(name)
            steps = [(anti.vectors[name], lam) for anti, lam in zip(antis, lams, strict=True) if name in anti.vectors]
            if not steps:
                report.copied.append(name)
                vectors[name] = start
                continue
            if start is not None:
                report.merged.append(name)
            else:  # only in anti-experts: nothing under ext-sub (l = 1), ∓λ·d⁻ under sub/add
                (report.dropped if spec.pairs_rows else report.added).append(name)
            task = start.double() - 1 if start is not None else torch.zeros(steps[0][0].shape, dtype=torch.float64)
            work = task.reshape(-1)  # the whole vector is one row
            for vector, step_lam in steps:
                if spec.pairs_rows and not bool(work.any()):
                    report.zero_rows[name] = 1
                apply_method(work, [vector.double().reshape(-1) - 1], [step_lam], method=spec, inplace=True)
            vectors[name] = 1 + task
        feedforward = frozenset(n for adapter in (self, *antis) for n in adapter.feedforward)
        stored = self.dtype or next(iter(self.vectors.values())).dtype
        return {"vectors": vectors, "feedforward": feedforward, "dtype": stored}

    def base_edits(self) -> list[BaseEdit]:
        """A vector scales its weight's rows (and the bias), or a feedforward vector the weight's columns."""
        edits = []
        for name, vector in self.vectors.items():
            n = vector.numel()
            if name in self.feedforward:
                edits.append(BaseEdit(name, family.weight_key(name), (None, n)))
            else:
                edits.append(BaseEdit(name, family.weight_key(name), (n, None)))
                edits.append(BaseEdit(name, f"{family.strip_peft_prefix(name)}.bias", (n,), optional=True))
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
