"""Row statistics of a dense run, item by item in the compute stage: the geometry from the first λ setting, the
relative change from it (one anti-expert) or measured (several); partial sums of rows in pieces add up here."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from extsub_kernels.engine.batches import Batch
from extsub_kernels.engine.methods import CPU_CHUNK_ELEMENTS
from extsub_kernels.engine.plan import Block, TensorJob, row_elements, rows_of
from extsub_kernels.engine.stats import PairAccumulator, TensorStats, measured_change


@dataclass
class _Open:
    """A tensor whose rows are still coming: accumulators, ‖θ' − θ⁺‖² per setting, partial sums of rows in pieces."""

    pairs: list[PairAccumulator]
    changed_sq: list[float] = field(default_factory=list)
    partial: list[torch.Tensor | None] = field(default_factory=list)


class DenseStats:
    """Accumulators of the tensors being streamed, and the `TensorStats` of those `done`."""

    def __init__(self, roles: Sequence[str], settings: Sequence[tuple[float, ...]], method: str):
        self.roles, self.settings, self.method = list(roles), list(settings), method
        self.done: list[TensorStats] = []
        self._open: dict[str, _Open] = {}
        self._scratch: torch.Tensor | None = None

    def observer(self, item: Block | Batch) -> Callable[[int, torch.Tensor], None]:
        """The `observe` hook of `apply_method` for this item: (step, row sums) → each tensor's accumulator."""
        parts = _parts(item)
        for job, _, _ in parts:
            if job.name not in self._open:
                accumulators = [PairAccumulator() for _ in job.antis]
                self._open[job.name] = _Open(accumulators, [0.0] * len(self.settings), [None] * len(job.antis))
        unit = _part_of_rows(item)

        def observe(step: int, sums: torch.Tensor) -> None:
            if unit is not None:  # partial sums of rows still coming: added up until they end
                tensor, (n_pairs, first) = self._open[item.job.name], unit
                if tensor.partial[step] is None:
                    tensor.partial[step] = torch.zeros(n_pairs, 3, dtype=torch.float64, device=sums.device)
                tensor.partial[step][first : first + sums.shape[0]] += sums
                return
            for job, start, stop in parts:
                self._open[job.name].pairs[step].add(sums[start:stop])

        return observe

    def measure(self, item: Block | Batch, setting: int, result: torch.Tensor, plus: torch.Tensor) -> None:
        """Several steps: add ‖result − plus‖² of each tensor's rows at λ setting `setting`."""
        if len(item.job.antis) < 2:
            return
        if result.device.type == "cpu" and self._scratch is None:
            self._scratch = torch.empty(CPU_CHUNK_ELEMENTS, dtype=torch.float64)
        scratch = self._scratch if result.device.type == "cpu" else None
        for job, start, stop in _parts(item):
            change = measured_change(result[start:stop], plus[start:stop], scratch=scratch)
            self._open[job.name].changed_sq[setting] += change

    def block_done(self, item: Block | Batch) -> None:
        """Add the sums of rows whose last piece this is; summarise tensors whose last rows these are."""
        for job, _, _ in _parts(item):
            if isinstance(item, Block):
                tensor = self._open[job.name]
                if _part_of_rows(item) is not None and _ends(item, unit=True):
                    for acc, sums in zip(tensor.pairs, tensor.partial, strict=True):
                        if sums is not None:
                            acc.add(sums)
                    tensor.partial = [None] * len(job.antis)
                if not _ends(item, unit=False):
                    continue
            tensor = self._open.pop(job.name)
            pairs = tuple(acc.result(self.roles[k]) for acc, k in zip(tensor.pairs, job.antis, strict=True))
            if len(job.antis) == 1:
                k = job.antis[0]
                changes = tuple(pairs[0].relative_change(setting[k - 1], self.method) for setting in self.settings)
            else:
                norm = pairs[0].expert_norm
                changes = tuple(
                    math.sqrt(sq) / norm if norm > 0 else (0.0 if sq == 0 else None) for sq in tensor.changed_sq
                )
            self.done.append(TensorStats(job.name, "tensor", pairs, changes))


def _parts(item: Block | Batch) -> list[tuple[TensorJob, int | None, int | None]]:
    """(tensor, first row, end row) of each tensor within the op rows of `item` (a block: all of them)."""
    if isinstance(item, Batch):
        return [(block.job, start, stop) for block, start, stop in item.row_ranges()]
    return [(item.job, None, None)]


def _part_of_rows(item: Block | Batch) -> tuple[int, int] | None:
    """(the unit's op rows, first here) when a one-pass `item` holds part of its op rows; else None."""
    if not isinstance(item, Block) or item.phase != "one-pass":
        return None
    job = item.job
    if job.transposed and (item.cols is not None or (item.start, item.stop) != (0, rows_of(job.shape))):
        return row_elements(job.shape), item.cols[0] if item.cols is not None else 0
    return (1, 0) if item.cols is not None else None


def _ends(item: Block, unit: bool) -> bool:
    """Whether `item` is the last of its tensor (or, with `unit`, of the op rows it holds part of)."""
    job = item.job
    row_done = item.cols is None or item.cols[1] == row_elements(job.shape)
    if unit and not job.transposed:
        return row_done
    return row_done and item.stop == rows_of(job.shape)
