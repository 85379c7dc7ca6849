"""The dense run: checkpoints (task vectors, or full models with a base) streamed block by block through the method.

`run_dense` plans the tensors from the headers, then streams them: `BlockStreamer` (streamer.py)
reads each block into pooled buffers and computes it once per λ setting, `OutputSet.stream`
overlaps reading the next block, computing this one and writing the previous one to every
output. Host and device memory are a fixed multiple of the largest block whatever the model's
size. `--dry-run` stops after the plan; inspect mode streams for statistics and writes nothing.
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from extsub_kernels.engine.architecture import WeightLayout, input_config, weight_layout
from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.dense_stats import DenseStats
from extsub_kernels.engine.dryrun import dry_run_report
from extsub_kernels.engine.items import dense_items
from extsub_kernels.engine.memory import peak_rss_bytes
from extsub_kernels.engine.notes import (
    MODEL_CONFIG,
    OutputKind,
    card_base_model,
    output_texts,
    run_metadata,
    text_names,
)
from extsub_kernels.engine.options import DEFAULT_MAX_SHARD_SIZE, RunOptions, parse_size
from extsub_kernels.engine.outputs import OutputSet, discard, progress_bar
from extsub_kernels.engine.pipeline import run_pipeline
from extsub_kernels.engine.plan import TensorJob, plan_tensors
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.streamer import BlockStreamer
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorEntry, is_folder_output
from extsub_kernels.io.outputs import listed_files
from extsub_kernels.io.resolve import ADAPTER_CONFIG
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
    """Merge dense checkpoints: EXPERT, the ANTIs in order, and BASE when `inputs` ends with one.

    The caller has resolved the inputs and checked the outputs' paths. `options.mode` "dry-run"
    stops once the outputs are planned, "inspect" streams the inputs for statistics and writes
    nothing. Returns the report; on any error nothing is left at `paths`. `check_inputs` runs
    before the outputs are published and raises when an input changed during the run.
    """
    has_base = inputs[-1][0] == "BASE"
    n_anti = len(inputs) - 1 - has_base
    roles = [role for role, _ in inputs]
    readers = [CheckpointReader(inp.files, label=role) for role, inp in inputs]
    try:
        layout = dense_layout(inputs, readers[0], options.transposed)
        jobs, skipped = plan_tensors(
            readers,
            n_anti=n_anti,
            has_base=has_base,
            on_missing=options.on_missing,
            out_dtype=options.out_dtype,
            transposed=layout.rule,
            inputs=[inp for _, inp in inputs],
        )
        facts = dict(
            tensors=len(jobs),
            merged=sum(j.merged for j in jobs),
            copied=sum(not j.merged for j in jobs),
            skipped=len(skipped),
            device=str(options.device),
            skipped_keys=tuple(skipped),
            method=options.method,
            settings=options.settings,
            items=tuple(dense_items(jobs, skipped, readers, roles)),
            layout=layout.reason,
            kernel=op_backend(options.device) if options.mode != "dry-run" else None,
            context=context,
        )
        if options.mode == "inspect":
            return _inspect(readers, inputs, options, [j for j in jobs if j.merged], started, facts)
        kind, extra = _output_kind(inputs, paths, has_base)
        entries = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
        metadata = run_metadata(inputs, options, context=context)
        limit = options.shard_limit(default=parse_size(DEFAULT_MAX_SHARD_SIZE) if is_folder_output(paths[0]) else None)
        if options.mode == "dry-run":
            reads = sum(readers[i].info(j.name).nbytes for j in jobs for i in j.inputs())
            return dry_run_report(paths, entries, metadata, limit, extra, text_names(paths, kind), reads, facts)
        with OutputSet(
            paths,
            entries,
            metadata,
            max_shard_size=limit,
            extra_files=extra,
            force=options.force,
            check_inputs=check_inputs,
        ) as out:
            stats = DenseStats(roles, options.settings, options.method) if options.stats else None
            streamer = BlockStreamer(readers, roles, options, out.order, stats, [inp for _, inp in inputs])
            blocks = streamer.blocks(jobs)
            total = sum(streamer.read_bytes(b) for b in blocks)
            with streamer.transfer:
                streamer.transfer.reset_peak()
                out.stream(
                    blocks,
                    streamer.read,
                    streamer.compute,
                    total=total,
                    progress=options.progress,
                    on_stop=streamer.close,
                )
            out.add_texts(output_texts(paths, options, context, kind, stats.done if stats else []))
            written = out.commit()
            bytes_written = out.bytes_written
    finally:
        for r in readers:
            r.close()
    return MergeReport(
        outputs=written,
        bytes_read=total,
        bytes_written=bytes_written,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=streamer.transfer.peak_memory(),
        stats=tuple(stats.done) if stats else (),
        files=tuple(tuple(listed_files(path)) for path in written),
        **facts,
    )


def dense_layout(inputs: Inputs, expert: CheckpointReader, explicit: bool | None) -> WeightLayout:
    """How rows pair: --transposed/--no-transposed, else a config.json (EXPERT first, then BASE and the ANTIs),
    else the expert's key names and shapes."""
    order = [inputs[0], *[i for i in inputs[1:] if i[0] == "BASE"], *[i for i in inputs[1:] if i[0] != "BASE"]]
    configs = [(role, input_config(inp)) for role, inp in order]
    shapes = {name: expert.info(name).shape for name in expert}
    return weight_layout(configs, shapes, explicit=explicit, role=f"EXPERT ({inputs[0][1].spec})")


def _output_kind(inputs: Inputs, paths: Sequence[Path], has_base: bool) -> tuple[OutputKind, list[Path]]:
    """What a folder output is (for its card) and the files copied into it: with a base, the expert's config
    and tokenizer files (config.json rewritten with a note); without, nothing."""
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
    roles = [role for role, _ in inputs]
    stats = DenseStats(roles, options.settings, options.method)
    order = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
    streamer = BlockStreamer(readers, roles, options, order, stats, [inp for _, inp in inputs])
    blocks = streamer.blocks(jobs)
    total = sum(streamer.read_bytes(b) for b in blocks)
    with streamer.transfer, progress_bar(total, options.progress, "extsub-inspect") as bar:
        streamer.transfer.reset_peak()
        run_pipeline(blocks, streamer.read, streamer.compute, discard(bar), on_stop=streamer.close)
    return MergeReport(
        outputs=(),
        bytes_read=total,
        bytes_written=0,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=streamer.transfer.peak_memory(),
        mode="inspect",
        stats=tuple(stats.done),
        **facts,
    )
