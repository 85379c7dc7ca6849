"""The adapter engine, the adapter half of `merge`: adapters loaded and checked before anything is written, merged in
their own space per λ setting, each output a `LazyOutput` streamed through the engine's one write loop."""

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from extsub_kernels.adapters.factors import check_max_rank
from extsub_kernels.adapters.family import PeftAdapter, check_same_type, merge_adapters
from extsub_kernels.adapters.full_model import full_model_outputs
from extsub_kernels.adapters.lora import LoraAdapter, LoraScaling
from extsub_kernels.adapters.peft import load_adapter, output_formats
from extsub_kernels.adapters.report import AdapterReport, AdapterSection, adapter_items, truncation_summary
from extsub_kernels.adapters.stats import adapter_stats
from extsub_kernels.constants import ADAPTER_CONFIG
from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.dryrun import dry_run_report
from extsub_kernels.engine.notes import OutputKind, card_base_model, output_texts, run_metadata
from extsub_kernels.engine.options import DEFAULT_MAX_SHARD_SIZE, RunOptions, check_choice, parse_size
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.transfer import Transfer
from extsub_kernels.engine.writing import LazyOutput, write_outputs
from extsub_kernels.errors import AdapterError, InputError
from extsub_kernels.io import CheckpointReader, ResolvedInput, is_folder_output

Inputs = Sequence[tuple[str, ResolvedInput]]


@dataclass(frozen=True)
class AdapterOptions:
    """The options only adapter merges have.

    Attributes:
        output_format: LoRA: "lora" (exact factored PEFT adapter), "dense-lora" (lora_B = ΔW', lora_A = I)
            or "delta" (ΔW' keyed by base-model weight names); (IA)³: "ia3"; prefix-tuning: "prefix-tuning".
            None: the type's own PEFT folder (or the full model with a base).
        max_rank: "lora" only: truncate each module to this rank (SVD in the factored space).
        scaling: the scaling of bare adapter files that have no adapter_config.json.
        any_base_model: accept adapters whose base_model_name_or_path differ (shapes are still checked).
    """

    output_format: str | None = None
    max_rank: int | None = None
    scaling: LoraScaling | None = None
    any_base_model: bool = False

    def given(self) -> list[str]:
        """The options that were set, as "--flag (python_name)", to refuse them with dense inputs."""
        flags = [
            (self.output_format is not None, "--format (output_format)"),
            (self.max_rank is not None, "--max-rank (max_rank)"),
            (self.scaling is not None, "--lora-alpha (scaling)"),
            (self.any_base_model, "--any-base-model (any_base_model)"),
        ]
        return [flag for is_set, flag in flags if is_set]

    def checked_format(self, *, base: bool) -> str:
        """The output format of LoRA inputs (default "lora"), after the checks that need no input (InputError)."""
        if self.output_format is not None:
            check_choice(self.output_format, tuple(output_formats()), "output format")
        if base and self.output_format is not None:
            raise InputError(
                f"base= writes the full merged model θ₀ + ΔW'; format={self.output_format} is for adapter outputs, "
                "drop one of them",
                options=("base", "format"),
            )
        if self.max_rank is not None:
            check_max_rank(self.max_rank)
            if base or (self.output_format or "lora") != "lora":
                other = "base=" if base else f"format={self.output_format}"
                raise InputError(
                    f"max_rank= truncates the factored adapter, so it applies to format=lora, not to {other}",
                    options=("max_rank", "format", "base"),
                )
        return self.output_format or "lora"

    def format_for(self, adapter_type: type[PeftAdapter], *, base: bool) -> str:
        """The output format for adapters of `adapter_type` (default: its first), checked against what it writes
        (InputError: those of `checked_format`, a format, max_rank or base= the type cannot take)."""
        default = self.checked_format(base=base)
        if base and adapter_type.base_refusal is not None:
            raise InputError(
                f"base= with {adapter_type.label} adapters: {adapter_type.base_refusal}", options=("base",)
            )
        names = [f.name for f in adapter_type.formats]
        if self.output_format is None:
            default = names[0]
        if default not in names:
            formats = ", ".join([f"{names[0]} (the default)", *names[1:]])
            raise InputError(
                f"format={default} does not apply to {adapter_type.label} adapters; their formats: {formats}",
                options=("format",),
            )
        if self.max_rank is not None and default != "lora":
            raise InputError(
                f"max_rank= truncates LoRA factors; {adapter_type.label} adapters have no rank", options=("max_rank",)
            )
        return default


