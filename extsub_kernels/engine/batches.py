"""Runs of small tensors streamed as one item: one read per input, one call of the method, one write.

Consecutive tensors (in the outputs' order) that are small and alike — the same inputs, dtypes, output dtype and
row width — form a `Batch`: their rows stacked are one (rows, width) matrix per input, and the op works row by
row, so merging the stack is merging each tensor; their output bytes are consecutive, written as one run.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from extsub_kernels.engine.plan import Block, TensorJob, rows_of

# A tensor whose widest form (any input, or the output) is under this size may join a batch.
SMALL_TENSOR_BYTES = 1 << 16


@dataclass(frozen=True)
class Batch:
    """Whole small tensors, consecutive in the outputs' order, streamed as one item: their `rows` stacked, `width`
    elements each; `nbytes`: the widest of its inputs and output (what one buffer holds); `read_bytes`: all inputs."""

    jobs: tuple[TensorJob, ...]
    rows: int
    width: int
    nbytes: int
    read_bytes: int

    phase: ClassVar[str] = "one-pass"  # computed on its own, as a `Block` of whole rows is

    @property
    def job(self) -> TensorJob:
        return self.jobs[0]

    def shape(self) -> tuple[int, int]:
        return (self.rows, self.width)

    @property
    def names(self) -> list[str]:
        return [job.name for job in self.jobs]

    def row_ranges(self) -> Iterator[tuple[Block, int, int]]:
        """(the tensor as one block, first row, end row) of each tensor within the stacked rows."""
        row = 0
        for job in self.jobs:
            rows = rows_of(job.shape)
            yield Block(job, 0, rows), row, row + rows
            row += rows


class Batcher:
    """Collects the items of a run in order: large blocks as they come, small alike tensors gathered into batches of
    at most `limit` bytes per input (or output)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: list[Block | Batch] = []
        self._jobs: list[TensorJob] = []
        self._key: tuple | None = None
        self._nbytes = self._rows = self._read = 0

    def add_small(self, job: TensorJob, key: tuple, width: int, nbytes: int, read: int) -> None:
        """A whole small tensor: `key` says what it must share with its batch, `width` its elements per row,
        `nbytes` its widest form, `read` its bytes over all inputs."""
        if key != self._key or self._nbytes + nbytes > self.limit:
            self.flush()
            self._key, self._width = key, width
        self._jobs.append(job)
        self._nbytes += nbytes
        self._rows += rows_of(job.shape)
        self._read += read

    def add(self, item: Block) -> None:
        self.flush()
        self.items.append(item)

    def flush(self) -> None:
        if len(self._jobs) == 1:
            job = self._jobs[0]
            self.items.append(Block(job, 0, rows_of(job.shape)))
        elif self._jobs:
            self.items.append(Batch(tuple(self._jobs), self._rows, self._width, self._nbytes, self._read))
        self._jobs, self._key = [], None
        self._nbytes = self._rows = self._read = 0
