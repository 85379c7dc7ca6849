"""The dense run: plan from the headers, then stream blocks (`BlockStreamer`) through the method into every output
(`OutputSet`) in memory a fixed multiple of the largest block; a dry run stops at the plan, inspect writes nothing."""

from collections.abc import Callable, Sequence
from pathlib import Path

from extsub_kernels._tensors import is_float
from extsub_kernels.constants import ADAPTER_CONFIG, MODEL_CONFIG
from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.conv1d import WeightLayout, input_config, weight_layout
from extsub_kernels.engine.dense_stats import DenseStats
from extsub_kernels.engine.dryrun import dry_run_report
from extsub_kernels.engine.notes import OutputKind, card_base_model, output_texts, run_metadata, text_names
from extsub_kernels.engine.options import DEFAULT_MAX_SHARD_SIZE, RunOptions, parse_size
from extsub_kernels.engine.pipeline import run_pipeline
from extsub_kernels.engine.plan import TensorJob, plan_tensors
from extsub_kernels.engine.report import Item, MergeReport
from extsub_kernels.engine.streamer import BlockStreamer
from extsub_kernels.engine.writing import OutputSet, progress_bar, write_stage
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorEntry, is_folder_output
from extsub_kernels.io.format import DTYPE_CODES
from extsub_kernels.ops import op_backend

Inputs = Sequence[tuple[str, ResolvedInput]]


def run_dense(
    inputs: Inputs,
    options: RunOptions,
    paths: Sequence[Path],
    *,
    started: float,
    context: RunContext | None = None,
    check_inputs: Callable[[], None] | None = None,
) -> MergeReport:
    """Merge resolved dense checkpoints (EXPERT, ANTIs, BASE last if any) into checked `paths`, leaving nothing on an
    error; `check_inputs` raises before publishing when an input changed."""
    has_base = inputs[-1][0] == "BASE"
    roles = [role for role, _ in inputs]
    readers = [CheckpointReader(inp.files, label=role) for role, inp in inputs]
    try:
        layout = _dense_layout(inputs, readers[0], options.transposed)
        plan = dict(on_missing=options.on_missing, out_dtype=options.out_dtype, transposed=layout.rule)
        n_anti = len(inputs) - 1 - has_base
        jobs, skipped = plan_tensors(readers, n_anti=n_anti, has_base=has_base, inputs=[i for _, i in inputs], **plan)
        merged = sum(j.merged for j in jobs)
        facts = dict(tensors=len(jobs), merged=merged, copied=len(jobs) - merged, skipped=len(skipped))
        facts.update(device=str(options.device), skipped_keys=tuple(skipped), method=options.method, context=context)
        facts.update(settings=options.settings, items=tuple(_items(jobs, skipped, readers, roles)))
        facts.update(layout=layout.reason, kernel=op_backend(options.device) if options.mode != "dry-run" else None)
        if options.mode == "inspect":
            return _inspect(readers, inputs, options, [j for j in jobs if j.merged], started, facts)
        kind, extra = _output_kind(inputs, paths, has_base)
        entries = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
        metadata = run_metadata(inputs, options, context=context)
        limit = options.shard_limit(default=parse_size(DEFAULT_MAX_SHARD_SIZE) if is_folder_output(paths[0]) else None)
        if options.mode == "dry-run":
            reads = sum(readers[i].info(j.name).nbytes for j in jobs for i in j.inputs())
            return dry_run_report(paths, entries, metadata, limit, extra, text_names(paths, kind), reads, facts)
        writing = dict(max_shard_size=limit, extra_files=extra, force=options.force, check_inputs=check_inputs)
        with OutputSet(paths, entries, metadata, **writing) as out:
            stats = DenseStats(roles, options.settings, options.method) if options.stats else None

            def stream(blocks: list, s: BlockStreamer, total: int) -> None:
                out.stream(blocks, s.read, s.compute, total=total, progress=options.progress, on_stop=s.close)

            total, peak = _streamed(readers, inputs, options, jobs, out.order, stats, stream)
            out.add_texts(output_texts(paths, options, context, kind, stats.done if stats else []))
            written = out.commit()
            bytes_written = out.bytes_written
    finally:
        for r in readers:
            r.close()
    facts.update(stats=tuple(stats.done) if stats else (), started=started, peak_gpu_bytes=peak)
    return MergeReport.finished(written, bytes_read=total, bytes_written=bytes_written, **facts)


