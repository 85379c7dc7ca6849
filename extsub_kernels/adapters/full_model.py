"""The full merged model from adapters and their base model (`base=`), each base tensor read once: a module folded in
by its type's `fold`, the adapters' non-adapter tensors (full weights) merged as the dense engine merges full models
(ΔW = θ − θ₀), the rest copied."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from extsub_kernels._tensors import all_finite, compute_dtype, is_float, nonfinite_summary
from extsub_kernels.adapters.family import BaseEdit, PeftAdapter, base_tensor_name
from extsub_kernels.constants import ADAPTER_CONFIG, MODEL_CONFIG
from extsub_kernels.engine.conv1d import TransposedRule, input_config, weight_layout
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.notes import OutputKind, card_base_model
from extsub_kernels.engine.options import RunOptions
from extsub_kernels.engine.writing import LazyOutput
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorEntry


@dataclass(frozen=True)
class BaseTarget:
    """What lands on one base tensor: an adapter module folded in, or the adapters' full weights; `transposed`: the
    base stores it (in, out)."""

    key: str
    edit: BaseEdit | None = None
    transposed: bool = False
    expert: torch.Tensor | None = None  # the expert's full weight
    antis: tuple[tuple[int, torch.Tensor], ...] = field(default=())  # (anti-expert index, its full weight)


def _match_targets(
    adapter: PeftAdapter, base: CheckpointReader, conv1d: TransposedRule, adapters: Sequence[PeftAdapter]
) -> dict[str, BaseTarget]:
    """Each base tensor a module of `adapter` changes, and each non-adapter tensor of `adapters`, matched to the base
    (exactly or up to a leading prefix), shapes checked; `conv1d`: which weights the base stores (in, out)."""
    targets: dict[str, BaseTarget] = {}
    what = f"{adapter.label} {adapter.unit}"
    for edit in adapter.base_edits():
        key = _base_key(edit.name, base, f"{what} {edit.module}", optional=edit.optional)
        if key is None:
            continue
        info = base.info(key)
        transposed = len(edit.shape) == 2 and (getattr(adapter, "fan_in_fan_out", False) or conv1d(key, info.shape))
        if not edit.fits(info.shape, transposed=transposed):
            laid_out = edit.shape[::-1] if transposed else edit.shape
            shape = "×".join("any" if n is None else str(n) for n in laid_out)
            raise InputError(
                f"{what} {edit.module}: changes a {shape} tensor{' (as Conv1D stores it)' if transposed else ''}, "
                f"but BASE's {key} is {list(info.shape)}; is BASE the model the adapters were trained on?"
            )
        if not is_float(info.dtype):
            raise InputError(f"{what} {edit.module}: BASE's {key} is {info.dtype}; it can only change float weights")
        targets[key] = BaseTarget(key, edit=edit, transposed=transposed)
    full: dict[str, dict[int, torch.Tensor]] = {}
    for index, source in enumerate(adapters):
        for adapter_key, tensor in source.extra.items():
            key = _base_key(base_tensor_name(adapter_key), base, f"{source.source}: tensor {adapter_key}")
            if key in targets:
                raise InputError(f"{source.source}: {adapter_key} is a full weight of {key}, which {what} also changes")
            info = base.info(key)
            if tuple(tensor.shape) != info.shape:
                raise InputError(
                    f"{source.source}: {adapter_key} is {list(tensor.shape)} but BASE's {key} is {list(info.shape)}; "
                    "is BASE the model the adapters were trained on?"
                )
            full.setdefault(key, {})[index] = tensor
    for key, by_input in full.items():
        antis = tuple((i, t) for i, t in sorted(by_input.items()) if i > 0)
        targets[key] = BaseTarget(
            key, transposed=conv1d(key, base.info(key).shape), expert=by_input.get(0), antis=antis
        )
    return targets


def _base_key(key: str, base: CheckpointReader, what: str, *, optional: bool = False) -> str | None:
    """The base tensor `key` names (exactly, or up to a leading prefix); None for an optional one BASE lacks."""
    if key in base:
        return key
    found = [k for k in base if key.endswith("." + k) or k.endswith("." + key)]
    if len(found) == 1:
        return found[0]
    if found:
        raise InputError(f"{what}: BASE has several tensors it could be ({', '.join(found[:4])}); cannot tell which")
    if optional:
        return None
    raise InputError(
        f"{what}: BASE has no tensor {key!r} (nor one that matches it up to a prefix); "
        "is BASE the model the adapters were trained on?"
    )


def full_model_outputs(
    adapters: Sequence[PeftAdapter],
    merged: Sequence[PeftAdapter],
    base: ResolvedInput,
    reader: CheckpointReader,
    options: RunOptions,
    folder: bool,
) -> tuple[list[LazyOutput], OutputKind, set[str], str]:
    """The full merged model of each λ setting, every tensor of `base` in order (read once for all outputs); what it
    is for the card, the tensors computed, the layout's reason. A `folder` output gets the base's config files."""
    shapes = {k: reader.info(k).shape for k in reader}
    layout = weight_layout(
        [("BASE", input_config(base))], shapes, explicit=options.transposed, role=f"BASE ({base.spec})"
    )
    targets = _match_targets(merged[0], reader, layout.rule, adapters)
    config = base.config_file(MODEL_CONFIG) if folder else None
    extra_files = [p for p in base.config_files if p.name not in (ADAPTER_CONFIG, MODEL_CONFIG)] if folder else []
    entries = []
    for key in reader:
        info = reader.info(key)
        out_dtype = options.out_dtype if options.out_dtype is not None and is_float(info.dtype) else info.dtype
        entries.append(TensorEntry(key, out_dtype, info.shape))
    dtypes = {e.name: e.dtype for e in entries}
    outputs = [
        LazyOutput(
            entries,
            partial(_produce, adapter, lams, targets, dtypes, options.method, options.device, reader),
            load=reader.read,
            extra_files=extra_files,
        )
        for adapter, lams in zip(merged, options.settings, strict=True)
    ]
    base_id, why = card_base_model(base.spec, "BASE")
    card = "transformers" if config else None
    kind = OutputKind("the full merged model θ₀ + ΔW'", card, base_id, config, base_note=why)
    return outputs, kind, set(targets), layout.reason


def _produce(
    adapter: PeftAdapter,
    lams: tuple[float, ...],
    targets: dict[str, BaseTarget],
    dtypes: dict[str, torch.dtype],
    method: str,
    device: torch.device,
    base: CheckpointReader,
    key: str,
    theta0: torch.Tensor,
) -> torch.Tensor:
    """Base tensor `key` of the output: a module folded in, the merged full weight, or θ₀ copied."""
    out = dtypes[key]
    target = targets.get(key)
    if target is None:
        return theta0.to(out)
    if target.edit is None and (not target.antis or not theta0.is_floating_point()):
        return (target.expert if target.expert is not None else theta0).to(out)  # the expert's own, or θ₀
    if target.edit is not None:  # out of place: θ₀ is shared by every output
        result = adapter.fold(target.edit, theta0, transposed=target.transposed, device=device)
    else:
        theta0_dev = theta0.to(device)
        plus = target.expert.to(device) if target.expert is not None else theta0_dev
        minus = [t.to(device) for _, t in target.antis]
        lams_used = [lams[i - 1] for i, _ in target.antis]
        compute = compute_dtype(theta0.dtype)
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
            f"tensor {key!r}: the merged weight overflows {out} at λ={list(lams)}; use a smaller λ or dtype=float32",
            options=("dtype",),
        )
    return result.cpu()
