"""PEFT adapters on disk: folders and files, the dispatch on `peft_type`, tensor keys, the LoRA scaling, validation.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Every file
is read here the same way (one tensor at a time, floats checked for NaN/Inf), then its
`peft_type` picks the family member that parses it: LoRA here (keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; lora_A is (r, in), lora_B
(out, r) for every layer type, GPT-2's Conv1D included; scaling from r, lora_alpha,
use_rslora, rank_pattern, alpha_pattern), (IA)³ in `ia3.py`, prefix-tuning in `prefix.py`.
"""

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from extsub_kernels._tensors import nonfinite_summary
from extsub_kernels.adapters.family import PEFT_PREFIX, PeftAdapter, peft_fields, strip_peft_prefix
from extsub_kernels.adapters.family import weight_key as weight_key  # re-exported: the formats use it from here
from extsub_kernels.adapters.ia3 import IA3Adapter
from extsub_kernels.adapters.lora import LoraAdapter, LoraModule
from extsub_kernels.adapters.patterns import PatternMatcher, pattern_key, selects
from extsub_kernels.adapters.prefix import PrefixAdapter
from extsub_kernels.constants import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS
from extsub_kernels.errors import AdapterError
from extsub_kernels.io.resolve import read_json_object

# <module>.lora_A.weight, optionally with an adapter-name segment: <module>.lora_A.default.weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# LoRA tensors this path cannot treat as ΔW = s·B·A.
_UNSUPPORTED = {
    "lora_magnitude_vector": "a DoRA magnitude vector (DoRA is not a plain s·B·A update)",
    "lora_embedding_A": "an embedding LoRA (lora_embedding_A/B)",
    "lora_embedding_B": "an embedding LoRA (lora_embedding_A/B)",
    ".bias": "a LoRA bias (lora_bias=True: ΔW is not s·B·A alone)",
}


@dataclass(frozen=True)
class LoraScaling:
    """The scaling of LoRA weights that come without an adapter_config.json (a bare .safetensors file).

    Attributes:
        lora_alpha: PEFT's lora_alpha.
        r: the rank every module must have (None: each module's rank, from its shapes).
        use_rslora: scaling lora_alpha/√r (rsLoRA) instead of lora_alpha/r.
    """

    lora_alpha: float
    r: int | None = None
    use_rslora: bool = False

    def as_config(self) -> dict:
        """The fields of an adapter_config.json that this scaling stands for."""
        return {"lora_alpha": self.lora_alpha, "r": self.r, "use_rslora": self.use_rslora}


def peft_key(module: str, part: str) -> str:
    """The key PEFT saves a module's factor under: `peft_key("m.q", "A")` → `base_model.model.m.q.lora_A.weight`."""
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def parse_peft_key(key: str) -> tuple[str, str, str | None] | None:
    """(module name in the base model, "A" or "B", adapter name or None) of a LoRA key; None otherwise.

    Example:
        >>> parse_peft_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight")
        ('model.layers.0.mlp.up_proj', 'B', 'default')
    """
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    return strip_peft_prefix(match["module"]), match["part"], match["adapter"]


def exact_pattern(module: str) -> str:
    """A rank_pattern/alpha_pattern key that PEFT applies to `module` and to nothing else.

    Example:
        >>> exact_pattern("model.layers.0.mlp.up_proj")
        '^model\\\\.layers\\\\.0\\\\.mlp\\\\.up_proj'
    """
    return "^" + re.escape(module)


def module_scaling(config: Mapping, module: str, rank: int, matcher: PatternMatcher | None = None) -> float:
    """PEFT's scaling of `module`: lora_alpha/r, or lora_alpha/√r with use_rslora; patterns override.

    Example:
        >>> module_scaling({"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}, "layers.0.v_proj", 8)
        0.5
    """
    alphas = config.get("alpha_pattern") or {}
    key = pattern_key(alphas, module, matcher, "alpha_pattern key")
    alpha = alphas[key] if key is not None else config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _configured_rank(config: Mapping, module: str, matcher: PatternMatcher | None = None) -> int | None:
    """The rank the config gives `module` (rank_pattern, else r), or None when the config has no r."""
    ranks = config.get("rank_pattern") or {}
    key = pattern_key(ranks, module, matcher, "rank_pattern key")
    return ranks[key] if key is not None else config.get("r")


