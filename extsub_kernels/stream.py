"""Stream a planned merge: blocks of rows are read, combined on the device and appended to every output.

Each block is read with `pread` into a pooled host buffer (pinned on CUDA), moved to the
device, combined once per λ setting, checked for NaN/Inf, brought back and written. The
three stages overlap (`pipeline`), so at most a few blocks are in memory at any time.
"""

import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from extsub_kernels.combine import combine
from extsub_kernels.devices import BufferPool, Transfer, view_as
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, CheckpointWriter
from extsub_kernels.pipeline import run_pipeline
from extsub_kernels.plan import Block, TensorJob, cut_blocks, lam_label, rows_of


def row_bytes(job: TensorJob, readers: Sequence[CheckpointReader]) -> int:
    """Bytes of one row of `job` in its widest form: any of its inputs, or its output."""
    rows = rows_of(job.shape)
    infos = [readers[i].info(job.name) for i in job.inputs()]
    numel = infos[0].nbytes // infos[0].dtype.itemsize
    widest = max([info.nbytes for info in infos] + [numel * job.out_dtype.itemsize])
    return widest // rows if rows else 0


class BlockStreamer:
    """The stages of a merge over blocks of rows: `read` (a thread), `compute` (the caller), `write` (a thread).

    Args:
        readers: the inputs, numbered as in `TensorJob` (expert, anti-experts, base).
        roles: a name per input for messages (EXPERT, ANTI, BASE).
        settings: λ per anti-expert, one tuple per output.
        method: "ext-sub", "sub" or "add".
        device: where `combine` runs.
        writers: one output per setting; blocks must come in `writers[0].order`.
    """

    def __init__(self, readers: Sequence[CheckpointReader], roles: Sequence[str], settings: Sequence[tuple[float, ...]],
                 method: str, device: torch.device, writers: Sequence[CheckpointWriter]):  # fmt: skip
        self.readers, self.roles, self.settings, self.method, self.writers = readers, roles, settings, method, writers
        self.transfer = Transfer(device)
        self.pool = BufferPool(1, pin=self.transfer.cuda)

    def blocks(self, jobs: Sequence[TensorJob], block_bytes: int) -> list[Block]:
        """`jobs` cut into blocks of rows, in the writers' order; sizes the buffer pool for them."""
        by_name = {j.name: j for j in jobs}
        blocks = []
        for entry in self.writers[0].order:
            job = by_name[entry.name]
            width = row_bytes(job, self.readers)
            for block in cut_blocks(job, width, block_bytes):
                blocks.append(block)
                self.pool.capacity = max(self.pool.capacity, width * (block.stop - block.start))
        return blocks

    def run(self, blocks: Sequence[Block], *, progress: bool = False) -> int:
        """Stream every block through read → combine → write; returns the bytes read."""
        total = sum(self.read_bytes(b) for b in blocks)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="extsub-merge", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)  # fmt: skip
        with bar, self.transfer:
            self.transfer.reset_peak()
            run_pipeline(blocks, self.read, self.compute, lambda block, result: self.write(block, result, bar))
        return total

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
        return [self._read_rows(block, i, buf) for i, buf in zip(block.job.inputs(), buffers)], buffers

    def compute(self, block: Block, payload: tuple[list[torch.Tensor], list[torch.Tensor]]):
        tensors, buffers = payload
        job = block.job
        moved = self.transfer.to_device(tensors)
        if not job.merged:
            return self._to_host([moved[0].to(job.out_dtype)] * len(self.settings), buffers)
        plus, minus = moved[0], moved[1 : 1 + len(job.antis)]
        theta0 = moved[-1] if job.base is not None else None
        results = []
        for s, setting in enumerate(self.settings):
            lams = [setting[k - 1] for k in job.antis]
            last = s == len(self.settings) - 1
            results.append(combine(plus, minus, lams, method=self.method, base=theta0, out_dtype=job.out_dtype,
                                   transposed=job.transposed, inplace=last))  # fmt: skip
            self._check_finite(block, results[-1], setting)
        return self._to_host(results, buffers)

    def _to_host(self, results: list[torch.Tensor], buffers: list[torch.Tensor]):
        """Results on the host, the buffers they occupy (freed after writing), and the event to wait for."""
        if not self.transfer.cuda:
            keep = [b for b in buffers if any(_shares(r, b) for r in results)]
            self.pool.put([b for b in buffers if not any(b is k for k in keep)])
            return results, keep, None
        self.pool.put(buffers)
        host, keep, seen = [], [], {}
        for r in results:
            if id(r) not in seen:
                keep.append(self.pool.get())
                seen[id(r)] = self.transfer.to_host(r, keep[-1])
            host.append(seen[id(r)])
        return host, keep, self.transfer.done_event()

    def write(self, block: Block, result, bar: tqdm) -> None:
        host, keep, event = result
        self.transfer.ready(event)
        for tensor, writer in zip(host, self.writers):
            writer.write(block.job.name, tensor)
        self.pool.put(keep)
        bar.update(self.read_bytes(block))

    def _check_finite(self, block: Block, result: torch.Tensor, setting: tuple[float, ...]) -> None:
        """A NaN or Inf in a result names the input tensor holding one, or else the overflow."""
        if all_finite(result):
            return
        job = block.job
        for i in job.inputs():  # read again: the expert's block may have been overwritten in place
            data = self._read_rows(block, i, torch.empty(self._range(block, i)[1], dtype=torch.uint8))
            if not all_finite(data):
                where = self.readers[i].info(job.name).path.name
                raise InputError(
                    f"tensor {job.name!r} in {self.roles[i]} ({where}) contains NaN or Inf (first in row "
                    f"{block.start + _first_nonfinite_row(data)}); the op needs finite weights, so fix or drop that input"
                )
        raise InputError(
            f"tensor {job.name!r}: the result at λ={lam_label(setting)} overflows {job.out_dtype} although the inputs "
            "are finite; use a smaller λ or --dtype float32"
        )


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf: min and max propagate NaN, so one fast reduction tells.

    Example:
        >>> all_finite(torch.tensor([1.0, float("nan")]))
        False
    """
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _first_nonfinite_row(t: torch.Tensor) -> int:
    rows = t.reshape(t.shape[0] if t.dim() >= 2 else 1, -1)
    return int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0])


def _shares(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
