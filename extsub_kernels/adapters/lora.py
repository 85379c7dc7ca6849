"""LoRA adapters: PEFT's lora_A/lora_B read with their scaling, merged in the factored space, written in 3 formats.

PEFT keys look like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; lora_A is (r, in), lora_B (out, r)
for every layer type, GPT-2's Conv1D included; the scaling comes from r, lora_alpha, use_rslora, rank_pattern and
alpha_pattern. The math is in `factors` (docs/design.md §3). The formats, each a `LazyOutput` made one module at a time:

- `lora`: lora_A/lora_B under PEFT keys, and an adapter_config making PEFT apply exactly scaling·B·A per module:
  use_rslora=False and lora_alpha = scaling·r (computed modules: scaling 1, lora_alpha = r; copied ones keep
  theirs); the most common (r, lora_alpha) is the default, other modules get exact-name rank_pattern /
  alpha_pattern keys (`^` + the escaped module name: PEFT matches them against that module only).
- `dense-lora`: ΔW' as lora_B (out×in), lora_A = I (in×in), r = lora_alpha = in_features: the paper code's layout.
- `delta`: ΔW' keyed by the module's weight name in the base model, laid out like that weight.
"""

import copy
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from extsub_kernels._tensors import all_finite, compute_dtype
from extsub_kernels.adapters.factors import (
    Device,
    FirstStep,
    LoraModule,
    check_max_rank,
    factor_row_sums,
    lora_row_norms,
    lora_row_products,
    merge_module,
    module_delta,
    scaled_factors,
    truncate_factors,
)
from extsub_kernels.adapters.family import (
    PEFT_PREFIX,
    BaseEdit,
    MergeStep,
    OutputFormat,
    PeftAdapter,
    adapter_folder,
    describe_dtypes,
    lam_list,
    merge_adapters,
    one_adapter,
    peft_fields,
    strip_peft_prefix,
    weight_key,
)
from extsub_kernels.adapters.patterns import PatternMatcher, is_names, pattern_key, selects
from extsub_kernels.adapters.report import AdapterReport, counted
from extsub_kernels.engine.conv1d import WeightLayout, conv1d_transposed, input_config, never_transposed, weight_layout
from extsub_kernels.engine.method_spec import DEFAULT_METHOD, method_spec
from extsub_kernels.engine.writing import LazyOutput
from extsub_kernels.errors import AdapterError, InputError
from extsub_kernels.io import ResolvedInput, TensorEntry
from extsub_kernels.io.format import DTYPE_CODES

# <module>.lora_A.weight, optionally with an adapter-name segment: <module>.lora_A.default.weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# LoRA tensors this path cannot treat as ΔW = s·B·A.
_UNSUPPORTED = {
    "lora_magnitude_vector": "a DoRA magnitude vector (DoRA is not a plain s·B·A update)",
    "lora_embedding_A": "an embedding LoRA (lora_embedding_A/B)",
    "lora_embedding_B": "an embedding LoRA (lora_embedding_A/B)",
    ".bias": "a LoRA bias (lora_bias=True: ΔW is not s·B·A alone)",
}
# Config fields that make PEFT's LoRA something other than ΔW = s·B·A on the modules named, with why.
_VARIANTS = (
    ("use_dora", "DoRA rescales each column by a magnitude vector, so ΔW is not s·B·A"),
    ("lora_bias", "a LoRA bias adds to the output, so ΔW is not s·B·A alone"),
    ("alora_invocation_tokens", "aLoRA applies ΔW only after its invocation tokens"),
    ("use_qalora", "QALoRA pools the input before lora_A, so ΔW is not s·B·A"),
    ("target_parameters", "LoRA on parameters (target_parameters) is not a per-module s·B·A update"),
    ("use_bdlora", "BD-LoRA (a LoRA variant in PEFT) makes lora_A or lora_B block-diagonal, so ΔW is not s·B·A"),
    ("kasa_config", "KaSA (a LoRA variant in PEFT) also changes the base weight's singular values"),
    ("arrow_config", "Arrow (a LoRA variant in PEFT) routes each token among several adapters"),
    ("monteclora_config", "MonteCLoRA (a LoRA variant in PEFT) samples the factors, so ΔW is not one s·B·A"),
    ("layer_replication", "PEFT first repeats the base model's layers, so module names do not name base weights"),
    ("trainable_token_indices", "PEFT also trains token embeddings (trainable tokens), which are not a LoRA"),
)


