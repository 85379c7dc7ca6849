"""Row statistics of a dense run, gathered item by item in the compute stage, one `TensorStats` per merged tensor.

The geometry of each anti-expert (cos, deficiency share) is taken against the expert's rows
(task vectors with a base); it does not depend on λ, so the first λ setting of an item gives
it. The relative change per λ setting follows from it for one anti-expert; a tensor merged
with several anti-experts in sequence has its change measured on the result. An item is a
block of one tensor's rows, or a batch of whole small tensors whose rows are stacked: each
tensor takes its own rows of the item.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from extsub_kernels.engine.batches import Batch
from extsub_kernels.engine.plan import Block, TensorJob, rows_of
from extsub_kernels.engine.stats import PairAccumulator, TensorStats, measured_change


@dataclass
class _Open:
    """A tensor whose rows are still coming: one accumulator per anti-expert, ‖θ' − θ⁺‖² per λ setting."""

    pairs: list[PairAccumulator]
    changed_sq: list[float] = field(default_factory=list)


class DenseStats:
    """Accumulators of the tensors being streamed, and the `TensorStats` of those done.

    Args:
        roles: a name per input, numbered as in `TensorJob` (EXPERT, ANTI, ..., BASE).
        settings: λ per anti-expert, one tuple per output.
        method: "ext-sub", "sub" or "add".
    """

    def __init__(self, roles: Sequence[str], settings: Sequence[tuple[float, ...]], method: str):
        self.roles, self.settings, self.method = list(roles), list(settings), method
        self.done: list[TensorStats] = []
        self._open: dict[str, _Open] = {}

    @staticmethod
    def _parts(item: Block | Batch) -> list[tuple[TensorJob, int | None, int | None]]:
        """(tensor, first row, end row) of each tensor within the rows the op pairs in `item` (a block: all of them,
        the columns of a weight stored transposed)."""
        if isinstance(item, Batch):
            return [(block.job, start, stop) for block, start, stop in item.row_ranges()]
        return [(item.job, None, None)]

    def observer(self, item: Block | Batch) -> Callable[[int, torch.Tensor], None]:
        """The `observe` hook of `apply_method` for this item: (step, row sums) → each tensor's accumulator."""
        parts = self._parts(item)
        for job, _, _ in parts:
            if job.name not in self._open:
                accumulators = [PairAccumulator() for _ in job.antis]
                self._open[job.name] = _Open(accumulators, [0.0] * len(self.settings))

        def observe(step: int, sums: torch.Tensor) -> None:
            for job, start, stop in parts:
                self._open[job.name].pairs[step].add(sums[start:stop])

        return observe

    def measure(self, item: Block | Batch, setting: int, result: torch.Tensor, plus: torch.Tensor) -> None:
        """Several steps: add ‖result − plus‖² of each tensor's rows at λ setting `setting` (before `plus` is
        reused)."""
        if len(item.job.antis) < 2:
            return
        for job, start, stop in self._parts(item):
            self._open[job.name].changed_sq[setting] += measured_change(result[start:stop], plus[start:stop])

    def block_done(self, item: Block | Batch) -> None:
        """After the last rows of a tensor, summarise it."""
        for job, _, _ in self._parts(item):
            if isinstance(item, Block) and item.stop < rows_of(job.shape) and not job.transposed:
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
