"""The dense run: checkpoints (task vectors, or full models with a base) streamed block by block through the method.

Per block of rows: read (pread into a pooled host buffer, pinned on CUDA) → device → the
method once per λ setting → NaN/Inf check → host → append to every output. Reading the next
block, computing this one and writing the previous one overlap (`OutputSet.stream`), so host
and device memory stay a small multiple of the block size whatever the model's size.
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from extsub_kernels._tensors import all_finite, cast_overflow, nonfinite_summary, shares_storage
from extsub_kernels.engine.architecture import WeightLayout, input_config, weight_layout
from extsub_kernels.engine.batches import SMALL_TENSOR_BYTES, Batch, Batcher
from extsub_kernels.engine.context import RunContext
from extsub_kernels.engine.dense_stats import DenseStats
from extsub_kernels.engine.dryrun import dry_run_report
from extsub_kernels.engine.items import dense_items
from extsub_kernels.engine.memory import peak_rss_bytes
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.notes import (
    MODEL_CONFIG,
    OutputKind,
    base_model_name,
    output_texts,
    run_metadata,
    text_names,
)
from extsub_kernels.engine.options import DEFAULT_MAX_SHARD_SIZE, RunOptions, lam_label, parse_size
from extsub_kernels.engine.outputs import OutputSet, Piece, discard, progress_bar
from extsub_kernels.engine.pipeline import run_pipeline
from extsub_kernels.engine.plan import Block, TensorJob, cut_blocks, plan_tensors, rows_of
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.transfer import BufferPool, Transfer, view_as
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorEntry, is_folder_output
from extsub_kernels.io.outputs import listed_files
from extsub_kernels.io.provenance import display_path
from extsub_kernels.io.resolve import ADAPTER_CONFIG

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
                out.stream(blocks, streamer.read, streamer.compute, total=total, progress=options.progress)
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
    base = base_model_name(inputs[-1][1])
    kind = OutputKind("the full merged model θ₀ + ΔW'", "transformers" if config else None, base, config)
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
        run_pipeline(blocks, streamer.read, streamer.compute, discard(bar))
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


class BlockStreamer:
    """The stages of a dense merge over blocks of rows: `read` (a thread), `compute` (the caller); `OutputSet` writes.

    Args:
        readers: the inputs, numbered as in `TensorJob` (expert, anti-experts, base).
        roles: a name per input for messages (EXPERT, ANTI, BASE).
        options: λ settings, method, device, block size.
        order: the tensors in the order the outputs are written (`OutputSet.order`); blocks follow it.
        stats: gathers the row statistics of merged tensors (None: not gathered).
        inputs: the resolved inputs, to name files in messages by the path the user gave.
    """

    def __init__(
        self,
        readers: Sequence[CheckpointReader],
        roles: Sequence[str],
        options: RunOptions,
        order: Sequence[TensorEntry],
        stats: DenseStats | None = None,
        inputs: Sequence[ResolvedInput] = (),
    ):
        self.readers, self.roles, self.options, self.order, self.stats = readers, roles, options, order, stats
        self.inputs = inputs
        self.transfer = Transfer(options.device)
        self.pool = BufferPool(1, pin=self.transfer.cuda)

    def blocks(self, jobs: Sequence[TensorJob]) -> list[Block | Batch]:
        """`jobs` cut into blocks of rows in the outputs' order, small tensors batched; sizes the buffer pool.

        One pass over the tensors with a few dict lookups each: a model of a million tiny tensors is planned in seconds.
        """
        by_name = {j.name: j for j in jobs}
        limit = self.options.block_bytes
        small = min(SMALL_TENSOR_BYTES, limit)
        infos = [reader.tensors for reader in self.readers]
        batcher = Batcher(limit)
        capacity = self.pool.capacity
        for entry in self.order:
            job = by_name[entry.name]
            inputs = job.inputs()
            found = [infos[i][job.name] for i in inputs]
            numel = found[0].nbytes // found[0].dtype.itemsize
            widest = max(max(info.nbytes for info in found), numel * job.out_dtype.itemsize)
            rows = rows_of(job.shape)
            if 0 < widest < small and not job.transposed:
                key = (inputs, tuple(info.dtype for info in found), job.out_dtype, numel // rows)
                batcher.add_small(job, key, numel // rows, widest, sum(info.nbytes for info in found))
                capacity = max(capacity, widest)
                continue
            width = widest // rows if rows else 0
            for block in cut_blocks(job, width, limit):
                batcher.add(block)
                capacity = max(capacity, width * (block.stop - block.start))
        batcher.flush()
        for item in batcher.items:
            if isinstance(item, Batch):
                capacity = max(capacity, item.nbytes)
        self.pool.capacity = capacity
        return batcher.items

    def _range(self, block: Block, i: int) -> tuple[int, int]:
        """(first byte, length) of `block` within input i's tensor."""
        info = self.readers[i].info(block.job.name)
        row = info.nbytes // rows_of(info.shape)
        return block.start * row, (block.stop - block.start) * row

    def read_bytes(self, item: Block | Batch) -> int:
        if isinstance(item, Batch):
            return item.read_bytes
        return sum(self._range(item, i)[1] for i in item.job.inputs())

    def _read_rows(self, block: Block, i: int, buffer: torch.Tensor) -> torch.Tensor:
        start, length = self._range(block, i)
        self.readers[i].read_into(block.job.name, buffer, start, length)
        return view_as(buffer, self.readers[i].info(block.job.name).dtype, block.shape())

    def read(self, item: Block | Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if isinstance(item, Batch):
            return self._read_batch(item)
        buffers = [self.pool.get() for _ in item.job.inputs()]
        return [self._read_rows(item, i, buf) for i, buf in zip(item.job.inputs(), buffers, strict=True)], buffers

    def _read_batch(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each input's tensors of the batch, back to back in one buffer, seen as one (rows, width) matrix."""
        names, views, buffers = batch.names, [], []
        for i in batch.job.inputs():
            buffers.append(self.pool.get())
            self.readers[i].read_whole_into(names, buffers[-1])
            dtype = self.readers[i].info(names[0]).dtype
            views.append(view_as(buffers[-1], dtype, (batch.rows, batch.width)))
        return views, buffers

    def compute(self, item: Block | Batch, payload: tuple[list[torch.Tensor], list[torch.Tensor]]) -> Piece:
        tensors, buffers = payload
        job = item.job
        settings = self.options.settings
        moved = self.transfer.to_device(tensors)
        if not job.merged:
            copy = moved[0].to(job.out_dtype)
            if copy.dtype != moved[0].dtype:
                self._check_cast(item, moved[0], copy)
            return self._to_host(item, [copy] * len(settings), buffers)
        plus, minus = moved[0], moved[1 : 1 + len(job.antis)]
        theta0 = moved[-1] if job.base is not None else None
        observe = self.stats.observer(item) if self.stats is not None else None
        results = []
        for s, setting in enumerate(settings):
            result = apply_method(
                plus,
                minus,
                [setting[k - 1] for k in job.antis],
                method=self.options.method,
                base=theta0,
                out_dtype=job.out_dtype,
                transposed=job.transposed,
                inplace=s == len(settings) - 1,
                observe=observe if s == 0 else None,
            )
            self._check_finite(item, result, setting)
            if self.stats is not None:
                self.stats.measure(item, s, result, plus)
            results.append(result)
        if self.stats is not None:
            self.stats.block_done(item)
        return self._to_host(item, results, buffers)

    def _to_host(self, item: Block | Batch, results: list[torch.Tensor], buffers: list[torch.Tensor]) -> Piece:
        """The results on the host as a Piece; the buffers they occupy go back to the pool once written."""
        progress = self.read_bytes(item)
        if isinstance(item, Batch):
            first, last = item.job.name, item.jobs[-1].name
        else:
            first, last = item.job.name, None
        if not self.transfer.cuda:
            keep = [b for b in buffers if any(shares_storage(r, b) for r in results)]
            self.pool.put([b for b in buffers if not any(b is k for k in keep)])
            return Piece(first, results, progress, release=lambda: self.pool.put(keep), last=last)
        self.pool.put(buffers)
        host, keep, seen = [], [], {}
        for r in results:
            if id(r) not in seen:
                keep.append(self.pool.get())
                seen[id(r)] = self.transfer.to_host(r, keep[-1])
            host.append(seen[id(r)])
        event = self.transfer.done_event()
        return Piece(
            first,
            host,
            progress,
            ready=lambda: self.transfer.ready(event),
            release=lambda: self.pool.put(keep),
            last=last,
        )

    def _check_cast(self, item: Block | Batch, source: torch.Tensor, copy: torch.Tensor) -> None:
        """A tensor copied into another dtype (--dtype) must not turn finite values into ±inf."""
        if isinstance(item, Batch):
            if all_finite(copy) or not all_finite(source):
                return  # nothing overflowed, or a NaN/Inf is copied as it is: check tensor by tensor
            for block, start, stop in item.row_ranges():
                self._check_cast(block, source[start:stop], copy[start:stop])
            return
        block = item
        problem = cast_overflow(source, copy)
        if problem is not None:
            role = self.roles[block.job.source]
            raise InputError(
                f"tensor {block.job.name!r} (copied from {role}) has {problem}; --dtype "
                f"{str(copy.dtype).removeprefix('torch.')} cannot hold it: choose a wider --dtype, or keep"
            )

    def _check_finite(self, item: Block | Batch, result: torch.Tensor, setting: tuple[float, ...]) -> None:
        """A NaN or Inf in a result names the input tensor holding one, or else the overflow."""
        if all_finite(result):
            return
        if isinstance(item, Batch):
            for block, start, stop in item.row_ranges():
                self._check_finite(block, result[start:stop].reshape(block.shape()), setting)
            return
        block = item
        job = block.job
        for i in job.inputs():  # read again: the expert's block may have been overwritten in place
            data = self._read_rows(block, i, torch.empty(self._range(block, i)[1], dtype=torch.uint8))
            problem = nonfinite_summary(data, first_row=block.start)
            if problem is not None:
                path = self.readers[i].info(job.name).path
                where = display_path(self.inputs[i], path) if self.inputs else path.name
                raise InputError(
                    f"tensor {job.name!r} in {self.roles[i]} ({where}) contains {problem}; "
                    "the op needs finite weights, so fix or drop that input"
                )
        raise InputError(
            f"tensor {job.name!r}: the result at λ={lam_label(setting)} overflows {job.out_dtype} although the inputs "
            "are finite; use a smaller λ or --dtype float32"
        )