def peft_key(module: str, part: str) -> str:
    """The key PEFT saves a module's factor under: `peft_key("m.q", "A")` → `base_model.model.m.q.lora_A.weight`."""
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def parse_peft_key(key: str) -> tuple[str, str, str | None] | None:
    """(module name in the base model, "A" or "B", adapter name or None) of a LoRA key; None otherwise."""
    match = _LORA_KEY.match(key)
    return None if match is None else (strip_peft_prefix(match["module"]), match["part"], match["adapter"])


def exact_pattern(module: str) -> str:
    """A rank_pattern/alpha_pattern key that PEFT applies to `module` and to nothing else (`^model\\.layers...`)."""
    return "^" + re.escape(module)


def module_scaling(config: Mapping, module: str, rank: int, matcher: PatternMatcher | None = None) -> float:
    """PEFT's scaling of `module`: lora_alpha/r, or lora_alpha/√r with use_rslora; patterns override."""
    alphas = config.get("alpha_pattern") or {}
    key = pattern_key(alphas, module, matcher, "alpha_pattern key")
    alpha = alphas[key] if key is not None else config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass(frozen=True)
class LoraScaling:
    """The scaling of bare LoRA weights (no adapter_config.json): `lora_alpha`, the rank `r` every module must have
    (None: from its shapes), `use_rslora` (lora_alpha/√r instead of lora_alpha/r)."""

    lora_alpha: float
    r: int | None = None
    use_rslora: bool = False  # the fields are the adapter_config.json's own