def _streamed(
    readers: Sequence[CheckpointReader],
    inputs: Inputs,
    options: RunOptions,
    jobs: Sequence[TensorJob],
    order: Sequence[TensorEntry],
    stats: DenseStats | None,
    stream: Callable[[list, BlockStreamer, int], None],
) -> tuple[int, int | None]:
    """`jobs` cut into blocks in `order`, handed to `stream` with the device ready; (bytes read, peak GPU memory)."""
    streamer = BlockStreamer(readers, [role for role, _ in inputs], options, order, stats, [i for _, i in inputs])
    blocks = streamer.blocks(jobs)
    total = sum(streamer.read_bytes(b) for b in blocks)
    with streamer.transfer:
        streamer.transfer.reset_peak()
        stream(blocks, streamer, total)
    return total, streamer.transfer.peak_memory()


def _items(
    jobs: Sequence[TensorJob], skipped: Sequence[str], readers: Sequence[CheckpointReader], roles: Sequence[str]
) -> list[Item]:
    """The plan in words: an `Item` per output tensor, then per `skipped` key."""
    items = []
    for job in jobs:
        if job.merged:
            reason = f"in EXPERT and {' and '.join(roles[k] for k in job.antis)}"
            reason += " (task vectors against BASE)" if job.base is not None else ""
            reason += "; Conv1D weight stored (in, out): its columns are paired" if job.transposed else ""
        elif job.source != 0:
            reason = f"only in {roles[job.source]}: written unchanged (--on-missing copy)"
        elif is_float(kind := readers[0].info(job.name).dtype):
            reason = "in EXPERT only: copied (a zero task vector in the anti-experts)"
        else:
            reason = f"not a float tensor ({DTYPE_CODES[kind]}): copied from EXPERT"
        action = "merged" if job.merged else "copied"
        items.append(Item(job.name, "tensor", action, reason, job.shape, DTYPE_CODES[job.out_dtype]))
    for name in skipped:
        holder = next(k for k in range(1, len(readers)) if name in readers[k])
        info = readers[holder].info(name)
        reason = f"only in {roles[holder]}: left out (--on-missing skip)"
        items.append(Item(name, "tensor", "skipped", reason, info.shape, DTYPE_CODES[info.dtype]))
    return items


def _dense_layout(inputs: Inputs, expert: CheckpointReader, explicit: bool | None) -> WeightLayout:
    """How rows pair: `transposed=`, else a config.json (EXPERT, BASE, ANTIs), else the expert's names and shapes."""
    order = [inputs[0], *[i for i in inputs[1:] if i[0] == "BASE"], *[i for i in inputs[1:] if i[0] != "BASE"]]
    configs = [(role, input_config(inp)) for role, inp in order]
    shapes = {name: expert.info(name).shape for name in expert}
    return weight_layout(configs, shapes, explicit=explicit, role=f"EXPERT ({inputs[0][1].spec})")


def _output_kind(inputs: Inputs, paths: Sequence[Path], has_base: bool) -> tuple[OutputKind, list[Path]]:
    """What a folder output is (its card) and the files copied in: with a base, the expert's config and tokenizer."""
    expert = inputs[0][1]
    if not has_base or not is_folder_output(paths[0]):
        return OutputKind("task vectors ΔW' (add them to the base model to use them)"), []
    config = expert.config_file(MODEL_CONFIG)
    extra = [p for p in expert.config_files if p.name not in (ADAPTER_CONFIG, MODEL_CONFIG)]
    base, why = card_base_model(inputs[-1][1].spec, "BASE")
    kind = OutputKind("the full merged model θ₀ + ΔW'", "transformers" if config else None, base, config, base_note=why)
    return kind, extra


def _inspect(
    readers: Sequence[CheckpointReader],
    inputs: Inputs,
    options: RunOptions,
    jobs: Sequence[TensorJob],
    started: float,
    facts: dict,
) -> MergeReport:
    """Stream the merged tensors through the method for their row statistics, writing nothing."""
    stats = DenseStats([role for role, _ in inputs], options.settings, options.method)

    def stream(blocks: list, streamer: BlockStreamer, total: int) -> None:
        with progress_bar(total, options.progress, "extsub-inspect") as bar:
            run_pipeline(blocks, streamer.read, streamer.compute, write_stage(bar), on_stop=streamer.close)

    order = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
    total, peak = _streamed(readers, inputs, options, jobs, order, stats, stream)
    facts.update(mode="inspect", stats=tuple(stats.done), started=started, peak_gpu_bytes=peak)
    return MergeReport.finished((), bytes_read=total, **facts)
