"""The full merged model θ₀ + ΔW' from LoRA adapters and their base model (`--base`), tensor by tensor.

Every tensor of the base model is read once; a weight with a LoRA module gets that module's
ΔW' added in float32 (float64 for float64 inputs) on the compute device, is cast back to its
dtype and written; tensors with nothing to add are copied. Rows of ΔW' are output features,
so a weight the base stores (in, out) — GPT-2's Conv1D, PEFT's fan_in_fan_out — gets ΔW'ᵀ,
shaped by the `delta` format's own `formats.module_delta`.

Non-LoRA tensors of the adapters (PEFT's `modules_to_save`, and biases trained with
bias="all"/"lora_only") are full weights that PEFT puts in place of the base model's, not
deltas. With θ₀ at hand they are what a full fine-tuned model is, so they merge as the dense
engine merges full models (`apply_method` with base=θ₀): ΔW = θ − θ₀ per input, θ₀ + ΔW' out. A
tensor only the expert has is then the expert's own; one only anti-experts have contributes
nothing under ext-sub (|p| = 0) and ∓λ·(θ⁻ − θ₀) under sub/add, as LoRA modules do.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from extsub_kernels._tensors import all_finite, compute_dtype, is_float, nonfinite_summary
from extsub_kernels.adapters.formats import module_delta
from extsub_kernels.adapters.lora import LoraAdapter, LoraModule
from extsub_kernels.adapters.peft import strip_peft_prefix, weight_key
from extsub_kernels.engine.architecture import TransposedRule
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.outputs import LazyOutput
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, TensorEntry


@dataclass(frozen=True)
class BaseTarget:
    """What lands on one base tensor: a LoRA module's ΔW', or full weights of the adapters (or both absent: a copy).

    `transposed`: the base stores the weight (in, out), so ΔW' is added transposed (modules)
    or columns are paired (full weights, as the dense engine pairs Conv1D weights).
    """

    key: str
    module: str | None = None
    transposed: bool = False
    expert: torch.Tensor | None = None  # the expert's full weight
    antis: tuple[tuple[int, torch.Tensor], ...] = field(default=())  # (anti-expert index, its full weight)


def match_targets(
    modules: dict[str, LoraModule],
    base: CheckpointReader,
    *,
    fan_in_fan_out: bool,
    conv1d: TransposedRule,
    expert_extra: dict[str, torch.Tensor],
    anti_extras: Sequence[dict[str, torch.Tensor]],
    sources: Sequence[str],
) -> dict[str, BaseTarget]:
    """Each LoRA module and each non-LoRA tensor matched to the base tensor it changes, shapes checked.

    A name matches the base tensor of the same name, or else the one base tensor it equals up
    to leading prefixes (`transformer.h.0.attn.c_attn.weight` ↔ `h.0.attn.c_attn.weight`,
    as checkpoints saved without the model's head prefix have it).

    Args:
        modules: the merged adapter's modules (one λ setting stands for all: modules do not depend on λ).
        base: the base model θ₀.
        fan_in_fan_out: the expert's flag; with `conv1d` (from the base's config.json) it says which
            weights are stored (in, out).
        expert_extra, anti_extras: non-LoRA tensors of the expert and of each anti-expert.
        sources: names of the expert and the anti-experts, for messages.

    Raises:
        InputError: a module or tensor with no (or no unique) base tensor, a shape that does
            not fit, or a LoRA module on a non-float weight.
    """
    targets: dict[str, BaseTarget] = {}
    for name, module in modules.items():
        key = _base_key(weight_key(name), base, f"LoRA module {name}")
        info = base.info(key)
        transposed = fan_in_fan_out or conv1d(key, info.shape)
        shape = (module.in_features, module.out_features) if transposed else (module.out_features, module.in_features)
        if info.shape != shape:
            raise InputError(
                f"LoRA module {name}: ΔW' is {module.out_features}×{module.in_features} (out×in), "
                f"laid out {list(shape)}{' as Conv1D stores it' if transposed else ''}, but BASE's {key} is "
                f"{list(info.shape)}; is BASE the model the adapters were trained on?"
            )
        if not is_float(info.dtype):
            raise InputError(
                f"LoRA module {name}: BASE's {key} is {info.dtype}; ΔW' can only be added to float weights"
            )
        targets[key] = BaseTarget(key, module=name, transposed=transposed)
    full: dict[str, dict[int, torch.Tensor]] = {}
    for index, extra in enumerate([expert_extra, *anti_extras]):
        for adapter_key, tensor in extra.items():
            key = _base_key(strip_peft_prefix(adapter_key), base, f"{sources[index]}: tensor {adapter_key}")
            if key in targets:
                raise InputError(
                    f"{sources[index]}: {adapter_key} is a full weight of {key}, which a LoRA module also adapts"
                )
            info = base.info(key)
            if tuple(tensor.shape) != info.shape:
                raise InputError(
                    f"{sources[index]}: {adapter_key} is {list(tensor.shape)} but BASE's {key} is {list(info.shape)}; "
                    "is BASE the model the adapters were trained on?"
                )
            full.setdefault(key, {})[index] = tensor
    for key, by_input in full.items():
        antis = tuple((i, t) for i, t in sorted(by_input.items()) if i > 0)
        targets[key] = BaseTarget(
            key, transposed=conv1d(key, base.info(key).shape), expert=by_input.get(0), antis=antis
        )
    return targets


def _base_key(key: str, base: CheckpointReader, what: str) -> str:
    if key in base:
        return key
    found = [k for k in base if key.endswith("." + k) or k.endswith("." + key)]
    if len(found) == 1:
        return found[0]
    if found:
        raise InputError(f"{what}: BASE has several tensors it could be ({', '.join(found[:4])}); cannot tell which")
    raise InputError(
        f"{what}: BASE has no tensor {key!r} (nor one that matches it up to a prefix); "
        "is BASE the model the adapters were trained on?"
    )


def full_model_outputs(
    merged: Sequence[LoraAdapter],
    settings: Sequence[tuple[float, ...]],
    base: CheckpointReader,
    targets: dict[str, BaseTarget],
    *,
    method: str,
    out_dtype: torch.dtype | None,
    device: torch.device,
    extra_files: Sequence[Path] = (),
) -> list[LazyOutput]:
    """One lazy output per λ setting: every base tensor, in the base's order, with its target applied.

    All outputs load a tensor of θ₀ through the same reader call, so `write_outputs` reads the
    base once for every output.

    Args:
        merged: the merged adapter of each setting.
        settings: λ per anti-expert, one tuple per output.
        base: θ₀.
        targets: from `match_targets`.
        method: "ext-sub", "sub" or "add" (for the full weights).
        out_dtype: the dtype of float tensors in the output; None keeps the base's.
        device: where ΔW' is computed and added.
        extra_files: the base's config, generation and tokenizer files (folder outputs).
    """
    entries = []
    for key in base:
        info = base.info(key)
        entries.append(
            TensorEntry(key, out_dtype if out_dtype is not None and is_float(info.dtype) else info.dtype, info.shape)
        )
    dtypes = {e.name: e.dtype for e in entries}
    outputs = []
    for adapter, lams in zip(merged, settings, strict=True):
        produce = partial(
            _produce,
            adapter=adapter,
            lams=lams,
            targets=targets,
            dtypes=dtypes,
            method=method,
            device=device,
            base=base,
        )
        outputs.append(LazyOutput(entries, produce, load=base.read, extra_files=extra_files))
    return outputs


def _produce(
    key: str,
    theta0: torch.Tensor,
    *,
    adapter: LoraAdapter,
    lams: tuple[float, ...],
    targets: dict[str, BaseTarget],
    dtypes: dict[str, torch.dtype],
    method: str,
    device: torch.device,
    base: CheckpointReader,
) -> torch.Tensor:
    """Base tensor `key` of the output: θ₀ + ΔW' (a module), the merged full weight, or θ₀ copied."""
    out = dtypes[key]
    target = targets.get(key)
    if target is None:
        return theta0.to(out)
    if target.module is None and (not target.antis or not theta0.is_floating_point()):
        return (target.expert if target.expert is not None else theta0).to(out)  # the expert's own, or θ₀
    module = adapter.modules[target.module] if target.module else None
    inputs = [theta0.dtype] + ([module.lora_A.dtype, module.lora_B.dtype] if module else [])
    compute = compute_dtype(*inputs)
    theta0_dev = theta0.to(device)
    if module is not None:  # out of place: θ₀ is shared by every output
        result = theta0_dev.to(compute) + module_delta(
            module, dtype=compute, transposed=target.transposed, device=device
        )
    else:
        plus = target.expert.to(device) if target.expert is not None else theta0_dev
        minus = [t.to(device) for _, t in target.antis]
        lams_used = [lams[i - 1] for i, _ in target.antis]
        result = apply_method(
            plus, minus, lams_used, method=method, base=theta0_dev, out_dtype=compute, transposed=target.transposed
        )
    result = result.to(out)
    if not all_finite(result):
        where = base.info(key).path.name
        problem = nonfinite_summary(theta0)
        if problem is not None:
            raise InputError(f"tensor {key!r} in BASE ({where}) contains {problem}; the merge needs finite weights")
        raise InputError(
            f"tensor {key!r}: the merged weight overflows {out} at λ={list(lams)}; use a smaller λ or --dtype float32"
        )
    return result.cpu()