def load_adapter(path: str | os.PathLike, *, scaling: LoraScaling | None = None) -> PeftAdapter:
    """Read and validate a PEFT adapter of any supported type: a PEFT folder, or a bare .safetensors file.

    The config's `peft_type` picks the type: LORA (the default when the config has none),
    IA3 or PREFIX_TUNING. A bare file takes its config from an `adapter_config.json` beside
    it; bare LoRA weights may instead come with an explicit `scaling` (its `r`, when given,
    is checked against every module; without it each module's rank comes from its shapes).
    Tensors are read one at a time.

    Args:
        path: a folder with adapter_config.json and adapter_model.safetensors, or a .safetensors file.
        scaling: the scaling of a bare LoRA file that has no config beside it.

    Returns:
        A LoraAdapter (modules keyed by their name in the base model), an IA3Adapter or a PrefixAdapter.

    Raises:
        AdapterError: unreadable or missing files, an unsupported peft_type, non-float tensors,
            NaN/Inf, tensors the config does not describe; for LoRA an A without its B (or a B
            without its A), shapes that do not chain, a rank the config contradicts, or LoRA
            variants this path cannot represent (DoRA, lora_bias, embeddings).

    Example:
        >>> adapter = load_adapter("my_adapter/")  # doctest: +SKIP
        >>> adapter.modules["model.layers.0.self_attn.q_proj"].rank  # doctest: +SKIP
        16
    """
    path = Path(path)
    weights, config, config_file = _locate(path, scaling)
    tensors = _read_tensors(weights)
    adapter = _READERS[_peft_type_of(config)](weights, tensors, config, config_file)
    adapter.source = str(path)
    return adapter


def _peft_type_of(config: Mapping) -> str:
    """The config's peft_type, upper case; LORA when it names none (bare LoRA weights with an explicit scaling)."""
    return str(config.get("peft_type") or "LORA").upper()


def _read_lora(weights: Path, tensors: dict[str, torch.Tensor], config: dict, config_file: str) -> LoraAdapter:
    """The LoRA member's reader: lora_A/lora_B pairs, their ranks checked and scaling taken from the config."""
    pairs, extra = _group(weights, tensors)
    matcher = PatternMatcher(config_file)
    modules = {}
    for name, (lora_A, lora_B) in pairs.items():
        _check_pair(weights, name, lora_A, lora_B)
        if not selects(config, name, matcher):
            raise AdapterError(
                f"{weights}: module {name} has LoRA weights, but {config_file} does not select it (target_modules "
                f"{config.get('target_modules')!r}, exclude_modules, modules_to_save, layers_to_transform): PEFT "
                "puts no LoRA layer there and ignores these weights, so a merge would differ from what PEFT does; "
                "fix target_modules or drop the weights"
            )
        expected = _configured_rank(config, name, matcher)
        if expected is not None and lora_A.shape[0] != expected:
            raise AdapterError(
                f"{weights}: module {name} has rank {lora_A.shape[0]} (lora_A {tuple(lora_A.shape)}) but "
                f"{config_file} gives it r = {expected}; the config does not describe these weights"
            )
        scale = module_scaling(config, name, lora_A.shape[0], matcher)
        if not math.isfinite(scale):
            raise AdapterError(f"{weights}: module {name}: the scaling lora_alpha/r from {config_file} is {scale}")
        modules[name] = LoraModule(lora_A, lora_B, scale)
    return LoraAdapter(
        modules=modules,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        **peft_fields(weights, config, extra),
    )


def _locate(path: Path, scaling: LoraScaling | None) -> tuple[Path, dict, str]:
    """(weights file, config dict, where the config came from) for a folder or a bare file."""
    explicit = scaling is not None
    if path.is_dir():
        weights, config_path = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
        if not weights.is_file():
            if (path / ADAPTER_PICKLE).is_file():
                raise AdapterError(
                    f"{path} holds {ADAPTER_PICKLE}, a pickle file, which is not read (it can run code); convert it: "
                    f"safetensors.torch.save_file(torch.load('{ADAPTER_PICKLE}', weights_only=True), "
                    f"'{ADAPTER_WEIGHTS}')"
                )
            raise AdapterError(f"{path} is not a PEFT adapter folder: {ADAPTER_WEIGHTS} is missing")
        if not config_path.is_file():
            _refuse_other_types_without_config(path, weights)
            raise AdapterError(
                f"{path} has no {ADAPTER_CONFIG}: the LoRA scaling (lora_alpha, r) is unknown; add the config, or give "
                "the scaling of its .safetensors file (--lora-alpha and --rank; scaling=LoraScaling(...) in Python)"
            )
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterError(f"{path}: expected a .safetensors file or a PEFT adapter folder")
        weights, config_path = path, path.parent / ADAPTER_CONFIG
        if not config_path.is_file():
            config_path = None
    else:
        raise AdapterError(f"{path}: no such file or folder")
    if config_path is not None and explicit:
        raise AdapterError(f"{path}: an explicit scaling was given but {config_path} exists; use one source of scaling")
    if config_path is not None:
        return weights, _read_config(config_path), str(config_path)
    _refuse_other_types_without_config(path, weights)
    if scaling is None:
        raise AdapterError(
            f"{path}: a bare adapter file with no {ADAPTER_CONFIG} beside it, so the LoRA scaling is unknown; "
            "give it (--lora-alpha, and --rank / --rslora where they apply; scaling=LoraScaling(...) in Python)"
        )
    config = scaling.as_config()
    _check_scaling_config(config, "the explicit scaling")
    return weights, config, "the explicit r"


