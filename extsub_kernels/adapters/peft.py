"""PEFT adapters on disk: files read and checked once here, the shared config fields checked, then `peft_type` picks
the family member (`MEMBERS`, the one registry) that checks the rest and parses the tensors."""

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from extsub_kernels._tensors import nonfinite_summary
from extsub_kernels.adapters.family import OutputFormat, PeftAdapter
from extsub_kernels.adapters.ia3 import IA3Adapter
from extsub_kernels.adapters.lora import LoraAdapter, LoraScaling, check_scaling
from extsub_kernels.adapters.lora import peft_key as peft_key  # re-exported: the benchmarks use it from here
from extsub_kernels.adapters.prefix import PrefixAdapter
from extsub_kernels.constants import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS
from extsub_kernels.errors import AdapterError
from extsub_kernels.io.resolve import read_json_object


def load_adapter(path: str | os.PathLike, *, scaling: LoraScaling | None = None) -> PeftAdapter:
    """Read and validate a PEFT adapter of any supported type (LORA when the config names none, IA3, PREFIX_TUNING).

    A bare file takes the adapter_config.json beside it, or for LoRA weights an explicit `scaling`.

    Args:
        path: a folder with adapter_config.json and adapter_model.safetensors, or a .safetensors file.
        scaling: the scaling of a bare LoRA file that has no config beside it.

    Returns:
        A LoraAdapter (modules keyed by their name in the base model), an IA3Adapter or a PrefixAdapter.

    Raises:
        AdapterError: unreadable or missing files, an unsupported peft_type, non-float tensors, NaN/Inf, tensors the
            config does not describe; for LoRA unpaired or unchained factors, a rank the config contradicts, variants.
    """
    path = Path(path)
    weights, config, config_file = _locate(path, scaling)
    tensors = _read(weights, tensors=True)
    adapter = member_for(_peft_type_of(config)).from_peft(weights, tensors, config, config_file)
    adapter.source = str(path)
    return adapter


def _peft_type_of(config: Mapping) -> str:
    """The config's peft_type, upper case; LORA when it names none (bare LoRA weights with an explicit scaling)."""
    return str(config.get("peft_type") or "LORA").upper()


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
                "lora_alpha= for its .safetensors file (scaling=LoraScaling(lora_alpha, r) in Python)",
                options=("lora_alpha",),
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
            "give lora_alpha= (and r, use_rslora where they apply: scaling=LoraScaling(lora_alpha, r, use_rslora) in "
            "Python)",
            options=("lora_alpha",),
        )
    config = dataclasses.asdict(scaling)
    check_scaling(config, "the explicit scaling")
    return weights, config, "the explicit r"


def _refuse_other_types_without_config(path: Path, weights: Path) -> None:
    """An AdapterError for (IA)³ or prefix-tuning weights without their config, which no flag can stand for."""
    names = _read(weights, tensors=False)
    for kind in MEMBERS:
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
    """Refuse an adapter_config.json that PEFT would refuse or that this merge cannot follow, naming the field."""
    if "peft_type" not in config:
        raise AdapterError(
            f'{where}: peft_type is missing; PEFT needs it to know the adapter type (e.g. "peft_type": "LORA")'
        )
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or member_for(peft_type) is None:
        if isinstance(peft_type, str) and member_for(peft_type.upper()) is not None:
            raise AdapterError(
                f"{where}: peft_type is {peft_type!r}; PEFT spells adapter types in upper case "
                f"({peft_type.upper()!r}) and refuses this one"
            )
        types = ", ".join(member.peft_type for member in MEMBERS)
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; extsub merges {types} adapters")
    task_type = config.get("task_type")
    if task_type is not None and task_type not in _TASK_TYPES:
        raise AdapterError(f"{where}: task_type is {task_type!r}; PEFT accepts {', '.join(_TASK_TYPES)} (or null)")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{where}: base_model_name_or_path must be a string, got {base!r}")
    member_for(peft_type).check_config(config, where)


# What PEFT's TaskType accepts for task_type.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _read(weights: Path, *, tensors: bool) -> dict[str, torch.Tensor] | list[str]:
    """Every tensor of the file, read one at a time and checked (`tensors`), or only its names; a clear error."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())  # a safe_open handle is not iterable itself
            if not tensors:
                return names
            found = {key: handle.get_tensor(key) for key in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from exc
    for key, tensor in found.items():
        _check_values(weights, key, tensor)
    return found


def _check_values(weights: Path, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        if ".lora_" in key:
            raise AdapterError(f"{weights}: {key} has dtype {tensor.dtype}; LoRA factors must be floating point")
        return
    problem = nonfinite_summary(tensor)
    if problem is not None:
        raise AdapterError(f"{weights}: {key} contains {problem}")


# The family: every PEM type, once; every registry is read from this tuple, so adding a type here is all it takes.
MEMBERS: tuple[type[PeftAdapter], ...] = (LoraAdapter, IA3Adapter, PrefixAdapter)


def member_for(peft_type: str) -> type[PeftAdapter] | None:
    """The member that reads adapter configs of `peft_type` (PEFT's spelling, "LORA"), or None."""
    return next((member for member in MEMBERS if member.peft_type == peft_type), None)


def output_formats() -> dict[str, OutputFormat]:
    """Every output format of every member, by the name format= takes, in the members' order."""
    return {f.name: f for member in MEMBERS for f in member.formats}


FORMATS: tuple[str, ...] = tuple(output_formats())  # the built-in format= names (`_names.FORMATS`, without torch)


def owns_adapter_key(key: str) -> bool:
    """Whether a tensor name is one of any PEM type's parameters: how a bare file or folder is known as an adapter."""
    return any(member.owns_key(key) for member in MEMBERS)
