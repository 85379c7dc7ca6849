"""`BlockStreamer`: the read and compute stages of the dense run, in memory sized once from the plan: per block,
pread into a pooled buffer → device → the method per λ setting → NaN/Inf check → host, a `Piece` to write."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from extsub_kernels._tensors import all_finite, cast_overflow, compute_dtype, nonfinite_summary
from extsub_kernels.engine.batches import SMALL_TENSOR_BYTES, Batch, Batcher
from extsub_kernels.engine.dense_stats import DenseStats
from extsub_kernels.engine.gram import RowGram, combine_into
from extsub_kernels.engine.method_spec import method_spec
from extsub_kernels.engine.methods import (
    CPU_CHUNK_ELEMENTS,
    Observer,
    apply_method_into,
    in_place_step,
    method_workspace,
)
from extsub_kernels.engine.options import RunOptions, lam_label
from extsub_kernels.engine.pipeline import in_flight
from extsub_kernels.engine.plan import Block, TensorJob, cut_blocks, row_elements, rows_of
from extsub_kernels.engine.transfer import BufferPool, Transfer, Workspace, view_as
from extsub_kernels.engine.writing import Piece
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import CheckpointReader, ResolvedInput, TensorEntry
from extsub_kernels.io.provenance import display_path


class BlockStreamer:
    """The stages of a dense merge over blocks: `read` (a thread), `compute` (the caller); `OutputSet` writes.
    `blocks` sizes the pools (a buffer per item in flight, the largest block in its widest form) and the workspace
    once; only the reader takes input buffers, only compute result buffers: no deadlock. Blocks follow `order`."""

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
        self.input_pool: BufferPool | None = None
        self.result_pool: BufferPool | None = None
        self.device_pool: BufferPool | None = None
        self.workspace: Workspace | None = None
        self._nothing = torch.empty(0, dtype=torch.uint8)  # what a "norms" block hands each output
        self._unit: _RowsInPieces | None = None

    def blocks(self, jobs: Sequence[TensorJob]) -> list[Block | Batch]:
        """`jobs` cut into blocks in the outputs' order, small tensors batched; sizes the pools and workspace."""
        by_name = {j.name: j for j in jobs}
        limit = self.options.block_size
        small = min(SMALL_TENSOR_BYTES, limit)
        whole_rows = method_spec(self.options.method).pairs_rows
        infos = [reader.tensors for reader in self.readers]
        batcher = Batcher(limit)
        capacity, chunk, itemsize = 1, CPU_CHUNK_ELEMENTS, 4
        for entry in self.order:
            job = by_name[entry.name]
            inputs = job.inputs()
            found = [infos[i][job.name] for i in inputs]
            numel = found[0].nbytes // found[0].dtype.itemsize
            widest = max(max(info.nbytes for info in found), numel * job.out_dtype.itemsize)
            rows = rows_of(job.shape)
            if job.merged:
                itemsize = max(itemsize, compute_dtype(*(info.dtype for info in found)).itemsize)
            if 0 < widest < small and not job.transposed:
                key = (inputs, tuple(info.dtype for info in found), job.out_dtype, numel // rows)
                batcher.add_small(job, key, numel // rows, widest, sum(info.nbytes for info in found))
                capacity = max(capacity, widest)  # a run of one is streamed as a block of its own
                chunk = max(chunk, numel) if self.transfer.cuda else chunk
                continue
            per_element = widest // numel if numel else 0
            for block in cut_blocks(job, widest // rows if rows else 0, limit, whole_rows=whole_rows):
                batcher.add(block)
                capacity = max(capacity, per_element * block.elements()[1])
                if self.transfer.cuda:
                    chunk = max(chunk, block.elements()[1])
        batcher.flush()
        for item in batcher.items:
            if isinstance(item, Batch):
                capacity = max(capacity, item.nbytes)
                if self.transfer.cuda:
                    chunk = max(chunk, item.rows * item.width)
        self._size_memory(batcher.items, capacity, chunk, itemsize)
        return batcher.items

    def _size_memory(self, items: Sequence[Block | Batch], capacity: int, chunk: int, itemsize: int) -> None:
        n_in = max((len(item.job.inputs()) for item in items), default=1)
        n_out = len(self.options.settings)
        # an input buffer holding an in-place result (or a tensor copied as is) stays until written
        self.input_pool = BufferPool(capacity, in_flight() * n_in + in_flight() - 1, pin=self.transfer.cuda)
        self.result_pool = BufferPool(capacity, in_flight() * n_out, pin=self.transfer.cuda)
        if self.transfer.cuda:
            self.device_pool = BufferPool(capacity, n_in + n_out, device=self.options.device)
        n_anti = max((len(item.job.antis) for item in items), default=1)
        self.workspace = method_workspace(n_anti, itemsize, self.options.device, chunk)

    @property
    def pools(self) -> list[BufferPool]:
        return [p for p in (self.input_pool, self.result_pool, self.device_pool) if p is not None]

    def close(self) -> None:
        for pool in self.pools:
            pool.close()

    def _range(self, block: Block, i: int) -> tuple[int, int]:
        itemsize = self.readers[i].info(block.job.name).dtype.itemsize
        first, count = block.elements()
        return first * itemsize, count * itemsize

    def read_bytes(self, item: Block | Batch) -> int:
        return item.read_bytes if isinstance(item, Batch) else sum(self._range(item, i)[1] for i in item.job.inputs())

    def _read_rows(self, block: Block, i: int, buffer: torch.Tensor) -> torch.Tensor:
        start, length = self._range(block, i)
        self.readers[i].read_into(block.job.name, buffer, start, length)
        return view_as(buffer, self.readers[i].info(block.job.name).dtype, block.shape())

    def read(self, item: Block | Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The item of every input its job reads, each in an input-pool buffer (a batch: one (rows, width) matrix)."""
        tensors, buffers = [], []
        for i in item.job.inputs():
            buffers.append(self.input_pool.get())
            if isinstance(item, Batch):
                self.readers[i].read_whole_into(item.names, buffers[-1])
                dtype = self.readers[i].info(item.job.name).dtype
                tensors.append(view_as(buffers[-1], dtype, item.shape()))
            else:
                tensors.append(self._read_rows(item, i, buffers[-1]))
        return tensors, buffers

    def compute(self, item: Block | Batch, payload: tuple[list[torch.Tensor], list[torch.Tensor]]) -> Piece:
        """The item's result for every output, in pooled buffers; each buffer goes back as soon as it is free."""
        host, host_buffers = payload
        progress = self.read_bytes(item)
        last = item.jobs[-1].name if isinstance(item, Batch) else None
        nothing = [self._nothing] * len(self.options.settings)
        if not self.transfer.cuda:
            results, kept, fresh = self._results(item, host, host_buffers, self.result_pool)
            self.input_pool.put([b for b in host_buffers if not any(b is k for k in kept)])

            def release() -> None:
                self.input_pool.put(kept)
                self.result_pool.put(fresh)

            return Piece(item.job.name, results or nothing, progress, release=release, last=last)
        buffers = [self.device_pool.get() for _ in host]
        inputs = self.transfer.to_device_into(host, buffers)
        self.input_pool.put(host_buffers)
        results, _, fresh = self._results(item, inputs, buffers, self.device_pool)
        landing, host_results, seen = [], [], {}
        for r in results:
            if id(r) not in seen:
                landing.append(self.result_pool.get())
                seen[id(r)] = self.transfer.to_host(r, landing[-1])
            host_results.append(seen[id(r)])
        self.device_pool.put(buffers + fresh)  # later work on the copy stream runs after these copies
        ready, release = self.transfer.done_event().synchronize, (lambda: self.result_pool.put(landing))
        return Piece(item.job.name, host_results or nothing, progress, ready=ready, release=release, last=last)

    def _results(
        self, item: Block | Batch, inputs: list[torch.Tensor], buffers: list[torch.Tensor], pool: BufferPool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(one result per λ setting, the input buffers holding one, the buffers taken from `pool` for the others)."""
        job, settings = item.job, self.options.settings
        if item.phase == "norms":
            self._accumulate(item, inputs)
            return [], [], []
        if not job.merged:
            if inputs[0].dtype == job.out_dtype:
                return [inputs[0]] * len(settings), [buffers[0]], []
            out = pool.get()
            copy = view_as(out, job.out_dtype, item.shape()).copy_(inputs[0])
            self._check_cast(item, inputs[0], copy)
            return [copy] * len(settings), [], [out]
        plus, minus = inputs[0], inputs[1 : 1 + len(job.antis)]
        theta0 = inputs[-1] if job.base is not None else None
        kind = dict(method=self.options.method, base=theta0 is not None, transposed=job.transposed)
        in_place = in_place_step(plus.dtype, len(minus), out_dtype=job.out_dtype, **kind)
        flat = job.transposed and isinstance(item, Block) and item.cols is not None  # a piece of a Conv1D stored row
        op_view = (lambda t: t.view(1, -1)) if flat else (lambda t: t)  # its n elements belong to n op rows
        method = dict(method=self.options.method, transposed=job.transposed, workspace=self.workspace)
        stats = self.stats
        results, kept, fresh = [], [], []
        for s, setting in enumerate(settings):
            lams = [setting[k - 1] for k in job.antis]
            observe = stats.observer(item) if stats is not None and s == 0 else None  # λ-free: the first setting's
            if in_place and s == len(settings) - 1 and item.phase == "one-pass":
                result = plus  # the last setting: the expert's block is no longer needed
                kept.append(buffers[0])
            else:
                fresh.append(pool.get())
                result = view_as(fresh[-1], job.out_dtype, item.shape())
            if item.phase == "update":
                self._update(item, result, inputs, s, observe)
            else:
                base = op_view(theta0) if theta0 is not None else None
                args = (op_view(result), op_view(plus), [op_view(m) for m in minus], lams)
                apply_method_into(*args, base=base, observe=observe, **method)
            self._check_finite(item, result, setting)
            if stats is not None:
                stats.measure(item, s, result, plus)
            results.append(result)
        if stats is not None:
            stats.block_done(item)
        return results, kept, fresh

    def _accumulate(self, block: Block, inputs: list[torch.Tensor]) -> None:
        """A "norms" block: its share of its rows' Gram matrices (a new unit starts with a row's or tensor's first)."""
        job = block.job
        vectors, theta0, (key, reduce_dim, n_pairs, offset) = _pieces_of(block, inputs)
        if self._unit is None or self._unit.key != key:
            sums = dict(products=self.stats is not None, cross=method_spec(self.options.method).needs_products)
            self._unit = _RowsInPieces(key, RowGram(1 + len(job.antis), n_pairs, device=inputs[0].device, **sums))
        gram = self._unit.gram
        gram.add(vectors, theta0, reduce_dim=reduce_dim, workspace=self.workspace, pair_offset=offset)
        if not gram.finite():
            self._check_inputs(block)

    def _update(
        self, block: Block, out: torch.Tensor, inputs: list[torch.Tensor], setting: int, observe: Observer | None
    ) -> None:
        """An "update" block: its piece of the result for λ setting `setting`, from the rows' Gram matrices."""
        job = block.job
        vectors, theta0, (key, reduce_dim, _, offset) = _pieces_of(block, inputs)
        unit = self._unit
        if unit is None or unit.key != key:
            raise MergeError(f"tensor {job.name!r}: an update block came before the norms of its rows")
        if unit.coefficients is None:
            dtype = compute_dtype(*(t.dtype for t in inputs))
            lams = [[setting_lams[k - 1] for k in job.antis] for setting_lams in self.options.settings]
            spec = method_spec(self.options.method)
            unit.coefficients = [unit.gram.coefficients(lam, spec).to(dtype) for lam in lams]
            if observe is not None:
                for k in range(len(job.antis)):
                    observe(k, unit.gram.row_sums(k + 1))
        where = dict(reduce_dim=reduce_dim, workspace=self.workspace, pair_offset=offset)
        combine_into(out.view(vectors[0].shape), vectors, theta0, unit.coefficients[setting], **where)

    def _check_inputs(self, block: Block) -> None:
        """Raise an InputError naming the input whose block holds a NaN or Inf (read again: the op writes in place)."""
        job = block.job
        for i in job.inputs():
            data = self._read_rows(block, i, torch.empty(self._range(block, i)[1], dtype=torch.uint8))
            problem = nonfinite_summary(data, first_row=block.start)
            if problem is not None:
                path = self.readers[i].info(job.name).path
                where = display_path(self.inputs[i], path) if self.inputs else path.name
                raise InputError(
                    f"tensor {job.name!r} in {self.roles[i]} ({where}) contains {problem}; "
                    "the op needs finite weights, so fix or drop that input"
                )

    def _check_cast(self, item: Block | Batch, source: torch.Tensor, copy: torch.Tensor) -> None:
        """A tensor copied into another dtype (dtype=) must not turn finite values into ±inf."""
        if isinstance(item, Batch):  # unless nothing overflowed, or a NaN/Inf is copied as it is: tensor by tensor
            for block, start, stop in item.row_ranges() if all_finite(source) and not all_finite(copy) else ():
                self._check_cast(block, source[start:stop], copy[start:stop])
            return
        problem = cast_overflow(source, copy)
        if problem is not None:
            role = self.roles[item.job.source]
            raise InputError(
                f"tensor {item.job.name!r} (copied from {role}) has {problem}; dtype="
                f'"{str(copy.dtype).removeprefix("torch.")}" cannot hold it: choose a wider dtype=, or "keep"',
                options=("dtype",),
            )

    def _check_finite(self, item: Block | Batch, result: torch.Tensor, setting: tuple[float, ...]) -> None:
        """A NaN or Inf in a result names the input tensor holding one, or else the overflow."""
        if all_finite(result):
            return
        if isinstance(item, Batch):
            for block, start, stop in item.row_ranges():
                self._check_finite(block, result[start:stop].reshape(block.shape()), setting)
            return
        job = item.job
        self._check_inputs(item)
        raise InputError(
            f"tensor {job.name!r}: the result at λ={lam_label(setting)} overflows {job.out_dtype} although the inputs "
            'are finite; use a smaller λ or dtype="float32"',
            options=("dtype",),
        )


@dataclass
class _RowsInPieces:
    """The rows streamed in two passes now: their Gram and, once the norms are in, the coefficients per setting."""

    key: tuple[str, int]
    gram: RowGram
    coefficients: list[torch.Tensor] | None = None


def _pieces_of(block: Block, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None, tuple]:
    """A two-pass block's 2-D views (vectors; θ₀ apart) and (its unit, reduce axis, unit's op rows, first here)."""
    job = block.job
    flat = block.cols is not None
    views = [t.view(1, -1) if flat else t for t in inputs]
    theta0 = views[-1] if job.base is not None else None
    vectors = views[: 1 + len(job.antis)]
    if job.transposed:
        offset = block.cols[0] if flat else 0
        return vectors, theta0, ((job.name, 0), 0, row_elements(job.shape), offset)
    return vectors, theta0, ((job.name, block.start), 1, 1, 0)
