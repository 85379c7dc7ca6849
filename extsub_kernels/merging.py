"""`merge()`: one validated `RunSpec`, the inputs resolved, routed to the dense engine (`engine.dense`: block by block
through the op) or the adapter engine (`adapters.run`: exactly, in their own space), one `MergeReport`."""

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from extsub_kernels._names import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_LAM, DEFAULT_ON_MISSING, DtypeName, OnMissing
from extsub_kernels.adapters import AdapterOptions, PeftAdapter, owns_adapter_key, run_adapters
from extsub_kernels.engine import MergeReport, RunOptions, run_dense
from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.conv1d import full_model_hint
from extsub_kernels.engine.method_spec import DEFAULT_METHOD
from extsub_kernels.engine.options import (
    DTYPE_NAMES,
    Lam,
    input_roles,
    lam_labels,
    out_dtype,
    parse_lams,
    parse_size,
    resolve_device,
    warn_negative_lams,
)
from extsub_kernels.engine.record import report_record, write_json
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import ResolvedInput, check_outputs, is_folder_output, output_paths, resolve_input
from extsub_kernels.io.atomic import remove, reserve_temp, terminate_as_interrupt
from extsub_kernels.io.identity import InputSnapshot
from extsub_kernels.io.outputs import check_report_path, is_stream, out_path
from extsub_kernels.io.provenance import fingerprint, pinned_spec

Source = str | os.PathLike | PeftAdapter


def merge(
    expert: Source,
    anti: Source | Sequence[Source],
    out: str | os.PathLike,
    *,
    lam: Lam = DEFAULT_LAM,
    method: str = DEFAULT_METHOD,
    base: str | os.PathLike | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
    dtype: DtypeName | torch.dtype = DEFAULT_DTYPE,
    max_shard_size: int | str | None = None,
    on_missing: OnMissing = DEFAULT_ON_MISSING,
    force: bool = False,
    progress: bool = False,
    block_bytes: int | None = None,
    adapter: AdapterOptions | None = None,
    transposed: bool | None = None,
    dry_run: bool = False,
    stats: bool | None = None,
    report: str | os.PathLike | None = None,
    command: str | None = None,
    reads: Sequence[str | os.PathLike] = (),
    card_note: str = "",
) -> MergeReport:
    """Merge checkpoints or PEFT adapters with Ext-Sub, streamed: θ' = θ⁺ ⊖ θ₁⁻ ⊖ θ₂⁻ ...

    Dense inputs stream block by block through the op; PEFT adapters merge exactly in their own space (docs/design.md
    §3, §6). The inputs are all dense or all adapters of one type (BASE is always a full model).

    Args:
        expert: θ⁺: a .safetensors file, a folder of shards, a PEFT adapter folder, a hub id `org/name[@revision]`,
            or an adapter already loaded (LoraAdapter, IA3Adapter, PrefixAdapter).
        anti: θ⁻, one or several (applied in order, paper Table 4), same forms as `expert`.
        out: a path ending in .safetensors (one file) or a folder (model.safetensors, or shards and an index past
            `max_shard_size`; adapter outputs are PEFT folders). Folder outputs also get a model card (README.md)
            and their recipe (extsub_recipe.yaml).
        lam: λ. A number; a list of numbers (one output per λ, OUT suffixed `-lam<λ>`); a per-anti-expert list
            inside the list (`[[1.0, 0.5]]`); or the CLI's string form "0.5,1" / "1:0.5" (`lam_items`). A negative
            λ is allowed, with a warning.
        method: ext-sub (θ⁺ − λ·Ext(θ⁻)), sub (θ⁺ − λθ⁻), add (θ⁺ + λθ⁻), or any registered one (`engine.method_spec`).
        base: θ₀, a full model. Dense inputs are then full models, ΔW = θ − θ₀, and OUT is θ₀ + ΔW' (a folder OUT
            gets the expert's config and tokenizer files). With LoRA or (IA)³ inputs OUT is θ₀ with the merged
            adapter folded in (a folder OUT gets the base's config files); prefix-tuning changes no weight and is
            refused.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: output dtype of float tensors: "keep" (the inputs'), "float16", "bfloat16", "float32" (or the torch
            dtype). With a base, the copied config.json says it too.
        max_shard_size: largest shard of a folder OUT, bytes or "5GB" (default 5GB).
        on_missing: keys only in an anti-expert: "error" (list them), "copy", "skip".
        force: replace an existing OUT (and an existing `report` file).
        progress: show a progress bar (stderr).
        block_bytes: target bytes of a streamed block of rows; host and device memory are a fixed multiple of it
            (None: 2 MiB on CPU, 32 MiB on CUDA).
        adapter: options of adapter merges (output format, max_rank, scaling of bare LoRA files, any_base_model);
            refused with dense inputs.
        transposed: GPT-2 Conv1D-named weights (c_attn, c_proj, c_fc, q_attn) are stored (in, out) (True) or
            (out, in) (False); None decides from config.json, else key names and shapes.
        dry_run: plan from the headers and return what would be written, writing nothing.
        stats: gather the row statistics of each merged tensor or module (cos(p, m), deficiency share, relative
            change; docs/design.md §7); None: when a folder output's model card or a `report` needs them.
        report: write the run's JSON record to this file ("-": stdout) once it is done.
        command: the command line to record in the outputs (default: the equivalent extsub-merge command).
        reads: other files the run has read (the recipe it came from): no output may be written over one.
        card_note: Markdown the model card of each folder output adds after how it was made (extsub-scan's
            --save-best: how λ was chosen).

    Returns:
        A MergeReport.

    Raises:
        InputError: bad inputs or arguments (nothing is written).
        MergeError, OSError: a failure while streaming, or an input that changed during the run (nothing is left).
        KeyboardInterrupt: Ctrl-C (SIGTERM too, as `Terminated`, while the merge runs): nothing is left behind,
            unless it came while the outputs were being moved into place; then it is raised once all of them are,
            with the outputs in its `published`.
    """
    mode = "dry-run" if dry_run else "merge"
    return execute(RunSpec.create(**locals()))  # every argument as given, and the mode


