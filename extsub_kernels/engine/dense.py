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
from extsub_kernels.engine.architecture import transposed_weights
from extsub_kernels.engine.memory import peak_rss_bytes
from extsub_kernels.engine.methods import apply_method
from extsub_kernels.engine.options import DEFAULT_MAX_SHARD_SIZE, RunOptions, lam_label, parse_size
from extsub_kernels.engine.outputs import OutputSet, Piece, run_metadata
from extsub_kernels.engine.plan import Block, TensorJob, cut_blocks, plan_tensors, row_bytes, rows_of
from extsub_kernels.engine.report import MergeReport
from extsub_kernels.engine.transfer import BufferPool, Transfer, view_as
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorEntry, is_folder_output
from extsub_kernels.io.resolve import ADAPTER_CONFIG

Inputs = Sequence[tuple[str, ResolvedInput]]


def run_dense(
    inputs: Inputs,
    options: RunOptions,
    paths: Sequence[Path],
    *,
    started: float,
    check_inputs: Callable[[], None] | None = None,
) -> MergeReport:
    """Merge dense checkpoints: EXPERT, the ANTIs in order, and BASE when `inputs` ends with one.

    The caller has resolved the inputs and checked the outputs' paths. Returns the report;
    on any error nothing is left at `paths`. `check_inputs` runs before the outputs are
    published and raises when an input changed during the run.
    """
    has_base = inputs[-1][0] == "BASE"
    n_anti = len(inputs) - 1 - has_base
    readers = [CheckpointReader(inp.files, label=role) for role, inp in inputs]
    try:
        jobs, skipped = plan_tensors(
            readers,
            n_anti=n_anti,
            has_base=has_base,
            on_missing=options.on_missing,
            out_dtype=options.out_dtype,
            transposed=transposed_weights(inputs[0][1].config()),
        )
        folder = is_folder_output(paths[0])
        default = parse_size(DEFAULT_MAX_SHARD_SIZE) if folder else None
        expert = inputs[0][1]
        extra = [p for p in expert.config_files if p.name != ADAPTER_CONFIG] if has_base and folder else []
        entries = [TensorEntry(j.name, j.out_dtype, j.shape) for j in jobs]
        with OutputSet(
            paths,
            entries,
            run_metadata(inputs, options),
            max_shard_size=options.shard_limit(default=default),
            extra_files=extra,
            force=options.force,
            check_inputs=check_inputs,
        ) as outputs:
            streamer = BlockStreamer(readers, [role for role, _ in inputs], options, outputs)
            blocks = streamer.blocks(jobs)
            total = sum(streamer.read_bytes(b) for b in blocks)
            with streamer.transfer:
                streamer.transfer.reset_peak()
                outputs.stream(blocks, streamer.read, streamer.compute, total=total, progress=options.progress)
            written = outputs.commit()
            bytes_written = outputs.bytes_written
    finally:
        for r in readers:
            r.close()
    return MergeReport(
        outputs=written,
        tensors=len(jobs),
        merged=sum(j.merged for j in jobs),
        copied=sum(not j.merged for j in jobs),
        skipped=len(skipped),
        bytes_read=total,
        bytes_written=bytes_written,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=streamer.transfer.peak_memory(),
        device=str(options.device),
        skipped_keys=tuple(skipped),
    )