def _refuse_other_types_without_config(path: Path, weights: Path) -> None:
    """An AdapterError for (IA)³ or prefix-tuning weights without their config, which no flag can stand for."""
    names = _tensor_names(weights)
    for kind in _MEMBERS:
        if kind.config_needed is not None and any(kind.owns_key(name) for name in names):
            raise AdapterError(
                f"{path}: {kind.label} adapter weights with no {ADAPTER_CONFIG} beside them, so {kind.config_needed} "
                f"is unknown; put the {ADAPTER_CONFIG} the adapter was saved with beside its weights"
            )


def _read_config(config_path: Path) -> dict:
    config = read_json_object(config_path, "adapter config", error=AdapterError)
    _check_config(config, str(config_path))
    return config


def _check_config(config: dict, where: str) -> None:
    """Refuse an adapter_config.json that PEFT would refuse or that this merge cannot follow, naming the field.

    The checks depend on `peft_type`, which PEFT requires (it picks the config class by it,
    in upper case: "LORA"); each supported type has its checker in `CONFIG_CHECKS`.

    Raises:
        AdapterError: naming `where` (the config file), the field, what it holds and what was expected.
    """
    if "peft_type" not in config:
        raise AdapterError(
            f'{where}: peft_type is missing; PEFT needs it to know the adapter type (e.g. "peft_type": "LORA")'
        )
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in CONFIG_CHECKS:
        if isinstance(peft_type, str) and peft_type.upper() in CONFIG_CHECKS:
            raise AdapterError(
                f"{where}: peft_type is {peft_type!r}; PEFT spells adapter types in upper case "
                f"({peft_type.upper()!r}) and refuses this one"
            )
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; extsub merges {', '.join(CONFIG_CHECKS)} adapters")
    _check_common_config(config, where)
    check = CONFIG_CHECKS[peft_type]
    if check is not None:
        check(config, where)


def _check_common_config(config: dict, where: str) -> None:
    """The fields every PEFT config has: task_type as PEFT's TaskType takes it, a base model name."""
    task_type = config.get("task_type")
    if task_type is not None and task_type not in _TASK_TYPES:
        raise AdapterError(f"{where}: task_type is {task_type!r}; PEFT accepts {', '.join(_TASK_TYPES)} (or null)")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{where}: base_model_name_or_path must be a string, got {base!r}")