@dataclass(frozen=True)
class RunSpec:
    """One run, validated once (inputs, λ settings, method, device, dtype, outputs): built by `merge()` and
    `inspect()`, run by `execute`."""

    sources: tuple[Source, ...]
    out: Path | None  # None: statistics only (mode "inspect")
    options: RunOptions
    recipe_options: dict  # dtype and max_shard_size as the caller spelled them (the recipe's)
    started: float
    adapter: AdapterOptions
    base: str | os.PathLike | None = None
    report: str | os.PathLike | None = None
    command: str | None = None
    reads: Sequence[str | os.PathLike] = ()
    card_note: str = ""

    @classmethod
    def create(
        cls, expert: Source, anti: Source | Sequence[Source], out: str | os.PathLike | None, **given
    ) -> "RunSpec":
        """The spec of `merge()`'s or `inspect()`'s keyword arguments; those not given take the defaults."""
        started = time.perf_counter()
        out = out_path(out) if out is not None else None
        sources = source_list(expert, anti)
        dtype, shard, stats = given.pop("dtype", DEFAULT_DTYPE), given.pop("max_shard_size", None), given.pop("stats")
        if shard is not None and out is not None and not is_folder_output(out):
            raise InputError(
                f"OUT {out} is one .safetensors file; give a folder OUT to shard it with max_shard_size=",
                options=("max_shard_size",),
            )
        max_shard_size = parse_size(shard) if shard is not None else None
        fields = {key: given.pop(key) for key in ("base", "report", "command", "reads", "card_note") if key in given}
        adapter = given.pop("adapter") or AdapterOptions()
        given.pop("dry_run", None)  # merge()'s, said by its mode
        options = RunOptions(
            settings=tuple(parse_lams(given.pop("lam"), len(sources) - 1)),
            device=resolve_device(given.pop("device")),
            out_dtype=out_dtype(dtype),
            max_shard_size=max_shard_size,
            mode=given.pop("mode"),
            stats=((out is not None and is_folder_output(out)) or fields.get("report") is not None)
            if stats is None
            else bool(stats),
            **given,  # method, on_missing, force, progress, block_bytes, transposed
        )
        names = {"dtype": dtype if isinstance(dtype, str) else DTYPE_NAMES.get(dtype), "max_shard_size": shard}
        return cls(tuple(sources), out, options, names, started, adapter, **fields)

    def recipe(self, inputs: Sequence[tuple[str, ResolvedInput]]) -> dict:
        """The options that shape the outputs, under recipe keys, inputs pinned (hub commits, absolute paths)."""
        pinned = {role: pinned_spec(inp) for role, inp in inputs}
        options, adapter, scaling = self.options, self.adapter, self.adapter.scaling
        return {
            "expert": pinned["EXPERT"],
            "anti": [spec for role, spec in pinned.items() if role.startswith("ANTI")],
            "base": pinned.get("BASE"),
            "method": options.method,
            "device": options.device.type,
            **self.recipe_options,
            "on_missing": options.on_missing,
            "transposed": options.transposed,
            "format": adapter.output_format,
            "max_rank": adapter.max_rank,
            "lora_alpha": scaling.lora_alpha if scaling else None,
            "rank": scaling.r if scaling else None,
            "rslora": scaling.use_rslora if scaling else None,
            "any_base_model": adapter.any_base_model or None,
        }

    def record(self, recipe: dict) -> dict:
        """Every option of the run for the report: the recipe's, the λ settings and how the run was driven."""
        options = self.options
        return {
            **recipe,
            "lam": [list(s) for s in options.settings],
            "out": str(self.out) if self.out is not None else None,
            "force": options.force,
            "dry_run": options.mode == "dry-run",
            "stats": options.stats,
            "block_bytes": options.block_bytes,
            "report": os.fspath(self.report) if self.report is not None else None,
        }