class BlockStreamer:
    """The stages of a dense merge over blocks of rows: `read` (a thread), `compute` (the caller); `OutputSet` writes.

    Args:
        readers: the inputs, numbered as in `TensorJob` (expert, anti-experts, base).
        roles: a name per input for messages (EXPERT, ANTI, BASE).
        options: λ settings, method, device, block size.
        outputs: one output per λ setting; blocks must come in `outputs.order`.
    """

    def __init__(
        self, readers: Sequence[CheckpointReader], roles: Sequence[str], options: RunOptions, outputs: OutputSet
    ):
        self.readers, self.roles, self.options, self.outputs = readers, roles, options, outputs
        self.transfer = Transfer(options.device)
        self.pool = BufferPool(1, pin=self.transfer.cuda)

    def blocks(self, jobs: Sequence[TensorJob]) -> list[Block]:
        """`jobs` cut into blocks of rows, in the outputs' order; sizes the buffer pool for them."""
        by_name = {j.name: j for j in jobs}
        blocks = []
        for entry in self.outputs.order:
            job = by_name[entry.name]
            width = row_bytes(job, self.readers)
            for block in cut_blocks(job, width, self.options.block_bytes):
                blocks.append(block)
                self.pool.capacity = max(self.pool.capacity, width * (block.stop - block.start))
        return blocks

    def _range(self, block: Block, i: int) -> tuple[int, int]:
        """(first byte, length) of `block` within input i's tensor."""
        info = self.readers[i].info(block.job.name)
        row = info.nbytes // rows_of(info.shape)
        return block.start * row, (block.stop - block.start) * row

    def read_bytes(self, block: Block) -> int:
        return sum(self._range(block, i)[1] for i in block.job.inputs())

    def _read_rows(self, block: Block, i: int, buffer: torch.Tensor) -> torch.Tensor:
        start, length = self._range(block, i)
        self.readers[i].read_into(block.job.name, buffer, start, length)
        return view_as(buffer, self.readers[i].info(block.job.name).dtype, block.shape())

    def read(self, block: Block) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        buffers = [self.pool.get() for _ in block.job.inputs()]
        return [self._read_rows(block, i, buf) for i, buf in zip(block.job.inputs(), buffers, strict=True)], buffers

    def compute(self, block: Block, payload: tuple[list[torch.Tensor], list[torch.Tensor]]) -> Piece:
        tensors, buffers = payload
        job = block.job
        settings = self.options.settings
        moved = self.transfer.to_device(tensors)
        if not job.merged:
            copy = moved[0].to(job.out_dtype)
            if copy.dtype != moved[0].dtype:
                self._check_cast(block, moved[0], copy)
            return self._to_host(block, [copy] * len(settings), buffers)
        plus, minus = moved[0], moved[1 : 1 + len(job.antis)]
        theta0 = moved[-1] if job.base is not None else None
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
            )
            self._check_finite(block, result, setting)
            results.append(result)
        return self._to_host(block, results, buffers)

    def _to_host(self, block: Block, results: list[torch.Tensor], buffers: list[torch.Tensor]) -> Piece:
        """The results on the host as a Piece; the buffers they occupy go back to the pool once written."""
        progress = self.read_bytes(block)
        if not self.transfer.cuda:
            keep = [b for b in buffers if any(shares_storage(r, b) for r in results)]
            self.pool.put([b for b in buffers if not any(b is k for k in keep)])
            return Piece(block.job.name, results, progress, release=lambda: self.pool.put(keep))
        self.pool.put(buffers)
        host, keep, seen = [], [], {}
        for r in results:
            if id(r) not in seen:
                keep.append(self.pool.get())
                seen[id(r)] = self.transfer.to_host(r, keep[-1])
            host.append(seen[id(r)])
        event = self.transfer.done_event()
        return Piece(
            block.job.name,
            host,
            progress,
            ready=lambda: self.transfer.ready(event),
            release=lambda: self.pool.put(keep),
        )

    def _check_cast(self, block: Block, source: torch.Tensor, copy: torch.Tensor) -> None:
        """A tensor copied into another dtype (--dtype) must not turn finite values into ±inf."""
        problem = cast_overflow(source, copy)
        if problem is not None:
            role = self.roles[block.job.source]
            raise InputError(
                f"tensor {block.job.name!r} (copied from {role}) has {problem}; --dtype "
                f"{str(copy.dtype).removeprefix('torch.')} cannot hold it: choose a wider --dtype, or keep"
            )

    def _check_finite(self, block: Block, result: torch.Tensor, setting: tuple[float, ...]) -> None:
        """A NaN or Inf in a result names the input tensor holding one, or else the overflow."""
        if all_finite(result):
            return
        job = block.job
        for i in job.inputs():  # read again: the expert's block may have been overwritten in place
            data = self._read_rows(block, i, torch.empty(self._range(block, i)[1], dtype=torch.uint8))
            problem = nonfinite_summary(data, first_row=block.start)
            if problem is not None:
                where = self.readers[i].info(job.name).path.name
                raise InputError(
                    f"tensor {job.name!r} in {self.roles[i]} ({where}) contains {problem}; "
                    "the op needs finite weights, so fix or drop that input"
                )
        raise InputError(
            f"tensor {job.name!r}: the result at λ={lam_label(setting)} overflows {job.out_dtype} although the inputs "
            "are finite; use a smaller λ or --dtype float32"
        )