def peft_config(adapter: "LoraAdapter", ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """An adapter_config.json giving each module of `ranks` its rank and lora_alpha (see the module doc)."""
    if not ranks:
        raise ValueError(f"{adapter.source}: no LoRA modules to write (every module was left out)")
    default_r, default_alpha = Counter((ranks[n], alphas[n]) for n in ranks).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "revision": adapter.config.get("revision"),
        "r": default_r,
        "lora_alpha": default_alpha,
        "use_rslora": False,
        "rank_pattern": {exact_pattern(n): ranks[n] for n in ranks if ranks[n] != default_r},
        "alpha_pattern": {exact_pattern(n): alphas[n] for n in ranks if alphas[n] != default_alpha},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if adapter.extra:
        config["modules_to_save"] = adapter.config.get("modules_to_save")
        config["bias"] = adapter.config.get("bias", "none")
    return config


def _alpha(module: LoraModule) -> float | int:
    """lora_alpha giving `module.scaling` under lora_alpha/r (an int when it is one)."""
    alpha = module.scaling * module.rank
    return int(alpha) if float(alpha).is_integer() else alpha


def _finite(module: str, key: str, make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`make`, checked: an adapter merge's output never holds NaN or ±inf (its inputs are finite: it overflowed)."""

    def checked() -> torch.Tensor:
        tensor = make()
        if not all_finite(tensor):
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise InputError(
                f"module {module}: {key} overflows {dtype} (ΔW' = s·B·A leaves its range, from the adapters' "
                "scaling lora_alpha/r, λ or dtype=)",
                options=("dtype",),
            )
        return tensor

    return checked


def lora_output(adapter: "LoraAdapter", *, dtype: torch.dtype | None = None, device: Device = None) -> LazyOutput:
    """The factored adapter as a PEFT folder; `dtype`: of the factors (None: each module's); `device`: unused."""
    makers = []
    for name, module in adapter.modules.items():
        out = dtype or module.storage_dtype
        for part, factor in (("A", module.lora_A), ("B", module.lora_B)):
            key = peft_key(name, part)
            make = _finite(name, key, lambda f=factor, o=out: f.to(o).contiguous())
            makers.append((TensorEntry(key, out, tuple(factor.shape)), make))
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    return adapter_folder(
        makers, adapter, peft_config(adapter, ranks, {n: _alpha(m) for n, m in adapter.modules.items()})
    )


def dense_lora_output(adapter: "LoraAdapter", *, dtype: torch.dtype | None = None, device: Device = None) -> LazyOutput:
    """The dense-lora format: lora_A = I, lora_B = ΔW' formed on `device`; `dtype`: None for each module's."""
    makers = []
    for name, module in adapter.modules.items():
        out = dtype or module.storage_dtype
        n_in = module.in_features
        makers.append(
            (TensorEntry(peft_key(name, "A"), out, (n_in, n_in)), lambda n=n_in, o=out: torch.eye(n, dtype=o))
        )
        key = peft_key(name, "B")
        make_b = _finite(name, key, lambda m=module, o=out: module_delta(m, dtype=o, device=device).cpu())
        makers.append((TensorEntry(key, out, (module.out_features, n_in)), make_b))
    return adapter_folder(makers, adapter, dense_lora_config(adapter))


def dense_lora_config(adapter: "LoraAdapter") -> dict:
    """The adapter_config of the dense-lora format: r = lora_alpha = in_features per module (scaling 1)."""
    ranks = {name: m.in_features for name, m in adapter.modules.items()}
    return peft_config(adapter, ranks, dict(ranks))


def delta_output(
    adapter: "LoraAdapter",
    *,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: bool | None = None,
    device: Device = None,
) -> LazyOutput:
    """ΔW' per module under the base model's weight name, laid out like that weight ((in, out) when `fan_in_fan_out`,
    None: the adapter's flag); `dtype`: None for each module's; `device`: where B·A is formed."""
    transposed = adapter.fan_in_fan_out if fan_in_fan_out is None else fan_in_fan_out
    makers = []
    for name, module in adapter.modules.items():
        shape = (module.in_features, module.out_features) if transposed else (module.out_features, module.in_features)
        key = weight_key(name)
        delta = lambda m=module: module_delta(m, dtype=dtype, transposed=transposed, device=device).cpu()  # noqa: E731
        makers.append((TensorEntry(key, dtype or module.storage_dtype, shape), _finite(name, key, delta)))
    return LazyOutput.lazy(makers)


_DENSE_WHAT = "a PEFT LoRA adapter in the paper's dense layout (lora_B = ΔW', lora_A = I)"
_DELTA_WHAT = "ΔW' per module, keyed and laid out like the base model's weights (add them to it)"


def _factor_keys(module: str) -> tuple[str, ...]:
    return peft_key(module, "A"), peft_key(module, "B")


@dataclass(repr=False)
class LoraAdapter(PeftAdapter):
    """A LoRA adapter: `modules` keyed by their name in the base model, plus `PeftAdapter`'s fields."""

    peft_type, label, tag, unit = "LORA", "LoRA", "lora", "module"
    formats = (
        OutputFormat("lora", lora_output, _factor_keys, "a PEFT LoRA adapter (rank r⁺ + r⁻ per module, exact)"),
        OutputFormat("dense-lora", dense_lora_output, _factor_keys, _DENSE_WHAT),
        OutputFormat("delta", delta_output, lambda module: (weight_key(module),), _DELTA_WHAT),
    )
    merged_type: ClassVar[type | None] = None  # MergedAdapter, set below
    scan_installer = "extsub_kernels.lambda_scan.installers.lora:LoraInstaller"

    modules: dict[str, LoraModule]
    fan_in_fan_out: bool = False

    @classmethod
    def from_peft(cls, weights: Path, tensors: Mapping[str, torch.Tensor], config: dict, where: str) -> "LoraAdapter":
        """lora_A/lora_B pairs, their ranks checked against the config and their scaling taken from it."""
        pairs, extra = _group(weights, tensors)
        matcher = PatternMatcher(where)
        modules = {}
        for name, (lora_A, lora_B) in pairs.items():
            _check_pair(weights, name, lora_A, lora_B)
            if not selects(config, name, matcher):
                raise AdapterError(
                    f"{weights}: module {name} has LoRA weights, but {where} does not select it (target_modules "
                    f"{config.get('target_modules')!r}, exclude_modules, modules_to_save, layers_to_transform): PEFT "
                    "puts no LoRA layer there and ignores these weights, so a merge would differ from what PEFT does; "
                    "fix target_modules or drop the weights"
                )
            ranks = config.get("rank_pattern") or {}
            key = pattern_key(ranks, name, matcher, "rank_pattern key")
            expected = ranks[key] if key is not None else config.get("r")
            if expected is not None and lora_A.shape[0] != expected:
                raise AdapterError(
                    f"{weights}: module {name} has rank {lora_A.shape[0]} (lora_A {tuple(lora_A.shape)}) but "
                    f"{where} gives it r = {expected}; the config does not describe these weights"
                )
            scale = module_scaling(config, name, lora_A.shape[0], matcher)
            if not math.isfinite(scale):
                raise AdapterError(f"{weights}: module {name}: the scaling lora_alpha/r from {where} is {scale}")
            modules[name] = LoraModule(lora_A, lora_B, scale)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        return cls(modules=modules, fan_in_fan_out=fan_in_fan_out, **peft_fields(weights, config, extra))

    @classmethod
    def check_config(cls, config: dict, where: str) -> None:
        """The fields the merge uses and the ones PEFT's LoraConfig and LoRA layers check; variants refused."""
        for field_name in ("r", "lora_alpha"):
            if field_name not in config:
                raise AdapterError(
                    f"{where}: {field_name!r} is missing, so the LoRA scaling is unknown (PEFT would assume its "
                    "default, 8); write the value the adapter was trained with"
                )
        if not _is_rank(config["r"]):
            raise AdapterError(
                f"{where}: r must be a positive integer (PEFT refuses anything else), got {config['r']!r}"
            )
        check_scaling(config, where)
        indexes = config.get("layers_to_transform")
        for name, valid, what in _FIELDS:
            if config.get(name) is not None and not valid(config[name]):
                raise AdapterError(f"{where}: {name} must be {what}, got {config[name]!r}")
        if isinstance(config.get("target_modules"), str) and (indexes is not None or config.get("layers_pattern")):
            raise AdapterError(
                f"{where}: layers_to_transform and layers_pattern cannot be used with a target_modules regular "
                "expression (PEFT refuses the config)"
            )
        if config.get("layers_pattern") and indexes is None:
            raise AdapterError(f"{where}: layers_pattern needs layers_to_transform (PEFT refuses the config)")
        bias = config.get("bias")
        if bias is not None and bias not in ("none", "all", "lora_only"):
            raise AdapterError(f"{where}: bias is {bias!r}; PEFT accepts none, all, lora_only (or null)")
        for flag, why in _VARIANTS:
            if config.get(flag) not in (None, False):  # PEFT builds a variant from any other value, {} included
                raise AdapterError(f"{where}: {flag} is set; not supported: {why}")

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

    def stat_units(self) -> Mapping[str, object]:
        return self.modules

    def unit_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {n: ((m.out_features, m.in_features), DTYPE_CODES[m.storage_dtype]) for n, m in self.modules.items()}

    @staticmethod
    def row_sums(expert: LoraModule, anti: LoraModule) -> torch.Tensor:
        """|p|², |m|², p·m from the factors in float64 (cross-Gram), ΔW never formed."""
        b_plus, a_plus = scaled_factors(expert, torch.float64)
        b_minus, a_minus = scaled_factors(anti, torch.float64)
        pp = lora_row_norms(b_plus, a_plus) ** 2
        mm = lora_row_norms(b_minus, a_minus) ** 2
        return torch.stack([pp, mm, lora_row_products(b_plus, a_plus, b_minus, a_minus)], dim=1)

    @staticmethod
    def change_sq(expert: LoraModule, merged: LoraModule) -> float:
        """‖ΔW' − ΔW⁺‖² from the factors of [ΔW', −ΔW⁺] stacked."""
        b_plus, a_plus = scaled_factors(expert, torch.float64)
        b_out, a_out = scaled_factors(merged, torch.float64)
        b, a = torch.cat([b_out, -b_plus], dim=1), torch.cat([a_out, a_plus], dim=0)
        return float((lora_row_norms(b, a) ** 2).sum())

    check_max_rank = staticmethod(check_max_rank)  # any positive rank: LoRA factors have one

    def check_antis(self, antis: Sequence[PeftAdapter]) -> None:
        """Raise an InputError unless every anti-expert's modules adapt weights of the expert's shapes."""
        for anti in antis:
            for name, module in anti.modules.items():
                ref = self.modules.get(name)
                if ref is not None and (ref.out_features, ref.in_features) != (module.out_features, module.in_features):
                    raise InputError(
                        f"module {name}: the expert {self.source} adapts a ({ref.out_features}, {ref.in_features}) "
                        f"weight but {anti.source} a ({module.out_features}, {module.in_features}) one; "
                        "the adapters belong to different base models"
                    )

    def merge_units(self, step: MergeStep) -> dict:
        """The modules of the merge, exactly, in the factored space (docs/design.md §3), ranks adding up; `max_rank`
        truncates each by an SVD of the result, its relative error in the report."""
        report, max_rank = step.report, step.max_rank
        antis = [anti.modules for anti in step.antis]
        names = list(self.modules) + sorted({n for anti in antis for n in anti if n not in self.modules})
        modules: dict[str, LoraModule] = {}
        for name in names:
            module = merge_module(name, self.modules, antis, step.lams, step.spec, report)
            if module is None:
                continue
            if max_rank is not None and module.rank > max_rank:
                b, a, error = truncate_factors(*scaled_factors(module, torch.float64), max_rank)
                compute = compute_dtype(module.lora_B.dtype, module.lora_A.dtype)
                module = LoraModule(a.to(compute), b.to(compute), 1.0, module.storage_dtype)
                report.truncation_error[name] = error
            elif max_rank is not None:
                report.truncation_error[name] = 0.0
            modules[name] = module
        return {"modules": modules}

    def layout(self, inputs: Sequence[tuple[str, ResolvedInput]], explicit: bool | None) -> WeightLayout:
        """Whether the modules sit on weights stored (in, out): `explicit`, this config's fan_in_fan_out, then the
        one layout rule of every input (a config.json beside the inputs, then the names, with a warning)."""
        if explicit is None and ("fan_in_fan_out" in self.config or self.fan_in_fan_out):
            flag = self.fan_in_fan_out
            rule = conv1d_transposed if flag else never_transposed
            return WeightLayout(rule, flag, f"adapter_config.json of EXPERT: fan_in_fan_out {str(flag).lower()}")
        return weight_layout(
            [(role, input_config(inp)) for role, inp in inputs],
            dict.fromkeys((weight_key(name) for name in self.modules), None),
            explicit=explicit,
            role=f"EXPERT ({self.source})",
        )

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


LoraAdapter.merged_type = MergedAdapter


def check_scaling(config: dict, where: str) -> None:
    """r and ranks: positive integers (r may be None); alphas: finite numbers; patterns: valid regexes."""

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if config.get("r") is not None and not _is_rank(config["r"]):
        raise AdapterError(f"{where}: r must be a positive integer, got {config['r']!r}")
    if not number(config.get("lora_alpha")):
        raise AdapterError(f"{where}: lora_alpha must be a finite number, got {config.get('lora_alpha')!r}")
    matcher = PatternMatcher(where)
    for name, valid, what in (("rank_pattern", _is_rank, "positive integers"), ("alpha_pattern", number, "numbers")):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where}: {name} must map module patterns to {what}, got {patterns!r}")
        for key, value in patterns.items():
            if not valid(value):
                raise AdapterError(f"{where}: {name}[{key!r}] must be one of {what}, got {value!r}")
            matcher.compile(key, f"{name} key")


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The types PEFT's LoraConfig takes for the fields the merge reads: (field, check, what it must be).
_FIELDS = (
    *(
        (name, lambda v: isinstance(v, bool), "true or false")
        for name in ("use_rslora", "fan_in_fan_out", "inference_mode")
    ),
    *(
        (name, lambda v: isinstance(v, str) or is_names(v), "a list of module names or one regular expression")
        for name in ("target_modules", "exclude_modules")
    ),
    ("modules_to_save", is_names, "a list of module names"),
    ("layers_pattern", lambda v: isinstance(v, str) or is_names(v), "a name or list of names"),
    (
        "layers_to_transform",
        lambda v: _is_index(v) or (isinstance(v, list) and all(map(_is_index, v))),
        "a layer index or a list of them",
    ),
)


def _group(
    weights: Path, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split keys into (module → (lora_A, lora_B)) and the non-LoRA rest; refuse what is not s·B·A."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str | None] = set()
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            for marker, what in _UNSUPPORTED.items():
                if ".lora_" in key and marker in key:
                    raise AdapterError(f"{weights}: {key} is {what}; not supported")
            if ".lora_" in key:
                raise AdapterError(f"{weights}: {key} looks like a LoRA tensor but is not lora_A/lora_B .weight")
            extra[key] = tensor
            continue
        module, part, adapter_name = parsed
        adapter_names.add(adapter_name)
        if part in parts.setdefault(module, {}):
            raise AdapterError(f"{weights}: module {module} has more than one lora_{part} (key {key})")
        parts[module][part] = tensor
    one_adapter(weights, adapter_names)
    if not parts:
        raise AdapterError(f"{weights}: no LoRA tensors (keys ending in lora_A.weight / lora_B.weight)")
    pairs = {}
    for module, found in parts.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part not in found:
                raise AdapterError(f"{weights}: module {module} has lora_{other} but no lora_{part}")
        pairs[module] = (found["A"], found["B"])
    return pairs, extra


def _check_pair(weights: Path, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise AdapterError(
            f"{weights}: module {name} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}; "
            "only 2-D factors (Linear and Conv1D layers) are supported"
        )
    if lora_B.shape[1] != lora_A.shape[0]:
        raise AdapterError(
            f"{weights}: module {name}: lora_B {tuple(lora_B.shape)} and lora_A {tuple(lora_A.shape)} do not "
            "chain; lora_A must be (r, in_features) and lora_B (out_features, r)"
        )
    if lora_A.shape[0] == 0:
        raise AdapterError(
            f"{weights}: module {name} has rank 0 (lora_A {tuple(lora_A.shape)}): its scaling lora_alpha/r is "
            "undefined and PEFT refuses r = 0; drop the module's weights"
        )


class LoraSweep:
    """`merge_adapters` at many λ of one method, bitwise the same: each module's first row-pairing step (scaled
    factors, row sums) is prepared once (docs/design.md §8). Arguments as for `merge_adapters`, checked once."""

    def __init__(
        self,
        expert: LoraAdapter,
        antis: LoraAdapter | Sequence[LoraAdapter],
        method: str = DEFAULT_METHOD,
        *,
        any_base_model: bool = False,
    ):
        self.expert = expert
        self.antis = [antis] if isinstance(antis, LoraAdapter) else list(antis)
        self.method, self.spec = method, method_spec(method)
        # Checks the inputs and fixes the result's modules, which λ does not change.
        self.template = merge_adapters(expert, self.antis, 1.0, method, any_base_model=any_base_model)
        self._first: dict[str, FirstStep] = {}
        for name in self.template.modules if self.spec.pairs_rows else ():
            start = expert.modules.get(name)
            holders = [a.modules[name] for a in self.antis if name in a.modules]
            if start is None or not holders:
                continue
            compute = compute_dtype(*(t.dtype for m in (start, *holders) for t in (m.lora_A, m.lora_B)))
            (b, a), (b_minus, a_minus) = scaled_factors(start, compute), scaled_factors(holders[0], compute)
            self._first[name] = FirstStep(b, a, b_minus, a_minus, factor_row_sums(self.spec, b, a, b_minus, a_minus))

    def to(self, device: torch.device | str) -> "LoraSweep":
        """This sweep with every tensor on `device`, so each λ is merged there (a GPU: no host work per λ)."""
        moved = copy.copy(self)
        moved.expert = _adapter_to(self.expert, device)
        moved.antis = [_adapter_to(a, device) for a in self.antis]
        moved._first = {
            name: FirstStep(
                *(t.to(device) for t in (f.b_plus, f.a_plus, f.b_minus, f.a_minus)),
                tuple(n.to(device) if n is not None else None for n in f.sums),
            )
            for name, f in self._first.items()
        }
        return moved

    def modules(self, lam: float | Sequence[float]) -> dict[str, LoraModule]:
        """The modules of `merge_adapters(expert, antis, lam, method)`, bitwise, in its order."""
        lams = lam_list(lam, len(self.antis))
        scratch = self.expert.new_report(self.method, lams)  # what merge_adapters reports; not kept
        merged = {}
        antis = [a.modules for a in self.antis]
        for name in self.template.modules:
            args = (name, self.expert.modules, antis, lams, self.spec, scratch)
            merged[name] = merge_module(*args, first=self._first.get(name))
        return merged


def _adapter_to(adapter: LoraAdapter, device: torch.device | str) -> LoraAdapter:
    modules = {
        name: LoraModule(m.lora_A.to(device), m.lora_B.to(device), m.scaling, m.storage_dtype)
        for name, m in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=modules)