def execute(spec: RunSpec) -> MergeReport:
    """Resolve and fingerprint the inputs, check the outputs, route to the dense or the adapter engine, report."""
    options, adapter, out, report_path = spec.options, spec.adapter, spec.out, spec.report
    warn_negative_lams(options.settings, options.method)
    adapter.checked_format(base=spec.base is not None)
    inputs, loaded = _resolve_all(spec.sources, spec.base, quiet=not options.progress)
    snapshot = InputSnapshot(inputs)
    paths = output_paths(out, lam_labels(options.settings)) if out is not None else []
    recipe = spec.recipe(inputs)
    fingerprints, where = [fingerprint(role, inp) for role, inp in inputs], str(out) if out else None
    context = RunContext.create(
        fingerprints, recipe, where, spec.command, options=spec.record(recipe), card_note=spec.card_note
    )
    is_adapter = adapter_inputs(inputs)
    if not is_adapter and adapter.given():
        role, inp = inputs[0]
        raise InputError(f"{adapter.given()[0]} applies to adapter inputs; {role} {inp.spec!r} is a dense checkpoint")
    read = [(f"the file {os.fspath(p)}", Path(p)) for p in spec.reads]
    check_outputs(paths, inputs, force=options.force, read=read)
    if report_path is not None and os.fspath(report_path) != "-":
        check_report_path(Path(report_path), inputs, paths, force=options.force, read=read)
        if not is_stream(Path(report_path)):
            remove(reserve_temp(Path(report_path), folder=False))  # its folder takes files: known before any work
    if not is_adapter and spec.base is None and (hint := full_model_hint(inputs, inspecting=out is None)):
        warnings.warn(hint, stacklevel=3)
    run = dict(started=spec.started, context=context, check_inputs=snapshot.check)
    with terminate_as_interrupt():
        if is_adapter:
            result = run_adapters(inputs, options, adapter, paths, loaded=loaded, **run)
        else:
            result = run_dense(inputs, options, paths, **run)
        if report_path is not None:  # inside: a signal now waits for it, a failure names the outputs in place
            _write_report(result, report_path)
    return result


def _write_report(result: MergeReport, target: str | os.PathLike) -> None:
    """Write the run's record to `target`; a failure names the report (the outputs are already in place)."""
    try:
        write_json(report_record(result), target)
    except (OSError, InputError) as e:
        where = "stdout" if os.fspath(target) == "-" else os.fspath(target)
        problem = getattr(e, "strerror", None) or e
        raise MergeError(f"writing report={where} failed: {problem}", options=("report",)) from None


def source_list(expert: Source, anti: Source | Sequence[Source]) -> list[Source]:
    """[expert, anti-expert, ...] from the forms `merge()` takes (one anti-expert, or a sequence of them)."""
    sources = [expert, *([anti] if isinstance(anti, (str, os.PathLike, PeftAdapter)) else list(anti))]
    if len(sources) < 2:
        raise InputError("give at least one anti-expert")
    return sources


def _resolve_all(
    sources: Sequence[Source], base: str | os.PathLike | None, *, quiet: bool
) -> tuple[list[tuple[str, ResolvedInput]], dict[str, PeftAdapter]]:
    """(role, input) pairs for every input (BASE last), and the adapters given as objects, by role."""
    roles = input_roles(len(sources) - 1)
    inputs, loaded = [], {}
    for role, source in zip(roles, sources, strict=True):
        if isinstance(source, PeftAdapter):
            loaded[role] = source
            inputs.append((role, ResolvedInput(source.source, source.source, "memory", Path(), (), adapter=True)))
        else:
            inputs.append((role, resolve_input(source, role=role, quiet=quiet, adapter_key=owns_adapter_key)))
    if base is not None:
        inputs.append(("BASE", resolve_input(base, role="BASE", quiet=quiet, adapter_key=owns_adapter_key)))
    return inputs, loaded


def adapter_inputs(inputs: Sequence[tuple[str, ResolvedInput]]) -> bool:
    """True when EXPERT and ANTI are PEFT adapters, False when dense; mixed inputs and an adapter BASE are refused."""
    for role, inp in inputs:
        if role == "BASE" and inp.adapter:
            raise InputError(
                f"BASE {inp.spec!r} is a PEFT adapter; base= takes the full base model θ₀ (adapters go in EXPERT and "
                "ANTI)",
                options=("base",),
            )
    merged = [(role, inp) for role, inp in inputs if role != "BASE"]
    adapters = [(role, inp) for role, inp in merged if inp.adapter]
    if adapters and len(adapters) != len(merged):
        (a_role, a), (d_role, d) = adapters[0], next((r, i) for r, i in merged if not i.adapter)
        raise InputError(
            f"{a_role} {a.spec!r} is a PEFT adapter but {d_role} {d.spec!r} is a dense checkpoint; Ext-Sub combines "
            "adapters with adapters (exactly, in their own parameter space) or dense checkpoints with dense checkpoints"
        )
    return bool(adapters)