def shard_limit(out: Path, output_format: str, options: RunOptions, *, base: bool) -> int | None:
    """Largest shard of an adapter merge's output in bytes, None for one weights file: full models and `delta` shard as
    dense outputs do, `dense-lora` only when asked, other adapter folders never (PEFT reads one file)."""
    if not is_folder_output(out):
        if not base and output_format != "delta":
            lora = output_format in (f.name for f in LoraAdapter.formats)
            raise InputError(
                f"OUT {out}: the {output_format} format writes a PEFT adapter folder (adapter_model.safetensors and "
                f"{ADAPTER_CONFIG}); give a folder OUT{', or format=delta for one .safetensors file' if lora else ''}",
                options=("format",),
            )
        return None
    if base or output_format == "delta":
        return options.shard_limit(default=parse_size(DEFAULT_MAX_SHARD_SIZE))
    if options.max_shard_size is None:
        return None
    if output_format != "dense-lora":
        raise InputError(
            f"format={output_format} writes a small adapter, which PEFT reads from one adapter_model.safetensors; "
            "max_shard_size= applies to dense-lora, delta and base= outputs",
            options=("format", "max_shard_size", "base"),
        )
    warnings.warn(
        "--max-shard-size shards the dense-lora adapter (adapter_model-0000i-of-0000n.safetensors and an index); "
        "PEFT's from_pretrained reads only an unsharded adapter_model.safetensors",
        stacklevel=2,
    )
    return options.max_shard_size


def load_inputs(inputs: Inputs, scaling: LoraScaling | None = None) -> list[PeftAdapter]:
    """Load and validate resolved adapter inputs in order, `source` their spec; `scaling` serves LoRA weights without
    an adapter_config.json and is refused if none needs it. AdapterError: a bad adapter, a scaling missing or unused."""
    adapters, used = [], False
    for role, inp in inputs:
        path = inp.files[0] if inp.kind == "file" else inp.root
        has_config = (inp.files[0].parent if inp.kind == "file" else inp.root).joinpath(ADAPTER_CONFIG).is_file()
        if has_config or scaling is None:
            adapter = load_adapter(path)
        elif len(inp.files) != 1:
            raise AdapterError(
                f"{role} {inp.spec}: LoRA weights in {len(inp.files)} files; an adapter is one .safetensors file"
            )
        else:
            adapter = load_adapter(inp.files[0], scaling=scaling)
            used = True
        adapters.append(dataclasses.replace(adapter, source=inp.spec))
    if scaling is not None and not used:
        raise AdapterError(
            f"lora_alpha= (scaling=LoraScaling(...) in Python) gives the scaling of LoRA weights that have no "
            f"{ADAPTER_CONFIG}, but every adapter here has one (a config's scaling is never overridden); drop them",
            options=("lora_alpha",),
        )
    return adapters


def _merge_setting(
    adapters: Sequence[PeftAdapter],
    lams: Sequence[float],
    method: str,
    adapter_options: AdapterOptions,
    *,
    output_format: str,
    base: object,
) -> PeftAdapter:
    """`merge_adapters` for one λ setting, with the non-adapter tensors handled as the output needs."""
    expert, antis = adapters[0], adapters[1:]
    options = dict(max_rank=adapter_options.max_rank, any_base_model=adapter_options.any_base_model)
    if not base and output_format != "delta":
        return merge_adapters(expert, antis, lams, method, **options)
    stripped = [dataclasses.replace(a, extra={}) for a in adapters]
    merged = merge_adapters(stripped[0], stripped[1:], lams, method, **options)
    extra = [f"{a.source}: {key}" for a in adapters for key in a.extra]
    if base:
        merged.report.extra_merged.extend(extra)
    elif extra:
        merged.report.extra_left_out.extend(extra)
        warnings.warn(
            f"{len(extra)} non-LoRA tensors (e.g. {extra[0]}) are full weights (PEFT modules_to_save or trained "
            "biases), not deltas; the delta format leaves them out (give --base to merge them into the full model)",
            stacklevel=2,
        )
    return merged


