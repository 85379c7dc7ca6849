"""Runs of small, alike consecutive tensors (same inputs, dtypes and row width) streamed as one item: their rows
stacked are one matrix per input (the op is row-wise), read once, merged once and written as one run."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from extsub_kernels.engine.plan import Block, TensorJob, rows_of

# A tensor whose widest form (any input, or the output) is under this size may join a batch.
SMALL_TENSOR_BYTES = 1 << 16


@dataclass(frozen=True)
class Batch:
    """Small tensors as one item: `rows` of `width`; `nbytes` of its widest form (one buffer); `read_bytes` in all."""

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
    """A run's items in order: blocks as they come, small alike tensors batched up to `limit` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: list[Block | Batch] = []
        self._jobs: list[TensorJob] = []
        self._key: tuple | None = None
        self._nbytes = self._rows = self._read = 0

    def add_small(self, job: TensorJob, key: tuple, width: int, nbytes: int, read: int) -> None:
        """A small tensor: `key` what its batch shares, `width` per row, `nbytes` widest form, `read` bytes read."""
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