def _check_lora_config(config: dict, where: str) -> None:
    """A LoRA config: the fields the merge uses and the ones PEFT's LoraConfig and LoRA layers check."""
    for flag, why in (
        ("use_dora", "DoRA rescales each column by a magnitude vector, so ΔW is not s·B·A"),
        ("lora_bias", "a LoRA bias adds to the output, so ΔW is not s·B·A alone"),
        ("alora_invocation_tokens", "aLoRA applies ΔW only after its invocation tokens"),
        ("use_qalora", "QALoRA pools the input before lora_A, so ΔW is not s·B·A"),
        ("target_parameters", "LoRA on parameters (target_parameters) is not a per-module s·B·A update"),
    ):
        if config.get(flag):
            raise AdapterError(f"{where}: {flag} is set; not supported: {why}")
    for field_name in ("r", "lora_alpha"):
        if field_name not in config:
            raise AdapterError(
                f"{where}: {field_name!r} is missing, so the LoRA scaling is unknown (PEFT would assume its default, "
                f"8); write the value the adapter was trained with"
            )
    if not _is_rank(config["r"]):
        raise AdapterError(f"{where}: r must be a positive integer (PEFT refuses anything else), got {config['r']!r}")
    _check_scaling_config(config, where)
    for name in ("use_rslora", "fan_in_fan_out", "inference_mode"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise AdapterError(f"{where}: {name} must be true or false, got {config[name]!r}")
    for name in ("target_modules", "exclude_modules"):
        if not _is_names(config.get(name), allow_str=True):
            raise AdapterError(
                f"{where}: {name} must be a list of module names or one regular expression, got {config[name]!r}"
            )
    if not _is_names(config.get("modules_to_save"), allow_str=False):
        raise AdapterError(f"{where}: modules_to_save must list module names, got {config['modules_to_save']!r}")
    if not _is_names(config.get("layers_pattern"), allow_str=True):
        raise AdapterError(f"{where}: layers_pattern must be a name or list of names, got {config['layers_pattern']!r}")
    indexes = config.get("layers_to_transform")
    if indexes is not None and not (_is_index(indexes) or (isinstance(indexes, list) and all(map(_is_index, indexes)))):
        raise AdapterError(f"{where}: layers_to_transform must be a layer index or a list of them, got {indexes!r}")
    if isinstance(config.get("target_modules"), str) and (indexes is not None or config.get("layers_pattern")):
        raise AdapterError(
            f"{where}: layers_to_transform and layers_pattern cannot be used with a target_modules regular expression "
            "(PEFT refuses the config)"
        )
    if config.get("layers_pattern") and indexes is None:
        raise AdapterError(f"{where}: layers_pattern needs layers_to_transform (PEFT refuses the config)")
    bias = config.get("bias")
    if bias is not None and bias not in ("none", "all", "lora_only"):
        raise AdapterError(f"{where}: bias is {bias!r}; PEFT accepts none, all, lora_only (or null)")


# What PEFT's TaskType accepts for task_type.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_names(value: object, *, allow_str: bool) -> bool:
    """None, a list of strings, or (with `allow_str`) one string."""
    if value is None or (allow_str and isinstance(value, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_scaling_config(config: dict, where: str) -> None:
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


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, read one at a time with safe_open and checked; a clear error if unreadable."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable itself
            tensors = {key: handle.get_tensor(key) for key in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from exc
    for key, tensor in tensors.items():
        _check_values(weights, key, tensor)
    return tensors


def _tensor_names(weights: Path) -> list[str]:
    """The tensor names of a file (its header only); a clear error if unreadable."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from exc


def _group(
    weights: Path, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split keys into (module → (lora_A, lora_B)) and the non-LoRA rest; refuse what is not s·B·A."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
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
        if adapter_name is not None:
            adapter_names.add(adapter_name)
        if part in parts.setdefault(module, {}):
            raise AdapterError(f"{weights}: module {module} has more than one lora_{part} (key {key})")
        parts[module][part] = tensor
    if len(adapter_names) > 1:
        raise AdapterError(
            f"{weights}: holds several adapters ({', '.join(sorted(adapter_names))}); save one adapter per file"
        )
    if not parts:
        raise AdapterError(f"{weights}: no LoRA tensors (keys ending in lora_A.weight / lora_B.weight)")
    pairs = {}
    for module, found in parts.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part not in found:
                raise AdapterError(f"{weights}: module {module} has lora_{other} but no lora_{part}")
        pairs[module] = (found["A"], found["B"])
    return pairs, extra


def _check_values(weights: Path, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        if ".lora_" in key:
            raise AdapterError(f"{weights}: {key} has dtype {tensor.dtype}; LoRA factors must be floating point")
        return
    problem = nonfinite_summary(tensor)
    if problem is not None:
        raise AdapterError(f"{weights}: {key} contains {problem}")


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


# The family, one entry per PEM type: its reader, (weights file, its tensors, config, where it came from) →
# adapter, and its config check after the common one (None: its reader checks its own fields).
_MEMBERS = {
    LoraAdapter: (_read_lora, _check_lora_config),
    IA3Adapter: (IA3Adapter.from_peft, None),
    PrefixAdapter: (PrefixAdapter.from_peft, None),
}
MEMBERS: tuple[type[PeftAdapter], ...] = tuple(_MEMBERS)
FORMATS: tuple[str, ...] = tuple(f for member in MEMBERS for f in member.formats)  # every --format
_READERS = {member.peft_type: read for member, (read, _check) in _MEMBERS.items()}  # by the config's peft_type
CONFIG_CHECKS = {member.peft_type: check for member, (_read, check) in _MEMBERS.items()}