def run_adapters(
    inputs: Inputs,
    options: RunOptions,
    adapter_options: AdapterOptions,
    paths: Sequence[Path],
    *,
    started: float,
    loaded: Mapping[str, PeftAdapter] | None = None,
    context: RunContext | None = None,
    check_inputs: Callable[[], None] | None = None,
) -> MergeReport:
    """Merge resolved adapter inputs (and a base model) and write one output per λ setting: load → merge → outputs →
    write, in one pass over the base. The caller has checked the paths; mode "dry-run" stops once the outputs are
    planned, "inspect" writes nothing.

    Args:
        inputs: (role, input) pairs: EXPERT, the ANTIs in order, and BASE if given.
        options: λ settings, method, device (where ΔW' = B·A is formed), dtype, shards, force, progress.
        adapter_options: output format, truncation, scaling of bare files, base-model check.
        paths: one output per λ setting (none to inspect).
        started: `time.perf_counter()` at the start of the merge, for the report's seconds.
        loaded: adapters already in memory, by role (their inputs are of kind "memory").
        context: the run's provenance, written into every output and the report.
        check_inputs: runs before the outputs are published; raises when an input changed during the run.
    """
    base = inputs[-1][1] if inputs[-1][0] == "BASE" else None
    adapter_inputs = [(role, inp) for role, inp in inputs if role != "BASE"]
    adapters, output_format = _load(adapter_inputs, adapter_options, loaded or {}, base=base is not None)
    limit = shard_limit(paths[0], output_format, options, base=base is not None) if paths else None
    bytes_read = sum(f.stat().st_size for _, inp in adapter_inputs for f in inp.files)
    merged = [
        _merge_setting(adapters, lams, options.method, adapter_options, output_format=output_format, base=base)
        for lams in options.settings
    ]
    facts = _facts(adapters, merged, [role for role, _ in adapter_inputs], options, context)
    if options.mode == "inspect":
        report = merged[0].report
        counts = dict(tensors=0, merged=len(report.merged), copied=len(report.copied))
        done = dict(bytes_read=bytes_read, bytes_written=0, started=started, peak_gpu_bytes=None, mode="inspect")
        return MergeReport.finished((), **done, **counts, **facts)
    transfer = Transfer(options.device)
    transfer.reset_peak()
    metadata = run_metadata(inputs, options, None if base else output_format, context)
    reader = CheckpointReader(base.files, label="BASE") if base is not None else None
    try:
        if reader is None:
            outputs, kind, computed = _adapter_outputs(adapters, merged, adapter_inputs, output_format, options, facts)
            if adapter_options.max_rank is not None:
                kind = _truncated_kind(kind, adapter_options.max_rank, [m.report for m in merged])
        else:
            outputs, kind, computed, facts["layout"] = full_model_outputs(
                adapters, merged, base, reader, options, is_folder_output(paths[0])
            )
            bytes_read += sum(reader.info(k).nbytes for k in reader)
        notes = output_texts(paths, options, context, kind, facts["stats"])  # card, recipe, noted config.json
        outputs = [dataclasses.replace(o, texts={**o.texts, **n}) for o, n in zip(outputs, notes, strict=True)]
        tensors = len(outputs[0].entries)
        facts.update(tensors=tensors, merged=len(computed), copied=tensors - len(computed))
        if options.mode == "dry-run":
            first = outputs[0]
            return dry_run_report(
                paths,
                first.entries,
                [{"format": "pt", **m} for m in metadata],
                limit,
                first.extra_files,
                list(first.texts),
                bytes_read,
                facts,
                first.weights_name,
            )
        written, bytes_written = write_outputs(
            outputs,
            paths,
            metadata,
            max_shard_size=limit,
            force=options.force,
            progress=options.progress,
            check_inputs=check_inputs,
        )
    finally:
        if reader is not None:
            reader.close()
    done = dict(bytes_read=bytes_read, bytes_written=bytes_written, started=started)
    return MergeReport.finished(written, **done, peak_gpu_bytes=transfer.peak_memory(), **facts)


def _adapter_outputs(
    adapters: Sequence[PeftAdapter],
    merged: Sequence[PeftAdapter],
    inputs: Inputs,
    output_format: str,
    options: RunOptions,
    facts: dict,
) -> tuple[list[LazyOutput], OutputKind, set[str]]:
    """Without a base: each merge in `output_format`, its card kind, the tensors computed; the layout into `facts`."""
    layout = adapters[0].layout(inputs, options.transposed)
    if layout is not None:
        facts["layout"] = layout.reason
        merged = [dataclasses.replace(m, fan_in_fan_out=layout.conv1d) for m in merged]
    written = output_formats()[output_format]
    outputs = [written.make(m, dtype=options.out_dtype, device=options.device) for m in merged]
    base, why = card_base_model(adapters[0].base_model_name_or_path, "the adapters' base model")
    delta = output_format == "delta"
    tags = (adapters[0].tag,) if delta else ("peft", adapters[0].tag)
    kind = OutputKind(written.what, None if delta else "peft", base, tags=tags, base_note=why)
    units = [*merged[0].report.merged, *merged[0].report.added]
    computed = {key for unit in units for key in written.keys(unit)} & {e.name for e in outputs[0].entries}
    return outputs, kind, computed


def _load(
    inputs: Inputs, adapter_options: AdapterOptions, loaded: Mapping[str, PeftAdapter], *, base: bool
) -> tuple[list[PeftAdapter], str]:
    """The adapters in order (one type, sharing a unit) and their output format, after the checks that need them."""
    fresh = iter(load_inputs([(role, inp) for role, inp in inputs if role not in loaded], adapter_options.scaling))
    adapters = [loaded[role] if role in loaded else next(fresh) for role, _ in inputs]
    check_same_type(adapters[0], adapters[1:])
    _check_common_units(adapters, inputs)
    return adapters, adapter_options.format_for(type(adapters[0]), base=base)


def _facts(
    adapters: Sequence[PeftAdapter],
    merged: Sequence[PeftAdapter],
    roles: Sequence[str],
    options: RunOptions,
    context: RunContext | None,
) -> dict:
    """What the report says of the merge whatever is written: items per unit, statistics, the adapter section."""
    report = merged[0].report
    gather = options.stats or options.mode == "inspect"
    shapes = {name: shape for adapter in [*adapters[::-1], merged[0]] for name, shape in adapter.unit_shapes().items()}
    return dict(
        device=str(options.device),
        skipped=0,
        method=options.method,
        settings=options.settings,
        items=tuple(adapter_items(report, shapes, roles)),
        stats=tuple(adapter_stats(adapters, merged, report.merged, roles)) if gather else (),
        context=context,
        adapter=AdapterSection(tuple(m.report for m in merged)),
    )


def _truncated_kind(kind: OutputKind, max_rank: int, reports: Sequence[AdapterReport]) -> OutputKind:
    """A --max-rank output's card: its rank and measured truncation error, and why the table is the exact merge's."""
    notes = []
    for report in reports:
        truncated = sum(error > 0 for error in report.truncation_error.values())
        if not truncated:
            notes.append(f"No module was above rank {max_rank}: nothing was truncated, this is the exact merge.")
            continue
        notes.append(
            f"{truncated} of {len(report.truncation_error)} modules were above rank {max_rank} and were truncated "
            f"to it by an SVD of the exact merge: {truncation_summary([report])} of each module's ΔW'. The relative "
            "change in the table below is the exact merge's (rank r⁺ + r⁻) at this λ, not this adapter's: its ΔW' "
            "differs from the exact merge's by the truncation error."
        )
    what = f"a PEFT LoRA adapter truncated to rank ≤ {max_rank} per module (SVD of the exact rank r⁺ + r⁻ merge)"
    return dataclasses.replace(kind, what=what, notes=tuple(notes))


def _check_common_units(adapters: Sequence[PeftAdapter], inputs: Inputs) -> None:
    """Raise an InputError when no anti-expert shares a module with the expert: nothing would be merged."""
    expert = adapters[0].stat_units()
    antis = [a.stat_units() for a in adapters[1:]]
    if any(name in anti for anti in antis for name in expert):
        return
    (e_role, e_inp), (a_role, a_inp) = inputs[0], inputs[1]
    others = sorted({name for anti in antis for name in anti})
    kind = adapters[0].unit
    raise InputError(
        f"no {adapters[0].label} {kind} is in both {e_role} ({e_inp.spec}) and the anti-expert(s): {e_role} has e.g. "
        f"{next(iter(expert), 'nothing')}, {a_role} ({a_inp.spec}) has e.g. {others[0] if others else 'nothing'}; "
        "there is nothing to merge (are they adapters of the same model and target modules?)"
    )
